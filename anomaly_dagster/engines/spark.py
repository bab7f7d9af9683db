"""The Spark engine for ``raw_events``/``quarantine`` and ``resampled``: the DuckDB engine's results, on Spark.

Same inputs (the landing index picks the files touching the window), same rules (``ingest``'s rules
for bad lines, fields, timestamps, files and replayed events, checked in the same order so a bad
row gets the same reason), same outputs (one Parquet file per day in the warehouse layout, the same
column names and types, the same lineage rows). The tests run both engines on the same files.

Line numbers are exact, as in the DuckDB engine: text files are read by Spark's text reader and
numbered from each split's record counter (:func:`numbered_lines`), Parquet rows by
``_metadata.row_index``.

Known differences, all on malformed input: a line opening a quote that never closes is always
quarantined as "unterminated quote" (DuckDB says "UNQUOTED VALUE" when it is the file's last line);
a line with several kinds of CSV error gets one reason; JSON with text after the object is judged
by Spark's JSON parser, and of a key given twice Spark reads the last value (DuckDB the first);
ISO 8601's end of day ``24:00:00`` is unparseable (DuckDB reads the next day's 00:00), and a year
beyond 9999 is shown with a sign (``+10000-01-01``) in its out-of-range reason; a file Spark cannot
read is quarantined with Spark's error, unless it is a gzip file, which Python's reader checks with
the DuckDB engine's wording.

Needs a classic (not Spark Connect) session and local paths; the engine sets the SQL options it
relies on (:data:`ENGINE_SQL_CONF`) on the session it is given.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.errors.exceptions.captured import CapturedException
from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F

from anomaly_dagster import ingest
from anomaly_dagster.config import MetricConfig, SourceConfig, TimestampConfig
from anomaly_dagster.entities import MISSING_ENTITY
from anomaly_dagster.pipeline import AssetOutput, StageContext, _record, _resample_upstream, _write
from anomaly_dagster.storage import temporary_sibling
from anomaly_dagster.warehouse import WrittenPartition

SPARK_MASTER_ENV = "ANOMALY_SPARK_MASTER"
DEFAULT_MASTER = "local[*]"

# Options the results depend on; set on every session the engine is given.
ENGINE_SQL_CONF = {
    "spark.sql.session.timeZone": "UTC",  # string <-> timestamp casts, as DuckDB's naive UTC timestamps
    "spark.sql.legacy.parquet.nanosAsLong": "true",  # pandas writes nanosecond timestamps Spark cannot read
    "spark.sql.variant.allowDuplicateKeys": "true",  # DuckDB accepts JSON objects with a repeated key too
}
SESSION_CONF = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"}
LOCAL_CONF = {
    "spark.sql.shuffle.partitions": "8",  # the default 200 is for clusters
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.memory": "2g",
}
SPARK_ERRORS = (Py4JJavaError, CapturedException)

# DuckDB's limits and messages, so that a bad line reads the same in both engines
MAX_LINE_BYTES = 2_000_000
INVALID_ENCODING = (
    "INVALID ENCODING: Invalid unicode (byte sequence mismatch) detected. This file is not utf-8 encoded."
)
UNQUOTED_VALUE = "UNQUOTED VALUE: Value with unterminated quote found."
SPACES = " \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
RE2_SPACE = r"[\t\n\f\r ]"  # RE2's \s, which DuckDB's regular expressions use
# CSV fields after a prepended comma: a quoted field (blanks around it allowed) or anything up to a comma
CSV_FIELD = r',( *"(?:[^"]|"")*" *(?=,|$)|[^,]*)'
QUOTED = r'^ *"((?:[^"]|"")*)" *$'
OPEN_QUOTE = r'(^|,) *"(?:[^"]|"")*$'  # a field opens a quote the line does not close
_DIGITS = r"\d+(_\d+)*"  # DuckDB's cast accepts single underscores between digits
NUMBER = rf"(?i)^[+-]?(({_DIGITS}\.?({_DIGITS})?|\.{_DIGITS})(e[+-]?{_DIGITS})?|inf|infinity|nan)$"
# ingest.ISO_TIMESTAMP, split: a full time of day, zoned by an offset, Z, UTC/GMT or an IANA name
_DATE, _TIME = r"\d{4,}-\d{1,2}-\d{1,2}", r"[T ]\d{2}:\d{2}:\d{2}(\.\d+)?"
ISO_LOCAL = rf"^{_DATE}{_TIME}$"
ISO_ZONED = rf"^{_DATE}{_TIME}(Z|[+-]\d{{2}}(:?\d{{2}}){{0,2}}| (UTC|GMT|[A-Za-z_]+(/[A-Za-z0-9_+-]+)+))$"
RECORD_MASK = (1 << 33) - 1  # monotonically_increasing_id: record number within the task, low 33 bits

# internal columns, named as no configured column plausibly is
DAY, QUARANTINE_DAY, HOME = "__day__", "__quarantine_day__", "__home__"
REASON, RAW, EARLY, LINE_TEXT = "__reason__", "__raw__", "__early__", "__line_text__"
OPENS, UNBALANCED, OBJECT = "__opens_quote__", "__unbalanced__", "__json_object__"
UTC_TIME, BAD_OFFSET, CONTROL = "__utc__", "__bad_offset__", "__control__"
WRONG_TYPE = "__wrong_type__"  # JSON lines: a text field given a boolean, object or array
SPANNING, JSON_FILES = "spanning_files", "json_files"  # observed per window: files with these traits

_session: SparkSession | None = None
_session_lock = threading.Lock()


def spark_session(master: str | None = None, conf: dict[str, str] | None = None) -> SparkSession:
    """The process's SparkSession, created on first use: the JVM starts once per run, not per asset.

    The master is ``master``, else ``ANOMALY_SPARK_MASTER``, else ``local[*]``. Later calls return the
    same session; asking for another master then is an error, as a process holds one SparkContext.
    """
    global _session
    wanted = master or os.environ.get(SPARK_MASTER_ENV) or DEFAULT_MASTER
    with _session_lock:
        if _session is not None and _session.sparkContext._jsc is not None:  # PySpark clears _jsc on stop()
            running = _session.sparkContext.master
            if master is not None and master != running:
                raise ValueError(f"a Spark session with master {running!r} is running; cannot use {master!r}")
            return _session
        settings = {**SESSION_CONF, **(LOCAL_CONF if wanted.startswith("local") else {}), **ENGINE_SQL_CONF}
        builder = SparkSession.builder.master(wanted).appName("anomaly_dagster")
        for key, value in {**settings, **(conf or {})}.items():
            builder = builder.config(key, value)
        _session = builder.getOrCreate()
        _session.sparkContext.setLogLevel("ERROR")
        return _session


def _configure(spark: SparkSession) -> None:
    for key, value in ENGINE_SQL_CONF.items():
        spark.conf.set(key, value)


# --- timestamps ----------------------------------------------------------------------------------

_NUMERIC_DIRECTIVES = {"Y": "yyyy", "m": "M", "d": "d", "H": "H", "M": "m", "S": "s", "I": "h", "y": "yy"}
_NUMERIC_DIRECTIVES |= {"j": "D", "f": "SSSSSS"}
_TEXT_DIRECTIVES = {"b": "MMM", "B": "MMMM", "a": "EEE", "A": "EEEE", "p": "a"}
_COMPOSITE_DIRECTIVES = {"T": "%H:%M:%S", "F": "%Y-%m-%d", "D": "%m/%d/%y", "R": "%H:%M"}


def _strftime_tokens(strftime: str) -> Iterator[str]:
    """Directives (``%Y``, ``%%``) and literal runs, with composites such as ``%T`` expanded."""
    for token in re.findall(r"%.|%$|[^%]+", strftime):
        if token.startswith("%") and token[1:] in _COMPOSITE_DIRECTIVES:
            yield from _strftime_tokens(_COMPOSITE_DIRECTIVES[token[1:]])
        else:
            yield token


def java_datetime_pattern(strftime: str) -> str:
    """Spark's pattern for a strftime format, parsing as DuckDB's ``strptime`` does.

    Single pattern letters accept unpadded numbers (``7`` and ``07``), as DuckDB does; numbers written
    without a separator between them keep fixed widths. Directives without a Spark equivalent (``%z``,
    week numbers) are refused at the start of a run, naming the directive.
    """
    tokens = list(_strftime_tokens(strftime))
    numeric = [token.startswith("%") and token[1:] in _NUMERIC_DIRECTIVES for token in tokens]
    pattern, literal = [], ""
    for position, token in enumerate(tokens):
        if not token.startswith("%") or token == "%%":
            literal += "%" if token == "%%" else token
            continue
        if literal:  # quoted whole: adjacent quoted parts would read as an escaped quote
            pattern.append("'" + literal.replace("'", "''") + "'")
            literal = ""
        if token[1:] in _NUMERIC_DIRECTIVES:
            letters = _NUMERIC_DIRECTIVES[token[1:]]
            neighbours = numeric[max(position - 1, 0) : position] + numeric[position + 1 : position + 2]
            if any(neighbours) and len(letters) == 1:
                letters *= 3 if letters == "D" else 2
            pattern.append(letters)
        elif token[1:] in _TEXT_DIRECTIVES:
            pattern.append(_TEXT_DIRECTIVES[token[1:]])
        else:
            raise ValueError(
                f"timestamp format {strftime!r}: {token} is not supported by the Spark engine "
                "(use the DuckDB engine for this source)"
            )
    if literal:
        pattern.append("'" + literal.replace("'", "''") + "'")
    return "".join(pattern)


def _local_to_utc(local: Column, zone: str) -> Column:
    """Wall-clock time in ``zone`` → UTC, resolving DST as DuckDB (ICU) does.

    A skipped time moves forward (both agree); an ambiguous time takes the later instant where Spark
    alone takes the earlier: the offset in force three hours later tells the two apart.
    """
    if zone == "UTC":
        return local
    source, utc, shift = F.lit(zone), F.lit("UTC"), F.expr("INTERVAL 3 HOURS")
    earlier = F.convert_timezone(source, utc, local)
    later = F.convert_timezone(source, utc, local + shift) - shift
    valid_later = F.convert_timezone(utc, source, later) == local
    return F.when(valid_later, F.greatest(earlier, later)).otherwise(earlier)


def _utc_timestamp(config: TimestampConfig, raw: Column) -> tuple[Column, Column]:
    """``(timestamp, bad_offset)`` by DuckDB's rules: the configured format in the source's zone, else
    ISO 8601 where an explicit offset (also after a blank) or zone name wins; offsets beyond ±18:00
    and values without a digit are not times."""
    text = _trim(raw)
    formatted = F.try_to_timestamp(text, F.lit(java_datetime_pattern(config.format))).cast("timestamp_ntz")
    joined = F.regexp_replace(text, rf"{RE2_SPACE}+([+-]\d{{2}}(?::?\d{{2}})?)$", "$1")
    hours = F.regexp_extract(text, rf":\d{{2}}(?:\.\d+)?{RE2_SPACE}*([+-]\d{{2}})(?::?\d{{2}})*$", 1)
    # a value the format (which has no offset: %z is refused) reads whole has no offset either
    beyond = F.coalesce(F.abs(F.nullif(hours, F.lit("")).try_cast("int")) > 18, F.lit(False))
    bad_offset = F.when(formatted.isNull(), beyond).otherwise(F.lit(False))
    zoned = F.when(joined.rlike(ISO_ZONED), joined.try_cast("timestamp").cast("timestamp_ntz"))
    local = F.when(joined.rlike(ISO_LOCAL), _local_to_utc(joined.try_cast("timestamp_ntz"), config.timezone))
    parsed = F.coalesce(_local_to_utc(formatted, config.timezone), zoned, local)
    return F.when(~bad_offset & raw.rlike(r"\d"), parsed), bad_offset


# --- landing files → one row per record, raw text fields -----------------------------------------


def _field(name: str) -> str:
    return f"__field_{name}__"


def _has(name: str) -> str:
    return f"__has_{name}__"


def _raw_names(source: SourceConfig) -> list[str]:
    return [source.timestamp.column, *(column.name for column in source.columns)]


def _required_names(source: SourceConfig) -> list[str]:
    return [source.timestamp.column, *(column.name for column in source.columns if column.required)]


def _hadoop_path(path: Path | str) -> str:
    """A local path as a Hadoop URI that matches only itself: glob characters escaped, commas kept."""
    escaped = re.sub(r"([\\\[\]{}*?])", r"\\\1", str(Path(path).resolve()))
    return "file://" + escaped.replace(",", "{\\,}")


def _cap(text: Column) -> Column:
    """Raw text as the DuckDB engine keeps it: at most ``RAW_MAX_CHARS`` characters and a note."""
    limit = ingest.RAW_MAX_CHARS
    note = F.concat(F.lit("… ["), (F.length(text) - limit).cast("string"), F.lit(" more characters]"))
    return F.when(F.length(text) > limit, F.concat(F.substring(text, 1, limit), note)).otherwise(text)


def _shown(value: Column) -> Column:
    """A value echoed in a reason: shortened, control characters made visible (``ingest._shown``)."""
    limit = ingest.SHOWN_MAX_CHARS
    shortened = F.regexp_replace(F.substring(value, 1, limit), ingest.CONTROL_CHARACTERS, "?")
    return F.concat(shortened, F.when(F.length(value) > limit, F.lit("…")).otherwise(F.lit("")))


def _size_setting(spark: SparkSession, key: str) -> int | None:
    """A byte size from the session's settings (``4194304b``, ``4m``), or None when unreadable."""
    match = re.fullmatch(r"(\d+)([kmgt]?)b?", (spark.conf.get(key) or "").strip().lower())
    return int(match[1]) * 1024 ** " kmgt".index(match[2] or " ") if match else None


