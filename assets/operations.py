"""Jobs, the daily schedule and the landing-folder sensor of one source."""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path

import dagster as dg

from anomaly_dagster import ingest
from anomaly_dagster.config import SourceConfig
from anomaly_dagster.warehouse import Warehouse
from assets.factory import daily_partitions


def _chain_selection(source: SourceConfig) -> dg.AssetSelection:
    """The daily-partitioned chain: the group without the (unpartitioned) evaluation, if any."""
    group = dg.AssetSelection.groups(source.name)
    if source.labels is None:
        return group
    return group - dg.AssetSelection.assets([source.name, "evaluation"])


def source_job(source: SourceConfig) -> dg.UnresolvedAssetJobDefinition:
    """The whole chain of one source for one partition (or a range, in one run)."""
    return dg.define_asset_job(
        name=f"{source.name}_pipeline",
        selection=_chain_selection(source),
        description=f"Ingest, resample, train, score and report anomalies for {source.name}.",
    )


def daily_schedule(source: SourceConfig, job: dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    """Yesterday's partition, shortly after midnight UTC, once late files have had time to land."""
    return dg.build_schedule_from_partitioned_job(
        job, name=f"{source.name}_daily", hour_of_day=0, minute_of_hour=30
    )


def landing_sensor(
    source: SourceConfig, job: dg.UnresolvedAssetJobDefinition, landing_dir: str, warehouse_dir: str
) -> dg.SensorDefinition:
    """Requests the partitions that new or changed landing files touch.

    The cursor maps each file to the (size, mtime) last acted on; a run key per day and file state
    makes a repeated evaluation idempotent.
    """
    partitions = daily_partitions(source)

    @dg.sensor(name=f"{source.name}_landing", job=job, minimum_interval_seconds=60)
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        seen: dict[str, list[int]] = json.loads(context.cursor) if context.cursor else {}
        files = ingest.discover(source, Path(landing_dir))
        index = ingest.LandingIndex(
            Warehouse(Path(warehouse_dir)).asset_dir(source.name, "landing_index") / "index.json"
        )
        entries = index.refresh(source, files)
        changed = [entry for entry in entries if seen.get(entry.path) != [entry.size, entry.mtime_ns]]
        last = partitions.get_last_partition_key()
        days: set[date] = set()
        for entry in changed:
            days |= entry.touched_days
        state = json.dumps(sorted((e.path, e.size, e.mtime_ns) for e in changed))
        version = hashlib.sha256(state.encode()).hexdigest()[:16]
        requests = [
            dg.RunRequest(partition_key=day.isoformat(), run_key=f"{day.isoformat()}:{version}")
            for day in sorted(days)
            if source.start_date <= day and last is not None and day.isoformat() <= last
        ]
        cursor = {entry.path: [entry.size, entry.mtime_ns] for entry in entries}
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))

    return _sensor
