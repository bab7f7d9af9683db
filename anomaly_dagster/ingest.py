"""Raw log ingestion with DuckDB: landing files → typed UTC events, or quarantine rows with reasons.

Every landing file is read as text (CSV, CSV.gz, JSON lines, Parquet cast to text), then typed
in SQL. A row whose timestamp or required values cannot be parsed goes to quarantine with its
file, line and reason; a file DuckDB cannot read at all (truncated gzip, binary garbage) is
quarantined as a file and does not stop the other files. A file that lacks a required column
is a configuration or producer error, not a bad row: it fails with a message naming both.

The rules for bad input, case by case:

- *Lines*: one event per physical line, ended by ``\\n`` or ``\\r\\n`` (a file may mix them: DuckDB's
  reader refuses that, so such a file is read from a copy with ``\\n`` ends). Blank lines are
  skipped. A line with the wrong number of fields, bytes that are not UTF-8, or more than DuckDB's
  maximum line size is quarantined with DuckDB's reason. A quote that does not close on its line would make the CSV reader swallow the
  following lines into one record: when that happens, the lines with an unbalanced quote are
  quarantined ("unterminated quote") and the file is read again without them, so the lines after
  them are read as the events they are.
- *Fields*: a field longer than ``max_field_length`` or holding control characters (NUL, line
  breaks, other C0 controls, DEL, C1 controls U+0080-U+009F; tab is allowed) is quarantined; so is
  a number that does not parse, is NaN or infinite, or is below the column's ``min_value``.
- *JSON*: a line must be one JSON object by RFC 8259 (DuckDB's parser also takes a trailing comma,
  ``NaN`` and ``Infinity``; they are malformed JSON, as for Spark). A text column given a JSON
  boolean, object or array is quarantined as the wrong type; a number is kept as its text (numeric
  user ids are common and lossless).
- *Timestamps*: the source's format, else ISO 8601 with a full time of day (a date alone or a
  truncated time such as ``10:5`` is unparseable, not read as 00:00 or 10:05). Naive times are in
  the source's time zone; an explicit offset (``+02:00``, ``+0200``, also after a space, or ``Z``),
  ``UTC``/``GMT`` or an IANA zone name (``Europe/Berlin``) wins, so files and rows may mix them. A
  zone abbreviation (``PST``, ``IST``) is ambiguous and quarantined as such. A timestamp that does
  not parse, has an offset beyond ±18:00, or falls before ``start_date`` or more than two days in
  the future is quarantined. A naive local time in a daylight-saving gap or
  overlap is read at the zone's standard offset (DuckDB's rule), not quarantined.
- *Files*: an empty CSV file (no header) and a file DuckDB or gzip cannot read (truncated or
  corrupt gzip, binary content) are quarantined as a whole; a header-only CSV file, an empty JSON
  lines file and an empty Parquet file hold no events and are no error. A CSV or Parquet file
  without a required column, and a JSON lines file none of whose objects has a required field,
  fail the run with :class:`LandingFileError` naming the file.
- *Duplicates*: identical events (same timestamp and values) within one file are kept as separate
  events: the reference clickstream holds 42 such pairs (the same user clicking the same page
  twice within a second) and its published 10-minute counts include both. Across files, an event
  counts as often as the file holding it most often; the extra copies in later files (by path) are
  replays and go to quarantine as "duplicate event", naming the file and line already holding it.

Quarantine rows without a usable timestamp (including every line DuckDB rejected, which it did not
parse) go to their file's home day: the date in its name (``clicks_2020-07-15.csv.gz``) when it holds
events of that day, else its first valid day. A day's file carries a few late events of the day
before, and the daily run of its own day must write its bad lines: charged to the day before, they
were written by no run but a rerun of that day. A file with no valid event (e.g. a truncated gzip)
goes to the first day of its readable prefix, else the date in its name, else its modification day,
or ``start_date`` when that day is earlier (an archive copied with its times kept).

A small landing index (JSON in the warehouse) remembers which days each file touches, keyed by
size and modification time, so a daily run reads only the files that hold that day and the
landing sensor knows which partitions a new or changed file affects.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import duckdb
import numpy as np
import pandas as pd

from anomaly_dagster.config import SourceConfig
from anomaly_dagster.sql import quote_identifier, quote_literal
from anomaly_dagster.storage import atomic_write_bytes

QUARANTINE_COLUMNS = ["source_file", "line", "reason", "raw"]
# the reason of the one quarantine row a file that cannot be read at all gets (it stands for the file),
# and the detail of a CSV without even a header line (zero bytes: it held no event)
UNREADABLE_FILE = "unreadable file"
EMPTY_CSV = "empty file (no header line)"
TEXT_COLUMN = "_line_text"
RAW_MAX_CHARS = 4096  # raw text kept per quarantine row
SHOWN_MAX_CHARS = 64  # of a value echoed in a reason
MAX_OFFSET_HOURS = 18
# What the fallback to ISO 8601 reads when the configured format does not: a full time of day (DuckDB's
# cast would read '2020-07-15' as midnight and '10:5' as 10:05), then an offset, Z, UTC/GMT or an IANA
# zone name. Not an abbreviation: ICU reads PST as Los Angeles time, daylight saving included.
ISO_TIMESTAMP = (
    r"\d{4,}-\d{1,2}-\d{1,2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?"
    r"(Z|\s*[+-]\d{2}(:?\d{2}){0,2}| (UTC|GMT|[A-Za-z_]+(/[A-Za-z0-9_+-]+)+))?"
)
ZONE_ABBREVIATION = r"\d *[A-Z]{3,5}$"  # 10:00:00 PST, CEST, IST
# RE2 (and Java) class of code points: C0 controls except tab, DEL, C1 controls (U+0085 is a line end to some readers)
CONTROL_CHARACTERS = r"[\x00-\x08\x0a-\x1f\x7f-\x9f]"
UNTERMINATED_QUOTE = "unterminated quote: a quoted field does not close on its line"
BARE_CARRIAGE_RETURN = "malformed CSV line: a carriage return outside quotes inside the line"
# outside its strings, JSON that DuckDB's json_valid accepts beyond RFC 8259: a trailing comma, NaN, Infinity
LENIENT_JSON = r",\s*[}\]]|[Nn][Aa][Nn]|[Ii][Nn][Ff]"
JSON_STRING = r'"(?:[^"\\]|\\.)*"'
_SCAN_CHUNK = 1 << 22


class LandingFileError(ValueError):
    """A landing file that cannot be ingested as configured (e.g. a required column is missing)."""


class UnreadableFile(Exception):
    """A file with no usable content (empty, binary, corrupt): quarantined whole, others go on."""


@dataclass(frozen=True)
class LandingFile:
    """A landing file's identity (size and mtime), the days its valid events fall on, and a digest of
    its rows per day (so that a file growing with today's lines asks for no earlier day again)."""

    path: str
    size: int
    mtime_ns: int
    days: list[str]
    home_day: str
    digests: dict[str, str] = field(default_factory=dict)  # day -> "rows:hash"; {}: not known
    version: int = 1  # INDEX_VERSION when it was indexed; entries written before versions were kept: 1

    @property
    def touched_days(self) -> set[date]:
        return {date.fromisoformat(day) for day in [*self.days, self.home_day]}


def file_format(path: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the file name (``.gz`` allowed on text formats). A
    ``.tsv`` is refused by name: read as CSV, every tab-separated line would be quarantined as one field."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".csv", ".txt", ".log")):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise LandingFileError(f"{path}: unknown file type (expected .csv, .jsonl or .parquet, optionally .gz)")


def discover(source: SourceConfig, landing_dir: Path) -> list[Path]:
    """Files in the landing folder matching any of the source's glob patterns, sorted, no duplicates.

    An empty folder is fine (a retention job may have emptied it); a folder that does not exist is a
    wrong ``ANOMALY_LANDING_DIR``, which would otherwise ingest nothing and report no incidents."""
    if not Path(landing_dir).is_dir():
        raise LandingFileError(
            f"landing folder {landing_dir} does not exist (set ANOMALY_LANDING_DIR to the folder "
            f"holding {source.name}'s files {source.files})"
        )
    found = {
        path.resolve()
        for pattern in source.files
        for path in Path(landing_dir).glob(pattern)
        if path.is_file() and not path.name.startswith(".")
    }
    return sorted(found)


# --- raw bytes: opening, scanning lines ------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


@contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    """The file's (decompressed) bytes; a corrupt or truncated gzip raises UnreadableFile when read."""
    try:
        with gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb") as handle:
            yield handle
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise UnreadableFile(f"cannot read: {error}") from None


@dataclass(frozen=True)
class _TextScan:
    """What one pass over a text file's bytes tells the CSV reader."""

    blank: list[int]  # numbers of the empty lines (\n or \r\n only), which DuckDB's reader skips
    mixed: bool  # whether the file mixes \n and \r\n line ends, which that reader refuses
    controls: bool  # whether any byte may be a control character inside a field (else no field is screened)
    quotes: bool  # whether the file holds a quote character (without one no record can span lines)
    bare_cr: bool  # whether a \r stands anywhere but before a \n (one outside quotes fails DuckDB's reader)


def _scan_lines(path: Path) -> _TextScan:
    """Blank lines, mixed line ends, possible control characters and quotes of a text file, in one pass.

    Vectorised over chunks, so a long file costs about as much as decompressing it. Reading to the
    end also verifies a gzip file (stream end and CRC). ``controls`` errs on the safe side: it only
    lets the typing skip its per-field control-character search when no byte can be one.
    """
    blank: list[np.ndarray] = []
    base = 1  # number of the line the chunk starts in
    partial = 0  # bytes of that line seen in earlier chunks
    partial_cr = False  # whether those bytes end with \r
    crlf = lf = carriage_returns = 0  # line ends of each kind, and every \r
    controls = after_c2 = quotes = False  # after_c2: the previous chunk ended with a C1 control's first byte
    with _open_binary(path) as handle:
        while chunk := handle.read(_SCAN_CHUNK):
            data = np.frombuffer(chunk, dtype=np.uint8)
            ends = np.flatnonzero(data == 10)
            # few passes over plain ASCII with \n ends: the byte classes are counted only when present
            low = int(np.count_nonzero(data < 32))  # line ends, tabs, \r and C0 controls
            returns = int(np.count_nonzero(data == 13)) if low > len(ends) else 0
            tabs = int(np.count_nonzero(data == 9)) if low > len(ends) + returns else 0
            carriage_returns += returns
            quotes = quotes or b'"' in chunk  # memchr: stops at the first quote
            if not controls:  # C0 controls besides tab, \n and \r; DEL; C1 controls (UTF-8 \xc2\x80-\x9f)
                controls = low > tabs + len(ends) + returns or bool(after_c2 and data[0] < 0xA0)
                if not controls and np.count_nonzero(data >= 127):
                    lead = np.flatnonzero(data[:-1] == 0xC2) + 1
                    controls = bool(np.count_nonzero(data == 127) or np.count_nonzero(data[lead] < 0xA0))
                after_c2 = bool(data[-1] == 0xC2)
            if not len(ends):
                partial += len(data)
                partial_cr = bool(data[-1] == 13)
                continue
            starts = np.empty_like(ends)
            starts[0] = 0
            starts[1:] = ends[:-1] + 1
            lengths = ends - starts
            carriage = np.zeros(len(ends), dtype=bool)
            filled = lengths > 0
            carriage[filled] = data[ends[filled] - 1] == 13
            if partial and not lengths[0]:
                carriage[0] = partial_cr
            content = lengths - carriage
            if partial:
                content[0] = partial + lengths[0] - carriage[0]
            blank.append(base + np.flatnonzero(content == 0))
            crlf += int(carriage.sum())
            lf += len(ends) - int(carriage.sum())
            base += len(ends)
            partial = len(data) - int(ends[-1]) - 1
            partial_cr = partial > 0 and bool(data[-1] == 13)
    return _TextScan(
        [int(line) for part in blank for line in part],
        bool(crlf and lf),
        controls or carriage_returns > crlf,
        quotes,
        carriage_returns > crlf,
    )


def _with_lf_line_ends(path: Path, directory: Path) -> Path:
    """A copy of a text file with its ``\\r\\n`` line ends made ``\\n`` (line numbers kept)."""
    target = directory / "lf.csv"
    with _open_binary(path) as source, open(target, "wb") as out:
        held = b""  # a \r ending a chunk may start the next chunk's \r\n
        while chunk := source.read(_SCAN_CHUNK):
            chunk = held + chunk
            held = b"\r" if chunk.endswith(b"\r") else b""
            out.write(chunk[: len(chunk) - len(held)].replace(b"\r\n", b"\n"))
        out.write(held)
    return target


def _unbalanced_quote(line: bytes) -> bool:
    """Whether a CSV line leaves a quoted field open at its end (as DuckDB's reader may see it)."""
    body = line.rstrip(b"\r\n")
    if body.count(b'"') % 2:
        return True
    text = body.decode("latin-1").replace("\x00", " ")
    try:  # an even count can still open a field: p"2,"u2 (the first quote is literal)
        return len(list(csv.reader([text + "\n", "x\n"]))) == 1
    except csv.Error:
        return False


def _bare_carriage_return(line: bytes) -> bool:
    """Whether a line of a file with \n line ends holds a \r outside quotes (DuckDB's reader then fails
    the whole file: "The CSV Parser state machine reached an invalid state")."""
    body = line.rstrip(b"\n")
    at = body.find(b"\r")
    while at >= 0:
        if body.count(b'"', 0, at) % 2 == 0:
            return True
        at = body.find(b"\r", at + 1)
    return False


def _without_lines(
    path: Path, target: Path, bad: Callable[[bytes], bool], ending: bytes | None = None
) -> dict[int, str]:
    """Write to ``target`` a copy of a CSV file with every data line that is ``bad`` emptied, keeping
    its line end (``ending`` if given: the file's own), so line numbers are kept; returns the emptied
    lines' text."""
    emptied: dict[int, str] = {}
    with _open_binary(path) as source, open(target, "wb") as out:
        for number, line in enumerate(source, 1):
            if number > 1 and bad(line):
                emptied[number] = _raw_text(line.rstrip(b"\r\n"))
                own = b"\r\n" if line.endswith(b"\r\n") else b"\n" if line.endswith(b"\n") else b""
                out.write(ending if ending is not None and own else own)
            else:
                out.write(line)
    return emptied


def _raw_text(data: bytes) -> str:
    return _cap(data.decode("utf-8", errors="replace"))


def _cap(text: str) -> str:
    if len(text) <= RAW_MAX_CHARS:
        return text
    return f"{text[:RAW_MAX_CHARS]}… [{len(text) - RAW_MAX_CHARS} more characters]"


# --- reading one file into typed rows ------------------------------------------------------------


@dataclass
class _Lines:
    """What the reader must know about a text file's physical lines besides DuckDB's rows."""

    header: int  # lines before the first data line (1 for CSV, 0 for JSON lines)
    skipped: list[int]  # physical lines DuckDB produced no row for (besides its rejects)
    quarantined: dict[int, str]  # lines quarantined before DuckDB read the file: line -> raw text
    line: str = "line"  # SQL over ``landed`` numbering its rows (before the skipped lines are counted in)
    controls: bool = True  # whether a field may hold control characters (False: the search is skipped)
    # a quarantined line's reason when it is not UNTERMINATED_QUOTE
    reasons: dict[int, str] = field(default_factory=dict)


def _text_relation(
    connection: duckdb.DuckDBPyConnection, source: SourceConfig, path: Path
) -> tuple[str, _Lines | None]:
    """Create temp table ``landed`` (line, raw text fields) for one file; returns its format.

    Reject rows of CSV and JSON lines files (wrong column count, bad quoting, not UTF-8, too long)
    are left in ``reject_errors``; the returned ``_Lines`` says how to number the rows DuckDB read.
    """
    kind = file_format(path)
    if kind == "csv":
        return kind, _csv_relation(connection, source, path)
    if kind == "jsonl":
        return kind, _jsonl_relation(connection, source, path)
    literal = quote_literal(str(path))
    names = [source.timestamp.column, *(column.name for column in source.columns)]
    schema = connection.execute(f"SELECT * FROM read_parquet({literal}) LIMIT 0").description
    present = {column[0] for column in schema}
    _require_columns(source, path, present)
    select = ", ".join(
        f"CAST({quote_identifier(name)} AS VARCHAR) AS {quote_identifier(name)}"
        if name in present
        else f"NULL AS {quote_identifier(name)}"
        for name in names
    )
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE landed AS SELECT file_row_number + 1 AS line, "
        f"{select}, NULL::VARCHAR AS {TEXT_COLUMN} FROM read_parquet({literal}, file_row_number = true)"
    )
    return kind, None


def _csv_relation(connection: duckdb.DuckDBPyConnection, source: SourceConfig, path: Path) -> _Lines:
    names = [source.timestamp.column, *(column.name for column in source.columns)]
    header = _csv_header(path)
    position = {name: index for index, name in reversed(list(enumerate(header)))}
    _require_columns(source, path, set(position))
    scan = _scan_lines(path)  # also proves a gzip file complete before DuckDB reads it
    columns = "{" + ", ".join(f"'c{index}': 'VARCHAR'" for index in range(len(header))) + "}"
    select = ", ".join(
        f"c{position[name]} AS {quote_identifier(name)}"
        if name in position
        else f"NULL AS {quote_identifier(name)}"
        for name in names
    )

    def read(target: Path) -> None:
        # rows keep the file's order, so a row's rowid numbers it (cheaper than row_number() over the read)
        _clear_rejects(connection)
        connection.execute(
            f"CREATE OR REPLACE TEMP TABLE landed AS SELECT {select}, NULL::VARCHAR AS {TEXT_COLUMN} "
            f"FROM read_csv({quote_literal(str(target))}, "
            f"columns = {columns}, header = true, auto_detect = false, delim = ',', quote = '\"', "
            "escape = '\"', store_rejects = true)"
        )

    stray: dict[int, str] = {}
    unbalanced: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="anomaly-ingest-") as directory:
        # DuckDB's reader refuses a file mixing line ends: it reads a copy with \n ends instead
        target = _with_lf_line_ends(path, Path(directory)) if scan.mixed else path
        try:
            read(target)
        except duckdb.Error:
            if not scan.bare_cr:
                raise
            # one \r outside quotes failed the whole file: read it (with \n ends, so that a \r left before
            # one is a stray too) without the lines holding one
            lf = target if scan.mixed else _with_lf_line_ends(path, Path(directory))
            target = Path(directory) / "no_bare_cr.csv"
            stray = _without_lines(lf, target, _bare_carriage_return, b"\n")
            read(target)
        if scan.quotes and _records_span_lines(connection, names):
            # a quote left open swallowed the lines after it: read again without the lines that open one
            copy = Path(directory) / "unquoted.csv"
            unbalanced = _without_lines(target, copy, lambda line: b'"' in line and _unbalanced_quote(line))
            if unbalanced:
                read(copy)
    emptied = {**stray, **unbalanced}
    return _Lines(
        header=1,
        skipped=sorted(set(scan.blank) | set(emptied)),
        quarantined=emptied,
        line="rowid + 2",
        controls=scan.controls or bool(emptied),
        reasons=dict.fromkeys(stray, BARE_CARRIAGE_RETURN),
    )


