"""Walk-forward training, scoring and flagging with the configured detectors.

The model for day D is fitted on the features of up to ``training_days`` days before D, so
the scores of D are always out of sample. The first day has no history: it is fitted on
itself and marked ``cold_start`` so nobody mistakes its flags for out-of-sample ones.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from anomaly_dagster.calibration import Threshold, calibrate
from anomaly_dagster.config import SourceConfig
from anomaly_dagster.detectors import Detector, detector_class

ENSEMBLE = "ensemble"
#: threshold method of a detector that could not be fitted on its window; it is absent from the model
UNTRAINED = "untrained"
CONTEXT_FEATURES = frozenset({"slot", "tod_sin", "tod_cos"})


@dataclass
class TrainedModel:
    detectors: dict[str, Detector]
    thresholds: dict[str, Threshold]
    training_days: list[date]
    cold_start: bool
    training_scores: dict[str, np.ndarray]

    def manifest(self) -> dict[str, Any]:
        return {
            "training_days": [day.isoformat() for day in self.training_days],
            "cold_start": self.cold_start,
            "thresholds": {name: threshold.to_dict() for name, threshold in self.thresholds.items()},
        }


def training_window(source: SourceConfig, day: date, available: list[date]) -> tuple[list[date], bool]:
    """The days the model for ``day`` trains on, and whether that is a cold start."""
    earlier = [d for d in available if (day - d).days in range(1, source.training_days + 1)]
    if earlier:
        return sorted(earlier), False
    return [day], True


def needs_labels(source: SourceConfig) -> bool:
    """Whether training reads the labels: for best-F1 thresholds, or a supervised detector."""
    return any(
        getattr(detector_class(d.kind), "supervised", False)
        or (d.threshold or source.threshold).method == "best_f1"
        for d in source.detectors
    )


def make_detector(source: SourceConfig, name: str) -> Detector:
    """The configured detector ``name``; a time-of-day profile gets the source's slots per day."""
    config = next(detector for detector in source.detectors if detector.name == name)
    params = dict(config.params)
    cls = detector_class(config.kind)
    if "n_slots" in inspect.signature(cls).parameters:  # (a different one is refused when the config loads)
        params["n_slots"] = source.buckets_per_day
    return cls(config.features, **params)


def train(
    source: SourceConfig,
    features: pd.DataFrame,
    days: list[date],
    cold_start: bool,
    labels: pd.Series | None = None,
) -> TrainedModel:
    """Fit every configured detector on ``features`` and calibrate its threshold on the same rows.

    A detector the window cannot fit (a lag of a whole day on the first day: no row has it) is left out
    of the model with threshold method ``untrained`` and the reason, and does not vote; the others are
    trained. Only when no detector can be fitted is it an error.

    ``labels`` (labelled bucket starts) are used only by the ``best_f1`` threshold and ``spark_rf``,
    and only those inside the training window: the scored day's labels never reach its model. A
    cold start trains on the scored day itself, so it gets no labels (``best_f1`` falls back to
    sigma, ``spark_rf`` stays untrained).
    """
    training_labels = None
    if labels is not None and not cold_start:
        index = pd.DatetimeIndex(features["bucket_start"])
        training_labels = labels.reindex(index, fill_value=False).to_numpy(dtype=bool)
    if features.empty:
        raise ValueError(f"no feature rows to train on for days {days}")
    detectors: dict[str, Detector] = {}
    thresholds: dict[str, Threshold] = {}
    training_scores: dict[str, np.ndarray] = {}
    for config in source.detectors:
        detector = make_detector(source, config.name)
        try:
            if getattr(detector, "supervised", False):  # learns from the window's labels (spark_rf)
                detector.fit(features, training_labels)
            else:
                detector.fit(features)
            scores = detector.score(features)
            scored = detector.scored_rows(features)
            if not scored.any():  # e.g. a band whose only measured rows came before it had a context
                raise ValueError("no row of the window has a measured score to calibrate a threshold on")
        except ValueError as error:
            reason = f"{config.name} could not be fitted on {days[0]}..{days[-1]}: {error}"
            thresholds[config.name] = Threshold(UNTRAINED, float("nan"), {"reason": reason})
            training_scores[config.name] = np.empty(0)
            continue
        detectors[config.name] = detector
        measured = np.where(scored, scores, np.nan)  # calibrate() drops NaN
        thresholds[config.name] = calibrate(
            measured, config.threshold or source.threshold, labels=training_labels
        )
        training_scores[config.name] = scores
    if not detectors:
        raise ValueError("; ".join(threshold.params["reason"] for threshold in thresholds.values()))
    return TrainedModel(detectors, thresholds, days, cold_start, training_scores)


