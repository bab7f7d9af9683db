"""The warehouse and landing folder as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from anomaly_dagster.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """Where raw logs land and where Parquet partitions and the DuckDB catalog live."""

    warehouse_dir: str
    landing_dir: str

    def open(self) -> Warehouse:
        return Warehouse(Path(self.warehouse_dir))

    @property
    def landing_path(self) -> Path:
        return Path(self.landing_dir).resolve()
