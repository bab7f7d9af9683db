"""Detector registry: the ``kind`` names a source config may use, mapped to their classes."""

from __future__ import annotations

from anomaly_dagster.detectors.base import Detector, load_detectors, save_detectors
from anomaly_dagster.detectors.deepar import DeepARDetector
from anomaly_dagster.detectors.forecast_band import SeasonalBandDetector
from anomaly_dagster.detectors.iqr import IQRDetector
from anomaly_dagster.detectors.isolation_forest import IsolationForestDetector
from anomaly_dagster.detectors.rcf import RCFDetector
from anomaly_dagster.detectors.spark_rf import SparkRandomForestDetector
from anomaly_dagster.detectors.zscore import RobustZScoreDetector

DETECTOR_CLASSES: dict[str, type[Detector]] = {
    cls.kind: cls
    for cls in (
        RCFDetector,
        RobustZScoreDetector,
        IQRDetector,
        IsolationForestDetector,
        SeasonalBandDetector,
        DeepARDetector,
        SparkRandomForestDetector,
    )
}


def detector_class(kind: str) -> type[Detector]:
    """The class for a config ``kind``, with the valid names in the error."""
    try:
        return DETECTOR_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown detector kind {kind!r}; known: {sorted(DETECTOR_CLASSES)}") from None


__all__ = ["DETECTOR_CLASSES", "Detector", "detector_class", "load_detectors", "save_detectors"]
