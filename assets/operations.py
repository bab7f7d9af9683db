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
    """Runs the days that new or changed landing files call for (``ingest.plan_landing_runs``) as one
    range; the run key is the range and the files' state, so a repeated evaluation is idempotent."""
    partitions = daily_partitions(source)

    @dg.sensor(name=f"{source.name}_landing", job=job, minimum_interval_seconds=60)
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        try:
            files = ingest.discover(source, Path(landing_dir))
        except ingest.LandingFileError as error:  # no landing folder (yet): say so on every tick
            return dg.SensorResult(skip_reason=str(error))
        index = ingest.LandingIndex(
            Warehouse(Path(warehouse_dir)).asset_dir(source.name, "landing_index") / "index.json"
        )
        last = partitions.get_last_partition_key()
        plan = ingest.plan_landing_runs(
            source,
            index.refresh(source, files),
            json.loads(context.cursor) if context.cursor else {},
            date.fromisoformat(last) if last is not None else None,
        )
        cursor = json.dumps(plan.cursor, sort_keys=True)
        if plan.first is None or plan.last is None:
            return dg.SensorResult(run_requests=[], cursor=cursor)
        first, last_day = plan.first.isoformat(), plan.last.isoformat()
        run_key = f"{first}..{last_day}:{hashlib.sha256(cursor.encode()).hexdigest()[:16]}"
        if first == last_day:
            request = dg.RunRequest(partition_key=first, run_key=run_key)
        else:
            tags = {
                "dagster/asset_partition_range_start": first,
                "dagster/asset_partition_range_end": last_day,
            }
            request = dg.RunRequest(run_key=run_key, tags=tags)
        return dg.SensorResult(run_requests=[request], cursor=cursor)

    return _sensor
