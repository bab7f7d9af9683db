"""Walk-forward windows, scoring and the ensemble's vote on hand-built detectors and data."""

from __future__ import annotations

import json
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from anomaly_dagster.calibration import calibrate
from anomaly_dagster.config import (
    DerivedConfig,
    DetectorConfig,
    EnsembleConfig,
    SourceConfig,
    ThresholdConfig,
    load_sources,
)
from anomaly_dagster.detectors.zscore import RobustZScoreDetector
from anomaly_dagster.features import add_derived
from anomaly_dagster.modeling import (
    anomalies_from_scores,
    make_detector,
    needs_labels,
    score,
    train,
    training_window,
)

SOURCE = load_sources()["clickstream"]
DAY = date(2020, 7, 10)


def _features(rows: int = 144, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "bucket_start": pd.date_range("2020-07-10", periods=rows, freq="10min"),
            "users": rng.normal(100, 5, rows),
            "clicks": rng.normal(150, 5, rows),
            "tod_sin": rng.normal(0, 10, rows),  # wild context values must never be the "top feature"
        }
    )
    frame["slot"] = np.arange(rows) % 144
    return frame


def test_training_window_uses_only_earlier_days_up_to_the_limit():
    available = [DAY - timedelta(days=offset) for offset in range(0, 12)]
    window, cold = training_window(SOURCE, DAY, available)
    assert not cold
    assert window == sorted(DAY - timedelta(days=offset) for offset in range(1, SOURCE.training_days + 1))
    assert training_window(SOURCE, DAY, [DAY]) == ([DAY], True)  # no history: fit on itself


def test_ensemble_votes_and_explanations():
    features = _features()
    features.loc[50, "users"] = 20.0  # users far too low
    features.loc[90, "clicks"] = 400.0  # clicks far too high
    users = RobustZScoreDetector(["users", "tod_sin"], time_of_day_window=None).fit(features)
    clicks = RobustZScoreDetector(["clicks"], time_of_day_window=None).fit(features)
    detectors = {"rcf": users, "zscore": clicks}  # names the shipped config knows
    # an ensemble that listens to rcf only: the clicks spike is scored, but does not vote
    source = SOURCE.model_copy(update={"ensemble": EnsembleConfig(detectors=["rcf"], min_votes=1)})
    scored = score(source, features, detectors, {"rcf": 6.0, "zscore": 6.0})
    ensemble = scored[scored["detector"] == "ensemble"].set_index("bucket_start")
    flagged = ensemble.index[ensemble["is_anomaly"]]
    assert list(flagged) == [features.loc[50, "bucket_start"]]
    per_detector = scored[scored["detector"] == "zscore"].set_index("bucket_start")
    assert per_detector.loc[features.loc[90, "bucket_start"], "is_anomaly"]
    row = ensemble.loc[features.loc[50, "bucket_start"]]
    assert (row["top_feature"], row["direction"], row["detectors"]) == ("users", "LOW", "rcf")
    explained = json.loads(row["attribution"])
    assert explained["users"]["direction"] == "LOW" and explained["users"]["strength"] > 6
    assert set(scored["top_feature"]) <= {"users", "clicks"}  # tod_sin is context, never the culprit
    anomalies = anomalies_from_scores(
        scored, features.assign(residual=0.0, pages=0.0, clicks_per_user=0.0), []
    )
    assert anomalies["bucket_start"].tolist() == list(flagged)


def test_min_votes_requires_agreement():
    features = _features()
    features.loc[50, ["users", "clicks"]] = [20.0, 20.0]  # both drop: an outage
    features.loc[90, "users"] = 20.0  # only users
    source = SOURCE.model_copy(
        update={"ensemble": SOURCE.ensemble.model_copy(update={"detectors": None, "min_votes": 2})}
    )
    detectors = {
        "rcf": RobustZScoreDetector(["users"], time_of_day_window=None).fit(features),
        "zscore": RobustZScoreDetector(["clicks"], time_of_day_window=None).fit(features),
    }
    scored = score(source, features, detectors, {"rcf": 6.0, "zscore": 6.0})
    ensemble = scored[(scored["detector"] == "ensemble") & scored["is_anomaly"]]
    assert ensemble["bucket_start"].tolist() == [features.loc[50, "bucket_start"]]
    assert ensemble["detectors"].iloc[0] == "rcf,zscore"


