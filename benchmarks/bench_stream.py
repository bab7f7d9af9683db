"""Throughput of the streaming path on the reference clickstream (all 9 days, 258,220 events), one core.

The raw log is sorted by time and replayed as JSON lines at full speed, in-process. Two figures:

- *into windows*: parse (JSON, validation, timestamps) and windowing (exact distinct counts) of every
  event, closing windows as the watermark passes them; this is the per-event cost that bounds the rate
  a stream can sustain;
- *end to end*: ``StreamRunner`` over the file: the above plus, per closed window, features, the lead
  forest's score/explanation/update, the other detectors, JSON output and the warehouse upsert.
  With an empty warehouse (the default) it cold-starts, so the first day's training is included; with
  ``--warehouse`` (copied, never written) it warm-starts from that warehouse's models.

Times are CPU seconds of this process (``time.process_time``), best of ``--repeats`` runs, after a
warm-up run (numba and imports); everything is single-threaded. The last line is JSON with all figures.

Usage: ``python benchmarks/bench_stream.py [--data PATH] [--warehouse DIR] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pandas as pd  # noqa: E402

from anomaly_dagster import streaming  # noqa: E402
from anomaly_dagster.config import load_sources  # noqa: E402
from anomaly_dagster.warehouse import Warehouse  # noqa: E402

DATA = Path("/work/shared/data/clickstream/clicks.csv.gz")
TARGET = 200_000


def replay_log(path: Path) -> bytes:
    """The raw events sorted by time (stable), one JSON object per line, values as logged (padded)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False).sort_values("timestamp", kind="stable")
    return "".join(json.dumps(record) + "\n" for record in raw.to_dict(orient="records")).encode()


def chunks(data: bytes, size: int) -> list[bytes]:
    """Complete-line chunks of about ``size`` bytes, as the file transport reads them."""
    parts, start = [], 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + size) + 1 or len(data)
        parts.append(data[start:end])
        start = end
    return parts


def best_cpu(work: Callable[[], object], repeats: int) -> float:
    fastest = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        work()
        fastest = min(fastest, time.process_time() - started)
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--warehouse", type=Path, help="warm-start from a copy of this warehouse")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    source = load_sources()["clickstream"]
    data = replay_log(args.data)
    events = data.count(b"\n")
    parts = chunks(data, streaming.READ_BYTES)
    config = streaming.StreamingConfig(checkpoint_seconds=1e9)  # one warehouse flush, at the end

    def into_windows() -> int:
        parser = streaming.EventParser(source, "bench")
        windows = streaming.WindowStore(source, config.allowed_lateness_minutes)
        closed = 0
        for part in parts:
            parsed = parser.parse(part)
            windows.add(parsed, parsed.ts == parsed.ts)
            closed += len(windows.close_ready())
        return closed + len(windows.close_all())

    with tempfile.TemporaryDirectory(prefix="bench-stream-") as scratch:
        log = Path(scratch) / "clicks.jsonl"
        log.write_bytes(data)
        runs = iter(range(1_000_000))
        counts: dict[str, int] = {}

        def end_to_end() -> None:
            root = Path(scratch) / f"run-{next(runs)}"
            warehouse = root / "warehouse"
            if args.warehouse:
                shutil.copytree(args.warehouse, warehouse)
            runner = streaming.StreamRunner(
                source,
                streaming.FileTransport(log),
                str(root / "out.jsonl"),
                Warehouse(warehouse),
                None,
                config,
            )
            runner.run()
            counts.update(runner.counts)
            shutil.rmtree(root)

        windows = into_windows()  # warm-up: imports, numba caches, first-call costs
        end_to_end()
        window_seconds = best_cpu(into_windows, args.repeats)
        total_seconds = best_cpu(end_to_end, args.repeats)

    assert counts["events"] == events and counts["windows"] == windows, counts
    result = {
        "events": events,
        "windows": windows,
        "into_windows_cpu_seconds": round(window_seconds, 3),
        "into_windows_events_per_second": round(events / window_seconds),
        "end_to_end_cpu_seconds": round(total_seconds, 3),
        "end_to_end_events_per_second": round(events / total_seconds),
        "end_to_end_windows_per_second": round(windows / total_seconds, 1),
        "start": "warm" if args.warehouse else "cold",
        "target_events_per_second": TARGET,
        "meets_target": events / window_seconds >= TARGET,
    }
    print(f"{events} events, {windows} windows (9 days of 10-minute windows)")
    print(f"into windows (parse + window): {result['into_windows_events_per_second']:,} events/s")
    print(
        f"end to end ({result['start']} start; score, output, warehouse): "
        f"{result['end_to_end_events_per_second']:,} events/s, {result['end_to_end_windows_per_second']} windows/s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