def _records_span_lines(connection: duckdb.DuckDBPyConnection, names: list[str]) -> bool:
    fields = ", ".join(f"coalesce({quote_identifier(name)}, '')" for name in names)
    spanning = connection.execute(
        "SELECT (SELECT count(*) FROM reject_errors WHERE contains(trim(csv_line, chr(13) || chr(10)), chr(10))) "
        f"+ (SELECT count(*) FROM landed WHERE contains(concat({fields}), chr(10)))"
    ).fetchone()[0]
    return bool(spanning)


def _jsonl_relation(connection: duckdb.DuckDBPyConnection, source: SourceConfig, path: Path) -> _Lines:
    literal = quote_literal(str(path))
    names = [source.timestamp.column, *(column.name for column in source.columns)]
    _check_json_start(path)
    extracted = ", ".join(
        f"CASE WHEN __valid THEN json_extract_string({TEXT_COLUMN}, "
        f"{quote_literal('$.' + name)}) END AS {quote_identifier(name)}"
        for name in names
    )
    _clear_rejects(connection)
    # number every line first, then drop blank ones: they are not events, as in CSV
    connection.execute(
        f"CREATE OR REPLACE TEMP TABLE landed AS SELECT line, {extracted}, {TEXT_COLUMN} FROM ("
        f"SELECT *, {_strict_json_valid(TEXT_COLUMN)} AS __valid FROM (SELECT row_number() OVER () AS line, "
        f"{TEXT_COLUMN} FROM read_csv({literal}, columns = {{'{TEXT_COLUMN}': 'VARCHAR'}}, "
        "header = false, delim = E'\\x01', quote = '', escape = '', auto_detect = false, strict_mode = false, "
        f"store_rejects = true)) WHERE trim(coalesce({TEXT_COLUMN}, '')) <> '')"
    )
    required = [source.timestamp.column, *(column.name for column in source.columns if column.required)]
    counts = connection.execute(
        f"SELECT count(*), {', '.join(f'count(*) FILTER (WHERE json_exists({TEXT_COLUMN}, ?))' for _ in required)} "
        f"FROM landed WHERE json_valid({TEXT_COLUMN}) AND json_type({TEXT_COLUMN}) = 'OBJECT'",
        [f"$.{name}" for name in required],
    ).fetchone()
    missing = [name for name, count in zip(required, counts[1:], strict=True) if count == 0]
    if counts[0] and missing:
        raise LandingFileError(
            f"{path}: missing required field(s) {missing} for source {source.name!r}: "
            f"none of its {counts[0]} JSON objects has them"
        )
    return _Lines(header=0, skipped=[], quarantined={})


