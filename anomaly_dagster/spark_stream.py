"""Spark Structured Streaming detection: ``anomaly-dagster spark-stream --source NAME``.

The landing folder is a file source (a Kafka topic where the ``spark-sql-kafka`` connector is on the
classpath): each new file is read whole, split into numbered lines and parsed by the ingestion rules
(the Spark engine's timestamp parsing, ``ingest``'s reasons in its order). Two queries share that
parse, each with its own checkpoint under ``<warehouse>/<source>/spark_stream/`` (``--checkpoint``):

- *windows*: good events, ``withWatermark`` by the source's ``streaming.allowed_lateness_minutes``,
  10-minute event-time ``window`` aggregation in append mode (a window is emitted once the watermark
  passes its end), and ``foreachBatch`` scoring the closed windows, in order and with the empty
  windows between them as zeros, with ``streaming.StreamScorer``: the same warm-started, online
  learning Random Cut Forest as ``anomaly-dagster stream``, so the same windows get the same answers.
  Rows are upserted into ``<source>.stream_scores``;
- *quarantine*: unparseable rows with file, line, reason and raw text into ``<source>.stream_quarantine``.

Restart without double counting: Spark's checkpoints record which files each query has taken and
the open windows' partial aggregates; the scorer (forest, lag history, next window) is saved beside
them after each batch's rows are written, with the batch id, so a batch Spark replays after a crash
is either skipped (already scored) or recomputed from the state before it (same rows, replaced).

Differences from ``stream``: events later than the watermark are dropped by Spark and counted
(``numRowsDroppedByWatermark`` in the log), not quarantined one by one; windows within the allowed
lateness of the newest event stay open until newer events arrive (``--once`` does not force them
closed); Parquet landing files and replays of an event across files are the batch pipeline's alone.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyspark
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from anomaly_dagster.config import ConfigError, SourceConfig, landing_dir, load_sources, warehouse_dir
from anomaly_dagster.engines.spark import (
    CSV_FIELD,
    QUOTED,
    SPARK_ERRORS,
    UNQUOTED_VALUE,
    _cap,
    _trim,
    _utc_timestamp,
    closed_mid_field,
    json_type_rejects,
    spark_session,
    timestamp_checks,
    too_many_fields,
    typed_fields,
)
from anomaly_dagster.streaming import (
    US_PER_MINUTE,
    ClosedWindow,
    StreamScorer,
    WarehouseSink,
    _read_npz,
    _state_lock,
    _write_npz,
)
from anomaly_dagster.warehouse import Warehouse

LOG = logging.getLogger("anomaly_dagster.spark_stream")
STATE_FILE = "scorer.npz"
KAFKA_PACKAGE = f"org.apache.spark:spark-sql-kafka-0-10_2.13:{pyspark.__version__}"


def checkpoint_dir(warehouse: Warehouse, source: SourceConfig) -> Path:
    """Where a source's streaming checkpoints live unless ``--checkpoint`` says otherwise."""
    return warehouse.root / source.name / "spark_stream"


# --- input: landing files or Kafka, as numbered lines -------------------------------------------------


def _glob(source: SourceConfig) -> str:
    """The source's file patterns as one Hadoop glob (``{a,b}``)."""
    return "{" + ",".join(source.files) + "}" if len(source.files) > 1 else source.files[0]


def _local_path(uri: Column) -> Column:
    """A ``file:`` URI from ``input_file_name`` (``file:///a%20b/c.csv``) as the path batch ingestion
    names (``/a b/c.csv``): percent escapes decoded, a literal ``+`` kept (URL decoding reads it as a blank)."""
    decoded = F.url_decode(F.replace(uri, F.lit("+"), F.lit("%2B")))
    return F.regexp_replace(decoded, "^file:(//)?", "")


