"""Source configuration: one YAML file per log source, validated with clear messages.

A source says where its raw files are, how to parse them, which metrics to aggregate per
bucket, which derived columns to compute, and which detectors to train. Every name that can
reach SQL is checked against a strict identifier pattern here, at load time.
"""

from __future__ import annotations

import ast
import inspect
import os
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anomaly_dagster.sql import validate_identifier

PACKAGE_SOURCES_DIR = Path(__file__).parent / "sources"
DEFAULT_LANDING_DIR = "data/landing"
DEFAULT_WAREHOUSE_DIR = "data/warehouse"

Identifier = Annotated[str, Field(min_length=1)]


class ConfigError(ValueError):
    """A source configuration that cannot be used, with the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _strptime_problem(fmt: str) -> str | None:
    """DuckDB's complaint about ``fmt``, if any (its own frame, so no connection outlives the check)."""
    import duckdb

    try:
        with duckdb.connect() as connection:
            connection.execute("SELECT try_strptime('2000-01-01', ?)", [fmt])
    except duckdb.Error as error:
        return str(error)
    return None


class TimestampConfig(_Strict):
    column: Identifier = "timestamp"
    format: str = "%Y-%m-%d %H:%M:%S"
    timezone: str = "UTC"

    @field_validator("column")
    @classmethod
    def _column(cls, value: str) -> str:
        return validate_identifier(value, "timestamp column")

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        """Checked by DuckDB's strptime, which ingest uses: a typo failed every run instead of the load."""
        problem = _strptime_problem(value)
        if problem:
            raise ValueError(f"timestamp format {value!r} is not a strptime format: {problem}")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as UTC or Europe/Berlin)"
            ) from None
        return value


class ColumnConfig(_Strict):
    name: Identifier
    type: Literal["string", "number"] = "string"
    required: bool = True
    min_value: float | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_identifier(value, "column name")


class MetricConfig(_Strict):
    name: Identifier
    agg: Literal["count", "nunique", "sum", "mean", "min", "max", "p95"]
    column: Identifier | None = None

    @field_validator("name", "column")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        return None if value is None else validate_identifier(value, "metric or column name")

    @model_validator(mode="after")
    def _column_needed(self) -> MetricConfig:
        if self.agg != "count" and self.column is None:
            raise ValueError(f"metric {self.name!r}: aggregation {self.agg!r} needs a 'column'")
        return self

    @property
    def is_count(self) -> bool:
        """Counts are whole numbers."""
        return self.agg in ("count", "nunique")

    @property
    def zero_when_empty(self) -> bool:
        """Counts and sums are 0 over no values (an outage is a drop to zero); a mean, minimum, maximum
        or percentile of nothing is undefined (missing)."""
        return self.is_count or self.agg == "sum"


class DerivedConfig(_Strict):
    name: Identifier
    expression: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_identifier(value, "derived column name")


class DetectorConfig(_Strict):
    name: Identifier
    kind: str
    features: list[Identifier] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    # this detector's own calibration (e.g. a fixed 6 for a z-score, already in sd units); None:
    # the source's ``threshold``
    threshold: ThresholdConfig | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_identifier(value, "detector name")

    @model_validator(mode="after")
    def _known(self) -> DetectorConfig:
        """The kind, its parameter names and their values are checked when the file loads, not after a
        day's ingest (a bad value failed the code location's import, naming neither file nor detector)."""
        from anomaly_dagster.detectors import detector_class  # the detectors load NumPy, numba, ...

        cls = detector_class(self.kind)
        accepted = set(inspect.signature(cls).parameters) - {"features"}
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise ValueError(
                f"{self.kind} detector has no parameter(s) {unknown}; it takes {sorted(accepted)}"
            )
        try:
            cls(self.features, **self.params)
        except (TypeError, ValueError, ArithmeticError) as error:  # e.g. num_trees: .inf overflows int
            raise ValueError(f"detector {self.name!r} ({self.kind}): {error}") from None
        return self


