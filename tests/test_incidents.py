"""Flagged buckets merged into incidents: gaps, peaks, detectors fired, and the empty schema."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_dagster.cli import main
from anomaly_dagster.config import SourceConfig, load_sources
from anomaly_dagster.incidents import INCIDENT_COLUMNS, merge_incidents
from anomaly_dagster.pipeline import StageContext, run_detect
from anomaly_dagster.warehouse import RunInfo, Warehouse

BUCKET = pd.Timedelta(minutes=10)
T0 = pd.Timestamp("2020-07-07 00:00:00")


def anomalies(rows: list[tuple[int, float, str, str, str]]) -> pd.DataFrame:
    """Rows of (bucket index, score, detectors, top_feature, direction)."""
    return pd.DataFrame(
        {
            "bucket_start": [T0 + index * BUCKET for index, *_ in rows],
            "score": [score for _, score, *_ in rows],
            "detectors": [detectors for _, _, detectors, *_ in rows],
            "top_feature": [feature for *_, feature, _ in rows],
            "direction": [direction for *_, direction in rows],
        }
    )


ROWS = [
    (3, 2.0, "zscore", "users", "LOW"),
    (4, 5.0, "iqr,zscore", "residual", "HIGH"),
    (5, 4.0, "iforest", "clicks", "HIGH"),
    (7, 3.0, "zscore", "clicks", "LOW"),  # one bucket gap after 5
    (10, 1.5, "iqr", "users", "HIGH"),  # two bucket gap after 7
    (40, 9.0, "iforest,iqr", "clicks", "LOW"),
]


def spans(incidents: pd.DataFrame) -> list[tuple[int, int, int]]:
    return [
        (int((row.start - T0) / BUCKET), int((row.end - T0) / BUCKET), row.buckets)
        for row in incidents.itertuples()
    ]


def test_consecutive_buckets_merge_without_gap() -> None:
    incidents = merge_incidents(anomalies(ROWS), BUCKET)
    assert list(incidents.columns) == INCIDENT_COLUMNS
    assert spans(incidents) == [(3, 5, 3), (7, 7, 1), (10, 10, 1), (40, 40, 1)]


@pytest.mark.parametrize(
    ("gap", "expected"),
    [
        (0, [(3, 5, 3), (7, 7, 1), (10, 10, 1), (40, 40, 1)]),
        (1, [(3, 7, 4), (10, 10, 1), (40, 40, 1)]),
        (2, [(3, 10, 5), (40, 40, 1)]),
        (28, [(3, 10, 5), (40, 40, 1)]),
        (29, [(3, 40, 6)]),
    ],
)
def test_gap_allows_unflagged_buckets_between(gap: int, expected) -> None:
    assert spans(merge_incidents(anomalies(ROWS), BUCKET, gap=gap)) == expected


def test_peak_and_detectors_union() -> None:
    incidents = merge_incidents(anomalies(ROWS), BUCKET, gap=1)
    first = incidents.iloc[0]
    assert first["peak_bucket"] == T0 + 4 * BUCKET
    assert first["peak_score"] == 5.0
    assert first["top_feature"] == "residual"
    assert first["direction"] == "HIGH"
    assert first["detectors"] == "iforest,iqr,zscore"
    last = incidents.iloc[-1]
    assert (last["peak_score"], last["detectors"], last["top_feature"], last["direction"]) == (
        9.0,
        "iforest,iqr",
        "clicks",
        "LOW",
    )


def test_input_order_does_not_matter() -> None:
    shuffled = anomalies(ROWS).sample(frac=1.0, random_state=3).reset_index(drop=True)
    shuffled.index = shuffled.index * 7 + 100  # an index that is neither sorted nor 0..n
    pd.testing.assert_frame_equal(
        merge_incidents(shuffled, BUCKET, gap=1), merge_incidents(anomalies(ROWS), BUCKET, gap=1)
    )


def test_bucket_size_matters() -> None:
    # 10 minutes apart: separate incidents with 5-minute buckets, one incident with 10-minute buckets
    frame = anomalies([(0, 1.0, "zscore", "users", "LOW"), (1, 2.0, "zscore", "users", "LOW")])
    assert len(merge_incidents(frame, pd.Timedelta(minutes=5))) == 2
    assert len(merge_incidents(frame, pd.Timedelta(minutes=10))) == 1


def test_empty_detector_names_are_dropped() -> None:
    frame = anomalies([(0, 1.0, ",zscore,", "users", "LOW"), (1, 2.0, "", "users", "LOW")])
    assert merge_incidents(frame, BUCKET)["detectors"].tolist() == ["zscore"]


def test_empty_input_gives_typed_empty_table() -> None:
    empty = anomalies([])
    incidents = merge_incidents(empty, BUCKET)
    assert incidents.empty
    assert list(incidents.columns) == INCIDENT_COLUMNS
    assert incidents.dtypes.to_dict() == {
        "start": "datetime64[us]",
        "end": "datetime64[us]",
        "buckets": "int64",
        "duration_minutes": "int64",
        "peak_bucket": "datetime64[us]",
        "peak_score": "float64",
        "detectors": "object",
        "top_feature": "object",
        "direction": "object",
        "observed": "object",
        "expected": "object",
        "band": "object",
    }
    # the empty table concatenates with a real one without changing its types
    real = merge_incidents(anomalies(ROWS), BUCKET)
    combined = pd.concat([incidents, real], ignore_index=True)
    assert combined["buckets"].dtype == "int64"
    assert combined["peak_score"].dtype == "float64"
    assert pd.api.types.is_datetime64_any_dtype(combined["start"])


def test_duration_observed_and_expected_at_the_peak() -> None:
    frame = anomalies(ROWS[:3]).assign(
        users=[50.0, 40.0, 60.0],
        clicks=[200.0, 210.0, 190.0],
        expected=['{"users": 150}', '{"users": 140}', '{"users": 160}'],
    )
    incident = merge_incidents(frame, BUCKET, series=["users", "clicks"]).iloc[0]
    assert incident["duration_minutes"] == 30
    assert json.loads(incident["observed"]) == {"users": 40.0, "clicks": 210.0}  # the peak is bucket 4
    assert json.loads(incident["expected"]) == {"users": 140}


def test_observed_is_strict_json_when_a_series_is_missing_at_the_peak() -> None:
    """A sensor dropout: no readings, so the bucket's mean is missing; observed held a bare NaN."""
    frame = anomalies(ROWS[:1]).assign(users=[float("nan")], clicks=[0.0])
    observed = merge_incidents(frame, BUCKET, series=["users", "clicks"]).iloc[0]["observed"]

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    assert json.loads(observed, parse_constant=refuse) == {"users": None, "clicks": 0.0}


