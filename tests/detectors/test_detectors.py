"""Detectors: planted outliers rank first, explanations point at the right feature and direction,
Isolation Forest scores equal scikit-learn's, and models survive a pickle-free save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import IsolationForest

from anomaly_dagster.detectors import DETECTOR_CLASSES, detector_class, load_detectors, save_detectors
from anomaly_dagster.detectors.base import MODEL_DOCUMENT_KEY, Detector
from anomaly_dagster.detectors.iqr import IQRDetector
from anomaly_dagster.detectors.isolation_forest import IsolationForestDetector, average_path_length
from anomaly_dagster.detectors.zscore import MAD_TO_SD, RobustZScoreDetector

FEATURES = ["users", "clicks", "residual"]
SLOTS = 144
# row of the scored day -> (feature, shift); shifts are many noise SDs but some stay inside the daily range
PLANTED = {20: ("users", 80.0), 70: ("clicks", -120.0), 110: ("residual", 30.0), 125: ("users", -90.0)}


def daily_frame(days: int, seed: int) -> pd.DataFrame:
    """Feature rows of ``days`` days of 10-minute buckets with a strong daily cycle and small noise."""
    rng = np.random.default_rng(seed)
    slot = np.tile(np.arange(SLOTS), days)
    phase = 2 * np.pi * slot / SLOTS
    n = len(slot)
    return pd.DataFrame(
        {
            "users": 100 + 30 * np.sin(phase) + rng.normal(0, 3, n),
            "clicks": 150 + 45 * np.sin(phase) + rng.normal(0, 4, n),
            "residual": 50 + rng.normal(0, 2, n),
            "slot": slot,
            "tod_sin": np.sin(phase),
            "tod_cos": np.cos(phase),
        }
    )


def with_planted(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for row, (feature, shift) in PLANTED.items():
        frame.loc[row, feature] += shift
    return frame


@pytest.fixture(scope="module")
def training() -> pd.DataFrame:
    return daily_frame(4, seed=1)


@pytest.fixture(scope="module")
def scored() -> pd.DataFrame:
    return with_planted(daily_frame(1, seed=2))


def assert_planted_explained(detector: Detector, frame: pd.DataFrame) -> None:
    explanation = detector.explain(frame)
    assert explanation.shape == (len(frame), len(detector.features))
    for row, (feature, shift) in PLANTED.items():
        top = int(np.argmax(np.abs(explanation[row])))
        assert detector.features[top] == feature, (row, explanation[row])
        assert np.sign(explanation[row, top]) == np.sign(shift), (row, explanation[row])


def profile_detector(kind: str, window: int | None = 3) -> Detector:
    return {"zscore": RobustZScoreDetector, "iqr": IQRDetector}[kind](FEATURES, time_of_day_window=window)


# --- robust z-score and IQR ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zscore", "iqr"])
def test_profile_detectors_rank_planted_outliers_first(kind: str, training, scored) -> None:
    detector = profile_detector(kind).fit(training)
    scores = detector.score(scored)
    assert scores.shape == (len(scored),)
    top = np.argsort(-scores)[: len(PLANTED)]
    assert set(top) == set(PLANTED)
    ordinary = np.delete(scores, list(PLANTED))
    assert scores[list(PLANTED)].min() > 2 * ordinary.max()


@pytest.mark.parametrize("kind", ["zscore", "iqr"])
def test_profile_detectors_explain_feature_and_direction(kind: str, training, scored) -> None:
    detector = profile_detector(kind).fit(training)
    assert_planted_explained(detector, scored)
    # score is the largest absolute contribution
    np.testing.assert_allclose(detector.score(scored), np.abs(detector.explain(scored)).max(axis=1))


@pytest.mark.parametrize("kind", ["zscore", "iqr"])
def test_time_of_day_profile_catches_a_daytime_value_at_night(kind: str, training) -> None:
    night = daily_frame(1, seed=3)
    trough = 108  # sin = -1: about 70 users; 130 is an ordinary daytime value but not at this hour
    night.loc[trough, "users"] = 130.0
    aware = profile_detector(kind, window=3).fit(training).score(night)
    assert int(np.argmax(aware)) == trough
    assert aware[trough] > 5
    blind = profile_detector(kind, window=None).fit(training).score(night)
    assert blind[trough] < 1.5
    assert int(np.argmax(blind)) != trough


def test_zscore_matches_median_and_scaled_mad() -> None:
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0, 100.0], "y": [5.0] * 5, "z": [0.0, 0.0, 0.0, 0.0, 1.0]})
    detector = RobustZScoreDetector(["x", "y", "z"], time_of_day_window=None).fit(train)
    probe = pd.DataFrame({"x": [10.0, 3.0], "y": [8.0, 2.0], "z": [1.0, 0.0]})
    explanation = detector.explain(probe)
    # x: median 3, MAD 1 -> scale 1.4826; y: constant -> scale 1; z: MAD 0 -> population std 0.4
    np.testing.assert_allclose(explanation[:, 0], [(10 - 3) / MAD_TO_SD, 0.0])
    np.testing.assert_allclose(explanation[:, 1], [3.0, -3.0])
    np.testing.assert_allclose(explanation[:, 2], [1 / 0.4, 0.0])
    np.testing.assert_allclose(detector.score(probe), [(10 - 3) / MAD_TO_SD, 3.0])
    pd.testing.assert_frame_equal(
        detector.expected(probe), pd.DataFrame({"x": [3.0, 3.0], "y": [5.0, 5.0], "z": [0.0, 0.0]})
    )


def test_iqr_distance_outside_the_box() -> None:
    train = pd.DataFrame({"x": np.arange(1.0, 10.0)})  # Q1 3, Q3 7, IQR 4
    detector = IQRDetector(["x"], time_of_day_window=None).fit(train)
    probe = pd.DataFrame({"x": [15.0, -1.0, 5.0, 7.0, 3.0]})
    np.testing.assert_allclose(detector.explain(probe)[:, 0], [2.0, -1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(detector.score(probe), [2.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(detector.expected(probe)["x"], [5.0] * 5)


def test_profile_uses_only_neighbouring_slots() -> None:
    # slot s holds value 10 * s; with window 1 slot 5 pools slots 4, 5, 6 (median 50), slot 0 pools 143, 0, 1
    train = pd.DataFrame({"slot": np.repeat(np.arange(SLOTS), 3), "x": np.repeat(10.0 * np.arange(SLOTS), 3)})
    detector = RobustZScoreDetector(["x"], time_of_day_window=1).fit(train)
    probe = pd.DataFrame({"slot": [5, 0, 143], "x": [0.0, 0.0, 0.0]})
    np.testing.assert_allclose(detector.expected(probe)["x"], [50.0, 10.0, 1420.0])


def test_hour_window_keeps_a_cold_start_fault_from_becoming_its_own_median() -> None:
    """A day fitted on itself (the first day) with a 40-minute user drop at noon: pooling the slots
    within an hour leaves the fault a minority of its slots, pooling within 20 minutes does not."""
    day = daily_frame(1, seed=3)
    fault = list(range(70, 74))
    day.loc[fault, "users"] -= 60.0
    hour = RobustZScoreDetector(["users"], time_of_day_window=6).fit(day)
    assert (hour.score(day.loc[fault]) > 3.5).all()
    assert (hour.explain(day.loc[fault]) < 0).all()  # users LOW
    narrow = RobustZScoreDetector(["users"], time_of_day_window=2).fit(day)
    assert (narrow.score(day.loc[fault]) < 3.5).any()


def test_profile_fit_ignores_non_finite_rows(training) -> None:
    dirty = training.copy()
    dirty.loc[[5, 200, 400], "users"] = np.nan
    dirty.loc[7, "clicks"] = np.inf
    clean = training.drop(index=[5, 7, 200, 400])
    for kind in ("zscore", "iqr"):
        a = profile_detector(kind).fit(dirty)
        b = profile_detector(kind).fit(clean)
        probe = daily_frame(1, seed=9)
        np.testing.assert_array_equal(a.explain(probe), b.explain(probe))


def test_missing_value_does_not_hide_other_features(training) -> None:
    detector = RobustZScoreDetector(FEATURES).fit(training)
    probe = daily_frame(1, seed=4)
    probe.loc[10, "clicks"] = np.nan
    probe.loc[10, "users"] += 100
    scores = detector.score(probe)
    assert np.isfinite(scores).all()
    assert int(np.argmax(scores)) == 10


@pytest.mark.parametrize("cls", [RobustZScoreDetector, IQRDetector, IsolationForestDetector])
def test_unfitted_and_missing_columns_fail_clearly(cls, training) -> None:
    detector = cls(FEATURES)
    with pytest.raises(RuntimeError, match="fit the detector"):
        detector.score(training)
    with pytest.raises(KeyError, match="residual"):
        cls(FEATURES).fit(training.drop(columns=["residual"]))


def test_time_of_day_window_needs_slot_column(training) -> None:
    with pytest.raises(KeyError, match="slot"):
        RobustZScoreDetector(FEATURES, time_of_day_window=3).fit(training.drop(columns=["slot"]))


def test_detector_needs_features() -> None:
    with pytest.raises(ValueError, match="at least one feature"):
        IQRDetector([])


# --- Isolation Forest -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contaminated(training, scored) -> pd.DataFrame:
    """The training window with the planted day in it: an isolation forest isolates what it was fitted on."""
    return pd.concat([training, scored], ignore_index=True)


@pytest.mark.parametrize("features", [FEATURES, [*FEATURES, "tod_sin", "tod_cos"]])
def test_isolation_forest_ranks_planted_outliers_first(features, contaminated, scored) -> None:
    # max_samples above the row count: every tree sees every row, including the planted ones
    detector = IsolationForestDetector(features, n_estimators=100, max_samples=1024, random_state=0)
    detector.fit(contaminated)
    scores = detector.score(scored)
    assert ((scores > 0) & (scores <= 1)).all()
    assert set(np.argsort(-scores)[: len(PLANTED)]) == set(PLANTED)
    assert_planted_explained(detector, scored)


def test_isolation_forest_ordinary_rows_score_near_half(contaminated, scored) -> None:
    detector = IsolationForestDetector(FEATURES, max_samples=1024, random_state=0).fit(contaminated)
    ordinary = np.delete(detector.score(scored), list(PLANTED))
    assert 0.35 < np.median(ordinary) < 0.55


@pytest.mark.parametrize(
    ("n_estimators", "max_samples", "random_state"), [(100, 256, 0), (37, 64, 3), (10, 5000, 11)]
)
def test_isolation_forest_score_equals_scikit_learn(
    n_estimators: int, max_samples: int, random_state: int
) -> None:
    rng = np.random.default_rng(random_state)
    columns = ["a", "b", "c", "d"]
    # column d lies around 1e6, where float32 has a resolution of 1/16: values that close to a split
    # expose a comparison made in float64 instead of scikit-learn's float32
    train = pd.DataFrame(
        {
            "a": rng.normal(0, 1, 600),
            "b": rng.exponential(5, 600),
            "c": rng.integers(0, 4, 600).astype(float),
            "d": 1e6 + rng.uniform(0, 2, 600),
        }
    )
    fresh = pd.DataFrame(rng.normal(0, 3, (300, 4)) * [1, 5, 1, 0.5] + [0, 0, 0, 1e6 + 1], columns=columns)
    detector = IsolationForestDetector(
        columns, n_estimators=n_estimators, max_samples=max_samples, random_state=random_state
    ).fit(train)
    reference = IsolationForest(
        n_estimators=n_estimators, max_samples=min(max_samples, len(train)), random_state=random_state
    ).fit(train.to_numpy())
    for frame in (train, fresh):
        expected = -reference.score_samples(frame.to_numpy())
        assert np.allclose(detector.score(frame), expected, rtol=0, atol=1e-12)


def test_isolation_forest_uses_only_its_features_in_order() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"noise": rng.normal(size=300), "b": rng.normal(size=300), "a": rng.normal(size=300)}
    )
    detector = IsolationForestDetector(["a", "b"], n_estimators=20, random_state=1).fit(frame)
    reference = IsolationForest(n_estimators=20, max_samples=256, random_state=1).fit(
        frame[["a", "b"]].to_numpy()
    )
    assert np.allclose(detector.score(frame), -reference.score_samples(frame[["a", "b"]].to_numpy()))


def test_isolation_forest_scores_a_row_with_a_missing_value_0_like_rcf(contaminated, scored) -> None:
    """A NaN would go left at every split, as if it were -inf: a fabricated LOW outlier."""
    detector = IsolationForestDetector(FEATURES, max_samples=1024, random_state=0).fit(contaminated)
    probe = scored.head(20).copy()
    probe.loc[[3, 7], FEATURES[0]] = [np.nan, np.inf]
    scores, explained = detector.score(probe), detector.explain(probe)
    assert scores[[3, 7]].tolist() == [0.0, 0.0] and not explained[[3, 7]].any()
    others = [row for row in range(20) if row not in (3, 7)]
    assert np.array_equal(scores[others], detector.score(scored.head(20))[others])


def test_isolation_forest_needs_two_finite_rows() -> None:
    frame = pd.DataFrame({"x": [1.0, np.nan, np.inf]})
    with pytest.raises(ValueError, match="two finite rows"):
        IsolationForestDetector(["x"]).fit(frame)


def test_average_path_length() -> None:
    got = average_path_length(np.array([0, 1, 2, 3, 256]))
    c256 = 2 * (np.log(255) + np.euler_gamma) - 2 * 255 / 256
    c3 = 2 * (np.log(2) + np.euler_gamma) - 2 * 2 / 3
    np.testing.assert_allclose(got, [0.0, 0.0, 1.0, c3, c256])


# --- persistence -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(contaminated) -> dict[str, Detector]:
    return {
        "zscore": RobustZScoreDetector(FEATURES, time_of_day_window=3).fit(contaminated),
        "iqr": IQRDetector(FEATURES, time_of_day_window=None).fit(contaminated),
        "iforest": IsolationForestDetector(
            [*FEATURES, "tod_sin", "tod_cos"], n_estimators=30, max_samples=128, random_state=4
        ).fit(contaminated),
    }


MANIFEST = {
    "training_days": ["2020-07-07", "2020-07-10"],
    "thresholds": {"zscore": {"method": "sigma", "value": 3.5}},
}


def test_save_writes_one_pickle_free_npz(tmp_path: Path, fitted) -> None:
    path = tmp_path / "model" / "model.npz"
    save_detectors(path, fitted, MANIFEST)
    assert [p.name for p in path.parent.iterdir()] == ["model.npz"]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    assert all(array.dtype.kind != "O" for array in arrays.values())
    assert MODEL_DOCUMENT_KEY in arrays
    assert {key.split("/")[0] for key in arrays if key != MODEL_DOCUMENT_KEY} == set(fitted)
    assert "zscore/profile" in arrays
    assert "iqr/fences" in arrays
    assert {"iforest/left", "iforest/right", "iforest/feature", "iforest/threshold", "iforest/roots"} <= set(
        arrays
    )


def test_save_load_round_trip_gives_identical_scores_and_explanations(tmp_path: Path, fitted, scored) -> None:
    path = tmp_path / "model.npz"
    save_detectors(path, fitted, MANIFEST)
    loaded, document = load_detectors(path)
    assert set(loaded) == set(fitted)
    assert document["training_days"] == MANIFEST["training_days"]
    assert document["thresholds"] == MANIFEST["thresholds"]
    assert document["detectors"]["iforest"]["meta"] == {"samples_per_tree": 128}
    for name, original in fitted.items():
        copy = loaded[name]
        assert type(copy) is type(original)
        assert copy.features == original.features
        assert copy.params == original.params
        np.testing.assert_array_equal(copy.score(scored), original.score(scored))
        np.testing.assert_array_equal(copy.explain(scored), original.explain(scored))
    pd.testing.assert_frame_equal(loaded["zscore"].expected(scored), fitted["zscore"].expected(scored))


def test_save_replaces_the_model_whole(tmp_path: Path, fitted) -> None:
    path = tmp_path / "model.npz"
    save_detectors(path, fitted, MANIFEST)
    save_detectors(path, {"iqr": fitted["iqr"]}, {"version": 2})
    loaded, document = load_detectors(path)
    assert list(loaded) == ["iqr"]
    assert document["version"] == 2
    assert "training_days" not in document


def test_load_refuses_pickled_arrays(tmp_path: Path, fitted) -> None:
    path = tmp_path / "model.npz"
    save_detectors(path, {"iqr": fitted["iqr"]}, {})
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["iqr/fences"] = np.array([{"evil": True}], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_detectors(path)


def test_registry_knows_config_kinds() -> None:
    assert {"robust_zscore", "iqr", "isolation_forest"} <= set(DETECTOR_CLASSES)
    assert detector_class("iqr") is IQRDetector
    with pytest.raises(ValueError, match="unknown detector kind 'lof'"):
        detector_class("lof")


@pytest.mark.parametrize("kind", ["zscore", "iqr"])
def test_a_feature_never_measured_in_the_window_does_not_stop_the_others(kind: str, training, scored) -> None:
    """Per-feature detectors score rows with some features missing; a feature with no value all window
    (a mean of an optional column, a ratio whose denominator stayed 0) must not make the fit fail."""
    dirty = training.copy()
    dirty["residual"] = np.nan
    detector = profile_detector(kind).fit(dirty)
    reference = {"zscore": RobustZScoreDetector, "iqr": IQRDetector}[kind](["users", "clicks"]).fit(training)
    explanation = detector.explain(scored)
    np.testing.assert_array_equal(explanation[:, :2], reference.explain(scored))
    assert np.isnan(explanation[:, 2]).all()
    assert np.isfinite(detector.score(scored)).all()


def test_isolation_forest_max_samples_as_in_scikit_learn(training) -> None:
    assert IsolationForestDetector(FEATURES, max_samples="auto").fit(training).samples_per_tree == 256
    assert (
        IsolationForestDetector(FEATURES, max_samples=0.5).fit(training).samples_per_tree
        == len(training) // 2
    )
    with pytest.raises(ValueError, match="max_samples"):
        IsolationForestDetector(FEATURES, max_samples="all")