def landing_lines(spark: SparkSession, source: SourceConfig, landing: Path) -> DataFrame:
    """Every line of every new landing file: ``source_file``, ``line`` (1-based), ``text``, ``kind``
    (``csv``/``jsonl``) and the file's ``header`` line. Files are read whole (gzip too), so a
    line's number and its CSV header come from the file itself."""
    files = (
        spark.readStream.format("text")
        .option("wholetext", "true")
        .option("pathGlobFilter", _glob(source))
        .load(str(landing.resolve()))
        .select(F.input_file_name().alias("source_file"), "value")
    )
    name = F.lower(F.regexp_replace("source_file", r"\.gz$", ""))
    kind = F.when(name.rlike(r"\.(jsonl|ndjson|json)$"), "jsonl").when(
        name.rlike(r"\.(csv|tsv|txt|log)$"), "csv"
    )
    # split once into a column: an expression over the whole text next to the generator would be
    # evaluated again for every line
    split = files.where(kind.isNotNull()).select(
        _local_path(F.col("source_file")).alias("source_file"),
        kind.alias("kind"),
        F.split(F.col("value"), "\n", -1).alias("lines"),
    )
    exploded = split.select(
        "source_file",
        "kind",
        F.regexp_replace(F.element_at("lines", 1), "^\ufeff|\r$", "").alias("header"),
        F.posexplode("lines").alias("position", "text"),
    )
    text = F.regexp_replace("text", "\r$", "")
    text = F.when(F.col("position") == 0, F.regexp_replace(text, "^\ufeff", "")).otherwise(text)  # a BOM
    data = (F.col("kind") == "jsonl") | (F.col("position") > 0)
    return exploded.where(data & (_trim(text) != "")).select(
        "source_file", (F.col("position") + 1).alias("line"), text.alias("text"), "kind", "header"
    )


def kafka_lines(spark: SparkSession, bootstrap: str, topic: str) -> DataFrame:
    """One line per Kafka message (JSON, or CSV in the source's column order), numbered by offset."""
    try:
        messages = (
            spark.readStream.format("kafka")
            .option("kafka.bootstrap.servers", bootstrap)
            .option("subscribe", topic)
            .option("startingOffsets", "earliest")
            .load()
        )
    except SPARK_ERRORS as error:
        if "kafka" in str(error).lower():
            raise ConfigError(
                f"the Kafka source needs the connector on Spark's classpath (spark.jars.packages={KAFKA_PACKAGE}): "
                f"{str(error).splitlines()[0]}"
            ) from None
        raise
    text = F.col("value").cast("string")
    return messages.select(
        F.concat(F.lit(f"kafka:{topic}:"), F.col("partition").cast("string")).alias("source_file"),
        (F.col("offset") + 1).alias("line"),
        text.alias("text"),
        F.when(_trim(text).startswith("{"), "jsonl").otherwise("csv").alias("kind"),
        F.lit(None).cast("string").alias("header"),
    )


# --- parsing: ingestion's rules, per line ------------------------------------------------------------


def _csv_fields(source: SourceConfig) -> tuple[dict[str, Column], Column]:
    """Raw text of each configured column by its header position (the source's order without a header),
    and the column-count reason DuckDB's reader gives a line it rejects."""
    names = [source.timestamp.column, *(column.name for column in source.columns)]
    header = F.coalesce(F.col("header"), F.lit(",".join(names)))
    columns = F.transform(F.split(header, ",", -1), lambda name: F.trim(F.regexp_replace(name, '"', "")))
    text, quoted = F.col("text"), F.col("text").contains('"')
    fields = F.when(quoted, F.regexp_extract_all(F.concat(F.lit(","), text), F.lit(CSV_FIELD), 1)).otherwise(
        F.split(text, ",", -1)
    )
    width, found = F.size(columns), F.size(fields)
    expected = F.concat(F.lit("Expected Number of Columns: "), width.cast("string"), F.lit(" Found: "))
    # a quote closed in mid-field (``"u9"x``): DuckDB's reader rejects the line, as the batch engines do
    early = (
        F.when(quoted & closed_mid_field(fields), F.lit(UNQUOTED_VALUE))
        .when(
            too_many_fields(fields, width),
            F.concat(F.lit("TOO MANY COLUMNS: "), expected, found.cast("string")),
        )
        .when(found < width, F.concat(F.lit("MISSING COLUMNS: "), expected, found.cast("string")))
    )
    values = {}
    for name in names:
        position = F.array_position(columns, F.lit(name))
        raw = F.when(position > 0, F.try_element_at(fields, position.cast("int")))
        unquoted = F.replace(F.regexp_extract(raw, QUOTED, 1), F.lit('""'), F.lit('"'))
        values[name] = F.nullif(F.when(quoted & raw.rlike(QUOTED), unquoted).otherwise(raw), F.lit(""))
    return values, early


