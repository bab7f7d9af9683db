"""Streaming detection: the same answers as batch, late and bad input, crashes, signals and transports."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest

from anomaly_dagster import cli, ingest, streaming
from anomaly_dagster.config import (
    ConfigError,
    DerivedConfig,
    DetectorConfig,
    EnsembleConfig,
    MetricConfig,
    SourceConfig,
    load_sources,
)
from anomaly_dagster.definitions import build_definitions
from anomaly_dagster.pipeline import resample_sql
from anomaly_dagster.streaming import (
    EventParser,
    FileTransport,
    JsonLinesOutput,
    KafkaTransport,
    StreamingConfig,
    StreamRunner,
    register_cli,
    run_stream_command,
)
from anomaly_dagster.warehouse import Warehouse

SOURCE = load_sources()["clickstream"]
STREAM = [str(Path(sys.executable).parent / "anomaly-dagster"), "stream", "--source", "clickstream"]
START = datetime(2020, 7, 15)


def event(at: datetime | str, user: str = "u1", page: str = "p1") -> str:
    stamp = at if isinstance(at, str) else at.strftime("%Y-%m-%d %H:%M:%S")
    return json.dumps({"timestamp": stamp, "page": page, "user": user})


def traffic(windows: int, per_window: int = 12, seed: int = 3) -> list[str]:
    """Sorted events: ``per_window`` events per 10 minutes from ``START``, a few users repeating."""
    rng = np.random.default_rng(seed)
    seconds = np.sort(rng.integers(0, windows * 600, windows * per_window))
    return [
        event(START + timedelta(seconds=int(second)), f" u{rng.integers(0, 40)} ", f"p{rng.integers(0, 5)}")
        for second in seconds
    ]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_file(
    tmp_path: Path,
    lines: list[str],
    config: StreamingConfig | None = None,
    state: Path | None = None,
    source: SourceConfig = SOURCE,
) -> tuple[list[dict], Warehouse]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    warehouse = Warehouse(tmp_path / "warehouse")
    out = tmp_path / "out.jsonl"
    runner = StreamRunner(
        source, FileTransport(path), str(out), warehouse, state, config or StreamingConfig()
    )
    assert runner.run() == 0
    return read_rows(out), warehouse


def metrics_of(rows: list[dict]) -> list[tuple]:
    return [(row["window_start"], row["pages"], row["users"], row["clicks"]) for row in rows]


def stream_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ANOMALY_WAREHOUSE_DIR": str(tmp_path / "warehouse")}


# --- parsing: batch ingestion's rules --------------------------------------------------------------

BASE = {"timestamp": "2020-07-15 10:00:00", "page": " p01 ", "user": " u1 ", "session_id": "s"}


def _json(**fields) -> str:
    return json.dumps({**BASE, **fields})


JSON_CASES = [
    _json(),
    _json(timestamp="2020-07-15T10:00:00+02:00"),
    _json(timestamp="2020-07-15 10:00:00 +0200"),
    _json(timestamp="2020-07-15T08:00:00Z"),
    _json(timestamp="  2020-07-15 10:00:02  "),
    _json(timestamp="2020-07-15 10:00:00.123"),
    _json(timestamp="2020-07-15"),
    _json(timestamp="2020-7-15 10:00:00"),
    _json(timestamp="2020-10-25 02:30:00"),  # ambiguous in Europe/Berlin
    _json(timestamp="2021-03-28 02:30:00"),  # does not exist in Europe/Berlin
    _json(timestamp="2020-07-15 10:00:00 Europe/Paris"),
    _json(timestamp="2020-07-15 10:00:00+19:00"),
    _json(timestamp="yesterday"),
    _json(timestamp="2020-13-01 00:00:00"),
    _json(timestamp="2020-07-32 00:00:00"),
    _json(timestamp="2020-07-15 24:00:00"),
    _json(timestamp="2020-07-15 23:59:60"),
    _json(timestamp="2019-01-01 00:00:00"),
    _json(timestamp="2099-01-01 00:00:00"),
    _json(timestamp="1594807200"),
    _json(timestamp="infinity"),
    _json(timestamp=None),
    _json(timestamp="   "),
    json.dumps({"page": "p", "user": "u"}),
    _json(user="   "),
    json.dumps({"timestamp": "2020-07-15 10:00:01", "page": "p", "user": "u"}),
    _json(page="p\u0001x"),
    _json(user="a\u007f"),
    _json(page="p\u0000"),
    _json(page="p\tq"),
    _json(page="pé"),
    _json(user="x" * 2000),
    '{"timestamp": "2020-07-15 10:00:00", "page": "p", "user": 123}',
    '{"timestamp": "2020-07-15 10:00:04", "page": "p", "user": true}',
    '{"timestamp": "2020-07-15 10:00:04", "page": "p", "user": null}',
    '{"timestamp": "2020-07-15 10:00:00", "page": {"a": 1}, "user": "u"}',
    '{"timestamp": 1e3, "page": -0, "user": 12.50}',
    '{"timestamp": NaN, "page": "p", "user": "u"}',
    '{"timestamp": "2020-07-15 10:00:00", "page": "a", "page": "b", "user": "u"}',
    '{"timestamp": "2020-07-15 10:00:00", "page": "p", "user": "u", "extra": [1, {"b": null}]}',
    '{"timestamp": "2020-07-15 10:00:04", "page": "p", "user": "u"}{"a": 1}',
    '  {"timestamp": "2020-07-15 10:00:03", "page": "p", "user": "u"}   ',
    '{"timestamp": ',
    "not json",
    "[1, 2]",
    "{}",
    "",
    "   ",
]


def _batch(source: SourceConfig, path: Path) -> tuple[dict[int, tuple], set[int]]:
    connection = duckdb.connect()
    _, rejects = ingest.load_file(connection, source, path)
    typed = connection.execute('SELECT line, epoch_us(timestamp) AS ts, page, "user", reason FROM typed').df()
    good = typed[typed["reason"].isna()]
    events = {int(row.line): (int(row.ts), row.page, row.user) for row in good.itertuples()}
    bad = set(typed.loc[typed["reason"].notna(), "line"].astype(int)) | set(rejects["line"].astype(int))
    return events, bad


def _stream(source: SourceConfig, data: bytes, input_format: str) -> tuple[dict[int, tuple], dict[int, str]]:
    parsed = EventParser(source, "test", input_format).parse(data)
    pages, users = parsed.values["page"].to_pylist(), parsed.values["user"].to_pylist()
    events = {
        int(line) + 1: (int(ts), page, user)
        for line, ts, page, user in zip(parsed.line, parsed.ts, pages, users, strict=True)
    }
    return events, {index + 1: reason for index, reason, _ in parsed.bad}


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin"])
def test_json_lines_parse_as_batch_ingestion_does(tmp_path, timezone):
    source = SourceConfig.model_validate(
        {**SOURCE.model_dump(), "timestamp": {**SOURCE.timestamp.model_dump(), "timezone": timezone}}
    )
    data = (
        "\n".join(JSON_CASES).encode()
        + b'\n{"timestamp": "2020-07-15 10:00:05", "page": "p\xff", "user": "u"}\n'
    )
    path = tmp_path / "clicks.jsonl"
    path.write_bytes(data)
    batch_events, batch_bad = _batch(source, path)
    events, bad = _stream(source, data, "jsonl")
    assert events == batch_events
    assert set(bad) == batch_bad
    assert len(events) > 10 and len(bad) > 20
    connection = duckdb.connect()
    ingest.load_file(connection, source, path)
    reasons = dict(connection.execute("SELECT line, reason FROM typed WHERE reason IS NOT NULL").fetchall())
    assert {line: bad[line] for line in reasons} == reasons  # the same words, from the same SQL


@pytest.mark.parametrize("field", ["timestamp", "page"])
def test_a_json_line_that_is_not_utf8_among_clean_ones_is_quarantined_not_fatal(tmp_path, field):
    """pyarrow's JSON reader lets the bytes through; they used to crash every restart on the same line."""
    good = [
        f'{{"timestamp": "2020-07-15 10:00:{second:02d}", "page": "p", "user": "u{second}"}}'
        for second in range(6)
    ]
    bad = {"timestamp": b'{"timestamp": "2020-07-15 10:\xff00:09", "page": "p", "user": "u"}'}
    bad["page"] = b'{"timestamp": "2020-07-15 10:00:09", "page": "p\xff", "user": "u"}'
    data = (
        b"\n".join([*(line.encode() for line in good[:3]), bad[field], *(line.encode() for line in good[3:])])
        + b"\n"
    )
    path = tmp_path / "clicks.jsonl"
    path.write_bytes(data)
    batch_events, batch_bad = _batch(SOURCE, path)
    parser = EventParser(SOURCE, "test", "auto")
    parsed = parser.parse(data)
    assert [(index + 1, reason.split(":")[0]) for index, reason, _ in parsed.bad] == [(4, "not UTF-8")]
    assert len(parsed.ts) == 6 == len(batch_events) and batch_bad == {4}
    assert len(parser.parse(good[0].encode() + b"\n").ts) == 1  # and the stream goes on