def _strict_json_valid(text: str) -> str:
    """SQL: whether ``text`` is JSON by RFC 8259 (a trailing comma or NaN makes it malformed, as for
    Spark's parser); the string-blind regex runs only on a line that may hold one."""
    lenient = quote_literal(LENIENT_JSON)
    return (
        f"CASE WHEN NOT json_valid({text}) THEN false WHEN NOT regexp_matches({text}, {lenient}) THEN true "
        f"ELSE NOT regexp_matches(regexp_replace({text}, {quote_literal(JSON_STRING)}, '\"\"', 'g'), {lenient}) END"
    )


def _check_json_start(path: Path, verify_gzip: bool = True) -> None:
    """Raise UnreadableFile when the first non-blank line is binary; reading it all verifies a gzip
    (the Spark engine skips that: its own reader checks the gzip)."""
    with _open_binary(path) as handle:
        first = b""
        while not first.strip():
            line = handle.readline(1 << 20)
            if not line:
                break
            first = line
        if verify_gzip and _is_gzip(path):
            while handle.read(_SCAN_CHUNK):
                pass
    if re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", first):
        raise UnreadableFile("binary content where JSON lines were expected")


def _csv_header(path: Path) -> list[str]:
    """Column names from the first line; raises UnreadableFile when it is not a text header."""
    with _open_binary(path) as handle:  # a corrupt gzip raises UnreadableFile here
        first = handle.readline(1 << 20)
        more = bool(first.strip()) or bool(handle.read(1))
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UnreadableFile(f"cannot read a CSV header: {error}") from None
    if not text.strip():
        raise UnreadableFile("blank first line where the CSV header was expected" if more else EMPTY_CSV)
    if any(ord(char) < 32 and char not in "\t\r\n" for char in text):
        raise UnreadableFile("binary content where a CSV header was expected")
    try:
        names = next(csv.reader([text]))
    except csv.Error as error:  # e.g. bare carriage returns (old Mac line ends) inside the line
        raise UnreadableFile(f"cannot read a CSV header: {error}") from None
    return [name.strip() for name in names]


