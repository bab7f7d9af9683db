"""Detections against labels: point and event (incident) metrics.

Point metrics count buckets. Event metrics count incidents, as an operator on call does: a labelled
incident is caught when any of its buckets is flagged (event recall), and a predicted incident (flags
merged across ``incident_gap_buckets``, like the incidents table) is true when it touches a labelled one
(event precision). A long fault caught in one bucket is a full event hit but a poor point recall; a
burst of flags on one fault is one true event but many point positives.

Labels come in two shapes: the reference format (one line of 0/1 per bucket, aligned with the
source's buckets from a start day) and a CSV of labelled ranges ``start,end[,kind]`` with
inclusive bucket starts, which is what the sample generator writes. A range bound inside a bucket
labels that bucket; a bound with an offset or zone is converted to UTC; a range that ends before it
starts, or a bound that is not a time, is an error naming the line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_dagster.config import SourceConfig


def load_labels(path: Path, bucket_minutes: int, first_day: date | None = None) -> pd.Series:
    """Labelled bucket starts → True, as a boolean Series indexed by bucket start."""
    text = Path(path).read_text().strip()
    first_line = text.splitlines()[0] if text else ""
    step = pd.Timedelta(minutes=bucket_minutes)
    if first_line and set(first_line.replace(",", "").strip()) <= {"0", "1"} and "\n" not in text:
        if first_day is None:
            raise ValueError(f"{path}: a 0/1 label line needs the day its first bucket belongs to")
        flags = np.array([int(value) for value in first_line.split(",")], dtype=bool)
        index = pd.date_range(pd.Timestamp(first_day), periods=len(flags), freq=step)
        labels = pd.Series(flags, index=index, name="label")
        labels.attrs["dense"] = True  # every bucket of its span is labelled, the buckets after it are not
        return labels
    ranges = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in ("start", "end") if column not in ranges.columns]
    if missing:
        raise ValueError(
            f"{path}: a label range file needs a header line with 'start,end[,kind]' (missing {missing}; "
            f"its first line is {first_line!r}); a 0/1 label file is one line of comma-separated flags"
        )
    starts = []
    for line, row in enumerate(ranges.itertuples(), start=2):
        first, last = (_label_time(path, line, getattr(row, column), step) for column in ("start", "end"))
        if last < first:
            raise ValueError(f"{path} line {line}: the range ends ({row.end}) before it starts ({row.start})")
        starts.extend(pd.date_range(first, last, freq=step))
    return pd.Series(True, index=pd.DatetimeIndex(sorted(set(starts))), name="label")


def _label_time(path: Path, line: int, text: str, step: pd.Timedelta) -> pd.Timestamp:
    """A range bound as the start of the bucket holding it, in UTC like the buckets (a time with an
    offset or zone is converted; a naive one is UTC)."""
    try:
        stamp = pd.Timestamp(text.strip())
    except ValueError:
        stamp = pd.NaT
    if pd.isna(stamp):
        raise ValueError(f"{path} line {line}: {text!r} is not a time")
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp.floor(step)


def labels_path(source: SourceConfig, landing_dir: Path) -> Path | None:
    """Where the source's labels file is read, if it has one configured (it may not exist yet).

    A relative ``labels.path`` is read beside the landing folder (``data/landing`` →
    ``data/labels/...``), which is where ``anomaly-dagster generate`` writes its labels.
    """
    if source.labels is None:
        return None
    path = Path(source.labels.path)
    return path if path.is_absolute() else Path(landing_dir).resolve().parent / path


def labels_file(source: SourceConfig, landing_dir: Path) -> Path | None:
    """The source's labels file (see :func:`labels_path`) if it exists."""
    path = labels_path(source, landing_dir)
    return path if path is not None and path.exists() else None


def source_labels(source: SourceConfig, landing_dir: Path) -> pd.Series | None:
    """The labelled buckets of ``source`` (see :func:`labels_file`), or None without labels."""
    path = labels_file(source, landing_dir)
    if path is None:
        return None
    return load_labels(path, source.bucket_minutes, label_line_start(source))


def label_line_start(source: SourceConfig) -> date:
    """The day a 0/1 label line's first bucket belongs to: ``labels.first_day``, else ``start_date``."""
    return (source.labels.first_day if source.labels is not None else None) or source.start_date


