"""spark-stream on a real local[2] session: files dropped into a landing folder, the batch tables beside."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from anomaly_dagster import cli
from anomaly_dagster.config import ColumnConfig, ConfigError, SourceConfig, load_sources
from anomaly_dagster.spark_stream import (
    checkpoint_dir,
    kafka_lines,
    landing_lines,
    run_spark_stream,
)
from anomaly_dagster.streaming import FileTransport, StreamRunner
from anomaly_dagster.warehouse import Warehouse

SOURCE = load_sources()["clickstream"]
DAY = "2020-07-08"
FIRST, SPLIT, END = f"{DAY} 06:00:00", f"{DAY} 07:30:00", f"{DAY} 09:00:00"
BAD_LINES = {  # JSON lines: (raw, reason)
    '{"timestamp": "2020-07-08 07:31:00", "page": "p01"': "malformed JSON",
    '{"timestamp": "2020-07-08 07:32:00", "page": "p01", "user": "  "}': "missing user",
    '{"timestamp": "yesterday", "page": "p01", "user": "u1"}': "unparseable timestamp yesterday",
}
# after the first run the watermark is 07:30 - 5 min: the 06:00 window has closed, this is late
LATE = '{"timestamp": "2020-07-08 06:05:00", "page": "p01", "user": "u1"}'
COLUMNS = ["window_start", "clicks", "users", "score", "threshold", "is_anomaly", "detectors"]

pytestmark = [pytest.mark.slow, pytest.mark.spark]


@pytest.fixture(scope="module")
def batch(generated_logs, generated_pipeline) -> tuple[Path, pd.DataFrame]:
    """07-07..07-08 materialized by Dagster (resampled, model, scores), and 06:00-09:00 of 07-08's events."""
    events = pd.concat(
        pd.read_json(path, lines=True, dtype=False, convert_dates=False)
        if path.suffix == ".jsonl"
        else pd.read_csv(path, dtype=str, keep_default_na=False)
        for path in generated_logs.files
    )
    stamps = events["timestamp"].fillna("")
    events = events[(stamps >= FIRST) & (stamps < END)].sort_values("timestamp", kind="stable")
    return generated_pipeline[0], events.reset_index(drop=True)


@pytest.fixture(scope="module")
def streamed(spark, batch, tmp_path_factory) -> dict:
    """Three runs with --once over one checkpoint: a CSV file lands, then JSON lines with bad lines and a late event,
    then nothing new. Returns the stream_scores table after each run."""
    warehouse_root, events = batch
    root = tmp_path_factory.mktemp("spark_stream")
    shutil.copytree(warehouse_root, root / "warehouse")
    warehouse = Warehouse(root / "warehouse")
    landing = root / "landing"
    landing.mkdir()
    first, second = events[events["timestamp"] < SPLIT], events[events["timestamp"] >= SPLIT]
    tables, summaries = [], []

    def run() -> None:
        lines = landing_lines(spark, SOURCE, landing)
        summaries.append(run_spark_stream(spark, SOURCE, warehouse, lines, checkpoint_dir(warehouse, SOURCE)))
        tables.append(warehouse.query("SELECT * FROM clickstream.stream_scores ORDER BY window_start"))

    # as some editors write CSV: a byte order mark, and trailing delimiters on some lines
    rows = first.to_csv(index=False).splitlines()
    rows = [row + "," if number % 7 == 3 else row for number, row in enumerate(rows)]
    (landing / "clicks_a.csv").write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())
    run()
    good = second.to_json(orient="records", lines=True)
    (landing / "clicks_b.jsonl").write_text(good + "\n".join([*BAD_LINES, LATE]) + "\n")
    (landing / "other.jsonl").write_text(good)  # not the source's files: never read
    run()
    run()
    return {
        "batch": warehouse_root,
        "warehouse": warehouse,
        "tables": tables,
        "summaries": summaries,
        "events": events,
    }