def test_a_derived_division_by_zero_is_missing_so_thresholds_stay_finite():
    """clicks / users in a bucket without users: an infinity would make every threshold fitted on it inf."""
    source = SOURCE.model_copy(
        update={"derived": [DerivedConfig(name="per_user", expression="clicks / users")]}
    )
    frame = _features()
    frame.loc[5, "users"] = 0.0
    derived = add_derived(source, frame.set_index("bucket_start")).reset_index()
    assert np.isnan(derived.loc[5, "per_user"]) and np.isfinite(derived["per_user"].drop(index=5)).all()
    detector = RobustZScoreDetector(["per_user"]).fit(derived)
    threshold = calibrate(detector.score(derived), ThresholdConfig(method="sigma", k=3))
    assert np.isfinite(threshold.value)


def test_a_cold_start_never_tunes_its_threshold_on_the_scored_days_labels():
    """A cold start trains on the scored day itself: with its labels, best_f1 would grade its own exam."""
    zscore = next(config for config in SOURCE.detectors if config.name == "zscore")
    tuned = zscore.model_copy(update={"threshold": ThresholdConfig(method="best_f1", k=3)})
    source = SOURCE.model_copy(update={"detectors": [tuned]})
    features = _features().assign(clicks_per_user=1.5)
    features.loc[50, "users"] = 20.0
    labels = pd.Series(True, index=pd.DatetimeIndex([features.loc[50, "bucket_start"]]))
    cold = train(source, features, [DAY], True, labels).thresholds["zscore"]
    assert cold == train(source, features, [DAY], True, None).thresholds["zscore"]
    warm = train(source, features, [DAY - timedelta(days=1)], False, labels).thresholds["zscore"]
    assert warm != cold and warm.params != cold.params


def test_a_detectors_own_best_f1_threshold_makes_training_read_the_labels():
    zscore = next(config for config in SOURCE.detectors if config.name == "zscore")
    tuned = zscore.model_copy(update={"threshold": ThresholdConfig(method="best_f1", k=3)})
    assert not needs_labels(SOURCE)
    assert needs_labels(SOURCE.model_copy(update={"detectors": [*SOURCE.detectors[:1], tuned]}))


def _only(kind: str, features: list[str], **params: object) -> DetectorConfig:
    return DetectorConfig(name="only", kind=kind, features=features, params=params)


def _only_source(kind: str, features: list[str], **params: object) -> SourceConfig:
    """The test source with one detector, which alone decides the ensemble."""
    return SOURCE.model_copy(
        update={
            "detectors": [_only(kind, features, **params)],
            "ensemble": EnsembleConfig(detectors=["only"]),
        }
    )


def test_time_of_day_profiles_get_the_sources_slots_per_day_without_being_told():
    """5-minute buckets make 288 slots: a profile sized for 144 crashed, one for 96 pooled the wrong slots."""
    five = SOURCE.model_copy(update={"bucket_minutes": 5, "ensemble": EnsembleConfig(detectors=["only"])})
    features = _features(rows=3 * 288).assign(slot=lambda frame: np.arange(len(frame)) % 288)
    for kind in ("iqr", "robust_zscore", "seasonal_band"):
        source = five.model_copy(update={"detectors": [_only(kind, ["users"])]})
        assert make_detector(source, "only").n_slots == 288
        model = train(source, features, [DAY], False)
        assert np.isfinite(model.thresholds["only"].value)
    wrong = five.model_dump() | {"detectors": [_only("iqr", ["users"], n_slots=144).model_dump()]}
    with pytest.raises(ValueError, match="288 slots a day"):  # when the config loads, not at training
        SourceConfig.model_validate(wrong)


