"""The Dagster code location: every configured source's asset chain, jobs, schedule and sensor.

This is the one module of the library that imports Dagster; ``workspace.yaml`` loads it.
Paths come from ``ANOMALY_LANDING_DIR`` and ``ANOMALY_WAREHOUSE_DIR`` (defaults ``data/landing``
and ``data/warehouse``), resolved once so that runs in subprocesses see the same folders.
"""

from __future__ import annotations

import warnings

import dagster as dg

from anomaly_dagster.config import SourceConfig, landing_dir, load_sources, warehouse_dir
from assets.factory import build_source_assets
from assets.operations import daily_schedule, landing_sensor, source_job
from assets.stream_checks import stream_vs_batch_check
from resources.spark import SparkResource
from resources.warehouse import WarehouseResource

# Single-run backfills (one run per date range) are the documented way to backfill these assets;
# Dagster still labels the parameter beta, which would print on every load.
warnings.filterwarnings("ignore", message=r".*`backfill_policy`.*", category=dg.BetaWarning)


def build_definitions(sources: dict[str, SourceConfig], landing: str, warehouse: str) -> dg.Definitions:
    """Definitions for ``sources`` reading ``landing`` and writing ``warehouse``."""
    assets, asset_checks, jobs, schedules, sensors = [], [], [], [], []
    for source in sources.values():
        assets.extend(build_source_assets(source))
        asset_checks.append(stream_vs_batch_check(source))
        job = source_job(source)
        jobs.append(job)
        schedules.append(daily_schedule(source, job))
        sensors.append(landing_sensor(source, job, landing, warehouse))
    return dg.Definitions(
        assets=assets,
        asset_checks=asset_checks,
        jobs=jobs,
        schedules=schedules,
        sensors=sensors,
        # A run's steps are the chain's stages, which run in order anyway: one process per run, not
        # one per step (a subprocess per step cost ~5x the chain's own time in a 9-day backfill), and
        # one Spark session per run when a stage runs on Spark.
        executor=dg.in_process_executor,
        resources={
            "warehouse": WarehouseResource(warehouse_dir=warehouse, landing_dir=landing),
            "spark": SparkResource(),  # started only by a Spark-engine stage (ANOMALY_ENGINE or `engine:`)
        },
    )


defs = build_definitions(load_sources(), str(landing_dir().resolve()), str(warehouse_dir().resolve()))