def numbered_lines(spark: SparkSession, path: Path) -> DataFrame:
    """Every line of a text file (plain or gzip) with its 1-based number: columns ``value``, ``line``.

    Spark's text reader splits a plain file into blocks, each read from its start by one task, so a
    line's number is the lines of the blocks before it plus its record number in its task (the low
    bits of ``monotonically_increasing_id``). The block sizes come from one counting pass, which also
    checks that layout. Spark never splits a gzip file, nor one within ``openCostInBytes`` (its split
    size is at least that): those are one block and need no pass. Lines stay on the JVM: PySpark's
    ``zipWithIndex`` sends every line through Python and was 4-5 times slower.
    """
    # lines end at \n (a \r before it is dropped), as DuckDB's reader counts them: Spark's default also
    # ends a line at a lone \r, which splits a quoted value holding one and shifts every later number
    text = (
        spark.read.option("lineSep", "\n")
        .text(_hadoop_path(path))
        .select(
            F.regexp_replace("value", "\r\\z", "").alias("value"),
            F.col("_metadata.file_block_start").alias("block"),
            F.monotonically_increasing_id().bitwiseAND(F.lit(RECORD_MASK)).alias("record"),
        )
    )
    unsplit = _size_setting(spark, "spark.sql.files.openCostInBytes") or 0
    offset = F.lit(0)
    if not path.name.lower().endswith(".gz") and path.stat().st_size > unsplit:
        blocks = text.groupBy("block").agg(F.count("*"), F.min("record"), F.max("record")).orderBy("block")
        offsets, lines = [], 0
        for block, count, first, last in blocks.collect():
            if (first, last) != (0, count - 1):
                raise RuntimeError(f"{path}: a block of Spark's text reader was not read whole by one task")
            offsets += [F.lit(block), F.lit(lines)]
            lines += count
        if len(offsets) > 2:
            offset = F.try_element_at(F.create_map(*offsets), F.col("block"))
    return text.select("value", (offset + F.col("record") + 1).alias("line"))


