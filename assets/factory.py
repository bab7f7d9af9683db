"""One asset chain per configured source, generated from the library's stage table.

Each stage becomes a multi-asset (ingest writes ``raw_events`` and ``quarantine``; detect writes
``anomalies`` and ``incidents``) with daily partitions and a single-run backfill policy: a
backfill over a range is one run in which each stage processes every day of the range.
"""

import base64
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import dagster as dg

from anomaly_dagster import __version__, checks, plots
from anomaly_dagster.config import SourceConfig, stage_engine
from anomaly_dagster.evaluation import labels_path
from anomaly_dagster.pipeline import (
    ASSET_DESCRIPTIONS,
    STAGES,
    AssetOutput,
    Stage,
    StageContext,
    Upstream,
    run_evaluation,
)
from anomaly_dagster.sql import parse_day
from anomaly_dagster.warehouse import RunInfo, Warehouse
from resources.spark import SparkResource
from resources.warehouse import WarehouseResource

PREVIEW_ROWS = 8
ENGINE_STAGES = ("ingest", "resample")
CHECKS: dict[str, tuple[str, str]] = {
    # asset: (check name, description)
    "raw_events": (
        "events_present",
        "Every day has at least checks.min_events_per_day events and checks.min_events_share of the "
        "median day before it.",
    ),
    "resampled": ("complete_buckets", "Every day has its full bucket grid: no gaps, no duplicates."),
    "quarantine": ("quarantine_rate", "Quarantined rows per day stay under checks.max_quarantine_rate."),
    "anomalies": ("alert_rate", "Flagged buckets per day stay within the configured alert-rate bounds."),
}


def daily_partitions(source: SourceConfig) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=source.start_date.isoformat())


# what a day reads beyond its stage's fixed windows, for the same notes
EXTRA_READS = {
    "model": "features D (a cold start: no earlier day, or a new entity)",
    "incidents": "anomalies D-1 and any earlier day an incident runs on through, raw_events of each peak's day",
}


def _earlier_days_note(upstreams: tuple[Upstream, ...], asset: str) -> str:
    """Say in the UI which earlier days a day also reads: Dagster's graph declares only the same day.

    Declaring the offsets (``TimeWindowPartitionMapping``) makes Dagster widen a range launched from
    the asset graph's *Materialize all* dialog downstream (resampled D feeds features D+1, features D
    feeds the models of D+1..D+7), so the run asks for days whose own inputs were never ingested and
    fails. Same-day dependencies keep a range a range; the exact upstream days of every partition are
    still recorded, with their checksums, in ``meta.lineage``.
    """
    notes = [
        f"{upstream.asset} D{upstream.start_offset:+d}..D{upstream.end_offset:+d}"
        for upstream in upstreams
        if (upstream.start_offset, upstream.end_offset) != (0, 0)
    ] + ([EXTRA_READS[asset]] if asset in EXTRA_READS else [])
    return f" Day D reads {', '.join(notes)} (exact days in meta.lineage)." if notes else ""


def _png_markdown(path: Path) -> dg.MetadataValue:
    encoded = base64.b64encode(plots.compact_png(path.read_bytes())).decode()
    return dg.MetadataValue.md(f"![{path.stem}](data:image/png;base64,{encoded})")


def _metadata(output: AssetOutput) -> dict[str, object]:
    """A run's metadata. Dagster puts a ranged run's metadata on every day of the range, so the
    row count is only given for a one-day run; ``rows_per_day`` has every day's."""
    rows = {part.day.isoformat(): part.row_count for part in output.written}
    metadata: dict[str, object] = {
        "rows_per_day": dg.MetadataValue.json(rows),
        "path": dg.MetadataValue.path(str(output.written[-1].path.parent.parent)) if output.written else "",
        **output.summary,
    }
    if len(rows) == 1:
        metadata["dagster/row_count"] = sum(rows.values())
    else:
        metadata["days_in_run"] = len(rows)
    if output.frames:
        last_day = max(output.frames)
        preview = output.frames[last_day].head(PREVIEW_ROWS)
        table = preview.to_markdown(index=False) if len(preview) else "(no rows)"
        metadata["preview"] = dg.MetadataValue.md(f"**{last_day}**\n\n{table}")
    for plot in output.plots:  # plots/<name>/<window>.png
        metadata[f"plot_{plot.parent.name}"] = _png_markdown(plot)
        metadata[f"plot_{plot.parent.name}_path"] = dg.MetadataValue.path(str(plot))
    return metadata


