"""The ``stream_vs_batch`` asset check: a day's streamed answers against its batch ``scores``.

Partitioned like ``scores``: it runs with each materialization of a day (or a range, in one run)
and can be run alone for any day from the UI. The comparison is ``checks.stream_batch_agreement``.
"""

import warnings
from datetime import date

import dagster as dg

from anomaly_dagster import checks
from anomaly_dagster.config import SourceConfig
from anomaly_dagster.sql import parse_day
from anomaly_dagster.streaming import SCORES_ASSET
from assets.factory import daily_partitions
from resources.warehouse import WarehouseResource

CHECK_NAME = "stream_vs_batch"

# Partitioned asset checks are how a check follows its asset's days; Dagster still labels them
# preview, which would print on every load.
warnings.filterwarnings(
    "ignore", message=r".*partitions_def on an AssetCheckSpec.*", category=dg.PreviewWarning
)


def stream_vs_batch_check(source: SourceConfig) -> dg.AssetChecksDefinition:
    """Fails (a warning) when a day's stream flags agree with batch on fewer than
    ``checks.min_stream_agreement`` of the buckets both scored."""

    @dg.asset_check(
        asset=dg.AssetKey([source.name, "scores"]),
        name=CHECK_NAME,
        description=(
            f"{source.name}.stream_scores flags agree with the batch ensemble on at least "
            f"{source.checks.min_stream_agreement:.0%} of the day's buckets (skipped without stream rows)."
        ),
        partitions_def=daily_partitions(source),
    )
    def _check(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource) -> dg.AssetCheckResult:
        days: list[date] = sorted(parse_day(key) for key in context.partition_keys)
        store = warehouse.open()
        outcome = checks.stream_batch_agreement(
            source,
            store.read_partitions(source.name, SCORES_ASSET, days),
            store.read_partitions(source.name, "scores", days),
            store.read_partitions(source.name, "resampled", days),
        )
        return dg.AssetCheckResult(
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=outcome.description,
            metadata={
                **outcome.totals,
                "min_stream_agreement": source.checks.min_stream_agreement,
                "agreement_per_day": dg.MetadataValue.json(outcome.per_day),
            },
        )

    return _check