def _require_columns(source: SourceConfig, path: Path, present: set[str]) -> None:
    required = [source.timestamp.column, *(column.name for column in source.columns if column.required)]
    missing = [name for name in required if name not in present]
    if missing:
        raise LandingFileError(
            f"{path}: missing required column(s) {missing} for source {source.name!r}; "
            f"the file has {sorted(present)}"
        )


def _shown(expression: str) -> str:
    """SQL: a value echoed in a reason, shortened and with control characters made visible."""
    return (
        f"regexp_replace(left({expression}, {SHOWN_MAX_CHARS}), {quote_literal(CONTROL_CHARACTERS)}, '?', 'g') "
        f"|| CASE WHEN length({expression}) > {SHOWN_MAX_CHARS} THEN '…' ELSE '' END"
    )


def _json_type_checks(source: SourceConfig) -> list[str]:
    """CASE branches: a text column given a JSON boolean, object or array (a number is kept as its text,
    as numeric ids are). Only a value that reads as one (``true``, ``{...``) has its JSON type looked up."""
    checks = []
    for column in source.columns:
        if column.type == "number":
            continue  # 'true' or '{...' is not a number anyway
        name, path = quote_identifier(column.name), quote_literal(f"$.{column.name}")
        kind = f"json_type({TEXT_COLUMN}, {path})"
        checks.append(
            f"WHEN ({name} IN ('true', 'false') OR left({name}, 1) IN ('{{', '[')) "
            f"AND {kind} IN ('BOOLEAN', 'OBJECT', 'ARRAY') "
            f"THEN 'wrong JSON type in {column.name}: ' || lower({kind}) || ' (expected a string)'"
        )
    return checks


def _trimmed(expression: str) -> str:
    """SQL: ``trim(expression)``, skipped for ASCII values without an outer space (trim removes only
    spaces and Unicode white space, and copies every value it is given: most of the typing's time)."""
    may_trim = f"prefix({expression}, ' ') OR suffix({expression}, ' ') OR strlen({expression}) <> length({expression})"
    return f"CASE WHEN {may_trim} THEN trim({expression}) ELSE {expression} END"


