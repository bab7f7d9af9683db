"""Streaming detection: score events as they arrive, warm-started from the batch model.

``anomaly-dagster stream --source NAME`` reads events (JSON lines or CSV lines) from a file, stdin,
a TCP socket or Kafka, keeps one open window per bucket by *event time*, and writes one JSON line per
closed window with the batch pipeline's answers: the source's metrics, derived columns, score,
threshold, flag, per-feature attribution and the detectors that fired. Rows are also upserted into
``<source>.stream_scores`` in the warehouse (one Parquet partition per day).

Same answers as batch, by construction:

- *Parsing* follows ingestion's rules. Clean lines take a vectorised path (pyarrow's JSON reader, a
  fixed-width timestamp parser, byte scans for control characters); every line that path cannot vouch
  for goes through ingestion's own SQL (``ingest._typed_sql``) in DuckDB, so reasons, offsets, time
  zones and trimming are batch's exactly.
- *Windows* aggregate exactly (``nunique`` keeps the distinct values, numeric aggregations keep the
  values) and empty windows are emitted as zeros, like ``resampled``.
- *Features* are the ``features`` stage's: derived columns, lags from the previous windows (the first
  window's lags read the warehouse's ``resampled`` tail, as batch reads the previous day), slot and
  time-of-day encodings.
- *Scores*: the ensemble's lead detector, when it is a Random Cut Forest, starts from the newest model
  partition on or before the first window's day, keeps that model's threshold, and keeps learning:
  each window is scored, explained, then inserted (``RandomCutForest.update``). Its time decay is the
  model's own if it has one, else ``1 / (training_days * buckets_per_day)``: the forest then remembers
  about as many windows as a batch model trains on. The other detectors score statelessly with the
  same model and vote as in ``modeling.score``. Without a model the stream cold-starts: it flags
  nothing for ``warmup_windows`` (default: a day), then trains every detector on them as the batch
  cold start does, and goes on streaming.

Lateness: the watermark is the largest event time seen minus ``allowed_lateness_minutes``; a window
closes when the watermark passes its end (event time only: in a quiet spell the last window waits for
the next event). An event whose window has closed is quarantined as late.
End of input, SIGINT and SIGTERM close every open window, flush, checkpoint and exit 0.

Quarantine: malformed and late events go to ``<source>.stream_quarantine`` in the warehouse (input,
line, event time if known, reason, raw text), in the same flushes as the scores; counts go to the
log (stderr). The stream never stops on bad input.

State and resume (``--state FILE``): every ``checkpoint_seconds`` (and at exit) the output is
flushed, pending warehouse rows are written, then the state is replaced atomically: open windows'
partial aggregates (distinct sets included), watermark, CSV header, input position (byte offset of a
file, Kafka offsets per partition), output size, and a hash of every raw line counted in an open
window. The scorer (forest, other detectors, lag history) lives in a sibling file written only when
it changed. Arrays and JSON, no pickle. On restart the ``--out`` file is cut back to its saved size and:

- a seekable input (file, Kafka) resumes at the saved position, and the windows closed after the
  checkpoint are recomputed identically (the forest's RNG state is saved): nothing is counted twice
  or lost;
- stdin and TCP cannot seek, so the producer is expected to replay: events of windows closed before
  the checkpoint are skipped as already processed until an event newer than the checkpoint arrives,
  and events of open windows whose raw line was already counted (a multiset of line hashes) are
  skipped once each, so legitimate identical events still count as often as they occur.

Warehouse rows are keyed by ``window_start``, so re-emitted windows replace themselves. ``--out -``
is at-least-once after a crash (a window may be printed again with the same values).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from anomaly_dagster import __version__, modeling
from anomaly_dagster.config import (
    ConfigError,
    SourceConfig,
    StreamingConfig,
    load_sources,
    warehouse_dir,
)
from anomaly_dagster.detectors import Detector, detector_class, load_detectors
from anomaly_dagster.detectors.rcf import RandomCutForest, RCFDetector, float32_finite, fold_attribution
from anomaly_dagster.features import add_derived, derived_values
from anomaly_dagster.incidents import json_number
from anomaly_dagster.ingest import (
    RAW_MAX_CHARS,
    TEXT_COLUMN,
    UNTERMINATED_QUOTE,
    _strict_json_valid,
    _typed_sql,
)
from anomaly_dagster.pipeline import model_path
from anomaly_dagster.sql import quote_identifier, quote_literal
from anomaly_dagster.storage import atomic_write_bytes
from anomaly_dagster.warehouse import RunInfo, Warehouse, WrittenPartition

LOG = logging.getLogger("anomaly_dagster.streaming")
SCORES_ASSET = "stream_scores"
QUARANTINE_ASSET = "stream_quarantine"
STATE_FORMAT = 1
# bytes of a file's head whose digest identifies it in a saved position
HEAD_BYTES = 4096
READ_BYTES = 1 << 22  # per read: large chunks amortise the per-call cost of scoring
MAX_LINE_BYTES = 1 << 24  # a "line" this long without a newline is cut and quarantined
POLL_SECONDS = 0.2
US_PER_MINUTE = 60_000_000
US_PER_DAY = 1440 * US_PER_MINUTE
_EPOCH = datetime(1970, 1, 1)
_NEWLINE, _CR, _BRACE = 10, 13, ord("{")
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, as some editors start a file
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_NEVER = -(2**62)  # "no event yet" that survives subtracting a lateness


def _iso(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=int(us))).strftime("%Y-%m-%dT%H:%M:%SZ")


def _day(us: int) -> date:
    return (_EPOCH + timedelta(microseconds=int(us))).date()


def _day_us(day: date) -> int:
    return (day - _EPOCH.date()).days * US_PER_DAY


def _cap(text: str) -> str:
    if len(text) <= RAW_MAX_CHARS:
        return text
    return f"{text[:RAW_MAX_CHARS]}… [{len(text) - RAW_MAX_CHARS} more characters]"


def line_hash(line: bytes) -> int:
    """A stable 64-bit hash of a raw line (Python's ``hash`` changes between processes)."""
    return int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little")


# --- parsing ---------------------------------------------------------------------------------------


@dataclass
class ParsedChunk:
    """Events and quarantined lines of a chunk of complete lines, in arrival (line) order."""

    chunk: bytes
    starts: np.ndarray  # byte range of every line, without its line break
    stops: np.ndarray
    ts: np.ndarray  # int64 microseconds (UTC) of the valid events
    line: np.ndarray  # line index of each valid event
    values: dict[str, pa.Array | np.ndarray]  # typed values of the metric columns, per valid event
    bad: list[tuple[int, str, int | None]] = field(default_factory=list)  # (line, reason, event µs)

    @property
    def lines(self) -> int:
        return len(self.starts)

    def raw(self, index: int) -> bytes:
        return self.chunk[self.starts[index] : self.stops[index]]


@dataclass(frozen=True)
class _TimestampLayout:
    """A strptime format made only of fixed-width %Y %m %d %H %M %S and plain characters.

    A string matching it digit for digit parses the same in DuckDB, so it can skip DuckDB.
    """

    width: int
    fields: dict[str, tuple[int, int]]  # directive -> (offset, width)
    literals: tuple[tuple[int, int], ...]  # (offset, byte)

    @classmethod
    def of(cls, fmt: str) -> _TimestampLayout | None:
        widths = {"Y": 4, "m": 2, "d": 2, "H": 2, "M": 2, "S": 2}
        fields: dict[str, tuple[int, int]] = {}
        literals = []
        position = index = 0
        while index < len(fmt):
            if fmt[index] == "%":
                letter = fmt[index + 1 : index + 2]
                if letter not in widths or letter in fields:
                    return None
                fields[letter] = (position, widths[letter])
                position += widths[letter]
                index += 2
            else:
                if not fmt[index].isascii() or fmt[index].isdigit():
                    return None
                literals.append((position, ord(fmt[index])))
                position += 1
                index += 1
        return cls(position, fields, tuple(literals)) if len(fields) == len(widths) else None

    def parse(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(valid, local microseconds) for an (n, width) byte matrix."""
        digits = matrix.astype(np.int64) - 48
        valid = np.ones(len(matrix), dtype=bool)
        for offset, byte in self.literals:
            valid &= matrix[:, offset] == byte
        parts = {}
        for letter, (offset, width) in self.fields.items():
            block = digits[:, offset : offset + width]
            valid &= ((block >= 0) & (block <= 9)).all(axis=1)
            parts[letter] = block @ (10 ** np.arange(width - 1, -1, -1))
        year, month, day = parts["Y"], parts["m"], parts["d"]
        leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
        month_days = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month, 1, 12) - 1]
        month_days = month_days + ((month == 2) & leap)
        valid &= (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days)
        valid &= (parts["H"] < 24) & (parts["M"] < 60) & (parts["S"] < 60)
        # days from the civil date (H. Hinnant's algorithm), vectorised
        shifted = year - (month <= 2)
        era = shifted // 400
        year_of_era = shifted - era * 400
        day_of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
        day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
        days = era * 146097 + day_of_era - 719468
        seconds = ((days * 24 + parts["H"]) * 60 + parts["M"]) * 60 + parts["S"]
        return valid, seconds * 1_000_000


def _string_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n + 1) and data bytes of a string array."""
    _, offsets, data = array.buffers()
    starts = np.frombuffer(offsets, dtype=np.int32, count=len(array) + 1, offset=array.offset * 4)
    return starts.astype(np.int64), (np.frombuffer(data, dtype=np.uint8) if data else np.empty(0, np.uint8))


def _rows_with_control(array: pa.Array) -> np.ndarray:
    """Rows holding a C0 control character other than tab, DEL, or a C1 control (UTF-8 C2 80-C2 9F):
    ingestion's CONTROL_CHARACTERS."""
    offsets, data = _string_buffers(array)
    segment = data[offsets[0] : offsets[-1]]
    c1 = np.zeros(len(segment), dtype=bool)
    c1[:-1] = (segment[:-1] == 0xC2) & (segment[1:] >= 0x80) & (segment[1:] <= 0x9F)
    hits = np.flatnonzero(((segment < 32) & (segment != 9)) | (segment == 127) | c1)
    rows = np.zeros(len(array), dtype=bool)
    if len(hits):
        rows[np.searchsorted(offsets, hits + offsets[0], side="right") - 1] = True
    return rows


def _fixed_width(array: pa.Array, width: int) -> np.ndarray:
    """(n, width) bytes of a string array whose values all have ``width`` bytes."""
    offsets, data = _string_buffers(array)
    if len(array) and np.array_equal(offsets, offsets[0] + width * np.arange(len(array) + 1)):
        return data[offsets[0] : offsets[-1]].reshape(len(array), width)
    joined = b"".join(value.encode() for value in array.to_pylist())
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(array), width)


class EventParser:
    """Complete lines → typed UTC events and quarantined lines, by batch ingestion's rules.

    ``input_format`` ``auto`` reads a line starting with ``{`` as JSON and any other as CSV; a CSV line
    naming the timestamp and required columns is a header that sets the column order (otherwise the
    source's order: timestamp, then ``columns``). A line naming the timestamp column but not every
    required one is a header too, and it and the lines under it are quarantined with the columns it
    lacks (as batch ingestion fails such a file naming them), not as lines of the wrong width.
    """

    def __init__(self, source: SourceConfig, input_name: str, input_format: str = "auto") -> None:
        self.source = source
        self.input_name = input_name
        self.input_format = input_format
        self.names = [source.timestamp.column, *(column.name for column in source.columns)]
        self.required = {source.timestamp.column, *(c.name for c in source.columns if c.required)}
        self.metric_columns = sorted({m.column for m in source.metrics if m.column is not None})
        self.header: list[str] | None = None
        self._layout = _TimestampLayout.of(source.timestamp.format)
        self._start_us = _day_us(source.start_date)
        self._json_options = pa_json.ParseOptions(
            explicit_schema=pa.schema([(name, pa.string()) for name in self.names]),
            unexpected_field_behavior="ignore",
        )
        self._db: duckdb.DuckDBPyConnection | None = None
        self._parsed_any = False

    def parse(self, chunk: bytes) -> ParsedChunk:
        if not self._parsed_any and chunk.startswith(_BOM):  # as batch reads a file (utf-8-sig)
            chunk = b" " * len(_BOM) + chunk[len(_BOM) :]  # blanks keep every byte offset
        self._parsed_any = True
        buf = np.frombuffer(chunk, dtype=np.uint8)
        ends = np.flatnonzero(buf == _NEWLINE)
        starts = np.zeros(len(ends), dtype=np.int64)
        starts[1:] = ends[:-1] + 1
        stops = ends.copy()
        carriage = stops > starts
        carriage[carriage] = buf[stops[carriage] - 1] == _CR
        stops -= carriage
        parsed = ParsedChunk(chunk, starts, stops, np.empty(0, np.int64), np.empty(0, np.int64), {})
        # a raw control byte inside a line (a JSON string must escape it) goes to the exact path
        control = ((buf < 32) & (buf != 9) & (buf != _NEWLINE)) | (buf == 127)
        raw_control = np.zeros(len(ends), dtype=bool)
        if control.any():
            hits = np.flatnonzero(control)
            lines = np.searchsorted(ends, hits)
            inside = hits < stops[lines]
            raw_control[lines[inside]] = True
        first = buf[np.minimum(starts, len(buf) - 1)] if len(buf) else np.empty(0, np.uint8)
        simple_json = (first == _BRACE) & ~raw_control & (self.input_format != "csv")
        json_lines: list[int] = []
        csv_lines: list[int] = []
        exact_json: list[int] = []
        if simple_json.all():
            json_lines = list(range(len(ends)))
        else:
            for index in range(len(ends)):
                if simple_json[index]:
                    json_lines.append(index)
                    continue
                text = chunk[starts[index] : stops[index]].strip(b" \t\r")
                if not text:
                    continue  # blank lines are not events
                if self.input_format == "jsonl" or (self.input_format == "auto" and text[:1] == b"{"):
                    exact_json.append(index)
                else:
                    csv_lines.append(index)
        pieces: list[tuple[np.ndarray, dict[str, pa.Array]]] = []
        if json_lines:
            exact_json.extend(self._fast_json(chunk, starts, ends, np.array(json_lines), pieces))
        if csv_lines:
            self._csv(parsed, csv_lines, pieces)
        self._type(parsed, pieces, sorted(exact_json))
        return parsed

    # pyarrow reads clean JSON lines; halving isolates the lines it rejects for the exact path
    def _fast_json(
        self,
        chunk: bytes,
        starts: np.ndarray,
        ends: np.ndarray,
        lines: np.ndarray,
        pieces: list[tuple[np.ndarray, dict[str, pa.Array]]],
    ) -> list[int]:
        rejected: list[int] = []
        pending = [lines]
        while pending:
            part = pending.pop()
            if part[-1] - part[0] + 1 == len(part):
                data = pa.py_buffer(memoryview(chunk)[starts[part[0]] : ends[part[-1]] + 1])
            else:
                data = pa.py_buffer(b"".join(chunk[starts[i] : ends[i] + 1] for i in part))
            table = self._read_json(data, len(part))
            if table is not None:
                pieces.append((part, {name: table.column(name).combine_chunks() for name in self.names}))
            elif len(part) <= 32:
                rejected.extend(part.tolist())
            else:
                pending.extend([part[: len(part) // 2], part[len(part) // 2 :]])
        return rejected

    def _read_json(self, data: pa.Buffer, rows: int) -> pa.Table | None:
        try:
            table = pa_json.read_json(
                pa.BufferReader(data),
                read_options=pa_json.ReadOptions(use_threads=False, block_size=max(data.size, 1 << 16)),
                parse_options=self._json_options,
            )
            table.validate(full=True)  # pyarrow's reader lets bytes that are not UTF-8 through
        except (pa.ArrowException, ValueError):
            return None
        return table if table.num_rows == rows else None

    def _csv(
        self, parsed: ParsedChunk, lines: list[int], pieces: list[tuple[np.ndarray, dict[str, pa.Array]]]
    ) -> None:
        texts: dict[int, str] = {}
        for index in lines:
            try:
                text = parsed.raw(index).decode("utf-8")
            except UnicodeDecodeError as error:
                parsed.bad.append((index, f"not UTF-8: {error.reason} at byte {error.start}", None))
                continue
            if text.count('"') % 2:  # as ingestion: a quote that cannot close on its line
                parsed.bad.append((index, UNTERMINATED_QUOTE, None))
            else:
                texts[index] = text
        try:
            rows = list(csv.reader(texts.values(), strict=True))
        except csv.Error:
            rows = []
        if len(rows) != len(texts):  # a quote left open ran into the next line: read line by line
            rows = [self._csv_line(parsed, index, text) for index, text in texts.items()]
        kept: list[int] = []
        columns: dict[str, list[str | None]] = {name: [] for name in self.names}
        header = self.header or self.names
        position = {name: i for i, name in reversed(list(enumerate(header)))}
        for index, row in zip(texts, rows, strict=True):
            if row is None:
                continue
            names = [value.strip() for value in row]
            if self.required <= set(names) or self.source.timestamp.column in names:
                self.header = header = names
                position = {name: i for i, name in reversed(list(enumerate(header)))}
                if self.required <= set(names):
                    continue
            lacking = sorted(self.required - set(header))
            if lacking:
                parsed.bad.append((index, f"the CSV header lacks required column(s) {lacking}", None))
                continue
            if len(row) > len(header) and not any(row[len(header) :]):
                row = row[: len(header)]  # empty trailing fields (a trailing delimiter), as DuckDB reads them
            if len(row) != len(header):
                parsed.bad.append((index, f"expected {len(header)} fields, found {len(row)}", None))
                continue
            kept.append(index)
            for name in self.names:
                columns[name].append(row[position[name]] if name in position else None)
        if kept:
            pieces.append(
                (
                    np.array(kept),
                    {name: pa.array(values, type=pa.string()) for name, values in columns.items()},
                )
            )

    @staticmethod
    def _csv_line(parsed: ParsedChunk, index: int, text: str) -> list[str] | None:
        try:
            return next(csv.reader([text], strict=True))
        except csv.Error as error:
            reason = UNTERMINATED_QUOTE if "end of data" in str(error) else f"malformed CSV line: {error}"
            parsed.bad.append((index, reason, None))
            return None

    def _type(
        self, parsed: ParsedChunk, pieces: list[tuple[np.ndarray, dict[str, pa.Array]]], exact_json: list[int]
    ) -> None:
        """Vouch for clean rows in bulk; send the rest, with the exact JSON lines, through DuckDB."""
        lines = np.concatenate([piece[0] for piece in pieces]) if pieces else np.empty(0, np.int64)
        columns = {
            name: pa.concat_arrays([piece[1][name] for piece in pieces])
            if pieces
            else pa.array([], pa.string())
            for name in self.names
        }
        ok, ts, values = self._clean_rows(columns)
        slow_rows = np.flatnonzero(~ok)
        texts: list[str | None] = []
        slow_lines: list[int] = []
        for index in exact_json:
            try:
                texts.append(parsed.raw(index).decode("utf-8"))
                slow_lines.append(index)
            except UnicodeDecodeError as error:
                parsed.bad.append((index, f"not UTF-8: {error.reason} at byte {error.start}", None))
        event_lines = [lines[ok]]
        event_ts = [ts[ok]]
        event_values = {
            name: [
                values[name].filter(pa.array(ok)) if isinstance(values[name], pa.Array) else values[name][ok]
            ]
            for name in self.metric_columns
        }
        if len(slow_rows) or slow_lines:
            table = pa.table(
                {
                    "line": pa.array(np.concatenate([lines[slow_rows], slow_lines]).astype(np.int64)),
                    **{
                        name: pa.concat_arrays(
                            [columns[name].take(pa.array(slow_rows)), pa.nulls(len(slow_lines), pa.string())]
                        )
                        for name in self.names
                    },
                    TEXT_COLUMN: pa.array([None] * len(slow_rows) + texts, type=pa.string()),
                }
            )
            exact = self._exact(table)
            good = exact["reason"].isna().to_numpy()
            parsed.bad.extend(
                (int(line), str(reason), None if pd.isna(stamp) else int(stamp))
                for line, reason, stamp in exact.loc[~good, ["line", "reason", "ts"]].itertuples(index=False)
            )
            event_lines.append(exact["line"].to_numpy(dtype=np.int64)[good])
            event_ts.append(exact["ts"].to_numpy(dtype=np.int64, na_value=0)[good])
            for name in self.metric_columns:
                column = exact[name][good]
                number = next(c.type == "number" for c in self.source.columns if c.name == name)
                event_values[name].append(
                    column.to_numpy(dtype=np.float64, na_value=np.nan)
                    if number
                    else pa.array(column.tolist(), type=pa.string())
                )
        parsed.line = np.concatenate(event_lines)
        parsed.ts = np.concatenate(event_ts)
        parsed.values = {
            name: pa.concat_arrays(parts) if isinstance(parts[0], pa.Array) else np.concatenate(parts)
            for name, parts in event_values.items()
        }
        if len(event_lines) > 1 and len(parsed.line) > 1 and (np.diff(parsed.line) < 0).any():
            order = np.argsort(parsed.line, kind="stable")
            parsed.line, parsed.ts = parsed.line[order], parsed.ts[order]
            parsed.values = {
                name: value.take(pa.array(order)) if isinstance(value, pa.Array) else value[order]
                for name, value in parsed.values.items()
            }
        parsed.bad.sort()

    def _clean_rows(self, columns: dict[str, pa.Array]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Which rows DuckDB would surely accept, their UTC microseconds and metric column values."""
        source = self.source
        size = len(columns[source.timestamp.column])
        ok = np.zeros(size, dtype=bool)
        ts = np.zeros(size, dtype=np.int64)
        numbers = {column.name for column in source.columns if column.type == "number"}
        values: dict[str, Any] = {
            name: np.full(size, np.nan) if name in numbers else pa.nulls(size, pa.string())
            for name in self.metric_columns
        }
        if not size or self._layout is None:
            return ok, ts, values
        limit = source.max_field_length
        raw = columns[source.timestamp.column]
        trimmed = pc.utf8_trim(raw, " ")
        offsets, _ = _string_buffers(raw)
        fits = pc.fill_null(pc.equal(pc.binary_length(trimmed), self._layout.width), False)
        fits = fits.to_numpy(zero_copy_only=False) & (np.diff(offsets) <= limit)
        if fits.any():
            valid, local = self._layout.parse(
                _fixed_width(trimmed.filter(pa.array(fits)), self._layout.width)
            )
            ok[fits] = valid
            ts[fits] = self._to_utc(local, valid)
        latest = _day_us((datetime.now(UTC) + timedelta(days=2)).date())
        ok &= (ts >= self._start_us) & (ts < latest)
        for column in source.columns:
            raw = columns[column.name]
            offsets, _ = _string_buffers(raw)
            ok &= (np.diff(offsets) <= limit) & ~_rows_with_control(raw)
            value = pc.utf8_trim(raw, " ")
            empty = pc.fill_null(pc.equal(pc.binary_length(value), 0), True).to_numpy(zero_copy_only=False)
            if column.required:
                ok &= ~empty
            value = pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), value)
            if column.type == "number":
                numeric = pc.fill_null(pc.match_substring_regex(value, _NUMBER), False).to_numpy(
                    zero_copy_only=False
                )
                ok &= numeric | empty
                number = np.full(size, np.nan)
                if numeric.any():
                    number[numeric] = pc.cast(value.filter(pa.array(numeric)), pa.float64()).to_numpy()
                with np.errstate(invalid="ignore"):
                    ok &= np.isfinite(number) | empty
                    if column.min_value is not None:
                        ok &= ~(number < column.min_value)
                value = number
            if column.name in self.metric_columns:
                values[column.name] = value
        return ok, ts, values

    def _to_utc(self, local: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Local wall-clock microseconds → UTC, converting each distinct minute with DuckDB's rules."""
        if self.source.timestamp.timezone == "UTC" or not valid.any():
            return local
        minutes = local - local % US_PER_MINUTE
        distinct = np.unique(minutes[valid])
        table = pa.table({"t": pa.array(distinct.astype("datetime64[us]"))})
        db = self._connection()
        db.register("stream_minutes", table)
        zone = quote_literal(self.source.timestamp.timezone)
        utc = db.execute(
            f"SELECT epoch_us(timezone('UTC', timezone({zone}, t))) FROM stream_minutes"
        ).fetchnumpy()
        db.unregister("stream_minutes")
        shift = np.asarray(next(iter(utc.values())), dtype=np.int64) - distinct
        index = np.clip(np.searchsorted(distinct, minutes), 0, len(distinct) - 1)
        return local + shift[index]

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._db is None:
            self._db = duckdb.connect()
            self._db.execute(f"SET TimeZone = {quote_literal(self.source.timestamp.timezone)}")
        return self._db

    def _exact(self, table: pa.Table) -> pd.DataFrame:
        """Ingestion's typing SQL over the given rows: timestamp, metric columns and reason per line."""
        db = self._connection()
        db.register("stream_pending", table)
        extracted = ", ".join(
            f"CASE WHEN {TEXT_COLUMN} IS NULL THEN {quote_identifier(name)} WHEN {_strict_json_valid(TEXT_COLUMN)} "
            f"THEN json_extract_string({TEXT_COLUMN}, {quote_literal('$.' + name)}) END AS {quote_identifier(name)}"
            for name in self.names
        )
        db.execute(
            f"CREATE OR REPLACE TEMP VIEW landed AS SELECT line, {extracted}, {TEXT_COLUMN} FROM stream_pending"
        )
        metrics = "".join(f", {quote_identifier(name)}" for name in self.metric_columns)
        typed = _typed_sql(self.source, Path(self.input_name), "jsonl")
        result = db.execute(f"SELECT line, epoch_us(timestamp) AS ts{metrics}, reason FROM ({typed})").df()
        db.unregister("stream_pending")
        return result


# --- windows ---------------------------------------------------------------------------------------


def _present(values: pa.Array | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` have a value (not null, not NaN) in a parsed column."""
    if isinstance(values, pa.Array):
        return pc.is_valid(values.take(pa.array(rows))).to_numpy(zero_copy_only=False)
    return ~np.isnan(values[rows])


class _Window:
    """Partial aggregates of one open window: exact, so closing it equals batch resampling."""

    __slots__ = ("count", "counts", "distinct", "hashes", "lines", "values")

    def __init__(self, distinct: list[str], numeric: list[str], counted: list[str]) -> None:
        self.count = 0
        self.counts: dict[str, int] = {name: 0 for name in counted}  # non-null values (``count`` of a column)
        self.distinct: dict[str, set[Any]] = {name: set() for name in distinct}
        self.values: dict[str, list[np.ndarray]] = {name: [] for name in numeric}
        # raw lines counted here (chunk, starts, stops), hashed only when a checkpoint saves them
        self.lines: list[tuple[bytes, np.ndarray, np.ndarray]] = []
        self.hashes = np.empty(0, dtype=np.uint64)

    def line_hashes(self) -> np.ndarray:
        """Hashes of every raw line counted here (hashing lazily: only open windows at a checkpoint pay)."""
        if self.lines:
            fresh = [
                line_hash(chunk[start:stop])
                for chunk, starts, stops in self.lines
                for start, stop in zip(starts.tolist(), stops.tolist(), strict=True)
            ]
            self.hashes = np.concatenate([self.hashes, np.array(fresh, dtype=np.uint64)])
            self.lines = []
        return self.hashes


@dataclass
class ClosedWindow:
    start: int  # microseconds
    metrics: dict[str, float]


class WindowStore:
    """Open windows by event time, the watermark, and which windows have closed."""

    def __init__(self, source: SourceConfig, lateness_minutes: float) -> None:
        self.source = source
        self.bucket = source.bucket_minutes * US_PER_MINUTE
        self.lateness = round(lateness_minutes * US_PER_MINUTE)
        self.distinct = sorted({m.column for m in source.metrics if m.agg == "nunique" and m.column})
        self.numeric = sorted(
            {m.column for m in source.metrics if m.agg not in ("count", "nunique") and m.column}
        )
        self.counted = sorted({m.column for m in source.metrics if m.agg == "count" and m.column})
        self.open: dict[int, _Window] = {}
        self.max_event: int | None = None
        self.next_window: int | None = None  # the first window not closed yet (None before any closed)

    @property
    def watermark(self) -> int | None:
        return None if self.max_event is None else self.max_event - self.lateness

    def add(self, parsed: ParsedChunk, keep: np.ndarray) -> np.ndarray:
        """Count the kept events whose window is still open; returns the late ones' mask."""
        ts = parsed.ts
        late = np.zeros(len(ts), dtype=bool)
        if not len(ts):
            return late
        bucket = ts - ts % self.bucket
        seen = np.maximum.accumulate(np.where(keep, ts, _NEVER))
        before = np.empty_like(ts)
        before[0] = _NEVER if self.max_event is None else self.max_event
        before[1:] = np.maximum(seen[:-1], before[0])
        late = keep & (bucket + self.bucket <= before - self.lateness)
        if self.next_window is not None:
            late |= keep & (bucket < self.next_window)
        accepted = np.flatnonzero(keep & ~late)
        if keep.any():
            self.max_event = int(max(before[0], seen[-1]))
        if len(accepted):
            self._aggregate(parsed, accepted, bucket[accepted])
        return late

    def _aggregate(self, parsed: ParsedChunk, rows: np.ndarray, buckets: np.ndarray) -> None:
        order = np.argsort(buckets, kind="stable") if (np.diff(buckets) < 0).any() else None
        if order is not None:
            rows, buckets = rows[order], buckets[order]
        cuts = np.flatnonzero(np.diff(buckets)) + 1
        bounds = list(zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rows)].tolist(), strict=True))
        everything = len(rows) == len(parsed.ts) and order is None
        codes: dict[str, tuple[np.ndarray, list[Any] | None]] = {}
        for name in self.distinct:
            value = parsed.values[name]
            if isinstance(value, pa.Array):
                encoded = pc.dictionary_encode(value if everything else value.take(pa.array(rows)))
                codes[name] = (pc.fill_null(encoded.indices, -1).to_numpy(), encoded.dictionary.to_pylist())
            else:
                codes[name] = (value[rows], None)
        present = {name: _present(parsed.values[name], rows) for name in self.counted}
        line_starts, line_stops = parsed.starts[parsed.line[rows]], parsed.stops[parsed.line[rows]]
        for start, stop in bounds:
            key = int(buckets[start])
            window = self.open.get(key)
            if window is None:
                window = self.open[key] = _Window(self.distinct, self.numeric, self.counted)
            window.count += stop - start
            for name, valid in present.items():
                window.counts[name] += int(valid[start:stop].sum())
            for name, (code, dictionary) in codes.items():
                if dictionary is None:
                    part = code[start:stop]
                    window.distinct[name].update(np.unique(part[~np.isnan(part)]).tolist())
                else:
                    unique = np.unique(code[start:stop])
                    window.distinct[name].update([dictionary[i] for i in unique[unique >= 0].tolist()])
            for name in self.numeric:
                part = parsed.values[name][rows[start:stop]]
                window.values[name].append(part[~np.isnan(part)])
            window.lines.append((parsed.chunk, line_starts[start:stop], line_stops[start:stop]))

    def close_ready(self) -> list[ClosedWindow]:
        """Windows whose end the watermark has passed, empty ones between included, in order."""
        watermark = self.watermark
        if watermark is None:
            return []
        return self._close(lambda start: start + self.bucket <= watermark)

    def close_all(self) -> list[ClosedWindow]:
        """Every open window (end of input, stop signal)."""
        if not self.open:
            return []
        last = max(self.open)
        return self._close(lambda start: start <= last)

    def _close(self, ready: Callable[[int], bool]) -> list[ClosedWindow]:
        if self.next_window is None:
            if not self.open:
                return []
            self.next_window = min(self.open)
        closed = []
        while ready(self.next_window):
            window = self.open.pop(self.next_window, None)
            closed.append(ClosedWindow(self.next_window, self._metrics(window)))
            self.next_window += self.bucket
        return closed

    def _metrics(self, window: _Window | None) -> dict[str, float]:
        result: dict[str, float] = {}
        for metric in self.source.metrics:
            if metric.agg == "count":  # as SQL's count(column): the column's non-null values
                counted = (window.counts[metric.column] if metric.column else window.count) if window else 0
                result[metric.name] = counted
            elif metric.agg == "nunique":
                result[metric.name] = len(window.distinct[metric.column]) if window else 0
            else:
                values = np.concatenate(window.values[metric.column]) if window else np.empty(0)
                if not len(values):
                    result[metric.name] = 0.0 if metric.zero_when_empty else np.nan
                elif metric.agg == "p95":
                    result[metric.name] = float(np.quantile(values, 0.95))
                else:
                    reduce = {"sum": np.sum, "mean": np.mean, "min": np.min, "max": np.max}[metric.agg]
                    result[metric.name] = float(reduce(values))
        return result

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {}
        windows = []
        for start, window in sorted(self.open.items()):
            arrays[f"window/{start}/hashes"] = window.line_hashes()
            for name, parts in window.values.items():
                arrays[f"window/{start}/values/{name}"] = np.concatenate(parts) if parts else np.empty(0)
            windows.append(
                {
                    "start": start,
                    "count": window.count,
                    "counts": window.counts,
                    "distinct": {k: sorted(v) for k, v in window.distinct.items()},
                }
            )
        document = {"max_event": self.max_event, "next_window": self.next_window, "open": windows}
        return arrays, document

    def restore(self, arrays: dict[str, np.ndarray], document: dict[str, Any]) -> None:
        self.max_event, self.next_window = document["max_event"], document["next_window"]
        self.open = {}
        for saved in document["open"]:
            window = _Window(self.distinct, self.numeric, self.counted)
            window.count = saved["count"]
            window.counts = {name: saved.get("counts", {}).get(name, saved["count"]) for name in self.counted}
            window.distinct = {name: set(values) for name, values in saved["distinct"].items()}
            window.values = {
                name: [arrays[f"window/{saved['start']}/values/{name}"]] for name in self.numeric
            }
            window.hashes = arrays[f"window/{saved['start']}/hashes"].astype(np.uint64)
            self.open[saved["start"]] = window


# --- scoring ---------------------------------------------------------------------------------------


class StreamScorer:
    """Features, scores, flags and explanations per closed window, as the batch stages compute them."""

    def __init__(self, source: SourceConfig, config: StreamingConfig, warehouse: Warehouse) -> None:
        self.source = source
        self.config = config
        self.warehouse = warehouse
        self.lead = source.ensemble_detectors[0]
        self.detectors: dict[str, Detector] = {}
        self.thresholds: dict[str, float] = {}
        self.description = ""
        self.max_lag = max(source.lags, default=0)
        self.history = np.full((self.max_lag, len(source.series_columns)), np.nan)
        self.warmup_rows: list[np.ndarray] = []
        self.warmup_starts: list[int] = []
        self.recent: list[np.ndarray] = []  # the lead forest's last shingle_size - 1 scaled rows
        # the last feature rows scored (starts, matrix): the shingle history of the other forests
        self.tail_starts = np.empty(0, np.int64)
        self.tail_rows = np.empty((0, len(source.feature_columns)))
        self.started = False
        self.changed = False

    @property
    def streaming(self) -> bool:
        """Whether the lead detector learns online (a Random Cut Forest) rather than scoring statelessly."""
        return isinstance(self.detectors.get(self.lead), RCFDetector)

    @property
    def warmup_windows(self) -> int:
        return self.config.warmup_windows or self.source.buckets_per_day

    def start(self, first_window: int) -> None:
        """Warm-start from the newest model on or before the first window's day, or plan a cold start."""
        day = _day(first_window)
        days = [d for d in self.warehouse.existing_days(self.source.name, "model") if d <= day]
        found = [d for d in reversed(days) if model_path(self.warehouse, self.source, d).exists()]
        detectors: dict[str, Detector] = {}
        if found:
            path = model_path(self.warehouse, self.source, found[0])
            detectors, document = load_detectors(path)
            thresholds = {name: float(spec["value"]) for name, spec in document["thresholds"].items()}
            try:  # as batch scoring: a model of other detectors would leave voters out silently
                modeling.check_model_matches(self.source, f"model {found[0]} ({path})", list(thresholds))
                if self.lead not in detectors:
                    raise ValueError(f"model {path} has no detector {self.lead!r} (the ensemble's lead)")
            except ValueError as error:
                LOG.warning("%s; cold start", error)
            else:
                training = document.get("training_days") or ["?"]
                self._use(
                    detectors,
                    thresholds,
                    f"warm start from model {found[0]} ({path}; trained on {training[0]}..{training[-1]}"
                    f"{', itself a cold start' if document.get('cold_start') else ''})",
                )
        if not self.detectors:
            LOG.info(
                "cold start: %s; flagging nothing until %d windows have closed, then training on them",
                "no usable model (above)"
                if found
                else f"no {self.source.name} model on or before {day} in {self.warehouse.root}",
                self.warmup_windows,
            )
        self._seed_history(first_window)
        self.started = self.changed = True

    def _use(self, detectors: dict[str, Detector], thresholds: dict[str, float], description: str) -> None:
        order = [d.name for d in self.source.detectors if d.name in detectors]
        self.detectors = {name: detectors[name] for name in order}
        self.thresholds = {name: thresholds[name] for name in order}
        lead = self.detectors[self.lead]
        if isinstance(lead, RCFDetector):
            decay = self.config.time_decay
            if decay is None:
                decay = lead.forest.time_decay
            if decay is None:
                decay = 1.0 / (self.source.training_days * self.source.buckets_per_day)
            arrays, meta = lead.forest.state()
            lead.forest = RandomCutForest.from_state(arrays, {**meta, "time_decay": decay})
            width = len(lead.features)
            self.recent = (
                list(arrays["shingle"].reshape(-1, width)[1:]) if lead.forest.shingle_size > 1 else []
            )
            description += f"; {self.lead} learns online with time decay {decay:.6g} per window"
        self.description = f"{description}; threshold {self.thresholds[self.lead]:.6g}"
        LOG.info("%s", self.description)

    def _seed_history(self, first_window: int) -> None:
        """Lags of the first window read the warehouse's ``resampled`` tail, as batch reads the day before."""
        if not self.max_lag:
            return
        bucket = self.source.bucket_minutes * US_PER_MINUTE
        wanted = [first_window - lag * bucket for lag in range(self.max_lag, 0, -1)]
        frame = self.warehouse.read_partitions(
            self.source.name, "resampled", {_day(start) for start in wanted}
        )
        if frame.empty:
            LOG.info(
                "no resampled partition before the first window: its lags are missing (scored 0, as batch)"
            )
            return
        series = add_derived(self.source, frame.set_index("bucket_start"))
        index = pd.to_datetime(np.array(wanted), unit="us")
        self.history = series.reindex(index)[self.source.series_columns].to_numpy(dtype=np.float64)

    def score(self, closed: list[ClosedWindow]) -> list[dict[str, Any]]:
        """One output row per closed window, in order; the forest learns each window after scoring it."""
        source = self.source
        self.changed = True
        starts = np.array([window.start for window in closed], dtype=np.int64)
        columns = {
            name: np.array([window.metrics[name] for window in closed], dtype=np.float64)
            for name in source.metric_names
        }
        for derived in source.derived:
            columns[derived.name] = derived_values(derived, columns)
        series = np.column_stack([columns[name] for name in source.series_columns])
        joined = np.vstack([self.history, series])
        if self.max_lag:
            self.history = joined[-self.max_lag :]
        features: dict[str, np.ndarray] = dict(columns)
        for position, name in enumerate(source.series_columns):
            for lag in source.lags:
                features[f"{name}_lag{lag}"] = joined[
                    self.max_lag - lag : self.max_lag - lag + len(closed), position
                ]
        minutes = (starts // US_PER_MINUTE) % 1440
        features["slot"] = (minutes // source.bucket_minutes).astype(np.float64)
        features["tod_sin"] = np.sin(2 * np.pi * minutes / 1440.0)
        features["tod_cos"] = np.cos(2 * np.pi * minutes / 1440.0)
        matrix = np.column_stack([features[name] for name in source.feature_columns])
        rows = [self._base_row(window, columns, i) for i, window in enumerate(closed)]
        first = 0
        if not self.detectors:
            first = min(len(closed), self.warmup_windows - len(self.warmup_rows))
            self.warmup_rows.extend(matrix[:first])
            self.warmup_starts.extend(starts[:first].tolist())
            if len(self.warmup_rows) >= self.warmup_windows:
                self._train()
        if first < len(closed):
            self._score_rows(starts[first:], matrix[first:], rows[first:])
        return rows

    def _base_row(self, window: ClosedWindow, columns: dict[str, np.ndarray], index: int) -> dict[str, Any]:
        row: dict[str, Any] = {"window_start": window.start}
        for metric in self.source.metrics:
            value = columns[metric.name][index]
            row[metric.name] = int(value) if metric.is_count else json_number(value)
        for derived in self.source.derived:
            row[derived.name] = json_number(columns[derived.name][index])
        row.update(
            score=None,
            threshold=None,
            is_anomaly=False,
            ensemble_score=None,
            explained_by=None,
            attribution={},
            detectors=[],
        )
        return row

    def _frame(self, starts: np.ndarray, matrix: np.ndarray) -> pd.DataFrame:
        frame = pd.DataFrame(matrix, columns=self.source.feature_columns)
        frame["slot"] = frame["slot"].astype(np.int64)
        frame.insert(0, "bucket_start", pd.to_datetime(starts, unit="us"))
        return frame

    def _train(self) -> None:
        frame = self._frame(np.array(self.warmup_starts), np.array(self.warmup_rows))
        days = sorted({_day(start) for start in self.warmup_starts})
        model = modeling.train(self.source, frame, days, cold_start=True)
        if self.lead not in model.detectors:
            raise ValueError(
                f"cold start: the stream's first {len(frame)} windows cannot train {self.lead!r}, the "
                f"ensemble's lead ({model.thresholds[self.lead].params['reason']}): materialize a batch model "
                "for the stream to start from, or raise streaming.warmup_windows"
            )
        self._use(
            model.detectors,
            {name: threshold.value for name, threshold in model.thresholds.items()},
            f"cold start: trained on the stream's first {len(frame)} windows "
            f"({_iso(self.warmup_starts[0])}..{_iso(self.warmup_starts[-1])})",
        )
        self.warmup_rows, self.warmup_starts = [], []

    def _score_rows(self, starts: np.ndarray, matrix: np.ndarray, rows: list[dict[str, Any]]) -> None:
        frame = self._frame(starts, matrix)
        before = self._frame(self.tail_starts, self.tail_rows)
        scores = {
            name: np.asarray(detector.score(frame, **_shingle_history(detector, before)), dtype=np.float64)
            for name, detector in self.detectors.items()
            if not (name == self.lead and self.streaming)
        }
        lead_signed = None
        if self.streaming:
            scores[self.lead], lead_signed = self._stream_lead(matrix)
        voters = self.source.ensemble_detectors
        needed = modeling.votes_needed(self.source, scores)
        for index, row in enumerate(rows):
            fired = {name: bool(values[index] > self.thresholds[name]) for name, values in scores.items()}
            normalized = {name: _normalized(scores[name][index], self.thresholds[name]) for name in scores}
            present = [name for name in voters if name in scores]
            strongest = max(present, key=lambda name: (fired[name], normalized[name]))
            if strongest == self.lead and lead_signed is not None:
                signed = lead_signed[index]
            else:
                detector = self.detectors[strongest]
                history = _shingle_history(detector, before, frame.iloc[:index])
                signed = detector.explain(frame.iloc[[index]], **history)[0]
            # score and threshold are the lead detector's (Kinesis' ANOMALY_SCORE); the flag is the
            # ensemble's, whose score (as batch's ensemble row: the strongest voter's score over its
            # threshold) is over 1 whenever it fires, and the attribution is that strongest voter's
            row.update(
                score=float(scores[self.lead][index]),
                threshold=self.thresholds[self.lead],
                is_anomaly=sum(fired[name] for name in present) >= needed,
                ensemble_score=normalized[strongest],
                explained_by=strongest,
                attribution=json.loads(modeling.explanation_json(self.detectors[strongest].features, signed)),
                detectors=[name for name in self.detectors if fired[name]],
            )
        # a day of rows: the last shingle_size - 1 rows a forest can take may lie behind gaps
        keep = self.source.buckets_per_day if any(d.history_rows for d in self.detectors.values()) else 0
        first = max(0, len(self.tail_starts) + len(starts) - keep)
        self.tail_starts = np.concatenate([self.tail_starts, starts])[first:]
        self.tail_rows = np.vstack([self.tail_rows, matrix])[first:]

    def _stream_lead(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score, explain, then insert each window with the lead forest (rows with a gap score 0)."""
        lead = self.detectors[self.lead]
        assert isinstance(lead, RCFDetector)
        forest = lead.forest
        columns = [self.source.feature_columns.index(name) for name in lead.features]
        points = matrix[:, columns] / lead.scale
        scores = np.zeros(len(points))
        signed = np.zeros_like(points)
        for index, point in enumerate(points):
            if not float32_finite(point).all():
                continue
            history = np.array(self.recent) if forest.shingle_size > 1 else None
            folded = fold_attribution(forest.attribution(point[None, :], history), forest.shingle_size)[0]
            signed[index] = folded[:, 1] - folded[:, 0]
            scores[index] = forest.update(point)
            if forest.shingle_size > 1:
                self.recent = [*self.recent, point][-(forest.shingle_size - 1) :]
        return scores, signed

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {
            "history": self.history,
            "warmup_rows": np.array(self.warmup_rows).reshape(-1, len(self.source.feature_columns)),
            "warmup_starts": np.array(self.warmup_starts, dtype=np.int64),
            "recent": np.array(self.recent, dtype=np.float64),
            "tail_starts": self.tail_starts,
            "tail_rows": self.tail_rows,
        }
        described = {}
        for name, detector in self.detectors.items():
            detector_arrays, meta = detector.state()
            arrays.update(
                {f"detector/{name}/{key}": np.asarray(value) for key, value in detector_arrays.items()}
            )
            described[name] = {
                "kind": detector.kind,
                "features": detector.features,
                "params": detector.params,
                "meta": meta,
            }
        document = {
            "detectors": described,
            "thresholds": self.thresholds,
            "description": self.description,
            "started": self.started,
            "configured": [detector.name for detector in self.source.detectors],
        }
        return arrays, document

    def restore(self, arrays: dict[str, np.ndarray], document: dict[str, Any]) -> None:
        """Continue from :meth:`state`, if it was saved under the detectors the source configures now:
        resumed under others, a voter would be missing and the ensemble would vote by other rules."""
        saved = document.get("configured")  # (not in states saved before)
        configured = [detector.name for detector in self.source.detectors]
        if saved is not None and sorted(saved) != sorted(configured):
            raise ConfigError(
                f"the stream state was saved for detectors {sorted(saved)}, but {self.source.name} now "
                f"configures {sorted(configured)}: start without this --state (or restore the config)"
            )
        detectors = {}
        for name, described in document["detectors"].items():
            prefix = f"detector/{name}/"
            own = {key[len(prefix) :]: value for key, value in arrays.items() if key.startswith(prefix)}
            detectors[name] = detector_class(described["kind"]).from_state(
                described["features"], described["params"], own, described["meta"]
            )
        self.detectors = detectors
        self.thresholds = {name: float(value) for name, value in document["thresholds"].items()}
        self.description = document["description"]
        self.started = document["started"]
        self.history = arrays["history"]
        self.warmup_rows = list(arrays["warmup_rows"])
        self.warmup_starts = arrays["warmup_starts"].tolist()
        self.recent = list(arrays["recent"])
        self.tail_starts = arrays.get("tail_starts", self.tail_starts)  # (not in states saved before)
        self.tail_rows = arrays.get("tail_rows", self.tail_rows)


def _digest(start: bytes) -> str:
    """A saved position's check on its file: a digest of the first bytes before it (at most HEAD_BYTES),
    which tells the file the position was taken in from another one put in its place."""
    return hashlib.sha256(start[:HEAD_BYTES]).hexdigest()


def _shingle_history(detector: Detector, *before: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``history=`` for a shingled forest scoring a few windows (:func:`modeling.preceding`); nothing
    for any other detector."""
    history = modeling.preceding(detector, *before)
    return {} if history is None else {"history": history}


def _normalized(score: float, threshold: float) -> float:
    """``modeling.score``'s normalized score: > 1 is over the threshold."""
    if threshold > 0:
        return float(score / threshold)
    return float("inf") if score > threshold else 0.0


# --- transports ------------------------------------------------------------------------------------


class Transport(Protocol):
    """Where events come from: chunks of complete lines (each ending in a line break)."""

    name: str
    seekable: bool  # position() can be given back to seek() after a restart

    def read(self, timeout: float) -> bytes | None:
        """Complete lines, ``b""`` when nothing arrived within ``timeout``, None at the end of input."""

    def position(self) -> Any:
        """JSON-able position just after the lines returned so far."""

    def seek(self, position: Any) -> bool:
        """Continue after ``position`` (from an earlier run's :meth:`position`); False when the input
        is not the one that position was taken in (a file replaced under the same name): then it is
        read from its start."""

    def commit(self) -> None:
        """The state up to :meth:`position` is saved (Kafka commits its offsets here)."""

    def close(self) -> None: ...


class _LineBuffer:
    """Cuts a byte stream into complete lines; keeps the partial last line for the next read."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        data = self.pending + data
        cut = data.rfind(b"\n") + 1
        if not cut and len(data) > MAX_LINE_BYTES:
            cut, data = len(data) + 1, data + b"\n"  # no line break in sight: hand it on to be quarantined
        self.pending = data[cut:]
        return data[:cut]

    def finish(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest + b"\n" if rest else b""


class FileTransport:
    """A file (``.gz`` allowed), read to its end; the position is the byte offset of the lines read.

    A plain file's last line without a line end may still be being written: it is held back (the
    position stays before it, so the next run reads it whole) rather than read as a fragment. A
    gzip file is complete, so its last line counts as it is."""

    seekable = True

    def __init__(self, path: Path) -> None:
        self.name = str(Path(path).resolve())
        self._compressed = str(path).endswith(".gz")
        self._handle = gzip.open(path, "rb") if self._compressed else open(path, "rb")  # noqa: SIM115
        self._lines = _LineBuffer()
        self._read = 0
        self._start = b""  # the file's first bytes (up to HEAD_BYTES), as read: what identifies it
        self._done = False

    def read(self, timeout: float) -> bytes | None:
        if self._done:
            return None
        data = self._handle.read(READ_BYTES)
        self._start += data[: HEAD_BYTES - len(self._start)]
        if not data:
            self._done = True
            if self._compressed:
                return self._lines.finish() or None
            if self._lines.pending:
                LOG.warning(
                    "%s: the last line has no line end yet (%d bytes): held back, the next run reads it",
                    self.name,
                    len(self._lines.pending),
                )
            return None
        self._read += len(data)
        return self._lines.feed(data)

    @property
    def holding_back(self) -> bool:
        """Whether an unfinished last line was held back at the end of input."""
        return self._done and bool(self._lines.pending)

    def position(self) -> dict[str, Any]:
        offset = self._read - len(self._lines.pending)
        return {"offset": offset, "head": _digest(self._start[:offset])}

    def seek(self, position: Any) -> bool:
        offset = int(position["offset"]) if isinstance(position, dict) else int(position)  # int: older states
        opener = gzip.open if self._compressed else open
        with opener(self.name, "rb") as handle:
            start = handle.read(min(offset, HEAD_BYTES))
        if isinstance(position, dict) and _digest(start) != position["head"]:
            LOG.warning(
                "%s is not the file the state was saved for (its first bytes differ: rotated or "
                "replaced): reading it from its start",
                self.name,
            )
            return False
        self._handle.seek(offset)
        self._read, self._start = offset, start
        return True

    def commit(self) -> None:
        pass

    def close(self) -> None:
        self._handle.close()


class DescriptorTransport:
    """Stdin or a socket: polled with ``select`` so a stop signal is noticed; cannot seek."""

    seekable = False

    def __init__(
        self, name: str, fileno: int, receive: Callable[[int], bytes], closer: Callable[[], None]
    ) -> None:
        self.name = name
        self._fileno = fileno
        self._receive = receive
        self._closer = closer
        self._lines = _LineBuffer()
        self._done = False

    def read(self, timeout: float) -> bytes | None:
        if self._done:
            return None
        parts: list[bytes] = []
        size = 0
        while size < READ_BYTES and select.select([self._fileno], [], [], 0 if parts else timeout)[0]:
            try:
                data = self._receive(READ_BYTES - size)
            except OSError as error:
                LOG.warning("%s: %s; treating it as the end of input", self.name, error)
                data = b""
            if not data:
                self._done = True
                break
            parts.append(data)
            size += len(data)
        lines = self._lines.feed(b"".join(parts))
        if self._done:
            lines += self._lines.finish()
        return lines if lines or not self._done else None

    def position(self) -> None:
        return None

    def seek(self, position: Any) -> bool:
        raise OSError(f"{self.name} cannot seek")

    def commit(self) -> None:
        pass

    def close(self) -> None:
        self._closer()


def stdin_transport() -> DescriptorTransport:
    return DescriptorTransport(
        "stdin", sys.stdin.fileno(), lambda size: os.read(sys.stdin.fileno(), size), lambda: None
    )


def tcp_transport(url: str) -> DescriptorTransport:
    """``tcp://HOST:PORT``: connect to a producer that serves newline-delimited events; its close ends input."""
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        raise ValueError(f"expected tcp://HOST:PORT, got {url!r}")
    connection = socket.create_connection((parts.hostname, parts.port), timeout=30)
    connection.settimeout(None)
    return DescriptorTransport(url, connection.fileno(), connection.recv, connection.close)


class KafkaTransport:
    """A Kafka topic through a consumer with confluent-kafka's ``consume``/``commit``/``close`` API.

    Each message is one event (or several lines). The position is the next offset per partition;
    after a restart, messages below it are dropped (the group's committed offsets may lag the state
    by one checkpoint), and offsets are committed only after the state is saved.
    """

    seekable = True

    def __init__(self, consumer: Any, topic: str, batch: int = 10_000) -> None:
        self.name = f"kafka:{topic}"
        self._consumer = consumer
        self._batch = batch
        self._next: dict[str, int] = {}
        self._skip_below: dict[str, int] = {}

    def read(self, timeout: float) -> bytes:
        lines = []
        for message in self._consumer.consume(num_messages=self._batch, timeout=timeout):
            error = message.error()
            if error is not None:
                if getattr(error, "fatal", lambda: False)():
                    raise RuntimeError(f"{self.name}: {error}")
                LOG.warning("%s: %s", self.name, error)
                continue
            partition, offset = str(message.partition()), int(message.offset())
            if offset < self._skip_below.get(partition, 0):
                continue
            self._next[partition] = offset + 1
            value = message.value()
            if value:
                lines.append(value if value.endswith(b"\n") else value + b"\n")
        return b"".join(lines)

    def position(self) -> dict[str, int]:
        return dict(self._next)

    def seek(self, position: Any) -> bool:
        self._skip_below = {str(key): int(value) for key, value in dict(position).items()}
        self._next = dict(self._skip_below)
        return True

    def commit(self) -> None:
        if self._next:
            self._consumer.commit(asynchronous=False)

    def close(self) -> None:
        self._consumer.close()


def kafka_transport(bootstrap: str, topic: str, group: str) -> KafkaTransport:
    """A confluent-kafka consumer (the optional ``kafka`` extra), imported only when asked for."""
    try:
        from confluent_kafka import Consumer
    except ImportError:
        raise ConfigError("--kafka needs confluent-kafka: pip install 'anomaly-dagster[kafka]'") from None
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    return KafkaTransport(consumer, topic)


# --- outputs ---------------------------------------------------------------------------------------


class JsonLinesOutput:
    """Closed windows as JSON lines on stdout or a file; a file is cut back to the checkpoint on resume."""

    def __init__(self, target: str, offset: int | None = None) -> None:
        self.target = target
        if target == "-":
            self._handle = sys.stdout.buffer
            self.offset: int | None = None
            return
        path = Path(target)
        if path.exists() and not path.is_file():
            # /dev/null or a pipe: written like stdout, with nothing to cut back on resume or to fsync
            self._handle = open(path, "wb")  # noqa: SIM115
            self.offset = None
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if offset is None or not path.exists():
            self._handle = open(path, "wb")  # noqa: SIM115
            self.offset = 0
            return
        self._handle = open(path, "r+b")  # noqa: SIM115
        size = self._handle.seek(0, os.SEEK_END)
        if size < offset:
            LOG.warning("%s is shorter than at the checkpoint (%d < %d bytes); appending", path, size, offset)
        self.offset = min(size, offset)
        self._handle.truncate(self.offset)
        self._handle.seek(self.offset)

    def write(self, rows: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(_json_row(row)).encode() + b"\n" for row in rows)
        self._handle.write(data)
        if self.offset is not None:
            self.offset += len(data)

    def flush(self) -> None:
        self._handle.flush()
        if self.offset is not None:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self.flush()
        if self.target != "-":
            self._handle.close()


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: an ensemble score over a threshold of 0 is infinite (as batch's ``normalized``) and
    is written null, since ``json.dumps`` would write a bare Infinity that JSON readers refuse."""
    ensemble_score = row.get("ensemble_score")
    return {
        **row,
        "window_start": _iso(row["window_start"]),
        "ensemble_score": None if ensemble_score is None else json_number(ensemble_score),
    }


class WarehouseSink:
    """Scores and quarantine rows waiting for the next checkpoint, upserted per day partition."""

    def __init__(self, warehouse: Warehouse, source: SourceConfig) -> None:
        self.warehouse = warehouse
        self.source = source
        self.scores: list[dict[str, Any]] = []
        self.quarantine: list[dict[str, Any]] = []
        self.run = RunInfo(f"stream-{uuid.uuid4().hex[:12]}", __version__)

    def flush(self) -> None:
        written: list[WrittenPartition] = []
        if self.scores:
            frame = pd.DataFrame(self.scores)
            frame["window_start"] = pd.to_datetime(frame["window_start"], unit="us").astype("datetime64[us]")
            frame["attribution"] = [json.dumps(value) for value in frame["attribution"]]
            frame["detectors"] = [",".join(value) for value in frame["detectors"]]
            counts = {metric.name for metric in self.source.metrics if metric.is_count}
            for name in [*self.source.series_columns, "score", "threshold", "ensemble_score"]:  # one schema
                frame[name] = frame[name].astype(np.int64 if name in counts else np.float64)
            frame["explained_by"] = frame["explained_by"].astype("string")  # text, also when all null
            written += self._upsert(SCORES_ASSET, frame, "window_start", ["window_start"])
        if self.quarantine:
            frame = pd.DataFrame(self.quarantine)
            frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="us").astype("datetime64[us]")
            written += self._upsert(QUARANTINE_ASSET, frame, "day", ["input", "line", "raw"])
        if written:
            self.warehouse.record(written, self.run)
        self.scores, self.quarantine = [], []

    def _upsert(self, asset: str, frame: pd.DataFrame, day_of: str, key: list[str]) -> list[WrittenPartition]:
        days = frame.pop("day") if day_of == "day" else frame[day_of].dt.date
        written = []
        for day, rows in frame.groupby(days.to_numpy()):
            existing = self.warehouse.read_partitions(self.source.name, asset, [day])
            combined = pd.concat([existing, rows], ignore_index=True) if len(existing) else rows
            combined = combined.drop_duplicates(key, keep="last").sort_values(key[:2], ignore_index=True)
            written.append(self.warehouse.write_partition(self.source.name, asset, day, combined))
        return written


# --- the runner ------------------------------------------------------------------------------------


@contextmanager
def _state_lock(path: Path | None) -> Iterator[None]:
    """One process per state file: a second one would double-count."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another stream is running with state {path}") from None
        yield


class StreamRunner:
    """The loop: read, parse, window, score, emit; checkpoint on a timer; close everything at the end."""

    def __init__(
        self,
        source: SourceConfig,
        transport: Transport,
        out: str,
        warehouse: Warehouse,
        state_path: Path | None = None,
        config: StreamingConfig | None = None,
        input_format: str = "auto",
    ) -> None:
        self.source = source
        self.transport = transport
        self.config = config or source.streaming
        self.state_path = Path(state_path) if state_path else None
        self.parser = EventParser(source, transport.name, input_format)
        self.windows = WindowStore(source, self.config.allowed_lateness_minutes)
        self.scorer = StreamScorer(source, self.config, warehouse)
        self.sink = WarehouseSink(warehouse, source)
        self.out_target = out if out == "-" else str(Path(out).resolve())
        self.output: JsonLinesOutput | None = None
        self.lines_read = 0
        self.counts: dict[str, int] = {"events": 0, "windows": 0, "quarantined": 0, "late": 0, "replayed": 0}
        self.reasons: dict[str, int] = {}
        self.replay_until: int | None = None  # resumed without seeking: events up to here were seen
        self.budget: dict[int, int] = {}  # line hash -> copies already counted in a resumed open window
        self.budget_windows: set[int] = set()
        self.scorer_file: str | None = None
        self._stop = False
        self._logged = dict(self.counts)
        self._saved: tuple[int, int] | None = None  # (lines read, windows) at the last checkpoint

    def request_stop(self) -> None:
        """Close the open windows, flush and return from :meth:`run` (safe from a signal handler)."""
        self._stop = True

    def run(self) -> int:
        """Resume, stream until the input ends or a stop is requested, close every window, checkpoint."""
        with _state_lock(self.state_path):
            self._resume()
            if self.output is None:
                self.output = JsonLinesOutput(self.out_target)
            next_checkpoint = time.monotonic() + self.config.checkpoint_seconds
            try:
                while not self._stop:
                    chunk = self.transport.read(POLL_SECONDS)
                    if chunk is None:
                        LOG.info("end of input")
                        break
                    if chunk:
                        self.process(chunk)
                    if time.monotonic() >= next_checkpoint:
                        self.checkpoint()
                        next_checkpoint = time.monotonic() + self.config.checkpoint_seconds
                if self._stop:
                    LOG.info("stop requested: closing the open windows")
                if (
                    not self._stop
                    and self.state_path is not None
                    and getattr(self.transport, "holding_back", False)
                ):
                    # the file is still being written: its held-back line (and what follows) belongs to
                    # windows the next run must still be able to add to
                    LOG.info(
                        "input still being written: %d open window(s) kept for the next run",
                        len(self.windows.open),
                    )
                else:
                    self._emit(self.windows.close_all())
                self.checkpoint()
            finally:
                self.transport.close()
                if self.output is not None:
                    self.output.close()
        LOG.info("done: %s", self._summary())
        return 0

    def process(self, chunk: bytes) -> None:
        """Parse, window and score one chunk of complete lines."""
        parsed = self.parser.parse(chunk)
        first_line = self.lines_read + 1
        self.lines_read += parsed.lines
        keep = self._not_replayed(parsed)
        late = self.windows.add(parsed, keep)
        for index, reason, stamp in parsed.bad:  # dated by the stream's clock when they have no time
            self._quarantine(parsed, first_line + index, index, reason, stamp)
        self.counts["events"] += int(keep.sum() - late.sum())
        lateness = self.config.allowed_lateness_minutes
        for position in np.flatnonzero(late).tolist():
            index, stamp = int(parsed.line[position]), int(parsed.ts[position])
            window = stamp - stamp % self.windows.bucket
            reason = f"late event: its window {_iso(window)} had closed (allowed lateness {lateness:g} min)"
            self.counts["late"] += 1
            self._quarantine(parsed, first_line + index, index, reason, stamp)
        self._emit(self.windows.close_ready())

    def _not_replayed(self, parsed: ParsedChunk) -> np.ndarray:
        """After a restart without seeking, drop the events the saved state already counted."""
        keep = np.ones(len(parsed.ts), dtype=bool)
        if self.replay_until is not None and len(keep):
            newer = np.flatnonzero(parsed.ts > self.replay_until)
            end = int(newer[0]) if len(newer) else len(keep)
            bucket = parsed.ts[:end] - parsed.ts[:end] % self.windows.bucket
            if self.windows.next_window is not None:
                keep[:end] = bucket >= self.windows.next_window
            if len(newer):
                self.replay_until = None
        if self.budget:
            bucket = parsed.ts - parsed.ts % self.windows.bucket
            for position in np.flatnonzero(keep & np.isin(bucket, list(self.budget_windows))).tolist():
                digest = line_hash(parsed.raw(int(parsed.line[position])))
                if self.budget.get(digest, 0) > 0:
                    self.budget[digest] -= 1
                    keep[position] = False
        self.counts["replayed"] += int((~keep).sum())
        return keep

    def _quarantine(self, parsed: ParsedChunk, line: int, index: int, reason: str, stamp: int | None) -> None:
        self.counts["quarantined"] += 1
        kind = " ".join(reason.split(":")[0].split()[:2])  # "late event", "malformed JSON", "missing user"
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        when = stamp if stamp is not None else self.windows.max_event
        self.sink.quarantine.append(
            {
                "input": self.transport.name,
                "line": line,
                "timestamp": stamp,
                "reason": reason,
                "raw": _cap(parsed.raw(index).decode("utf-8", errors="replace")),
                "day": _day(when) if when is not None else datetime.now(UTC).date(),
            }
        )

    def _emit(self, closed: list[ClosedWindow]) -> None:
        if not closed:
            return
        if not self.scorer.started:
            self.scorer.start(closed[0].start)
        rows = self.scorer.score(closed)
        assert self.output is not None
        self.output.write(rows)
        self.sink.scores.extend(rows)
        self.counts["windows"] += len(rows)
        if (
            self.budget
            and self.windows.next_window is not None
            and self.windows.next_window > max(self.budget_windows)
        ):
            self.budget, self.budget_windows = {}, set()

    def checkpoint(self) -> None:
        """Output flushed, warehouse rows written, then the state replaced: a crash repeats, never skips."""
        progress = (self.lines_read, self.counts["windows"])
        if progress == self._saved:
            return  # idle: nothing to write
        if self.output is not None:
            self.output.flush()
        try:
            self.sink.flush()
        except Exception:  # the warehouse is busy or unwritable: keep the rows, keep the older state
            LOG.exception("could not write to the warehouse; retrying at the next checkpoint")
            return
        if self.state_path is not None:
            self._save_state()
            self.transport.commit()
        self._saved = progress
        if self.counts != self._logged:
            LOG.info("%s", self._summary())
            self._logged = dict(self.counts)

    def _summary(self) -> str:
        counts = ", ".join(f"{value} {name}" for name, value in self.counts.items())
        reasons = ", ".join(f"{name}: {value}" for name, value in sorted(self.reasons.items()))
        watermark = self.windows.watermark
        text = f"{counts}; watermark {_iso(watermark) if watermark is not None else '-'}"
        return f"{text}; quarantine reasons {reasons}" if reasons else text

    # -- state

    def _save_state(self) -> None:
        assert self.state_path is not None
        if self.scorer.changed or self.scorer_file is None:
            name = f"{self.state_path.name}.scorer-{uuid.uuid4().hex[:12]}.npz"
            arrays, document = self.scorer.state()
            _write_npz(self.state_path.with_name(name), arrays, document)
            self.scorer_file, self.scorer.changed = name, False
        arrays, windows = self.windows.state()
        document = {
            "format": STATE_FORMAT,
            "source": self.source.name,
            "bucket_minutes": self.source.bucket_minutes,
            "metrics": self.source.metric_names,
            "input": {
                "name": self.transport.name,
                "position": self.transport.position(),
                "lines": self.lines_read,
            },
            "output": {"target": self.out_target, "offset": self.output.offset if self.output else 0},
            "header": self.parser.header,
            "windows": windows,
            "scorer": self.scorer_file,
            "counts": self.counts,
            "reasons": self.reasons,
        }
        _write_npz(self.state_path, arrays, document)
        for stale in self.state_path.parent.glob(f"{self.state_path.name}.scorer-*.npz"):
            if stale.name != self.scorer_file:
                stale.unlink(missing_ok=True)

    def _resume(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        arrays, document = _read_npz(self.state_path)
        expected = (self.source.name, self.source.bucket_minutes, self.source.metric_names)
        if (document["source"], document["bucket_minutes"], document["metrics"]) != expected:
            raise ConfigError(f"state {self.state_path} belongs to another source or configuration")
        self.windows.restore(arrays, document["windows"])
        self.parser.header = document["header"]
        self.lines_read = document["input"]["lines"]
        self.counts.update(document["counts"])
        self.reasons = document["reasons"]
        self._logged = dict(self.counts)
        if document["scorer"]:
            scorer_arrays, scorer_document = _read_npz(self.state_path.with_name(document["scorer"]))
            self.scorer.restore(scorer_arrays, scorer_document)
            self.scorer_file = document["scorer"]
        position = document["input"]["position"]
        if (
            self.transport.seekable
            and document["input"]["name"] == self.transport.name
            and position is not None
            and self.transport.seek(position)
        ):
            where = f"at {self.transport.name} position {position}"
        elif self.transport.seekable and position is not None:  # another file, or this one replaced
            self.lines_read = 0
            where = f"{self.transport.name} is a new input: read from its start"
        else:
            self.replay_until = self.windows.max_event
            for start, window in self.windows.open.items():
                for digest in window.hashes.tolist():
                    self.budget[digest] = self.budget.get(digest, 0) + 1
                self.budget_windows.add(start)
            where = (
                f"without seeking {self.transport.name}: replayed events up to "
                f"{_iso(self.replay_until) if self.replay_until is not None else '-'} and the "
                f"{len(self.budget)} distinct lines already counted in open windows are skipped"
            )
        same_file = document["output"]["target"] == self.out_target and self.out_target != "-"
        self.output = JsonLinesOutput(self.out_target, document["output"]["offset"] if same_file else None)
        LOG.info(
            "resumed from %s %s; %d open windows; %s",
            self.state_path,
            where,
            len(self.windows.open),
            self.scorer.description or "no model yet",
        )


def _write_npz(path: Path, arrays: dict[str, np.ndarray], document: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, document=np.array(json.dumps(document)), **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return arrays, json.loads(str(arrays.pop("document")))


# --- command line ----------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``stream`` to the ``anomaly-dagster`` command (handler in ``args.handler``, as the others)."""
    parser = subparsers.add_parser(
        "stream",
        help="score events as they arrive (file, stdin, TCP or Kafka), warm-started from the batch model",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--source", required=True)
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument(
        "--input",
        default="-",
        help="FILE (.gz allowed), - for stdin (default), or tcp://HOST:PORT to connect to",
    )
    inputs.add_argument(
        "--kafka", metavar="BOOTSTRAP", help="Kafka bootstrap servers (needs the kafka extra)"
    )
    parser.add_argument("--topic", help="Kafka topic (with --kafka)")
    parser.add_argument("--group", help="Kafka consumer group (default anomaly-dagster-stream-<source>)")
    parser.add_argument("--format", choices=["auto", "jsonl", "csv"], default="auto", help="line format")
    parser.add_argument("--out", default="-", help="JSON lines of closed windows: FILE or - (default)")
    parser.add_argument("--warehouse", help="default: ANOMALY_WAREHOUSE_DIR or data/warehouse")
    parser.add_argument("--state", help="checkpoint file; restarting with it resumes without double counting")
    parser.set_defaults(handler=run_stream_command)


def run_stream_command(args: argparse.Namespace) -> int:
    """The ``stream`` handler: exit 0 after a clean stop (end of input, SIGINT, SIGTERM), 2 on bad usage."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s stream %(levelname)s %(message)s"
    )
    try:
        runner = _runner(args)
    except (ConfigError, OSError, ValueError) as error:
        LOG.error("%s", error)
        return 2
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: runner.request_stop())
    try:
        return runner.run()
    except ConfigError as error:  # the state file belongs elsewhere or is in use
        LOG.error("%s", error)
        return 2


def _runner(args: argparse.Namespace) -> StreamRunner:
    sources = load_sources()
    if args.source not in sources:
        raise ConfigError(f"unknown source {args.source!r}; known: {sorted(sources)}")
    source = sources[args.source]
    if source.entity is not None:  # one stream state would silently merge every entity's events
        raise ConfigError(
            f"{source.name} has an entity column ({source.entity}): streams score one series; "
            "use the batch pipeline"
        )
    transport: Transport
    if args.kafka:
        if not args.topic:
            raise ConfigError("--kafka needs --topic")
        transport = kafka_transport(
            args.kafka, args.topic, args.group or f"anomaly-dagster-stream-{source.name}"
        )
    elif args.input == "-":
        transport = stdin_transport()
    elif args.input.startswith("tcp://"):
        transport = tcp_transport(args.input)
    else:
        transport = FileTransport(Path(args.input))
    warehouse = Warehouse(Path(args.warehouse) if args.warehouse else warehouse_dir())
    state = Path(args.state) if args.state else None
    return StreamRunner(source, transport, args.out, warehouse, state, None, args.format)
