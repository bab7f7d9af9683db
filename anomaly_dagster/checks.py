"""Data-quality checks over a stage's output, as plain results the orchestrator can display."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_dagster import entities
from anomaly_dagster.config import SourceConfig
from anomaly_dagster.features import day_buckets
from anomaly_dagster.ingest import EMPTY_CSV, UNREADABLE_FILE
from anomaly_dagster.modeling import ENSEMBLE


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    per_day: dict[str, float | int | str] = field(default_factory=dict)
    totals: dict[str, float | int] = field(default_factory=dict)


def complete_buckets(source: SourceConfig, frames: dict[date, pd.DataFrame]) -> CheckOutcome:
    """Every day (of every entity, with an entity column) has exactly its bucket grid: no gap, no
    duplicate, no stray bucket. An entity source with no entity on a day fails: nothing reported."""
    problems = {}
    counts = []
    for day, frame in sorted(frames.items()):
        expected = day_buckets(source, day).as_unit("us")
        series = list(entities.split(source, frame))
        counts.append(len(series))
        if not series:
            problems[day.isoformat()] = f"no {source.entity} has events on the day or the day before"
        for entity, rows in series:
            actual = pd.DatetimeIndex(rows["bucket_start"]).as_unit("us")
            missing, extra = expected.difference(actual), actual.difference(expected)
            duplicated = int(actual.duplicated().sum())
            if len(missing) or len(extra) or duplicated:
                where = day.isoformat() if entity is None else f"{day} {source.entity}={entity}"
                problems[where] = (
                    f"{len(actual)} rows: {len(missing)} missing, {len(extra)} outside the day, "
                    f"{duplicated} duplicated"
                )
    if problems:
        where = "day(s)" if source.entity is None else f"day(s) or {source.entity} value(s)"
        return CheckOutcome(False, f"incomplete bucket grid on {len(problems)} {where}", problems)
    per_entity = "" if source.entity is None else f" of {min(counts)}-{max(counts)} {source.entity} value(s)"
    return CheckOutcome(True, f"{source.buckets_per_day} buckets on each of {len(frames)} day(s){per_entity}")


def short_days(source: SourceConfig, counts: dict[date, int]) -> dict[date, str]:
    """The days of ``counts`` (events per day) with fewer than ``checks.min_events_per_day`` events, or
    than ``checks.min_events_share`` of a typical day before them, and why. Typical is the median of
    the ``training_days`` before, or the same weekday a week before if that is lower (a quiet weekend
    is not missing input). ``min_events_per_day: 0`` turns both off, for a log that may be silent."""
    least, share = source.checks.min_events_per_day, source.checks.min_events_share
    short: dict[date, str] = {}
    if least == 0:
        return short
    for day, count in sorted(counts.items()):
        before = [counts[d] for d in counts if 1 <= (day - d).days <= source.training_days]
        typical = min(
            float(np.median(before)) if before else 0.0, counts.get(day - timedelta(days=7), np.inf)
        )
        if count < least:
            short[day] = f"{count} < {least}"
        elif count < share * typical:
            short[day] = f"{count} < {share:.0%} of a typical day before it ({typical:.0f})"
    return short


def events_present(
    source: SourceConfig, events: dict[date, int], history: dict[date, int] | None = None
) -> CheckOutcome:
    """The run's days (``events``; ``history``: counts already in the warehouse) are not
    :func:`short_days`. A day without input is missing data (files not landed yet, a wrong landing
    folder), which would otherwise resample to an outage of all-zero buckets; a missing file still
    leaves its day the few late events that the next day's file carries, hence the relative floor.
    The models leave such days out of their training windows."""
    least, share = source.checks.min_events_per_day, source.checks.min_events_share
    short = short_days(source, {**(history or {}), **events})
    per_day = {day.isoformat(): count for day, count in sorted(events.items())}
    failed = {day.isoformat(): why for day, why in short.items() if day in events}
    if failed:
        return CheckOutcome(False, f"too few events on {sorted(failed)}: missing input? {failed}", per_day)
    if least == 0:
        return CheckOutcome(
            True, f"not checked (checks.min_events_per_day is 0) on {len(per_day)} day(s)", per_day
        )
    return CheckOutcome(
        True,
        f"at least {least} event(s) and {share:.0%} of the median earlier day on each of {len(per_day)} day(s)",
        per_day,
    )


def quarantine_rate(
    source: SourceConfig, events: dict[date, int], quarantined: dict[date, pd.DataFrame]
) -> CheckOutcome:
    """Share of quarantined rows per day, against ``checks.max_quarantine_rate``; and no file that
    could not be read at all, which is one quarantine row for a whole file's events."""
    limit = source.checks.max_quarantine_rate
    rates, unreadable = {}, {}
    for day, count in sorted(events.items()):
        rows = quarantined.get(day, pd.DataFrame(columns=["source_file", "reason"]))
        bad = len(rows)
        rates[day.isoformat()] = bad / (count + bad) if count + bad else 0.0
        reasons = rows["reason"].astype(str)
        lost = rows[reasons.str.startswith(UNREADABLE_FILE) & ~reasons.str.endswith(EMPTY_CSV)]
        if len(lost):
            unreadable[day.isoformat()] = sorted(Path(name).name for name in lost["source_file"])
    worst = max(rates.values(), default=0.0)
    description = f"worst quarantine rate {worst:.4%} (limit {limit:.2%})"
    if unreadable:
        description += f"; unreadable file(s), whose events are all lost: {unreadable}"
    return CheckOutcome(worst <= limit and not unreadable, description, rates)


