"""The ``anomaly-dagster`` command: generate sample logs, then report on a materialized warehouse."""

from __future__ import annotations

from datetime import date

import dagster as dg
import pandas as pd

from anomaly_dagster.cli import main
from anomaly_dagster.config import load_sources
from anomaly_dagster.definitions import build_definitions


def test_generate_then_report(tmp_path, capsys):
    landing, warehouse = tmp_path / "landing", tmp_path / "warehouse"
    assert main(["generate", "clickstream", "--days", "2", "--out", str(landing), "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "partitions: 2020-07-07 .. 2020-07-08" in printed
    assert sorted(path.name for path in landing.iterdir()) == [
        "clicks_2020-07-07.csv.gz",
        "clicks_2020-07-08.csv.gz",
    ]

    assert main(["report", "clickstream", "--warehouse", str(warehouse)]) == 1  # nothing materialized yet
    assert "materialize the pipeline first" in capsys.readouterr().err

    defs = build_definitions(load_sources(), str(landing), str(warehouse))
    result = defs.resolve_job_def("clickstream_pipeline").execute_in_process(
        partition_key="2020-07-08", instance=dg.DagsterInstance.ephemeral()
    )
    assert result.success
    labels = tmp_path / "labels" / "clickstream_labels.csv"
    assert main(["report", "clickstream", "--warehouse", str(warehouse), "--labels", str(labels)]) == 0
    report = capsys.readouterr().out
    assert report.startswith("clickstream: 144 buckets")
    assert "against labels: {'precision'" in report
    assert str(warehouse / "clickstream" / "plots") in report
    incidents = pd.read_parquet(
        warehouse / "clickstream" / "incidents" / f"date={date(2020, 7, 8)}" / "part.parquet"
    )
    assert f"{len(incidents)} incidents" in report


def test_unknown_generator_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "nosuchsource", "--out", str(tmp_path)]) == 2
    assert "no generator for source 'nosuchsource'" in capsys.readouterr().err
