"""Thresholds from training-window scores: the threshold belongs to the model, not to scoring.

Each method turns the scores a detector gave its own training window into one number; the
method, its parameters and the value are stored with the model so a flag can be explained.
When a method cannot apply (too little tail for POT, no labels for best-F1) it falls back to a
simpler one and says so under ``params["fallback"]``, so a surprising threshold can be traced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import genpareto

from anomaly_dagster.config import ThresholdConfig

# a generalized Pareto fit on fewer excesses than this is noise, not a tail
MIN_EXCESSES = 10
# |shape| below this is treated as the exponential limit (shape -> 0) of the GPD quantile
EXPONENTIAL_SHAPE = 1e-9


@dataclass(frozen=True)
class Threshold:
    method: str
    value: float
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(scores: np.ndarray, config: ThresholdConfig, labels: np.ndarray | None = None) -> Threshold:
    """The threshold for ``scores`` (training-window scores of one detector) under ``config``.

    ``labels`` (0/1 or bool per score, same order) are only read by ``best_f1``; rows whose score
    is not finite are dropped from both.
    """
    raw = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(raw)
    finite = raw[keep]
    if config.method == "fixed":
        return Threshold("fixed", float(config.value), {})
    if len(finite) == 0:
        raise ValueError("cannot calibrate a threshold on no finite scores")
    if config.method == "sigma":
        return _sigma(finite, config.k)
    if config.method == "quantile":
        return Threshold(
            "quantile", float(np.quantile(finite, config.quantile)), {"quantile": config.quantile}
        )
    if config.method == "pot":
        return _pot(finite, config.risk, config.initial_quantile)
    if config.method == "best_f1":
        if labels is not None:
            labels = np.asarray(labels).astype(bool)
            if labels.shape != raw.shape:
                raise ValueError(f"labels have shape {labels.shape}, scores {raw.shape}: they must align")
            labels = labels[keep]
        return _best_f1(finite, labels, config.k)
    raise ValueError(f"unknown threshold method {config.method!r}")


def _sigma(finite: np.ndarray, k: float) -> Threshold:
    mean, sd = float(finite.mean()), float(finite.std())
    return Threshold("sigma", mean + k * sd, {"k": k, "mean": mean, "sd": sd})


def _pot(finite: np.ndarray, risk: float, initial_quantile: float) -> Threshold:
    """Peaks over threshold: a generalized Pareto tail above the initial quantile, read at ``risk``.

    Extreme-value theory says excesses over a high threshold t follow a GPD(shape, scale), so
    P(S > z) = (n_t / n) * (1 + shape (z - t) / scale) ** (-1 / shape): the quantile at tail
    probability ``risk`` extrapolates past the observed scores instead of sitting on the largest one.
    """
    initial = float(np.quantile(finite, initial_quantile))
    excesses = finite[finite > initial] - initial
    params: dict[str, Any] = {
        "risk": risk,
        "initial_quantile": initial_quantile,
        "initial_threshold": initial,
        "excesses": len(excesses),
    }
    tail_share = len(excesses) / len(finite)
    if len(excesses) < MIN_EXCESSES or np.ptp(excesses) == 0:
        reason = f"{len(excesses)} excesses" if len(excesses) < MIN_EXCESSES else "constant excesses"
        return Threshold("pot", initial, {**params, "fallback": "initial_quantile", "reason": reason})
    if risk >= tail_share:  # the requested quantile lies below the tail: read it off the data
        value = float(np.quantile(finite, 1.0 - risk))
        reason = f"risk {risk} >= tail share {tail_share:.4g}"
        return Threshold("pot", value, {**params, "fallback": "empirical_quantile", "reason": reason})
    shape, _, scale = genpareto.fit(excesses, floc=0.0)
    ratio = risk / tail_share
    if abs(shape) < EXPONENTIAL_SHAPE:
        value = initial - scale * np.log(ratio)
    else:
        value = initial + scale / shape * (ratio ** (-shape) - 1.0)
    params = {**params, "shape": float(shape), "scale": float(scale)}
    if not np.isfinite(value) or scale <= 0:
        return Threshold(
            "pot", initial, {**params, "fallback": "initial_quantile", "reason": "GPD fit failed"}
        )
    return Threshold("pot", float(value), params)


def _best_f1(finite: np.ndarray, labels: np.ndarray | None, k: float) -> Threshold:
    """The score value that, used as ``score > cut``, gives the best point F1 on the training labels.

    Ties go to the highest cut (fewest alerts). Without a positive label there is nothing to
    optimise, so the sigma threshold is used and recorded as the fallback.
    """
    positives = 0 if labels is None else int(labels.sum())
    if positives == 0:
        sigma = _sigma(finite, k)
        reason = "no labels" if labels is None else "no positive labels"
        return Threshold("best_f1", sigma.value, {**sigma.params, "fallback": "sigma", "reason": reason})
    cuts = np.unique(finite)  # ascending
    flagged = len(finite) - np.searchsorted(np.sort(finite), cuts, side="right")
    true_positive = positives - np.searchsorted(np.sort(finite[labels]), cuts, side="right")
    f1 = 2 * true_positive / (flagged + positives)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # last maximum = highest cut
    caught, alerts = int(true_positive[best]), int(flagged[best])
    return Threshold(
        "best_f1",
        float(cuts[best]),
        {
            "f1": float(f1[best]),
            "precision": caught / alerts if alerts else 0.0,
            "recall": caught / positives,
            "positives": positives,
        },
    )
