"""Robust z-score: distance from the median in units of the scaled median absolute deviation.

Median and MAD ignore the anomalies that a mean and standard deviation would absorb. The score
of a row is its largest absolute z over the features; the signed z is the explanation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd

from anomaly_dagster.detectors.base import Detector
from anomaly_dagster.detectors.profile import slot_statistics, slots_of

MAD_TO_SD = 1.4826


def _median_and_scale(values: np.ndarray) -> np.ndarray:
    median = np.median(values, axis=0)
    mad = MAD_TO_SD * np.median(np.abs(values - median), axis=0)
    fallback = np.std(values, axis=0)
    scale = np.where(mad > 0, mad, np.where(fallback > 0, fallback, 1.0))
    return np.stack([median, scale])


class RobustZScoreDetector(Detector):
    """Params: ``time_of_day_window`` (slots pooled each side; None = one global profile), ``n_slots``."""

    kind: ClassVar[str] = "robust_zscore"
    scores_partial_rows: ClassVar[bool] = True

    def __init__(self, features: list[str], time_of_day_window: int | None = 3, n_slots: int = 144) -> None:
        super().__init__(features, time_of_day_window=time_of_day_window, n_slots=n_slots)
        self.window = time_of_day_window
        self.n_slots = n_slots
        self.profile: np.ndarray | None = None  # (slots, 2, d): median, scale

    def fit(self, frame: pd.DataFrame) -> RobustZScoreDetector:
        self.profile = slot_statistics(
            self.matrix(frame), slots_of(frame, self.window), self.n_slots, self.window, _median_and_scale
        )
        return self

    def explain(self, frame: pd.DataFrame) -> np.ndarray:
        if self.profile is None:
            raise RuntimeError("fit the detector before scoring")
        rows = self.profile[slots_of(frame, self.window)]
        return (self.matrix(frame) - rows[:, 0, :]) / rows[:, 1, :]

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        return np.nan_to_num(np.abs(self.explain(frame)), nan=0.0).max(axis=1)

    def expected(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.profile is None:
            raise RuntimeError("fit the detector before scoring")
        medians = self.profile[slots_of(frame, self.window), 0, :]
        return pd.DataFrame(medians, columns=self.features, index=frame.index)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"profile": self.profile}, {}

    @classmethod
    def from_state(
        cls, features: list[str], params: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> RobustZScoreDetector:
        detector = cls(features, **params)
        detector.profile = arrays["profile"]
        return detector
