"""Data-quality checks over a stage's output, as plain results the orchestrator can display."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import pandas as pd

from anomaly_dagster.config import SourceConfig
from anomaly_dagster.features import day_buckets


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    per_day: dict[str, float | int | str] = field(default_factory=dict)


def complete_buckets(source: SourceConfig, frames: dict[date, pd.DataFrame]) -> CheckOutcome:
    """Every day has exactly its bucket grid: no gap, no duplicate, no stray bucket."""
    problems = {}
    for day, frame in sorted(frames.items()):
        expected = day_buckets(source, day).as_unit("us")
        actual = pd.DatetimeIndex(frame["bucket_start"]).as_unit("us")
        missing, extra = expected.difference(actual), actual.difference(expected)
        duplicated = int(actual.duplicated().sum())
        if len(missing) or len(extra) or duplicated:
            problems[day.isoformat()] = (
                f"{len(actual)} rows: {len(missing)} missing, {len(extra)} outside the day, {duplicated} duplicated"
            )
    if problems:
        return CheckOutcome(False, f"incomplete bucket grid on {len(problems)} day(s)", problems)
    return CheckOutcome(True, f"{source.buckets_per_day} buckets on each of {len(frames)} day(s)")


def quarantine_rate(
    source: SourceConfig, events: dict[date, int], quarantined: dict[date, pd.DataFrame]
) -> CheckOutcome:
    """Share of quarantined rows per day, against ``checks.max_quarantine_rate``."""
    limit = source.checks.max_quarantine_rate
    rates = {}
    for day, count in sorted(events.items()):
        bad = len(quarantined.get(day, ()))
        rates[day.isoformat()] = bad / (count + bad) if count + bad else 0.0
    worst = max(rates.values(), default=0.0)
    return CheckOutcome(worst <= limit, f"worst quarantine rate {worst:.4%} (limit {limit:.2%})", rates)


def alert_rate(source: SourceConfig, anomalies: dict[date, pd.DataFrame]) -> CheckOutcome:
    """Share of flagged buckets per day within [min_alert_rate, max_alert_rate]."""
    low, high = source.checks.min_alert_rate, source.checks.max_alert_rate
    rates = {day.isoformat(): len(frame) / source.buckets_per_day for day, frame in sorted(anomalies.items())}
    outside = {day: rate for day, rate in rates.items() if not low <= rate <= high}
    description = f"alert rate per day in [{low:.0%}, {high:.0%}]" + (
        f"; outside on {sorted(outside)}" if outside else ""
    )
    return CheckOutcome(not outside, description, rates)