def test_windows_count_what_batch_resampling_counts(streamed):
    table = streamed["tables"][-1]
    # 06:00 .. 08:40: the 08:50 window stays open, the watermark (5 min late) has not passed its end
    expected = pd.date_range(FIRST, f"{DAY} 08:40:00", freq="10min")
    assert table["window_start"].tolist() == expected.tolist()
    resampled = streamed["warehouse"].read_partitions("clickstream", "resampled", [pd.Timestamp(DAY).date()])
    resampled = resampled.set_index("bucket_start").loc[expected]
    assert table["clicks"].tolist() == resampled["clicks"].tolist()
    assert table["users"].tolist() == resampled["users"].tolist()
    assert table["clicks"].sum() == (streamed["events"]["timestamp"] < f"{DAY} 08:50:00").sum()


def test_every_window_is_scored_and_flagged_by_the_batch_model(streamed):
    table = streamed["tables"][-1]
    assert table["score"].notna().all() and (table["score"] > 0).all()
    model = streamed["warehouse"].read_partitions("clickstream", "model", [pd.Timestamp(DAY).date()])
    rcf = model.set_index("detector").loc["rcf"]
    assert (table["threshold"] == rcf["threshold"]).all()
    assert (table["is_anomaly"] == table["detectors"].str.contains("rcf")).all()
    explained = json.loads(table["attribution"].iloc[0])
    assert set(explained) <= set(rcf["features"].split(",")) and explained


def test_restarts_with_the_checkpoint_add_no_duplicates(streamed):
    first, second, third = streamed["tables"]
    assert first["window_start"].max() < second["window_start"].max()
    assert not second["window_start"].duplicated().any()
    pd.testing.assert_frame_equal(second, third)  # nothing new landed: nothing changed
    assert [s.windows for s in streamed["summaries"]] == [len(first), len(second) - len(first), 0]
    pd.testing.assert_frame_equal(first, second.iloc[: len(first)].reset_index(drop=True))


def test_same_answers_as_the_stream_command(streamed, tmp_path):
    """One uninterrupted ``stream`` over the same events scores the same windows identically."""
    shutil.copytree(streamed["batch"], tmp_path / "warehouse")
    streamed["events"].to_csv(tmp_path / "events.csv", index=False)
    out = str(tmp_path / "out.jsonl")
    runner = StreamRunner(
        SOURCE, FileTransport(tmp_path / "events.csv"), out, Warehouse(tmp_path / "warehouse")
    )
    assert runner.run() == 0
    reference = Warehouse(tmp_path / "warehouse").query("SELECT * FROM clickstream.stream_scores ORDER BY 1")
    spark_rows = streamed["tables"][-1]
    pd.testing.assert_frame_equal(
        spark_rows[COLUMNS], reference[COLUMNS].iloc[: len(spark_rows)], check_exact=False, rtol=1e-9
    )


def test_bad_lines_are_quarantined_with_reasons(streamed):
    quarantine = streamed["warehouse"].query("SELECT * FROM clickstream.stream_quarantine ORDER BY line")
    assert quarantine["reason"].tolist() == list(BAD_LINES.values())
    assert quarantine["raw"].tolist() == list(BAD_LINES)
    assert set(quarantine["input"].map(lambda path: Path(path).name)) == {"clicks_b.jsonl"}
    good_lines = (streamed["events"]["timestamp"] >= SPLIT).sum()
    assert quarantine["line"].tolist() == [good_lines + 1, good_lines + 2, good_lines + 3]
    assert [s.quarantined for s in streamed["summaries"]] == [0, 3, 0]


def test_a_late_event_is_dropped_and_counted(streamed):
    assert [s.late_dropped for s in streamed["summaries"]] == [0, 1, 0]
    first_window = streamed["tables"][-1].iloc[0]
    assert first_window["clicks"] == streamed["tables"][0].iloc[0]["clicks"]  # not counted after closing


