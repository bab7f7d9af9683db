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
