"""DeepAR band: a short training on generated daily cycles trains, calibrates, saves as plain arrays,
loads into the identical band, and scores a planted drop far below the band above normal buckets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_dagster.detectors import DETECTOR_CLASSES, load_detectors, save_detectors
from anomaly_dagster.detectors.deepar import DeepARDetector

FEATURES = ["users", "clicks"]
SLOTS = 144
FAST = {"epochs": 3, "num_batches_per_epoch": 10, "num_samples": 100}  # ~3 s of training
DROP_ROW = 60


def daily_frame(days: int, seed: int, first_day: str) -> pd.DataFrame:
    """``days`` days of 10-minute buckets from ``first_day``: a daily cycle plus noise."""
    rng = np.random.default_rng(seed)
    n = SLOTS * days
    slot = np.arange(n) % SLOTS
    cycle = np.sin(2 * np.pi * slot / SLOTS)
    return pd.DataFrame(
        {
            "bucket_start": pd.date_range(first_day, periods=n, freq="10min"),
            "users": 100 + 30 * cycle + rng.normal(0, 3, n),
            "clicks": 150 + 45 * cycle + rng.normal(0, 4, n),
            "slot": slot,
        }
    )


@pytest.fixture(scope="module")
def training() -> pd.DataFrame:
    return daily_frame(4, seed=1, first_day="2020-07-07")


@pytest.fixture(scope="module")
def scored_day() -> pd.DataFrame:
    """The day after the training window, with users dropping to zero in one bucket."""
    day = daily_frame(1, seed=2, first_day="2020-07-11")
    day.loc[DROP_ROW, "users"] = 0.0
    return day


@pytest.fixture(scope="module")
def fitted(training) -> DeepARDetector:
    return DeepARDetector(FEATURES, **FAST).fit(training)


@pytest.mark.slow
def test_band_of_the_scored_day(fitted, scored_day) -> None:
    band = fitted.band(scored_day)
    assert band.shape == (SLOTS, 3 * len(FEATURES))
    assert list(band.columns) == [f"{f}_{q}" for f in FEATURES for q in ("q01", "q50", "q99")]
    assert np.isfinite(band.to_numpy()).all()
    for feature in FEATURES:
        assert (band[f"{feature}_q01"] <= band[f"{feature}_q50"]).all()
        assert (band[f"{feature}_q50"] <= band[f"{feature}_q99"]).all()
    pd.testing.assert_frame_equal(
        fitted.expected(scored_day), band[[f"{f}_q50" for f in FEATURES]].set_axis(FEATURES, axis=1)
    )


@pytest.mark.slow
def test_planted_drop_scores_above_normal_buckets(fitted, scored_day) -> None:
    scores = fitted.score(scored_day)
    normal = np.delete(scores, DROP_ROW)
    assert scores[DROP_ROW] > 1.0
    assert scores[DROP_ROW] > normal.max()
    assert (normal == 0).mean() > 0.9  # calibrated: a normal day sits inside the band
    explanation = fitted.explain(scored_day)
    assert explanation[DROP_ROW, 0] < 0  # users, below the band
    assert explanation[DROP_ROW, 1] == 0.0  # clicks did not move


@pytest.mark.slow
def test_band_is_calibrated_on_training_backtests(fitted, training) -> None:
    scores = fitted.score(training)
    backtested = np.arange(len(training)) >= fitted.min_context  # the first day has no past to start from
    assert (scores[backtested] == 0).mean() == pytest.approx(0.99, abs=0.005)
    assert (scores[~backtested] == 0).all()
    assert np.isnan(fitted.bounds(training)[:, ~backtested]).all()
    # those placeholder zeros are not measured scores: a threshold calibrated on them sat 8-19% low
    np.testing.assert_array_equal(fitted.scored_rows(training), backtested)
    np.testing.assert_array_equal(fitted.assess(training).scored, backtested)


@pytest.mark.slow
def test_save_and_load_give_the_identical_band(fitted, scored_day, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(DETECTOR_CLASSES, DeepARDetector.kind, DeepARDetector)
    path = tmp_path / "model.npz"
    save_detectors(path, {"deepar": fitted}, {"training_days": []})
    with np.load(path, allow_pickle=False) as archive:
        stored = {name: archive[name] for name in archive.files}
    weights = [name for name in stored if name.startswith("deepar/weights/")]
    assert "deepar/weights/model.rnn.weight_ih_l0" in weights
    assert all(stored[name].dtype == np.float32 for name in weights)
    loaded = load_detectors(path)[0]["deepar"]
    assert isinstance(loaded, DeepARDetector)
    pd.testing.assert_frame_equal(loaded.band(scored_day), fitted.band(scored_day), check_exact=True)
    np.testing.assert_array_equal(loaded.score(scored_day), fitted.score(scored_day))


@pytest.mark.slow
def test_training_is_deterministic_and_leaves_global_state_alone(fitted, training) -> None:
    import torch

    numpy_state, threads = np.random.get_state()[1].copy(), torch.get_num_threads()
    again = DeepARDetector(FEATURES, **FAST).fit(training)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert torch.get_num_threads() == threads
    assert again.weights.keys() == fitted.weights.keys()
    for name, value in fitted.weights.items():
        np.testing.assert_array_equal(again.weights[name], value)
    np.testing.assert_array_equal(again.factors, fitted.factors)


@pytest.mark.slow
def test_a_one_day_window_trains_on_its_own_halves() -> None:
    """The walk-forward's second day: one day of history is enough to fit and forecast."""
    day = daily_frame(1, seed=3, first_day="2020-07-07")
    detector = DeepARDetector(FEATURES, **FAST).fit(day)
    assert detector.min_context == SLOTS // 2
    band = detector.band(daily_frame(1, seed=4, first_day="2020-07-08"))
    assert np.isfinite(band.to_numpy()).all()


