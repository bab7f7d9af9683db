"""The ``anomaly-dagster`` command: generate sample logs, then report on a materialized warehouse."""

from __future__ import annotations

from datetime import date

import dagster as dg
import pandas as pd
import pytest
import yaml

from anomaly_dagster.cli import main
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, load_sources
from anomaly_dagster.definitions import build_definitions


def test_generate_then_report(tmp_path, capsys, monkeypatch):
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
    # a source that this warehouse never materialized, and a labels file that is not there
    assert main(["report", "sensors", "--warehouse", str(warehouse)]) == 1
    assert "no sensors tables in" in capsys.readouterr().err
    assert (
        main(["report", "clickstream", "--warehouse", str(warehouse), "--labels", str(tmp_path / "no.csv")])
        == 2
    )
    assert "no.csv" in capsys.readouterr().err
    # a 0/1 label line starts on the source's labels.first_day, as the evaluation asset reads it (the
    # report aligned it to start_date): label exactly the flagged buckets of 07-08, found from 07-08 on
    scores = pd.read_parquet(warehouse / "clickstream" / "scores" / "date=2020-07-08" / "part.parquet")
    flags = scores[scores["detector"] == "ensemble"].sort_values("bucket_start")["is_anomaly"]
    assert flags.any()
    line = tmp_path / "flags_from_0708.csv"
    line.write_text(",".join(str(int(flag)) for flag in flags))
    own = yaml.safe_load((PACKAGE_SOURCES_DIR / "clickstream.yaml").read_text())
    own["labels"] = {"path": str(line), "first_day": "2020-07-08"}
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "clickstream.yaml").write_text(yaml.safe_dump(own))
    monkeypatch.setenv("ANOMALY_SOURCES_DIR", str(tmp_path / "sources"))
    assert main(["report", "clickstream", "--warehouse", str(warehouse), "--labels", str(line)]) == 0
    assert "against labels: {'precision': 1.0, 'recall': 1.0, 'f1': 1.0" in capsys.readouterr().out
    one_per_line = tmp_path / "flags.csv"
    one_per_line.write_text("0\n1\n0\n")
    assert main(["report", "clickstream", "--warehouse", str(warehouse), "--labels", str(one_per_line)]) == 2
    assert "--labels: " in capsys.readouterr().err


def test_unknown_generator_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "nosuchsource", "--out", str(tmp_path)]) == 2
    assert "no generator for source 'nosuchsource'" in capsys.readouterr().err


def test_command_line_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert main(["report", "nosuch", "--warehouse", str(tmp_path)]) == 2
    assert "unknown source 'nosuch'; known: ['clickstream', 'sensors']" in capsys.readouterr().err
    for flag, value, message in (
        ("--start", "2020-13-01", "not a YYYY-MM-DD day"),
        ("--days", "0", "at least 1"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["generate", "clickstream", "--out", str(tmp_path), flag, value])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    # days before the source's start_date are no partitions: their events would be quarantined
    assert main(["generate", "clickstream", "--out", str(tmp_path), "--start", "2020-07-01"]) == 2
    assert "before clickstream's start_date 2020-07-07" in capsys.readouterr().err
    monkeypatch.setenv("ANOMALY_SOURCES_DIR", str(tmp_path / "nope"))
    assert main(["generate", "clickstream", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_has_labels_tells_make_backfill_whether_to_evaluate(tmp_path, monkeypatch):
    """make backfill evaluates only a labelled source: the evaluation asset of one without labels does
    not exist, and selecting it made Dagster run every source's assets unpartitioned (and fail)."""
    assert main(["has-labels", "clickstream"]) == 0
    own = yaml.safe_load((PACKAGE_SOURCES_DIR / "clickstream.yaml").read_text())
    own.pop("labels")
    (tmp_path / "checkout.yml").write_text(yaml.safe_dump({**own, "name": "checkout"}))  # .yml is read too
    monkeypatch.setenv("ANOMALY_SOURCES_DIR", str(tmp_path))
    assert main(["has-labels", "checkout"]) == 1
    assert main(["has-labels", "nosuch"]) == 2
