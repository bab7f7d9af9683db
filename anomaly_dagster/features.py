"""Model inputs from the resampled series: derived columns, time-of-day encodings and lags."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from anomaly_dagster.config import DerivedConfig, SourceConfig, evaluate_expression


def day_buckets(source: SourceConfig, day: date) -> pd.DatetimeIndex:
    """The bucket starts of one UTC day: always ``buckets_per_day`` of them."""
    start = datetime.combine(day, datetime.min.time())
    return pd.date_range(
        start, start + timedelta(days=1), freq=f"{source.bucket_minutes}min", inclusive="left"
    )


def add_derived(source: SourceConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """Append the source's derived columns (e.g. ``residual = clicks - users``) in declaration order.

    A value that is not a number (a division by zero: ``clicks / users`` in a bucket without users)
    is missing, like an empty bucket's mean: detectors skip it, where an infinity would have made
    every threshold fitted on it infinite."""
    result = frame.copy()
    for derived in source.derived:
        columns = {name: result[name].astype(np.float64) for name in result.columns}
        result[derived.name] = derived_values(derived, columns)
    return result


def derived_values(derived: DerivedConfig, columns: dict[str, Any]) -> np.ndarray:
    """``derived``'s expression over ``columns``, with every non-finite value missing (NaN): the one
    rule of :func:`add_derived`, shared with the stream."""
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(evaluate_expression(derived.expression, columns), dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def build_features(source: SourceConfig, day: date, resampled: pd.DataFrame) -> pd.DataFrame:
    """Features for ``day`` from a resampled frame holding that day and, if present, the day before.

    Lags of the first buckets read the previous day's tail; without it they are NaN, never zero,
    so a missing day is not mistaken for an outage.
    """
    series = add_derived(source, resampled.sort_values("bucket_start").set_index("bucket_start"))
    previous_start = pd.Timestamp(day - timedelta(days=1))
    grid = pd.date_range(
        previous_start, periods=2 * source.buckets_per_day, freq=f"{source.bucket_minutes}min"
    )
    series = series.reindex(grid)
    for name in source.series_columns:
        for lag in source.lags:
            series[f"{name}_lag{lag}"] = series[name].shift(lag)
    features = series.iloc[source.buckets_per_day :].copy()
    features.index.name = "bucket_start"
    minutes = features.index.hour * 60 + features.index.minute
    features["slot"] = (minutes // source.bucket_minutes).astype(np.int64)
    angle = 2 * np.pi * minutes / 1440.0
    features["tod_sin"] = np.sin(angle)
    features["tod_cos"] = np.cos(angle)
    features = features.reset_index()[["bucket_start", *source.feature_columns]]
    numeric = [name for name in source.feature_columns if name != "slot"]
    features[numeric] = features[numeric].astype(np.float64)  # one schema whether or not lags are missing
    return features