def test_csv_lines_parse_as_batch_ingestion_does(tmp_path):
    rows = [
        "timestamp,page,user,session_id",
        "2020-07-15 10:00:00, p03 , u0000000001,2020-07-15 10:00:00 ; p03 ; u0000000001",
        '2020-07-15 10:00:01,"p,1","u ""q"" x",s',
        "2020-07-15 10:00:02,p,u",
        "2020-07-15 10:00:03,p,u,s,extra",
        '2020-07-15 10:00:04,"p,u,s',
        '2020-07-15 10:00:05,p"2,u,s',
        '2020-07-15 10:00:06,"ab"c,u,s',
        "",
        "2020-07-15T10:00:07+02:00,p,u,s",
        "garbage",
        "2020-07-15 10:00:08,p,   ,s",
        "2020-07-15 10:00:09,p,u,",
        "2020-07-15 10:00:10,p\x01,u,s",
        "2020-07-15 10:00:11,p\tq,u,s",
        "   ,p,u,s",
        "2020-07-15 10:00:12,p,u,s",
    ]
    data = ("\n".join(rows) + "\n").encode()
    path = tmp_path / "clicks.csv"
    path.write_bytes(data)
    batch_events, batch_bad = _batch(SOURCE, path)
    events, bad = _stream(SOURCE, data, "auto")
    assert events == batch_events and len(events) == 6
    assert set(bad) == batch_bad
    assert bad[6] == ingest.UNTERMINATED_QUOTE and bad[12] == "missing user"


def test_a_byte_order_mark_and_trailing_delimiters_read_as_batch_reads_them(tmp_path):
    """A BOM used to hide the header (rows then took the source's column order: page and user
    swapped); empty trailing fields are a trailing delimiter to DuckDB, not extra columns."""
    data = (
        b"\xef\xbb\xbftimestamp,user,page,session_id\n"
        b"2020-07-15 10:00:00,u1,p1,s\n"
        b"2020-07-15 10:00:01,u2,p2,s,\n"
        b"2020-07-15 10:00:02,u3,p3,s,,\n"
        b"2020-07-15 10:00:03,u4,p4,s,x\n"
        b"2020-07-15 10:00:04,u5,p5,s, \n"
    )
    path = tmp_path / "clicks.csv"
    path.write_bytes(data)
    batch_events, batch_bad = _batch(SOURCE, path)
    events, bad = _stream(SOURCE, data, "auto")
    assert events == batch_events and [page for _, page, _ in events.values()] == ["p1", "p2", "p3"]
    assert set(bad) == batch_bad == {5, 6}
    json_first = b'\xef\xbb\xbf{"timestamp": "2020-07-15 10:00:00", "page": "p", "user": "u"}\n'
    assert len(EventParser(SOURCE, "test").parse(json_first).ts) == 1


def test_csv_without_header_uses_the_source_column_order():
    parsed = EventParser(SOURCE, "test").parse(b"2020-07-15 10:00:00,p1, u1 ,s\n")
    assert parsed.values["user"].to_pylist() == ["u1"] and not parsed.bad


