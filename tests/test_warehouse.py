"""The warehouse: atomic Parquet partitions, catalog views and lineage, read-only queries, safe names."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from anomaly_dagster import warehouse as warehouse_module
from anomaly_dagster.incidents import merge_incidents
from anomaly_dagster.warehouse import CATALOG_FILE, RunInfo, Warehouse, file_checksum

D1, D2, D3 = date(2020, 7, 7), date(2020, 7, 8), date(2020, 7, 9)
RUN = RunInfo("run-1", "v1")


@pytest.fixture
def warehouse(tmp_path: Path) -> Warehouse:
    return Warehouse(tmp_path / "warehouse")


def frame(day: date, n: int, offset: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "bucket_start": pd.date_range(pd.Timestamp(day), periods=n, freq="10min"),
            "clicks": range(offset, offset + n),
        }
    )


def all_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


# --- Parquet partitions ------------------------------------------------------------------------------------


def test_write_partition_layout_and_metadata(warehouse: Warehouse) -> None:
    data = frame(D1, 5)
    written = warehouse.write_partition("clickstream", "resampled", D1, data, upstream=[("raw_events", D1)])
    assert written.path == warehouse.root / "clickstream" / "resampled" / "date=2020-07-07" / "part.parquet"
    assert written.path.exists()
    assert (written.source, written.asset, written.day, written.row_count) == (
        "clickstream",
        "resampled",
        D1,
        5,
    )
    assert written.checksum == file_checksum(written.path)
    assert len(written.checksum) == 64
    assert written.upstream == [("raw_events", D1)]
    pd.testing.assert_frame_equal(pq.read_table(written.path).to_pandas(), data)


def test_rewrite_replaces_content_exactly_and_leaves_no_temp_files(warehouse: Warehouse) -> None:
    first = warehouse.write_partition("clickstream", "resampled", D1, frame(D1, 10))
    smaller = pd.DataFrame({"other": ["a", "b"]})
    second = warehouse.write_partition("clickstream", "resampled", D1, smaller)
    assert second.path == first.path
    assert second.checksum != first.checksum
    assert second.row_count == 2
    pd.testing.assert_frame_equal(warehouse.read_partitions("clickstream", "resampled", [D1]), smaller)
    # hidden temporary siblings included: only the partition file remains
    assert [path.name for path in first.path.parent.iterdir()] == ["part.parquet"]


def test_failed_write_keeps_the_old_partition(warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    old = warehouse.write_partition("clickstream", "resampled", D1, frame(D1, 3))
    before = old.path.read_bytes()

    def half_written(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(warehouse_module.pq, "write_table", half_written)
    with pytest.raises(OSError, match="disk full"):
        warehouse.write_partition("clickstream", "resampled", D1, frame(D1, 100))
    assert old.path.read_bytes() == before
    assert [path.name for path in old.path.parent.iterdir()] == ["part.parquet"]


def test_write_partition_query_streams_from_duckdb(warehouse: Warehouse) -> None:
    connection = duckdb.connect()
    connection.execute("CREATE TABLE events AS SELECT range AS id, 'u' || range AS user_id FROM range(7)")
    written = warehouse.write_partition_query(
        "clickstream", "raw_events", D2, connection, "SELECT * FROM events WHERE id >= 2 ORDER BY id"
    )
    assert written.row_count == 5
    assert written.checksum == file_checksum(written.path)
    got = warehouse.read_partitions("clickstream", "raw_events", [D2])
    assert got["user_id"].tolist() == ["u2", "u3", "u4", "u5", "u6"]
    assert [path.name for path in written.path.parent.iterdir()] == ["part.parquet"]


def test_read_partitions_over_several_days(warehouse: Warehouse) -> None:
    warehouse.write_partition("clickstream", "features", D3, frame(D3, 2, offset=30))
    warehouse.write_partition("clickstream", "features", D1, frame(D1, 3, offset=10))
    warehouse.write_partition("clickstream", "features", D2, frame(D2, 1, offset=20))
    got = warehouse.read_partitions("clickstream", "features", [D3, D1, date(2020, 7, 10), D2, D1])
    assert got["clicks"].tolist() == [10, 11, 12, 20, 30, 31]  # day order, each day once, missing day skipped
    assert got["bucket_start"].is_monotonic_increasing
    only = warehouse.read_partitions("clickstream", "features", [D2])
    assert only["clicks"].tolist() == [20]
    assert warehouse.existing_days("clickstream", "features") == [D1, D2, D3]


def test_read_partitions_with_evolving_columns(warehouse: Warehouse) -> None:
    warehouse.write_partition("clickstream", "features", D1, frame(D1, 1))
    warehouse.write_partition("clickstream", "features", D2, frame(D2, 1).assign(extra=1.5))
    got = warehouse.read_partitions("clickstream", "features", [D1, D2])
    assert list(got.columns) == ["bucket_start", "clicks", "extra"]
    assert got["extra"].isna().tolist() == [True, False]


def test_read_partitions_across_a_day_with_no_rows_and_other_timestamp_units(warehouse: Warehouse) -> None:
    """An empty incidents day (no rows: untyped text, microsecond times) read with a day of incidents
    (nanosecond times) failed with ArrowTypeError: a multi-day read of incidents broke on a quiet day."""
    quiet = merge_incidents(pd.DataFrame(), pd.Timedelta(minutes=10))
    busy = frame(D2, 1).assign(start=lambda f: f["bucket_start"].astype("datetime64[ns]"), note="x")
    warehouse.write_partition("clickstream", "incidents", D1, quiet)
    warehouse.write_partition("clickstream", "incidents", D2, busy)
    got = warehouse.read_partitions("clickstream", "incidents", [D1, D2])
    assert len(got) == 1 and got["start"].iloc[0] == pd.Timestamp(D2) and got["note"].tolist() == ["x"]


def test_read_missing_partitions_gives_empty_frame(warehouse: Warehouse) -> None:
    assert warehouse.read_partitions("clickstream", "features", [D1]).empty
    assert warehouse.existing_days("clickstream", "features") == []


# --- catalog ------------------------------------------------------------------------------------------------


def lineage(warehouse: Warehouse) -> pd.DataFrame:
    return warehouse.query("SELECT * FROM meta.lineage ORDER BY asset, partition")


def test_record_creates_view_over_all_partitions(warehouse: Warehouse) -> None:
    parts = [warehouse.write_partition("clickstream", "resampled", day, frame(day, 2)) for day in (D1, D2)]
    warehouse.record(parts, RUN)
    assert (warehouse.root / CATALOG_FILE).exists()
    view = warehouse.query("SELECT * FROM clickstream.resampled ORDER BY bucket_start")
    assert len(view) == 4
    assert [d.date() for d in pd.to_datetime(view["date"])] == [D1, D1, D2, D2]
    tables = warehouse.query(
        "SELECT table_schema, table_name, table_type FROM information_schema.tables ORDER BY 1, 2"
    )
    assert tables.values.tolist() == [
        ["clickstream", "resampled", "VIEW"],
        ["meta", "catalog_root", "BASE TABLE"],
        ["meta", "lineage", "BASE TABLE"],
    ]


def test_the_evaluation_view_shows_the_newest_snapshot_only(warehouse: Warehouse) -> None:
    """Each evaluation covers every scored day and is stored under the last one: the view used to stack
    every snapshot, so a detector had one row per evaluation ever run."""
    for day, f1 in ((D1, 0.5), (D2, 0.8)):
        snapshot = pd.DataFrame({"detector": ["ensemble", "rcf"], "f1": [f1, f1 - 0.1]})
        warehouse.record([warehouse.write_partition("clickstream", "evaluation", day, snapshot)], RUN)
    view = warehouse.query("SELECT detector, f1, date FROM clickstream.evaluation ORDER BY detector")
    assert view[["detector", "f1"]].values.tolist() == [["ensemble", 0.8], ["rcf", pytest.approx(0.7)]]
    assert {d.date() for d in pd.to_datetime(view["date"])} == {D2}
    assert warehouse.existing_days("clickstream", "evaluation") == [D1, D2]  # earlier snapshots kept


def test_lineage_has_one_row_per_asset_partition(warehouse: Warehouse) -> None:
    raw = [warehouse.write_partition("clickstream", "raw_events", day, frame(day, 3)) for day in (D1, D2)]
    warehouse.record(raw, RUN)
    table = lineage(warehouse)
    assert table[["source", "asset", "partition", "run_id", "code_version", "row_count"]].values.tolist() == [
        ["clickstream", "raw_events", "2020-07-07", "run-1", "v1", 3],
        ["clickstream", "raw_events", "2020-07-08", "run-1", "v1", 3],
    ]
    assert table["checksum"].tolist() == [part.checksum for part in raw]
    assert table["path"].tolist() == [str(part.path.relative_to(warehouse.root)) for part in raw]
    assert table["materialized_at"].notna().all()


def test_a_copied_warehouse_reads_its_own_files(warehouse: Warehouse, tmp_path: Path) -> None:
    """A backup restored elsewhere: its views and lineage named the original's files, so it reported
    the original's rows and failed once the original was gone."""
    parts = [warehouse.write_partition("clickstream", "raw_events", day, frame(day, 3)) for day in (D1, D2)]
    warehouse.record(parts, RUN)
    copy = Warehouse(tmp_path / "restored")
    shutil.copytree(warehouse.root, copy.root)
    shutil.rmtree(warehouse.root)
    assert copy.query("SELECT count(*) AS n FROM clickstream.raw_events")["n"].item() == 6
    assert copy.audit().consistent
    copy.record([copy.write_partition("clickstream", "raw_events", D3, frame(D3, 2))], RUN)
    assert copy.query("SELECT count(*) AS n FROM clickstream.raw_events")["n"].item() == 8


