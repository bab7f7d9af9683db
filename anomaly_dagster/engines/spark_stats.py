"""The robust z-score and IQR detectors' statistics computed in Spark, for training rows too many for one machine.

:func:`fit_on_spark` fills a ``robust_zscore`` or ``iqr`` detector from a Spark DataFrame of feature
rows: the same per-time-of-day profile as its NumPy ``fit`` (each slot pools the slots within
``time_of_day_window`` of it, circularly; rows with a non-finite feature are left out; an empty slot
takes the statistics of all rows). Quantiles use Spark's exact ``percentile``, which interpolates as
NumPy does, and the fallback spread is the population standard deviation, so both fits give equal
arrays. The profile is a few numbers per slot: the fitted detector scores pandas frames as usual.
"""

from __future__ import annotations

import functools

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from anomaly_dagster.detectors.iqr import IQRDetector
from anomaly_dagster.detectors.zscore import MAD_TO_SD, RobustZScoreDetector

TARGET = "__target_slot__"


def _finite(column: Column) -> Column:
    return column.isNotNull() & ~F.isnan(column) & (F.abs(column) != float("inf"))


def _pooled(frame: DataFrame, features: list[str], n_slots: int, window: int | None) -> DataFrame:
    """Each finite row once per slot whose neighbourhood holds it (column ``TARGET``)."""
    finite = functools.reduce(Column.__and__, (_finite(F.col(name).cast("double")) for name in features))
    rows = frame.where(finite).select(
        *(F.col(name).cast("double").alias(name) for name in features),
        (F.col("slot") if window is not None else F.lit(0)).cast("int").alias("slot"),
    )
    if window is None:
        return rows.withColumnRenamed("slot", TARGET)
    targets = F.array_distinct(
        F.array(*(F.pmod(F.col("slot") + offset, F.lit(n_slots)) for offset in range(-window, window + 1)))
    )
    return rows.select(*features, F.explode(targets).alias(TARGET))


def _spread(spread: Column, sd: Column) -> Column:
    """The detectors' fallback: a zero spread becomes the standard deviation, then 1."""
    return F.when(spread > 0, spread).when(sd > 0, sd).otherwise(F.lit(1.0))


def _statistics(pooled: DataFrame, features: list[str], kind: str) -> DataFrame:
    """One row per target slot: per feature the detector's statistics, columns ``<stat>_<i>``."""
    if kind == "iqr":
        parts = []
        for index, name in enumerate(features):
            q1, q3 = F.percentile(name, 0.25), F.percentile(name, 0.75)
            parts += [
                q1.alias(f"q1_{index}"),
                q3.alias(f"q3_{index}"),
                F.stddev_pop(name).alias(f"sd_{index}"),
            ]
        grouped = pooled.groupBy(TARGET).agg(*parts)
        return grouped.select(
            TARGET,
            *(
                column
                for index in range(len(features))
                for column in (
                    F.col(f"q1_{index}").alias(f"a_{index}"),
                    F.col(f"q3_{index}").alias(f"b_{index}"),
                    _spread(F.col(f"q3_{index}") - F.col(f"q1_{index}"), F.col(f"sd_{index}")).alias(
                        f"c_{index}"
                    ),
                )
            ),
        )
    medians = pooled.groupBy(TARGET).agg(
        *(F.percentile(name, 0.5).alias(f"median_{index}") for index, name in enumerate(features)),
        *(F.stddev_pop(name).alias(f"sd_{index}") for index, name in enumerate(features)),
    )
    deviations = (
        pooled.join(medians, TARGET)
        .groupBy(TARGET)
        .agg(
            *(
                F.percentile(F.abs(F.col(name) - F.col(f"median_{index}")), 0.5).alias(f"mad_{index}")
                for index, name in enumerate(features)
            )
        )
    )
    return medians.join(deviations, TARGET).select(
        TARGET,
        *(
            column
            for index in range(len(features))
            for column in (
                F.col(f"median_{index}").alias(f"a_{index}"),
                _spread(F.col(f"mad_{index}") * MAD_TO_SD, F.col(f"sd_{index}")).alias(f"b_{index}"),
            )
        ),
    )


def slot_profile(
    frame: DataFrame, features: list[str], n_slots: int, window: int | None, kind: str
) -> np.ndarray:
    """(slots, statistics, features): ``median, scale`` for ``robust_zscore``, ``q1, q3, iqr`` for ``iqr``."""
    width = 3 if kind == "iqr" else 2
    names = [f"{letter}_{index}" for index in range(len(features)) for letter in "abc"[:width]]
    per_slot = _statistics(_pooled(frame, features, n_slots, window), features, kind).toPandas()
    if per_slot.empty:
        raise ValueError("cannot fit on a window with no finite rows")
    slots = 1 if window is None else n_slots
    table = per_slot.set_index(TARGET)[names].reindex(range(slots))
    if table.isna().any().any():  # slots no row reaches take the statistics of every row
        everything = _statistics(_pooled(frame, features, n_slots, None), features, kind).toPandas()
        table = table.fillna(everything[names].iloc[0])
    return table.to_numpy(np.float64).reshape(slots, len(features), width).transpose(0, 2, 1)


def fit_on_spark(
    detector: RobustZScoreDetector | IQRDetector, frame: DataFrame
) -> RobustZScoreDetector | IQRDetector:
    """Fit ``detector`` on the feature rows of a Spark DataFrame (needs ``slot`` when time-of-day aware)."""
    if isinstance(detector, IQRDetector):
        detector.fences = slot_profile(frame, detector.features, detector.n_slots, detector.window, "iqr")
    elif isinstance(detector, RobustZScoreDetector):
        detector.profile = slot_profile(frame, detector.features, detector.n_slots, detector.window, "zscore")
    else:
        raise TypeError(f"fit_on_spark fits robust_zscore and iqr detectors, not {detector.kind!r}")
    return detector
