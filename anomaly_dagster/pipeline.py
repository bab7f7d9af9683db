"""The stages of one source's chain, as plain functions over a window of days.

Each stage reads its upstream partitions from the warehouse, writes one Parquet partition per
day per output, records them in the catalog with their lineage, and returns what the
orchestrator shows (row counts, previews, plots). ``STAGES`` describes the graph: which assets
each stage writes and which upstream days (offsets) each day of it reads, so the Dagster layer
can declare exactly the dependencies the code uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pandas as pd

from anomaly_dagster import checks, entities, ingest, modeling, plots
from anomaly_dagster.config import SourceConfig, stage_engine
from anomaly_dagster.detectors import load_detectors, save_detectors
from anomaly_dagster.evaluation import (
    evaluation_table,
    labelled_span,
    precision_recall_curve,
    source_labels,
)
from anomaly_dagster.features import build_features
from anomaly_dagster.incidents import merge_incidents
from anomaly_dagster.sql import quote_identifier, quote_literal
from anomaly_dagster.storage import atomic_write_bytes
from anomaly_dagster.warehouse import RunInfo, Warehouse, WrittenPartition

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

MODEL_FILE = "model.npz"


@dataclass(frozen=True)
class Upstream:
    """Day ``D`` of a stage reads days ``D+start_offset .. D+end_offset`` of ``asset``."""

    asset: str
    start_offset: int = 0
    end_offset: int = 0

    def days(self, day: date) -> list[date]:
        return [day + timedelta(days=offset) for offset in range(self.start_offset, self.end_offset + 1)]


@dataclass
class AssetOutput:
    """What one stage wrote for one asset over the window, for metadata and checks."""

    asset: str
    frames: dict[date, pd.DataFrame]
    written: list[WrittenPartition]
    plots: list[Path] = field(default_factory=list)
    summary: dict[str, float | int | str] = field(default_factory=dict)  # figures of the whole run


@dataclass(frozen=True)
class StageContext:
    source: SourceConfig
    warehouse: Warehouse
    landing_dir: Path
    run: RunInfo
    spark: Callable[[], SparkSession] | None = None  # the Spark engine's session, started on first call

    def spark_session(self) -> SparkSession:
        """The session of a Spark-engine stage; imported here so the DuckDB path never loads PySpark."""
        from anomaly_dagster.engines.spark import spark_session

        return (self.spark or spark_session)()


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: tuple[str, ...]
    upstream: Callable[[SourceConfig], tuple[Upstream, ...]]
    run: Callable[[StageContext, list[date]], list[AssetOutput]]
    description: str


def _write(
    context: StageContext,
    asset: str,
    frames: dict[date, pd.DataFrame],
    upstream: list[Upstream],
    also_read: dict[date, list[tuple[str, date]]] | None = None,
) -> AssetOutput:
    """Write each day's frame with its lineage: the ``upstream`` windows, plus any partitions that day
    read beyond them (``also_read``)."""
    written = [
        context.warehouse.write_partition(
            context.source.name,
            asset,
            day,
            frame,
            [
                (dependency.asset, upstream_day)
                for dependency in upstream
                for upstream_day in dependency.days(day)
            ]
            + (also_read or {}).get(day, []),
        )
        for day, frame in sorted(frames.items())
    ]
    return AssetOutput(asset, frames, written)


def _record(context: StageContext, outputs: list[AssetOutput]) -> list[AssetOutput]:
    context.warehouse.record([part for output in outputs for part in output.written], context.run)
    return outputs


# --- ingest: raw_events + quarantine -------------------------------------------------------------


def run_ingest(context: StageContext, days: list[date]) -> list[AssetOutput]:
    if stage_engine(context.source) == "spark":
        from anomaly_dagster.engines.spark import run_ingest_spark

        return run_ingest_spark(context, days, context.spark_session())
    source, warehouse = context.source, context.warehouse
    files = ingest.discover(source, context.landing_dir)
    index = ingest.LandingIndex(warehouse.asset_dir(source.name, "landing_index") / "index.json")
    window = ingest.ingest_landing(source, index, files, days)
    events_written = []
    counts: dict[date, pd.DataFrame] = {}
    for day in days:
        written = warehouse.write_partition_query(
            source.name, "raw_events", day, window.connection, window.events_sql(day)
        )
        events_written.append(written)
        counts[day] = pd.DataFrame({"events": [written.row_count], "files": [len(window.files[day])]})
    window.connection.close()
    raw = AssetOutput("raw_events", counts, events_written)
    quarantine = _write(context, "quarantine", window.quarantine, [])
    for output, name in ((raw, "events_in_run"), (quarantine, "rows_in_run")):
        output.summary[name] = sum(part.row_count for part in output.written)
    return _record(context, [raw, quarantine])


# --- resample ------------------------------------------------------------------------------------


AGGREGATIONS = {
    "count": "count({})",
    "nunique": "count(DISTINCT {})",
    "sum": "sum({})",
    "mean": "avg({})",
    "min": "min({})",
    "max": "max({})",
    "p95": "quantile_cont({}, 0.95)",
}


def _metric_sql(source: SourceConfig) -> tuple[str, str]:
    """The metrics' aggregate expressions, and the same metrics on the grid (counts and sums 0 where
    empty)."""
    metrics = ", ".join(
        AGGREGATIONS[metric.agg].format(quote_identifier(metric.column) if metric.column else "*")
        + f" AS {quote_identifier(metric.name)}"
        for metric in source.metrics
    )
    filled = ", ".join(
        f"coalesce(a.{quote_identifier(metric.name)}, 0) AS {quote_identifier(metric.name)}"
        if metric.zero_when_empty
        else f"a.{quote_identifier(metric.name)}"
        for metric in source.metrics
    )
    return metrics, filled


def resample_sql(source: SourceConfig, event_files: list[str], days: list[date]) -> str:
    """One query: bucket every event of ``days`` and left-join onto the full bucket grid.

    Counts and sums are zero in empty buckets (an outage is a drop to zero, not a missing row); other
    aggregations are NULL there. A ``count`` with a column counts that column's values. With an
    entity column the grid is per entity and day: every entity with events on the day or the day
    before (``event_files`` then include the days before), so an entity that falls silent for a
    whole day shows as a day of empty buckets rather than vanishing.
    """
    if source.entity is not None:
        return _entity_resample_sql(source, event_files, days)
    interval = f"INTERVAL {int(source.bucket_minutes)} MINUTE"
    metrics, filled = _metric_sql(source)
    grid = " UNION ALL ".join(
        f"SELECT unnest(range({quote_literal(day.isoformat())}::TIMESTAMP, "
        f"{quote_literal((day + timedelta(days=1)).isoformat())}::TIMESTAMP, {interval})) AS bucket_start"
        for day in days
    )
    files = "[" + ", ".join(quote_literal(path) for path in event_files) + "]"
    events = (
        f"SELECT time_bucket({interval}, timestamp) AS bucket_start, {metrics} FROM read_parquet({files}) GROUP BY 1"
        if event_files
        else f"SELECT NULL::TIMESTAMP AS bucket_start, {metrics} FROM (SELECT 1) WHERE false"
    )
    return (
        f"WITH grid AS ({grid}), a AS ({events}) "
        f"SELECT g.bucket_start, {filled} FROM grid g LEFT JOIN a USING (bucket_start) ORDER BY g.bucket_start"
    )


def _entity_resample_sql(source: SourceConfig, event_files: list[str], days: list[date]) -> str:
    """:func:`resample_sql` with one grid per entity and day, ordered by entity then bucket."""
    interval = f"INTERVAL {int(source.bucket_minutes)} MINUTE"
    entity = quote_identifier(source.entity, "entity column")
    metrics, filled = _metric_sql(source)
    wanted = "[" + ", ".join(f"{quote_literal(day.isoformat())}::DATE" for day in days) + "]"
    files = "[" + ", ".join(quote_literal(path) for path in event_files) + "]"
    events = (
        f"SELECT * FROM read_parquet({files})"
        if event_files
        else f"SELECT NULL::TIMESTAMP AS timestamp, NULL::VARCHAR AS {entity} FROM (SELECT 1) WHERE false"
    )
    return (
        f"WITH events AS ({events}), "
        f"seen AS (SELECT DISTINCT CAST(timestamp AS DATE) AS day, {entities.entity_sql(source)} AS {entity} "
        "FROM events), "
        f"wanted AS (SELECT unnest({wanted}) AS day), "
        f"grid AS (SELECT DISTINCT s.{entity}, unnest(range(w.day::TIMESTAMP, (w.day + 1)::TIMESTAMP, {interval})) "
        "AS bucket_start FROM wanted w JOIN seen s ON s.day = w.day OR s.day = w.day - 1), "
        f"a AS (SELECT time_bucket({interval}, timestamp) AS bucket_start, {entities.entity_sql(source)} AS {entity}, "
        f"{metrics} FROM events GROUP BY 1, 2) "
        f"SELECT g.bucket_start, g.{entity}, {filled} FROM grid g LEFT JOIN a USING (bucket_start, {entity}) "
        f"ORDER BY g.{entity}, g.bucket_start"
    )


def run_resample(context: StageContext, days: list[date]) -> list[AssetOutput]:
    if stage_engine(context.source) == "spark":
        from anomaly_dagster.engines.spark import run_resample_spark

        return run_resample_spark(context, days, context.spark_session())
    source, warehouse = context.source, context.warehouse
    (upstream,) = _resample_upstream(source)
    read = sorted({day for d in days for day in upstream.days(d)})
    files = [
        str(path)
        for path in (warehouse.partition_file(source.name, "raw_events", day) for day in read)
        if path.exists()
    ]
    with warehouse.reading(), duckdb.connect() as connection:  # no rename mid-read
        table = connection.execute(resample_sql(source, files, days)).df()
    table["bucket_start"] = table["bucket_start"].astype("datetime64[us]")
    for metric in source.metrics:
        if metric.is_count:
            table[metric.name] = table[metric.name].astype("int64")
    frames = {day: part.reset_index(drop=True) for day, part in table.groupby(table["bucket_start"].dt.date)}
    # an entity source may have a day without any entity: an empty partition, not a missing one
    frames = {day: frames.get(day, table.iloc[:0]) for day in days}
    output = _write(context, "resampled", frames, [upstream])
    return _record(context, [output])


def _resample_upstream(source: SourceConfig) -> tuple[Upstream]:
    """Raw events of the day; with entities also the day before, whose entities the grid keeps."""
    return (Upstream("raw_events", -1 if source.entity is not None else 0, 0),)


# --- features ------------------------------------------------------------------------------------


def run_features(context: StageContext, days: list[date]) -> list[AssetOutput]:
    source, warehouse = context.source, context.warehouse
    resampled = warehouse.read_partitions(
        source.name, "resampled", [d - timedelta(days=1) for d in days] + days
    )
    if resampled.empty and source.entity is None:
        raise FileNotFoundError(f"no resampled partitions for {source.name} on {days[0]}..{days[-1]}")
    by_day = {day: frame for day, frame in resampled.groupby(resampled["bucket_start"].dt.date)}
    frames = {}
    for day in days:
        if day not in by_day:
            _require(context, "resampled", day)
        today = by_day.get(day, resampled.iloc[:0])
        window = pd.concat([by_day.get(day - timedelta(days=1), today.iloc[:0]), today])
        frames[day] = entities.per_entity(
            source,
            window,
            lambda _, rows, day=day: build_features(source, day, rows),
            entities.entities_on(source, today) if source.entity is not None else None,
        )
    output = _write(context, "features", frames, [Upstream("resampled", -1, 0)])
    return _record(context, [output])


def _require(context: StageContext, asset: str, day: date) -> None:
    """A clear error when a stage's input partition was never materialized (reading it gives an empty
    frame, which failed later with a KeyError about a column)."""
    if not context.warehouse.partition_file(context.source.name, asset, day).exists():
        raise FileNotFoundError(
            f"{context.source.name}: {asset} partition {day} is missing; materialize it first"
        )


# --- model ---------------------------------------------------------------------------------------


def model_path(warehouse: Warehouse, source: SourceConfig, day: date) -> Path:
    return warehouse.partition_dir(source.name, "model", day) / MODEL_FILE


def run_train(context: StageContext, days: list[date]) -> list[AssetOutput]:
    source, warehouse = context.source, context.warehouse
    # a day whose input is missing (events_present fails) is not learnt as normal by the next models
    short = checks.short_days(source, warehouse.row_counts(source.name, "raw_events"))
    available = [day for day in warehouse.existing_days(source.name, "features") if day not in short]
    labels = source_labels(source, context.landing_dir) if modeling.needs_labels(source) else None
    frames, written, untrained = {}, [], {}
    for day in days:
        window, cold_start = modeling.training_window(source, day, available)
        features = warehouse.read_partitions(source.name, "features", window)
        upstream = [("features", training_day) for training_day in window]
        if source.entity is None:
            model = modeling.train(source, features, window, cold_start, labels)
            save_detectors(model_path(warehouse, source, day), model.detectors, model.manifest())
            frames[day] = modeling.model_summary(source, model)
            training_scores = model.training_scores
            thresholds = {name: threshold.value for name, threshold in model.thresholds.items()}
        else:
            today = features if cold_start else warehouse.read_partitions(source.name, "features", [day])
            models, reasons = _train_entities(source, day, features, today, cold_start, labels)
            untrained[day] = [entity for entity in reasons if entity not in models]
            entities.save_entity_models(
                model_path(warehouse, source, day),
                {e: (m.detectors, m.manifest()) for e, m in models.items()},
            )
            frames[day] = _entity_model_summary(source, models, reasons)
            upstream += [("features", day)] if frames[day]["cold_start"].any() and not cold_start else []
            training_scores, thresholds = _pooled_training_scores(source, models)
        written.append(warehouse.write_partition(source.name, "model", day, frames[day], upstream))
    # the calibration plot of the newest model in the window: what the UI shows for this run
    plot = warehouse.plot_file(source.name, "thresholds", days[0], days[-1])
    title = f"{source.name} model {day}: training scores {window[0]}..{window[-1]}" + (
        " (cold start)" if cold_start else ""
    )
    if source.entity is not None:
        title += f", per {source.entity} as score / threshold"
    atomic_write_bytes(plot, plots.threshold_histogram(training_scores, thresholds, title))
    output = AssetOutput("model", frames, written, [plot])
    output.summary["cold_start_days_in_run"] = sum(
        bool(frame["cold_start"].any()) for frame in frames.values()
    )
    if source.entity is None:
        output.summary["untrained_detectors_in_run"] = sum(
            int((frame["threshold_method"] == modeling.UNTRAINED).sum()) for frame in frames.values()
        )
    else:
        output.summary[f"untrained_{source.entity}_in_run"] = sum(len(day) for day in untrained.values())
    return _record(context, [output])


def _train_entities(
    source: SourceConfig,
    day: date,
    history: pd.DataFrame,
    today: pd.DataFrame,
    cold_start: bool,
    labels: pd.Series | None,
) -> tuple[dict[str, modeling.TrainedModel], dict[str, str]]:
    """One model per entity of ``day``, on that entity's rows of the training window, and why an
    entity was not trained on its history (an entity absent from the models is untrained).

    An entity with no usable earlier rows (new today, back after a silence, or the source's first
    day) is fitted on its own day and marked ``cold_start``, as a new source is. One that cannot be
    fitted even so (a sensor that sent one reading) is left out with its reason instead of failing
    every other entity's model. An entity is modelled whole: a detector that cannot be fitted on its
    window (``untrained`` in a source's model) fails that attempt.
    """
    past = {} if cold_start else dict(entities.split(source, history))
    models, reasons = {}, {}
    for entity, rows in entities.split(source, today):
        earlier = past.get(entity)
        attempts = [(rows, [day], True)]
        if earlier is not None and len(earlier):
            attempts.insert(0, (earlier, sorted(set(pd.DatetimeIndex(earlier["bucket_start"]).date)), False))
        failures = []
        for frame, window, cold in attempts:
            try:
                model = modeling.train(source, frame, window, cold, labels)
            except ValueError as error:
                failures.append(str(error))
                continue
            untrained = [
                t.params["reason"] for t in model.thresholds.values() if t.method == modeling.UNTRAINED
            ]
            if not untrained:
                models[entity] = model
                break
            failures.append("; ".join(untrained))
        if failures:
            reasons[entity] = f"{source.entity}={entity!r} on {day}: {'; then '.join(failures)}"
    return models, reasons


def _entity_model_summary(
    source: SourceConfig, models: dict[str, modeling.TrainedModel], reasons: dict[str, str]
) -> pd.DataFrame:
    """Every entity's detectors, with ``note`` saying why one was not trained on its history; an
    untrained entity has one row per detector with method ``untrained`` and the reason, so that its
    missing scores are explained in the catalog."""
    summaries = [
        entities.with_entity(source, modeling.model_summary(source, model), entity).assign(
            note=reasons.get(entity)
        )
        for entity, model in models.items()
    ]
    for entity, reason in reasons.items():
        if entity in models:
            continue
        rows = [
            {
                "detector": detector.name,
                "kind": detector.kind,
                "threshold_method": modeling.UNTRAINED,
                "threshold": np.nan,
                "threshold_params": json.dumps({"reason": reason}),
                "training_rows": 0,
                "cold_start": False,  # not fitted at all (a cold start is fitted on its own day)
                "note": reason,
            }
            for detector in source.detectors
        ]
        summaries.append(entities.with_entity(source, pd.DataFrame(rows), entity))
    if not summaries:
        return pd.DataFrame({source.entity: pd.Series(dtype=object), "cold_start": pd.Series(dtype=bool)})
    return pd.concat(summaries, ignore_index=True)


def _pooled_training_scores(
    source: SourceConfig, models: dict[str, modeling.TrainedModel]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every entity's training scores over its own threshold, pooled per detector: one histogram
    per detector whose threshold line is 1 for every entity."""
    pooled = {}
    for detector in source.detectors:
        parts = []
        for model in models.values():
            value = model.thresholds[detector.name].value
            parts.append(model.training_scores[detector.name] / value if value > 0 else np.full(1, np.nan))
        pooled[detector.name] = np.concatenate(parts) if parts else np.array([np.nan])
    return pooled, {name: 1.0 for name in pooled}


# --- scores --------------------------------------------------------------------------------------


def _score_upstream(source: SourceConfig) -> tuple[Upstream, Upstream]:
    """The day's features and model; with a shingled forest also the day before's features."""
    history = any(modeling.make_detector(source, d.name).history_rows for d in source.detectors)
    return (Upstream("features", -1 if history else 0, 0), Upstream("model"))


def run_score(context: StageContext, days: list[date]) -> list[AssetOutput]:
    source, warehouse = context.source, context.warehouse
    reads_day_before = _score_upstream(source)[0].start_offset < 0
    frames = {}
    for day in days:
        _require(context, "features", day)
        features = warehouse.read_partitions(source.name, "features", [day])
        # the day before completes a shingled forest's first shingles (empty on the first day)
        before = (
            warehouse.read_partitions(source.name, "features", [day - timedelta(days=1)])
            if reads_day_before
            else features.iloc[:0]
        )
        if source.entity is None:
            detectors, document = load_detectors(model_path(warehouse, source, day))
            thresholds = {name: spec["value"] for name, spec in document["thresholds"].items()}
            modeling.check_model_matches(source, f"the {source.name} model of {day}", list(thresholds))
            frames[day] = modeling.score(source, features, detectors, thresholds, before)
        else:
            models = entities.load_entity_models(model_path(warehouse, source, day))
            for entity, (_, thresholds) in models.items():
                described = f"the {source.name} model of {day} for {source.entity}={entity!r}"
                modeling.check_model_matches(source, described, list(thresholds))
            earlier = dict(entities.split(source, before))
            frames[day] = entities.per_entity(  # an untrained entity has no model, hence no scores
                source,
                features,
                lambda entity, rows, models=models, earlier=earlier: modeling.score(
                    source, rows, *models[entity], earlier.get(entity)
                ),
                [entity for entity in entities.entities_on(source, features) if entity in models],
            )
    output = _write(context, "scores", frames, _score_upstream(source))
    window = f"{days[0]}" if len(days) == 1 else f"{days[0]}..{days[-1]}"
    all_scores = pd.concat(frames.values(), ignore_index=True)
    all_features = warehouse.read_partitions(source.name, "features", days)
    if all_scores.empty:  # an entity source on days when nothing reported: nothing to plot
        return _record(context, [output])
    shown = entities.busiest_entity(source, all_scores)
    if shown is not None:  # one entity per plot: the one with the most flagged buckets
        all_scores = all_scores[all_scores[source.entity] == shown]
        all_features = all_features[all_features[source.entity] == shown]
        window += f" {source.entity}={shown}"
    series = warehouse.plot_file(source.name, "scores", days[0], days[-1])
    atomic_write_bytes(
        series,
        plots.series_plot(all_features, all_scores, source.series_columns, f"{source.name} {window}"),
    )
    lead = source.ensemble_detectors[0]
    attribution = warehouse.plot_file(source.name, "attribution", days[0], days[-1])
    atomic_write_bytes(
        attribution, plots.attribution_plot(all_scores, lead, f"{source.name} {lead} {window}")
    )
    output.plots = [series, attribution]
    return _record(context, [output])


# --- anomalies + incidents -----------------------------------------------------------------------


SAMPLE_EVENTS = 5


def _peak_samples(
    warehouse: Warehouse, source: SourceConfig, incidents: pd.DataFrame, bucket: pd.Timedelta
) -> list[str | None]:
    """A few raw events of each peak bucket (of its entity), with file and line, so a person can
    look at the logs."""
    same_entity = "" if source.entity is None else f"AND {entities.entity_sql(source)} = ? "
    samples: list[str | None] = []
    with warehouse.reading(), duckdb.connect() as connection:
        for _, incident in incidents.iterrows():
            peak = incident["peak_bucket"]
            path = warehouse.partition_file(source.name, "raw_events", peak.date())
            if not path.exists():
                samples.append(None)
                continue
            rows = connection.execute(
                f"SELECT * FROM read_parquet({quote_literal(str(path))}) WHERE timestamp >= ? AND timestamp < ? "
                f"{same_entity}ORDER BY timestamp, source_file, line LIMIT {SAMPLE_EVENTS}",
                [peak.to_pydatetime(), (peak + bucket).to_pydatetime()]
                + ([incident[source.entity]] if source.entity is not None else []),
            ).df()
            samples.append(rows.to_json(orient="records", date_format="iso"))
    return samples


def _flagged_days_before(
    warehouse: Warehouse, source: SourceConfig, day: date, anomalies: dict[date, pd.DataFrame]
) -> dict[date, pd.DataFrame]:
    """The flagged buckets (from this run, else the warehouse) of the days an incident running on over
    midnight into ``day`` may have started on: the day before, and further back for as long as one
    incident covers the whole day (a sensor stuck for days is one incident)."""
    frames, earlier = {}, day
    while True:
        earlier -= timedelta(days=1)
        if earlier in anomalies:
            frame = anomalies[earlier]
        elif warehouse.partition_file(source.name, "anomalies", earlier).exists():
            frame = warehouse.read_partitions(source.name, "anomalies", [earlier])
        else:
            break
        frames[earlier] = frame
        if not _flagged_all_day(source, frame, earlier):
            break
    return dict(sorted(frames.items()))


def _flagged_all_day(source: SourceConfig, flagged: pd.DataFrame, day: date) -> bool:
    """Whether one incident covers the whole of ``day`` (for some entity): its flags start and end the
    day and no gap between them is longer than ``incident_gap_buckets``. Only then can an incident
    running into the next day have started before it."""
    bucket = pd.Timedelta(minutes=source.bucket_minutes)
    step = bucket * (source.incident_gap_buckets + 1)
    bounds = pd.DatetimeIndex([pd.Timestamp(day) - bucket, pd.Timestamp(day) + pd.Timedelta(days=1)])
    for _, rows in entities.split(source, flagged):
        times = pd.DatetimeIndex(rows["bucket_start"]).append(bounds).sort_values()
        if len(rows) and (times[1:] - times[:-1]).max() <= step:
            return True
    return False


def run_detect(context: StageContext, days: list[date]) -> list[AssetOutput]:
    source, warehouse = context.source, context.warehouse
    anomalies, incidents = {}, {}
    older: dict[date, list[tuple[str, date]]] = {}  # what an incident of over a day read before D-1
    bucket = pd.Timedelta(minutes=source.bucket_minutes)
    for day in days:
        for asset in ("scores", "features"):
            _require(context, asset, day)
        scores = warehouse.read_partitions(source.name, "scores", [day])
        features = dict(entities.split(source, warehouse.read_partitions(source.name, "features", [day])))
        anomalies[day] = entities.per_entity(
            source,
            scores,
            lambda entity, rows, features=features: modeling.anomalies_from_scores(
                rows, features[entity], source.series_columns
            ),
        )
        # an incident running on over midnight is merged with the flags of the days it started on: the
        # day's row has its true start, duration and peak, and says it continues the one reported before
        before = _flagged_days_before(warehouse, source, day, anomalies)
        older[day] = [("anomalies", earlier) for earlier in before if earlier < day - timedelta(days=1)]
        before_flags = [frame for frame in before.values() if not frame.empty]
        flagged = pd.concat([*before_flags, anomalies[day]]) if before_flags else anomalies[day]
        found = entities.per_entity(  # incidents never span two entities
            source,
            flagged.reset_index(drop=True),
            lambda _, rows: merge_incidents(rows, bucket, source.incident_gap_buckets, source.series_columns),
            sorted(features) if source.entity is not None else None,
        )
        if "end" in found:  # (a day without any entity has no incident columns)
            found = found[found["end"] >= pd.Timestamp(day)].reset_index(drop=True)
        found["continued"] = found["start"] < pd.Timestamp(day) if "start" in found else pd.Series(dtype=bool)
        found["sample_events"] = _peak_samples(warehouse, source, found, bucket)
        peaks = pd.DatetimeIndex(found["peak_bucket"]) if "peak_bucket" in found else pd.DatetimeIndex([])
        older[day] += [
            ("raw_events", peak) for peak in sorted(set(peaks.date)) if peak < day - timedelta(days=1)
        ]
        incidents[day] = found
    incidents_reads = [Upstream("anomalies", -1, 0), Upstream("raw_events", -1, 0)]
    outputs = [
        _write(context, "anomalies", anomalies, [Upstream("scores"), Upstream("features")]),
        _write(context, "incidents", incidents, incidents_reads, older),
    ]
    outputs[0].summary["flagged_buckets_in_run"] = sum(len(frame) for frame in anomalies.values())
    outputs[1].summary["incidents_in_run"] = sum(len(frame) for frame in incidents.values())
    return _record(context, outputs)


# --- evaluation (not partitioned: all scored days against the labels) ----------------------------


def run_evaluation(context: StageContext) -> AssetOutput | None:
    """Every detector and the ensemble against the source's labels, over all scored days.

    Stored as a snapshot under the last scored day (``evaluation/date=<last day>``): the
    evaluation as of that day. Returns None when the source has no labels file.
    """
    source, warehouse = context.source, context.warehouse
    labels = source_labels(source, context.landing_dir)
    days = warehouse.existing_days(source.name, "scores")
    if labels is None or not days:
        return None
    scores = warehouse.read_partitions(source.name, "scores", days)
    features = warehouse.read_partitions(source.name, "features", days)
    if source.entity is not None:
        # labels name buckets, not entities: a bucket is flagged when any entity's is; the series
        # plot shows the entity with the most flagged buckets
        shown = entities.busiest_entity(source, scores)
        features = features[features[source.entity] == shown]
        scores = scores.groupby(["bucket_start", "detector"], as_index=False).agg(
            is_anomaly=("is_anomaly", "any"), normalized=("normalized", "max")
        )
    scores = scores[labelled_span(pd.DatetimeIndex(scores["bucket_start"]), labels)]  # not past a 0/1 line
    table = evaluation_table(scores, labels, source.bucket_minutes, source.incident_gap_buckets)
    truth = labels.reindex(pd.DatetimeIndex(scores["bucket_start"]), fill_value=False).to_numpy()
    curves = {
        name: precision_recall_curve(frame["normalized"].to_numpy(), truth[frame.index])
        for name, frame in scores.reset_index(drop=True).groupby("detector")
    }
    ensemble = scores[scores["detector"] == modeling.ENSEMBLE].sort_values("bucket_start")
    lead_detector = next(d for d in source.detectors if d.name == source.ensemble_detectors[0])
    lead = next((f for f in lead_detector.features if f in source.series_columns), source.series_columns[0])
    series = pd.DataFrame(
        {
            "bucket_start": ensemble["bucket_start"].to_numpy(),
            "value": features.set_index("bucket_start")[lead].reindex(ensemble["bucket_start"]).to_numpy(),
            "label": labels.reindex(pd.DatetimeIndex(ensemble["bucket_start"]), fill_value=False).to_numpy(),
            "flagged": ensemble["is_anomaly"].to_numpy(),
        }
    )
    series.attrs["name"] = lead
    plot = warehouse.plot_file(source.name, "evaluation", days[0], days[-1])
    atomic_write_bytes(plot, plots.evaluation_plot(curves, series, f"{source.name} {days[0]}..{days[-1]}"))
    written = warehouse.write_partition(
        source.name, "evaluation", days[-1], table, [("scores", d) for d in days]
    )
    output = AssetOutput("evaluation", {days[-1]: table}, [written], [plot])
    output.summary.update(
        {
            f"{row.detector}_{metric}": float(getattr(row, metric))
            for row in table.itertuples()
            for metric in ("f1", "event_f1")
        }
        | {"days": len(days)}
    )
    _record(context, [output])
    return output


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest", ("raw_events", "quarantine"), lambda s: (), run_ingest, "Landing files → typed UTC events."
    ),
    Stage(
        "resample",
        ("resampled",),
        _resample_upstream,
        run_resample,
        "Events → one row per bucket, empty buckets as zeros.",
    ),
    Stage(
        "features",
        ("features",),
        lambda s: (Upstream("resampled", -1, 0),),
        run_features,
        "Derived columns, time-of-day encodings, lags.",
    ),
    Stage(
        "train",
        ("model",),
        lambda s: (Upstream("features", -s.training_days, -1),),  # and day D itself on a cold start
        run_train,
        "Walk-forward detectors and thresholds.",
    ),
    Stage(
        "score",
        ("scores",),
        _score_upstream,
        run_score,
        "Per bucket and detector: score, threshold, flag, attribution.",
    ),
    Stage(
        "detect",
        ("anomalies", "incidents"),
        lambda s: (Upstream("scores"), Upstream("features"), Upstream("raw_events")),
        run_detect,
        "Flagged buckets and merged incidents.",
    ),
)

ASSET_DESCRIPTIONS = {
    "raw_events": "The day's events from every landing file, typed and in UTC.",
    "quarantine": "Rows and files that could not be ingested, with file, line and reason.",
    "resampled": "One row per bucket of the day; counts and sums are zero in empty buckets.",
    "features": "Model inputs: metrics, derived columns, time-of-day encodings and lags.",
    "model": "Detectors trained walk-forward on the days before, with calibrated thresholds.",
    "scores": "Per bucket and detector: score, threshold, flag, attribution, expected value.",
    "anomalies": "One row per flagged bucket with the detectors that fired.",
    "incidents": "Consecutive flagged buckets merged: start, end, peak, top feature and direction; one "
    "running on from the day before starts there and is marked continued.",
    "evaluation": "Each detector and the ensemble against the labels: precision, recall, F1, incidents.",
}


def run_window(context: StageContext, days: list[date]) -> dict[str, AssetOutput]:
    """Every stage in order over ``days`` (the CLI and tests; Dagster runs stages as assets)."""
    outputs: dict[str, AssetOutput] = {}
    for stage in STAGES:
        for output in stage.run(context, days):
            outputs[output.asset] = output
    return outputs
