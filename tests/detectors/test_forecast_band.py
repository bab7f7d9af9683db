"""Seasonal band: calibrated to cover ~99% of normal training buckets, planted spikes and drops fall
outside with the right sign, and the model survives a pickle-free save/load unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_dagster.detectors import DETECTOR_CLASSES, load_detectors, save_detectors
from anomaly_dagster.detectors.forecast_band import SeasonalBandDetector, widen, widen_factors

FEATURES = ["users", "clicks", "residual"]
SLOTS = 144
# row of the scored day -> (feature, shift): spikes and drops of many noise SDs
PLANTED = {20: ("users", 40.0), 70: ("clicks", -60.0), 110: ("residual", 25.0), 125: ("users", -45.0)}


def daily_frame(days: int, seed: int) -> pd.DataFrame:
    """``days`` days of 10-minute feature rows with a daily cycle and noise proportional to the level."""
    rng = np.random.default_rng(seed)
    slot = np.tile(np.arange(SLOTS), days)
    cycle = np.sin(2 * np.pi * slot / SLOTS)
    n = len(slot)
    users = 100 + 30 * cycle
    clicks = 150 + 45 * cycle
    return pd.DataFrame(
        {
            "users": users + rng.normal(0, 0.04 * users, n),
            "clicks": clicks + rng.normal(0, 0.04 * clicks, n),
            "residual": 50 + rng.standard_t(5, n) * 2,  # heavier tails than the others
            "slot": slot,
        }
    )


def with_planted(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for row, (feature, shift) in PLANTED.items():
        frame.loc[row, feature] += shift
    return frame


@pytest.fixture(scope="module")
def training() -> pd.DataFrame:
    return daily_frame(7, seed=1)


@pytest.fixture(scope="module")
def fitted(training: pd.DataFrame) -> SeasonalBandDetector:
    return SeasonalBandDetector(FEATURES).fit(training)


def test_band_covers_the_configured_share_of_clean_days(fitted, training) -> None:
    # calibrated on held-out days: two new clean weeks fall inside ~99%, the training rows at least that
    fresh = daily_frame(14, seed=5)
    assert (fitted.score(fresh) == 0).mean() == pytest.approx(0.99, abs=0.01)
    assert (fitted.score(training) == 0).mean() >= 0.99
    looser = SeasonalBandDetector(FEATURES, coverage=0.95).fit(training)
    assert (looser.score(fresh) == 0).mean() == pytest.approx(0.95, abs=0.02)


def test_a_one_day_window_is_calibrated_in_sample() -> None:
    day = daily_frame(1, seed=6)
    detector = SeasonalBandDetector(FEATURES).fit(day)
    assert (detector.score(day) == 0).mean() >= 0.99
    assert np.isfinite(detector.factors).all()


def test_a_window_whose_other_day_had_no_data_still_trains() -> None:
    """Two days, the second an outage (its means missing): holding the first day out left no rows to
    fit a band on, and fitting raised. A feature that only one day has is calibrated in sample."""
    window = daily_frame(2, seed=8)
    window.loc[SLOTS:, ["clicks", "residual"]] = np.nan
    detector = SeasonalBandDetector(FEATURES).fit(window)
    alone = SeasonalBandDetector(FEATURES).fit(window.iloc[:SLOTS])
    np.testing.assert_allclose(detector.factors[1:], alone.factors[1:])  # clicks and residual: in sample
    assert np.isfinite(detector.factors).all() and (detector.score(window.iloc[:SLOTS]) == 0).mean() >= 0.99


def test_days_come_from_bucket_start_when_there_is_one(training) -> None:
    stamped = training.assign(bucket_start=pd.date_range("2020-07-07", periods=len(training), freq="10min"))
    by_slot = SeasonalBandDetector(FEATURES).fit(training)
    by_date = SeasonalBandDetector(FEATURES).fit(stamped)
    np.testing.assert_array_equal(by_slot.factors, by_date.factors)


def test_raw_quantiles_alone_would_cover_less(fitted) -> None:
    """Three features each within their own 1%..99% of the training days leave more than 1% of a new day out."""
    raw = SeasonalBandDetector(FEATURES).fit(daily_frame(7, seed=1))
    raw.factors = np.ones(len(FEATURES))
    fresh = daily_frame(7, seed=5)
    assert (raw.score(fresh) == 0).mean() < 0.97
    assert (fitted.factors > 1).all()


def test_planted_spikes_and_drops_are_outside_with_the_right_sign(fitted) -> None:
    scored = with_planted(daily_frame(1, seed=2))
    scores = fitted.score(scored)
    explanation = fitted.explain(scored)
    assert explanation.shape == (SLOTS, len(FEATURES))
    for row, (feature, shift) in PLANTED.items():
        column = FEATURES.index(feature)
        assert scores[row] > 0.5, (row, scores[row])  # outside the band by half its width or more
        assert np.sign(explanation[row, column]) == np.sign(shift)
        assert int(np.argmax(np.abs(explanation[row]))) == column
    normal = np.setdiff1d(np.arange(SLOTS), list(PLANTED))
    assert set(np.argsort(scores)[-len(PLANTED) :]) == set(PLANTED)
    assert (scores[normal] == 0).mean() > 0.95


def test_band_table_is_ordered_and_centred_on_the_expected_values(fitted) -> None:
    frame = daily_frame(1, seed=3)
    band = fitted.band(frame)
    assert list(band.columns) == [f"{f}_{q}" for f in FEATURES for q in ("q01", "q50", "q99")]
    assert band.shape == (SLOTS, 3 * len(FEATURES))
    for feature in FEATURES:
        assert (band[f"{feature}_q01"] < band[f"{feature}_q50"]).all()
        assert (band[f"{feature}_q50"] < band[f"{feature}_q99"]).all()
        np.testing.assert_array_equal(band[f"{feature}_q50"], fitted.expected(frame)[feature])
    # the median follows the daily cycle: highest around slot 36 (sin peak), lowest around slot 108
    assert 30 <= band["users_q50"].idxmax() <= 42
    assert 102 <= band["users_q50"].idxmin() <= 114


def test_score_is_distance_in_half_widths() -> None:
    frame = pd.DataFrame({"x": np.r_[np.linspace(-1, 1, 99), 0.0], "slot": 0})
    detector = SeasonalBandDetector(["x"], time_of_day_window=None).fit(frame)
    lower, median, upper = detector.bounds(frame.iloc[:1])[:, 0, 0]
    probe = pd.DataFrame(
        {"x": [median, upper, upper + 2 * (upper - median), lower - (median - lower)], "slot": 0}
    )
    np.testing.assert_allclose(detector.explain(probe)[:, 0], [0.0, 0.0, 2.0, -1.0])
    np.testing.assert_allclose(detector.score(probe), [0.0, 0.0, 2.0, 1.0])


def test_widening_factors_reach_the_share_per_feature() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(10_000, 2)) * [1.0, 5.0]
    raw = np.broadcast_to(np.array([-1.0, 0.0, 1.0])[:, None, None], (3, 10_000, 2))
    factors = widen_factors(values, raw, coverage=0.99)
    # each feature gets 99.5% two-sided: |z| < 2.807 sd
    np.testing.assert_allclose(factors, [2.807, 5 * 2.807], rtol=0.05)
    lower, _, upper = widen(raw, factors)
    inside = ((values >= lower) & (values <= upper)).all(axis=1)
    assert inside.mean() == pytest.approx(0.99, abs=0.002)


def test_constant_slots_get_a_usable_band() -> None:
    frame = pd.DataFrame({"x": np.zeros(SLOTS * 3), "slot": np.tile(np.arange(SLOTS), 3)})
    detector = SeasonalBandDetector(["x"]).fit(frame)
    probe = pd.DataFrame({"x": [0.0, 5.0], "slot": [0, 1]})
    scores = detector.score(probe)
    assert scores[0] == 0.0
    assert np.isfinite(scores[1]) and scores[1] > 1.0


def test_missing_values_are_not_scored(fitted) -> None:
    frame = daily_frame(1, seed=4)
    frame.loc[3, "users"] = np.nan
    assert np.isnan(fitted.explain(frame)[3, 0])
    assert np.isfinite(fitted.score(frame)).all()  # a missing value is no evidence of an anomaly


def test_save_and_load_give_identical_bands(fitted, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(DETECTOR_CLASSES, SeasonalBandDetector.kind, SeasonalBandDetector)
    path = tmp_path / "model.npz"
    save_detectors(path, {"band": fitted}, {"training_days": []})
    loaded = load_detectors(path)[0]["band"]
    assert isinstance(loaded, SeasonalBandDetector)
    assert loaded.params == fitted.params
    frame = with_planted(daily_frame(1, seed=2))
    pd.testing.assert_frame_equal(loaded.band(frame), fitted.band(frame))
    np.testing.assert_array_equal(loaded.score(frame), fitted.score(frame))
    with np.load(path, allow_pickle=False) as archive:
        assert {"band/quantiles", "band/factors"} <= set(archive.files)


def test_coverage_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="coverage"):
        SeasonalBandDetector(FEATURES, coverage=1.0)


def test_a_feature_never_measured_in_the_window_has_no_band_and_the_others_do(training) -> None:
    dirty = training.copy()
    dirty["clicks"] = np.nan
    detector = SeasonalBandDetector(FEATURES).fit(dirty)
    bounds = detector.bounds(training)
    assert np.isnan(bounds[:, :, FEATURES.index("clicks")]).all()
    assert np.isfinite(np.delete(bounds, FEATURES.index("clicks"), axis=2)).all()
    assert np.isfinite(detector.score(training)).all()


def test_a_fault_in_the_training_window_does_not_blind_the_band() -> None:
    """A 70-minute outage on one day of the week stretched the users band 4-7 times (its factor is a
    high quantile over every training row), so the next day's drop of 8 sd scored 0."""
    clean = daily_frame(7, seed=11)
    faulty = clean.copy()
    faulty.loc[3 * SLOTS + 60 : 3 * SLOTS + 66, "users"] = 0.0  # day 4, slots 60-66
    day = daily_frame(1, seed=12)
    day.loc[60:66, "users"] *= 0.6  # the next fault: users 40% down at the same hour
    unaffected = SeasonalBandDetector(FEATURES).fit(clean)
    detector = SeasonalBandDetector(FEATURES).fit(faulty)
    assert detector.factors[0] < 1.5 * unaffected.factors[0]
    assert (detector.score(day)[60:67] > 0).all()
    np.testing.assert_array_equal(detector.factors[1:], unaffected.factors[1:])  # per feature


def test_two_days_cannot_tell_a_fault_from_a_noisy_day() -> None:
    values = np.r_[np.full(144, 1.0), np.full(144, 10.0)][:, None] * np.random.default_rng(0).normal(
        size=(288, 1)
    )
    raw = np.broadcast_to(np.array([-1.0, 0.0, 1.0])[:, None, None], (3, 288, 1))
    days = np.repeat([0, 1], 144)
    np.testing.assert_array_equal(widen_factors(values, raw, 0.99, days), widen_factors(values, raw, 0.99))