def _typed_sql(
    source: SourceConfig,
    path: Path,
    kind: str,
    line: str = "line",
    controls: bool = True,
    every_raw: bool = False,
) -> str:
    """SELECT over ``landed`` giving typed columns plus ``reason`` (NULL for a good row).

    ``line`` numbers the rows of ``landed``; ``controls=False`` says no field holds a control
    character (a byte scan of the file proved it), so none is searched for. Built in layers so that
    each costly expression runs once per row: trimmed values and the parsed timestamp are computed
    once and reused by the checks and the output. A timestamp in the configured format is taken
    at once; only the others go through the ISO fallback, the offset and the zone checks. Only bad
    rows keep their raw text, unless ``every_raw``: the replayed events found later ask for theirs.
    """
    ts = quote_identifier(source.timestamp.column)
    zone, fmt = source.timestamp.timezone, source.timestamp.format
    # an offset after a space (10:00:00 +02:00) is an offset too
    offset_joined = r"regexp_replace(__ts, '\s+([+-]\d{2}(?::?\d{2})?)$', '\1')"
    iso = f"try_cast(CASE WHEN regexp_full_match(__ts, {quote_literal(ISO_TIMESTAMP)}) THEN {offset_joined} END AS TIMESTAMPTZ)"
    offset_hours = r"regexp_extract(__ts, ':\d{2}(?:\.\d+)?\s*([+-]\d{2})(?::?\d{2})*$', 1)"
    configured = f"try_strptime(__ts, {quote_literal(fmt)})"
    if zone == "UTC" and "%z" not in fmt and "%Z" not in fmt:  # a naive UTC time needs no conversion
        parsed = f"coalesce({configured}, timezone('UTC', {iso}))"
    else:
        parsed = f"timezone('UTC', coalesce(timezone({quote_literal(zone)}, {configured}), {iso}))"
    # the common case: a naive time in the configured format, starting with a digit (strptime reads 'epoch');
    # with an offset in the format the offset checks below must see every row
    if "%z" in fmt or "%Z" in fmt:
        direct = "NULL::TIMESTAMP"
    elif zone == "UTC":
        direct = f"CASE WHEN ascii(__ts) BETWEEN 48 AND 57 THEN {configured} END"
    else:
        direct = (
            f"CASE WHEN ascii(__ts) BETWEEN 48 AND 57 THEN "
            f"timezone('UTC', timezone({quote_literal(zone)}, {configured})) END"
        )
    # an offset follows a ':' (of the time), so without a sign after the first ':' there is none
    after_colon = "substr(__ts, strpos(__ts, ':'))"
    signed = f"strpos(__ts, ':') > 0 AND (contains({after_colon}, '+') OR contains({after_colon}, '-'))"
    bad_offset = (
        f"CASE WHEN __direct IS NOT NULL THEN false WHEN {signed} THEN "
        f"coalesce(abs(try_cast(nullif({offset_hours}, '') AS INTEGER)) > {MAX_OFFSET_HOURS}, false) ELSE false END"
    )
    earliest = quote_literal(source.start_date.isoformat())
    latest = quote_literal((datetime.now(UTC) + timedelta(days=2)).date().isoformat())
    limit = source.max_field_length
    checks = [
        # landed holds no values of JSON that is not strict: only a line without a timestamp is checked
        f"WHEN {TEXT_COLUMN} IS NOT NULL AND (NOT json_valid({TEXT_COLUMN}) OR ({ts} IS NULL "
        f"AND NOT ({_strict_json_valid(TEXT_COLUMN)}))) THEN 'malformed JSON'"
        if kind == "jsonl"
        else None,
        f"WHEN {TEXT_COLUMN} IS NOT NULL AND json_type({TEXT_COLUMN}) <> 'OBJECT' THEN 'JSON line is not an object'"
        if kind == "jsonl"
        else None,
        *(_json_type_checks(source) if kind == "jsonl" else []),
        f"WHEN length({ts}) > {limit} THEN 'field {source.timestamp.column} longer than {limit} characters'",
        "WHEN __ts IS NULL OR __ts = '' THEN 'missing timestamp'",
        f"WHEN bad_offset THEN 'timestamp offset beyond ±{MAX_OFFSET_HOURS}:00 ' || {_shown(ts)}",
        f"WHEN ts_utc IS NULL AND regexp_matches(__ts, {quote_literal(ZONE_ABBREVIATION)}) "
        f"THEN 'ambiguous time zone abbreviation in timestamp ' || {_shown(ts)}",
        f"WHEN ts_utc IS NULL THEN 'unparseable timestamp ' || {_shown(ts)}",
        f"WHEN ts_utc < {earliest}::TIMESTAMP OR ts_utc >= {latest}::TIMESTAMP "
        "THEN 'timestamp outside the source range ' || strftime(ts_utc, '%Y-%m-%d %H:%M:%S')",
    ]
    control = quote_literal(CONTROL_CHARACTERS)
    names = [quote_identifier(column.name) for column in source.columns]
    prepared = [
        f"{_trimmed(ts)} AS __ts",
        f"regexp_matches(concat_ws('', {', '.join(names)}), {control}) AS __control"
        if controls
        else "false AS __control",
    ]
    typed = []
    for index, (column, name) in enumerate(zip(source.columns, names, strict=True)):
        value, number = f"__value_{index}", f"__number_{index}"
        prepared.append(f"nullif({_trimmed(name)}, '') AS {value}")
        checks.append(
            f"WHEN length({name}) > {limit} THEN 'field {column.name} longer than {limit} characters'"
        )
        checks.append(
            f"WHEN __control AND regexp_matches({name}, {control}) THEN 'control characters in {column.name}'"
        )
        if column.required:
            checks.append(f"WHEN {value} IS NULL THEN 'missing {column.name}'")
        if column.type == "number":
            prepared.append(f"try_cast({value} AS DOUBLE) AS {number}")
            checks.append(
                f"WHEN {value} IS NOT NULL AND {number} IS NULL THEN 'not a number in {column.name}'"
            )
            checks.append(f"WHEN NOT isfinite({number}) THEN 'non-finite {column.name}'")
            if column.min_value is not None:
                checks.append(
                    f"WHEN {number} < {float(column.min_value)!r} THEN '{column.name} below minimum'"
                )
            typed.append(f"{number} AS {name}")
        else:
            typed.append(f"{value} AS {name}")
    reason = "CASE " + " ".join(check for check in checks if check) + " END"
    raw = TEXT_COLUMN if kind == "jsonl" else f"concat_ws(',', {ts}, {', '.join(names)})"
    capped = (
        f"CASE WHEN length({raw}) > {RAW_MAX_CHARS} THEN left({raw}, {RAW_MAX_CHARS}) || '… [' || "
        f"(length({raw}) - {RAW_MAX_CHARS}) || ' more characters]' ELSE {raw} END"
    )
    in_range = f"ts_utc >= {earliest}::TIMESTAMP AND ts_utc < {latest}::TIMESTAMP"
    numbered = "*" if line == "line" else f"{line} AS line, *"
    return (
        f"SELECT line, ts_utc AS timestamp, {', '.join(typed)}, reason, "
        f"{capped if every_raw else f'CASE WHEN reason IS NOT NULL THEN {capped} END'} AS raw, "
        f"{quote_literal(str(path))} AS source_file, CASE WHEN {in_range} THEN CAST(ts_utc AS DATE) END AS day "
        f"FROM (SELECT *, {reason} AS reason "
        # a value without a digit is no time (DuckDB's strptime reads 'infinity' and 'epoch' as 1900-01-01)
        f"FROM (SELECT *, coalesce(__direct, CASE WHEN NOT bad_offset AND regexp_matches({ts}, '\\d') "
        f"THEN {parsed} END) AS ts_utc "
        f"FROM (SELECT *, {bad_offset} AS bad_offset FROM (SELECT *, {direct} AS __direct "
        f"FROM (SELECT {numbered}, {', '.join(prepared)} FROM landed)))))"
    )