def alert_rate(source: SourceConfig, anomalies: dict[date, pd.DataFrame]) -> CheckOutcome:
    """Share of flagged buckets per day within [min_alert_rate, max_alert_rate]; with an entity
    column, of the entity flagged most that day."""
    low, high = source.checks.min_alert_rate, source.checks.max_alert_rate
    rates = {
        day.isoformat(): max((len(rows) for _, rows in entities.split(source, frame)), default=0)
        / source.buckets_per_day
        for day, frame in sorted(anomalies.items())
    }
    outside = {day: rate for day, rate in rates.items() if not low <= rate <= high}
    description = f"alert rate per day in [{low:.0%}, {high:.0%}]" + (
        f"; outside on {sorted(outside)}" if outside else ""
    )
    return CheckOutcome(not outside, description, rates)


def stream_batch_agreement(
    source: SourceConfig, stream: pd.DataFrame, scores: pd.DataFrame, resampled: pd.DataFrame
) -> CheckOutcome:
    """Stream answers (``stream_scores``) against batch (``scores`` ensemble rows, ``resampled``).

    Both paths score the same buckets with the same model, so their flags should mostly agree; a low
    agreement means the stream drifted (a stale warm start, lost events, a lateness too short). Only
    buckets present in both are compared; count metrics that differ point at lost or extra events.
    Passes when there are no stream rows: nothing was streamed, nothing to compare.
    """
    limit = source.checks.min_stream_agreement
    if source.entity is not None:
        return CheckOutcome(
            True,
            f"not compared: streams score one series, batch one per {source.entity}",
            totals={"buckets_compared": 0},
        )
    if stream.empty:
        return CheckOutcome(
            True, "no stream rows for these days: nothing to compare", totals={"buckets_compared": 0}
        )
    batch = (
        scores.loc[scores["detector"] == ENSEMBLE, ["bucket_start", "is_anomaly"]] if len(scores) else None
    )
    if batch is None or batch.empty:
        return CheckOutcome(
            True, "no batch scores for these days: nothing to compare", totals={"buckets_compared": 0}
        )
    counts = [metric.name for metric in source.metrics if metric.is_count]
    left = stream[["window_start", "is_anomaly", *counts]].rename(columns={"window_start": "bucket_start"})
    joined = left.merge(batch, on="bucket_start", suffixes=("_stream", "_batch"))
    if len(resampled):
        joined = joined.merge(
            resampled[["bucket_start", *counts]], on="bucket_start", how="left", suffixes=("", "_batch")
        )
        differs = np.zeros(len(joined), dtype=bool)
        for name in counts:
            differs |= joined[name].to_numpy() != joined[f"{name}_batch"].to_numpy()
        joined["count_mismatch"] = differs
    else:
        joined["count_mismatch"] = False
    flags = joined["is_anomaly_stream"].astype(bool), joined["is_anomaly_batch"].astype(bool)
    joined["agrees"] = flags[0] == flags[1]
    joined["stream_only"], joined["batch_only"] = flags[0] & ~flags[1], ~flags[0] & flags[1]
    per_day = {
        day.isoformat(): float(rows["agrees"].mean())
        for day, rows in joined.groupby(joined["bucket_start"].dt.date)
    }
    if not per_day:
        return CheckOutcome(
            True, "stream and batch share no bucket: nothing to compare", totals={"buckets_compared": 0}
        )
    worst_day, worst = min(per_day.items(), key=lambda item: item[1])
    totals = {
        "agreement": float(joined["agrees"].mean()),
        "buckets_compared": len(joined),
        "flag_mismatches": int((~joined["agrees"]).sum()),
        "stream_only_flags": int(joined["stream_only"].sum()),
        "batch_only_flags": int(joined["batch_only"].sum()),
        "count_mismatches": int(joined["count_mismatch"].sum()),
    }
    description = (
        f"stream and batch flags agree on {totals['agreement']:.1%} of {len(joined)} buckets "
        f"(lowest {worst:.1%} on {worst_day}; limit {limit:.0%}); "
        f"{totals['count_mismatches']} bucket(s) with different counts"
    )
    return CheckOutcome(worst >= limit, description, per_day, totals)