def _json_fields(source: SourceConfig) -> tuple[dict[str, Column], Column]:
    names = [source.timestamp.column, *(column.name for column in source.columns)]
    document = F.try_parse_json(F.col("text"))
    early = F.when(document.isNull(), F.lit("malformed JSON")).when(
        ~F.col("text").rlike(r"^[ \t\r\n]*\{"), F.lit("JSON line is not an object")
    )
    early = F.coalesce(early, *json_type_rejects(source, document), F.lit(None).cast("string"))
    return {name: F.try_variant_get(document, f"$.{name}", "string") for name in names}, early


def parse_events(source: SourceConfig, lines: DataFrame) -> DataFrame:
    """Lines → ``source_file, line, timestamp`` (UTC), the typed columns, ``reason`` (NULL when good)
    and ``raw``. The checks and their order are ``ingest._typed_sql``'s, so a bad line gets the
    reason batch ingestion gives it."""
    csv_values, csv_early = _csv_fields(source)
    json_values, json_early = _json_fields(source)
    is_json = F.col("kind") == "jsonl"
    # the line's own columns get names no configured column can take ("__" is refused by the config)
    staged = lines.select(
        "source_file",
        "line",
        F.col("text").alias("__text"),
        F.when(is_json, json_early).otherwise(csv_early).alias("__early"),
        *(F.when(is_json, json_values[name]).otherwise(csv_values[name]).alias(name) for name in csv_values),
    )
    ts_name = source.timestamp.column
    ts = F.col(ts_name)
    parsed, bad_offset = _utc_timestamp(source.timestamp, ts)
    staged = staged.select("*", parsed.alias("__utc"), bad_offset.alias("__bad_offset"))
    utc = F.col("__utc")
    earliest = F.lit(f"{source.start_date.isoformat()} 00:00:00").cast("timestamp_ntz")
    latest_day = (datetime.now(UTC) + timedelta(days=2)).date()
    in_range = (utc >= earliest) & (utc < F.lit(f"{latest_day.isoformat()} 00:00:00").cast("timestamp_ntz"))
    checks: list[tuple[Column, Column]] = [
        (F.col("__early").isNotNull(), F.col("__early")),
        *timestamp_checks(source, ts, utc, F.col("__bad_offset"), in_range),
    ]
    field_checks, typed = typed_fields(source, F.col, F.lit(True))
    checks.extend(field_checks)
    reason = functools.reduce(lambda chain, check: chain.when(*check), checks[1:], F.when(*checks[0]))
    return staged.select(
        "source_file",
        "line",
        utc.cast("timestamp").alias("timestamp"),  # an instant (the session is in UTC): watermarks need it
        *typed,
        reason.alias("reason"),
        _cap(F.col("__text")).alias("raw"),
    )


def _aggregation(source: SourceConfig, name: str) -> Column:
    """A metric as the batch engines compute it; ``nunique`` as the size of the window's distinct set
    (exact, and allowed in a streaming aggregation where ``count_distinct`` is not)."""
    metric = next(m for m in source.metrics if m.name == name)
    column = F.col(metric.column) if metric.column else F.lit(1)
    aggregate = {
        "count": F.count,
        "nunique": lambda value: F.size(F.collect_set(value)),
        "sum": F.sum,
        "mean": F.avg,
        "min": F.min,
        "max": F.max,
        "p95": lambda value: F.percentile(value, 0.95),
    }[metric.agg]
    return aggregate(column).alias(name)


def windowed(source: SourceConfig, events: DataFrame) -> DataFrame:
    """Good events in event-time windows of ``bucket_minutes``, closed by the source's allowed lateness."""
    lateness = source.streaming.allowed_lateness_minutes
    good = events.where(F.col("reason").isNull()).withWatermark(
        "timestamp", f"{round(lateness * 60)} seconds"
    )
    window = F.window("timestamp", f"{source.bucket_minutes} minutes")
    aggregated = good.groupBy(window.alias("window")).agg(
        *(_aggregation(source, name) for name in source.metric_names)
    )
    return aggregated.select(F.col("window.start").alias("window_start"), *source.metric_names)


# --- the driver side: scoring closed windows, writing the tables ------------------------------------------