def test_a_csv_header_without_a_required_column_says_which():
    """Batch fails such a file naming the column; the stream quarantined the header and every line as
    "expected 4 fields, found 3", hiding why. A complete header later makes lines count again."""
    parser = EventParser(SOURCE, "test")
    parsed = parser.parse(b"timestamp,page,session_id\n2020-07-15 10:00:00,p1,s\n2020-07-15 10:00:05,p2,s\n")
    assert [reason for _, reason, _ in parsed.bad] == ["the CSV header lacks required column(s) ['user']"] * 3
    assert len(parsed.values["user"]) == 0
    parsed = parser.parse(b"timestamp,user,page\n2020-07-15 10:01:00,u1,p1\n")
    assert parsed.values["user"].to_pylist() == ["u1"] and not parsed.bad


# --- windows: batch resampling's aggregates --------------------------------------------------------


def orders_source(*metrics: dict) -> SourceConfig:
    """An order log (user, optional amount) counting orders and paid orders, plus ``metrics``."""
    return SourceConfig.model_validate(
        {
            "name": "orders",
            "start_date": "2020-07-01",
            "files": ["orders*.jsonl"],
            "columns": [{"name": "user"}, {"name": "amount", "type": "number", "required": False}],
            "metrics": [
                {"name": "orders", "agg": "count"},
                {"name": "paid", "agg": "count", "column": "amount"},  # its non-null values, as count(amount)
                *metrics,
            ],
            "detectors": [{"name": "z", "kind": "robust_zscore", "features": ["orders"]}],
        }
    )