def _check_results(
    source: SourceConfig, outputs: dict[str, AssetOutput], warehouse: Warehouse
) -> Iterator[dg.AssetCheckResult]:
    ingested = outputs.get("raw_events")
    events = {part.day: part.row_count for part in ingested.written} if ingested is not None else {}
    for asset, output in outputs.items():
        if asset not in CHECKS:
            continue
        if asset == "raw_events":
            outcome = checks.events_present(source, events, warehouse.row_counts(source.name, "raw_events"))
            severity = dg.AssetCheckSeverity.ERROR
        elif asset == "resampled":
            outcome = checks.complete_buckets(source, output.frames)
            severity = dg.AssetCheckSeverity.ERROR
        elif asset == "quarantine":
            outcome = checks.quarantine_rate(source, events, output.frames)
            severity = dg.AssetCheckSeverity.ERROR
        else:
            outcome = checks.alert_rate(source, output.frames)
            severity = dg.AssetCheckSeverity.WARN
        yield dg.AssetCheckResult(
            asset_key=dg.AssetKey([source.name, asset]),
            check_name=CHECKS[asset][0],
            passed=outcome.passed,
            severity=severity,
            description=outcome.description,
            metadata={"per_day": dg.MetadataValue.json(outcome.per_day)},
        )


def _engine_kind(source: SourceConfig, stage: Stage) -> str:
    """What the UI shows a stage running on: ingest and resample follow the source's engine."""
    return stage_engine(source) if stage.name in ENGINE_STAGES else "duckdb"


def _stage_asset(
    source: SourceConfig, stage: Stage, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    upstreams = stage.upstream(source)
    deps = [dg.AssetKey([source.name, upstream.asset]) for upstream in upstreams]
    specs = [
        dg.AssetSpec(
            key=[source.name, asset],
            deps=deps,
            description=ASSET_DESCRIPTIONS[asset] + _earlier_days_note(upstreams, asset),
            group_name=source.name,
            kinds={_engine_kind(source, stage), "parquet"},
            code_version=__version__,
        )
        for asset in stage.outputs
    ]
    check_specs = [
        dg.AssetCheckSpec(
            CHECKS[asset][0], asset=dg.AssetKey([source.name, asset]), description=CHECKS[asset][1]
        )
        for asset in stage.outputs
        if asset in CHECKS
    ]

    @dg.multi_asset(
        name=f"{source.name}__{stage.name}",
        specs=specs,
        check_specs=check_specs,
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        description=stage.description,
    )
    def _materialize(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource, spark: SparkResource
    ) -> Iterator:
        days: list[date] = sorted(parse_day(key) for key in context.partition_keys)
        stage_context = StageContext(
            source,
            warehouse.open(),
            warehouse.landing_path,
            RunInfo(context.run.run_id, __version__),
            spark=lambda: spark.spark_session,  # lazy: only a Spark-engine stage starts the JVM
        )
        context.log.info(f"{source.name} {stage.name}: {days[0]}..{days[-1]} ({len(days)} day(s))")
        outputs = {output.asset: output for output in stage.run(stage_context, days)}
        for asset, output in outputs.items():
            yield dg.MaterializeResult(
                asset_key=dg.AssetKey([source.name, asset]), metadata=_metadata(output)
            )
        yield from _check_results(source, outputs, stage_context.warehouse)

    return _materialize


def _evaluation_asset(source: SourceConfig) -> dg.AssetsDefinition:
    """Not partitioned: every scored day against the labels, refreshed on demand."""

    @dg.asset(
        key=[source.name, "evaluation"],
        deps=[dg.AssetKey([source.name, "scores"])],
        description=ASSET_DESCRIPTIONS["evaluation"],
        group_name=source.name,
        kinds={"duckdb", "parquet"},
        code_version=__version__,
    )
    def _evaluation(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        stage_context = StageContext(
            source, warehouse.open(), warehouse.landing_path, RunInfo(context.run.run_id, __version__)
        )
        output = run_evaluation(stage_context)
        if output is None:
            labels = labels_path(source, warehouse.landing_path)  # configured: this asset exists
            why = f"no labels file at {labels}" if not labels.exists() else "no scores partitions yet"
            return dg.MaterializeResult(metadata={"note": f"nothing to evaluate: {why}"})
        return dg.MaterializeResult(metadata=_metadata(output))

    return _evaluation


def build_source_assets(source: SourceConfig) -> list[dg.AssetsDefinition]:
    """The whole chain of one source, keyed ``[<source>, <asset>]``, plus its evaluation where labelled."""
    partitions = daily_partitions(source)
    chain = [_stage_asset(source, stage, partitions) for stage in STAGES]
    return chain + ([_evaluation_asset(source)] if source.labels is not None else [])