def _line_rejects(value: Column) -> Column:
    """What DuckDB's reader rejects in any text line: invalid UTF-8, lines over its maximum size."""
    size = F.octet_length(value)
    too_long = F.concat(
        F.lit(f"LINE SIZE OVER MAXIMUM: Maximum line size of {MAX_LINE_BYTES} bytes exceeded. Actual Size:"),
        size.cast("string"),
        F.lit(" bytes."),
    )
    return F.when(size > MAX_LINE_BYTES, too_long).when(~F.is_valid_utf8(value), F.lit(INVALID_ENCODING))


def _line_text(value: Column) -> Column:
    """A line as quarantine shows it: invalid bytes as ``?`` (DuckDB), capped."""
    return _cap(F.regexp_replace(F.make_valid_utf8(value), "\ufffd", "?"))


def too_many_fields(fields: Column, width: Column) -> Column:
    """More fields than the header names, beyond empty trailing ones: DuckDB's reader takes those
    (``...,s,`` or ``...,s,,``) as a trailing delimiter, not as extra columns."""
    found = F.size(fields)
    extra = F.slice(fields, width + 1, F.greatest(found - width, F.lit(0)))
    return (found > width) & F.exists(extra, lambda field: field != "")


def timestamp_checks(
    source: SourceConfig, ts: Column, utc: Column, bad_offset: Column, in_range: Column
) -> list[tuple[Column, Column]]:
    """(condition, reason) of the timestamp rules in batch ingestion's order, for a raw timestamp ``ts``
    parsed to ``utc``: the Spark engine and spark-stream reject alike."""
    limit = source.max_field_length
    return [
        (F.length(ts) > limit, F.lit(f"field {source.timestamp.column} longer than {limit} characters")),
        (ts.isNull() | (_trim(ts) == ""), F.lit("missing timestamp")),
        (bad_offset, F.concat(F.lit(f"timestamp offset beyond ±{ingest.MAX_OFFSET_HOURS}:00 "), _shown(ts))),
        (
            utc.isNull() & _trim(ts).rlike(ingest.ZONE_ABBREVIATION),
            F.concat(F.lit("ambiguous time zone abbreviation in timestamp "), _shown(ts)),
        ),
        (utc.isNull(), F.concat(F.lit("unparseable timestamp "), _shown(ts))),
        (
            ~in_range,
            F.concat(F.lit("timestamp outside the source range "), F.date_format(utc, "yyyy-MM-dd HH:mm:ss")),
        ),
    ]


def closed_mid_field(fields: Column) -> Column:
    """Whether a field opens a quote and closes it before its end (``"u9"x``): DuckDB's reader rejects
    the line as an UNQUOTED VALUE."""
    return F.exists(fields, lambda field: field.rlike(r'^ *"') & ~field.rlike(QUOTED))