def check_model_matches(source: SourceConfig, described: str, recorded: list[str]) -> None:
    """Refuse to score with a model trained for other detectors than the source now configures: a
    voter missing from it would silently never vote (no alert at all under ``min_votes``)."""
    configured = [detector.name for detector in source.detectors]
    if sorted(recorded) != sorted(configured):
        raise ValueError(
            f"{described} was trained for detectors {sorted(recorded)} but {source.name} now configures "
            f"{sorted(configured)}: re-materialize its model partition"
        )


def _expected_json(expected: pd.DataFrame) -> list[str | None]:
    """Each row's expected values as strict JSON: a feature without one (NaN: no band yet) is left out,
    and a row with none is None (``json.dumps`` would write a bare NaN that JSON readers refuse)."""
    rows = expected.round(6).to_dict(orient="records")
    known = [{name: value for name, value in row.items() if np.isfinite(value)} for row in rows]
    return [json.dumps(values) if values else None for values in known]


def _band_json(features: list[str], band: np.ndarray) -> list[str | None]:
    """Each row's band as strict JSON ``{feature: [lower, median, upper]}``; a feature without one (NaN)
    is left out, and a row with none is None."""
    rounded = np.round(band, 6)
    rows = []
    for row in range(band.shape[1]):
        known = {
            name: rounded[:, row, column].tolist()
            for column, name in enumerate(features)
            if np.isfinite(band[:, row, column]).all()
        }
        rows.append(json.dumps(known) if known else None)
    return rows


def model_summary(source: SourceConfig, model: TrainedModel) -> pd.DataFrame:
    """One row per detector: what the ``model`` table shows in the catalog and the UI."""
    rows = []
    for config in source.detectors:
        name = config.name
        threshold = model.thresholds[name]
        detector = model.detectors.get(name) or make_detector(source, name)  # untrained: as configured
        rows.append(
            {
                "detector": name,
                "kind": detector.kind,
                "features": ",".join(detector.features),
                "params": json.dumps(detector.params, sort_keys=True),
                "threshold_method": threshold.method,
                "threshold": threshold.value,
                "threshold_params": json.dumps(threshold.params, sort_keys=True),
                "training_start": model.training_days[0],
                "training_end": model.training_days[-1],
                "training_days": len(model.training_days),
                "training_rows": len(model.training_scores[name]),
                "cold_start": model.cold_start,
            }
        )
    return pd.DataFrame(rows)


def preceding(detector: Detector, *before: pd.DataFrame) -> pd.DataFrame | None:
    """The rows before a frame that ``detector`` reads to score it (see ``history_rows``): the last
    ones of ``before`` (in order) it can take, as in one batch (which skips rows with a gap)."""
    if detector.history_rows == 0 or not before:
        return None
    rows = pd.concat(before, ignore_index=True) if len(before) > 1 else before[0]
    return rows[detector.scored_rows(rows)].tail(detector.history_rows) if len(rows) else None


