"""Detector statistics computed in Spark equal the NumPy fit, on a week of the reference clickstream."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from anomaly_dagster.config import PACKAGE_SOURCES_DIR, load_source
from anomaly_dagster.detectors.iqr import IQRDetector
from anomaly_dagster.detectors.rcf import RCFDetector
from anomaly_dagster.detectors.zscore import RobustZScoreDetector
from anomaly_dagster.engines.spark_stats import fit_on_spark
from anomaly_dagster.features import build_features

pytestmark = pytest.mark.spark

FEATURES = ["users", "clicks", "residual", "users_lag1"]  # the first lag of the week is NaN: left out
DAYS = [date(2020, 7, 7) + timedelta(days=offset) for offset in range(7)]


@pytest.fixture(scope="module")
def week(reference_dir) -> pd.DataFrame:
    source = load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")
    published = pd.read_csv(reference_dir / "clicks_10T.csv", parse_dates=["timestamp"])
    resampled = published.rename(
        columns={"timestamp": "bucket_start", "page": "pages", "user": "users", "click": "clicks"}
    )
    frames = [
        build_features(source, day, resampled[resampled["bucket_start"].dt.date <= day]) for day in DAYS
    ]
    features = pd.concat(frames, ignore_index=True)
    assert features["users_lag1"].isna().sum() == 1
    return features


@pytest.mark.parametrize("window", [3, None])
@pytest.mark.parametrize("kind", [RobustZScoreDetector, IQRDetector])
def test_spark_statistics_equal_the_numpy_fit(spark, week, kind, window):
    local = kind(FEATURES, time_of_day_window=window).fit(week)
    frame = spark.createDataFrame(week[["slot", *FEATURES]])
    distributed = fit_on_spark(kind(FEATURES, time_of_day_window=window), frame)
    name = "fences" if kind is IQRDetector else "profile"
    np.testing.assert_allclose(getattr(distributed, name), getattr(local, name), rtol=1e-12)
    np.testing.assert_allclose(distributed.score(week), local.score(week), rtol=1e-12)


def test_a_slot_without_rows_takes_every_rows_statistics(spark, week):
    """The NumPy fit's rule for a neighbourhood no training row reaches."""
    morning = week[week["slot"] < 36]
    local = RobustZScoreDetector(FEATURES, time_of_day_window=2).fit(morning)
    frame = spark.createDataFrame(morning[["slot", *FEATURES]])
    distributed = fit_on_spark(RobustZScoreDetector(FEATURES, time_of_day_window=2), frame)
    np.testing.assert_allclose(distributed.profile, local.profile, rtol=1e-12)
    assert (distributed.profile[80] == distributed.profile[100]).all()


def test_other_detectors_are_refused(spark, week):
    with pytest.raises(TypeError, match="not 'rcf'"):
        fit_on_spark(RCFDetector(FEATURES), spark.createDataFrame(week[["slot", *FEATURES]]))