def json_type_rejects(source: SourceConfig, document: Column) -> list[Column]:
    """Per text column, its reason when the JSON ``document`` gives it a boolean, object or array (not
    a number), as ``ingest._json_type_checks``; null otherwise."""
    rejects = []
    for column in (column for column in source.columns if column.type != "number"):
        kind = F.schema_of_variant(F.try_variant_get(document, f"$.{column.name}", "variant"))
        wrong = F.lower(F.regexp_extract(kind, r"^(BOOLEAN|OBJECT|ARRAY)", 1))
        reason = F.concat(F.lit(f"wrong JSON type in {column.name}: "), wrong, F.lit(" (expected a string)"))
        rejects.append(F.when(wrong != "", reason))
    return rejects


def _csv_records(spark: SparkSession, source: SourceConfig, path: Path) -> DataFrame:
    """Data lines, fields taken by header position as DuckDB's reader parses them (quotes, blanks).

    Lines DuckDB's reader rejects (field count, a quote closed in mid-field, encoding, size) carry
    its reason in ``EARLY``; ``OPENS``/``UNBALANCED`` feed the unterminated-quote rule.
    """
    header = ingest._csv_header(path)
    position = {name: index for index, name in reversed(list(enumerate(header)))}
    ingest._require_columns(source, path, set(position))
    width = len(header)
    lines = numbered_lines(spark, path).where((F.col("line") > 1) & (F.col("value") != ""))
    value, quoted = F.col("value"), F.col("value").contains('"')
    # split once per line (plain split unless the line has a quote), then read the array
    tokens = F.when(quoted, F.regexp_extract_all(F.concat(F.lit(","), value), F.lit(CSV_FIELD), 1))
    split = lines.select(
        "line", "value", quoted.alias("quoted"), tokens.otherwise(F.split(value, ",", -1)).alias("fields")
    )
    fields, quoted = F.col("fields"), F.col("quoted")
    found = F.size(fields)
    badly_quoted = F.when(quoted, closed_mid_field(fields)).otherwise(F.lit(False))
    expected = f"Expected Number of Columns: {width} Found: "

    def missing(count: Column) -> Column:
        return F.concat(F.lit("MISSING COLUMNS: " + expected), count.cast("string"))

    reject = F.coalesce(
        _line_rejects(value),
        F.when(badly_quoted, F.lit(UNQUOTED_VALUE))
        .when(
            too_many_fields(fields, F.lit(width)),
            F.concat(F.lit("TOO MANY COLUMNS: " + expected), found.cast("string")),
        )
        # DuckDB reports a short line once per missing position: "Found: 2; ...Found: 3" of 4
        .when(found < width, F.concat_ws("; ", F.transform(F.sequence(found, F.lit(width - 1)), missing))),
    )
    quotes = F.length(value) - F.length(F.replace(value, F.lit('"'), F.lit("")))
    opens = quoted & value.rlike(OPEN_QUOTE)

    def text_of(index: int) -> Column:
        field = F.try_element_at(fields, F.lit(index + 1))
        unquoted = F.replace(F.regexp_extract(field, QUOTED, 1), F.lit('""'), F.lit('"'))
        return F.nullif(F.when(quoted & field.rlike(QUOTED), unquoted).otherwise(field), F.lit(""))

    null = F.lit(None).cast("string")
    return split.select(
        "line",
        reject.alias(EARLY),
        F.when(reject.isNotNull() | quoted, _line_text(value)).alias(LINE_TEXT),
        opens.alias(OPENS),
        (quoted & ((quotes % 2 == 1) | opens)).alias(UNBALANCED),
        F.lit(None).cast("boolean").alias(OBJECT),
        null.alias(WRONG_TYPE),
        *(F.lit(None).cast("boolean").alias(_has(name)) for name in _required_names(source)),
        *(
            (text_of(position[name]) if name in position else null).alias(_field(name))
            for name in _raw_names(source)
        ),
    )


def _jsonl_records(spark: SparkSession, source: SourceConfig, path: Path) -> DataFrame:
    """Non-blank lines; fields by JSON key as text (numbers and objects as JSON, as DuckDB reads them)."""
    ingest._check_json_start(path, verify_gzip=False)
    lines = numbered_lines(spark, path).where(_trim(F.col("value")) != "")
    parsed = lines.select("line", "value", F.try_parse_json("value").alias("json"))
    json = F.col("json")
    is_object = json.isNotNull() & F.col("value").rlike(r"^[ \t\r\n]*\{")
    early = F.coalesce(
        _line_rejects(F.col("value")),
        F.when(json.isNull(), F.lit("malformed JSON")).when(~is_object, F.lit("JSON line is not an object")),
    )
    wrong_types = json_type_rejects(source, json)
    return parsed.select(
        "line",
        early.alias(EARLY),
        _line_text(F.col("value")).alias(LINE_TEXT),
        F.lit(False).alias(OPENS),
        F.lit(False).alias(UNBALANCED),
        is_object.alias(OBJECT),
        F.coalesce(*wrong_types, F.lit(None).cast("string")).alias(WRONG_TYPE),
        *(
            F.try_variant_get(json, f"$.{name}", "variant").isNotNull().alias(_has(name))
            for name in _required_names(source)
        ),
        *(F.try_variant_get(json, f"$.{name}", "string").alias(_field(name)) for name in _raw_names(source)),
    )


def _parquet_text(name: str, kind: pa.DataType) -> Column:
    """A Parquet column as text, as DuckDB's ``CAST(... AS VARCHAR)`` feeds the timestamp rules."""
    column = F.col(name)
    if not pa.types.is_timestamp(kind):
        return column.cast("string")
    if kind.unit == "ns":  # read as nanoseconds since the epoch (see ENGINE_SQL_CONF)
        column = F.timestamp_micros(F.expr(f"`{name}` div 1000"))
    if kind.tz is None:
        return column.cast("timestamp_ntz").cast("string")
    return F.concat(column.cast("timestamp").cast("string"), F.lit("+00:00"))  # an instant: keep it one


