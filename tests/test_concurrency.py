"""Two processes writing overlapping partitions and recording the catalog at once, with a third reading:
both writers succeed, no lock error escapes, readers only ever see whole partitions, and in the end
``meta.lineage`` has exactly one row per partition, describing the file that is on disk.

Processes are forked from a server that has imported the library once (multiprocessing forkserver).
"""

from __future__ import annotations

import json
import multiprocessing
import time
import traceback
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from anomaly_dagster import pipeline
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, load_source
from anomaly_dagster.warehouse import RunInfo, Warehouse

DAYS = [date(2020, 7, 7) + timedelta(days=offset) for offset in range(6)]
# overlapping on the 9th and the 10th, written in opposite orders with a little jitter, so a writer
# often renames a partition first and records it last
WRITER_DAYS = {0: DAYS[:4], 1: DAYS[2:][::-1]}
ROWS = {0: 40, 1: 70}  # each writer's partitions have their own size, so a mix would show
ROUNDS = 8
SOURCE = load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")


def forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["anomaly_dagster.pipeline"])
    return context


def report(path: str, body) -> None:
    """Run ``body`` and write its result (or the traceback) as JSON for the parent to check."""
    try:
        result = {"ok": True, "value": body()}
    except BaseException:  # everything the child met goes back to the test
        result = {"ok": False, "error": traceback.format_exc()}
    Path(path).write_text(json.dumps(result, default=str))


def writer(k: int, root: str, start: float, out: str) -> None:
    def body() -> int:
        warehouse = Warehouse(Path(root))
        connection = duckdb.connect()
        jitter = np.random.default_rng(k)
        time.sleep(max(0.0, start - time.time()))
        for round_ in range(ROUNDS):
            written = []
            for day in WRITER_DAYS[k]:
                frame = pd.DataFrame({"writer": k, "round": round_, "value": np.arange(ROWS[k])})
                written.append(warehouse.write_partition("clickstream", "resampled", day, frame))
                written.append(
                    warehouse.write_partition_query(
                        "clickstream",
                        "raw_events",
                        day,
                        connection,
                        f"SELECT {k} AS writer, {round_} AS round, range AS value FROM range({ROWS[k]})",
                    )
                )
                time.sleep(jitter.uniform(0, 0.02))
            time.sleep(jitter.uniform(0, 0.05))
            warehouse.record(written, RunInfo(f"w{k}-r{round_}", "v1"))
        return ROUNDS

    report(out, body)


def whole(frame: pd.DataFrame) -> bool:
    """One writer's one round, complete."""
    if frame.empty:
        return True
    versions = frame[["writer", "round"]].drop_duplicates()
    return len(versions) == 1 and len(frame) == ROWS[int(versions["writer"].iloc[0])]


def reader(root: str, stop_file: str, out: str) -> None:
    def body() -> dict[str, int]:
        warehouse = Warehouse(Path(root))
        checks = {"partition_reads": 0, "view_queries": 0}
        while not checks["view_queries"] or not Path(stop_file).exists():  # at least one pass
            for day in DAYS:
                for asset in ("resampled", "raw_events"):
                    frame = warehouse.read_partitions("clickstream", asset, [day])
                    assert whole(frame), (asset, day, frame.groupby(["writer", "round"]).size().to_dict())
                    checks["partition_reads"] += 1
            view = warehouse.query(
                "SELECT date, writer, round, count(*) AS n FROM clickstream.resampled GROUP BY ALL"
            )
            for day, rows in view.groupby("date"):
                assert len(rows) == 1 and rows["n"].iloc[0] == ROWS[int(rows["writer"].iloc[0])], (day, rows)
            lineage = warehouse.query("SELECT asset, partition, count(*) AS n FROM meta.lineage GROUP BY ALL")
            assert (lineage["n"] == 1).all()
            checks["view_queries"] += 1
        return checks

    report(out, body)


def result_of(path: Path) -> dict:
    assert path.exists(), f"{path.name}: the process died without a result"
    result = json.loads(path.read_text())
    assert result["ok"], result.get("error")
    return result


