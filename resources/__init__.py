"""Dagster resources: thin configuration wrappers over the library's warehouse."""

from resources.warehouse import WarehouseResource

__all__ = ["WarehouseResource"]
