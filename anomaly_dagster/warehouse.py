"""The warehouse: Parquet partitions are the record, a DuckDB file is the catalog.

Layout: ``<root>/<source>/<asset>/date=YYYY-MM-DD/part.parquet`` (plus model files beside the
model's part), ``<root>/warehouse.duckdb`` with one view per asset (``clickstream.resampled``)
over its Parquet files and ``meta.lineage``: one row per asset partition describing its latest
materialization.

Writers replace a partition file by atomic rename, so a reader sees the old or the new
partition, never a half, provided it reads each file through one open file. DuckDB (and
pyarrow's dataset reader) open a Parquet file more than once per query, first for its metadata,
then for its data, and a rename in between mixes two versions (wrong row counts, or "Invalid
data" errors). So ``read_partitions`` reads every file through a single handle, and queries over
the views (``query``, or any DuckDB read of partition files inside :meth:`Warehouse.reading`)
hold a shared lock that the rename takes exclusively for an instant.

Catalog updates are short transactions under an exclusive file lock, so there is one DuckDB
writer at a time across processes; pipeline stages read Parquet directly and never open the
catalog, so they never wait on it.

Crashes and concurrent writers:

- A process killed while writing leaves a hidden temporary file (``.part.parquet.tmp-…``) that no
  reader's glob matches; the next write of that partition removes it (see ``storage``).
- A process killed between the rename and the catalog commit leaves a partition newer than its
  lineage row (or without one); a process killed inside the catalog transaction leaves the
  catalog as it was (DuckDB only keeps committed transactions, replaying its WAL on the next
  open). Re-running the stage repairs both; :meth:`Warehouse.audit` lists what is out of step.
- Two writers of one partition: the last rename wins on disk, and ``record`` only writes the
  lineage row of the writer whose file is on disk (a writer whose file was already replaced by
  another's skips its row), so lineage always describes the file that is there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from anomaly_dagster.sql import parse_day, quote_identifier, quote_literal, validate_identifier
from anomaly_dagster.storage import publish, remove_stale_temporaries, temporary_sibling

CATALOG_FILE = "warehouse.duckdb"
PART_FILE = "part.parquet"
# assets written as a dated snapshot of the whole history (the evaluation as of its last scored day):
# earlier snapshots stay on disk, the catalog view shows the newest
SNAPSHOT_ASSETS = frozenset({"evaluation"})
PARTITIONS_LOCK = ".partitions.lock"
LOCK_TIMEOUT_SECONDS = 120.0

# the root the catalog's views read from: a warehouse copied or moved elsewhere rebuilds them on first use
ROOT_DDL = "CREATE TABLE IF NOT EXISTS meta.catalog_root (root VARCHAR NOT NULL)"
LINEAGE_DDL = """
CREATE TABLE IF NOT EXISTS meta.lineage (
    source VARCHAR NOT NULL,
    asset VARCHAR NOT NULL,
    partition VARCHAR NOT NULL,
    run_id VARCHAR,
    code_version VARCHAR,
    upstream JSON,
    row_count BIGINT,
    path VARCHAR,
    checksum VARCHAR,
    materialized_at TIMESTAMP,
    PRIMARY KEY (source, asset, partition)
)
"""


@dataclass(frozen=True)
class WrittenPartition:
    """A partition file that is on disk and about to be recorded in the catalog."""

    source: str
    asset: str
    day: date
    path: Path
    row_count: int
    checksum: str
    upstream: list[tuple[str, date]] = field(default_factory=list)
    # (inode, size, mtime_ns) of the file this writer put in place; None when unknown
    identity: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RunInfo:
    """Who is writing: the orchestrator's run id and the code version of the stage."""

    run_id: str
    code_version: str


@dataclass
class CatalogAudit:
    """What is out of step between the partition files and ``meta.lineage`` (empty lists: consistent)."""

    missing_files: list[tuple[str, str, str]] = field(default_factory=list)  # lineage rows without a file
    checksum_mismatches: list[tuple[str, str, str]] = field(default_factory=list)  # file differs from lineage
    unrecorded: list[Path] = field(default_factory=list)  # partition files without a lineage row
    temporaries: list[Path] = field(default_factory=list)  # temporary files left by writers

    @property
    def consistent(self) -> bool:
        """Lineage describes exactly the partition files on disk (temporary files are harmless)."""
        return not (self.missing_files or self.checksum_mismatches or self.unrecorded)


