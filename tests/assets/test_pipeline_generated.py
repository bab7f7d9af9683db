"""The whole asset graph materialized in-process by Dagster on generated logs, table by table."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest

from anomaly_dagster import checks
from anomaly_dagster.config import load_sources
from anomaly_dagster.definitions import build_definitions
from anomaly_dagster.generate import generate_clickstream
from anomaly_dagster.pipeline import StageContext, run_window
from anomaly_dagster.warehouse import RunInfo, Warehouse

DAYS = [date(2020, 7, 7) + timedelta(days=offset) for offset in range(4)]
ASSETS = ["raw_events", "quarantine", "resampled", "features", "model", "scores", "anomalies", "incidents"]


def _read_generated(files: list[Path]) -> pd.DataFrame:
    frames = [
        pd.read_json(path, lines=True, dtype=False)
        if path.suffix == ".jsonl"
        else pd.read_csv(path, dtype=str)
        for path in files
    ]
    events = pd.concat(frames, ignore_index=True)
    events["timestamp"] = pd.to_datetime(events["timestamp"])
    events["user"] = events["user"].str.strip()
    return events


@pytest.fixture(scope="module")
def materialized(generated_logs, tmp_path_factory) -> tuple[Warehouse, dg.ExecuteInProcessResult]:
    warehouse_dir = tmp_path_factory.mktemp("warehouse")
    defs = build_definitions(load_sources(), str(generated_logs.files[0].parent), str(warehouse_dir))
    job = defs.resolve_job_def("clickstream_pipeline")
    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        tags={
            "dagster/asset_partition_range_start": DAYS[0].isoformat(),
            "dagster/asset_partition_range_end": DAYS[-1].isoformat(),
        },
    )
    return Warehouse(warehouse_dir), result


def test_every_asset_materialized_for_every_day(materialized):
    _, result = materialized
    assert result.success
    for asset in ASSETS:
        events = [
            event for event in result.get_asset_materialization_events() if event.asset_key.path[-1] == asset
        ]
        assert sorted(event.partition for event in events) == [day.isoformat() for day in DAYS], asset


def test_a_ranged_run_gives_rows_per_day_not_one_total_on_every_day(materialized):
    """Dagster copies a ranged run's metadata onto each day: a total there would read as each day's."""
    warehouse, result = materialized
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "raw_events"]
    counts = warehouse.query(
        "SELECT partition, row_count FROM meta.lineage WHERE asset = 'raw_events' ORDER BY partition"
    )
    for event in events:
        metadata = event.materialization.metadata
        assert "dagster/row_count" not in metadata
        assert metadata["days_in_run"].value == len(DAYS)
        assert metadata["rows_per_day"].value == dict(counts.itertuples(index=False))
        assert metadata["events_in_run"].value == counts["row_count"].sum()


def test_asset_checks_pass(materialized):
    _, result = materialized
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {
        "events_present",
        "complete_buckets",
        "quarantine_rate",
        "alert_rate",
        "stream_vs_batch",
    }
    assert evaluations["events_present"].passed
    assert evaluations["complete_buckets"].passed
    assert evaluations["quarantine_rate"].passed


def test_a_day_without_input_fails_its_events_check(generated_logs, tmp_path):
    """No file touches 2020-07-14: the day would resample to an all-zero outage; the check says why."""
    defs = build_definitions(load_sources(), str(generated_logs.files[0].parent), str(tmp_path / "warehouse"))
    result = defs.resolve_job_def("clickstream_pipeline").execute_in_process(
        partition_key="2020-07-14", instance=dg.DagsterInstance.ephemeral()
    )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    missing = evaluations["events_present"]
    assert not missing.passed and missing.severity == dg.AssetCheckSeverity.ERROR
    assert missing.description == "too few events on ['2020-07-14']: missing input? {'2020-07-14': '0 < 1'}"
    assert evaluations["complete_buckets"].passed  # the grid alone cannot tell


def test_the_events_check_can_be_off_for_a_log_that_may_be_silent_all_day():
    source = load_sources()["clickstream"]
    silent = source.model_copy(update={"checks": source.checks.model_copy(update={"min_events_per_day": 0})})
    history = {date(2020, 7, 13): 28000}
    assert checks.events_present(silent, {date(2020, 7, 14): 0}, history).passed  # both rules off
    # and it does not claim a day of 0 events had "at least 0 event(s) and 10% of the median earlier day"
    assert "not checked" in checks.events_present(silent, {date(2020, 7, 14): 0}, history).description
    assert not checks.events_present(source, {date(2020, 7, 14): 0, date(2020, 7, 15): 5}).passed


def test_a_day_whose_file_never_landed_fails_although_late_events_reached_it():
    """The next day's file carries a few late events of the missing day: 9 events passed a floor of 1,
    and the day was scored (and learnt) as a whole-day outage."""
    source = load_sources()["clickstream"]
    history = {date(2020, 7, 7) + timedelta(days=k): 28000 + 500 * k for k in range(8)}  # in the warehouse
    outcome = checks.events_present(source, {date(2020, 7, 15): 9, date(2020, 7, 16): 27000}, history)
    assert not outcome.passed and "['2020-07-15']" in outcome.description
    assert "9 < 10% of a typical day before it (28500)" in outcome.description  # 07-08, a week before
    assert checks.events_present(source, {date(2020, 7, 15): 9}).passed  # a first day has nothing to compare
    weekdays_only = {day: (28000 if day.weekday() < 5 else 900) for day in history}  # a B2B log
    quiet_sunday = checks.events_present(source, {date(2020, 7, 19): 950}, weekdays_only)
    assert quiet_sunday.passed  # under 10% of the median, but like the Sunday before


def test_raw_events_and_resampled_match_the_files(materialized, generated_logs):
    warehouse, _ = materialized
    events = _read_generated(generated_logs.files)
    events = events[events["timestamp"].dt.date.isin(DAYS)]
    stored = warehouse.query("SELECT count(*) AS n FROM clickstream.raw_events")["n"].iloc[0]
    assert stored == len(events)
    resampled = warehouse.query("SELECT * FROM clickstream.resampled ORDER BY bucket_start")
    assert len(resampled) == 144 * len(DAYS)
    expected = events.groupby(events["timestamp"].dt.floor("10min")).agg(
        clicks=("user", "size"), users=("user", "nunique")
    )
    expected = expected.reindex(pd.DatetimeIndex(resampled["bucket_start"]), fill_value=0)
    np.testing.assert_array_equal(resampled["clicks"].to_numpy(), expected["clicks"].to_numpy())
    np.testing.assert_array_equal(resampled["users"].to_numpy(), expected["users"].to_numpy())


def test_features_derive_residual_and_read_the_previous_day(materialized):
    warehouse, _ = materialized
    features = warehouse.query("SELECT * FROM clickstream.features ORDER BY bucket_start")
    np.testing.assert_allclose(features["residual"], features["clicks"] - features["users"])
    np.testing.assert_allclose(
        features["users_lag1"].iloc[1:].to_numpy(), features["users"].iloc[:-1].to_numpy()
    )
    first = features.iloc[0]
    assert np.isnan(first["users_lag1"])  # no day before the first partition: NaN, not zero
    assert features["slot"].min() == 0 and features["slot"].max() == 143


def test_model_is_walk_forward(materialized):
    warehouse, _ = materialized
    model = warehouse.query("SELECT * FROM clickstream.model ORDER BY date, detector")
    assert set(model["detector"]) == {"rcf", "zscore", "iqr", "iforest"}
    first = model[model["date"] == pd.Timestamp(DAYS[0])]
    assert first["cold_start"].all() and (first["training_start"] == pd.Timestamp(DAYS[0])).all()
    later = model[model["date"] > pd.Timestamp(DAYS[0])]
    assert not later["cold_start"].any()
    assert (later["training_end"] < later["date"]).all()  # trained only on days before the partition
    last = model[model["date"] == pd.Timestamp(DAYS[-1])]
    assert (last["training_days"] == 3).all()
    # the source's mean + 3 sd, except the z-score's own fixed cut (already in sd units)
    methods = dict(zip(last["detector"], last["threshold_method"], strict=True))
    assert methods == {"rcf": "sigma", "zscore": "fixed", "iqr": "sigma", "iforest": "sigma"}
    assert last.set_index("detector").loc["zscore", "threshold"] == 3.5
    assert (warehouse.partition_dir("clickstream", "model", DAYS[-1]) / "model.npz").exists()


def test_scores_carry_thresholds_from_the_model_and_an_ensemble(materialized):
    warehouse, _ = materialized
    scores = warehouse.query("SELECT * FROM clickstream.scores")
    assert set(scores["detector"]) == {"rcf", "zscore", "iqr", "iforest", "ensemble"}
    assert len(scores) == 5 * 144 * len(DAYS)
    model = warehouse.query("SELECT date, detector, threshold FROM clickstream.model")
    joined = scores.merge(model, on=["date", "detector"], suffixes=("", "_model"))
    np.testing.assert_allclose(joined["threshold"], joined["threshold_model"])
    per_detector = scores[scores["detector"] != "ensemble"]
    assert (per_detector["is_anomaly"] == (per_detector["score"] > per_detector["threshold"])).all()
    assert set(scores["direction"].dropna()) <= {"HIGH", "LOW", ""}
    # no direction only where nothing was measured (the first day's first bucket has no lag yet)
    unmeasured = per_detector[per_detector["direction"] == ""]
    assert (unmeasured["score"] == 0).all() and len(unmeasured) < len(per_detector) / 100


def test_anomalies_and_incidents_follow_the_scores(materialized, generated_logs):
    warehouse, _ = materialized
    flagged = warehouse.query(
        "SELECT bucket_start FROM clickstream.scores WHERE detector = 'ensemble' AND is_anomaly ORDER BY 1"
    )
    anomalies = warehouse.query("SELECT * FROM clickstream.anomalies ORDER BY bucket_start")
    assert anomalies["bucket_start"].tolist() == flagged["bucket_start"].tolist()
    incidents = warehouse.query("SELECT * FROM clickstream.incidents ORDER BY start")
    assert incidents["buckets"].sum() == len(anomalies)
    assert (incidents["end"] >= incidents["start"]).all()
    # every injected fault after the cold-start day overlaps a detected incident
    for fault in generated_logs.incidents:
        if fault.start.date() == DAYS[0]:
            continue
        overlap = incidents[(incidents["start"] <= fault.end) & (incidents["end"] >= fault.start)]
        assert len(overlap), f"missed injected {fault.kind} {fault.start}..{fault.end}"


def test_catalog_lineage_and_plots(materialized):
    warehouse, _ = materialized
    lineage = warehouse.query("SELECT * FROM meta.lineage")
    assert len(lineage) == len(ASSETS) * len(DAYS)
    assert set(lineage["asset"]) == set(ASSETS)
    features = lineage[(lineage["asset"] == "features") & (lineage["partition"] == DAYS[1].isoformat())]
    upstream = features["upstream"].iloc[0]
    assert DAYS[0].isoformat() in upstream and "resampled" in upstream
    for path in lineage["path"]:
        assert not Path(path).is_absolute() and (warehouse.root / path).exists()
    plots = list((warehouse.root / "clickstream" / "plots").rglob("*.png"))
    assert {plot.parent.name for plot in plots} == {"scores", "thresholds", "attribution"}
    assert all(plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for plot in plots)
    with duckdb.connect(str(warehouse.catalog_path), read_only=True) as connection:
        views = {
            row[0]
            for row in connection.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal"
            ).fetchall()
        }
    assert set(ASSETS) <= views


def test_scores_explain_each_feature_like_kinesis(materialized):
    warehouse, _ = materialized
    scores = warehouse.query(
        "SELECT * FROM clickstream.scores WHERE detector = 'rcf' ORDER BY score DESC LIMIT 20"
    )
    for row in scores.itertuples():
        explained = json.loads(row.attribution)
        assert set(explained) == {
            "users",
            "clicks",
            "clicks_per_user",
            "users_lag1",
            "clicks_lag1",
            "tod_sin",
            "tod_cos",
        }
        assert all(
            item["direction"] in ("HIGH", "LOW") and item["strength"] >= 0 for item in explained.values()
        )
        observable = {name: item for name, item in explained.items() if not name.startswith("tod_")}
        strongest = max(observable, key=lambda name: observable[name]["strength"])
        assert (row.top_feature, row.direction) == (strongest, observable[strongest]["direction"])


def test_an_unreadable_file_fails_the_quarantine_check_whatever_the_rate():
    """A truncated file is one quarantine row standing for all its events: 1 row against 28,000 events
    passed a 1% limit while a producer's whole day was lost."""
    source = load_sources()["clickstream"]
    day = date(2020, 7, 8)
    lost = pd.DataFrame(
        {
            "source_file": ["/landing/clicks_b_2020-07-08.csv.gz", "/landing/clicks_2020-07-08.csv.gz"],
            "line": [None, 17],
            "reason": ["unreadable file: end-of-stream marker was not found", "too many columns"],
            "raw": [None, "a,b,c,d,e"],
        }
    )
    outcome = checks.quarantine_rate(source, {day: 28000}, {day: lost})
    assert not outcome.passed
    assert (
        "unreadable file(s), whose events are all lost: {'2020-07-08': ['clicks_b_2020-07-08.csv.gz']}"
        in (outcome.description)
    )
    assert checks.quarantine_rate(source, {day: 28000}, {day: lost.iloc[1:]}).passed
    empty = lost.iloc[:1].assign(reason="unreadable file: empty file (no header line)")  # held no event
    assert checks.quarantine_rate(source, {day: 28000}, {day: empty}).passed


