"""Flagged buckets merged into incidents: what an on-call person acts on.

Consecutive flagged buckets (allowing ``gap`` unflagged buckets between them) form one incident
with its start and end (inclusive bucket starts), peak score, the detectors that fired, and the
top feature and direction at the peak.
"""

from __future__ import annotations

import pandas as pd

INCIDENT_COLUMNS = [
    "start",
    "end",
    "buckets",
    "peak_bucket",
    "peak_score",
    "detectors",
    "top_feature",
    "direction",
]


def merge_incidents(anomalies: pd.DataFrame, bucket: pd.Timedelta, gap: int = 0) -> pd.DataFrame:
    """Incidents from the ``anomalies`` table (bucket_start, score, detectors, top_feature, direction)."""
    if anomalies.empty:
        return pd.DataFrame({column: pd.Series(dtype=_dtype(column)) for column in INCIDENT_COLUMNS})
    flagged = anomalies.sort_values("bucket_start").reset_index(drop=True)
    step = flagged["bucket_start"].diff()
    incident_id = (step.isna() | (step > bucket * (gap + 1))).cumsum()
    rows = []
    for _, group in flagged.groupby(incident_id, sort=True):
        peak = group.loc[group["score"].idxmax()]
        fired = sorted({name for names in group["detectors"] for name in names.split(",") if name})
        rows.append(
            {
                "start": group["bucket_start"].iloc[0],
                "end": group["bucket_start"].iloc[-1],
                "buckets": len(group),
                "peak_bucket": peak["bucket_start"],
                "peak_score": float(peak["score"]),
                "detectors": ",".join(fired),
                "top_feature": peak["top_feature"],
                "direction": peak["direction"],
            }
        )
    return pd.DataFrame(rows, columns=INCIDENT_COLUMNS)


def _dtype(column: str) -> str:
    if column in ("start", "end", "peak_bucket"):
        return "datetime64[us]"
    if column == "buckets":
        return "int64"
    if column == "peak_score":
        return "float64"
    return "object"
