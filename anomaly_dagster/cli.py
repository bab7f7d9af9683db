"""``anomaly-dagster``: generate sample logs and report what the pipeline found.

Materialization itself goes through Dagster (``make backfill`` / the UI); this CLI covers what
happens around it.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta
from pathlib import Path

import pandas as pd

from anomaly_dagster.config import ConfigError, SourceConfig, load_sources, warehouse_dir
from anomaly_dagster.evaluation import evaluate, label_line_start, load_labels
from anomaly_dagster.generate import generate_clickstream, generate_sensors
from anomaly_dagster.spark_stream import register_cli as register_spark_stream_cli
from anomaly_dagster.streaming import register_cli as register_stream_cli
from anomaly_dagster.warehouse import Warehouse

GENERATORS = {"clickstream": generate_clickstream, "sensors": generate_sensors}


class UsageError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


def _source(name: str) -> SourceConfig:
    sources = load_sources()
    if name not in sources:
        raise UsageError(f"unknown source {name!r}; known: {sorted(sources)}")
    return sources[name]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD day: {text!r}") from None


def _generate(args: argparse.Namespace) -> int:
    if args.source not in GENERATORS:
        print(f"no generator for source {args.source!r}; available: {sorted(GENERATORS)}", file=sys.stderr)
        return 2
    source = _source(args.source)
    start = args.start or source.start_date
    if start < source.start_date:
        raise UsageError(
            f"--start {start} is before {source.name}'s start_date {source.start_date}: those days are no "
            "partitions and their events would be quarantined; start on or after it"
        )
    result = GENERATORS[args.source](Path(args.out), days=args.days, start=start, seed=args.seed)
    print(f"wrote {len(result.files)} files to {args.out}; labels in {result.labels}")
    print(f"partitions: {start.isoformat()} .. {(start + timedelta(days=args.days - 1)).isoformat()}")
    return 0


def _report(args: argparse.Namespace) -> int:
    source = _source(args.source)
    warehouse = Warehouse(Path(args.warehouse) if args.warehouse else warehouse_dir())
    if not warehouse.catalog_path.exists():
        print(f"no catalog at {warehouse.catalog_path}: materialize the pipeline first", file=sys.stderr)
        return 1
    name = source.name
    tables = warehouse.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [name]
    )["table_name"]
    if not {"incidents", "resampled", "scores"} <= set(tables):
        print(f"no {name} tables in {warehouse.catalog_path}: materialize {name} first", file=sys.stderr)
        return 1
    incidents = warehouse.query(f'SELECT * EXCLUDE (date) FROM "{name}".incidents ORDER BY start, "end"')
    # an incident over midnight is in both days' tables: the later row (continued) is the whole of it
    keys = ["start", *([source.entity] if source.entity is not None else [])]
    incidents = incidents.drop_duplicates(keys, keep="last").reset_index(drop=True)
    buckets = warehouse.query(f'SELECT count(*) AS n FROM "{name}".resampled')["n"].iloc[0]
    print(f"{name}: {buckets} buckets, {len(incidents)} incidents")
    # one line per incident; the JSON columns (observed, expected, band, sample log lines) stay in the table
    shown = incidents.drop(
        columns=["observed", "expected", "band", "sample_events", "peak_bucket"], errors="ignore"
    )
    with pd.option_context("display.width", 160, "display.max_rows", 200, "display.precision", 2):
        print(shown.to_string(index=False) if len(shown) else "(no incidents)")
    if len(incidents):
        print(f'observed and expected values and sample log lines: SELECT * FROM "{name}".incidents')
    if args.labels:
        scores = warehouse.query(
            # a bucket is flagged when any entity's is (one row per bucket without entities)
            f'SELECT bucket_start, bool_or(is_anomaly) AS is_anomaly FROM "{name}".scores '
            "WHERE detector = 'ensemble' GROUP BY 1 ORDER BY 1"
        )
        predicted = pd.Series(scores["is_anomaly"].to_numpy(), index=pd.DatetimeIndex(scores["bucket_start"]))
        try:
            labels = load_labels(Path(args.labels), source.bucket_minutes, label_line_start(source))
        except ValueError as error:  # a bad labels file: one line naming it, not a traceback
            raise UsageError(f"--labels: {error}") from None
        result = evaluate(predicted, labels, source.bucket_minutes, source.incident_gap_buckets)
        print("against labels:", result.to_dict())
    print(f"tables: {warehouse.catalog_path} (schema {name}); Parquet under {warehouse.root / name}")
    print(f"plots: {warehouse.root / name / 'plots'}")
    return 0


def _has_labels(args: argparse.Namespace) -> int:
    return 0 if _source(args.source).labels is not None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly-dagster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="write realistic sample raw logs with labelled faults")
    generate.add_argument("source")
    generate.add_argument("--days", type=_positive, default=14)
    generate.add_argument("--out", required=True, help="landing folder to write into")
    generate.add_argument("--start", type=_day, help="first day (default: the source's start_date)")
    generate.add_argument("--seed", type=int, default=7)
    generate.set_defaults(handler=_generate)
    report = commands.add_parser("report", help="print incidents and where the outputs are")
    report.add_argument("source")
    report.add_argument("--warehouse", help="default: ANOMALY_WAREHOUSE_DIR or data/warehouse")
    report.add_argument("--labels", help="labels file (0/1 line or start,end CSV) to score against")
    report.set_defaults(handler=_report)
    labelled = commands.add_parser(
        "has-labels", help="exit 0 if the source is evaluated against labels, 1 if not (for scripts)"
    )
    labelled.add_argument("source")
    labelled.set_defaults(handler=_has_labels)
    register_stream_cli(commands)
    register_spark_stream_cli(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, ConfigError, FileNotFoundError) as error:
        print(f"anomaly-dagster {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