def _parquet_records(spark: SparkSession, source: SourceConfig, path: Path) -> DataFrame:
    schema = pq.read_schema(path)
    ingest._require_columns(source, path, set(schema.names))
    try:
        frame = spark.read.parquet(_hadoop_path(path))
    except SPARK_ERRORS as error:  # a footer pyarrow reads but Spark cannot
        raise ingest.UnreadableFile(_root_cause(error)) from None
    null = F.lit(None).cast("string")
    return frame.select(
        (F.col("_metadata.row_index") + 1).alias("line"),
        null.alias(EARLY),
        null.alias(LINE_TEXT),
        F.lit(False).alias(OPENS),
        F.lit(False).alias(UNBALANCED),
        F.lit(None).cast("boolean").alias(OBJECT),
        null.alias(WRONG_TYPE),
        *(F.lit(None).cast("boolean").alias(_has(name)) for name in _required_names(source)),
        *(
            (_parquet_text(name, schema.field(name).type) if name in schema.names else null).alias(
                _field(name)
            )
            for name in _raw_names(source)
        ),
    )


READERS = {"csv": _csv_records, "jsonl": _jsonl_records, "parquet": _parquet_records}


def _landed(spark: SparkSession, source: SourceConfig, entry: ingest.LandingFile) -> DataFrame:
    """One landing file's records with its path and home day (where rows without a usable day go)."""
    path = Path(entry.path)
    records = READERS[ingest.file_format(path)](spark, source, path)
    home = F.lit(ingest.quarantine_day(entry).isoformat()).cast("date")
    return records.select(F.lit(entry.path).alias("source_file"), home.alias(HOME), *records.columns)


def _empty_landed(spark: SparkSession, source: SourceConfig) -> DataFrame:
    flags = ", ".join(f"{_has(name)} BOOLEAN" for name in _required_names(source))
    fields = ", ".join(f"{_field(name)} STRING" for name in _raw_names(source))
    schema = (
        f"source_file STRING, {HOME} DATE, line BIGINT, {EARLY} STRING, {LINE_TEXT} STRING, "
        f"{OPENS} BOOLEAN, {UNBALANCED} BOOLEAN, {OBJECT} BOOLEAN, {WRONG_TYPE} STRING, {flags}, {fields}"
    )
    return spark.createDataFrame([], schema)


# --- typing and checks ---------------------------------------------------------------------------


def _number(value: Column) -> Column:
    return F.when(value.rlike(NUMBER), F.replace(value, F.lit("_"), F.lit("")).try_cast("double"))


def _trim(value: Column) -> Column:
    """DuckDB's ``trim``: Unicode space separators; ASCII text (the usual case) takes Spark's faster trim."""
    return F.when(F.length(value) == F.octet_length(value), F.trim(value)).otherwise(
        F.trim(value, F.lit(SPACES))
    )


def _raw(source: SourceConfig) -> Column:
    """The raw text of a record, as ``ingest._typed_sql`` keeps it: the line for JSON lines and CSV
    rejects, else the fields joined by commas (capped)."""
    fields = _cap(F.concat_ws(",", *(F.col(_field(name)) for name in _raw_names(source))))
    return F.when(F.col(EARLY).isNotNull() | F.col(OBJECT).isNotNull(), F.col(LINE_TEXT)).otherwise(fields)


def typed_fields(
    source: SourceConfig, raw_field: Callable[[str], Column], screened: Column
) -> tuple[list[tuple[Column, Column]], list[Column]]:
    """Each configured column's quarantine checks, in ingestion's order and wording, and its typed value.

    ``raw_field`` gives a column's raw text; control characters are looked for only where ``screened``
    holds (the batch engine screens a whole line once first). Shared with the Structured Streaming job.
    """
    limit = source.max_field_length
    checks: list[tuple[Column, Column]] = []
    typed = []
    for column in source.columns:
        raw = raw_field(column.name)
        value = F.nullif(_trim(raw), F.lit(""))
        checks.append((F.length(raw) > limit, F.lit(f"field {column.name} longer than {limit} characters")))
        control_here = screened & raw.rlike(ingest.CONTROL_CHARACTERS)
        checks.append((control_here, F.lit(f"control characters in {column.name}")))
        if column.required:
            checks.append((value.isNull(), F.lit(f"missing {column.name}")))
        if column.type == "number":
            number = _number(value)
            non_finite = F.isnan(number) | (F.abs(number) == float("inf"))
            checks.append((value.isNotNull() & number.isNull(), F.lit(f"not a number in {column.name}")))
            checks.append((non_finite, F.lit(f"non-finite {column.name}")))
            if column.min_value is not None:
                checks.append((number < float(column.min_value), F.lit(f"{column.name} below minimum")))
            typed.append(number.alias(column.name))
        else:
            typed.append(value.alias(column.name))
    return checks, typed


def _typed(source: SourceConfig, landed: DataFrame, days: list[date], observation: Observation) -> DataFrame:
    """The window's records typed, with ``REASON`` (NULL when good), ``DAY`` (the event's day when usable)
    and ``RAW`` (bad rows only).

    The checks and their order are ``ingest._typed_sql``'s, so a bad row gets the same reason. Rows that
    cannot end up in the window are dropped once their day is known; ``observation`` collects, over
    every row, what :func:`_file_checks` needs to know about whole files.
    """
    ts_name = source.timestamp.column
    ts = F.col(_field(ts_name))
    parsed, offset = _utc_timestamp(source.timestamp, ts)
    earliest = F.lit(f"{source.start_date.isoformat()} 00:00:00").cast("timestamp_ntz")
    latest_day = (datetime.now(UTC) + timedelta(days=2)).date()
    latest = F.lit(f"{latest_day.isoformat()} 00:00:00").cast("timestamp_ntz")
    # each stage computes a column once; Spark does not inline a costly column read several times
    staged = landed.select("*", parsed.alias(UTC_TIME), offset.alias(BAD_OFFSET))
    ts_utc = F.col(UTC_TIME)
    in_range = (ts_utc >= earliest) & (ts_utc < latest)
    staged = staged.withColumn(DAY, F.when(F.col(EARLY).isNull() & in_range, F.to_date(ts_utc)))
    files = {
        SPANNING: F.col(OPENS),
        JSON_FILES: F.col(OBJECT),
        **{_has(name): F.col(OBJECT) & F.col(_has(name)) for name in _required_names(source)},
    }
    observed = staged.observe(
        observation,
        *(F.collect_set(F.when(rule, F.col("source_file"))).alias(name) for name, rule in files.items()),
    )
    wanted = F.array(*(F.lit(day.isoformat()).cast("date") for day in days))
    home_wanted = F.array_contains(wanted, F.col(HOME))
    relevant = F.array_contains(wanted, F.coalesce(F.col(DAY), F.col(HOME))) | (
        F.col(UNBALANCED) & home_wanted
    )
    control = F.concat_ws("", *(F.col(_field(column.name)) for column in source.columns))
    rows = observed.where(relevant).withColumn(CONTROL, control.rlike(ingest.CONTROL_CHARACTERS))

    checks: list[tuple[Column, Column]] = [
        (F.col(EARLY).isNotNull(), F.col(EARLY)),
        (F.col(WRONG_TYPE).isNotNull(), F.col(WRONG_TYPE)),
        *timestamp_checks(source, ts, ts_utc, F.col(BAD_OFFSET), in_range),
    ]
    field_checks, typed = typed_fields(source, lambda name: F.col(_field(name)), F.col(CONTROL))
    checks.extend(field_checks)
    reason = functools.reduce(lambda chain, check: chain.when(*check), checks[1:], F.when(*checks[0]))
    checked = rows.select("*", reason.alias(REASON))
    return checked.select(
        ts_utc.alias("timestamp"),
        *typed,
        "source_file",
        "line",
        REASON,
        F.when(F.col(REASON).isNotNull(), _raw(source)).alias(RAW),
        DAY,
        HOME,
        UNBALANCED,
        F.when(F.col(UNBALANCED), F.col(LINE_TEXT)).alias(LINE_TEXT),
    )


