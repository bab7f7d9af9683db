"""The stream_vs_batch asset check on a real Dagster materialization and a real stream of the same day."""

from __future__ import annotations

import shutil
from datetime import date

import dagster as dg
import pandas as pd
import pytest

from anomaly_dagster import checks
from anomaly_dagster.config import ChecksConfig, load_sources
from anomaly_dagster.definitions import build_definitions
from anomaly_dagster.streaming import SCORES_ASSET, FileTransport, StreamRunner
from anomaly_dagster.warehouse import Warehouse
from assets.stream_checks import CHECK_NAME

# The stream's forest keeps learning while batch scores with the day's fixed model, so a few flags
# differ (about 6% of buckets on this day, whose model learned from one day only): the limit is 90% here.
SOURCE = load_sources()["clickstream"].model_copy(
    update={"checks": ChecksConfig(min_stream_agreement=0.9)}, deep=True
)
FIRST, STREAMED = date(2020, 7, 7), date(2020, 7, 8)
CHECK = dg.AssetCheckKey(dg.AssetKey(["clickstream", "scores"]), CHECK_NAME)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(
    generated_logs, generated_pipeline, tmp_path_factory
) -> tuple[dg.Definitions, Warehouse, dg.ExecuteInProcessResult]:
    """The shared two-day materialization (copied), then its second day streamed from every landing file."""
    batch_root, result = generated_pipeline
    root = tmp_path_factory.mktemp("stream_checks")
    shutil.copytree(batch_root, root / "warehouse")
    defs = build_definitions(
        {SOURCE.name: SOURCE}, str(generated_logs.files[0].parent), str(root / "warehouse")
    )
    warehouse = Warehouse(root / "warehouse")
    events = pd.concat(  # the day's events from every file (a file spills into the next day), in time order
        pd.read_json(path, lines=True, dtype=False, convert_dates=False)
        if path.suffix == ".jsonl"
        else pd.read_csv(path, dtype=str)
        for path in generated_logs.files
    )
    events = events[events["timestamp"].fillna("").str.startswith(STREAMED.isoformat())]
    events.sort_values("timestamp", kind="stable").to_csv(root / "in_order.csv", index=False)
    runner = StreamRunner(SOURCE, FileTransport(root / "in_order.csv"), str(root / "stream.jsonl"), warehouse)
    assert runner.run() == 0
    checks_only = dg.define_asset_job("stream_check", selection=dg.AssetSelection.checks(CHECK))
    return dg.Definitions.merge(defs, dg.Definitions(jobs=[checks_only])), warehouse, result


def run_check(defs: dg.Definitions, day: date) -> dg.AssetCheckEvaluation:
    result = defs.resolve_job_def("stream_check").execute_in_process(
        # a job of checks alone has no assets to validate a partition key against: the tag is the key
        instance=dg.DagsterInstance.ephemeral(),
        tags={"dagster/partition": day.isoformat()},
    )
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.partition == day.isoformat()
    return evaluation


def test_the_pipeline_run_checks_its_days_before_anything_was_streamed(pipeline):
    _, _, result = pipeline
    assert result.success
    evaluations = [e for e in result.get_asset_check_evaluations() if e.check_name == CHECK_NAME]
    assert len(evaluations) == 1
    assert evaluations[0].passed
    assert "no stream rows" in evaluations[0].description


def test_the_streamed_day_agrees_with_batch(pipeline):
    defs, warehouse, _ = pipeline
    stream = warehouse.read_partitions("clickstream", SCORES_ASSET, [STREAMED])
    assert len(stream) == 144
    evaluation = run_check(defs, STREAMED)
    metadata = {key: value.value for key, value in evaluation.metadata.items()}
    assert evaluation.passed, evaluation.description
    assert metadata["buckets_compared"] == 144
    assert metadata["count_mismatches"] == 0  # the stream counted every event batch counted
    assert metadata["agreement"] >= SOURCE.checks.min_stream_agreement
    assert metadata["flag_mismatches"] == metadata["stream_only_flags"] + metadata["batch_only_flags"]
    assert metadata["agreement"] == pytest.approx(1 - metadata["flag_mismatches"] / 144)
    assert metadata["agreement_per_day"] == {STREAMED.isoformat(): metadata["agreement"]}


def test_a_day_without_stream_rows_passes_and_says_so(pipeline):
    defs, _, _ = pipeline
    evaluation = run_check(defs, FIRST)
    assert evaluation.passed
    assert evaluation.description.startswith("no stream rows")
    assert evaluation.metadata["buckets_compared"].value == 0


def test_low_agreement_fails_with_a_warning(pipeline):
    defs, warehouse, _ = pipeline
    stream = warehouse.read_partitions("clickstream", SCORES_ASSET, [STREAMED])
    batch = warehouse.read_partitions("clickstream", "scores", [STREAMED])
    flags = batch[batch["detector"] == "ensemble"].set_index("bucket_start")["is_anomaly"]
    tampered = stream.copy()
    flip = tampered.index[:72]  # half the day says the opposite of batch; one bucket lost an event
    tampered.loc[flip, "is_anomaly"] = ~flags.reindex(tampered.loc[flip, "window_start"]).to_numpy()
    tampered.loc[100, "clicks"] -= 1
    try:
        warehouse.write_partition("clickstream", SCORES_ASSET, STREAMED, tampered)
        evaluation = run_check(defs, STREAMED)
    finally:
        warehouse.write_partition("clickstream", SCORES_ASSET, STREAMED, stream)
    metadata = {key: value.value for key, value in evaluation.metadata.items()}
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert metadata["flag_mismatches"] >= 72
    assert metadata["agreement"] <= 0.5
    assert metadata["count_mismatches"] == 1
    assert "limit 90%" in evaluation.description


def test_an_entity_source_is_not_compared():
    sensors = load_sources()["sensors"]
    rows = pd.DataFrame({"window_start": pd.to_datetime(["2020-07-08"]), "is_anomaly": [True]})
    outcome = checks.stream_batch_agreement(sensors, rows, pd.DataFrame(), pd.DataFrame())
    assert outcome.passed
    assert outcome.description.startswith("not compared")
