"""The sensors source through real Dagster materializations: one series per sensor, spikes found."""

from __future__ import annotations

import json
from datetime import timedelta

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from anomaly_dagster.config import load_sources
from anomaly_dagster.definitions import build_definitions
from anomaly_dagster.entities import load_entity_models
from anomaly_dagster.generate import SENSOR_START, generate_sensors
from anomaly_dagster.pipeline import model_path
from anomaly_dagster.warehouse import Warehouse

pytestmark = pytest.mark.slow

DAYS = [SENSOR_START + timedelta(days=offset) for offset in range(4)]
SENSORS = ["s01", "s02", "s03"]
PER_BUCKET = ["resampled", "features", "scores", "anomalies", "incidents"]


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensors")
    generated = generate_sensors(root / "landing", days=len(DAYS), seed=5)
    defs = build_definitions(load_sources(), str(root / "landing"), str(root / "warehouse"))
    result = defs.resolve_job_def("sensors_pipeline").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        tags={
            "dagster/asset_partition_range_start": DAYS[0].isoformat(),
            "dagster/asset_partition_range_end": DAYS[-1].isoformat(),
        },
    )
    return generated, Warehouse(root / "warehouse"), result


def test_the_chain_materializes_with_checks_that_understand_sensors(materialized):
    _, _, result = materialized
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["complete_buckets"].passed
    assert "of 3-3 sensor_id value(s)" in evaluations["complete_buckets"].description
    assert evaluations["quarantine_rate"].passed


def test_every_per_bucket_table_carries_the_sensor(materialized):
    _, warehouse, _ = materialized
    for asset in PER_BUCKET:
        columns = warehouse.query(f"DESCRIBE sensors.{asset}")["column_name"].tolist()
        assert "sensor_id" in columns, asset
    resampled = warehouse.query("SELECT * FROM sensors.resampled")
    per_day = resampled.groupby([resampled["bucket_start"].dt.date, "sensor_id"]).size()
    assert per_day.to_dict() == {(day, sensor): 144 for day in DAYS for sensor in SENSORS}


def test_dropouts_are_empty_buckets_not_missing_rows(materialized):
    generated, warehouse, _ = materialized
    dropouts = [incident for incident in generated.incidents if incident.kind == "dropout"]
    assert dropouts
    resampled = warehouse.query("SELECT * FROM sensors.resampled")
    for dropout in dropouts:
        rows = resampled[
            (resampled["sensor_id"] == dropout.entity)
            & resampled["bucket_start"].between(dropout.start, dropout.end)
        ]
        assert len(rows) == (dropout.end - dropout.start) / timedelta(minutes=10) + 1
        assert (rows["temperature_count"] == 0).all() and rows["temperature_mean"].isna().all()


def test_lags_and_models_are_per_sensor(materialized):
    _, warehouse, _ = materialized
    features = warehouse.query("SELECT * FROM sensors.features ORDER BY sensor_id, bucket_start")
    for _, rows in features.groupby("sensor_id"):
        np.testing.assert_array_equal(
            rows["temperature_mean_lag1"].to_numpy()[1:], rows["temperature_mean"].to_numpy()[:-1]
        )
    model = warehouse.query("SELECT * FROM sensors.model")
    assert model.groupby(["date", "sensor_id"]).size().eq(5).all()  # five detectors per sensor
    last = model[model["date"] == pd.Timestamp(DAYS[-1])]
    assert not last["cold_start"].any() and (last["training_days"] == 3).all()
    thresholds = last[last["detector"] == "rcf"].set_index("sensor_id")["threshold"]
    assert thresholds.nunique() == len(SENSORS)  # each sensor calibrated on its own history
    loaded = load_entity_models(model_path(warehouse, load_sources()["sensors"], DAYS[-1]))
    assert sorted(loaded) == SENSORS
    assert {name: value for name, value in loaded["s02"][1].items()}["rcf"] == thresholds["s02"]


def test_planted_spikes_are_detected_on_their_sensor(materialized):
    generated, warehouse, _ = materialized
    spikes = [i for i in generated.incidents if i.kind == "spike" and i.start.date() > DAYS[0]]
    assert len(spikes) >= 2
    incidents = warehouse.query("SELECT * FROM sensors.incidents")
    for spike in spikes:
        found = incidents[
            (incidents["sensor_id"] == spike.entity)
            & (incidents["start"] <= spike.end)
            & (incidents["end"] >= spike.start)
        ]
        assert len(found) == 1, f"missed spike on {spike.entity} at {spike.start}"
        peak = found.iloc[0]
        assert (peak["top_feature"], peak["direction"]) == ("temperature_spread", "HIGH")
        assert json.loads(peak["observed"])["temperature_max"] == 100.0
        samples = json.loads(peak["sample_events"])
        assert samples and {event["sensor_id"] for event in samples} == {spike.entity}
    # a spike is its sensor's incident: another sensor flagged at that moment has its own fault
    for spike in spikes:
        others = incidents[
            (incidents["sensor_id"] != spike.entity)
            & (incidents["start"] <= spike.end)
            & (incidents["end"] >= spike.start)
        ]
        for other in others.itertuples():
            assert any(
                fault.entity == other.sensor_id and fault.start <= other.end and fault.end >= other.start
                for fault in generated.incidents
            ), f"{other.sensor_id} flagged at {other.start} with {spike.entity}'s spike"


def test_every_planted_fault_overlaps_an_incident_of_its_sensor(materialized):
    generated, warehouse, _ = materialized
    incidents = warehouse.query(
        'SELECT sensor_id, start, "end", top_feature, direction FROM sensors.incidents'
    )
    found = {}
    for fault in generated.incidents:
        hits = incidents[
            (incidents["sensor_id"] == fault.entity)
            & (incidents["start"] <= fault.end)
            & (incidents["end"] >= fault.start)
        ]
        assert len(hits), f"missed {fault.kind} on {fault.entity} {fault.start}..{fault.end}"
        found[fault.kind] = set(zip(hits["top_feature"], hits["direction"], strict=True))
    assert {"spike", "dropout", "stuck", "drift"} <= set(found)
    assert ("temperature_count", "LOW") in found["dropout"]
    assert ("temperature_mean", "HIGH") in found["drift"]
