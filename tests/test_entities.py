"""Entity columns: config validation, per-entity grids, lags, models, incidents and checks."""

from __future__ import annotations

import gzip
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml

from anomaly_dagster import checks, entities
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, ConfigError, SourceConfig, load_source
from anomaly_dagster.features import build_features
from anomaly_dagster.generate import generate_sensors
from anomaly_dagster.incidents import merge_incidents
from anomaly_dagster.modeling import score, train
from anomaly_dagster.pipeline import StageContext, resample_sql, run_ingest, run_resample, run_window
from anomaly_dagster.warehouse import RunInfo, Warehouse

SENSORS = load_source(PACKAGE_SOURCES_DIR / "sensors.yaml")
DAY = date(2024, 3, 1)


def sensors_document() -> dict:
    return yaml.safe_load((PACKAGE_SOURCES_DIR / "sensors.yaml").read_text())


def load_error(tmp_path: Path, document: dict) -> str:
    path = tmp_path / "source.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as raised:
        load_source(path)
    return str(raised.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"entity": "sensor; DROP TABLE x"}, "invalid entity column"),
        ({"entity": "room"}, "entity 'room' is not a declared column"),
        ({"entity": "temperature"}, "entity column 'temperature' must have type 'string'"),
    ],
)
def test_entity_config_is_validated(tmp_path: Path, change: dict, message: str) -> None:
    assert message in load_error(tmp_path, sensors_document() | change)


def test_entity_may_not_shadow_a_table_column(tmp_path: Path) -> None:
    document = sensors_document()
    document["columns"].append({"name": "detector"})
    document["entity"] = "detector"
    assert "clashes with a metric, derived or table column" in load_error(tmp_path, document)


