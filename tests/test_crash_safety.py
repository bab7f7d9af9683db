"""kill -9 in the middle of a stage, then re-run: no partial partition is ever visible, the catalog stays
consistent (DuckDB keeps only committed transactions, replaying its WAL), and the re-run succeeds with
exactly the data of an uninterrupted run.

Each scenario runs the ingest and resample stages in a child process that SIGKILLs itself at one point:
half-way through writing a Parquet file, with a complete temporary file not yet renamed, between the
renames and the catalog transaction, inside the transaction just before COMMIT, and just after COMMIT
(before DuckDB checkpoints). The hooks are monkeypatched in the child; the library has none. Children
are forked from a server that has imported the pipeline once, so each costs a fraction of a second.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from anomaly_dagster import pipeline, storage
from anomaly_dagster import warehouse as warehouse_module
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, load_source
from anomaly_dagster.warehouse import RunInfo, Warehouse

DAYS = [date(2020, 7, 7) + timedelta(days=offset) for offset in range(3)]
ASSETS = ["raw_events", "quarantine", "resampled"]
SOURCE = load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")


def forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["anomaly_dagster.pipeline"])
    return context


def write_landing(landing: Path, name: str, seed: int, n: int) -> None:
    """``n`` events over DAYS in the reference format, plus bad lines so every day has quarantine rows."""
    rng = np.random.default_rng(seed)
    seconds = rng.integers(0, 86_400 * len(DAYS), n)
    stamps = [
        (pd.Timestamp(DAYS[0]) + pd.Timedelta(seconds=int(s))).strftime("%Y-%m-%d %H:%M:%S") for s in seconds
    ]
    pages = rng.integers(0, 20, n)
    users = rng.integers(0, 300, n)
    lines = [
        f"{t}, p{p:02d} , u{u:010d},{t} ; p{p:02d} ; u{u:010d}"
        for t, p, u in zip(stamps, pages, users, strict=True)
    ]
    lines.insert(n // 2, "not-a-time,p01,u1,s")
    lines += [f"{day} 12:00:00,p01,,s" for day in DAYS]  # missing user: a quarantine row on every day
    landing.mkdir(parents=True, exist_ok=True)
    (landing / name).write_text("timestamp,page,user,session_id\n" + "\n".join(lines) + "\n")


def run_stages(root: Path, landing: Path, run_id: str) -> None:
    context = pipeline.StageContext(SOURCE, Warehouse(root), landing, RunInfo(run_id, "v1"))
    pipeline.run_ingest(context, DAYS)
    pipeline.run_resample(context, DAYS)


def crashing_run(mode: str, root: str, landing: str, marker: str) -> None:
    """The child: the two stages with a SIGKILL at the point ``mode`` names."""
    calls = {"publish": 0, "record": 0}

    def die(where: str) -> None:
        Path(marker).write_text(where)
        os.kill(os.getpid(), signal.SIGKILL)

    real_publish = warehouse_module.publish

    def publish(tmp: Path, path: Path) -> None:
        calls["publish"] += 1  # 1-3 raw_events, 4-6 quarantine, 7-9 resampled
        if mode == "parquet-half" and calls["publish"] == 2:
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])
            die(str(tmp))
        if mode == "before-rename" and calls["publish"] == 5:
            die(str(tmp))
        real_publish(tmp, path)

    real_record = warehouse_module.Warehouse.record

    def record(self, partitions, run):
        calls["record"] += 1  # 1 ingest, 2 resample
        if mode == "before-record" and calls["record"] == 1:
            die("record")
        return real_record(self, partitions, run)

    class Catalog:
        """The catalog connection, dying around COMMIT."""

        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def execute(self, sql: str, *args):
            if sql == "COMMIT" and mode == "before-commit" and calls["record"] == 1:
                die("before COMMIT")
            result = self.inner.execute(sql, *args)
            if sql == "COMMIT" and mode == "after-commit" and calls["record"] == 2:
                die("after COMMIT")
            return result

    real_connect = warehouse_module._connect_with_retry
    warehouse_module.publish = publish
    warehouse_module.Warehouse.record = record
    warehouse_module._connect_with_retry = lambda path, read_only: Catalog(real_connect(path, read_only))
    run_stages(Path(root), Path(landing), "crashing")
    Path(marker).write_text("finished")


def partitions(warehouse: Warehouse) -> dict[tuple[str, date], pd.DataFrame]:
    """Every partition file on disk, read whole (a half-written file would fail here)."""
    return {
        (asset, day): pq.read_table(warehouse.partition_file("clickstream", asset, day)).to_pandas()
        for asset in ASSETS
        for day in warehouse.existing_days("clickstream", asset)
    }


def lineage(warehouse: Warehouse) -> pd.DataFrame:
    return warehouse.query(
        "SELECT asset, partition, run_id, row_count, checksum FROM meta.lineage ORDER BY asset, partition"
    )


def same(left: pd.DataFrame, right: pd.DataFrame) -> bool:
    try:
        pd.testing.assert_frame_equal(left, right)
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Landing v1 and v2 (v2 adds a file), uninterrupted runs of each into fresh warehouses, and a
    snapshot of the v1 warehouse to restore (at the same path: lineage holds absolute paths)."""
    warm = forkserver().Process(target=os.getpid)  # start the fork server while the clean runs go
    warm.start()
    root = tmp_path_factory.mktemp("crash")
    v1, v2 = root / "landing_v1", root / "landing_v2"
    write_landing(v1, "clicks_a.csv", seed=1, n=1500)
    write_landing(v2, "clicks_a.csv", seed=1, n=1500)
    write_landing(v2, "clicks_b.csv", seed=2, n=700)
    result = {
        "root": root,
        "v1": v1,
        "v2": v2,
        "warehouse": root / "warehouse",
        "snapshot": root / "snapshot",
    }
    for name, landing in (("old", v1), ("new", v2)):
        warehouse = Warehouse(root / f"clean_{name}")
        run_stages(warehouse.root, landing, "clean")
        result[name] = {"partitions": partitions(warehouse), "lineage": lineage(warehouse)}
    assert set(result["old"]["partitions"]) == set(result["new"]["partitions"])
    for key, frame in result["old"]["partitions"].items():
        assert not same(frame, result["new"]["partitions"][key]), key  # v2 changes every partition
    run_stages(result["warehouse"], v1, "first")
    shutil.copytree(result["warehouse"], result["snapshot"])
    warm.join(120)
    return result