def test_two_writers_and_a_reader_on_overlapping_partitions(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "warehouse")
    seed = pd.DataFrame({"writer": [0] * ROWS[0], "round": -1, "value": np.arange(ROWS[0])})
    warehouse.record(  # the views exist before the reader starts
        [
            warehouse.write_partition("clickstream", asset, DAYS[0], seed)
            for asset in ("resampled", "raw_events")
        ],
        RunInfo("seed", "v1"),
    )
    context = forkserver()
    start = time.time() + 1.0
    outs = {name: tmp_path / f"{name}.json" for name in ("writer0", "writer1", "reader")}
    stop = tmp_path / "stop"
    processes = [
        context.Process(target=writer, args=(0, str(warehouse.root), start, str(outs["writer0"]))),
        context.Process(target=writer, args=(1, str(warehouse.root), start, str(outs["writer1"]))),
    ]
    watcher = context.Process(target=reader, args=(str(warehouse.root), str(stop), str(outs["reader"])))
    for process in [*processes, watcher]:
        process.start()
    for process in processes:
        process.join(180)
    stop.touch()
    watcher.join(60)
    assert [process.exitcode for process in [*processes, watcher]] == [0, 0, 0]
    assert result_of(outs["writer0"])["value"] == result_of(outs["writer1"])["value"] == ROUNDS
    checks = result_of(outs["reader"])["value"]
    assert checks["partition_reads"] > 0 and checks["view_queries"] > 0, checks

    # one lineage row per partition, each describing the file that is on disk
    lineage = warehouse.query("SELECT * FROM meta.lineage ORDER BY asset, partition")
    assert sorted(map(tuple, lineage[["asset", "partition"]].to_numpy())) == sorted(
        (asset, day.isoformat()) for asset in ("raw_events", "resampled") for day in DAYS
    )
    for row in lineage.itertuples():
        frame = warehouse.read_partitions("clickstream", row.asset, [date.fromisoformat(row.partition)])
        assert whole(frame)
        assert row.run_id == f"w{frame['writer'].iloc[0]}-r{frame['round'].iloc[0]}", row
        assert row.row_count == len(frame)
    audit = warehouse.audit()
    assert audit.consistent and audit.temporaries == [], audit
    # days only one writer wrote hold its last round; the overlap holds one writer's whole partition
    for day in DAYS:
        frame = warehouse.read_partitions("clickstream", "resampled", [day])
        owners = [k for k, days in WRITER_DAYS.items() if day in days]
        assert int(frame["writer"].iloc[0]) in owners
        if len(owners) == 1:
            assert int(frame["round"].iloc[0]) == ROUNDS - 1
    view = warehouse.query("SELECT count(*) AS n FROM clickstream.raw_events")
    assert view["n"].iloc[0] == sum(
        len(warehouse.read_partitions("clickstream", "raw_events", [day])) for day in DAYS
    )


def sized(n: int) -> int:
    return 40 + (n % 7) * 13


def replacer(root: str, stop_file: str, out: str) -> None:
    """Replace three partitions as fast as it can until told to stop, each version with its own size."""

    def body() -> int:
        warehouse = Warehouse(Path(root))
        version = 7
        while not Path(stop_file).exists():
            for day in DAYS[:3]:
                version += 1
                frame = pd.DataFrame({"writer": version, "value": np.arange(sized(version))})
                warehouse.write_partition("clickstream", "resampled", day, frame)
        return version - 7

    report(out, body)


def test_readers_never_see_two_versions_of_a_partition_mixed(tmp_path: Path) -> None:
    """DuckDB opens a Parquet file once for its metadata and again for its data: a rename in between
    would give wrong row counts or "Invalid data". Queries and read_partitions must see whole versions."""
    warehouse = Warehouse(tmp_path / "warehouse")
    seed = pd.DataFrame({"writer": 7, "value": np.arange(sized(7))})
    warehouse.record(
        [warehouse.write_partition("clickstream", "resampled", day, seed) for day in DAYS[:3]],
        RunInfo("seed", "v1"),
    )
    out, stop = tmp_path / "replacer.json", tmp_path / "stop"
    process = forkserver().Process(target=replacer, args=(str(warehouse.root), str(stop), str(out)))
    process.start()
    for _ in range(6000):  # up to ~60 s for the replacer's first write
        if warehouse.read_partitions("clickstream", "resampled", [DAYS[0]])["writer"].iloc[0] != 7:
            break
        assert process.is_alive(), "the replacer died before its first write"
        time.sleep(0.01)
    else:
        raise AssertionError("the replacer never started")
    try:
        for _ in range(25):  # while the replacer keeps replacing
            view = warehouse.query(
                "SELECT date, writer, count(*) AS n FROM clickstream.resampled GROUP BY ALL"
            )
            assert len(view) == 3 and (view["n"] == view["writer"].map(sized)).all(), view
            for day in DAYS[:3]:
                frame = warehouse.read_partitions("clickstream", "resampled", [day])
                assert frame["writer"].nunique() == 1 and len(frame) == sized(int(frame["writer"].iloc[0]))
    finally:
        stop.touch()
        process.join(60)
    assert process.exitcode == 0 and result_of(out)["value"] >= 6  # at least two versions of each


def test_a_writer_whose_file_was_replaced_does_not_record_it(tmp_path: Path) -> None:
    """The interleaving the stress test above can only hit by chance, played out step by step:
    A renames its file, B renames over it, B records, then A records. Lineage must describe B's
    file, the one on disk (A's row would name a checksum no file has)."""
    first, second = Warehouse(tmp_path / "warehouse"), Warehouse(tmp_path / "warehouse")
    mine = pd.DataFrame({"writer": 0, "round": 0, "value": np.arange(ROWS[0])})
    theirs = pd.DataFrame({"writer": 1, "round": 0, "value": np.arange(ROWS[1])})
    a = first.write_partition("clickstream", "resampled", DAYS[0], mine)
    b = second.write_partition("clickstream", "resampled", DAYS[0], theirs)
    assert second.record([b], RunInfo("b", "v1")) == [b]
    assert first.record([a], RunInfo("a", "v1")) == []  # superseded: skipped
    row = first.query("SELECT run_id, checksum, row_count FROM meta.lineage").iloc[0]
    assert (row["run_id"], row["checksum"], row["row_count"]) == ("b", b.checksum, ROWS[1])
    assert first.audit().consistent
    # in the other order both record, and the last one is the file on disk
    c = first.write_partition("clickstream", "resampled", DAYS[0], mine)
    assert first.record([c], RunInfo("c", "v1")) == [c]
    assert first.query("SELECT run_id FROM meta.lineage")["run_id"].tolist() == ["c"]
    assert first.audit().consistent