# --- an incident over midnight: run_detect on a real warehouse ------------------------------------------


def write_scored_day(
    warehouse: Warehouse, source: SourceConfig, day: date, flagged: set[pd.Timestamp]
) -> None:
    """A day's features and ensemble scores with ``flagged`` buckets anomalous."""
    buckets = pd.date_range(pd.Timestamp(day), periods=source.buckets_per_day, freq=BUCKET)
    on = np.array([bucket in flagged for bucket in buckets])
    features = pd.DataFrame(
        {"bucket_start": buckets, **{name: np.ones(len(buckets)) for name in source.series_columns}}
    )
    scores = pd.DataFrame(
        {
            "bucket_start": buckets,
            "detector": "ensemble",
            "score": np.where(on, 5.0, 0.1),
            "is_anomaly": on,
            "detectors": np.where(on, "rcf,zscore", ""),
            "top_feature": "users",
            "direction": "LOW",
            "expected": None,
        }
    )
    written = [
        warehouse.write_partition(source.name, asset, day, frame)
        for asset, frame in (("resampled", features), ("features", features), ("scores", scores))
    ]
    warehouse.record(written, RunInfo("setup", "v"))


@pytest.mark.parametrize(
    "runs", [[[date(2020, 7, 8), date(2020, 7, 9)]], [[date(2020, 7, 8)], [date(2020, 7, 9)]]]
)
def test_an_incident_over_midnight_continues_on_the_next_day_with_its_true_start(
    tmp_path: Path, runs: list[list[date]], capsys: pytest.CaptureFixture[str]
) -> None:
    """One run over both days, or a run per day (the day before then comes from the warehouse)."""
    source = load_sources()["clickstream"]
    warehouse = Warehouse(tmp_path / "warehouse")
    night = set(pd.date_range("2020-07-08 23:40", periods=4, freq=BUCKET))  # 23:40 .. 00:10
    for day in (date(2020, 7, 8), date(2020, 7, 9)):
        write_scored_day(warehouse, source, day, night)
    context = StageContext(source, warehouse, tmp_path / "landing", RunInfo("run", "v"))
    for days in runs:
        run_detect(context, days)
    first, second = (
        warehouse.read_partitions(source.name, "incidents", [day])
        for day in (date(2020, 7, 8), date(2020, 7, 9))
    )
    assert first[["start", "end", "buckets", "continued"]].values.tolist() == [
        [pd.Timestamp("2020-07-08 23:40"), pd.Timestamp("2020-07-08 23:50"), 2, False]
    ]
    assert second[["start", "end", "buckets", "duration_minutes", "continued"]].values.tolist() == [
        [pd.Timestamp("2020-07-08 23:40"), pd.Timestamp("2020-07-09 00:10"), 4, 40, True]
    ]
    lineage = warehouse.query(
        "SELECT upstream FROM meta.lineage WHERE asset = 'incidents' AND partition = '2020-07-09'"
    )
    assert {(entry["asset"], entry["partition"]) for entry in json.loads(lineage["upstream"].item())} >= {
        ("anomalies", "2020-07-08"),
        ("anomalies", "2020-07-09"),
    }
    assert main(["report", "clickstream", "--warehouse", str(warehouse.root)]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0] == "clickstream: 288 buckets, 1 incidents"  # the whole incident, once
    assert "2020-07-08 23:40:00 2020-07-09 00:10:00" in report[2]


