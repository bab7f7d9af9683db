"""Raw log ingestion with DuckDB: landing files → typed UTC events, or quarantine rows with reasons.

Every landing file is read as text (CSV, CSV.gz, JSON lines, Parquet cast to text), then typed
in SQL. A row whose timestamp or required values cannot be parsed goes to quarantine with its
file, line and reason; a file DuckDB cannot read at all (truncated gzip, binary garbage) is
quarantined as a file and does not stop the other files. A file that lacks a required column
is a configuration or producer error, not a bad row: it fails with a message naming both.

A small landing index (JSON in the warehouse) remembers which days each file touches, keyed by
size and modification time, so a daily run reads only the files that hold that day and the
landing sensor knows which partitions a new or changed file affects.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd

from anomaly_dagster.config import SourceConfig
from anomaly_dagster.sql import quote_identifier, quote_literal
from anomaly_dagster.storage import atomic_write_bytes

QUARANTINE_COLUMNS = ["source_file", "line", "reason", "raw"]
TEXT_COLUMN = "_line_text"


class LandingFileError(ValueError):
    """A landing file that cannot be ingested as configured (e.g. a required column is missing)."""


class UnreadableFile(Exception):
    """A file with no usable content (empty, binary, corrupt): quarantined whole, others go on."""


@dataclass(frozen=True)
class LandingFile:
    """A landing file's identity (size and mtime) and the days its valid events fall on."""

    path: str
    size: int
    mtime_ns: int
    days: list[str]
    home_day: str

    @property
    def touched_days(self) -> set[date]:
        return {date.fromisoformat(day) for day in [*self.days, self.home_day]}


def file_format(path: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the file name (``.gz`` allowed on text formats)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".csv", ".tsv", ".txt", ".log")):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise LandingFileError(f"{path}: unknown file type (expected .csv, .jsonl or .parquet, optionally .gz)")


def discover(source: SourceConfig, landing_dir: Path) -> list[Path]:
    """Files in the landing folder matching any of the source's glob patterns, sorted, no duplicates."""
    found = {
        path.resolve()
        for pattern in source.files
        for path in Path(landing_dir).glob(pattern)
        if path.is_file() and not path.name.startswith(".")
    }
    return sorted(found)


# --- reading one file into typed rows ------------------------------------------------------------


def _text_relation(connection: duckdb.DuckDBPyConnection, source: SourceConfig, path: Path) -> str:
    """Create temp table ``landed`` (line, raw text fields) for one file; returns its format.

    Reject rows of CSV files (wrong column count, bad quoting) are left in ``reject_errors``.
    """
    literal = quote_literal(str(path))
    names = [source.timestamp.column, *(column.name for column in source.columns)]
    kind = file_format(path)
    if kind == "csv":
        header = _csv_header(path)
        position = {name: index for index, name in reversed(list(enumerate(header)))}
        _require_columns(source, path, set(position))
        columns = "{" + ", ".join(f"'c{index}': 'VARCHAR'" for index in range(len(header))) + "}"
        select = ", ".join(
            f"c{position[name]} AS {quote_identifier(name)}"
            if name in position
            else f"NULL AS {quote_identifier(name)}"
            for name in names
        )
        connection.execute(
            "CREATE OR REPLACE TEMP TABLE landed AS SELECT row_number() OVER () + 1 AS line, "
            f"{select}, NULL::VARCHAR AS {TEXT_COLUMN} FROM read_csv({literal}, columns = {columns}, header = true, "
            "auto_detect = false, delim = ',', quote = '\"', escape = '\"', store_rejects = true)"
        )
    elif kind == "jsonl":
        extracted = ", ".join(
            f"CASE WHEN json_valid({TEXT_COLUMN}) THEN json_extract_string({TEXT_COLUMN}, "
            f"{quote_literal('$.' + name)}) END AS {quote_identifier(name)}"
            for name in names
        )
        # number every line first, then drop blank ones: they are not events, as in CSV
        connection.execute(
            "CREATE OR REPLACE TEMP TABLE landed AS SELECT * FROM (SELECT row_number() OVER () AS line, "
            f"{extracted}, {TEXT_COLUMN} FROM read_csv({literal}, columns = {{'{TEXT_COLUMN}': 'VARCHAR'}}, "
            "header = false, delim = E'\\x01', quote = '', escape = '', auto_detect = false, strict_mode = false)) "
            f"WHERE trim(coalesce({TEXT_COLUMN}, '')) <> ''"
        )
    else:
        schema = connection.execute(f"SELECT * FROM read_parquet({literal}) LIMIT 0").description
        _require_columns(source, path, {column[0] for column in schema})
        present = {column[0] for column in schema}
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
    return kind