def test_rows_with_a_missing_feature_do_not_lift_the_threshold():
    """An isolation forest scores a row with a missing value 0; counted as normal scores, a fifth of
    such rows lifted the sigma threshold above a gross outlier's score."""
    source = _only_source("isolation_forest", ["users", "clicks"])
    complete = _features(rows=1008)
    gappy = complete.copy()
    gappy.loc[np.random.default_rng(1).random(len(gappy)) < 0.2, "users"] = np.nan
    outlier = _features(rows=1).assign(users=160.0, clicks=90.0)
    for features in (complete, gappy):
        model = train(source, features, [DAY], False)
        threshold = model.thresholds["only"].value
        measured = model.training_scores["only"][features["users"].notna().to_numpy()]
        assert threshold == pytest.approx(measured.mean() + 3 * measured.std())
        assert model.detectors["only"].score(outlier)[0] > threshold


def test_expected_values_are_strict_json_when_a_band_is_missing():
    """A forecast band has no value before its first full context (a DeepAR cold start's first half):
    ``expected`` held a bare NaN, which DuckDB's JSON functions and any strict reader refuse."""
    source = _only_source("seasonal_band", ["users", "clicks"])
    features = _features(rows=3 * 144)
    model = train(source, features, [DAY], False)
    detector = model.detectors["only"]
    quantiles = detector.quantiles.copy()
    quantiles[:72, :, 0] = np.nan  # no band for users in the first half of the day
    detector.quantiles = quantiles
    scored = score(source, features.iloc[:144], model.detectors, {"only": model.thresholds["only"].value})
    expected = scored.loc[scored["detector"] == "only", "expected"]
    parsed = [
        json.loads(text, parse_constant=lambda name: pytest.fail(f"not JSON: {name}")) for text in expected
    ]
    assert set(parsed[0]) == {"clicks"} and set(parsed[100]) == {"users", "clicks"}
    band = [json.loads(text) for text in scored.loc[scored["detector"] == "only", "band"]]
    assert set(band[0]) == {"clicks"} and set(band[100]) == {"users", "clicks"}


def test_a_band_detector_stores_its_band_and_flags_what_leaves_it():
    """The design's scores hold the forecast band, not only its median: lower <= expected <= upper per
    feature, a bucket outside its band is flagged with the direction it left by, and the flagged bucket's
    band reaches the anomalies and incidents tables."""
    from anomaly_dagster.incidents import merge_incidents
    from anomaly_dagster.plots import band_series

    source = _only_source("seasonal_band", ["users", "clicks"])
    features = _features(rows=8 * 144)
    model = train(source, features, [DAY], False)
    day = features.iloc[-144:].reset_index(drop=True)
    day.loc[50, "users"] = 10 * day["users"].max()
    scored = score(source, day, model.detectors, {"only": model.thresholds["only"].value})
    own = scored[scored["detector"] == "only"].reset_index(drop=True)
    bands = [json.loads(text) for text in own["band"]]
    for band, expected in zip(bands, own["expected"], strict=True):
        assert {name: values[1] for name, values in band.items()} == json.loads(expected)
        assert all(lower <= median <= upper for lower, median, upper in band.values())
    lower, _, upper = bands[50]["users"]
    assert not lower <= day.loc[50, "users"] <= upper
    assert own.loc[50, "is_anomaly"] and (own.loc[50, "top_feature"], own.loc[50, "direction"]) == (
        "users",
        "HIGH",
    )
    inside = [
        all(band[name][0] <= day.loc[row, name] <= band[name][2] for name in ("users", "clicks"))
        for row, band in enumerate(bands)
    ]
    assert sum(inside) > 100 and (own.loc[inside, "score"] == 0).all()  # inside both bands: score 0
    anomalies = anomalies_from_scores(scored, day, ["users", "clicks"])
    flagged = anomalies[anomalies["bucket_start"] == day.loc[50, "bucket_start"]].iloc[0]
    assert json.loads(flagged["band"]) == bands[50]
    incident = merge_incidents(anomalies, pd.Timedelta(minutes=10), series=["users"])
    assert (
        json.loads(incident.loc[incident["peak_bucket"] == day.loc[50, "bucket_start"], "band"].iloc[0])
        == bands[50]
    )
    plotted = band_series(scored, "users")
    assert plotted["upper"].tolist() == [band["users"][2] for band in bands]
    assert band_series(scored, "pages") is None  # no detector gives pages a band


