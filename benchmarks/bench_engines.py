"""Wall time of the raw → resampled stages: our DuckDB stage against its floor, pandas, and Spark.

One run generates N raw clickstream events once (CSV files shaped like the reference: padded page and
user values, a session id, time-ordered files over several days), then times on the same files:

- ``duckdb stage``: ``pipeline.run_ingest`` + ``pipeline.run_resample`` into a fresh warehouse, the real
  thing (landing index, typed rows with quarantine checks, one Parquet file per day, lineage, resample);
- ``duckdb bare``: one DuckDB query, ``read_csv`` + ``time_bucket`` + ``count``/``count(DISTINCT)``, the
  floor for any DuckDB aggregation of the files (it keeps no events);
- ``duckdb keep floor``: the least a stage that keeps its events can do in DuckDB: one typed read of all
  files (timestamps parsed, values trimmed), one time-sorted Parquet file per day, and the aggregation
  over those files; no checks, no quarantine, no line numbers;
- ``pandas``: what the seed did, ``read_csv`` and ``resample('10min')`` with ``nunique``/``count``;
- ``spark stage``: the Spark engine (``local[2]``) into a fresh warehouse; the session start is timed
  apart.

The DuckDB stage is also broken down (landing pass, reading and typing the files, replay detection,
per-day Parquet writes, resample). Times are wall seconds, the best of ``--repeat`` runs each; the load
average is printed, as other work on the machine inflates them. The last line is JSON.

Usage: ``python benchmarks/bench_engines.py [--events 5000000] [--days 14] [--files 4] [--repeat 1]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from anomaly_dagster import __version__, ingest, pipeline
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, load_source
from anomaly_dagster.pipeline import StageContext
from anomaly_dagster.warehouse import RunInfo, Warehouse

START = date(2020, 7, 7)
HEADER = b"timestamp,page,user,session_id\n"
PAGES, USERS = 20, 50_000


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Zero-padded decimal digits as an (n, width) byte matrix."""
    out = np.empty((len(values), width), dtype=np.uint8)
    rest = values.astype(np.int64)
    for column in range(width - 1, -1, -1):
        out[:, column] = ord("0") + rest % 10
        rest = rest // 10
    return out


