"""Interquartile-range fences: how many IQRs a value lies outside [Q1, Q3].

Tukey's rule (flag beyond 1.5 IQR) becomes a continuous score so that it can be calibrated
like every other detector. Inside the box the score is 0; the signed distance is the explanation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd

from anomaly_dagster.detectors.base import Detector
from anomaly_dagster.detectors.profile import slot_statistics, slots_of


def _quartiles(values: np.ndarray) -> np.ndarray:
    q1, q3 = np.quantile(values, [0.25, 0.75], axis=0)
    spread = q3 - q1
    fallback = np.std(values, axis=0)
    spread = np.where(spread > 0, spread, np.where(fallback > 0, fallback, 1.0))
    return np.stack([q1, q3, spread])


class IQRDetector(Detector):
    """Params: ``time_of_day_window`` (slots pooled each side; None = one global profile), ``n_slots``."""

    kind: ClassVar[str] = "iqr"
    scores_partial_rows: ClassVar[bool] = True

    def __init__(self, features: list[str], time_of_day_window: int | None = 3, n_slots: int = 144) -> None:
        super().__init__(features, time_of_day_window=time_of_day_window, n_slots=n_slots)
        self.window = time_of_day_window
        self.n_slots = n_slots
        self.fences: np.ndarray | None = None  # (slots, 3, d): q1, q3, iqr

    def fit(self, frame: pd.DataFrame) -> IQRDetector:
        self.fences = slot_statistics(
            self.matrix(frame), slots_of(frame, self.window), self.n_slots, self.window, _quartiles
        )
        return self

    def explain(self, frame: pd.DataFrame) -> np.ndarray:
        if self.fences is None:
            raise RuntimeError("fit the detector before scoring")
        rows = self.fences[slots_of(frame, self.window)]
        values = self.matrix(frame)
        above = np.maximum(values - rows[:, 1, :], 0.0)
        below = np.maximum(rows[:, 0, :] - values, 0.0)
        return (above - below) / rows[:, 2, :]

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        return np.nan_to_num(np.abs(self.explain(frame)), nan=0.0).max(axis=1)

    def expected(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.fences is None:
            raise RuntimeError("fit the detector before scoring")
        rows = self.fences[slots_of(frame, self.window)]
        return pd.DataFrame((rows[:, 0, :] + rows[:, 1, :]) / 2, columns=self.features, index=frame.index)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"fences": self.fences}, {}

    @classmethod
    def from_state(
        cls, features: list[str], params: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> IQRDetector:
        detector = cls(features, **params)
        detector.fences = arrays["fences"]
        return detector