def test_rcf_trains_on_the_rows_it_can_hold():
    """A corrupt reading finite in float64 but beyond float32 once scaled (a sensor's 3.4e38 error value
    over a spread below 1): fit took the row and the forest refused it, so one reading failed the model
    for a whole training window."""
    source = _only_source("rcf", ["users", "clicks"])
    features = _features(rows=3 * 144)
    features.loc[7, "users"] = 1e300
    model = train(source, features, [DAY], False)
    detector = model.detectors["only"]
    assert not detector.scored_rows(features)[7] and detector.scored_rows(features).sum() == len(features) - 1
    assert np.isfinite(model.thresholds["only"].value)
    assert np.isnan(model.training_scores["only"][7]) or model.training_scores["only"][7] == 0.0


def test_assess_gives_what_score_explain_and_expected_give():
    """Scoring takes all outputs from one ``assess`` call (a DeepAR band is forecast once, not three
    times); it must be exactly the separate calls."""
    features = _features(rows=8 * 144)
    for kind in ("seasonal_band", "robust_zscore", "rcf"):
        source = _only_source(kind, ["users", "clicks"])
        detector = train(source, features, [DAY], False).detectors["only"]
        day = features.iloc[-144:]
        assessment = detector.assess(day)
        np.testing.assert_array_equal(assessment.scores, detector.score(day))
        np.testing.assert_array_equal(assessment.contributions, detector.explain(day))
        np.testing.assert_array_equal(assessment.scored, detector.scored_rows(day))
        expected = detector.expected(day)
        if expected is None:
            assert assessment.expected is None and assessment.band is None
        else:
            pd.testing.assert_frame_equal(assessment.expected, expected)
        if kind == "seasonal_band":
            np.testing.assert_array_equal(assessment.band, detector.bounds(day))


@pytest.mark.parametrize("kind", ["robust_zscore", "rcf", "isolation_forest"])
def test_a_row_without_measured_values_has_no_direction(kind: str):
    """Nothing measured: the attribution says strength 0 for every feature, so the direction must say
    neither LOW (the z-score's NaN) nor HIGH (the forests' placeholder 0, which the ensemble inherited)."""
    source = _only_source(kind, ["users", "clicks"])
    features = _features(rows=3 * 144)
    model = train(source, features, [DAY], False)
    day = features.iloc[:144].copy()
    day.loc[5, ["users", "clicks"]] = np.nan
    scored = score(source, day, model.detectors, {"only": model.thresholds["only"].value})
    at_five = scored[scored["bucket_start"] == day.loc[5, "bucket_start"]].set_index("detector")
    assert at_five.loc["only", "score"] == 0.0
    assert at_five.loc["only", "direction"] == at_five.loc["ensemble", "direction"] == ""
    measured = scored[(scored["detector"] == "only") & (scored["bucket_start"] != day.loc[5, "bucket_start"])]
    assert measured["direction"].isin(["HIGH", "LOW"]).all()