def test_the_next_models_do_not_learn_a_day_whose_file_never_landed(tmp_path):
    """07-08's file is missing; the next file's late events leave it a handful. The model of 07-09 used
    to train on that day as if the site had been down all day."""
    generated = generate_clickstream(tmp_path / "landing", days=3, start=date(2020, 7, 7), seed=3)
    missing = next(path for path in generated.files if "2020-07-08" in path.name)
    missing.unlink()
    source = load_sources()["clickstream"]
    warehouse = Warehouse(tmp_path / "warehouse")
    context = StageContext(source, warehouse, tmp_path / "landing", RunInfo("test", "0"))
    outputs = run_window(context, [date(2020, 7, 7), date(2020, 7, 8), date(2020, 7, 9)])
    counts = warehouse.row_counts("clickstream", "raw_events")
    assert 0 < counts[date(2020, 7, 8)] < 0.1 * counts[date(2020, 7, 7)]  # late events only
    model = outputs["model"].frames[date(2020, 7, 9)]
    assert set(model["training_start"]) == set(model["training_end"]) == {date(2020, 7, 7)}


def test_the_evaluation_asset_says_where_it_looked_for_labels(tmp_path: Path):
    """Without its labels file the evaluation asset's note showed the config object's repr
    ("labels file path='labels/...' first_day=None or scores missing"), not the file it looked for."""
    landing = tmp_path / "landing"
    landing.mkdir()
    defs = build_definitions(load_sources(), str(landing), str(tmp_path / "warehouse"))
    key = dg.AssetKey(["clickstream", "evaluation"])
    result = dg.materialize([defs.get_assets_def(key)], resources=defs.resources, selection=[key])
    note = result.asset_materializations_for_node("clickstream__evaluation")[0].metadata["note"].value
    assert note == f"nothing to evaluate: no labels file at {tmp_path / 'labels' / 'clickstream_labels.csv'}"
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "clickstream_labels.csv").write_text("start,end\n")
    result = dg.materialize([defs.get_assets_def(key)], resources=defs.resources, selection=[key])
    note = result.asset_materializations_for_node("clickstream__evaluation")[0].metadata["note"].value
    assert note == "nothing to evaluate: no scores partitions yet"