def _file_checks(source: SourceConfig, metrics: dict[str, list[str]], landed: DataFrame) -> list[str]:
    """The files whose CSV reading DuckDB would redo without their unbalanced lines (a quote ran over a
    line end); raises ``LandingFileError`` for a JSON lines file none of whose objects has a required
    field, as ``ingest`` does."""
    for path in sorted(metrics[JSON_FILES]):
        missing = [name for name in _required_names(source) if path not in metrics[_has(name)]]
        if missing:
            objects = landed.where((F.col("source_file") == path) & F.col(OBJECT)).count()
            raise ingest.LandingFileError(
                f"{path}: missing required field(s) {missing} for source {source.name!r}: "
                f"none of its {objects} JSON objects has them"
            )
    return list(metrics[SPANNING])


def _settled(typed: DataFrame, spanning: list[str], days: list[date]) -> DataFrame:
    """Apply the unterminated-quote rule, then keep the rows of the window: good events of its days
    and bad rows whose day (their own when usable, else their file's home day) is in it."""
    unterminated = F.col("source_file").isin(spanning) & F.col(UNBALANCED)
    settled = typed.withColumns(
        {
            REASON: F.when(unterminated, F.lit(ingest.UNTERMINATED_QUOTE)).otherwise(F.col(REASON)),
            RAW: F.when(unterminated, F.col(LINE_TEXT)).otherwise(F.col(RAW)),
            QUARANTINE_DAY: F.coalesce(F.when(~unterminated, F.col(DAY)), F.col(HOME)),
        }
    )
    wanted = F.array(*(F.lit(day.isoformat()).cast("date") for day in days))
    day = F.when(F.col(REASON).isNull(), F.col(DAY)).otherwise(F.col(QUARANTINE_DAY))
    return settled.where(F.array_contains(wanted, day))


def _shared_times(events: DataFrame) -> Column | None:
    """Rows whose timestamp lies where two files' time ranges overlap (only those can repeat another
    file's event), or None when no ranges overlap: log files usually follow each other in time."""
    ranges = sorted(
        tuple(row)[1:]
        for row in events.groupBy("source_file").agg(F.min("timestamp"), F.max("timestamp")).collect()
    )
    overlaps: list[list[datetime]] = []
    reach = None  # the latest end among the files starting earlier
    for start, end in ranges:
        if reach is not None and start <= reach:
            if overlaps and start <= overlaps[-1][1]:
                overlaps[-1][1] = max(overlaps[-1][1], min(end, reach))
            else:
                overlaps.append([start, min(end, reach)])
        reach = end if reach is None else max(reach, end)
    if not overlaps:
        return None
    bounds = [
        [F.lit(moment.isoformat(sep=" ")).cast("timestamp_ntz") for moment in span] for span in overlaps
    ]
    return functools.reduce(Column.__or__, (F.col("timestamp").between(*span) for span in bounds))


def _replays(source: SourceConfig, events: DataFrame) -> DataFrame | None:
    """Events repeating an earlier file's (by path): ``ingest._take_replayed_events`` on Spark; None when
    no file's time range overlaps another's.

    An event (timestamp and every column) held k times by one file and m times by the files before it
    keeps max(k, m) copies; the copies beyond go to quarantine naming the first file and line.
    """
    shared_times = _shared_times(events)
    if shared_times is None:
        return None
    events = events.where(shared_times)
    key = ["timestamp", *(column.name for column in source.columns)]
    # only an event whose key occurs in two files can be a replay: a hash aggregate finds those keys,
    # and the windows below (a sort of every row) run on them alone
    shared = events.groupBy(*key).agg((F.min("source_file") < F.max("source_file")).alias("shared"))
    keys = shared.where("shared").drop("shared")
    matches = functools.reduce(Column.__and__, (events[name].eqNullSafe(keys[name]) for name in key))
    events = events.join(keys, matches, "left_semi")
    in_file = Window.partitionBy(*key, "source_file")
    in_key = Window.partitionBy(*key)
    ranked = events.select(
        "*",
        F.row_number().over(in_file.orderBy("line")).alias("copy"),
        F.count("*").over(in_file).alias("copies"),
        F.dense_rank().over(in_key.orderBy("source_file")).alias("file_rank"),
        F.min(F.struct("source_file", "line")).over(in_key).alias("first"),
    )
    earlier_files = in_key.orderBy("file_rank").rangeBetween(Window.unboundedPreceding, -1)
    before = F.coalesce(F.max("copies").over(earlier_files), F.lit(0))
    reason = F.concat(
        F.lit("duplicate event: also in "), F.col("first.source_file"), F.lit(" line "), F.col("first.line")
    )
    replayed = ranked.withColumn("before", before).where(F.col("copy") <= F.col("before"))
    return replayed.select("source_file", "line", reason.alias("reason"), F.col(DAY).alias(QUARANTINE_DAY))