def file_identity(path: Path) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Warehouse:
    """Parquet partitions plus the DuckDB catalog under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.catalog_path = self.root / CATALOG_FILE

    # --- paths ---------------------------------------------------------------------------------

    def asset_dir(self, source: str, asset: str) -> Path:
        return (
            self.root / validate_identifier(source, "source name") / validate_identifier(asset, "asset name")
        )

    def partition_dir(self, source: str, asset: str, day: date | str) -> Path:
        return self.asset_dir(source, asset) / f"date={parse_day(day).isoformat()}"

    def partition_file(self, source: str, asset: str, day: date | str) -> Path:
        return self.partition_dir(source, asset, day) / PART_FILE

    def plot_file(self, source: str, name: str, first_day: date, last_day: date) -> Path:
        """``plots/<name>/<first>_<last>.png``: one plot per materialized window (a day or a backfill range)."""
        window = f"{parse_day(first_day)}_{parse_day(last_day)}"
        return self.asset_dir(source, "plots") / validate_identifier(name, "plot name") / f"{window}.png"

    # --- Parquet -------------------------------------------------------------------------------

    def write_partition(
        self,
        source: str,
        asset: str,
        day: date,
        frame: pd.DataFrame,
        upstream: Iterable[tuple[str, date]] = (),
    ) -> WrittenPartition:
        """Replace one partition's Parquet file atomically; returns what to record in the catalog."""
        path = self.partition_file(source, asset, day)

        def write(tmp: Path) -> int:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
            return len(frame)

        row_count, checksum, identity = self._replace_file(path, write)
        return WrittenPartition(
            source, asset, parse_day(day), path, row_count, checksum, list(upstream), identity
        )

    def write_partition_query(
        self, source: str, asset: str, day: date, connection: duckdb.DuckDBPyConnection, sql: str
    ) -> WrittenPartition:
        """Like :meth:`write_partition`, but DuckDB writes the query result straight to Parquet.

        Large tables (raw events) never pass through pandas this way.
        """
        path = self.partition_file(source, asset, day)

        def write(tmp: Path) -> int:
            connection.execute(f"COPY ({sql}) TO {quote_literal(str(tmp))} (FORMAT parquet)")
            return pq.ParquetFile(tmp).metadata.num_rows

        row_count, checksum, identity = self._replace_file(path, write)
        return WrittenPartition(source, asset, parse_day(day), path, row_count, checksum, [], identity)

    def _replace_file(
        self, path: Path, write: Callable[[Path], int]
    ) -> tuple[int, str, tuple[int, int, int]]:
        """Write ``path`` through a temporary sibling; returns row count, checksum and the file's identity.

        Temporary files of crashed writers of the same partition are removed first; the rename
        waits for readers inside :meth:`reading`.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = temporary_sibling(path)
        try:
            row_count = write(tmp)
            checksum = file_checksum(tmp)
            identity = file_identity(tmp)  # a rename keeps inode, size and mtime
            with _file_lock(self.root / PARTITIONS_LOCK, fcntl.LOCK_EX):
                publish(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return row_count, checksum, identity

    def read_partitions(self, source: str, asset: str, days: Iterable[date]) -> pd.DataFrame:
        """Rows of the given days that exist, in day order; an empty frame when none does.

        Each file is read through one open handle, so a concurrent replacement cannot mix versions.
        """
        tables = []
        for day in sorted(set(days)):
            path = self.partition_file(source, asset, day)
            try:
                with open(path, "rb") as handle:
                    tables.append(pq.read_table(handle))
            except FileNotFoundError:
                continue
        if not tables:
            return pd.DataFrame()
        # permissive: a day written with microsecond timestamps reads with a nanosecond one
        return pa.concat_tables(tables, promote_options="permissive").to_pandas()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold off partition replacements while DuckDB reads partition files (a shared lock).

        Wrap any DuckDB query over ``part.parquet`` files in it; :meth:`query` does so itself.
        Writers hold the lock exclusively only for the rename, so readers never wait long.
        """
        if not self.root.is_dir():  # nothing to read, nothing to create
            yield
            return
        with _file_lock(self.root / PARTITIONS_LOCK, fcntl.LOCK_SH):
            yield

    def existing_days(self, source: str, asset: str) -> list[date]:
        directory = self.asset_dir(source, asset)
        if not directory.is_dir():
            return []
        return sorted(
            date.fromisoformat(child.name.removeprefix("date="))
            for child in directory.glob("date=*")
            if (child / PART_FILE).exists()
        )

    def row_counts(self, source: str, asset: str) -> dict[date, int]:
        """Rows per recorded day of ``asset`` (from the lineage table; no Parquet is read)."""
        if not self.catalog_path.exists():
            return {}
        counts = self.query(
            "SELECT partition, row_count FROM meta.lineage WHERE source = ? AND asset = ?", [source, asset]
        )
        return {date.fromisoformat(day): int(rows) for day, rows in counts.itertuples(index=False)}

    # --- catalog -------------------------------------------------------------------------------

    @contextmanager
    def _catalog_writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An exclusive catalog connection: a file lock across processes, then DuckDB's own lock.

        Another process may hold DuckDB's lock briefly (a reader); retry until the timeout.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".catalog.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            connection = _connect_with_retry(self.catalog_path, read_only=False)
            try:
                yield connection
            finally:
                connection.close()

    def record(self, partitions: list[WrittenPartition], run: RunInfo) -> list[WrittenPartition]:
        """Refresh the views of the assets written and upsert their lineage rows, in one transaction.

        A partition whose file another writer has replaced since (its identity changed) is skipped:
        that writer records its own row. Returns the partitions whose rows were written.
        """
        if not partitions:
            return []
        now = datetime.now(UTC).replace(tzinfo=None)
        recorded = []
        with self._catalog_writer() as connection:
            connection.execute("BEGIN TRANSACTION")
            self._prepare(connection)
            for source, asset in sorted({(part.source, part.asset) for part in partitions}):
                self._refresh_view(connection, source, asset)
            for part in partitions:
                if _superseded(part):
                    continue
                connection.execute(
                    "INSERT OR REPLACE INTO meta.lineage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        part.source,
                        part.asset,
                        part.day.isoformat(),
                        run.run_id,
                        run.code_version,
                        json.dumps(_upstream_versions(connection, part)),
                        part.row_count,
                        str(part.path.relative_to(self.root)),  # relative: the warehouse may move
                        part.checksum,
                        now,
                    ],
                )
                recorded.append(part)
            connection.execute("COMMIT")
        return recorded

    def _prepare(self, connection: duckdb.DuckDBPyConnection) -> None:
        """The meta tables, and every view pointed at this root (inside a writer's transaction)."""
        connection.execute("CREATE SCHEMA IF NOT EXISTS meta")
        connection.execute(LINEAGE_DDL)
        connection.execute(ROOT_DDL)
        if _catalog_root(connection) != str(self.root):
            for source, asset in _views(connection):
                self._refresh_view(connection, source, asset)
            # lineage written before paths were relative named the files of its first root
            connection.execute(
                "UPDATE meta.lineage SET path = concat_ws('/', source, asset, 'date=' || partition, ?) "
                "WHERE path LIKE '/%'",
                [PART_FILE],
            )
            connection.execute("DELETE FROM meta.catalog_root")
            connection.execute("INSERT INTO meta.catalog_root VALUES (?)", [str(self.root)])

    def _refresh_view(self, connection: duckdb.DuckDBPyConnection, source: str, asset: str) -> None:
        pattern = str(self.asset_dir(source, asset) / "date=*" / PART_FILE)
        files = f"read_parquet({quote_literal(pattern)}, hive_partitioning = true, union_by_name = true)"
        newest = f" WHERE date = (SELECT max(date) FROM {files})" if asset in SNAPSHOT_ASSETS else ""
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(source)}")
        connection.execute(
            f"CREATE OR REPLACE VIEW {quote_identifier(source)}.{quote_identifier(asset)} AS "
            f"SELECT * FROM {files}{newest}"
        )

    def query(self, sql: str, parameters: list | None = None) -> pd.DataFrame:
        """Run a read-only query against the catalog (views and lineage). A catalog copied or moved
        from another root first has its views pointed here (they would read the original's files)."""
        connection = _connect_with_retry(self.catalog_path, read_only=True)
        if _catalog_root(connection) != str(self.root) and _views(connection):  # (a read writes only then)
            connection.close()
            with self._catalog_writer() as writer:
                writer.execute("BEGIN TRANSACTION")
                self._prepare(writer)
                writer.execute("COMMIT")
            connection = _connect_with_retry(self.catalog_path, read_only=True)
        try:
            with self.reading():
                return connection.execute(sql, parameters or []).df()
        finally:
            connection.close()

    def audit(self, source: str | None = None) -> CatalogAudit:
        """Compare ``meta.lineage`` with the partition files on disk (of one source, or all).

        Meant for a quiet warehouse (after a crash, before or after a re-run): a stage running at
        the same time shows up as files newer than their lineage rows until it records them.
        """
        sources = [validate_identifier(source, "source name")] if source else None
        lineage = pd.DataFrame(columns=["source", "asset", "partition", "path", "checksum"])
        if self.catalog_path.exists():
            has_lineage = self.query(
                "SELECT count(*) AS n FROM information_schema.tables "
                "WHERE table_schema = 'meta' AND table_name = 'lineage'"
            )["n"].iloc[0]
            if has_lineage:
                lineage = self.query("SELECT source, asset, partition, path, checksum FROM meta.lineage")
        if sources is not None:
            lineage = lineage[lineage["source"].isin(sources)]
        audit = CatalogAudit()
        recorded = set()
        for row in lineage.itertuples(index=False):
            path = self.root / row.path  # relative to the root (absolute in catalogs written before)
            recorded.add(path)
            if not path.exists():
                audit.missing_files.append((row.source, row.asset, row.partition))
            elif file_checksum(path) != row.checksum:
                audit.checksum_mismatches.append((row.source, row.asset, row.partition))
        roots = [self.root / name for name in sources] if sources is not None else [self.root]
        for root in roots:
            pattern = f"*/*/date=*/{PART_FILE}" if sources is None else f"*/date=*/{PART_FILE}"
            audit.unrecorded.extend(path for path in sorted(root.glob(pattern)) if path not in recorded)
            audit.temporaries.extend(sorted(root.rglob(".*.tmp-*")))
        return audit


