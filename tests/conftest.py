"""Shared fixtures: the reference dataset from ../shared and generated sample logs."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "clickstream"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The real reference clickstream (MIT-0), read in place from ../shared, never copied."""
    if not (REFERENCE_DIR / "clicks.csv.gz").exists():
        pytest.fail(f"reference data not found at {REFERENCE_DIR}: check out ../shared beside the repository")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def generated_logs(tmp_path_factory: pytest.TempPathFactory):
    """Four days of generated clickstream logs (mixed CSV.gz and JSON lines) with labelled faults."""
    from anomaly_dagster.generate import generate_clickstream

    root = tmp_path_factory.mktemp("generated")
    return generate_clickstream(root / "landing", days=4, start=date(2020, 7, 7), seed=11)


@pytest.fixture(scope="session")
def spark():
    """One local Spark session (two cores) for the whole test session: the JVM starts once."""
    from anomaly_dagster.engines.spark import spark_session

    return spark_session("local[2]")


@pytest.fixture(scope="session")
def generated_pipeline(generated_logs, tmp_path_factory):
    """The first two generated days materialized in one Dagster run: ``(warehouse root, run result)``.
    Shared by the streaming tests, which compare against it; copy the warehouse before writing to it."""
    import dagster as dg

    from anomaly_dagster.config import load_sources
    from anomaly_dagster.definitions import build_definitions

    root = tmp_path_factory.mktemp("generated_pipeline") / "warehouse"
    defs = build_definitions(load_sources(), str(generated_logs.files[0].parent), str(root))
    result = defs.resolve_job_def("clickstream_pipeline").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        tags={
            "dagster/asset_partition_range_start": "2020-07-07",
            "dagster/asset_partition_range_end": "2020-07-08",
        },
    )
    assert result.success
    return root, result