# --- writing -------------------------------------------------------------------------------------


def _publish(context: StageContext, day: date, part: Path) -> WrittenPartition:
    """Move Spark's part file of ``day`` over the partition file through the warehouse's own replacement
    (temporary sibling, checksum, atomic rename under its partitions lock)."""
    source, warehouse = context.source.name, context.warehouse
    path = warehouse.partition_file(source, "raw_events", day)

    def move(tmp: Path) -> int:
        os.replace(part, tmp)  # same filesystem: the staging folder is inside the asset's folder
        return pq.ParquetFile(tmp).metadata.num_rows

    row_count, checksum, identity = warehouse._replace_file(path, move)
    return WrittenPartition(source, "raw_events", day, path, row_count, checksum, [], identity)


def _single_part(directory: Path) -> Path:
    parts = sorted(directory.glob("*.parquet"))
    if len(parts) != 1:
        raise RuntimeError(f"expected one Parquet part in {directory}, found {len(parts)}")
    return parts[0]


def _write_events(context: StageContext, days: list[date], events: DataFrame) -> dict[date, WrittenPartition]:
    """One Spark job writes every day (one task, hence one file, per day); each file is renamed into place.

    Spark's output directory is hidden inside the asset's folder: same filesystem, so the renames are
    atomic, and no reader's ``date=*`` glob sees it. A day without events gets an empty file.
    """
    columns = ["timestamp", *(column.name for column in context.source.columns), "source_file", "line"]
    events = events.select(*columns, DAY)
    staging = temporary_sibling(context.warehouse.asset_dir(context.source.name, "raw_events") / "spark")
    try:
        (
            events.repartition(DAY)
            .sortWithinPartitions(DAY, "timestamp", "source_file", "line")
            .write.option("maxRecordsPerFile", 0)
            .partitionBy(DAY)
            .parquet(_hadoop_path(staging / "days"))
        )
        written = {}
        for day in days:
            directory = staging / "days" / f"{DAY}={day.isoformat()}"
            if not directory.is_dir():
                directory = staging / "empty" / day.isoformat()
                events.drop(DAY).limit(0).coalesce(1).write.parquet(_hadoop_path(directory))
            written[day] = _publish(context, day, _single_part(directory))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _materialize(
    context: StageContext, days: list[date], landed: list[DataFrame], spark: SparkSession, event_files: int
) -> tuple[dict[date, WrittenPartition], pd.DataFrame]:
    """Write the window's events and collect its quarantine rows, reading the files once (cached)."""
    source = context.source
    union = functools.reduce(DataFrame.unionByName, landed, _empty_landed(spark, source))
    observation = Observation("landing files")
    typed = _typed(source, union, days, observation).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        typed.count()  # one pass over the files: fills the cache and the observation
        settled = _settled(typed, _file_checks(source, observation.get, union), days)
        bad = settled.where(F.col(REASON).isNotNull()).select(
            "source_file", "line", F.col(REASON).alias("reason"), F.col(RAW).alias("raw"), QUARANTINE_DAY
        )
        quarantine = [bad.toPandas()]
        events = settled.where(F.col(REASON).isNull())
        replayed = _replays(source, events) if event_files > 1 else None  # only another file can replay
        if replayed is not None:
            replays = replayed.toPandas()
            if len(replays):
                keys = spark.createDataFrame(replays[["source_file", "line"]])
                events = events.join(F.broadcast(keys), ["source_file", "line"], "left_anti")
                raw = union.join(F.broadcast(keys), ["source_file", "line"]).select(
                    "source_file", "line", _raw(source).alias("raw")
                )
                quarantine.append(replays.merge(raw.toPandas(), on=["source_file", "line"]))
        return _write_events(context, days, events), pd.concat(quarantine, ignore_index=True)
    finally:
        typed.unpersist()


def _root_cause(error: Exception) -> str:
    java = getattr(error, "java_exception", None)
    if java is None:
        return str(error).strip().splitlines()[0][:300]
    while java.getCause() is not None:
        java = java.getCause()
    return java.toString()[:300]


def _probe(path: str, frame: DataFrame) -> str | None:
    """Why one file cannot be read, or None. A gzip file is read to its end by Python's gzip (the DuckDB
    engine's check and wording); a Parquet file by Spark alone; plain text cannot fail to read."""
    try:
        if path.lower().endswith(".gz"):
            with ingest._open_binary(Path(path)) as handle:
                while handle.read(1 << 22):
                    pass
        elif ingest.file_format(Path(path)) == "parquet":
            frame.write.format("noop").mode("overwrite").save()
    except ingest.UnreadableFile as error:
        return f"{ingest.UNREADABLE_FILE}: {ingest._first_line(error)}"
    except SPARK_ERRORS as error:
        return f"{ingest.UNREADABLE_FILE}: {_root_cause(error)}"
    return None