def score(
    source: SourceConfig,
    features: pd.DataFrame,
    detectors: dict[str, Detector],
    thresholds: dict[str, float],
    before: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Long table: one row per bucket and detector, plus an ``ensemble`` row per bucket.

    ``normalized = score / threshold`` puts detectors on one scale (> 1 is over threshold); the
    ensemble's score is the largest normalized score among the voting detectors
    (``source.ensemble``), it fires when at least ``min_votes`` of them do (:func:`votes_needed`: no
    more than the model has trained), and it takes its
    explanation from the strongest detector that fired. ``before`` (the previous day's features)
    completes a shingled forest's first shingles; without it the first ``shingle_size - 1`` rows score 0.
    """
    per_detector = []
    for name, detector in detectors.items():
        assessment = detector.assess(features, None if before is None else preceding(detector, before))
        raw, contributions, expected = assessment.scores, assessment.contributions, assessment.expected
        threshold = thresholds[name]
        # time-of-day encodings give context, they are not something that can be "too high"
        observable = np.array([name not in CONTEXT_FEATURES for name in detector.features])
        top = np.where(observable, np.nan_to_num(np.abs(contributions), nan=-1.0), -2.0).argmax(axis=1)
        # a row the detector could not measure (its placeholder score 0) has no direction either
        signed_top = np.where(assessment.scored, contributions[np.arange(len(features)), top], np.nan)
        per_detector.append(
            pd.DataFrame(
                {
                    "bucket_start": features["bucket_start"].to_numpy(),
                    "detector": name,
                    "score": raw,
                    "threshold": threshold,
                    "normalized": raw / threshold
                    if threshold > 0
                    else np.where(raw > threshold, np.inf, 0.0),
                    "is_anomaly": raw > threshold,
                    "top_feature": np.asarray(detector.features)[top],
                    # a row with no measured value has no direction ("", not the LOW of NaN >= 0, nor the
                    # HIGH of a placeholder 0)
                    "direction": np.where(np.isnan(signed_top), "", np.where(signed_top >= 0, "HIGH", "LOW")),
                    "attribution": [explanation_json(detector.features, row) for row in contributions],
                    "expected": [None] * len(features) if expected is None else _expected_json(expected),
                    "band": [None] * len(features)
                    if assessment.band is None
                    else _band_json(detector.features, assessment.band),
                }
            )
        )
    long = pd.concat(per_detector, ignore_index=True)
    long["detectors"] = np.where(long["is_anomaly"], long["detector"], "")
    voters = long[long["detector"].isin(source.ensemble_detectors)]
    needed = votes_needed(source, detectors)
    return pd.concat([long, _ensemble(voters, needed)], ignore_index=True).sort_values(
        ["bucket_start", "detector"], ignore_index=True
    )


def explanation_json(features: list[str], contributions: np.ndarray) -> str:
    """Per-feature strength and direction, shaped like Kinesis' RANDOM_CUT_FOREST_WITH_EXPLANATION:
    ``{"users": {"strength": 2.1, "direction": "LOW"}, ...}``."""
    return json.dumps(
        {
            name: {"strength": round(abs(float(value)), 6), "direction": "HIGH" if value >= 0 else "LOW"}
            for name, value in zip(features, np.nan_to_num(contributions), strict=True)
        }
    )


def votes_needed(source: SourceConfig, trained: Iterable[str]) -> int:
    """The ensemble's ``min_votes``, or every voter the model has when fewer are trained: a voter its
    window could not fit cannot vote, and waiting for its vote would silence the ensemble those days."""
    present = set(trained) & set(source.ensemble_detectors)
    return max(1, min(source.ensemble.min_votes, len(present)))


def _ensemble(long: pd.DataFrame, min_votes: int) -> pd.DataFrame:
    ranked = long.assign(rank_key=long["normalized"].fillna(-np.inf)).sort_values(
        ["bucket_start", "is_anomaly", "rank_key"], ascending=[True, False, False]
    )
    strongest = ranked.groupby("bucket_start", sort=True).head(1).set_index("bucket_start")
    fired = (
        long[long["is_anomaly"]]
        .groupby("bucket_start")["detector"]
        .agg(lambda names: ",".join(sorted(names)))
    )
    peak = long.groupby("bucket_start")["normalized"].max()
    ensemble = pd.DataFrame({"score": peak})
    ensemble["detector"] = ENSEMBLE
    ensemble["threshold"] = 1.0
    ensemble["normalized"] = peak
    ensemble["detectors"] = fired.reindex(peak.index).fillna("")
    votes = long[long["is_anomaly"]].groupby("bucket_start").size().reindex(peak.index, fill_value=0)
    ensemble["is_anomaly"] = votes >= min_votes
    for column in ("top_feature", "direction", "attribution", "expected", "band"):
        ensemble[column] = strongest[column].reindex(peak.index)
    return ensemble.reset_index()


def anomalies_from_scores(scores: pd.DataFrame, features: pd.DataFrame, series: list[str]) -> pd.DataFrame:
    """One row per flagged bucket: ensemble verdict, the detectors that fired, and the observed values."""
    flagged = scores[(scores["detector"] == ENSEMBLE) & scores["is_anomaly"]]
    # scores written before bands were stored have no band column: their buckets have no band
    flagged = flagged.assign(band=flagged.get("band"))
    columns = ["bucket_start", "score", "detectors", "top_feature", "direction", "expected", "band"]
    return (
        flagged[columns]
        .merge(features[["bucket_start", *series]], on="bucket_start", how="left")
        .sort_values("bucket_start", ignore_index=True)
    )