@pytest.mark.parametrize(
    "runs",
    [
        [[date(2020, 7, 8), date(2020, 7, 9), date(2020, 7, 10)]],
        [[date(2020, 7, 8)], [date(2020, 7, 9)], [date(2020, 7, 10)]],
    ],
)
def test_an_incident_longer_than_a_day_keeps_its_true_start(
    tmp_path: Path, runs: list[list[date]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Flagged from 07-08 20:00 to 07-10 02:00: the third day used to see only the day before, so its row
    started at 07-09 00:00 with 157 buckets, and the report listed the incident twice."""
    source = load_sources()["clickstream"]
    warehouse = Warehouse(tmp_path / "warehouse")
    stuck = set(pd.date_range("2020-07-08 20:00", "2020-07-10 02:00", freq=BUCKET))
    for days in runs:
        for day in days:
            write_scored_day(warehouse, source, day, stuck)
    context = StageContext(source, warehouse, tmp_path / "landing", RunInfo("run", "v"))
    for days in runs:
        run_detect(context, days)
    last = warehouse.read_partitions(source.name, "incidents", [date(2020, 7, 10)])
    assert last[["start", "end", "buckets", "duration_minutes", "continued"]].values.tolist() == [
        [pd.Timestamp("2020-07-08 20:00"), pd.Timestamp("2020-07-10 02:00"), 181, 1810, True]
    ]
    lineage = warehouse.query(
        "SELECT upstream FROM meta.lineage WHERE asset = 'incidents' AND partition = '2020-07-10'"
    )
    read = {(entry["asset"], entry["partition"]) for entry in json.loads(lineage["upstream"].item())}
    assert {
        ("anomalies", "2020-07-08"),
        ("raw_events", "2020-07-08"),
    } <= read  # the start's and the peak's day
    assert main(["report", "clickstream", "--warehouse", str(warehouse.root)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "clickstream: 432 buckets, 1 incidents"


def test_flags_around_midnight_every_day_do_not_make_detect_read_the_whole_history(tmp_path: Path) -> None:
    """A nightly job flagged at 00:00 and 12:00: the walk back went on while a day's flags touched its
    midnight, so every day read (and named in its lineage) every earlier day."""
    source = load_sources()["clickstream"]
    warehouse = Warehouse(tmp_path / "warehouse")
    days = [date(2020, 7, 7) + timedelta(days=offset) for offset in range(6)]
    for day in days:
        nightly = {pd.Timestamp(day), pd.Timestamp(day) + pd.Timedelta(hours=12)}
        write_scored_day(warehouse, source, day, nightly)
    run_detect(StageContext(source, warehouse, tmp_path / "landing", RunInfo("run", "v")), days)
    lineage = warehouse.query(
        "SELECT upstream FROM meta.lineage WHERE asset = 'incidents' AND partition = '2020-07-12'"
    )
    read = {
        entry["partition"]
        for entry in json.loads(lineage["upstream"].item())
        if entry["asset"] == "anomalies"
    }
    assert read == {"2020-07-11", "2020-07-12"}