class ThresholdConfig(_Strict):
    """How a detector's threshold is calibrated on its training-window scores.

    ``sigma``: mean + k sd. ``quantile``: that quantile. ``fixed``: ``value``. ``pot``: peaks over
    threshold (a generalized Pareto tail fitted above ``initial_quantile``, threshold at tail
    probability ``risk``). ``best_f1``: the score cut with the best F1 against the labels that fall
    inside the training window (falls back to ``sigma`` when there are none).
    """

    method: Literal["sigma", "quantile", "fixed", "pot", "best_f1"] = "sigma"
    k: float = Field(3.0, gt=0)
    quantile: float = 0.99
    value: float | None = None
    risk: float = Field(1e-3, gt=0.0, lt=1.0)
    initial_quantile: float = Field(0.98, gt=0.5, lt=1.0)

    @model_validator(mode="after")
    def _fixed_needs_value(self) -> ThresholdConfig:
        if self.method == "fixed" and self.value is None:
            raise ValueError("threshold method 'fixed' needs a 'value'")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError("threshold 'quantile' must be between 0 and 1")
        return self


class LabelsConfig(_Strict):
    """Known anomalies for evaluation: a 0/1 line per bucket from ``first_day``, or a CSV of
    ``start,end[,kind]`` ranges (inclusive bucket starts)."""

    path: str
    first_day: date | None = None


class EnsembleConfig(_Strict):
    """Which detectors decide the ensemble flag (all when unset) and how many must agree.

    Every configured detector is still trained, scored and shown; only these vote.
    """

    detectors: list[Identifier] | None = None
    min_votes: int = Field(1, ge=1)


class StreamingConfig(_Strict):
    """A source's ``streaming:`` section: windowing, learning and checkpointing of ``stream``.

    The forest's shape (trees, sample size, shingle) is the lead detector's, from ``detectors``.
    """

    allowed_lateness_minutes: float = Field(5.0, ge=0)
    time_decay: float | None = Field(None, ge=0)  # None: the model's, else 1/(training_days*buckets_per_day)
    warmup_windows: int | None = Field(None, ge=1)  # cold start: windows before training; None: one day
    checkpoint_seconds: float = Field(5.0, gt=0)