def load_file(
    connection: duckdb.DuckDBPyConnection, source: SourceConfig, path: Path, every_raw: bool = False
) -> tuple[bool, pd.DataFrame]:
    """Type one file into temp table ``typed`` (with ``reason``, ``day``, and ``raw`` for bad rows or,
    with ``every_raw``, for all).

    Returns whether the file could be read, and the quarantine rows that are not in ``typed``:
    the lines DuckDB rejected (wrong column count, bad quoting, not UTF-8), or one row for the
    whole file when it cannot be read at all.
    """
    connection.execute(f"SET TimeZone = {quote_literal(source.timestamp.timezone)}")
    connection.execute("SET preserve_insertion_order = true")  # CSV rows are numbered by their rowid
    try:
        kind, lines = _text_relation(connection, source, path)
    except LandingFileError:
        raise
    except (duckdb.Error, UnreadableFile) as error:
        connection.execute(f"CREATE OR REPLACE TEMP TABLE typed AS {_empty_typed(source)}")
        _clear_rejects(connection)
        reason = f"{UNREADABLE_FILE}: {_first_line(error)}"
        return False, pd.DataFrame([{"source_file": str(path), "line": None, "reason": reason, "raw": None}])
    numbering = {"line": lines.line, "controls": lines.controls} if lines is not None else {}
    typed = _typed_sql(source, path, kind, every_raw=every_raw, **numbering)
    connection.execute(f"CREATE OR REPLACE TEMP TABLE typed AS {typed}")
    if lines is None:
        return True, pd.DataFrame(columns=QUARANTINE_COLUMNS)
    rejects = _rejects(connection)
    _shift_lines(connection, lines.header, sorted({*lines.skipped, *rejects["covers"].explode().dropna()}))
    rejects.insert(0, "source_file", str(path))
    quarantined = pd.DataFrame(
        {
            "source_file": str(path),
            "line": list(lines.quarantined),
            "reason": [lines.reasons.get(line, UNTERMINATED_QUOTE) for line in lines.quarantined],
            "raw": list(lines.quarantined.values()),
        },
        columns=QUARANTINE_COLUMNS,
    )
    frames = [frame for frame in (rejects[QUARANTINE_COLUMNS], quarantined) if len(frame)]
    if not frames:
        return True, pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return True, pd.concat(frames, ignore_index=True).sort_values("line", ignore_index=True)


def _empty_typed(source: SourceConfig) -> str:
    typed = ", ".join(
        f"NULL::{'DOUBLE' if column.type == 'number' else 'VARCHAR'} AS {quote_identifier(column.name)}"
        for column in source.columns
    )
    return (
        f"SELECT NULL::BIGINT AS line, NULL::TIMESTAMP AS timestamp, {typed}, NULL::VARCHAR AS reason, "
        "NULL::VARCHAR AS raw, NULL::VARCHAR AS source_file, NULL::DATE AS day WHERE false"
    )


def _rejects(connection: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """DuckDB's rejected lines, one row each, with the physical lines each one covers.

    A record DuckDB still read across lines (a quote it saw open that the line scan did not) says
    so in its reason, and the lines it swallowed are counted, so later lines keep their numbers.
    """
    rejects = connection.execute(
        "WITH errors AS "
        "(SELECT line, error_type || ': ' || error_message AS error, csv_line FROM reject_errors) "
        # Sorted: a line with several errors gets the same reason whatever order the threads stored them in.
        "SELECT line, string_agg(DISTINCT error, '; ' ORDER BY error) AS reason, "
        "any_value(trim(csv_line, chr(13) || chr(10))) AS raw FROM errors GROUP BY line ORDER BY line"
    ).df()
    _clear_rejects(connection)
    spans = [raw.count("\n") + 1 if isinstance(raw, str) else 1 for raw in rejects["raw"]]
    rejects["covers"] = [
        list(range(int(line), int(line) + span)) for line, span in zip(rejects["line"], spans, strict=True)
    ]
    rejects["reason"] = [
        reason if span == 1 else f"{reason} (the record runs over lines {line}-{line + span - 1})"
        for reason, line, span in zip(rejects["reason"], rejects["line"], spans, strict=True)
    ]
    rejects["raw"] = [_cap(raw) if isinstance(raw, str) else raw for raw in rejects["raw"]]
    return rejects


def _shift_lines(connection: duckdb.DuckDBPyConnection, header: int, skipped: list[int]) -> None:
    """Rows were numbered among themselves; count the skipped physical lines before each one back in.

    ``skipped`` are the physical lines DuckDB produced no row for: rejected, blank (CSV) or
    quarantined before reading. The i-th skipped line s_i (0-based i) precedes the o-th row
    (1-based) exactly when s_i - header - i <= o, so that row's line is header + o + #{i: ...}.
    """
    if not skipped:
        return
    steps = [int(line) - header - index for index, line in enumerate(skipped)]
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE line_steps AS SELECT unnest(?::BIGINT[]) AS step", [steps]
    )
    connection.execute(
        f"UPDATE typed SET line = line + (SELECT count(*) FROM line_steps WHERE step <= typed.line - {int(header)})"
    )


def _clear_rejects(connection: duckdb.DuckDBPyConnection) -> None:
    """Reject tables are per connection and accumulate across scans: empty them after each file."""
    connection.execute("DROP TABLE IF EXISTS reject_errors")
    connection.execute("DROP TABLE IF EXISTS reject_scans")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300]


# --- where a file without valid events belongs ---------------------------------------------------


def _readable_prefix_days(source: SourceConfig, path: Path) -> list[date]:
    """Days of the valid events in the readable start of a truncated or corrupt gzip file."""
    if not _is_gzip(path) or file_format(path) == "parquet":
        return []
    with tempfile.TemporaryDirectory(prefix="anomaly-prefix-") as directory:
        prefix = Path(directory) / path.name[: -len(".gz")]
        with open(path, "rb") as compressed, open(prefix, "wb") as out:
            decompressor = zlib.decompressobj(wbits=47)  # gzip or zlib header
            pending = b""
            try:
                while block := compressed.read(1 << 20):
                    pending += decompressor.decompress(block)
                    complete = pending.rfind(b"\n") + 1
                    out.write(pending[:complete])
                    pending = pending[complete:]
                    if decompressor.eof:
                        break
            except zlib.error:
                pass  # the readable prefix ends here
        if not prefix.stat().st_size:
            return []
        connection = duckdb.connect()
        try:
            readable, _ = load_file(connection, source, prefix)
            if not readable:
                return []
            rows = connection.execute(
                "SELECT DISTINCT day FROM typed WHERE day IS NOT NULL ORDER BY 1"
            ).fetchall()
        except (duckdb.Error, LandingFileError):
            return []
        finally:
            connection.close()
    return [row[0] for row in rows]


def _day_in_name(source: SourceConfig, path: Path) -> date | None:
    """A date written in the file name (``2020-07-15`` or ``20200715``) within the source's range."""
    latest = (datetime.now(UTC) + timedelta(days=2)).date()
    for match in re.finditer(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)", path.name):
        try:
            day = date(*(int(part) for part in match.groups()))
        except ValueError:
            continue
        if source.start_date <= day < latest:
            return day
    return None


# --- the landing index ---------------------------------------------------------------------------


# 2: a file's home day is the date in its name when it holds events of that day (1: its first day)
INDEX_VERSION = 2