@pytest.mark.slow
def test_a_missing_day_lengthens_the_horizon(fitted) -> None:
    later = daily_frame(1, seed=5, first_day="2020-07-12")  # 2020-07-11 is not in the history
    assert np.isfinite(fitted.band(later).to_numpy()).all()


@pytest.mark.slow
def test_a_missing_day_inside_the_window_does_not_blow_up_the_band(training) -> None:
    """A day left out of the window (no rows: an outage day the walk-forward skips) gives the backtest that
    starts after it an all-missing context; its degenerate forecast must not calibrate the band."""
    gappy = training[pd.DatetimeIndex(training["bucket_start"]).normalize() != pd.Timestamp("2020-07-09")]
    detector = DeepARDetector(FEATURES, **FAST).fit(gappy)
    assert (detector.factors < 10).all(), detector.factors
    day = daily_frame(1, seed=2, first_day="2020-07-11")
    day.loc[DROP_ROW, "users"] = 1000.0
    assert detector.score(day)[DROP_ROW] > 1.0


@pytest.mark.slow
def test_a_window_ending_without_observations_flags_nothing_it_cannot_forecast(training) -> None:
    """The window's last day has no value at all (a silent sensor's means): a forecast from it would be a
    band of width ~0 around 0 that flags every bucket of the next day."""
    silent = training.copy()
    silent.loc[3 * SLOTS :, FEATURES] = np.nan
    detector = DeepARDetector(FEATURES, **FAST).fit(silent)
    assert (detector.score(daily_frame(1, seed=2, first_day="2020-07-11")) == 0).all()


def test_rows_need_a_bucket_start(training) -> None:
    with pytest.raises(KeyError, match="bucket_start"):
        DeepARDetector(FEATURES).fit(training.drop(columns="bucket_start"))


def test_features_default_to_users_and_clicks() -> None:
    assert DeepARDetector().features == ["users", "clicks"]


def test_importing_the_detector_does_not_import_torch() -> None:
    code = "import sys, anomaly_dagster.detectors.deepar; sys.exit('torch' in sys.modules or 'gluonts' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