@pytest.mark.slow
def test_a_detector_its_window_cannot_fit_is_untrained_and_a_changed_config_asks_for_a_new_model(tmp_path):
    """A lag of a whole day has no value on the first day, nor in the second day's window (the first):
    RCF on it failed the model, and a backfill from the start produced no model for any day. Now RCF is
    untrained on those days (the model table says why, it has no scores) and the others are trained; on
    the third day it trains. Scoring with a model trained for other detectors than configured is refused
    (a voter missing from it would never vote: no alert at all)."""
    from anomaly_dagster.generate import generate_clickstream
    from anomaly_dagster.pipeline import StageContext, run_score, run_window
    from anomaly_dagster.warehouse import RunInfo, Warehouse

    rcf = SOURCE.detectors[0].model_copy(update={"features": ["users", "clicks", "clicks_lag144"]})
    source = SOURCE.model_copy(update={"lags": [1, 144], "detectors": [rcf, *SOURCE.detectors[1:]]})
    generate_clickstream(tmp_path / "landing", days=3, seed=1)
    warehouse = Warehouse(tmp_path / "warehouse")
    context = StageContext(source, warehouse, tmp_path / "landing", RunInfo("test", "0"))
    days = [date(2020, 7, 7) + timedelta(days=offset) for offset in range(3)]
    outputs = run_window(context, days)
    for day in days:
        model = outputs["model"].frames[day].set_index("detector")
        trained = day == days[2]
        assert (model.loc["rcf", "threshold_method"] != "untrained") == trained, day
        assert (model.drop(index="rcf")["threshold_method"] != "untrained").all()
        frame = outputs["scores"].frames[day]
        assert ("rcf" in set(frame["detector"])) == trained and {
            "zscore",
            "iqr",
            "iforest",
            "ensemble",
        } <= set(frame["detector"])
        if not trained:  # the ensemble's one trained voter decides alone, rather than nobody ever
            flags = frame.pivot(index="bucket_start", columns="detector", values="is_anomaly")
            assert (flags["ensemble"] == flags["zscore"]).all()
    reason = json.loads(outputs["model"].frames[days[0]].set_index("detector").loc["rcf", "threshold_params"])
    assert "rcf could not be fitted on 2020-07-07..2020-07-07" in reason["reason"]
    assert outputs["model"].summary["untrained_detectors_in_run"] == 2  # rcf on the first two days
    more = source.model_copy(
        update={"detectors": [*source.detectors, SOURCE.detectors[1].model_copy(update={"name": "z2"})]}
    )
    with pytest.raises(
        ValueError, match=r"model of 2020-07-09 was trained for detectors .* now configures .*'z2'"
    ):
        run_score(StageContext(more, warehouse, tmp_path / "landing", RunInfo("test", "0")), [days[2]])


def test_scoring_or_detecting_a_day_whose_input_is_missing_says_which_partition(tmp_path):
    """Materializing scores (or anomalies) for one day in the UI, without its features (or scores),
    failed with "detector 'isolation_forest' needs columns [...]; frame has []" (or KeyError 'detector')."""
    from anomaly_dagster.pipeline import StageContext, run_detect, run_score
    from anomaly_dagster.warehouse import RunInfo, Warehouse

    context = StageContext(
        SOURCE, Warehouse(tmp_path / "warehouse"), tmp_path / "landing", RunInfo("test", "0")
    )
    with pytest.raises(
        FileNotFoundError, match="clickstream: features partition 2020-07-10 is missing; materialize"
    ):
        run_score(context, [DAY])
    with pytest.raises(
        FileNotFoundError, match="clickstream: scores partition 2020-07-10 is missing; materialize"
    ):
        run_detect(context, [DAY])


