"""PNG plots a person looks at: the series with flagged buckets, scores against thresholds,
and the training-score histogram with the calibrated threshold line."""

from __future__ import annotations

import io
import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

DPI = 80


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return buffer.getvalue()


def compact_png(data: bytes, max_width: int = 900, colours: int = 64) -> bytes:
    """A smaller copy of a plot for embedding in run metadata.

    Dagster copies a ranged run's metadata into the event of every day it covers, so an embedded
    plot is paid once per day: a palette PNG of a few dozen colours keeps that small, and the
    full-size file stays in the warehouse.
    """
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    buffer = io.BytesIO()
    image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def band_series(scores: pd.DataFrame, name: str) -> pd.DataFrame | None:
    """Lower, median and upper value of series ``name`` over time, from the first band detector (by
    name) whose ``band`` holds it; None when no detector gives it a band."""
    if "band" not in scores.columns:
        return None
    banded = scores[(scores["detector"] != "ensemble") & scores["band"].notna()]
    for _, rows in banded.sort_values("bucket_start").groupby("detector", sort=True):
        bands = [json.loads(text) for text in rows["band"]]
        if any(name in band for band in bands):
            values = [band.get(name, [np.nan] * 3) for band in bands]
            frame = pd.DataFrame(values, columns=["lower", "median", "upper"])
            return frame.assign(bucket_start=rows["bucket_start"].to_numpy())
    return None


def series_plot(features: pd.DataFrame, scores: pd.DataFrame, series: list[str], title: str) -> bytes:
    """One panel per series with flagged buckets marked (and its forecast band, where a band detector
    gives one), and the ensemble score against 1.0."""
    ensemble = scores[scores["detector"] == "ensemble"].sort_values("bucket_start")
    flagged = ensemble[ensemble["is_anomaly"]]["bucket_start"]
    figure, axes = plt.subplots(len(series) + 1, 1, figsize=(11, 1.8 * (len(series) + 1)), sharex=True)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.06, hspace=0.15)
    for axis, name in zip(axes, series, strict=False):
        band = band_series(scores, name)
        if band is not None:
            axis.fill_between(
                band["bucket_start"], band["lower"], band["upper"], color="tab:blue", alpha=0.15
            )
            axis.plot(band["bucket_start"], band["median"], linewidth=0.6, color="tab:gray", linestyle="--")
        axis.plot(features["bucket_start"], features[name], linewidth=0.8, color="tab:blue")
        marked = features[features["bucket_start"].isin(flagged)]
        axis.scatter(marked["bucket_start"], marked[name], color="tab:red", s=12, zorder=3, label="flagged")
        axis.set_ylabel(name)
    score_axis = axes[-1]
    score_axis.plot(
        ensemble["bucket_start"], _finite_ceiling(ensemble["score"]), linewidth=0.8, color="tab:purple"
    )
    score_axis.axhline(1.0, color="tab:red", linestyle="--", linewidth=0.8)
    score_axis.set_yscale("symlog")
    score_axis.set_ylabel("score / threshold")
    axes[0].set_title(title)
    return _png(figure)


def _finite_ceiling(scores: pd.Series) -> pd.Series:
    """Scores with ``inf`` (over a threshold of 0) drawn at twice the largest finite one, at least 10:
    matplotlib leaves infinite points out, and a flagged bucket looked under the threshold line."""
    finite = scores[np.isfinite(scores)]
    ceiling = 2.0 * max(float(finite.max()) if len(finite) else 0.0, 5.0)
    return scores.where(~np.isinf(scores), ceiling)


def threshold_histogram(
    training_scores: dict[str, np.ndarray], thresholds: dict[str, float], title: str
) -> bytes:
    """Per detector: the distribution of training-window scores and the calibrated threshold."""
    names = list(training_scores)
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.6), squeeze=False)
    figure.subplots_adjust(left=0.06, right=0.98, top=0.78, bottom=0.12, wspace=0.3)
    for axis, name in zip(axes[0], names, strict=True):
        values = training_scores[name][np.isfinite(training_scores[name])]
        axis.hist(values, bins=40, color="tab:gray")
        axis.axvline(thresholds[name], color="tab:red", linestyle="--", label="threshold")
        axis.set_title(f"{name}: {thresholds[name]:.3g}", fontsize=9)
    figure.suptitle(title, fontsize=10)
    return _png(figure)


def attribution_plot(scores: pd.DataFrame, detector: str, title: str) -> bytes:
    """Like the Kinesis result chart: each feature's attribution over time (HIGH up, LOW down)
    under the detector's score and threshold."""
    rows = scores[scores["detector"] == detector].sort_values("bucket_start")
    explained = [json.loads(text) for text in rows["attribution"]]
    features = (
        [name for name in explained[0] if name not in ("tod_sin", "tod_cos", "slot")] if explained else []
    )
    figure, (score_axis, attribution_axis) = plt.subplots(2, 1, figsize=(11, 5), sharex=True)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.08, hspace=0.12)
    score_axis.plot(rows["bucket_start"], rows["score"], linewidth=0.8, color="tab:purple", label="score")
    score_axis.plot(rows["bucket_start"], rows["threshold"], linewidth=0.8, color="tab:red", linestyle="--")
    score_axis.set_ylabel(f"{detector} score")
    score_axis.set_title(title)
    for name in features:
        signed = [
            item[name]["strength"] * (1 if item[name]["direction"] == "HIGH" else -1) for item in explained
        ]
        attribution_axis.plot(rows["bucket_start"], signed, linewidth=0.8, label=name)
    attribution_axis.axhline(0.0, color="black", linewidth=0.5)
    attribution_axis.set_ylabel("attribution (HIGH +, LOW -)")
    attribution_axis.legend(loc="upper left", fontsize=8, ncol=len(features) or 1)
    return _png(figure)


def evaluation_plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], series: pd.DataFrame, title: str
) -> bytes:
    """Precision-recall curve per detector, and the ensemble's flags against the labels over time."""
    figure, (curve_axis, series_axis) = plt.subplots(
        1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 2.4]}
    )
    figure.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.14, wspace=0.18)
    for name, (precision, recall) in curves.items():
        curve_axis.plot(recall, precision, linewidth=1.0, label=name)
    curve_axis.set_xlabel("recall")
    curve_axis.set_ylabel("precision")
    curve_axis.set_xlim(0, 1.02)
    curve_axis.set_ylim(0, 1.02)
    curve_axis.legend(fontsize=7)
    series_axis.plot(series["bucket_start"], series["value"], linewidth=0.7, color="tab:blue")
    labelled = series[series["label"]]
    flagged = series[series["flagged"]]
    series_axis.scatter(
        labelled["bucket_start"],
        labelled["value"],
        s=30,
        facecolors="none",
        edgecolors="tab:green",
        label="labelled",
    )
    series_axis.scatter(flagged["bucket_start"], flagged["value"], s=8, color="tab:red", label="flagged")
    series_axis.legend(fontsize=7, loc="upper left")
    series_axis.set_ylabel(series.attrs.get("name", "value"))
    figure.suptitle(title, fontsize=10)
    return _png(figure)