def test_a_copied_catalog_written_before_roots_were_kept_is_moved_too(
    warehouse: Warehouse, tmp_path: Path
) -> None:
    """Backups made before this change have no recorded root and absolute lineage paths."""
    parts = [warehouse.write_partition("clickstream", "raw_events", day, frame(day, 3)) for day in (D1, D2)]
    warehouse.record(parts, RUN)
    with duckdb.connect(str(warehouse.catalog_path)) as connection:  # as the older code left it
        connection.execute("DROP TABLE meta.catalog_root")
        connection.execute("UPDATE meta.lineage SET path = ? || '/' || path", [str(warehouse.root)])
    copy = Warehouse(tmp_path / "restored")
    shutil.copytree(warehouse.root, copy.root)
    shutil.rmtree(warehouse.root)
    assert copy.query("SELECT count(*) AS n FROM clickstream.raw_events")["n"].item() == 6
    assert copy.audit().consistent
    assert set(copy.query("SELECT path FROM meta.lineage")["path"]) == {
        f"clickstream/raw_events/date={day}/part.parquet" for day in (D1, D2)
    }


def test_rerecording_a_partition_upserts(warehouse: Warehouse) -> None:
    warehouse.record([warehouse.write_partition("clickstream", "raw_events", D1, frame(D1, 3))], RUN)
    again = warehouse.write_partition("clickstream", "raw_events", D1, frame(D1, 7))
    warehouse.record([again], RunInfo("run-2", "v2"))
    table = lineage(warehouse)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["run_id"], row["code_version"], row["row_count"], row["checksum"]) == (
        "run-2",
        "v2",
        7,
        again.checksum,
    )
    assert len(warehouse.query("SELECT * FROM clickstream.raw_events")) == 7