def _raw_events(path: Path, rows: list[tuple[str, str | None, float]]) -> str:
    frame = pd.DataFrame(rows, columns=["timestamp", "sensor_id", "temperature"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    frame["pressure"] = 1012.0
    frame.to_parquet(path)
    return str(path)


def test_resample_keeps_a_full_grid_per_entity_and_carries_a_silent_one_for_a_day(tmp_path: Path) -> None:
    day1, day2, day3 = (DAY + timedelta(days=offset) for offset in range(3))
    files = [
        _raw_events(
            tmp_path / "d1.parquet", [("2024-03-01 00:00:05", "a", 20.0), ("2024-03-01 00:00:35", "b", 30.0)]
        ),
        _raw_events(
            tmp_path / "d2.parquet", [("2024-03-02 00:10:00", "a", 21.0), ("2024-03-02 00:12:00", None, 5.0)]
        ),
        _raw_events(tmp_path / "d3.parquet", [("2024-03-03 12:00:00", "a", 22.0)]),
    ]
    with duckdb.connect() as connection:
        table = connection.execute(resample_sql(SENSORS, files, [day1, day2, day3])).df()
    per_day = table.groupby([table["bucket_start"].dt.date, "sensor_id"]).size()
    # b fell silent on day 2: a day of empty buckets, then it is gone; a row without id is "default"
    assert per_day.to_dict() == {
        (day1, "a"): 144,
        (day1, "b"): 144,
        (day2, "a"): 144,
        (day2, "b"): 144,
        (day2, entities.MISSING_ENTITY): 144,
        (day3, "a"): 144,
        (day3, entities.MISSING_ENTITY): 144,
    }
    silent = table[(table["sensor_id"] == "b") & (table["bucket_start"].dt.date == day2)]
    assert (silent["temperature_count"] == 0).all() and silent["temperature_mean"].isna().all()
    first = table[(table["sensor_id"] == "a") & (table["bucket_start"] == pd.Timestamp("2024-03-01"))].iloc[0]
    assert (first["temperature_mean"], first["temperature_count"], first["pressure_count"]) == (20.0, 1, 1)


def test_lags_read_the_same_entity(tmp_path: Path) -> None:
    grid = pd.date_range("2024-03-01", periods=288, freq="10min")
    frames = []
    for sensor, level in (("a", 10.0), ("b", 50.0)):
        frame = pd.DataFrame({"bucket_start": grid, "sensor_id": sensor})
        for metric in SENSORS.metric_names:
            frame[metric] = level + np.arange(len(grid))
        frames.append(frame)
    resampled = pd.concat(frames, ignore_index=True)
    day = date(2024, 3, 2)
    features = entities.per_entity(
        SENSORS, resampled, lambda _, rows: build_features(SENSORS, day, rows), ["a", "b"]
    )
    assert features.columns[:2].tolist() == ["bucket_start", "sensor_id"]
    assert features.groupby("sensor_id").size().to_dict() == {"a": 144, "b": 144}
    first_b = features[features["sensor_id"] == "b"].iloc[0]
    assert first_b["temperature_mean_lag1"] == 50.0 + 143  # b's own last bucket of the day before


def test_incidents_never_span_two_entities() -> None:
    anomalies = pd.DataFrame(
        {
            "bucket_start": pd.to_datetime(["2024-03-02 10:00", "2024-03-02 10:10", "2024-03-02 10:20"]),
            "sensor_id": ["a", "b", "a"],
            "score": [2.0, 3.0, 4.0],
            "detectors": ["zscore"] * 3,
            "top_feature": ["temperature_spread"] * 3,
            "direction": ["HIGH"] * 3,
        }
    )
    bucket = pd.Timedelta(minutes=10)
    incidents = entities.per_entity(SENSORS, anomalies, lambda _, rows: merge_incidents(rows, bucket, 0))
    assert incidents[["sensor_id", "buckets"]].values.tolist() == [["a", 1], ["a", 1], ["b", 1]]
    # with a gap of one bucket a's two flags are one incident, still without b's
    merged = entities.per_entity(SENSORS, anomalies, lambda _, rows: merge_incidents(rows, bucket, 1))
    assert merged[["sensor_id", "buckets", "peak_score"]].values.tolist() == [["a", 2, 4.0], ["b", 1, 3.0]]


def _full_day(sensors: list[str]) -> pd.DataFrame:
    grid = pd.date_range(datetime(2024, 3, 1), periods=144, freq="10min")
    return pd.concat(
        [pd.DataFrame({"bucket_start": grid, "sensor_id": s}) for s in sensors], ignore_index=True
    )


def test_complete_buckets_checks_every_entity() -> None:
    full = _full_day(["a", "b"])
    assert checks.complete_buckets(SENSORS, {DAY: full}).passed
    gap = full.drop(index=150)  # one bucket of b
    outcome = checks.complete_buckets(SENSORS, {DAY: gap})
    assert not outcome.passed and list(outcome.per_day) == ["2024-03-01 sensor_id=b"]
    nobody = checks.complete_buckets(SENSORS, {DAY: full.iloc[:0]})
    assert not nobody.passed and "no sensor_id" in nobody.per_day["2024-03-01"]


def test_alert_rate_is_per_entity() -> None:
    flagged = _full_day(["a", "b"]).iloc[[0, 1, 2, 150]]  # a: 3 buckets, b: 1
    outcome = checks.alert_rate(SENSORS, {DAY: flagged})
    assert outcome.per_day == {"2024-03-01": 3 / 144}


def test_entity_models_round_trip_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = _full_day(["x"]).drop(columns="sensor_id")
    for name in SENSORS.feature_columns:
        features[name] = rng.normal(size=len(features))
    features["slot"] = np.arange(144)
    models = {}
    for entity, shift in (("a/b.rcf", 0.0), ("a", 5.0)):  # names that would collide as path prefixes
        shifted = features.assign(temperature_mean=features["temperature_mean"] + shift)
        model = train(SENSORS, shifted, [DAY], True)
        models[entity] = (model.detectors, model.manifest())
    path = tmp_path / "model.npz"
    entities.save_entity_models(path, models)
    loaded = entities.load_entity_models(path)
    assert sorted(loaded) == ["a", "a/b.rcf"]
    for entity, (detectors, manifest) in models.items():
        thresholds = {name: spec["value"] for name, spec in manifest["thresholds"].items()}
        expected = score(SENSORS, features, detectors, thresholds)
        pd.testing.assert_frame_equal(score(SENSORS, features, *loaded[entity]), expected)
    with np.load(path, allow_pickle=False) as archive:
        assert all(archive[key].dtype != object for key in archive.files)


def test_a_log_without_the_entity_column_is_one_default_series(tmp_path: Path) -> None:
    generated = generate_sensors(tmp_path / "landing", days=2, seed=3, sensors=1)
    with gzip.open(generated.files[0], "rt") as handle:
        assert handle.readline().strip() == "timestamp,temperature,pressure"
    warehouse = Warehouse(tmp_path / "warehouse")
    context = StageContext(SENSORS, warehouse, tmp_path / "landing", RunInfo("test", "0"))
    days = [DAY, DAY + timedelta(days=1)]
    run_ingest(context, days)
    (output,) = run_resample(context, days)
    for day in days:
        frame = output.frames[day]
        assert frame["sensor_id"].unique().tolist() == [entities.MISSING_ENTITY]
        assert len(frame) == 144 and frame["temperature_count"].sum() > 0
    assert checks.complete_buckets(SENSORS, output.frames).passed


def test_a_source_without_entity_is_passed_whole() -> None:
    clickstream = SourceConfig.model_validate(
        yaml.safe_load((PACKAGE_SOURCES_DIR / "clickstream.yaml").read_text())
    )
    frame = pd.DataFrame({"bucket_start": [pd.Timestamp("2020-07-07")], "clicks": [3]})
    result = entities.per_entity(clickstream, frame, lambda entity, rows: rows.assign(seen=entity))
    assert result.columns.tolist() == ["bucket_start", "clicks", "seen"] and result["seen"].isna().all()


@pytest.mark.slow
def test_days_when_the_sensors_fall_silent(tmp_path: Path) -> None:
    """Silent the day after: a day of empty buckets per sensor, flagged as a dropout of each; the
    day after that has no sensor at all: an empty partition through the chain and a failed check."""
    generated = generate_sensors(tmp_path / "landing", days=3, seed=2, sensors=2)
    for path in generated.files[1:]:
        path.unlink()
    warehouse = Warehouse(tmp_path / "warehouse")
    context = StageContext(SENSORS, warehouse, tmp_path / "landing", RunInfo("test", "0"))
    days = [DAY + timedelta(days=offset) for offset in range(3)]
    outputs = run_window(context, days)
    silent, nobody = days[1], days[2]
    resampled = outputs["resampled"].frames
    assert (resampled[silent]["temperature_count"] == 0).all() and len(resampled[silent]) == 2 * 144
    outcome = checks.complete_buckets(SENSORS, resampled)
    assert not outcome.passed and list(outcome.per_day) == [nobody.isoformat()]
    incidents = outputs["incidents"].frames[silent]
    assert incidents[["sensor_id", "buckets", "top_feature", "direction"]].values.tolist() == [
        ["s01", 144, "temperature_count", "LOW"],
        ["s02", 144, "temperature_count", "LOW"],
    ]
    for asset in ("features", "model", "scores", "anomalies", "incidents"):
        assert outputs[asset].frames[nobody].empty, asset
    assert warehouse.query("SELECT count(*) AS n FROM sensors.incidents")["n"].iloc[0] == 2


def test_a_sensor_too_new_to_model_is_left_out_with_its_reason_not_every_sensor(tmp_path: Path) -> None:
    """s99 is installed at 23:52: one bucket that day is too little for an isolation forest. It used to
    fail the model of every sensor; now it alone goes untrained that day (the model table says why, its
    scores are absent), and the next day it trains on its own day, as a new sensor does."""
    generated = generate_sensors(tmp_path / "landing", days=2, seed=4, sensors=2)
    lines = ["timestamp,sensor_id,temperature,pressure"]
    moment = datetime(2024, 3, 1, 23, 52)
    while moment < datetime(2024, 3, 3):
        lines.append(f"{moment:%Y-%m-%d %H:%M:%S},s99,20.5,1012.0")
        moment += timedelta(minutes=1)
    (generated.files[0].parent / "sensors_s99.csv").write_text("\n".join(lines) + "\n")
    warehouse = Warehouse(tmp_path / "warehouse")
    context = StageContext(SENSORS, warehouse, tmp_path / "landing", RunInfo("test", "0"))
    first, second = DAY, DAY + timedelta(days=1)
    outputs = run_window(context, [first, second])
    model = outputs["model"].frames[first]
    new = model[model["sensor_id"] == "s99"]
    assert set(new["threshold_method"]) == {"untrained"}
    assert "s99" in new["threshold_params"].iloc[0] and "two finite rows" in new["threshold_params"].iloc[0]
    assert outputs["model"].summary["untrained_sensor_id_in_run"] == 1
    scored = outputs["scores"].frames
    assert sorted(scored[first]["sensor_id"].unique()) == ["s01", "s02"]
    assert sorted(scored[second]["sensor_id"].unique()) == ["s01", "s02", "s99"]
    later = outputs["model"].frames[second].set_index("sensor_id")
    assert later.loc["s99", "cold_start"].all() and not later.loc["s01", "cold_start"].any()
    # why s99 trained on its own day although it has a history: said, not only marked cold_start
    assert (
        later.loc["s99", "note"]
        .str.contains("on 2024-03-02: iforest could not be fitted on 2024-03-01")
        .all()
    )
    assert later.loc["s99", "note"].str.contains("isolation forest needs at least two finite rows").all()
    assert later.loc["s01", "note"].isna().all()