@dataclass
class WindowScoring:
    """``foreachBatch`` of the windows query: closed windows (and the empty ones between) → scored rows."""

    source: SourceConfig
    warehouse: Warehouse
    state_path: Path
    scorer: StreamScorer = field(init=False)
    next_window: int | None = None  # microseconds: the first window not scored yet
    last_batch: int = -1
    windows: int = 0

    def __post_init__(self) -> None:
        self.scorer = StreamScorer(self.source, self.source.streaming, self.warehouse)
        if self.state_path.exists():
            arrays, document = _read_npz(self.state_path)
            if (document["source"], document["metrics"]) != (self.source.name, self.source.metric_names):
                raise ConfigError(f"{self.state_path} belongs to another source or configuration")
            self.scorer.restore(arrays, document["scorer"])
            self.next_window, self.last_batch = document["next_window"], document["batch"]

    def __call__(self, frame: DataFrame, batch_id: int) -> None:
        if batch_id <= self.last_batch:
            LOG.info("batch %d was scored before a restart; skipped", batch_id)
            return
        closed = self.closed_windows(frame.toPandas())
        if closed:
            if not self.scorer.started:
                self.scorer.start(closed[0].start)
            sink = WarehouseSink(self.warehouse, self.source)
            sink.scores.extend(self.scorer.score(closed))
            sink.flush()  # rows first, then the state: a crash in between re-scores the batch identically
            self.next_window = closed[-1].start + self.source.bucket_minutes * US_PER_MINUTE
            self.windows += len(closed)
            LOG.info(
                "batch %d: scored windows %s..%s", batch_id, _iso(closed[0].start), _iso(closed[-1].start)
            )
        self.last_batch = batch_id
        self.save()

    def closed_windows(self, frame: pd.DataFrame) -> list[ClosedWindow]:
        """Spark's closed windows in order, the empty windows between them (and since the last batch)
        as zeros, as ``stream`` emits them."""
        if frame.empty:
            return []
        starts = frame["window_start"].astype("datetime64[us]").astype(np.int64).to_numpy()
        by_start = dict(zip(starts.tolist(), frame.to_dict(orient="records"), strict=True))
        bucket = self.source.bucket_minutes * US_PER_MINUTE
        first = int(starts.min()) if self.next_window is None else self.next_window
        closed = []
        for start in range(first, int(starts.max()) + bucket, bucket):
            row = by_start.get(start)
            metrics = {
                metric.name: (0 if metric.zero_when_empty else np.nan)
                if row is None or pd.isna(row[metric.name])
                else float(row[metric.name])
                for metric in self.source.metrics
            }
            closed.append(ClosedWindow(start, metrics))
        return closed

    def save(self) -> None:
        arrays, document = self.scorer.state()
        _write_npz(
            self.state_path,
            arrays,
            {
                "source": self.source.name,
                "metrics": self.source.metric_names,
                "scorer": document,
                "next_window": self.next_window,
                "batch": self.last_batch,
            },
        )