def segments(flags: pd.Series, step: pd.Timedelta, gap: int = 0) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """Runs of consecutive True buckets as (first, last) bucket starts; ``gap`` unflagged buckets
    between two flags keep them in one run, as ``incident_gap_buckets`` does for incidents."""
    on = flags[flags].index.sort_values()
    if len(on) == 0:
        return []
    breaks = np.flatnonzero(np.diff(on.asi8) > step.value * (gap + 1)) + 1
    return [(chunk[0], chunk[-1]) for chunk in np.split(on, breaks)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@dataclass(frozen=True)
class Evaluation:
    precision: float
    recall: float
    f1: float
    event_precision: float
    event_recall: float
    event_f1: float
    labelled_incidents: int
    incidents_caught: int
    false_incidents: int
    false_incidents_per_day: float
    mean_time_to_detect_minutes: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def labelled_span(index: pd.DatetimeIndex, labels: pd.Series) -> np.ndarray:
    """Which buckets of ``index`` the labels speak about: all of them for labelled ranges (a bucket in
    no range is normal), only those inside the line for a 0/1 line (after its end nothing is known)."""
    if not labels.attrs.get("dense") or labels.empty:
        return np.ones(len(index), dtype=bool)
    return np.asarray((index >= labels.index[0]) & (index <= labels.index[-1]))


def evaluate(predicted: pd.Series, labels: pd.Series, bucket_minutes: int, gap: int = 0) -> Evaluation:
    """Compare boolean per-bucket predictions with labels over the predictions' buckets. Predicted
    incidents are merged across ``gap`` unflagged buckets, like the incidents table."""
    step = pd.Timedelta(minutes=bucket_minutes)
    predicted = predicted[labelled_span(predicted.index, labels)]
    truth = labels.reindex(predicted.index, fill_value=False).astype(bool)
    predicted = predicted.astype(bool)
    true_positive = int((predicted & truth).sum())
    precision = true_positive / int(predicted.sum()) if predicted.any() else 0.0
    recall = true_positive / int(truth.sum()) if truth.any() else 0.0
    labelled, found = segments(truth, step), segments(predicted, step, gap)
    delays = []
    for start, end in labelled:
        hits = predicted[start:end]
        if hits.any():
            delays.append((hits[hits].index[0] - start) / pd.Timedelta(minutes=1))
    false = [(s, e) for s, e in found if not truth[s:e].any()]
    event_precision = (len(found) - len(false)) / len(found) if found else 0.0
    event_recall = len(delays) / len(labelled) if labelled else 0.0
    days = max(len(predicted) * bucket_minutes / 1440.0, 1e-9)
    return Evaluation(
        precision=round(precision, 4),
        recall=round(recall, 4),
        f1=round(_f1(precision, recall), 4),
        event_precision=round(event_precision, 4),
        event_recall=round(event_recall, 4),
        event_f1=round(_f1(event_precision, event_recall), 4),
        labelled_incidents=len(labelled),
        incidents_caught=len(delays),
        false_incidents=len(false),
        false_incidents_per_day=round(len(false) / days, 3),
        mean_time_to_detect_minutes=round(float(np.mean(delays)), 1) if delays else float("nan"),
    )


def precision_recall_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of flagging the top-k scores, for every k (a threshold sweep)."""
    order = np.argsort(-np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf), kind="stable")
    hits = np.cumsum(np.asarray(truth, dtype=bool)[order])
    flagged = np.arange(1, len(order) + 1)
    positives = max(int(np.sum(truth)), 1)
    return hits / flagged, hits / positives


def evaluation_table(
    scores: pd.DataFrame, labels: pd.Series, bucket_minutes: int, gap: int = 0
) -> pd.DataFrame:
    """One row per detector (and the ensemble): point and event metrics over the scored buckets."""
    rows = []
    for detector, frame in scores.groupby("detector", sort=True):
        frame = frame[labelled_span(pd.DatetimeIndex(frame["bucket_start"]), labels)]
        flags = pd.Series(frame["is_anomaly"].to_numpy(), index=pd.DatetimeIndex(frame["bucket_start"]))
        result = evaluate(flags.sort_index(), labels, bucket_minutes, gap)
        rows.append(
            {
                "detector": detector,
                **result.to_dict(),
                "buckets": len(frame),
                "first_bucket": frame["bucket_start"].min(),
                "last_bucket": frame["bucket_start"].max(),
            }
        )
    return pd.DataFrame(rows)