def _csv_header(path: Path) -> list[str]:
    """Column names from the first line; raises UnreadableFile when it is not a text header."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            first = handle.readline(1 << 20)
        text = first.decode("utf-8-sig")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise UnreadableFile(f"cannot read a CSV header: {error}") from None
    if not text.strip():
        raise UnreadableFile("empty file (no header line)")
    if any(ord(char) < 32 and char not in "\t\r\n" for char in text):
        raise UnreadableFile("binary content where a CSV header was expected")
    return [name.strip() for name in next(csv.reader([text]))]


def _require_columns(source: SourceConfig, path: Path, present: set[str]) -> None:
    required = [source.timestamp.column, *(column.name for column in source.columns if column.required)]
    missing = [name for name in required if name not in present]
    if missing:
        raise LandingFileError(
            f"{path}: missing required column(s) {missing} for source {source.name!r}; "
            f"the file has {sorted(present)}"
        )


def _typed_sql(source: SourceConfig, path: Path, kind: str) -> str:
    """SELECT over ``landed`` giving typed columns plus ``reason`` (NULL for a good row)."""
    ts = quote_identifier(source.timestamp.column)
    parsed = (
        f"timezone('UTC', coalesce(timezone({quote_literal(source.timestamp.timezone)}, "
        f"try_strptime(trim({ts}), {quote_literal(source.timestamp.format)})), "
        f"try_cast(trim({ts}) AS TIMESTAMPTZ)))"
    )
    earliest = quote_literal(source.start_date.isoformat())
    latest = quote_literal((datetime.now(UTC) + timedelta(days=2)).date().isoformat())
    checks = [
        f"WHEN {TEXT_COLUMN} IS NOT NULL AND NOT json_valid({TEXT_COLUMN}) THEN 'malformed JSON'"
        if kind == "jsonl"
        else None,
        f"WHEN {ts} IS NULL OR trim({ts}) = '' THEN 'missing timestamp'",
        f"WHEN ts_utc IS NULL THEN 'unparseable timestamp ' || {ts}",
        f"WHEN ts_utc < {earliest}::TIMESTAMP OR ts_utc >= {latest}::TIMESTAMP "
        "THEN 'timestamp outside the source range ' || strftime(ts_utc, '%Y-%m-%d %H:%M:%S')",
    ]
    typed = []
    for column in source.columns:
        name = quote_identifier(column.name)
        value = f"nullif(trim({name}), '')"
        checks.append(
            f"WHEN length({name}) > {source.max_field_length} THEN "
            f"'field {column.name} longer than {source.max_field_length} characters'"
        )
        if column.required:
            checks.append(f"WHEN {value} IS NULL THEN 'missing {column.name}'")
        if column.type == "number":
            number = f"try_cast({value} AS DOUBLE)"
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
    raw = (
        TEXT_COLUMN
        if kind == "jsonl"
        else "concat_ws(',', "
        + ", ".join(quote_identifier(n) for n in [source.timestamp.column, *(c.name for c in source.columns)])
        + ")"
    )
    in_range = f"ts_utc >= {earliest}::TIMESTAMP AND ts_utc < {latest}::TIMESTAMP"
    return (
        f"SELECT line, ts_utc AS timestamp, {', '.join(typed)}, {reason} AS reason, {raw} AS raw, "
        f"{quote_literal(str(path))} AS source_file, CASE WHEN {in_range} THEN CAST(ts_utc AS DATE) END AS day "
        f"FROM (SELECT *, {parsed} AS ts_utc FROM landed)"
    )


def load_file(
    connection: duckdb.DuckDBPyConnection, source: SourceConfig, path: Path
) -> tuple[bool, pd.DataFrame]:
    """Type one file into temp table ``typed`` (with ``reason`` and ``day``).

    Returns whether the file could be read, and the quarantine rows that are not in ``typed``:
    the CSV lines DuckDB rejected (wrong column count, bad quoting), or one row for the whole
    file when it cannot be read at all.
    """
    connection.execute(f"SET TimeZone = {quote_literal(source.timestamp.timezone)}")
    try:
        kind = _text_relation(connection, source, path)
    except LandingFileError:
        raise
    except (duckdb.Error, UnreadableFile) as error:
        connection.execute(f"CREATE OR REPLACE TEMP TABLE typed AS {_empty_typed(source)}")
        _clear_rejects(connection)
        reason = f"unreadable file: {_first_line(error)}"
        return False, pd.DataFrame([{"source_file": str(path), "line": None, "reason": reason, "raw": None}])
    connection.execute(f"CREATE OR REPLACE TEMP TABLE typed AS {_typed_sql(source, path, kind)}")
    if kind != "csv":
        return True, pd.DataFrame(columns=QUARANTINE_COLUMNS)
    _shift_lines_past_rejects(connection, path)
    return True, _reject_quarantine(connection, path)


def _empty_typed(source: SourceConfig) -> str:
    typed = ", ".join(
        f"NULL::{'DOUBLE' if column.type == 'number' else 'VARCHAR'} AS {quote_identifier(column.name)}"
        for column in source.columns
    )
    return (
        f"SELECT NULL::BIGINT AS line, NULL::TIMESTAMP AS timestamp, {typed}, NULL::VARCHAR AS reason, "
        "NULL::VARCHAR AS raw, NULL::VARCHAR AS source_file, NULL::DATE AS day WHERE false"
    )


def _shift_lines_past_rejects(connection: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Good rows were numbered among themselves; count the rejected and blank lines before each one back in.

    DuckDB's CSV reader skips empty lines without a trace, so they are found with a one-column scan.
    """
    # The i-th rejected or blank line r_i (0-based i, 1 header line) precedes the o-th good row exactly
    # when r_i - 1 - i <= o, so the good row's line is o + 1 + #{i : r_i - 1 - i <= o}.
    blank = (
        f"SELECT line FROM (SELECT row_number() OVER () AS line, {TEXT_COLUMN} FROM read_csv("
        f"{quote_literal(str(path))}, columns = {{'{TEXT_COLUMN}': 'VARCHAR'}}, header = false, delim = E'\\x01', "
        f"quote = '', escape = '', auto_detect = false, strict_mode = false)) WHERE {TEXT_COLUMN} IS NULL"
    )
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE reject_steps AS SELECT line - 1 - (row_number() OVER (ORDER BY line) - 1) "
        f"AS step FROM (SELECT DISTINCT line FROM reject_errors UNION {blank})"
    )
    if connection.execute("SELECT count(*) FROM reject_steps").fetchone()[0]:
        connection.execute(
            "UPDATE typed SET line = line + (SELECT count(*) FROM reject_steps WHERE step <= typed.line - 1)"
        )