def restored(runs: dict) -> Warehouse:
    """The warehouse after a complete run on landing v1, as if just finished."""
    shutil.rmtree(runs["warehouse"], ignore_errors=True)
    shutil.copytree(runs["snapshot"], runs["warehouse"])
    return Warehouse(runs["warehouse"])


MODES = {
    "parquet-half": "killed half-way through writing raw_events of the second day",
    "before-rename": "killed with a complete temporary quarantine file not yet renamed",
    "before-record": "killed after every ingest partition was renamed, before the catalog transaction",
    "before-commit": "killed inside the ingest catalog transaction, just before COMMIT",
    "after-commit": "killed just after the resample COMMIT, before DuckDB checkpoints its WAL",
}


@pytest.mark.parametrize(
    "mode",
    [pytest.param(mode, marks=pytest.mark.slow) if mode == "before-record" else mode for mode in MODES],
)
def test_kill_then_rerun(mode: str, runs: dict, tmp_path: Path) -> None:
    warehouse = restored(runs)  # a complete earlier run to be replaced
    first_lineage = lineage(warehouse)
    assert first_lineage["run_id"].eq("first").all() and warehouse.audit().consistent

    marker = tmp_path / "marker"
    child = forkserver().Process(
        target=crashing_run, args=(mode, str(warehouse.root), str(runs["v2"]), str(marker))
    )
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, (
        mode,
        child.exitcode,
        marker.read_text() if marker.exists() else "",
    )
    assert marker.read_text() != "finished"

    # no partial partition is visible: every file reads whole and is the old or the new version
    old, new = runs["old"]["partitions"], runs["new"]["partitions"]
    visible = partitions(warehouse)
    assert set(visible) == set(old)
    versions = {
        key: "new" if same(frame, new[key]) else "old" if same(frame, old[key]) else "?"
        for key, frame in visible.items()
    }
    assert "?" not in versions.values(), versions
    # the catalog's views read the same complete files; temporary files are hidden from them
    for asset in ASSETS:
        rows = warehouse.query(f"SELECT count(*) AS n FROM clickstream.{asset}")["n"].iloc[0]
        assert rows == sum(len(frame) for (name, _), frame in visible.items() if name == asset)
    audit = warehouse.audit("clickstream")
    if mode in ("parquet-half", "before-rename"):
        (temporary,) = audit.temporaries
        assert temporary.name.startswith(".part.parquet.tmp-")
        pattern = str(warehouse.root / "clickstream" / "*" / "date=*" / "part.parquet")
        listed = duckdb.sql(f"SELECT file FROM glob('{pattern}')").fetchall()  # the views' glob
        assert len(listed) == len(visible) and str(temporary) not in {row[0] for row in listed}
        assert versions[("raw_events", DAYS[0])] == "new"
        assert versions[("resampled", DAYS[0])] == "old"
    else:
        assert audit.temporaries == []

    # the catalog after DuckDB's recovery
    after_crash = lineage(warehouse)
    if mode == "after-commit":
        assert warehouse.catalog_path.with_name(warehouse.catalog_path.name + ".wal").exists()
        assert audit.consistent  # the committed transaction was replayed from the WAL
        assert after_crash["run_id"].eq("crashing").all()
    else:
        pd.testing.assert_frame_equal(after_crash, first_lineage)  # nothing of the crashed run committed
    if mode in ("before-record", "before-commit"):
        assert all(versions[(asset, day)] == "new" for asset in ("raw_events", "quarantine") for day in DAYS)
        assert len(audit.checksum_mismatches) == 2 * len(DAYS)  # files newer than their lineage rows

    # the re-run succeeds, cleans up, and leaves exactly the uninterrupted run's data and lineage
    run_stages(warehouse.root, runs["v2"], "rerun")
    final = partitions(warehouse)
    assert set(final) == set(new)
    for key, frame in final.items():
        pd.testing.assert_frame_equal(frame, new[key], obj=str(key))
    audit = warehouse.audit("clickstream")
    assert audit.consistent and audit.temporaries == [], audit
    got = lineage(warehouse)
    assert got["run_id"].eq("rerun").all()
    want = runs["new"]["lineage"]
    pd.testing.assert_frame_equal(got.drop(columns="run_id"), want.drop(columns="run_id"))