@contextmanager
def _file_lock(path: Path, operation: int) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, operation)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _superseded(part: WrittenPartition) -> bool:
    """Whether another writer has replaced (or removed) the file this writer put in place."""
    if part.identity is None:
        return False
    try:
        return file_identity(part.path) != part.identity
    except FileNotFoundError:
        return True


def _views(connection: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(schema, name) of the catalog's views: (source, asset)."""
    return connection.execute(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'VIEW'"
    ).fetchall()


def _catalog_root(connection: duckdb.DuckDBPyConnection) -> str | None:
    """The root the catalog's views were built for; None if it does not say (nothing recorded yet, or
    written before the root was kept)."""
    known = connection.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'meta' AND table_name = 'catalog_root'"
    ).fetchone()[0]
    row = connection.execute("SELECT root FROM meta.catalog_root").fetchone() if known else None
    return row[0] if row else None


def _upstream_versions(connection: duckdb.DuckDBPyConnection, part: WrittenPartition) -> list[dict[str, str]]:
    """Upstream partitions with the checksum they had when this partition was computed."""
    versions = []
    for asset, day in part.upstream:
        found = connection.execute(
            "SELECT checksum FROM meta.lineage WHERE source = ? AND asset = ? AND partition = ?",
            [part.source, asset, day.isoformat()],
        ).fetchone()
        versions.append(
            {"asset": asset, "partition": day.isoformat(), "checksum": found[0] if found else None}
        )
    return versions


def _connect_with_retry(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as error:
            if "lock" not in str(error).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