def _reject_quarantine(connection: duckdb.DuckDBPyConnection, path: Path) -> pd.DataFrame:
    rejects = connection.execute(
        "SELECT line, string_agg(DISTINCT error_type || ': ' || error_message, '; ') AS reason, "
        "any_value(csv_line) AS raw FROM reject_errors GROUP BY line ORDER BY line"
    ).df()
    rejects.insert(0, "source_file", str(path))
    _clear_rejects(connection)
    return rejects[QUARANTINE_COLUMNS]


def _clear_rejects(connection: duckdb.DuckDBPyConnection) -> None:
    """Reject tables are per connection and accumulate across scans: empty them after each file."""
    connection.execute("DROP TABLE IF EXISTS reject_errors")
    connection.execute("DROP TABLE IF EXISTS reject_scans")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300]


# --- the landing index ---------------------------------------------------------------------------


class LandingIndex:
    """Which days each landing file touches, cached by (size, mtime) in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, LandingFile] = {}
        if path.exists():
            self.entries = {key: LandingFile(**value) for key, value in json.loads(path.read_text()).items()}

    def refresh(self, source: SourceConfig, files: list[Path]) -> list[LandingFile]:
        """Entries for ``files``, reading only those that are new or changed; persists the index."""
        connection = duckdb.connect()
        result = []
        changed = False
        for path in files:
            stat = path.stat()
            entry = self.entries.get(str(path))
            if entry is None or (entry.size, entry.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                entry = _index_file(connection, source, path, stat.st_size, stat.st_mtime_ns)
                self.entries[str(path)] = entry
                changed = True
            result.append(entry)
        connection.close()
        if changed:
            document = {key: asdict(value) for key, value in sorted(self.entries.items())}
            atomic_write_bytes(self.path, json.dumps(document, indent=1).encode())
        return result


def _index_file(
    connection: duckdb.DuckDBPyConnection, source: SourceConfig, path: Path, size: int, mtime_ns: int
) -> LandingFile:
    load_file(connection, source, path)
    days = [
        row[0].isoformat()
        for row in connection.execute(
            "SELECT DISTINCT day FROM typed WHERE day IS NOT NULL ORDER BY 1"
        ).fetchall()
    ]
    modified = datetime.fromtimestamp(mtime_ns / 1e9, UTC).date().isoformat()
    return LandingFile(str(path), size, mtime_ns, days, days[0] if days else modified)


def quarantine_day(entry: LandingFile) -> date:
    """Where rows without a usable timestamp go: the file's first valid day, else its modification day."""
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
    """Read every file touching ``days`` once into a DuckDB ``events`` table; collect quarantine."""
    wanted = set(days)
    connection = duckdb.connect()
    connection.execute(f"CREATE TEMP TABLE events AS {_empty_typed(source)}")
    quarantine: dict[date, list[pd.DataFrame]] = {day: [] for day in days}
    files: dict[date, list[str]] = {day: [] for day in days}
    for entry in entries:
        touched = entry.touched_days & wanted
        if not touched:
            continue
        for day in touched:
            files[day].append(entry.path)
        path = Path(entry.path)
        readable, file_rows = load_file(connection, source, path)
        home = quarantine_day(entry)
        if home in wanted and len(file_rows):
            quarantine[home].append(file_rows)
        if not readable:
            continue
        connection.execute(
            "INSERT INTO events SELECT * FROM typed WHERE reason IS NULL AND day IN (SELECT unnest(?::DATE[]))",
            [sorted(wanted)],
        )
        # a bad row belongs to its own day when its timestamp is usable, else to the file's home day
        bad = connection.execute(
            "SELECT source_file, line, reason, raw, coalesce(day, ?::DATE) AS day FROM typed WHERE reason IS NOT NULL",
            [home],
        ).df()
        for day, rows in bad.groupby(pd.to_datetime(bad["day"]).dt.date):
            if day in wanted:
                quarantine[day].append(rows[QUARANTINE_COLUMNS])
    return IngestedWindow(
        connection,
        {day: _concat_quarantine(frames) for day, frames in quarantine.items()},
        files,
    )


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
    result = pd.concat(frames, ignore_index=True)
    result["line"] = result["line"].astype("Int64")
    return result.sort_values(["source_file", "line"], ignore_index=True)