class ChecksConfig(_Strict):
    # events_present: fewer events in a day means missing input (files not landed, wrong folder),
    # not an outage; 0 turns the check off for a log that may be silent for a whole day
    min_events_per_day: int = Field(1, ge=0)
    # ... or fewer than this share of a typical day before it (the median of the training_days before,
    # or the same weekday a week before if lower): a file that never landed still leaves the day a few
    # late events from the next day's file (0 turns this rule off; min_events_per_day 0 turns off both)
    min_events_share: float = Field(0.1, ge=0.0, le=1.0)
    max_quarantine_rate: float = Field(0.01, ge=0.0, le=1.0)
    max_alert_rate: float = Field(0.2, ge=0.0, le=1.0)
    min_alert_rate: float = Field(0.0, ge=0.0, le=1.0)
    # stream_vs_batch: share of a day's buckets whose stream flag equals the batch ensemble's
    min_stream_agreement: float = Field(0.95, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _alert_range(self) -> ChecksConfig:
        if self.min_alert_rate > self.max_alert_rate:
            raise ValueError(
                f"min_alert_rate {self.min_alert_rate} exceeds max_alert_rate {self.max_alert_rate}: "
                "no day could pass alert_rate"
            )
        return self


class SourceConfig(_Strict):
    """Everything the pipeline needs to know about one log source."""

    name: Identifier
    description: str = ""
    start_date: date
    files: list[str] = Field(min_length=1)
    timestamp: TimestampConfig = TimestampConfig()
    columns: list[ColumnConfig] = Field(min_length=1)
    bucket_minutes: int = Field(10, ge=1, le=1440)
    metrics: list[MetricConfig] = Field(min_length=1)
    derived: list[DerivedConfig] = Field(default_factory=list)
    lags: list[int] = Field(default_factory=lambda: [1])
    training_days: int = Field(7, ge=1, le=366)
    detectors: list[DetectorConfig] = Field(min_length=1)
    threshold: ThresholdConfig = ThresholdConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    incident_gap_buckets: int = Field(0, ge=0)
    checks: ChecksConfig = ChecksConfig()
    labels: LabelsConfig | None = None
    streaming: StreamingConfig = StreamingConfig()
    max_field_length: int = Field(1024, ge=1)
    # a string column naming the series a row belongs to (e.g. sensor_id): one series per value,
    # with its own bucket grid, lags, models and incidents; None is one series for the source
    entity: Identifier | None = None
    # where ingest and resample run; ANOMALY_ENGINE overrides it for a run (see stage_engine)
    engine: Literal["duckdb", "spark"] = "duckdb"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        value = validate_identifier(value, "source name")
        if value.lower() in RESERVED_SCHEMAS:
            raise ValueError(f"source name {value!r} is a catalog schema DuckDB or the warehouse uses")
        return value

    @field_validator("entity")
    @classmethod
    def _entity(cls, value: str | None) -> str | None:
        return None if value is None else validate_identifier(value, "entity column")

    @model_validator(mode="after")
    def _consistent(self) -> SourceConfig:
        if 1440 % self.bucket_minutes:
            raise ValueError(f"bucket_minutes {self.bucket_minutes} must divide a day (1440 minutes)")
        # a day's features see that day and the one before: a lag reaches back at most one day
        if len(set(self.lags)) != len(self.lags) or not all(
            1 <= lag <= self.buckets_per_day for lag in self.lags
        ):
            raise ValueError(
                f"lags {self.lags} must be distinct bucket counts from 1 to {self.buckets_per_day} "
                f"(one day of {self.bucket_minutes}-minute buckets)"
            )
        raw = [column.name for column in self.columns]
        if self.timestamp.column in raw:
            raise ValueError(
                f"list the timestamp column {self.timestamp.column!r} under 'timestamp', not 'columns'"
            )
        _unique([self.timestamp.column, *raw], "column")
        internal = sorted(name for name in raw if _folded(name) in INGEST_COLUMNS or name.startswith("__"))
        if internal:
            raise ValueError(
                f"column name(s) {internal} are the pipeline's own in raw_events and quarantine "
                f"({sorted(INGEST_COLUMNS)}, and names starting with '__'): rename them in the log or "
                "leave them out of 'columns' (an undeclared field is ignored)"
            )
        types = {column.name: column.type for column in self.columns}
        for metric in self.metrics:
            if metric.column is not None and metric.column not in raw:
                raise ValueError(
                    f"metric {metric.name!r} reads unknown column {metric.column!r}; columns: {raw}"
                )
            if not metric.is_count and types[metric.column] != "number":
                raise ValueError(
                    f"metric {metric.name!r} ({metric.agg}) needs a number column: declare "
                    f"{{name: {metric.column}, type: number}} (columns are text unless typed)"
                )
        known = [metric.name for metric in self.metrics]
        for derived in self.derived:
            names = expression_names(derived.expression)
            unknown = sorted(names - set(known))
            if unknown:
                raise ValueError(
                    f"derived {derived.name!r} uses unknown names {unknown}; known so far: {known}"
                )
            known.append(derived.name)
        _unique(known, "metric or derived")
        shadowing = sorted(name for name in known if _folded(name) in RESERVED_COLUMNS)
        if shadowing:
            raise ValueError(f"metric or derived name(s) {shadowing} clash with the pipeline's table columns")
        if self.entity is not None:
            _check_entity(self.entity, self.columns, known)
        features = set(self.feature_columns)
        for detector in self.detectors:
            if detector.params.get("n_slots", self.buckets_per_day) != self.buckets_per_day:
                raise ValueError(
                    f"detector {detector.name!r} has n_slots {detector.params['n_slots']}, but "
                    f"{self.bucket_minutes}-minute buckets make {self.buckets_per_day} slots a day"
                )
            missing = sorted(set(detector.features) - features)
            if missing:
                raise ValueError(
                    f"detector {detector.name!r} uses unknown features {missing}; available: {sorted(features)}"
                )
        names = [detector.name for detector in self.detectors]
        _unique(names, "detector")
        learners = [
            d.name
            for d in self.detectors
            if (d.threshold or self.threshold).method == "best_f1" or d.kind == "spark_rf"
        ]
        if self.entity is not None and learners:
            raise ValueError(
                f"detector(s) {learners} learn from labels, which name buckets, not {self.entity} values: "
                "each series would learn the others' faults; use another threshold method or detector"
            )
        voters = self.ensemble_detectors
        if sorted(set(voters) - set(names)):
            raise ValueError(
                f"ensemble names unknown detectors {sorted(set(voters) - set(names))}; known: {names}"
            )
        if self.ensemble.min_votes > len(voters):
            raise ValueError(
                f"ensemble min_votes {self.ensemble.min_votes} exceeds its {len(voters)} detector(s)"
            )
        return self

    @property
    def ensemble_detectors(self) -> list[str]:
        """The detectors whose flags make the ensemble's verdict."""
        return self.ensemble.detectors or [detector.name for detector in self.detectors]

    @property
    def buckets_per_day(self) -> int:
        return 1440 // self.bucket_minutes

    @property
    def metric_names(self) -> list[str]:
        return [metric.name for metric in self.metrics]

    @property
    def series_columns(self) -> list[str]:
        """Metrics then derived columns: the per-bucket series a person reads and detectors explain."""
        return self.metric_names + [derived.name for derived in self.derived]

    @property
    def feature_columns(self) -> list[str]:
        """Every column of the ``features`` table a detector may use."""
        lagged = [f"{name}_lag{lag}" for name in self.series_columns for lag in self.lags]
        return [*self.series_columns, "tod_sin", "tod_cos", "slot", *lagged]


# columns of the per-bucket tables (features, scores, anomalies, incidents) an entity must not shadow
RESERVED_COLUMNS = frozenset(
    {"bucket_start", "slot", "tod_sin", "tod_cos", "date", "detector", "detectors", "score", "threshold"}
    | {"normalized", "is_anomaly", "top_feature", "direction", "attribution", "expected", "band", "start"}
    | {"end", "buckets", "duration_minutes", "peak_bucket", "peak_score", "observed", "sample_events"}
    | {"cold_start"}
)


# columns ingestion adds beside the raw ones (raw_events: timestamp, source_file, line, day and the hive
# key date; quarantine: reason and raw) and its intermediate names, which a raw column must not shadow
INGEST_COLUMNS = frozenset(
    {"timestamp", "source_file", "line", "reason", "raw", "day", "date", "ts_utc", "bad_offset", "_line_text"}
)


# schemas a source's name (its catalog schema) must not take: DuckDB's own, and the warehouse's lineage
RESERVED_SCHEMAS = frozenset({"main", "meta", "system", "temp", "information_schema", "pg_catalog"})


def _check_entity(entity: str, columns: list[ColumnConfig], series: list[str]) -> None:
    """The entity is a declared string column and cannot be mistaken for a series or table column."""
    column = next((column for column in columns if column.name == entity), None)
    if column is None:
        raise ValueError(f"entity {entity!r} is not a declared column; columns: {[c.name for c in columns]}")
    if column.type != "string":
        raise ValueError(f"entity column {entity!r} must have type 'string', not {column.type!r}")
    if _folded(entity) in {_folded(name) for name in series} | RESERVED_COLUMNS:
        raise ValueError(f"entity column {entity!r} clashes with a metric, derived or table column name")


def _folded(name: str) -> str:
    """SQL identifiers are case-insensitive in DuckDB: ``Latency`` and ``latency`` are one column."""
    return name.lower()


def _unique(names: list[str], what: str) -> None:
    folded = [_folded(name) for name in names]
    duplicates = sorted({name for name in names if folded.count(_folded(name)) > 1})
    if duplicates:
        raise ValueError(f"duplicate {what} names: {duplicates}")


_ALLOWED_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.USub,
    ast.UAdd,
)


