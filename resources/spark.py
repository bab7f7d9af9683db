"""The Spark engine's session as a Dagster resource (dagster-pyspark's lazy resource)."""

from __future__ import annotations

from typing import Any

from dagster_pyspark import LazyPySparkResource
from dagster_spark.utils import flatten_dict
from pydantic import Field


class SparkResource(LazyPySparkResource):
    """dagster-pyspark's ``LazyPySparkResource``: no JVM until a stage asks for the session, so a DuckDB
    run never starts one. The session comes from the engine's :func:`spark_session` (one per process,
    UTC session time zone, no UI, small shuffles on a local master), so every Spark stage of an
    in-process run shares it and pays the JVM start once.
    """

    master: str | None = Field(
        default=None, description="Spark master URL; unset: ANOMALY_SPARK_MASTER, else local[*]."
    )
    spark_config: dict[str, Any] = Field(
        default_factory=dict, description="Extra Spark settings (nested or dotted keys) for the session."
    )

    def _init_session(self) -> None:
        if self._spark_session is None:
            from anomaly_dagster.engines.spark import spark_session

            conf = {key: str(value) for key, value in flatten_dict(self.spark_config)}
            self._spark_session = spark_session(self.master, conf)