def test_a_shingled_forest_scores_a_days_first_buckets_with_the_day_before(tmp_path):
    """With shingle_size 4 the first 3 buckets of every day scored 0 (no shingle yet), so an outage just
    after midnight was never flagged: the day before now completes them, as one batch over both days
    would, and the scores' lineage names that day's features."""
    from anomaly_dagster.generate import generate_clickstream
    from anomaly_dagster.pipeline import StageContext, run_window
    from anomaly_dagster.warehouse import RunInfo, Warehouse

    shingled = _only_source("rcf", ["users", "clicks"], shingle_size=4)
    features = _features(rows=3 * 144)
    model = train(shingled, features.iloc[:144], [DAY], False)
    thresholds = {"only": model.thresholds["only"].value}

    def only(frame: pd.DataFrame) -> np.ndarray:
        return frame.loc[frame["detector"] == "only", "score"].to_numpy()

    together = only(score(shingled, features.iloc[144:], model.detectors, thresholds))
    alone = only(score(shingled, features.iloc[288:], model.detectors, thresholds))
    day = only(
        score(shingled, features.iloc[288:], model.detectors, thresholds, before=features.iloc[144:288])
    )
    assert (alone[:3] == 0).all() and (day[:3] > 0).all()
    np.testing.assert_array_equal(day, together[144:])
    # also when a bucket of the day cannot be measured (it scores 0 and the shingles run on over it)
    gappy = features.copy()
    gappy.loc[gappy.index[360], "users"] = np.nan
    together = only(score(shingled, gappy.iloc[144:], model.detectors, thresholds))
    day = only(score(shingled, gappy.iloc[288:], model.detectors, thresholds, before=gappy.iloc[144:288]))
    assert (day[:3] > 0).all() and day[72] == 0
    np.testing.assert_array_equal(day, together[144:])

    rcf = SOURCE.detectors[0].model_copy(update={"params": {**SOURCE.detectors[0].params, "shingle_size": 4}})
    source = SOURCE.model_copy(update={"detectors": [rcf, *SOURCE.detectors[1:]]})
    generate_clickstream(tmp_path / "landing", days=2, seed=1)
    warehouse = Warehouse(tmp_path / "warehouse")
    days = [date(2020, 7, 7), date(2020, 7, 8)]
    outputs = run_window(StageContext(source, warehouse, tmp_path / "landing", RunInfo("test", "0")), days)
    second = outputs["scores"].frames[days[1]]
    assert (second[second["detector"] == "rcf"]["score"].iloc[:3] > 0).all()
    lineage = warehouse.query(
        "SELECT upstream FROM meta.lineage WHERE asset = 'scores' AND partition = '2020-07-08'"
    )
    read = {(entry["asset"], entry["partition"]) for entry in json.loads(lineage["upstream"].item())}
    assert {("features", "2020-07-07"), ("features", "2020-07-08"), ("model", "2020-07-08")} <= read


def test_an_infinite_ensemble_score_is_drawn_above_the_threshold_line():
    """Over a threshold of 0 a flag's normalized score is infinite; matplotlib left it out, so the score
    panel stayed under the 1.0 line while the bucket was marked flagged."""
    from anomaly_dagster.plots import _finite_ceiling

    drawn = _finite_ceiling(pd.Series([0.5, np.inf, 3.0, np.nan]))
    assert drawn.iloc[1] == 10.0 and drawn.iloc[[0, 2]].tolist() == [0.5, 3.0] and np.isnan(drawn.iloc[3])
    assert _finite_ceiling(pd.Series([40.0, np.inf])).iloc[1] == 80.0


def test_a_detector_with_no_measured_row_in_its_window_is_untrained_not_fatal():
    """A sensor's mean that was never measured in the window: the detector fitted, but calibrating its
    threshold on no score raised, and the whole model (every other detector too) failed."""
    source = SOURCE.model_copy(
        update={
            "detectors": [
                _only("robust_zscore", ["users"]),
                DetectorConfig(name="other", kind="iqr", features=["clicks"]),
            ],
            "ensemble": EnsembleConfig(detectors=["only", "other"]),
        }
    )
    features = _features(rows=2 * 144).assign(users=np.nan)
    model = train(source, features, [DAY], False)
    assert (
        model.thresholds["only"].method == "untrained"
        and "no row of the window has a measured score" in (model.thresholds["only"].params["reason"])
    )
    assert set(model.detectors) == {"other"} and np.isfinite(model.thresholds["other"].value)