class LandingIndex:
    """Which days each landing file touches, cached by (size, mtime) in a JSON file; an entry indexed
    by rules older than :data:`INDEX_VERSION` is indexed again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, LandingFile] = {}
        self._changed = False
        if path.exists():
            self.entries = {key: LandingFile(**value) for key, value in json.loads(path.read_text()).items()}

    def refresh(self, source: SourceConfig, files: list[Path]) -> list[LandingFile]:
        """Entries for ``files``, reading only those that are new or changed; persists the index."""
        connection = duckdb.connect()
        result = []
        for path in files:
            entry = self.current(path)
            if entry is None:
                stat = path.stat()
                entry = self.add(_index_file(connection, source, path, stat.st_size, stat.st_mtime_ns))
            result.append(entry)
        connection.close()
        self.save()
        return result

    def current(self, path: Path) -> LandingFile | None:
        """The entry of ``path`` while its size and modification time are unchanged, else None."""
        entry, stat = self.entries.get(str(path)), path.stat()
        if entry is None or (entry.size, entry.mtime_ns, entry.version) != (
            stat.st_size,
            stat.st_mtime_ns,
            INDEX_VERSION,
        ):
            return None
        return entry

    def add(self, entry: LandingFile) -> LandingFile:
        self.entries[entry.path] = entry
        self._changed = True
        return entry

    def save(self) -> None:
        """Persist the index if entries were added since it was read."""
        if self._changed:
            document = {key: asdict(value) for key, value in sorted(self.entries.items())}
            atomic_write_bytes(self.path, json.dumps(document, indent=1).encode())
            self._changed = False


@dataclass(frozen=True)
class LandingPlan:
    """What the landing files ask of the pipeline: the days to (re)run as one range, if any, and the
    landing sensor's next cursor (per file: size, mtime and the days already asked for)."""

    first: date | None
    last: date | None
    cursor: dict[str, list]


def plan_landing_runs(
    source: SourceConfig, entries: list[LandingFile], cursor: dict[str, list], last_partition: date | None
) -> LandingPlan:
    """The days that new or changed landing files call for, as one range run in day order.

    A file's day is asked for once it is a partition (a file of today waits for tomorrow's partition,
    not forever). A changed file also asks again for the days it touched before: its events may have
    moved or gone. The range goes on ``training_days`` past the last such day, up to the last
    partition and the last day any file has, because the days after it read it (lags, then models
    trained on it). One range rather than a run per day: the days run in order, so no model is trained
    before the days it learns from. A deleted file asks for nothing (a retention job may empty the
    landing folder); re-run its days to drop its events.
    """

    def existing(days: set[date]) -> set[date]:
        return {
            day for day in days if last_partition is not None and source.start_date <= day <= last_partition
        }

    wanted: set[date] = set()
    held: set[date] = set()  # the days the files have, that are partitions
    next_cursor: dict[str, list] = {}
    for entry in entries:
        size, mtime_ns, *asked = cursor.get(entry.path, [None, None])
        done = {date.fromisoformat(day) for day in asked[0]} if asked else None
        digests = asked[1] if len(asked) > 1 else None  # per-day digests when the days were asked for
        touched = existing(entry.touched_days)
        if [size, mtime_ns] == [entry.size, entry.mtime_ns]:
            if done is not None:  # a cursor of an earlier version knows no days: all were asked for
                wanted |= touched - done
        elif digests and entry.digests:  # only the days whose rows changed (or came or went)
            changed = {
                day for day in {*digests, *entry.digests} if digests.get(day) != entry.digests.get(day)
            }
            wanted |= existing({date.fromisoformat(day) for day in changed}) | (touched - (done or set()))
        else:
            wanted |= touched | existing(done or set())
        held |= touched
        next_cursor[entry.path] = [
            entry.size,
            entry.mtime_ns,
            sorted(day.isoformat() for day in touched),
            entry.digests,
        ]
    if not wanted:
        return LandingPlan(None, None, next_cursor)
    last = min(max(wanted) + timedelta(days=source.training_days), max(held | wanted))
    return LandingPlan(min(wanted), last, next_cursor)


def _index_file(
    connection: duckdb.DuckDBPyConnection, source: SourceConfig, path: Path, size: int, mtime_ns: int
) -> LandingFile:
    readable, _ = load_file(connection, source, path)
    return _indexed(connection, source, path, size, mtime_ns, readable)


def _indexed(
    connection: duckdb.DuckDBPyConnection,
    source: SourceConfig,
    path: Path,
    size: int,
    mtime_ns: int,
    readable: bool,
) -> LandingFile:
    """The index entry of a file just read by :func:`load_file` (its rows are in ``typed``)."""
    per_day = connection.execute(
        "SELECT day, count(*), sum(hash(t)) FROM typed t GROUP BY day ORDER BY day NULLS FIRST"
    ).fetchall()
    days = [day.isoformat() for day, _, _ in per_day if day is not None]
    if days:
        named = _day_in_name(source, path)
        home = named.isoformat() if named and named.isoformat() in days else days[0]
    else:
        prefix = [] if readable else _readable_prefix_days(source, path)
        modified = max(datetime.fromtimestamp(mtime_ns / 1e9, UTC).date(), source.start_date)
        home = (prefix[0] if prefix else _day_in_name(source, path) or modified).isoformat()
    # rows without a day (no usable timestamp) are quarantined on the home day
    digests = (
        {day.isoformat() if day else home: f"{rows}:{total}" for day, rows, total in per_day}
        if readable
        else {}
    )
    return LandingFile(str(path), size, mtime_ns, days, home, digests, INDEX_VERSION)


def quarantine_day(entry: LandingFile) -> date:
    """Where rows without a usable timestamp go: the file's home day (see the module docstring)."""
    return date.fromisoformat(entry.home_day)


# --- ingesting a window of days ------------------------------------------------------------------


@dataclass
class IngestedWindow:
    """Per day: the SQL of its events in ``connection`` and its quarantine rows."""

    connection: duckdb.DuckDBPyConnection
    quarantine: dict[date, pd.DataFrame]
    files: dict[date, list[str]]

    def events_sql(self, day: date) -> str:
        start = quote_literal(day.isoformat())
        end = quote_literal((day + timedelta(days=1)).isoformat())
        return (
            f"SELECT * EXCLUDE (reason, raw, day, source_file, line), source_file, line FROM events WHERE timestamp >= {start}::TIMESTAMP "
            f"AND timestamp < {end}::TIMESTAMP ORDER BY timestamp, source_file, line"
        )


def ingest_window(source: SourceConfig, entries: list[LandingFile], days: list[date]) -> IngestedWindow:
    """Read every file touching ``days`` once into DuckDB (view ``events``); collect quarantine."""
    return _ingest(source, [(Path(entry.path), entry) for entry in entries], days, None)


def ingest_landing(
    source: SourceConfig, index: LandingIndex, paths: list[Path], days: list[date]
) -> IngestedWindow:
    """:meth:`LandingIndex.refresh` and :func:`ingest_window` in one pass: a new or changed file is read
    once, indexed from that read and, when it touches ``days``, ingested from it too (reading it a
    second time for the index was half of a first ingest's time). The index is saved."""
    window = _ingest(source, [(path, index.current(path)) for path in paths], days, index)
    index.save()
    return window