def _parse_expression(expression: str) -> ast.Expression:
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"cannot parse expression {expression!r}: {error.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES) or (
            isinstance(node, ast.Constant) and not isinstance(node.value, int | float)
        ):
            raise ValueError(
                f"expression {expression!r} may only use column names, numbers, + - * / and parentheses"
            )
    return tree


def expression_names(expression: str) -> set[str]:
    """Column names an arithmetic expression refers to (after checking it is only arithmetic)."""
    tree = _parse_expression(expression)
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def evaluate_expression(expression: str, columns: dict[str, Any]) -> Any:
    """Evaluate a checked arithmetic expression over arrays or Series (no ``eval``)."""
    operators = {
        ast.Add: lambda a, b: a + b,
        ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b,
    }

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp):
            return operators[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp):
            operand = walk(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Name):
            return columns[node.id]
        return node.value  # a numeric constant, checked by _parse_expression

    return walk(_parse_expression(expression))


def load_source(path: Path) -> SourceConfig:
    """Load and validate one source file; errors name the file and the offending field."""
    try:
        document = yaml.safe_load(path.read_text())
    # ValueError: a YAML date that is not a calendar day (start_date: 2024-13-01, 2024-02-30)
    except (OSError, yaml.YAMLError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read source config: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: a source config must be a mapping of settings")
    try:
        return SourceConfig.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def sources_dirs() -> list[Path]:
    """The shipped sources plus any directories named in ``ANOMALY_SOURCES_DIR`` (os.pathsep-separated)."""
    extra = [Path(part) for part in os.environ.get("ANOMALY_SOURCES_DIR", "").split(os.pathsep) if part]
    return [PACKAGE_SOURCES_DIR, *extra]


def load_sources(directories: list[Path] | None = None) -> dict[str, SourceConfig]:
    """Every ``*.yaml`` (or ``*.yml``) source in the given directories, keyed by name; a later
    directory overrides."""
    sources: dict[str, SourceConfig] = {}
    for directory in directories if directories is not None else sources_dirs():
        if not directory.is_dir():
            raise ConfigError(f"sources directory {directory} does not exist")
        here: dict[str, Path] = {}
        for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
            source = load_source(path)
            if source.name in here:  # which one wins would depend on how the files sort
                raise ConfigError(
                    f"{path}: source name {source.name!r} is also defined in {here[source.name]}; "
                    "rename or remove one of them"
                )
            here[source.name] = path
            sources[source.name] = source
    return sources


ENGINE_ENV = "ANOMALY_ENGINE"
ENGINES = ("duckdb", "spark")


def stage_engine(source: SourceConfig) -> str:
    """The engine of ``source``'s ingest and resample stages: ``ANOMALY_ENGINE`` when set (one run on
    Spark without editing the source), else the source's ``engine``."""
    override = os.environ.get(ENGINE_ENV, "").strip().lower()
    if override and override not in ENGINES:
        raise ConfigError(f"{ENGINE_ENV}={override!r}: the engine must be one of {list(ENGINES)}")
    return override or source.engine


def landing_dir() -> Path:
    return Path(os.environ.get("ANOMALY_LANDING_DIR", DEFAULT_LANDING_DIR))


def warehouse_dir() -> Path:
    return Path(os.environ.get("ANOMALY_WAREHOUSE_DIR", DEFAULT_WAREHOUSE_DIR))
