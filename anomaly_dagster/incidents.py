"""Flagged buckets merged into incidents: what an on-call person acts on.

Consecutive flagged buckets (allowing ``gap`` unflagged buckets between them) form one incident
with its start and end (inclusive bucket starts), duration, peak score, the detectors that fired,
the top feature and direction at the peak, and what was observed and expected there (and the band a
band detector allowed).
"""

from __future__ import annotations

import json
import math

import pandas as pd

INCIDENT_COLUMNS = [
    "start",
    "end",
    "buckets",
    "duration_minutes",
    "peak_bucket",
    "peak_score",
    "detectors",
    "top_feature",
    "direction",
    "observed",
    "expected",
    "band",
]


def merge_incidents(
    anomalies: pd.DataFrame, bucket: pd.Timedelta, gap: int = 0, series: list[str] | None = None
) -> pd.DataFrame:
    """Incidents from the ``anomalies`` table (bucket_start, score, detectors, top_feature, direction,
    and optionally ``expected`` and ``band`` JSON and the ``series`` columns, reported as observed at the
    peak)."""
    if anomalies.empty:
        return pd.DataFrame({column: pd.Series(dtype=_dtype(column)) for column in INCIDENT_COLUMNS})
    flagged = anomalies.sort_values("bucket_start").reset_index(drop=True)
    step = flagged["bucket_start"].diff()
    incident_id = (step.isna() | (step > bucket * (gap + 1))).cumsum()
    rows = []
    for _, group in flagged.groupby(incident_id, sort=True):
        peak = group.loc[group["score"].idxmax()]
        fired = sorted({name for names in group["detectors"] for name in names.split(",") if name})
        start, end = group["bucket_start"].iloc[0], group["bucket_start"].iloc[-1]
        # a value missing at the peak (a mean over a bucket without readings) is null: json.dumps would
        # write a bare NaN, which strict JSON readers refuse
        observed = {name: json_number(peak[name]) for name in series or [] if name in peak.index}
        rows.append(
            {
                "start": start,
                "end": end,
                "buckets": len(group),
                "duration_minutes": int((end - start + bucket) / pd.Timedelta(minutes=1)),
                "peak_bucket": peak["bucket_start"],
                "peak_score": float(peak["score"]),
                "detectors": ",".join(fired),
                "top_feature": peak["top_feature"],
                "direction": peak["direction"],
                "observed": json.dumps(observed) if observed else None,
                "expected": peak.get("expected"),
                "band": peak.get("band"),
            }
        )
    return pd.DataFrame(rows, columns=INCIDENT_COLUMNS)


def json_number(value: object) -> float | None:
    """``value`` as a float for JSON, None (null) when it is not finite (a bare NaN is not JSON)."""
    number = float(value)
    return number if math.isfinite(number) else None


def _dtype(column: str) -> str:
    if column in ("start", "end", "peak_bucket"):
        return "datetime64[us]"
    if column in ("buckets", "duration_minutes"):
        return "int64"
    if column == "peak_score":
        return "float64"
    return "object"