def run_ingest_spark(context: StageContext, days: list[date], spark: SparkSession) -> list[AssetOutput]:
    """``pipeline.run_ingest`` on Spark: ``raw_events`` and ``quarantine`` for ``days``, recorded with lineage.

    A file that cannot be read is quarantined whole and the others go on: the header, JSON start and
    Parquet schema are checked up front; a failure inside the Spark job is traced to its files by
    reading each one alone, and the job runs again without them.
    """
    source, warehouse = context.source, context.warehouse
    _configure(spark)
    index = ingest.LandingIndex(warehouse.asset_dir(source.name, "landing_index") / "index.json")
    wanted = set(days)
    entries = sorted(
        (
            entry
            for entry in index.refresh(source, ingest.discover(source, context.landing_dir))
            if entry.touched_days & wanted
        ),
        key=lambda entry: entry.path,
    )
    # files with valid events in the window (the index knows): replays need two of them
    event_files = sum(bool({date.fromisoformat(day) for day in entry.days} & wanted) for entry in entries)
    unreadable: dict[str, str] = {}
    landed: dict[str, DataFrame] = {}
    for entry in entries:
        try:
            landed[entry.path] = _landed(spark, source, entry)
        except (ingest.UnreadableFile, pa.ArrowException, OSError) as error:
            unreadable[entry.path] = f"{ingest.UNREADABLE_FILE}: {_root_cause(error)}"
    try:
        written, bad = _materialize(context, days, list(landed.values()), spark, event_files)
    except SPARK_ERRORS:
        failing = {path: reason for path, frame in landed.items() if (reason := _probe(path, frame))}
        if not failing:
            raise
        unreadable |= failing
        readable = [frame for path, frame in landed.items() if path not in failing]
        written, bad = _materialize(context, days, readable, spark, event_files)

    quarantine: dict[date, list[pd.DataFrame]] = {day: [] for day in days}
    for day, rows in bad.groupby(QUARANTINE_DAY):
        quarantine[day].append(rows[ingest.QUARANTINE_COLUMNS])
    for entry in entries:
        home = ingest.quarantine_day(entry)
        if entry.path in unreadable and home in wanted:
            row = {"source_file": entry.path, "line": None, "reason": unreadable[entry.path], "raw": None}
            quarantine[home].append(pd.DataFrame([row]))
    counts = {
        day: pd.DataFrame(
            {"events": [written[day].row_count], "files": [sum(day in e.touched_days for e in entries)]}
        )
        for day in days
    }
    raw = AssetOutput("raw_events", counts, [written[day] for day in days])
    frames = {day: ingest._concat_quarantine(rows) for day, rows in quarantine.items()}
    quarantined = _write(context, "quarantine", frames, [])
    for output, name in ((raw, "events_in_run"), (quarantined, "rows_in_run")):
        output.summary[name] = sum(part.row_count for part in output.written)
        output.summary["engine"] = "spark"
    return _record(context, [raw, quarantined])


# --- resample ------------------------------------------------------------------------------------


def _aggregation(metric: MetricConfig) -> Column:
    """The DuckDB engine's aggregations: exact distinct counts, exact interpolated p95."""
    if metric.agg == "count":  # with a column: its non-null values, as DuckDB's count(column)
        return F.count(F.col(metric.column) if metric.column else F.lit(1)).alias(metric.name)
    aggregate = {
        "nunique": F.count_distinct,
        "sum": F.sum,
        "mean": F.avg,
        "min": F.min,
        "max": F.max,
        "p95": lambda column: F.percentile(column, 0.95),
    }[metric.agg]
    return aggregate(F.col(metric.column)).alias(metric.name)


def _bucket_grid(source: SourceConfig, days: Iterable[date]) -> pd.DataFrame:
    step = np.timedelta64(source.bucket_minutes, "m")
    starts = [np.datetime64(day, "us") + step * np.arange(source.buckets_per_day) for day in days]
    return pd.DataFrame({"bucket_start": np.concatenate(starts).astype("datetime64[us]")})


def _entity_grid(source: SourceConfig, days: list[date], aggregated: pd.DataFrame) -> pd.DataFrame:
    """The DuckDB engine's per-entity grid: day D has every bucket of D for each entity with events on
    D or the day before (``aggregated`` holds both days' buckets), ordered by entity then bucket."""
    seen = aggregated.groupby(aggregated["bucket_start"].dt.date)[source.entity].unique()
    grids = []
    for day in days:
        entities = sorted({*seen.get(day, []), *seen.get(day - timedelta(days=1), [])})
        starts = _bucket_grid(source, [day])["bucket_start"].to_numpy()
        grids.append(
            pd.DataFrame(
                {
                    "bucket_start": np.tile(starts, len(entities)),
                    source.entity: np.repeat(np.array(entities, dtype=object), len(starts)),
                }
            )
        )
    return pd.concat(grids, ignore_index=True).sort_values([source.entity, "bucket_start"], kind="stable")


def run_resample_spark(context: StageContext, days: list[date], spark: SparkSession) -> list[AssetOutput]:
    """``pipeline.run_resample`` on Spark: one row per bucket of each day (per entity and day for an
    entity source), zeros for empty count buckets."""
    source, warehouse = context.source, context.warehouse
    _configure(spark)
    (upstream,) = _resample_upstream(source)
    read = sorted({day for d in days for day in upstream.days(d)})
    paths = (warehouse.partition_file(source.name, "raw_events", day) for day in read)
    files = [path for path in paths if path.exists()]
    keys = ["bucket_start", *([source.entity] if source.entity is not None else [])]
    if files:
        events = spark.read.parquet(*(_hadoop_path(path) for path in files))
        micros = F.unix_micros(F.col("timestamp").cast("timestamp"))
        width = F.lit(source.bucket_minutes * 60_000_000)
        groups = [
            F.timestamp_micros(micros - F.pmod(micros, width)).cast("timestamp_ntz").alias("bucket_start")
        ]
        if source.entity is not None:  # as entities.entity_sql
            value = F.nullif(F.trim(F.col(source.entity)), F.lit(""))
            groups.append(F.coalesce(value, F.lit(MISSING_ENTITY)).alias(source.entity))
        aggregations = [_aggregation(metric) for metric in source.metrics]
        with warehouse.reading():  # no partition replaced while Spark reads it
            aggregated = events.groupBy(*groups).agg(*aggregations).toPandas()
        aggregated["bucket_start"] = aggregated["bucket_start"].astype("datetime64[us]")
    else:
        columns = {key: "object" for key in keys} | {"bucket_start": "datetime64[us]"}
        columns |= {metric.name: "float64" for metric in source.metrics}
        aggregated = pd.DataFrame({name: pd.Series(dtype=kind) for name, kind in columns.items()})
    grid = _bucket_grid(source, days) if source.entity is None else _entity_grid(source, days, aggregated)
    table = grid.merge(aggregated, on=keys, how="left")
    for metric in source.metrics:
        if metric.zero_when_empty:
            table[metric.name] = table[metric.name].fillna(0)
        if metric.is_count:
            table[metric.name] = table[metric.name].astype("int64")
    frames = {day: part.reset_index(drop=True) for day, part in table.groupby(table["bucket_start"].dt.date)}
    # an entity source may have a day without any entity: an empty partition, not a missing one
    frames = {day: frames.get(day, table.iloc[:0]) for day in days}
    output = _write(context, "resampled", frames, [upstream])
    output.summary["engine"] = "spark"
    return _record(context, [output])