def test_every_aggregation_equals_batch_resampling(tmp_path):
    source = orders_source(
        {"name": "buyers", "agg": "nunique", "column": "user"},
        {"name": "amounts", "agg": "nunique", "column": "amount"},
        {"name": "revenue", "agg": "sum", "column": "amount"},
        {"name": "mean_amount", "agg": "mean", "column": "amount"},
        {"name": "low", "agg": "min", "column": "amount"},
        {"name": "high", "agg": "max", "column": "amount"},
        {"name": "p95_amount", "agg": "p95", "column": "amount"},
    )
    rng = np.random.default_rng(5)
    stamps = START + pd.to_timedelta(np.sort(rng.integers(0, 3 * 3600, 800)), unit="s")
    amounts = np.where(rng.random(800) < 0.1, np.nan, rng.integers(1, 50, 800) / 4)
    amounts[(stamps >= START + timedelta(minutes=30)) & (stamps < START + timedelta(minutes=50))] = np.nan
    users = [f"u{value}" for value in rng.integers(0, 60, 800)]
    lines = [
        json.dumps(
            {"timestamp": str(stamp), "user": user, **({} if np.isnan(amount) else {"amount": amount})}
        )
        for stamp, user, amount in zip(stamps, users, amounts, strict=True)
    ]
    lines[100], lines[101] = lines[101], lines[100]  # out of order, within the lateness
    rows, _ = run_file(tmp_path, lines, source=source)
    events = pd.DataFrame({"timestamp": stamps.astype("datetime64[us]"), "user": users, "amount": amounts})
    events.to_parquet(tmp_path / "events.parquet")
    with duckdb.connect() as connection:
        batch = connection.execute(
            resample_sql(source, [str(tmp_path / "events.parquet")], [START.date()])
        ).df()
    batch = batch.set_index(batch["bucket_start"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert len(rows) == 18
    for row in rows:
        expected = batch.loc[row["window_start"]]
        for name in source.metric_names:
            if pd.isna(expected[name]):
                assert row[name] is None, (row["window_start"], name)
            else:
                assert row[name] == pytest.approx(float(expected[name]), rel=1e-12), (
                    row["window_start"],
                    name,
                )
    # a sum over no values is 0, as a count is (an outage is a drop to zero); a mean of nothing is missing
    assert any(row["revenue"] == 0 and row["mean_amount"] is None and row["orders"] > 0 for row in rows)
    empty = batch.loc["2020-07-15T05:00:00Z"]  # no events at all
    assert (empty["orders"], empty["revenue"]) == (0, 0) and pd.isna(empty["mean_amount"])


def test_late_and_out_of_order_events(tmp_path):
    at = [START + timedelta(minutes=minutes) for minutes in (0, 3, 1, 12, 8, 16, 9, 14, 40)]
    lines = [event(when, user=f"u{i}") for i, when in enumerate(at)]
    rows, warehouse = run_file(tmp_path, lines, StreamingConfig(allowed_lateness_minutes=5))
    windows = [(row["window_start"][11:16], row["users"], row["clicks"]) for row in rows]
    # 10:01 and 10:08 arrive out of order but within 5 minutes: counted; 10:09 arrives after the
    # watermark (10:16 - 5 min) passed 10:10: its window had closed, so it is quarantined
    assert windows == [("00:00", 4, 4), ("00:10", 3, 3), ("00:20", 0, 0), ("00:30", 0, 0), ("00:40", 1, 1)]
    quarantine = warehouse.read_partitions("clickstream", "stream_quarantine", [START.date()])
    assert quarantine[["line", "raw"]].values.tolist() == [[7, lines[6]]]
    assert quarantine["reason"].iloc[0].startswith("late event: its window 2020-07-15T00:00:00Z had closed")
    stored = warehouse.query("SELECT window_start, users FROM clickstream.stream_scores ORDER BY 1")
    assert stored["users"].tolist() == [4, 3, 0, 0, 1]


def test_cold_start_trains_on_the_first_windows_then_scores(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="anomaly_dagster.streaming")
    rows, _ = run_file(tmp_path, traffic(30, per_window=20), StreamingConfig(warmup_windows=12))
    assert len(rows) == 30
    assert all(row["score"] is None and not row["is_anomaly"] for row in rows[:12])
    assert all(row["score"] is not None and row["threshold"] > 0 for row in rows[12:])
    assert set(rows[20]["attribution"]) == {"users", "clicks", "clicks_per_user", "users_lag1", "clicks_lag1",
                                            "tod_sin", "tod_cos"}  # fmt: skip
    assert (
        "cold start: no clickstream model" in caplog.text
        and "trained on the stream's first 12" in caplog.text
    )


# --- robustness: bad input, signals, crashes -------------------------------------------------------


def test_malformed_events_are_quarantined_and_the_stream_goes_on(tmp_path):
    good = [event(START + timedelta(minutes=minutes), user=f"u{minutes}") for minutes in range(0, 30, 2)]
    bad = [
        b"not json {",
        b'{"timestamp": "nope", "page": "p", "user": "u"}',
        b'{"timestamp": "2020-07-15 00:05:00", "page": "p"',
        b"\xff\xfe\x00 binary garbage \x01\x02",
        b"[1, 2]",
        b"x" * 100_000,
        b'{"timestamp": "2020-07-15 00:05:00", "page": "p", "user": "u\\u0000"}',
    ]
    data = b""
    for index, line in enumerate(good):
        data += line.encode() + b"\n"
        if index < len(bad):
            data += bad[index] + b"\n"
    data += b"2020-07-15 00:29:00,p9,u99,s\n"  # a CSV line in the source's column order is an event too
    completed = subprocess.run(
        [*STREAM, "--input", "-", "--out", "-"],
        input=data,
        env=stream_env(tmp_path),
        capture_output=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    rows = [json.loads(line) for line in completed.stdout.decode().splitlines()]
    assert [row["clicks"] for row in rows] == [5, 5, 6]
    assert "7 quarantined" in completed.stderr.decode()
    quarantine = Warehouse(tmp_path / "warehouse").read_partitions(
        "clickstream", "stream_quarantine", [START.date()]
    )
    assert sorted(quarantine["line"]) == [2, 4, 6, 8, 10, 12, 14]
    reasons = set(quarantine["reason"])
    assert {"malformed JSON", "unparseable timestamp nope", "control characters in user"} <= reasons
    assert any(reason.startswith("not UTF-8") for reason in reasons)


def _wait_for_line(process: subprocess.Popen, timeout: float = 120) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.5)[0]:
            return process.stdout.readline()
    raise AssertionError("no output from the stream")


def test_sigterm_closes_the_open_windows_flushes_and_exits_0(tmp_path):
    process = subprocess.Popen(
        [*STREAM, "--input", "-", "--out", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=stream_env(tmp_path),
    )
    try:
        lines = [
            event(START),
            event(START + timedelta(minutes=4)),
            event(START + timedelta(minutes=21), "u2"),
        ]
        process.stdin.write(("\n".join(lines) + "\n").encode())
        process.stdin.flush()
        first = json.loads(_wait_for_line(process))  # the 00:00 window closed: the stream is running
        process.send_signal(signal.SIGTERM)
        rest, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr.decode()[-3000:]
    rows = [first, *(json.loads(line) for line in rest.decode().splitlines())]
    assert [(row["window_start"][11:16], row["clicks"]) for row in rows] == [
        ("00:00", 2),
        ("00:10", 0),
        ("00:20", 1),
    ]
    assert "stop requested" in stderr.decode()
    stored = Warehouse(tmp_path / "warehouse").query("SELECT count(*) AS n FROM clickstream.stream_scores")
    assert stored["n"].iloc[0] == 3


def test_sigkill_then_restart_with_the_state_counts_every_event_once(tmp_path):
    lines = traffic(40, per_window=25)
    lines[200:200] = [lines[199]]  # the same event twice in one window: both count, as in batch
    clean, _ = run_file(tmp_path / "clean", lines)
    state, out = tmp_path / "state.npz", tmp_path / "out.jsonl"
    command = [*STREAM, "--input", "-", "--out", str(out), "--state", str(state)]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, env=stream_env(tmp_path / "crash")
    )
    try:
        process.stdin.write(("\n".join(lines[:600]) + "\n").encode())
        process.stdin.flush()
        deadline = time.monotonic() + 180
        while not state.exists() and time.monotonic() < deadline:  # a checkpoint was taken
            time.sleep(0.2)
        assert state.exists()
        process.stdin.write(("\n".join(lines[600:700]) + "\n").encode())  # processed, then lost in the crash
        process.stdin.flush()
        time.sleep(1.0)
    finally:
        process.kill()  # SIGKILL: no cleanup at all
        process.wait()
    # the producer replays everything from the start; events the state already holds are skipped once
    completed = subprocess.run(
        command,
        input=("\n".join(lines) + "\n").encode(),
        env=stream_env(tmp_path / "crash"),
        capture_output=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    assert "resumed from" in completed.stderr.decode()
    assert metrics_of(read_rows(out)) == metrics_of(clean)
    stored = Warehouse(tmp_path / "crash" / "warehouse").query(
        "SELECT clicks FROM clickstream.stream_scores ORDER BY window_start"
    )
    assert stored["clicks"].tolist() == [row["clicks"] for row in clean]


def test_resuming_a_file_continues_at_its_offset_with_the_same_scores(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "READ_BYTES", 1024)
    config = StreamingConfig(warmup_windows=8)
    lines = traffic(30, per_window=20)
    clean, _ = run_file(tmp_path / "clean", lines, config)
    path, out, state = tmp_path / "events.jsonl", tmp_path / "out.jsonl", tmp_path / "state.npz"
    path.write_text("\n".join(lines) + "\n")

    def runner() -> StreamRunner:
        return StreamRunner(
            SOURCE, FileTransport(path), str(out), Warehouse(tmp_path / "warehouse"), state, config
        )

    crashed = runner()
    crashed.output = JsonLinesOutput(str(out))
    assert path.stat().st_size > 35 * 1024
    for _ in range(15):
        crashed.process(crashed.transport.read(0))
    crashed.checkpoint()
    for _ in range(10):  # processed and printed after the checkpoint, then the process dies
        crashed.process(crashed.transport.read(0))
    crashed.output.flush()
    assert len(read_rows(out)) > 0
    assert runner().run() == 0
    resumed = read_rows(out)
    assert [row["window_start"] for row in resumed] == [row["window_start"] for row in clean]
    assert resumed == clean  # aggregates and scores: the forest and its RNG resumed exactly


def test_a_file_replaced_under_the_same_name_is_read_from_its_start(tmp_path, caplog):
    """Log rotation: the state's byte offset used to be applied to the new file, skipping its first
    events silently."""
    path, state, warehouse = (
        tmp_path / "clicks.jsonl",
        tmp_path / "state.npz",
        Warehouse(tmp_path / "warehouse"),
    )
    path.write_text("\n".join(traffic(10)) + "\n")
    StreamRunner(
        SOURCE, FileTransport(path), str(tmp_path / "a.jsonl"), warehouse, state, StreamingConfig()
    ).run()
    later = [event(START + timedelta(hours=3, minutes=minute), f"u{minute}") for minute in range(60)]
    path.write_text("\n".join(later) + "\n")
    with caplog.at_level(logging.WARNING):
        runner = StreamRunner(
            SOURCE, FileTransport(path), str(tmp_path / "b.jsonl"), warehouse, state, StreamingConfig()
        )
        assert runner.run() == 0
    assert "is not the file the state was saved for" in caplog.text
    rows = read_rows(tmp_path / "b.jsonl")
    assert sum(row["clicks"] for row in rows if row["window_start"] >= "2020-07-15T03:00:00Z") == 60


def test_the_next_days_file_with_the_same_state_is_a_new_input(tmp_path):
    """Another file resumed as a replay of the first: its events up to the last one seen were dropped as
    replayed (a late one neither counted nor quarantined), and its line numbers went on from the first."""
    warehouse, state = Warehouse(tmp_path / "warehouse"), tmp_path / "state.npz"
    first, second = tmp_path / "clicks_15.jsonl", tmp_path / "clicks_16.jsonl"
    first.write_text(
        "\n".join(event(f"2020-07-15 23:{minute}:00", f"u{minute}") for minute in (40, 45, 55)) + "\n"
    )
    second.write_text(
        "\n".join(
            [
                event("2020-07-15 23:52:00", "late"),
                event("2020-07-16 00:01:00"),
                "not an event",
                event("2020-07-16 00:02:00"),
            ]
        )
        + "\n"
    )
    for path in (first, second):
        runner = StreamRunner(
            SOURCE,
            FileTransport(path),
            str(tmp_path / f"{path.stem}.out"),
            warehouse,
            state,
            StreamingConfig(),
        )
        assert runner.run() == 0
    quarantined = warehouse.read_partitions(
        "clickstream", "stream_quarantine", [date(2020, 7, 15), date(2020, 7, 16)]
    )
    assert [
        (Path(name).name, line) for name, line in quarantined[["input", "line"]].itertuples(index=False)
    ] == [
        ("clicks_16.jsonl", 1),
        ("clicks_16.jsonl", 3),
    ]
    assert runner.counts["replayed"] == 0 and runner.counts["late"] == 1


@pytest.mark.parametrize("shingle", [3, 4])
def test_a_shingled_forest_that_votes_but_does_not_lead_scores_alike_in_any_chunking(
    tmp_path, monkeypatch, shingle
):
    """Scored without the windows before each batch, a shingled forest scored 0 whenever few windows
    closed at once (a live stream: always), so it never voted, and a file's answers hung on the chunk
    size. A window with a gap (no users: a missing ratio) is skipped in the history, not a crash."""
    document = SOURCE.model_dump()
    for detector in document["detectors"]:
        if detector["name"] == "rcf":
            detector["params"] = {**detector["params"], "shingle_size": shingle, "num_trees": 30}
            detector["features"] = [*detector["features"], "per_user"]
    document["derived"] = [*document["derived"], {"name": "per_user", "expression": "clicks / users"}]
    document["ensemble"] = {"detectors": ["zscore", "rcf"], "min_votes": 1}  # zscore leads, rcf votes
    source = SourceConfig.model_validate(document)
    silent = (START + timedelta(minutes=400)).strftime(
        "%Y-%m-%d %H:4"
    )  # 06:40-06:50: no events, per_user NaN
    lines = [line for line in traffic(72, per_window=30) if silent not in line]
    answers = []
    for chunk in (1 << 22, 900):  # all at once; about a window per read
        monkeypatch.setattr(streaming, "READ_BYTES", chunk)
        rows, _ = run_file(tmp_path / str(chunk), lines, StreamingConfig(warmup_windows=24), source=source)
        answers.append([(row["window_start"], row["is_anomaly"], row["detectors"]) for row in rows])
    assert answers[0] == answers[1]
    assert any("rcf" in detectors for _, _, detectors in answers[1])


# --- transports ------------------------------------------------------------------------------------


def test_tcp_input_reads_from_a_local_producer(tmp_path):
    lines = traffic(5)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def produce() -> None:
        connection, _ = server.accept()
        with connection:
            for line in lines:
                connection.sendall(line.encode() + b"\n")
        server.close()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    out = tmp_path / "out.jsonl"
    completed = subprocess.run(
        [*STREAM, "--input", f"tcp://127.0.0.1:{port}", "--out", str(out)],
        env=stream_env(tmp_path),
        capture_output=True,
        timeout=300,
    )
    thread.join(timeout=10)
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    assert metrics_of(read_rows(out)) == metrics_of(run_file(tmp_path / "file", lines)[0])


class FakeError:
    def fatal(self) -> bool:
        return False

    def __str__(self) -> str:
        return "broker transport failure"


class FakeMessage:
    def __init__(
        self, partition: int, offset: int, value: bytes | None, error: FakeError | None = None
    ) -> None:
        self._partition, self._offset, self._value, self._error = partition, offset, value, error

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> FakeError | None:
        return self._error


class FakeConsumer:
    """confluent-kafka's consume/commit/close, replaying a fixed log; asks the runner to stop at its end."""

    def __init__(self, messages: list[FakeMessage]) -> None:
        self.messages = messages
        self.commits = 0
        self.closed = False
        self.on_end = lambda: None

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        batch, self.messages = self.messages[:num_messages], self.messages[num_messages:]
        if not batch:
            self.on_end()
        return batch

    def commit(self, asynchronous: bool = True) -> None:
        assert asynchronous is False
        self.commits += 1

    def close(self) -> None:
        self.closed = True


def _kafka_log(lines: list[str]) -> list[FakeMessage]:
    """Events spread over two partitions, with a transport error in between."""
    messages, offsets = [], [0, 0]
    for index, line in enumerate(lines):
        partition = index % 2
        messages.append(FakeMessage(partition, offsets[partition], line.encode()))
        offsets[partition] += 1
    messages.insert(5, FakeMessage(0, -1, None, FakeError()))
    return messages


def _run_kafka(tmp_path: Path, messages: list[FakeMessage], state: Path) -> tuple[StreamRunner, FakeConsumer]:
    consumer = FakeConsumer(messages)
    runner = StreamRunner(
        SOURCE,
        KafkaTransport(consumer, "clicks"),
        str(tmp_path / "out.jsonl"),
        Warehouse(tmp_path / "wh"),
        state,
    )
    consumer.on_end = runner.request_stop
    assert runner.run() == 0
    return runner, consumer


def test_kafka_transport_with_a_fake_consumer_resumes_at_its_offsets(tmp_path):
    lines = traffic(6)
    minutes = [json.loads(line)["timestamp"][:15] for line in lines]
    split = next(i for i in range(30, len(lines)) if minutes[i] != minutes[i - 1])  # a stop closes windows
    state = tmp_path / "state.npz"
    first, consumer = _run_kafka(tmp_path, _kafka_log(lines[:split]), state)
    assert consumer.commits >= 1 and consumer.closed
    assert first.transport.position() == {"0": (split + 1) // 2, "1": split // 2}
    # the group's committed offsets may lag the state: the whole log comes again, the old part is skipped
    second, _ = _run_kafka(tmp_path, _kafka_log(lines), state)
    assert second.counts["events"] == len(lines) and second.counts["late"] == 0
    stored = Warehouse(tmp_path / "wh").query("SELECT sum(clicks) AS n FROM clickstream.stream_scores")
    assert stored["n"].iloc[0] == len(lines)


def test_kafka_without_the_client_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    with pytest.raises(ValueError, match=r"anomaly-dagster\[kafka\]"):
        streaming.kafka_transport("127.0.0.1:9092", "clicks", "group")


def test_register_cli_adds_the_stream_command():
    parser = argparse.ArgumentParser(prog="anomaly-dagster")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["stream", "--source", "clickstream", "--input", "tcp://127.0.0.1:9", "--state", "s"]
    )
    assert args.handler is run_stream_command and args.out == "-" and args.format == "auto"


# --- acceptance: the reference day against the batch pipeline --------------------------------------


@pytest.mark.slow
def test_reference_day_streams_to_the_batch_answers(reference_dir, tmp_path):
    landing, warehouse_root = tmp_path / "landing", tmp_path / "warehouse"
    landing.mkdir()
    (landing / "clicks.csv.gz").symlink_to(reference_dir / "clicks.csv.gz")
    definitions = build_definitions(load_sources(), str(landing), str(warehouse_root))
    result = definitions.resolve_job_def("clickstream_pipeline").execute_in_process(
        tags={
            "dagster/asset_partition_range_start": "2020-07-07",
            "dagster/asset_partition_range_end": "2020-07-15",
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    raw = pd.read_csv(reference_dir / "clicks.csv.gz", dtype=str, keep_default_na=False)
    day = raw[raw["timestamp"].str.startswith("2020-07-15")].sort_values("timestamp", kind="stable")
    replay = "".join(json.dumps(record) + "\n" for record in day.to_dict(orient="records"))
    completed = subprocess.run(
        [*STREAM, "--input", "-", "--out", "-"],
        input=replay.encode(),
        env={**os.environ, "ANOMALY_WAREHOUSE_DIR": str(warehouse_root)},
        capture_output=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    assert "warm start from model 2020-07-15" in completed.stderr.decode()
    rows = pd.DataFrame([json.loads(line) for line in completed.stdout.decode().splitlines()])
    reference = pd.read_csv(reference_dir / "clicks_10T.csv", parse_dates=["timestamp"])
    reference = reference[reference["timestamp"].dt.date == date(2020, 7, 15)]
    assert len(rows) == 144
    assert rows["window_start"].tolist() == reference["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ").tolist()
    np.testing.assert_array_equal(rows["users"], reference["user"])
    np.testing.assert_array_equal(rows["clicks"], reference["click"])
    assert rows["score"].notna().all()
    # each window is explained by the stronger of the two voters, over that voter's features
    voters = {d.name: sorted(d.features) for d in load_sources()["clickstream"].detectors}
    assert rows["attribution"].map(lambda names: sorted(names) in (voters["rcf"], voters["zscore"])).all()
    # which voter that is, and its score on the ensemble's scale: a flag is never under its threshold
    # (score and threshold are RCF's, and a flag the z-score raised showed an RCF score below RCF's threshold)
    assert [sorted(row.attribution) for row in rows.itertuples()] == [
        voters[name] for name in rows["explained_by"]
    ]
    assert (rows.loc[rows["is_anomaly"], "ensemble_score"] > 1).all()
    assert (
        (rows["ensemble_score"] > 1)
        == rows["detectors"].map(lambda fired: bool({"rcf", "zscore"} & set(fired)))
    ).all()
    assert rows["is_anomaly"].map(type).eq(bool).all()

    warehouse = Warehouse(warehouse_root)
    scores = warehouse.read_partitions("clickstream", "scores", [date(2020, 7, 15)])
    batch = scores[scores["detector"] == "ensemble"].sort_values("bucket_start")
    agreement = (batch["is_anomaly"].to_numpy() == rows["is_anomaly"].to_numpy()).mean()
    assert agreement >= 0.95, agreement
    assert batch["is_anomaly"].sum() > 0 and rows["is_anomaly"].sum() > 0
    rcf = scores[scores["detector"] == "rcf"].sort_values("bucket_start")
    assert rows["score"].iloc[0] == pytest.approx(rcf["score"].iloc[0], rel=1e-12)  # same forest, same point
    features = warehouse.read_partitions("clickstream", "features", [date(2020, 7, 15)])
    np.testing.assert_allclose(rows["clicks_per_user"], features["clicks_per_user"], rtol=1e-12)
    stored = warehouse.query(
        "SELECT count(*) AS n, sum(is_anomaly::INT) AS flagged FROM clickstream.stream_scores"
    )
    assert stored["n"].iloc[0] == 144 and stored["flagged"].iloc[0] == rows["is_anomaly"].sum()


def test_an_entity_source_is_refused_rather_than_merged(tmp_path, caplog):
    events = tmp_path / "sensors.jsonl"
    events.write_text(
        '{"timestamp": "2024-03-01 00:00:00", "sensor_id": "s01", "temperature": 20, "pressure": 1000}\n'
    )
    args = ["stream", "--source", "sensors", "--input", str(events), "--warehouse", str(tmp_path / "wh")]
    assert cli.main(args) == 2
    assert "entity column (sensor_id)" in caplog.text
    assert not (tmp_path / "wh").exists()  # nothing scored, nothing written


def _read_all(transport: FileTransport) -> bytes:
    chunks = []
    while (chunk := transport.read(0.0)) is not None:
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_last_line_still_being_written_is_held_back_until_it_is_whole(tmp_path, caplog):
    """The producer is writing line 2 when the stream reaches the end: the next run reads it whole."""
    path = tmp_path / "clicks.csv"
    path.write_bytes(b"timestamp,page,user,session_id\n2020-07-15 10:00:00,p,u1,s\n2020-07-15 10:01:00,p,u")
    first = FileTransport(path)
    with caplog.at_level(logging.WARNING, logger="anomaly_dagster.streaming"):
        assert _read_all(first) == b"timestamp,page,user,session_id\n2020-07-15 10:00:00,p,u1,s\n"
    assert "the last line has no line end yet (23 bytes): held back" in caplog.text
    with path.open("ab") as handle:
        handle.write(b"2,s\n")
    resumed = FileTransport(path)
    resumed.seek(first.position())
    assert _read_all(resumed) == b"2020-07-15 10:01:00,p,u2,s\n"


def test_a_held_back_line_still_counts_in_its_window_on_the_next_run(tmp_path):
    """The end of input closed every window, so the held-back line, read whole by the next run, fell in
    a closed window and was quarantined as late: 10:10 had 1 click where batch has 2."""
    path, out, state = tmp_path / "events.jsonl", tmp_path / "out.jsonl", tmp_path / "state.npz"
    warehouse = Warehouse(tmp_path / "warehouse")
    lines = [event(f"2020-07-15 10:{minute:02d}:00", f"u{minute}") for minute in (0, 5, 12, 13)]
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3])  # the writer is mid-line
    for _ in range(2):
        assert (
            StreamRunner(SOURCE, FileTransport(path), str(out), warehouse, state, StreamingConfig()).run()
            == 0
        )
        with open(path, "a") as handle:
            handle.write("\n")  # ... and finishes it
    assert [(row["window_start"], row["clicks"]) for row in read_rows(out)] == [
        ("2020-07-15T10:00:00Z", 2),
        ("2020-07-15T10:10:00Z", 2),
    ]
    assert warehouse.read_partitions("clickstream", "stream_quarantine", [date(2020, 7, 15)]).empty


def test_a_gzip_files_last_line_without_a_line_end_is_read(tmp_path):
    path = tmp_path / "clicks.csv.gz"
    path.write_bytes(gzip.compress(b"timestamp,page,user,session_id\n2020-07-15 10:01:00,p,u2,s"))
    assert _read_all(FileTransport(path)).endswith(b"2020-07-15 10:01:00,p,u2,s\n")


def test_an_open_windows_column_counts_survive_a_checkpoint():
    source = orders_source()
    lines = [
        json.dumps(
            {
                "timestamp": f"2020-07-15 10:0{minute}:00",
                "user": "u",
                **({"amount": 2.5} if minute % 3 else {}),
            }
        )
        for minute in range(7)
    ]
    parsed = EventParser(source, "test").parse(("\n".join(lines) + "\n").encode())
    store = streaming.WindowStore(source, 5)
    store.add(parsed, np.ones(len(parsed.ts), dtype=bool))
    restored = streaming.WindowStore(source, 5)
    restored.restore(*store.state())
    assert [window.metrics for window in restored.close_all()] == [{"orders": 7, "paid": 4}]


def test_a_derived_division_by_zero_is_missing_as_in_batch(tmp_path):
    """clicks / sessions in a window without session ids: the stream kept inf, which a z-score turned into
    a score of 1.8e308 and a flag; batch makes it missing and scores 0."""
    source = SOURCE.model_copy(
        update={
            "metrics": [
                MetricConfig(name="clicks", agg="count"),
                MetricConfig(name="sessions", agg="nunique", column="session_id"),
            ],
            "derived": [DerivedConfig(name="per_session", expression="clicks / sessions")],
            "lags": [1],
            "detectors": [
                DetectorConfig(
                    name="z",
                    kind="robust_zscore",
                    features=["per_session"],
                    params={"time_of_day_window": None},
                )
            ],
            "ensemble": EnsembleConfig(detectors=["z"], min_votes=1),
        }
    )
    lines = []
    for minute in range(180):
        stamp = (START + timedelta(minutes=minute)).strftime("%Y-%m-%d %H:%M:%S")
        silent = 120 <= minute < 130  # 02:00-02:10: clicks without session ids
        lines += [
            json.dumps(
                {
                    "timestamp": stamp,
                    "page": "p",
                    "user": "u",
                    **({} if silent else {"session_id": f"s{minute % 3}"}),
                }
            )
        ]
    rows, _ = run_file(tmp_path, lines, StreamingConfig(warmup_windows=6), source=source)
    window = next(row for row in rows if row["window_start"] == "2020-07-15T02:00:00Z")
    assert window["per_session"] is None and window["score"] == 0.0 and not window["is_anomaly"]


def test_a_value_beyond_float32_is_a_gap_for_the_forest_not_a_crash(tmp_path):
    """An amount of 1e42 (a valid float64) made the forest raise on every run at the same window."""
    source = orders_source({"name": "revenue", "agg": "sum", "column": "amount"}).model_copy(
        update={
            "detectors": [
                DetectorConfig(
                    name="rcf",
                    kind="rcf",
                    features=["orders", "revenue"],
                    params={"num_trees": 10, "sample_size": 32},
                )
            ],
            "ensemble": EnsembleConfig(),
        }
    )
    lines = [
        json.dumps(
            {
                "timestamp": (START + timedelta(minutes=m)).strftime("%Y-%m-%d %H:%M:%S"),
                "user": "u",
                "amount": 1e42 if m == 150 else 5.0,
            }
        )
        for m in range(180)
    ]
    rows, _ = run_file(tmp_path, lines, StreamingConfig(warmup_windows=6), source=source)
    assert len(rows) == 18
    window = next(row for row in rows if row["window_start"] == "2020-07-15T02:30:00Z")
    assert window["score"] == 0.0


def test_out_to_dev_null_keeps_only_the_warehouse_rows(tmp_path):
    """``--out /dev/null`` (rows wanted in the warehouse only) crashed at the first checkpoint: fsync
    of a character device is EINVAL, and no window reached the warehouse; resuming it tried to cut it."""
    lines = traffic(6, per_window=20)
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    warehouse = Warehouse(tmp_path / "warehouse")
    state = tmp_path / "state.npz"
    runner = StreamRunner(SOURCE, FileTransport(path), os.devnull, warehouse, state, StreamingConfig())
    assert runner.run() == 0
    stored = warehouse.query("SELECT clicks FROM clickstream.stream_scores ORDER BY window_start")
    to_file, _ = run_file(tmp_path / "to_file", lines)
    assert stored["clicks"].tolist() == [row["clicks"] for row in to_file] and len(to_file) == 6
    resumed = JsonLinesOutput(os.devnull, offset=1234)  # a checkpoint's offset: nothing to cut back to
    resumed.write([{"window_start": 0, "clicks": 1}])
    resumed.close()
    assert resumed.offset is None  # and none saved in the next checkpoint, as for stdout


def test_an_infinite_ensemble_score_is_strict_json(tmp_path):
    """A voter with threshold 0 (fixed: 0, "anything outside the band") has an infinite normalized score
    when it fires, and the line held a bare Infinity that strict JSON readers refuse."""
    out = tmp_path / "out.jsonl"
    output = JsonLinesOutput(str(out))
    output.write([{"window_start": 0, "clicks": 3, "is_anomaly": True, "ensemble_score": float("inf")}])
    output.write([{"window_start": 600_000_000, "clicks": 3, "is_anomaly": False, "ensemble_score": 0.5}])
    output.close()
    rows = [
        json.loads(line, parse_constant=lambda name: pytest.fail(name))
        for line in out.read_text().splitlines()
    ]
    assert [row["ensemble_score"] for row in rows] == [None, 0.5]


def test_a_model_of_other_detectors_is_not_warm_started_from(tmp_path, caplog):
    """Batch refuses to score with a model trained for other detectors than configured (a voter missing
    from it never votes); the stream warm-started from it regardless. It now cold-starts and says why."""
    from anomaly_dagster.generate import generate_clickstream
    from anomaly_dagster.pipeline import StageContext, run_window
    from anomaly_dagster.warehouse import RunInfo

    caplog.set_level(logging.INFO, logger="anomaly_dagster.streaming")
    two = SOURCE.model_copy(
        update={"detectors": [d for d in SOURCE.detectors if d.name in ("rcf", "zscore")]}
    )
    generate_clickstream(tmp_path / "landing", days=1, start=date(2020, 7, 14), seed=2)
    run_window(
        StageContext(two, Warehouse(tmp_path / "warehouse"), tmp_path / "landing", RunInfo("t", "0")),
        [date(2020, 7, 14)],
    )
    rows, _ = run_file(tmp_path, traffic(14, per_window=20), StreamingConfig(warmup_windows=12))
    assert "was trained for detectors ['rcf', 'zscore'] but clickstream now configures" in caplog.text
    assert "cold start" in caplog.text and "warm start" not in caplog.text
    assert all(row["score"] is None for row in rows[:12]) and rows[13]["score"] is not None
    caplog.clear()
    rows, _ = run_file(tmp_path, traffic(14, per_window=20), StreamingConfig(warmup_windows=12), source=two)
    assert "warm start from model 2020-07-14" in caplog.text and rows[0]["score"] is not None


def test_a_cold_start_that_cannot_train_the_lead_says_why(tmp_path):
    """RCF on a lag of a whole day cannot be trained on the stream's first windows (the lag has no value
    yet): a bare KeyError 'rcf' came out of the scorer."""
    rcf = SOURCE.detectors[0].model_copy(update={"features": ["users", "clicks", "clicks_lag144"]})
    source = SOURCE.model_copy(update={"lags": [1, 144], "detectors": [rcf, *SOURCE.detectors[1:]]})
    with pytest.raises(
        ValueError, match=r"cold start: the stream's first 12 windows cannot train 'rcf'.*finite"
    ):
        run_file(tmp_path, traffic(14, per_window=20), StreamingConfig(warmup_windows=12), source=source)


def test_a_state_saved_under_other_detectors_is_refused(tmp_path):
    """A restored scorer kept the detectors of its state: after the ensemble config changed it scored
    and voted by the old rules (batch refuses such a model), and said nothing."""
    lines = traffic(20, per_window=20)
    state = tmp_path / "state.npz"
    run_file(tmp_path, lines, StreamingConfig(warmup_windows=8), state=state)
    assert state.exists()
    three = SOURCE.model_copy(update={"detectors": SOURCE.detectors[:3]})
    with pytest.raises(
        ConfigError,
        match=r"state was saved for detectors \['iforest', 'iqr', 'rcf', 'zscore'\].*configures \['iqr', 'rcf', 'zscore'\]",
    ):
        run_file(tmp_path, lines, StreamingConfig(warmup_windows=8), state=state, source=three)
    run_file(tmp_path, lines, StreamingConfig(warmup_windows=8), state=state)  # the same config resumes