def generate(root: Path, events: int, days: int, files: int, seed: int = 0) -> list[Path]:
    """``events`` raw clicks over ``days`` days in ``files`` time-ordered CSV files, built as byte matrices.

    Like the reference: ``2020-07-07 08:41:58, p03 , u0000000001,2020-07-07 08:41:58 ; p03 ; u0000000001``;
    a daily cycle, Zipf-distributed pages and users. Files split between seconds, so no event is
    repeated across files (which the stage would quarantine as a replay).
    """
    rng = np.random.default_rng(seed)
    weight = 1.0 + 0.8 * np.sin((np.arange(24) - 9) / 24 * 2 * np.pi)
    hour = np.searchsorted(np.cumsum(weight / weight.sum()), rng.random(events))
    stamp = np.sort(rng.integers(0, days, events) * 86400 + hour * 3600 + rng.integers(0, 3600, events))
    page = (rng.zipf(1.6, events) - 1) % PAGES
    user = ((rng.zipf(1.3, events) - 1) * 7919) % USERS
    day, second = stamp // 86400, stamp % 86400
    when = np.empty((events, 19), dtype=np.uint8)
    names = "".join((START + timedelta(days=int(d))).isoformat() for d in range(days))
    when[:, :10] = np.frombuffer(names.encode(), dtype=np.uint8).reshape(days, 10)[day]
    when[:, 10], when[:, 13], when[:, 16] = ord(" "), ord(":"), ord(":")
    for offset, value in ((11, second // 3600), (14, second // 60 % 60), (17, second % 60)):
        when[:, offset : offset + 2] = _digits(value, 2)
    pages, users = _digits(page, 2), _digits(user, 10)

    def text(value: str) -> np.ndarray:
        return np.broadcast_to(np.frombuffer(value.encode(), dtype=np.uint8), (events, len(value)))

    parts = [when, text(", p"), pages, text(" , u"), users, text(","), when, text(" ; p"), pages]
    rows = np.concatenate([*parts, text(" ; u"), users, text("\n")], axis=1)
    cuts = [int(np.searchsorted(stamp, stamp[events * k // files])) for k in range(1, files)]
    paths = []
    for number, (first, last) in enumerate(zip([0, *cuts], [*cuts, events], strict=True)):
        path = root / f"clicks_{number:02d}.csv"
        with open(path, "wb") as handle:
            handle.write(HEADER)
            handle.write(rows[first:last].tobytes())
        paths.append(path)
    return paths


@contextlib.contextmanager
def timed_calls(targets: list[tuple[object, str]]) -> Iterator[dict[str, float]]:
    """Total wall time per wrapped function (``(owner, name)``) while the block runs; nested calls count
    in each wrapper."""
    totals: dict[str, float] = defaultdict(float)
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def wrap(function: Callable, label: str) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start

        return timed

    for owner, name, function in originals:
        setattr(owner, name, wrap(function, name))
    try:
        yield totals
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def best(repeat: int, work: Callable[[], object]) -> tuple[float, object]:
    """The fastest wall time of ``repeat`` runs, and the last run's result."""
    fastest, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest, result


def fresh_context(landing: Path, scratch: Path) -> StageContext:
    """The clickstream stages over ``landing`` into a new, empty warehouse under ``scratch``."""
    return StageContext(
        load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml"),
        Warehouse(Path(tempfile.mkdtemp(dir=scratch))),
        landing,
        RunInfo("bench", __version__),
    )


def duckdb_stage(landing: Path, scratch: Path, days: list[date]) -> tuple[int, dict[str, float]]:
    """Both DuckDB stages on a fresh warehouse; returns the events resampled and the stage's breakdown."""
    context = fresh_context(landing, scratch)
    targets = [
        (ingest, "ingest_landing"),
        (ingest, "load_file"),
        (ingest, "_take_replayed_events"),
        (Warehouse, "write_partition_query"),
        (Warehouse, "record"),
        (pipeline, "run_ingest"),
        (pipeline, "run_resample"),
    ]
    with timed_calls(targets) as totals:
        pipeline.run_ingest(context, days)
        (output,) = pipeline.run_resample(context, days)
    shutil.rmtree(context.warehouse.root)
    return int(sum(frame["clicks"].sum() for frame in output.frames.values())), dict(totals)


def _typed_csv(files: list[Path], with_filename: bool = False) -> str:
    listing = "[" + ", ".join(f"'{path}'" for path in files) + "]"
    columns = "{'timestamp': 'TIMESTAMP', 'page': 'VARCHAR', 'user': 'VARCHAR', 'session_id': 'VARCHAR'}"
    return f"read_csv({listing}, header = true, columns = {columns}, filename = {with_filename})"


def _resampled_clicks(connection: duckdb.DuckDBPyConnection, relation: str) -> int:
    table = connection.execute(
        "SELECT time_bucket(INTERVAL 10 MINUTE, timestamp) AS bucket_start, count(DISTINCT page) AS pages, "
        f'count(DISTINCT "user") AS users, count(*) AS clicks FROM {relation} GROUP BY 1 ORDER BY 1'
    ).df()
    return int(table["clicks"].sum())


def duckdb_bare(files: list[Path]) -> int:
    with duckdb.connect() as connection:
        return _resampled_clicks(connection, _typed_csv(files))


def duckdb_keep_floor(files: list[Path], scratch: Path, days: list[date]) -> int:
    out = Path(tempfile.mkdtemp(dir=scratch))
    with duckdb.connect() as connection:
        connection.execute(
            'CREATE TEMP TABLE events AS SELECT timestamp, trim(page) AS page, trim("user") AS "user", '
            f"trim(session_id) AS session_id, filename AS source_file FROM {_typed_csv(files, with_filename=True)}"
        )
        for day in days:
            connection.execute(
                f"COPY (SELECT * FROM events WHERE timestamp >= '{day}'::TIMESTAMP AND timestamp < "
                f"'{day + timedelta(days=1)}'::TIMESTAMP ORDER BY timestamp) TO '{out}/{day}.parquet' (FORMAT parquet)"
            )
        clicks = _resampled_clicks(connection, f"read_parquet('{out}/*.parquet')")
    shutil.rmtree(out)
    return clicks


def pandas_resample(files: list[Path]) -> int:
    events = pd.concat([pd.read_csv(path, parse_dates=["timestamp"]) for path in files], ignore_index=True)
    table = (
        events.set_index("timestamp")
        .resample("10min")
        .agg({"page": "nunique", "user": "nunique", "session_id": "count"})
    )
    return int(table["session_id"].sum())


def spark_stage(spark, landing: Path, scratch: Path, days: list[date]) -> int:
    from anomaly_dagster.engines.spark import run_ingest_spark, run_resample_spark

    context = fresh_context(landing, scratch)
    run_ingest_spark(context, days, spark)
    (output,) = run_resample_spark(context, days, spark)
    shutil.rmtree(context.warehouse.root)
    return int(sum(frame["clicks"].sum() for frame in output.frames.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="keep the fastest of this many runs of each")
    parser.add_argument("--skip-spark", action="store_true")
    parser.add_argument("--skip-pandas", action="store_true")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    try:
        landing = scratch / "landing"
        landing.mkdir()
        start = time.perf_counter()
        files = generate(landing, args.events, args.days, args.files)
        size = sum(path.stat().st_size for path in files)
        print(
            f"generated {args.events:,} events in {len(files)} CSV files ({size / 1e6:.0f} MB, {args.days} days) "
            f"in {time.perf_counter() - start:.1f} s; load average {os.getloadavg()[0]:.2f}"
        )
        days = [START + timedelta(days=offset) for offset in range(args.days)]

        results: dict[str, float] = {}
        counts: dict[str, int] = {}
        breakdowns = []

        def stage() -> int:
            count, breakdown = duckdb_stage(landing, scratch, days)
            breakdowns.append(breakdown)
            return count

        results["duckdb stage"], counts["duckdb stage"] = best(args.repeat, stage)
        results["duckdb bare"], counts["duckdb bare"] = best(args.repeat, lambda: duckdb_bare(files))
        results["duckdb keep floor"], counts["duckdb keep floor"] = best(
            args.repeat, lambda: duckdb_keep_floor(files, scratch, days)
        )
        if not args.skip_pandas:
            results["pandas"], counts["pandas"] = best(args.repeat, lambda: pandas_resample(files))
        if not args.skip_spark:
            from anomaly_dagster.engines.spark import spark_session

            session_start = time.perf_counter()
            spark = spark_session("local[2]")
            results["spark session start"] = time.perf_counter() - session_start
            results["spark stage"], counts["spark stage"] = best(
                args.repeat, lambda: spark_stage(spark, landing, scratch, days)
            )

        bare = results["duckdb bare"]
        print(f"\n{'':22}{'seconds':>9}{'M events/s':>12}{'vs bare':>9}   events resampled")
        for name, seconds in results.items():
            rate = f"{args.events / seconds / 1e6:12.2f}" if name != "spark session start" else f"{'':12}"
            print(f"{name:22}{seconds:9.2f}{rate}{seconds / bare:9.2f}   {counts.get(name, '')}")
        breakdown = min(breakdowns, key=lambda totals: totals["run_ingest"] + totals["run_resample"])
        print("\nduckdb stage breakdown (seconds; nested calls count in each line):")
        for name, seconds in breakdown.items():
            print(f"  {name:24}{seconds:8.2f}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")

        summary = {
            "events": args.events,
            "days": args.days,
            "files": len(files),
            "seconds": {name: round(seconds, 3) for name, seconds in results.items()},
            "duckdb_stage_breakdown": {name: round(seconds, 3) for name, seconds in breakdown.items()},
            "duckdb_stage_vs_bare": round(results["duckdb stage"] / bare, 3),
            "duckdb_stage_vs_keep_floor": round(results["duckdb stage"] / results["duckdb keep floor"], 3),
            "duckdb_keep_floor_vs_bare": round(results["duckdb keep floor"] / bare, 3),
            "load_average": round(os.getloadavg()[0], 2),
        }
        if "pandas" in results:
            summary["duckdb_stage_vs_pandas"] = round(results["duckdb stage"] / results["pandas"], 3)
        if "spark stage" in results:
            summary["spark_stage_vs_duckdb_stage"] = round(
                results["spark stage"] / results["duckdb stage"], 3
            )
        print(json.dumps(summary))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