def _ingest(
    source: SourceConfig,
    candidates: list[tuple[Path, LandingFile | None]],
    days: list[date],
    index: LandingIndex | None,
) -> IngestedWindow:
    """Files whose entry is None are read, then indexed into ``index``; the others only when they touch ``days``.

    Each file's typed rows stay in a table of their own (``typed_<n>``, by path in ``tables``) and view
    ``events`` is their good rows: a file whose events all fall on ``days`` is kept as read, without
    copying millions of rows into one table; only a file reaching beyond ``days`` is cut down to them.
    """
    wanted = set(days)
    connection = duckdb.connect()
    tables: dict[str, str] = {}
    quarantine: dict[date, list[pd.DataFrame]] = {day: [] for day in days}
    files: dict[date, list[str]] = {day: [] for day in days}
    for path, known in sorted(candidates, key=lambda candidate: str(candidate[0])):
        if known is not None and not known.touched_days & wanted:
            continue
        # a new or changed file's size and time before the read: one appended to meanwhile is read again
        stat = path.stat() if known is None else None
        readable, file_rows = load_file(connection, source, path)
        if known is None:  # new or changed: indexed from this read (only ingest_landing passes these)
            assert index is not None and stat is not None
            known = index.add(_indexed(connection, source, path, stat.st_size, stat.st_mtime_ns, readable))
        entry = known
        touched = entry.touched_days & wanted
        if not touched:
            continue
        for day in touched:
            files[day].append(entry.path)
        home = quarantine_day(entry)
        if home in wanted and len(file_rows):
            quarantine[home].append(file_rows)
        if not readable:
            continue
        # a bad row belongs to its own day when its timestamp is usable, else to the file's home day
        bad = connection.execute(
            "SELECT source_file, line, reason, raw, coalesce(day, ?::DATE) AS day FROM typed WHERE reason IS NOT NULL",
            [home],
        ).df()
        _add_by_day(quarantine, bad)
        table = tables[entry.path] = f"typed_{len(tables)}"
        if {date.fromisoformat(day) for day in entry.days} <= wanted:
            connection.execute(f"ALTER TABLE typed RENAME TO {table}")
        else:
            connection.execute(
                f"CREATE TEMP TABLE {table} AS SELECT * FROM typed WHERE reason IS NULL "
                "AND day IN (SELECT unnest(?::DATE[]))",
                [sorted(wanted)],
            )
    parts = [f"SELECT * FROM {table} WHERE reason IS NULL" for table in tables.values()]
    connection.execute(f"CREATE TEMP VIEW events AS {' UNION ALL '.join(parts) or _empty_typed(source)}")
    _add_by_day(quarantine, _take_replayed_events(connection, source, tables))
    return IngestedWindow(
        connection,
        {day: _concat_quarantine(frames) for day, frames in quarantine.items()},
        files,
    )


def _add_by_day(quarantine: dict[date, list[pd.DataFrame]], rows: pd.DataFrame) -> None:
    for day, group in rows.groupby(pd.to_datetime(rows["day"]).dt.date):
        if day in quarantine:
            quarantine[day].append(group[QUARANTINE_COLUMNS])


def _take_replayed_events(
    connection: duckdb.DuckDBPyConnection, source: SourceConfig, tables: dict[str, str]
) -> pd.DataFrame:
    """Move events that repeat another file's events out of ``events`` (out of the files' ``tables``);
    returns their quarantine rows.

    An event (timestamp and every column) held k times by one file and m times by an earlier one
    (by path) keeps max(k, m) copies: identical events within a file are separate events, copies
    across files are replays. The result does not depend on which file is read first.
    """
    if not _files_overlap(connection):
        return pd.DataFrame(columns=[*QUARANTINE_COLUMNS, "day"])
    key = ", ".join(
        quote_identifier(name) for name in ["timestamp", *(column.name for column in source.columns)]
    )
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE replayed AS SELECT source_file, line, day, "
        "'duplicate event: also in ' || first_file || ' line ' || first_line AS reason FROM ("
        f"SELECT *, max(copies) OVER (PARTITION BY {key} ORDER BY source_file "
        "GROUPS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before, "
        f"first_value(source_file) OVER (PARTITION BY {key} ORDER BY source_file, line) AS first_file, "
        f"first_value(line) OVER (PARTITION BY {key} ORDER BY source_file, line) AS first_line "
        f"FROM (SELECT *, row_number() OVER (PARTITION BY {key}, source_file ORDER BY line) AS copy, "
        f"count(*) OVER (PARTITION BY {key}, source_file) AS copies FROM events)) "
        "WHERE copy <= coalesce(before, 0)"
    )
    for path, table in tables.items():
        connection.execute(
            f"DELETE FROM {table} WHERE line IN (SELECT line FROM replayed WHERE source_file = ?)", [path]
        )
    rows = connection.execute(
        "SELECT source_file, line, reason, day FROM replayed ORDER BY source_file, line"
    ).df()
    connection.execute("DROP TABLE replayed")
    rows["raw"] = _raw_texts(connection, source, rows)
    return rows


def _raw_texts(
    connection: duckdb.DuckDBPyConnection, source: SourceConfig, rows: pd.DataFrame
) -> list[str | None]:
    """The raw text of these good rows (``source_file``, ``line``). Typing keeps none for good rows, as
    it costs a copy of every event, so their files are read again: replays are rare."""
    texts: dict[tuple[str, int], str] = {}
    for path, group in rows.groupby("source_file"):
        load_file(connection, source, Path(path), every_raw=True)
        found = connection.execute(
            "SELECT line, raw FROM typed WHERE line IN (SELECT unnest(?::BIGINT[]))", [group["line"].tolist()]
        ).fetchall()
        texts.update({(path, line): raw for line, raw in found})
    return [texts.get((path, line)) for path, line in zip(rows["source_file"], rows["line"], strict=True)]


def _files_overlap(connection: duckdb.DuckDBPyConnection) -> bool:
    """Whether two files' event time ranges overlap: a replay repeats a timestamp, so without an
    overlap there is none, and the windowed sort over every event can be skipped (logs usually
    follow each other in time)."""
    ranges = connection.execute(
        "SELECT min(timestamp), max(timestamp) FROM events GROUP BY source_file ORDER BY 1"
    ).fetchall()
    reach = None
    for start, end in ranges:
        if reach is not None and start <= reach:
            return True
        reach = end if reach is None else max(reach, end)
    return False


def _concat_quarantine(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame(
            {
                "source_file": pd.Series(dtype="object"),
                "line": pd.Series(dtype="Int64"),
                "reason": pd.Series(dtype="object"),
                "raw": pd.Series(dtype="object"),
            }
        )
    types = {"source_file": "object", "line": "Int64", "reason": "object", "raw": "object"}
    result = pd.concat([frame[QUARANTINE_COLUMNS].astype(types) for frame in frames], ignore_index=True)
    return result.sort_values(["source_file", "line"], ignore_index=True)
