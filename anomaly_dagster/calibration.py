"""Thresholds from training-window scores: the threshold belongs to the model, not to scoring.

Each method turns the scores a detector gave its own training window into one number; the
method, its parameters and the value are stored with the model so a flag can be explained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from anomaly_dagster.config import ThresholdConfig


@dataclass(frozen=True)
class Threshold:
    method: str
    value: float
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(scores: np.ndarray, config: ThresholdConfig) -> Threshold:
    """The threshold for ``scores`` (training-window scores of one detector) under ``config``."""
    finite = np.asarray(scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if config.method == "fixed":
        return Threshold("fixed", float(config.value), {})
    if len(finite) == 0:
        raise ValueError("cannot calibrate a threshold on no finite scores")
    if config.method == "sigma":
        value = float(finite.mean() + config.k * finite.std())
        return Threshold(
            "sigma", value, {"k": config.k, "mean": float(finite.mean()), "sd": float(finite.std())}
        )
    if config.method == "quantile":
        return Threshold(
            "quantile", float(np.quantile(finite, config.quantile)), {"quantile": config.quantile}
        )
    raise ValueError(f"unknown threshold method {config.method!r}")