def test_lineage_stores_upstream_checksums(warehouse: Warehouse) -> None:
    raw = warehouse.write_partition("clickstream", "raw_events", D1, frame(D1, 3))
    features = warehouse.write_partition(
        "clickstream", "features", D1, frame(D1, 1), upstream=[("raw_events", D1), ("raw_events", D2)]
    )
    warehouse.record([raw, features], RUN)  # upstream first in the same call
    upstream = json.loads(lineage(warehouse).set_index("asset").loc["features", "upstream"])
    assert upstream == [
        {"asset": "raw_events", "partition": "2020-07-07", "checksum": raw.checksum},
        {"asset": "raw_events", "partition": "2020-07-08", "checksum": None},
    ]
    # the recorded upstream checksum is the version used, even after the upstream changes later
    newer = warehouse.write_partition("clickstream", "raw_events", D1, frame(D1, 4))
    warehouse.record([newer], RUN)
    table = lineage(warehouse).set_index("asset")
    assert json.loads(table.loc["features", "upstream"])[0]["checksum"] == raw.checksum
    assert table.loc["raw_events", "checksum"] == newer.checksum != raw.checksum


def test_record_nothing_creates_no_catalog(warehouse: Warehouse) -> None:
    warehouse.record([], RUN)
    assert not (warehouse.root / CATALOG_FILE).exists()


def test_query_is_read_only(warehouse: Warehouse) -> None:
    warehouse.record([warehouse.write_partition("clickstream", "raw_events", D1, frame(D1, 3))], RUN)
    for statement in (
        "CREATE TABLE sneaky AS SELECT 1",
        "DELETE FROM meta.lineage",
        "DROP VIEW clickstream.raw_events",
    ):
        with pytest.raises(duckdb.Error, match="read-only"):
            warehouse.query(statement)
    assert len(lineage(warehouse)) == 1
    assert warehouse.query("SELECT count(*) AS n FROM clickstream.raw_events")["n"].tolist() == [3]


def test_query_takes_parameters(warehouse: Warehouse) -> None:
    parts = [warehouse.write_partition("clickstream", "raw_events", day, frame(day, 1)) for day in (D1, D2)]
    warehouse.record(parts, RUN)
    got = warehouse.query("SELECT partition FROM meta.lineage WHERE partition > ?", ["2020-07-07"])
    assert got["partition"].tolist() == ["2020-07-08"]


# --- names and partition keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "asset", "day"),
    [
        ("../outside", "raw_events", D1),
        ("clickstream", "../../outside", D1),
        ("clickstream", "raw/events", D1),
        ("click stream", "raw_events", D1),
        ('clickstream"; DROP TABLE meta.lineage; --', "raw_events", D1),
        ("clickstream", "raw_events", "../../../outside"),
        ("clickstream", "raw_events", "2020-07-07/../../x"),
        ("clickstream", "raw_events", "2020-7-7"),
    ],
)
def test_invalid_names_and_partition_keys_are_rejected(tmp_path: Path, source, asset, day) -> None:
    warehouse = Warehouse(tmp_path / "warehouse")
    with pytest.raises(ValueError):
        warehouse.write_partition(source, asset, day, frame(D1, 1))
    with pytest.raises(ValueError):
        warehouse.partition_file(source, asset, day)
    with pytest.raises(ValueError):
        warehouse.read_partitions(source, asset, [day])
    assert all_files(tmp_path) == []


def test_partition_file_accepts_iso_string_keys(warehouse: Warehouse) -> None:
    assert warehouse.partition_file("clickstream", "features", "2020-07-08") == warehouse.partition_file(
        "clickstream", "features", D2
    )
    assert warehouse.partition_dir("clickstream", "features", D2).name == "date=2020-07-08"
