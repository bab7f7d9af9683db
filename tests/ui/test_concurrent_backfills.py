"""Two overlapping asset backfills launched at once against ``make dev``: both succeed, no lock error reaches
the user, and the warehouse ends with every partition exactly once, equal to a clean single run.

Days 1-3 and 2-4 of four generated days: each backfill is one run (single-run policy), the two runs write
days 2 and 3 and the DuckDB catalog at the same time, from separate processes.
"""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

import dagster as dg
import dagster_dev as dd
import pandas as pd
import pytest

from anomaly_dagster.config import load_sources
from anomaly_dagster.definitions import build_definitions
from anomaly_dagster.generate import generate_clickstream
from anomaly_dagster.warehouse import Warehouse

START = date(2020, 7, 7)
DAYS = ["2020-07-07", "2020-07-08", "2020-07-09", "2020-07-10"]
BACKFILLS = {"days 1-3": (DAYS[0], DAYS[2]), "days 2-4": (DAYS[1], DAYS[3])}
METRICS = ["pages", "users", "clicks"]


def _clean_run(landing: Path, warehouse: Path) -> None:
    """The reference: one in-process run of the whole chain over the four days, alone, into its own warehouse."""
    defs = build_definitions(load_sources(), str(landing), str(warehouse))
    result = defs.resolve_job_def(f"{dd.SOURCE}_pipeline").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        tags={"dagster/asset_partition_range_start": DAYS[0], "dagster/asset_partition_range_end": DAYS[-1]},
    )
    assert result.success


def _resampled(warehouse: Warehouse) -> pd.DataFrame:
    return warehouse.query(
        f"SELECT bucket_start, {', '.join(METRICS)} FROM {dd.SOURCE}.resampled ORDER BY bucket_start"
    )


def _overlap(runs: list[dict]) -> float:
    """Seconds during which both runs were executing."""
    first, second = runs
    return min(first["endTime"], second["endTime"]) - max(first["startTime"], second["startTime"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_overlapping_backfills_at_once_lose_and_duplicate_nothing(tmp_path):
    landing, warehouse_dir = tmp_path / "landing", tmp_path / "warehouse"
    generate_clickstream(landing, days=len(DAYS), start=START, seed=11)

    began = time.monotonic()
    dev = dd.start(tmp_path, landing, warehouse_dir)
    try:
        # the reference run overlaps the server's start-up (it writes elsewhere)
        reference = Warehouse(tmp_path / "reference")
        _clean_run(landing, reference.root)
        dd.wait_until_loaded(dev)
        loaded = time.monotonic() - began

        # both backfills at once: two launches back to back, before the daemon's next tick
        ids = {
            name: dd.launch_backfill(dev, first, last, title=name)
            for name, (first, last) in BACKFILLS.items()
        }
        states = dd.wait_for_backfills(dev, list(ids.values()), timeout=420)
        finished = time.monotonic() - began

        # both succeed, one run each, and the runs really did execute at the same time
        runs = dd.assert_backfills_succeeded(dev, states)
        assert _overlap(runs) > 0, f"the two backfill runs did not overlap: {runs}"
        every_run = dd.all_runs(dev)
        assert {run["runId"] for run in every_run} == {run["runId"] for run in runs}, every_run
        assert all(run["status"] == "SUCCESS" for run in every_run), every_run

        # no lock error anywhere a user could see one: run event logs, step output, the server's log
        texts = [text for run in runs for text in dd.run_event_texts(dev, run["runId"])]
        texts.extend(dd.compute_log_texts(dev).values())
        texts.append(dev.log.read_text(errors="replace"))
        assert not dd.lock_errors(texts), dd.lock_errors(texts)

        returncode = dd.stop(dev)
        dd.assert_clean_exit(dev, returncode)
    finally:
        if dev.process.poll() is None or dev.processes():
            dd.kill(dev)

    # nothing lost or duplicated: one lineage row per asset and day, describing the file on disk
    warehouse = Warehouse(warehouse_dir)
    lineage = warehouse.query(
        "SELECT asset, partition, count(*) AS n FROM meta.lineage WHERE source = ? GROUP BY asset, partition",
        [dd.SOURCE],
    )
    assert (lineage["n"] == 1).all(), lineage[lineage["n"] != 1]
    assert sorted(zip(lineage["asset"], lineage["partition"], strict=True)) == sorted(
        (asset, day) for asset in dd.ASSETS for day in DAYS
    )
    recorded_runs = set(warehouse.query("SELECT DISTINCT run_id FROM meta.lineage")["run_id"])
    assert recorded_runs <= {run["runId"] for run in runs}, recorded_runs
    audit = warehouse.audit(dd.SOURCE)
    assert audit.consistent, audit

    # 144 buckets a day, and the same counts as the clean run
    resampled = _resampled(warehouse)
    per_day = resampled.groupby(resampled["bucket_start"].dt.strftime("%Y-%m-%d")).size()
    assert per_day.to_dict() == dict.fromkeys(DAYS, 144), per_day
    expected = _resampled(reference)
    pd.testing.assert_frame_equal(resampled, expected, check_dtype=False)
    print(
        f"loaded after {loaded:.0f}s, both backfills done after {finished:.0f}s, "
        f"runs overlapped {_overlap(runs):.0f}s, make dev exited with {returncode}"
    )
