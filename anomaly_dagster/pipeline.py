"""The stages of one source's chain, as plain functions over a window of days.

Each stage reads its upstream partitions from the warehouse, writes one Parquet partition per
day per output, records them in the catalog with their lineage, and returns what the
orchestrator shows (row counts, previews, plots). ``STAGES`` describes the graph: which assets
each stage writes and which upstream days (offsets) each day of it reads, so the Dagster layer
can declare exactly the dependencies the code uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pandas as pd

from anomaly_dagster import ingest, modeling, plots
from anomaly_dagster.config import SourceConfig, stage_engine
from anomaly_dagster.detectors import load_detectors, save_detectors
from anomaly_dagster.evaluation import evaluation_table, precision_recall_curve, source_labels
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
    summary: dict[str, float | int | str] = field(default_factory=dict)


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
    context: StageContext, asset: str, frames: dict[date, pd.DataFrame], upstream: list[Upstream]
) -> AssetOutput:
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
            ],
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
    window = ingest.ingest_window(source, index.refresh(source, files), days)
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
    for output, name in ((raw, "events"), (quarantine, "rows")):
        output.summary[name] = sum(part.row_count for part in output.written)
    return _record(context, [raw, quarantine])


# --- resample ------------------------------------------------------------------------------------


def resample_sql(source: SourceConfig, event_files: list[str], days: list[date]) -> str:
    """One query: bucket every event of ``days`` and left-join onto the full bucket grid.

    Counts are zero in empty buckets (an outage is a drop to zero, not a missing row); other
    aggregations are NULL there.
    """
    aggregations = {
        "count": lambda column: "count(*)",
        "nunique": lambda column: f"count(DISTINCT {column})",
        "sum": lambda column: f"sum({column})",
        "mean": lambda column: f"avg({column})",
        "min": lambda column: f"min({column})",
        "max": lambda column: f"max({column})",
        "p95": lambda column: f"quantile_cont({column}, 0.95)",
    }
    interval = f"INTERVAL {int(source.bucket_minutes)} MINUTE"
    metrics = ", ".join(
        f"{aggregations[metric.agg](quote_identifier(metric.column) if metric.column else '')} "
        f"AS {quote_identifier(metric.name)}"
        for metric in source.metrics
    )
    filled = ", ".join(
        f"coalesce(a.{quote_identifier(metric.name)}, 0) AS {quote_identifier(metric.name)}"
        if metric.is_count
        else f"a.{quote_identifier(metric.name)}"
        for metric in source.metrics
    )
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


def run_resample(context: StageContext, days: list[date]) -> list[AssetOutput]:
    if stage_engine(context.source) == "spark":
        from anomaly_dagster.engines.spark import run_resample_spark

        return run_resample_spark(context, days, context.spark_session())
    source, warehouse = context.source, context.warehouse
    files = [
        str(path)
        for path in (warehouse.partition_file(source.name, "raw_events", day) for day in days)
        if path.exists()
    ]
    with warehouse.reading(), duckdb.connect() as connection:  # no rename mid-read
        table = connection.execute(resample_sql(source, files, days)).df()
    table["bucket_start"] = table["bucket_start"].astype("datetime64[us]")
    for metric in source.metrics:
        if metric.is_count:
            table[metric.name] = table[metric.name].astype("int64")
    frames = {day: part.reset_index(drop=True) for day, part in table.groupby(table["bucket_start"].dt.date)}
    output = _write(context, "resampled", frames, [Upstream("raw_events")])
    return _record(context, [output])


# --- features ------------------------------------------------------------------------------------


def run_features(context: StageContext, days: list[date]) -> list[AssetOutput]:
    source, warehouse = context.source, context.warehouse
    resampled = warehouse.read_partitions(
        source.name, "resampled", [d - timedelta(days=1) for d in days] + days
    )
    if resampled.empty:
        raise FileNotFoundError(f"no resampled partitions for {source.name} on {days[0]}..{days[-1]}")
    by_day = {day: frame for day, frame in resampled.groupby(resampled["bucket_start"].dt.date)}
    frames = {}
    for day in days:
        if day not in by_day:
            raise FileNotFoundError(
                f"{source.name}: resampled partition {day} is missing; materialize it first"
            )
        window = pd.concat([by_day.get(day - timedelta(days=1), by_day[day].iloc[:0]), by_day[day]])
        frames[day] = build_features(source, day, window)
    output = _write(context, "features", frames, [Upstream("resampled", -1, 0)])
    return _record(context, [output])


# --- model ---------------------------------------------------------------------------------------


def model_path(warehouse: Warehouse, source: SourceConfig, day: date) -> Path:
    return warehouse.partition_dir(source.name, "model", day) / MODEL_FILE


def run_train(context: StageContext, days: list[date]) -> list[AssetOutput]:
    source, warehouse = context.source, context.warehouse
    available = warehouse.existing_days(source.name, "features")
    labels = source_labels(source, context.landing_dir) if modeling.needs_labels(source) else None
    frames, written = {}, []
    for day in days:
        window, cold_start = modeling.training_window(source, day, available)
        features = warehouse.read_partitions(source.name, "features", window)
        model = modeling.train(source, features, window, cold_start, labels)
        save_detectors(model_path(warehouse, source, day), model.detectors, model.manifest())
        frames[day] = modeling.model_summary(source, model)
        upstream = [("features", training_day) for training_day in window]
        written.append(warehouse.write_partition(source.name, "model", day, frames[day], upstream))
    # the calibration plot of the newest model in the window: what the UI shows for this run
    plot = warehouse.plot_file(source.name, "thresholds", days[0], days[-1])
    title = f"{source.name} model {day}: training scores {window[0]}..{window[-1]}" + (
        " (cold start)" if cold_start else ""
    )
    thresholds = {name: threshold.value for name, threshold in model.thresholds.items()}
    atomic_write_bytes(plot, plots.threshold_histogram(model.training_scores, thresholds, title))
    output = AssetOutput("model", frames, written, [plot])
    output.summary["cold_start_days"] = sum(bool(frame["cold_start"].iloc[0]) for frame in frames.values())
    return _record(context, [output])


# --- scores --------------------------------------------------------------------------------------


def run_score(context: StageContext, days: list[date]) -> list[AssetOutput]:
    source, warehouse = context.source, context.warehouse
    frames = {}
    for day in days:
        features = warehouse.read_partitions(source.name, "features", [day])
        detectors, document = load_detectors(model_path(warehouse, source, day))
        thresholds = {name: spec["value"] for name, spec in document["thresholds"].items()}
        frames[day] = modeling.score(source, features, detectors, thresholds)
    output = _write(context, "scores", frames, [Upstream("features"), Upstream("model")])
    window = f"{days[0]}" if len(days) == 1 else f"{days[0]}..{days[-1]}"
    all_scores = pd.concat(frames.values(), ignore_index=True)
    series = warehouse.plot_file(source.name, "scores", days[0], days[-1])
    atomic_write_bytes(
        series,
        plots.series_plot(
            warehouse.read_partitions(source.name, "features", days),
            all_scores,
            source.series_columns,
            f"{source.name} {window}",
        ),
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
    warehouse: Warehouse, source: SourceConfig, day: date, peaks: pd.Series, bucket: pd.Timedelta
) -> list[str | None]:
    """A few raw events of each peak bucket (with file and line), so a person can look at the logs."""
    path = warehouse.partition_file(source.name, "raw_events", day)
    if not path.exists() or peaks.empty:
        return [None] * len(peaks)
    samples = []
    with warehouse.reading(), duckdb.connect() as connection:
        for peak in peaks:
            rows = connection.execute(
                f"SELECT * FROM read_parquet({quote_literal(str(path))}) WHERE timestamp >= ? AND timestamp < ? "
                f"ORDER BY timestamp, source_file, line LIMIT {SAMPLE_EVENTS}",
                [peak.to_pydatetime(), (peak + bucket).to_pydatetime()],
            ).df()
            samples.append(rows.to_json(orient="records", date_format="iso"))
    return samples


def run_detect(context: StageContext, days: list[date]) -> list[AssetOutput]:
    source, warehouse = context.source, context.warehouse
    anomalies, incidents = {}, {}
    bucket = pd.Timedelta(minutes=source.bucket_minutes)
    for day in days:
        scores = warehouse.read_partitions(source.name, "scores", [day])
        features = warehouse.read_partitions(source.name, "features", [day])
        anomalies[day] = modeling.anomalies_from_scores(scores, features, source.series_columns)
        found = merge_incidents(anomalies[day], bucket, source.incident_gap_buckets, source.series_columns)
        found["sample_events"] = _peak_samples(warehouse, source, day, found["peak_bucket"], bucket)
        incidents[day] = found
    outputs = [
        _write(context, "anomalies", anomalies, [Upstream("scores"), Upstream("features")]),
        _write(context, "incidents", incidents, [Upstream("anomalies"), Upstream("raw_events")]),
    ]
    outputs[0].summary["flagged_buckets"] = sum(len(frame) for frame in anomalies.values())
    outputs[1].summary["incidents"] = sum(len(frame) for frame in incidents.values())
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
    table = evaluation_table(scores, labels, source.bucket_minutes)
    truth = labels.reindex(pd.DatetimeIndex(scores["bucket_start"]), fill_value=False).to_numpy()
    curves = {
        name: precision_recall_curve(frame["normalized"].to_numpy(), truth[frame.index])
        for name, frame in scores.reset_index(drop=True).groupby("detector")
    }
    ensemble = scores[scores["detector"] == modeling.ENSEMBLE].sort_values("bucket_start")
    features = warehouse.read_partitions(source.name, "features", days)
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
        {f"{row.detector}_f1": float(row.f1) for row in table.itertuples()} | {"days": len(days)}
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
        lambda s: (Upstream("raw_events"),),
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
        lambda s: (Upstream("features", -s.training_days, 0),),
        run_train,
        "Walk-forward detectors and thresholds.",
    ),
    Stage(
        "score",
        ("scores",),
        lambda s: (Upstream("features"), Upstream("model")),
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
    "resampled": "One row per bucket of the day; counts are zero in empty buckets.",
    "features": "Model inputs: metrics, derived columns, time-of-day encodings and lags.",
    "model": "Detectors trained walk-forward on the days before, with calibrated thresholds.",
    "scores": "Per bucket and detector: score, threshold, flag, attribution, expected value.",
    "anomalies": "One row per flagged bucket with the detectors that fired.",
    "incidents": "Consecutive flagged buckets merged: start, end, peak, top feature and direction.",
    "evaluation": "Each detector and the ensemble against the labels: precision, recall, F1, incidents.",
}


def run_window(context: StageContext, days: list[date]) -> dict[str, AssetOutput]:
    """Every stage in order over ``days`` (the CLI and tests; Dagster runs stages as assets)."""
    outputs: dict[str, AssetOutput] = {}
    for stage in STAGES:
        for output in stage.run(context, days):
            outputs[output.asset] = output
    return outputs