@pytest.mark.slow
def test_kill_during_the_first_catalog_transaction(runs: dict, tmp_path: Path) -> None:
    """A warehouse whose very first catalog transaction was killed: the catalog file exists but holds
    nothing, readers see no views yet, and the re-run creates everything."""
    warehouse = Warehouse(tmp_path / "warehouse")
    marker = tmp_path / "marker"
    child = forkserver().Process(
        target=crashing_run, args=("before-commit", str(warehouse.root), str(runs["v2"]), str(marker))
    )
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL and marker.read_text() == "before COMMIT"
    assert warehouse.catalog_path.exists()
    tables = warehouse.query("SELECT table_schema, table_name FROM information_schema.tables")
    assert tables.empty
    audit = warehouse.audit()
    assert sorted({path.parent.parent.name for path in audit.unrecorded}) == ["quarantine", "raw_events"]
    run_stages(warehouse.root, runs["v2"], "rerun")
    assert warehouse.audit().consistent
    pd.testing.assert_frame_equal(
        lineage(warehouse).drop(columns="run_id"), runs["new"]["lineage"].drop(columns="run_id")
    )


def test_stale_temporary_files_are_removed_but_live_ones_are_not(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "warehouse")
    frame = pd.DataFrame({"x": [1, 2, 3]})
    path = warehouse.write_partition("clickstream", "resampled", DAYS[0], frame).path
    host = storage.temporary_sibling(path).name.rpartition(storage.TEMPORARY_MARK)[2].split("-")[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            stale = path.with_name(f".part.parquet{storage.TEMPORARY_MARK}{host}-{dead.pid}-{'a' * 32}")
            live = path.with_name(f".part.parquet{storage.TEMPORARY_MARK}{host}-{alive.pid}-{'b' * 32}")
            foreign = path.with_name(f".part.parquet{storage.TEMPORARY_MARK}otherhost-1-{'c' * 32}")
            for temporary in (stale, live, foreign):
                temporary.write_bytes(b"PAR1 half a file")
            # readers never look at them
            pd.testing.assert_frame_equal(
                warehouse.read_partitions("clickstream", "resampled", [DAYS[0]]), frame
            )
            assert warehouse.existing_days("clickstream", "resampled") == [DAYS[0]]
            assert sorted(warehouse.audit().temporaries) == sorted([stale, live, foreign])

            # the next write of the partition removes the dead writer's file only
            warehouse.write_partition("clickstream", "resampled", DAYS[0], frame)
            assert sorted(p.name for p in path.parent.iterdir()) == sorted(
                ["part.parquet", live.name, foreign.name]
            )
            # another host's file goes once it is older than a day
            old = os.stat(foreign).st_mtime - 2 * storage.STALE_AFTER_SECONDS
            os.utime(foreign, (old, old))
            assert storage.remove_stale_temporaries(path) == [foreign]
            assert sorted(p.name for p in path.parent.iterdir()) == sorted(["part.parquet", live.name])
        finally:
            alive.kill()
