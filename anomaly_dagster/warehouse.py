"""The warehouse: Parquet partitions are the record, a DuckDB file is the catalog.

Layout: ``<root>/<source>/<asset>/date=YYYY-MM-DD/part.parquet`` (plus model files beside the
model's part), ``<root>/warehouse.duckdb`` with one view per asset (``clickstream.resampled``)
over its Parquet files and ``meta.lineage``: one row per asset partition describing its latest
materialization.

Writers replace a partition file by atomic rename, so a reader sees the old or the new
partition, never a half. Catalog updates are short transactions under an exclusive file lock,
so there is one DuckDB writer at a time across processes; pipeline stages read Parquet
directly and never open the catalog, so they never wait on it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from anomaly_dagster.sql import parse_day, quote_identifier, quote_literal, validate_identifier
from anomaly_dagster.storage import temporary_sibling

CATALOG_FILE = "warehouse.duckdb"
PART_FILE = "part.parquet"
LOCK_TIMEOUT_SECONDS = 120.0

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


@dataclass(frozen=True)
class RunInfo:
    """Who is writing: the orchestrator's run id and the code version of the stage."""

    run_id: str
    code_version: str


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        try:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
            checksum = file_checksum(tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return WrittenPartition(source, asset, parse_day(day), path, len(frame), checksum, list(upstream))

    def write_partition_query(
        self, source: str, asset: str, day: date, connection: duckdb.DuckDBPyConnection, sql: str
    ) -> WrittenPartition:
        """Like :meth:`write_partition`, but DuckDB writes the query result straight to Parquet.

        Large tables (raw events) never pass through pandas this way.
        """
        path = self.partition_file(source, asset, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        try:
            connection.execute(f"COPY ({sql}) TO {quote_literal(str(tmp))} (FORMAT parquet)")
            row_count = pq.ParquetFile(tmp).metadata.num_rows
            checksum = file_checksum(tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return WrittenPartition(source, asset, parse_day(day), path, row_count, checksum)

    def read_partitions(self, source: str, asset: str, days: Iterable[date]) -> pd.DataFrame:
        """Rows of the given days that exist, in day order; an empty frame when none does."""
        tables = [
            pq.read_table(path)
            for path in (self.partition_file(source, asset, day) for day in sorted(set(days)))
            if path.exists()
        ]
        if not tables:
            return pd.DataFrame()
        return pa.concat_tables(tables, promote_options="default").to_pandas()

    def existing_days(self, source: str, asset: str) -> list[date]:
        directory = self.asset_dir(source, asset)
        if not directory.is_dir():
            return []
        return sorted(
            date.fromisoformat(child.name.removeprefix("date="))
            for child in directory.glob("date=*")
            if (child / PART_FILE).exists()
        )

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

    def record(self, partitions: list[WrittenPartition], run: RunInfo) -> None:
        """Refresh the views of the assets written and upsert their lineage rows, in one transaction."""
        if not partitions:
            return
        now = datetime.now(UTC).replace(tzinfo=None)
        with self._catalog_writer() as connection:
            connection.execute("BEGIN TRANSACTION")
            connection.execute("CREATE SCHEMA IF NOT EXISTS meta")
            connection.execute(LINEAGE_DDL)
            for source, asset in sorted({(part.source, part.asset) for part in partitions}):
                self._refresh_view(connection, source, asset)
            for part in partitions:
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
                        str(part.path),
                        part.checksum,
                        now,
                    ],
                )
            connection.execute("COMMIT")

    def _refresh_view(self, connection: duckdb.DuckDBPyConnection, source: str, asset: str) -> None:
        pattern = str(self.asset_dir(source, asset) / "date=*" / PART_FILE)
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(source)}")
        connection.execute(
            f"CREATE OR REPLACE VIEW {quote_identifier(source)}.{quote_identifier(asset)} AS "
            f"SELECT * FROM read_parquet({quote_literal(pattern)}, hive_partitioning = true, union_by_name = true)"
        )

    def query(self, sql: str, parameters: list | None = None) -> pd.DataFrame:
        """Run a read-only query against the catalog (views and lineage)."""
        connection = _connect_with_retry(self.catalog_path, read_only=True)
        try:
            return connection.execute(sql, parameters or []).df()
        finally:
            connection.close()


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