# --- the ingest and resample stages of two runs over overlapping windows -----------------------------------


def write_landing(landing: Path) -> None:
    rng = np.random.default_rng(3)
    n = 3000
    seconds = rng.integers(0, 86_400 * 4, n)
    stamps = [
        (pd.Timestamp(DAYS[0]) + pd.Timedelta(seconds=int(s))).strftime("%Y-%m-%d %H:%M:%S") for s in seconds
    ]
    lines = [
        f"{t}, p{p:02d} , u{u:010d},s"
        for t, p, u in zip(stamps, rng.integers(0, 20, n), rng.integers(0, 300, n), strict=True)
    ]
    lines += [f"{day} 12:00:00,p01,,s" for day in DAYS[:4]]
    landing.mkdir(parents=True)
    half = len(lines) // 2
    (landing / "clicks_a.csv").write_text("timestamp,page,user,session_id\n" + "\n".join(lines[:half]) + "\n")
    (landing / "clicks_b.csv").write_text("timestamp,page,user,session_id\n" + "\n".join(lines[half:]) + "\n")


def stages(root: str, landing: str, days: list[date], run_id: str, start: float, out: str) -> None:
    def body() -> str:
        context = pipeline.StageContext(SOURCE, Warehouse(Path(root)), Path(landing), RunInfo(run_id, "v1"))
        time.sleep(max(0.0, start - time.time()))
        for _ in range(2):
            pipeline.run_ingest(context, days)
            pipeline.run_resample(context, days)
        return run_id

    report(out, body)


@pytest.mark.slow
def test_two_pipeline_runs_over_overlapping_days(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    write_landing(landing)
    root = tmp_path / "warehouse"
    context = forkserver()
    start = time.time() + 1.0
    windows = {"run-a": DAYS[0:3], "run-b": DAYS[1:4]}
    outs = {name: tmp_path / f"{name}.json" for name in windows}
    processes = [
        context.Process(target=stages, args=(str(root), str(landing), days, name, start, str(outs[name])))
        for name, days in windows.items()
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
    assert [process.exitcode for process in processes] == [0, 0]
    for out in outs.values():
        result_of(out)

    warehouse = Warehouse(root)
    audit = warehouse.audit()
    assert audit.consistent and audit.temporaries == [], audit
    lineage = warehouse.query("SELECT asset, partition, run_id, checksum FROM meta.lineage ORDER BY ALL")
    assert sorted(map(tuple, lineage[["asset", "partition"]].to_numpy())) == sorted(
        (asset, day.isoformat()) for asset in ("quarantine", "raw_events", "resampled") for day in DAYS[:4]
    )
    # the same data as one uninterrupted run over the four days
    clean = Warehouse(tmp_path / "clean")
    one = pipeline.StageContext(SOURCE, clean, landing, RunInfo("clean", "v1"))
    pipeline.run_ingest(one, DAYS[:4])
    pipeline.run_resample(one, DAYS[:4])
    for asset in ("raw_events", "quarantine", "resampled"):
        query = f"SELECT * EXCLUDE (date) FROM clickstream.{asset} ORDER BY ALL"
        pd.testing.assert_frame_equal(warehouse.query(query), clean.query(query), obj=asset)
    events = warehouse.query("SELECT count(*) AS n FROM clickstream.raw_events")["n"].iloc[0]
    assert events == 3000


def test_readers_retry_while_a_writer_holds_the_catalog(tmp_path: Path) -> None:
    """A reader that opens the catalog while a writer holds DuckDB's lock waits instead of failing."""
    warehouse = Warehouse(tmp_path / "warehouse")
    frame = pd.DataFrame({"x": [1]})
    warehouse.record(
        [warehouse.write_partition("clickstream", "resampled", DAYS[0], frame)], RunInfo("r", "v")
    )
    with warehouse._catalog_writer():
        context = forkserver()
        out = tmp_path / "reader.json"
        process = context.Process(target=query_once, args=(str(warehouse.root), str(out)))
        process.start()
        time.sleep(1.5)
        assert process.is_alive()  # waiting for the lock, not failed
    process.join(60)
    assert process.exitcode == 0
    assert result_of(out)["value"] == 1


def query_once(root: str, out: str) -> None:
    report(
        out,
        lambda: int(
            Warehouse(Path(root)).query("SELECT count(*) AS n FROM clickstream.resampled")["n"].iloc[0]
        ),
    )