def _iso(us: int) -> str:
    return pd.Timestamp(us, unit="us").strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class QuarantineWriter:
    """``foreachBatch`` of the quarantine query: bad lines → ``<source>.stream_quarantine`` (upserted by
    file, line and raw text, so a replayed batch replaces its rows)."""

    source: SourceConfig
    warehouse: Warehouse
    rows: int = 0

    def __call__(self, frame: DataFrame, batch_id: int) -> None:
        bad = frame.select("source_file", "line", "timestamp", "reason", "raw").toPandas()
        if bad.empty:
            return
        stamps = pd.to_datetime(bad["timestamp"]).astype("datetime64[us]")
        today = datetime.now(UTC).date()
        sink = WarehouseSink(self.warehouse, self.source)
        sink.quarantine.extend(
            {
                "input": row.source_file,
                "line": int(row.line),
                "timestamp": None if pd.isna(stamp) else int(stamp.value // 1000),
                "reason": row.reason,
                "raw": row.raw,
                "day": today if pd.isna(stamp) else stamp.date(),
            }
            for row, stamp in zip(bad.itertuples(index=False), stamps, strict=True)
        )
        sink.flush()
        self.rows += len(bad)
        LOG.info("batch %d: %d line(s) quarantined", batch_id, len(bad))


@dataclass
class StreamSummary:
    windows: int
    quarantined: int
    late_dropped: int
    checkpoint: Path


def run_spark_stream(
    spark: SparkSession,
    source: SourceConfig,
    warehouse: Warehouse,
    lines: DataFrame,
    checkpoint: Path,
    once: bool = True,
) -> StreamSummary:
    """Start the windows and quarantine queries over ``lines``; with ``once`` (``availableNow``) process
    what is there and return, else run until a query stops or the process is interrupted."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    with _state_lock(checkpoint / STATE_FILE):
        scoring = WindowScoring(source, warehouse, checkpoint / STATE_FILE)
        quarantine = QuarantineWriter(source, warehouse)
        events = parse_events(source, lines)
        queries = []
        for name, frame, handler in (
            ("windows", windowed(source, events), scoring),
            ("quarantine", events.where(F.col("reason").isNotNull()), quarantine),
        ):
            writer = (
                frame.writeStream.queryName(f"{source.name}_{name}")
                .outputMode("append")
                .option("checkpointLocation", str(checkpoint / name))
                .foreachBatch(handler)
            )
            writer = (
                writer.trigger(availableNow=True) if once else writer.trigger(processingTime="10 seconds")
            )
            queries.append(writer.start())
        try:
            if once:
                for query in queries:
                    query.awaitTermination()
            else:
                spark.streams.awaitAnyTermination()
        finally:
            for query in queries:
                query.stop()
        late = sum(
            operator.get("numRowsDroppedByWatermark", 0)
            for progress in queries[0].recentProgress
            for operator in progress.get("stateOperators", [])
        )
    if late:
        LOG.warning(
            "%d event(s) arrived after their window had closed (allowed lateness %g min) and were dropped",
            late,
            source.streaming.allowed_lateness_minutes,
        )
    return StreamSummary(scoring.windows, quarantine.rows, late, checkpoint)


# --- command line ------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spark-stream`` to the ``anomaly-dagster`` command."""
    parser = subparsers.add_parser(
        "spark-stream",
        help="Spark Structured Streaming over the landing folder (or Kafka): windows, watermark, scores",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--source", required=True)
    parser.add_argument("--landing", help="default: ANOMALY_LANDING_DIR or data/landing")
    parser.add_argument(
        "--kafka", metavar="BOOTSTRAP", help="read a Kafka topic instead (needs the connector)"
    )
    parser.add_argument("--topic", help="Kafka topic (with --kafka)")
    parser.add_argument("--warehouse", help="default: ANOMALY_WAREHOUSE_DIR or data/warehouse")
    parser.add_argument("--checkpoint", help="default: <warehouse>/<source>/spark_stream")
    parser.add_argument("--master", help="Spark master (default: ANOMALY_SPARK_MASTER or local[*])")
    parser.add_argument(
        "--once", action="store_true", help="process what has landed, then stop (availableNow)"
    )
    parser.set_defaults(handler=run_spark_stream_command)


def run_spark_stream_command(args: argparse.Namespace) -> int:
    """The ``spark-stream`` handler: 0 when the queries end cleanly, 2 on bad usage."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s spark-stream %(levelname)s %(message)s"
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)  # one line per foreachBatch callback otherwise
    sources = load_sources()
    if args.source not in sources:
        LOG.error("unknown source %r; known: %s", args.source, sorted(sources))
        return 2
    if args.kafka and not args.topic:
        LOG.error("--kafka needs --topic")
        return 2
    source = sources[args.source]
    if source.entity is not None:
        LOG.error(
            "%s has an entity column (%s): streams score one series; use the batch pipeline",
            source.name,
            source.entity,
        )
        return 2
    warehouse = Warehouse(Path(args.warehouse) if args.warehouse else warehouse_dir())
    checkpoint = Path(args.checkpoint) if args.checkpoint else checkpoint_dir(warehouse, source)
    spark = spark_session(args.master)
    try:
        if args.kafka:
            lines = kafka_lines(spark, args.kafka, args.topic)
        else:
            lines = landing_lines(spark, source, Path(args.landing) if args.landing else landing_dir())
        summary = run_spark_stream(spark, source, warehouse, lines, checkpoint, once=args.once)
    except (ConfigError, PySparkException) as error:
        LOG.error("%s", error)
        return 2
    except KeyboardInterrupt:
        LOG.info("interrupted: Spark's checkpoint and the scorer state keep what was done")
        return 0
    LOG.info(
        "done: %d window(s) scored, %d line(s) quarantined, %d late event(s) dropped; checkpoint %s",
        summary.windows,
        summary.quarantined,
        summary.late_dropped,
        summary.checkpoint,
    )
    return 0