def test_the_cli_runs_once_and_reports(spark, batch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="anomaly_dagster.spark_stream")
    warehouse_root, events = batch
    landing = tmp_path / "landing"
    landing.mkdir()
    events[events["timestamp"] < f"{DAY} 06:30:00"].to_csv(landing / "clicks_c.csv", index=False)
    shutil.copytree(warehouse_root, tmp_path / "warehouse")
    paths = ["--landing", str(landing), "--warehouse", str(tmp_path / "warehouse")]
    code = cli.main(
        ["spark-stream", "--source", "clickstream", *paths, "--checkpoint", str(tmp_path / "ck"), "--once"]
    )
    assert code == 0
    assert "done: 2 window(s) scored, 0 line(s) quarantined, 0 late event(s) dropped" in caplog.text
    rows = Warehouse(tmp_path / "warehouse").query(
        "SELECT window_start FROM clickstream.stream_scores ORDER BY 1"
    )
    assert rows["window_start"].tolist() == [pd.Timestamp(FIRST), pd.Timestamp(f"{DAY} 06:10:00")]
    assert (tmp_path / "ck" / "windows" / "commits").is_dir()


def test_kafka_without_the_connector_names_the_package(spark):
    with pytest.raises(ConfigError, match="spark-sql-kafka"):
        kafka_lines(spark, "127.0.0.1:9", "clicks")


def test_an_entity_source_is_refused(caplog):
    assert cli.main(["spark-stream", "--source", "sensors", "--once"]) == 2
    assert "entity column" in caplog.text


def _parsed(spark, landing, table: str, source: SourceConfig = SOURCE):
    """Every line of the landing folder through ``parse_events``, as one availableNow run into memory."""
    from anomaly_dagster.spark_stream import parse_events

    query = (
        parse_events(source, landing_lines(spark, source, landing))
        .writeStream.format("memory")
        .queryName(table)
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    return spark.table(table)


def test_quarantine_names_the_landing_file_by_its_path(spark, tmp_path):
    """``input`` is the file's path as batch ingestion names it, not Spark's percent-encoded URI."""
    landing = tmp_path / "land ing+é"
    landing.mkdir()
    (landing / "clicks_x.csv").write_text("timestamp,page,user,session_id\n2020-07-08 06:00:00,p1,,s\n")
    (row,) = _parsed(spark, landing, "stream_paths").select("source_file", "reason").collect()
    assert (row.source_file, row.reason) == (str((landing / "clicks_x.csv").resolve()), "missing user")


def test_lines_batch_ingestion_rejects_are_rejected_alike(spark, tmp_path):
    """A quote closed in mid-field, a JSON boolean/object/array for a text column and a zone
    abbreviation get batch ingestion's reasons; the stream counted the first two as events."""
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks_q.csv").write_text(
        'timestamp,page,user,session_id\n2020-07-08 06:00:00,p1,"u9"x,s\n2020-07-08 06:01:00 EST,p1,u2,s\n'
    )
    (landing / "clicks_q.jsonl").write_text(
        '{"timestamp": "2020-07-08 06:02:00", "page": "p1", "user": true}\n'
        '{"timestamp": "2020-07-08 06:03:00", "page": {"a": 1}, "user": "u3"}\n'
        '{"timestamp": "2020-07-08 06:04:00", "page": "p1", "user": ["x"]}\n'
    )
    reasons = _parsed(spark, landing, "stream_rejects").toPandas()["reason"].fillna("accepted as an event")
    assert sorted(reasons) == [
        "UNQUOTED VALUE: Value with unterminated quote found.",
        "ambiguous time zone abbreviation in timestamp 2020-07-08 06:01:00 EST",
        "wrong JSON type in page: object (expected a string)",
        "wrong JSON type in user: array (expected a string)",
        "wrong JSON type in user: boolean (expected a string)",
    ]


def test_columns_named_like_the_parsers_own_are_read(spark, tmp_path):
    """A log with columns text, early and utc (a message, a flag, a zone): the parser's own columns of
    those names made every line fail with AMBIGUOUS_REFERENCE."""
    source = SOURCE.model_copy(
        update={
            "columns": [
                *SOURCE.columns,
                *(ColumnConfig(name=name, required=False) for name in ("text", "early", "utc")),
            ]
        }
    )
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks_x.csv").write_text(
        "timestamp,page,user,session_id,text,early,utc\n2020-07-08 06:00:00,p1,u1,s,hello,no,+02\n"
    )
    (row,) = _parsed(spark, landing, "stream_own_names", source).collect()
    assert (row.user, row.text, row.early, row.utc, row.reason) == ("u1", "hello", "no", "+02", None)
