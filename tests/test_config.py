"""Source configuration and SQL safety: shipped sources load, every name that can reach SQL is checked."""

from __future__ import annotations

import copy
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from anomaly_dagster.config import (
    PACKAGE_SOURCES_DIR,
    ConfigError,
    ThresholdConfig,
    evaluate_expression,
    expression_names,
    load_source,
    load_sources,
)
from anomaly_dagster.sql import parse_day, quote_identifier, quote_literal, validate_identifier

SHIPPED = yaml.safe_load((PACKAGE_SOURCES_DIR / "clickstream.yaml").read_text())


def base_document() -> dict[str, Any]:
    """A fresh, valid copy of the shipped clickstream source as a plain dict."""
    return copy.deepcopy(SHIPPED)


def write_source(tmp_path: Path, document: dict[str, Any], name: str = "source.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def config_error(tmp_path: Path, document: dict[str, Any]) -> tuple[Path, str]:
    """Write ``document`` and return (path, message) of the ConfigError that loading it raises."""
    path = write_source(tmp_path, document)
    with pytest.raises(ConfigError) as raised:
        load_source(path)
    return path, str(raised.value)


# --- shipped source --------------------------------------------------------------------------------


def test_shipped_clickstream_source_loads() -> None:
    sources = load_sources([PACKAGE_SOURCES_DIR])
    assert list(sources) == ["clickstream", "sensors"]
    source = sources["clickstream"]
    assert source.start_date == date(2020, 7, 7)
    assert source.timestamp.column == "timestamp"
    assert source.timestamp.timezone == "UTC"
    assert [column.name for column in source.columns] == ["page", "user", "session_id"]
    assert [column.required for column in source.columns] == [True, True, False]
    assert source.bucket_minutes == 10
    assert source.buckets_per_day == 144
    assert source.metric_names == ["pages", "users", "clicks"]
    assert source.series_columns == ["pages", "users", "clicks", "residual", "clicks_per_user"]
    assert [detector.kind for detector in source.detectors] == [
        "rcf",
        "robust_zscore",
        "iqr",
        "isolation_forest",
    ]
    assert source.ensemble_detectors == ["rcf", "zscore"] and source.ensemble.min_votes == 2
    assert source.threshold == ThresholdConfig(method="sigma", k=3.0)


def test_default_load_sources_includes_shipped_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANOMALY_SOURCES_DIR", raising=False)
    assert "clickstream" in load_sources()


def test_feature_columns_of_shipped_source() -> None:
    source = load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")
    assert source.feature_columns == [
        "pages",
        "users",
        "clicks",
        "residual",
        "clicks_per_user",
        "tod_sin",
        "tod_cos",
        "slot",
        "pages_lag1",
        "users_lag1",
        "clicks_lag1",
        "residual_lag1",
        "clicks_per_user_lag1",
    ]


def test_feature_columns_follow_lags(tmp_path: Path) -> None:
    document = base_document()
    document["lags"] = [1, 144]
    source = load_source(write_source(tmp_path, document))
    lagged = [name for name in source.feature_columns if "_lag" in name]
    assert lagged == [
        f"{name}_lag{lag}"
        for name in ["pages", "users", "clicks", "residual", "clicks_per_user"]
        for lag in (1, 144)
    ]


def test_extra_directory_overrides_shipped_source_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = base_document()
    document["bucket_minutes"] = 5
    write_source(tmp_path, document, "override.yaml")
    other = base_document()
    other["name"] = "other_logs"
    write_source(tmp_path, other, "other.yaml")
    monkeypatch.setenv("ANOMALY_SOURCES_DIR", str(tmp_path))
    sources = load_sources()
    assert sorted(sources) == ["clickstream", "other_logs", "sensors"]
    assert sources["clickstream"].bucket_minutes == 5
    assert sources["other_logs"].bucket_minutes == 10


def test_missing_sources_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_sources([tmp_path / "nowhere"])


def test_two_files_of_one_folder_defining_a_source_is_an_error(tmp_path: Path) -> None:
    """Which of the two would win depends on how the files sort (a backup ``checkout_old.yml`` won)."""
    write_source(tmp_path, base_document(), "clickstream.yaml")
    older = base_document()
    older["bucket_minutes"] = 5
    write_source(tmp_path, older, "clickstream_old.yml")
    with pytest.raises(ConfigError, match=r"'clickstream' is also defined in .*clickstream\.yaml"):
        load_sources([tmp_path])


# --- invalid identifiers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["columns"][1].update(name="user; DROP TABLE x"), "columns.1.name"),
        (lambda d: d.update(name="click stream"), "name"),
        (lambda d: d["timestamp"].update(column='ts"; --'), "timestamp.column"),
        (lambda d: d["metrics"][0].update(name="1pages"), "metrics.0.name"),
        (lambda d: d["metrics"][1].update(column="user)"), "metrics.1.column"),
        (lambda d: d["derived"][0].update(name="resid-ual"), "derived.0.name"),
        (lambda d: d["detectors"][2].update(name="../iforest"), "detectors.2.name"),
    ],
)
def test_invalid_identifier_is_rejected_naming_file_and_field(tmp_path: Path, mutate, field: str) -> None:
    document = base_document()
    mutate(document)
    path, message = config_error(tmp_path, document)
    assert message.startswith(f"{path}: ")
    assert f"{field}: " in message
    assert "use letters, digits and underscores" in message


def test_sql_injection_column_name_is_quoted_in_message(tmp_path: Path) -> None:
    document = base_document()
    document["columns"][1]["name"] = "user; DROP TABLE x"
    path, message = config_error(tmp_path, document)
    assert str(path) in message
    assert "columns.1.name" in message
    assert "invalid column name 'user; DROP TABLE x'" in message


def test_unknown_setting_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["bucket_minute"] = 10
    _, message = config_error(tmp_path, document)
    assert "bucket_minute" in message


def test_unknown_timezone_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["timestamp"]["timezone"] = "Mars/Olympus"
    _, message = config_error(tmp_path, document)
    assert "timestamp.timezone" in message
    assert "unknown time zone 'Mars/Olympus'" in message


def test_bucket_minutes_must_divide_a_day(tmp_path: Path) -> None:
    document = base_document()
    document["bucket_minutes"] = 7
    _, message = config_error(tmp_path, document)
    assert "must divide a day" in message


@pytest.mark.parametrize("lags", [[0], [-1], [1, 1], [1, 145]])
def test_lags_must_be_distinct_and_within_one_day(tmp_path: Path, lags: list[int]) -> None:
    document = base_document()
    document["lags"] = lags
    _, message = config_error(tmp_path, document)
    assert f"lags {lags} must be distinct bucket counts from 1 to 144" in message


def test_a_lag_of_a_whole_day_is_allowed(tmp_path: Path) -> None:
    document = base_document()
    document["lags"] = [1, 144]
    assert load_source(write_source(tmp_path, document)).lags == [1, 144]


@pytest.mark.parametrize(
    "detector",
    [
        {
            "name": "tuned",
            "kind": "robust_zscore",
            "features": ["temperature_mean"],
            "threshold": {"method": "best_f1"},
        },
        {"name": "forest", "kind": "spark_rf", "features": ["temperature_mean"]},
    ],
)
def test_an_entity_source_refuses_detectors_that_learn_from_labels(tmp_path: Path, detector: dict) -> None:
    """Labels name buckets, not sensors: each sensor's model would learn the others' faults."""
    document = yaml.safe_load((PACKAGE_SOURCES_DIR / "sensors.yaml").read_text())
    document["detectors"].append(detector)
    _, message = config_error(tmp_path, document)
    assert (
        f"detector(s) ['{detector['name']}'] learn from labels, which name buckets, not sensor_id values"
        in message
    )


def test_timestamp_listed_as_column_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["columns"].append({"name": "timestamp"})
    _, message = config_error(tmp_path, document)
    assert "list the timestamp column 'timestamp' under 'timestamp'" in message


def test_duplicate_column_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["columns"].append({"name": "page"})
    _, message = config_error(tmp_path, document)
    assert "duplicate column names: ['page']" in message


def test_non_mapping_document_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_source(path)


def test_unparseable_yaml_is_rejected_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as raised:
        load_source(path)
    assert str(raised.value).startswith(f"{path}: cannot read source config")


def test_a_day_that_is_not_in_the_calendar_is_rejected_naming_file(tmp_path: Path) -> None:
    """YAML reads ``2024-13-01`` as a date and fails with a plain ValueError, not a YAML error."""
    document = base_document()
    path = tmp_path / "dated.yaml"
    text = yaml.safe_dump(document).replace(f"start_date: {document['start_date']}", "start_date: 2024-13-01")
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: cannot read source config: month must be in 1..12"):
        load_source(path)


# --- cross-field checks ------------------------------------------------------------------------------


def test_metric_reading_unknown_column_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["metrics"].append({"name": "referrers", "agg": "nunique", "column": "referrer"})
    path, message = config_error(tmp_path, document)
    assert str(path) in message
    assert "metric 'referrers' reads unknown column 'referrer'" in message


def test_metric_needing_a_column_is_rejected_without_one(tmp_path: Path) -> None:
    document = base_document()
    document["metrics"].append({"name": "mean_x", "agg": "mean"})
    _, message = config_error(tmp_path, document)
    assert "metrics.3" in message
    assert "aggregation 'mean' needs a 'column'" in message


def test_detector_with_unknown_feature_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    zscore = next(detector for detector in document["detectors"] if detector["name"] == "zscore")
    zscore["features"] = ["users", "bounces"]
    path, message = config_error(tmp_path, document)
    assert str(path) in message
    assert "detector 'zscore' uses unknown features ['bounces']" in message


def test_ensemble_must_name_known_detectors(tmp_path: Path) -> None:
    document = base_document()
    document["ensemble"] = {"detectors": ["rcf", "deepar"]}
    _, message = config_error(tmp_path, document)
    assert "ensemble names unknown detectors ['deepar']" in message
    document["ensemble"] = {"detectors": ["rcf"], "min_votes": 2}
    _, message = config_error(tmp_path, document)
    assert "min_votes 2 exceeds its 1 detector(s)" in message


def test_detector_may_use_lag_and_time_features(tmp_path: Path) -> None:
    document = base_document()
    document["detectors"][0]["features"] = ["users_lag1", "residual_lag1", "tod_sin", "slot"]
    source = load_source(write_source(tmp_path, document))
    assert source.detectors[0].features == ["users_lag1", "residual_lag1", "tod_sin", "slot"]


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('touch /tmp/pwned')",
        "clicks.real",
        "abs(clicks)",
        "clicks ** 2",
        "clicks if users else pages",
        "[clicks][0]",
        "lambda: clicks",
        "clicks - 'users'",
        "clicks < users",
    ],
)
def test_derived_expression_beyond_arithmetic_is_rejected(tmp_path: Path, expression: str) -> None:
    document = base_document()
    document["derived"][0]["expression"] = expression
    path, message = config_error(tmp_path, document)
    assert str(path) in message
    assert "may only use column names, numbers, + - * / and parentheses" in message


def test_derived_expression_with_syntax_error_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["derived"][0]["expression"] = "clicks - "
    _, message = config_error(tmp_path, document)
    assert "cannot parse expression 'clicks - '" in message


def test_derived_expression_with_unknown_name_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["derived"][0]["expression"] = "clicks - visitors"
    _, message = config_error(tmp_path, document)
    assert "derived 'residual' uses unknown names ['visitors']" in message


def test_derived_may_use_earlier_derived_but_not_later(tmp_path: Path) -> None:
    document = base_document()
    document["derived"].append({"name": "ratio", "expression": "residual / clicks"})
    source = load_source(write_source(tmp_path, document))
    assert source.series_columns[-3:] == ["residual", "clicks_per_user", "ratio"]

    document["derived"].reverse()
    _, message = config_error(tmp_path, document)
    assert "derived 'ratio' uses unknown names ['residual']" in message


def test_derived_name_clashing_with_metric_is_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["derived"][0]["name"] = "clicks"
    _, message = config_error(tmp_path, document)
    assert "duplicate metric or derived names: ['clicks']" in message


def test_duplicate_detector_names_are_rejected(tmp_path: Path) -> None:
    document = base_document()
    document["detectors"][2]["name"] = "zscore"
    _, message = config_error(tmp_path, document)
    assert "duplicate detector names: ['zscore']" in message


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        ({"method": "fixed"}, "threshold method 'fixed' needs a 'value'"),
        ({"method": "quantile", "quantile": 1.0}, "'quantile' must be between 0 and 1"),
        ({"method": "median"}, "threshold.method"),
    ],
)
def test_invalid_threshold_is_rejected(tmp_path: Path, threshold: dict[str, Any], expected: str) -> None:
    document = base_document()
    document["threshold"] = threshold
    _, message = config_error(tmp_path, document)
    assert expected in message


# --- expressions ---------------------------------------------------------------------------------------


def test_expression_names() -> None:
    assert expression_names("(clicks - users) / pages + 2 * clicks") == {"clicks", "users", "pages"}
    assert expression_names("3.5") == set()


def test_evaluate_expression_on_arrays() -> None:
    columns = {
        "clicks": np.array([10.0, 20.0, 30.0]),
        "users": np.array([4.0, 5.0, 6.0]),
        "pages": np.array([1.0, 2.0, 4.0]),
    }
    result = evaluate_expression("(clicks - users) / pages + -2 * +users", columns)
    np.testing.assert_allclose(result, [6.0 - 8.0, 7.5 - 10.0, 6.0 - 12.0])


def test_evaluate_expression_respects_precedence_and_constants() -> None:
    assert evaluate_expression("1 + 2 * 3", {}) == 7
    assert evaluate_expression("(1 + 2) * 3", {}) == 9
    assert evaluate_expression("10 - 4 - 3", {}) == 3
    assert evaluate_expression("-x / 4", {"x": 2.0}) == -0.5


def test_evaluate_expression_on_series_keeps_index() -> None:
    index = pd.date_range("2020-07-07", periods=3, freq="10min")
    clicks = pd.Series([5, 7, 9], index=index)
    users = pd.Series([1, 2, 3], index=index)
    result = evaluate_expression("clicks - users", {"clicks": clicks, "users": users})
    pd.testing.assert_series_equal(result, pd.Series([4, 5, 6], index=index))


def test_evaluate_expression_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="may only use"):
        evaluate_expression(f"__import__('os').system('touch {marker}')", {})
    assert not marker.exists()


def test_evaluate_expression_missing_column_raises() -> None:
    with pytest.raises(KeyError):
        evaluate_expression("clicks - users", {"clicks": np.array([1.0])})


# --- SQL quoting and partition keys --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clicks", "_private", "Users_2", "a" * 63])
def test_quote_identifier_accepts_plain_names(name: str) -> None:
    assert validate_identifier(name) == name
    assert quote_identifier(name) == f'"{name}"'


@pytest.mark.parametrize(
    "name", ["", "1abc", 'a"b', "user; DROP TABLE x", "a b", "a.b", "a-b", "ünïcode", "a" * 64, None]
)
def test_quote_identifier_rejects_everything_else(name: Any) -> None:
    with pytest.raises(ValueError, match="invalid column"):
        quote_identifier(name, "column")


def test_quote_literal_doubles_quotes() -> None:
    assert quote_literal("plain") == "'plain'"
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("'; DROP TABLE x; --") == "'''; DROP TABLE x; --'"
    assert quote_literal("") == "''"


def test_quote_literal_rejects_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        quote_literal("a\x00b")


def test_quote_literal_round_trips_through_duckdb() -> None:
    import duckdb

    value = "O'Brien's \"path\"; --"
    assert duckdb.connect().execute(f"SELECT {quote_literal(value)}").fetchone()[0] == value


def test_parse_day_accepts_dates_and_iso_strings() -> None:
    assert parse_day("2020-07-07") == date(2020, 7, 7)
    assert parse_day(date(2021, 1, 31)) == date(2021, 1, 31)


@pytest.mark.parametrize(
    "value",
    [
        "../etc",
        "2020-7-7",
        "2020-07-07/../../x",
        " 2020-07-07",
        "2020-07-07\n",
        "20200707",
        "2020-13-01",
        "",
        20200707,
    ],
)
def test_parse_day_rejects_anything_else(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_day(value)


def test_source_config_is_frozen() -> None:
    source = load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")
    with pytest.raises(ValueError):
        source.bucket_minutes = 5  # type: ignore[misc]
    assert source.bucket_minutes == 10


def _with_detector(**change: Any) -> dict[str, Any]:
    document = base_document()
    document["detectors"][2] = {**document["detectors"][2], **change}  # iqr, not in the ensemble
    return document


def _with_metric(name: str) -> dict[str, Any]:
    document = base_document()
    document["metrics"][2] = {**document["metrics"][2], "name": name}
    document["derived"] = []
    document["lags"] = [1]
    document["detectors"] = [{"name": "iqr", "kind": "iqr", "features": ["users"]}]
    document["ensemble"] = {}
    return document


def _with_column(**column: Any) -> dict[str, Any]:
    document = base_document()
    document["columns"].append(column)
    return document


def _with_sum_of(column: str) -> dict[str, Any]:
    document = base_document()
    document["metrics"].append({"name": "total", "agg": "sum", "column": column})
    return document


def _with_metric_named(name: str) -> dict[str, Any]:
    document = base_document()
    document["metrics"].append({"name": name, "agg": "count"})
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        # ingestion adds these columns itself: 'reason' sent every good event to quarantine with its own
        # value as the reason, 'line' crashed ingest, 'raw' read NULL, 'source_file' swapped with the path
        *[
            (_with_column(name=name, required=False), f"column name(s) ['{name}'] are the pipeline's own")
            for name in ("reason", "line", "raw", "source_file", "day", "date", "Reason")
        ],
        # text columns: sum/mean/p95 failed resample after ingest; max compared text ('99' > '1500')
        (
            _with_sum_of("page"),
            "metric 'total' (sum) needs a number column: declare {name: page, type: number}",
        ),
        # DuckDB names are case-insensitive: 'Page' filled from 'page', 'Clicks' read as a copy of 'clicks'
        (_with_column(name="Page", required=False), "duplicate column names: ['Page', 'page']"),
        (_with_metric_named("Clicks"), "duplicate metric or derived names: ['Clicks', 'clicks']"),
        (_with_detector(kind="iqrr"), "unknown detector kind 'iqrr'"),
        # a bad value failed the code location's import with a bare "coverage must be between 0 and 1"
        (
            _with_detector(kind="seasonal_band", params={"coverage": 99}),
            "detector 'iqr' (seasonal_band): coverage must be between 0 and 1, got 99",
        ),
        (
            _with_detector(kind="rcf", params={"num_trees": float("inf")}),
            "detector 'iqr' (rcf): cannot convert float infinity to integer",
        ),
        (_with_detector(params={"n_estimator": 50}), "no parameter(s) ['n_estimator']"),
        (_with_detector(features=[]), "at least 1 item"),
        ({**base_document(), "name": "System"}, "catalog schema"),
        (_with_metric("score"), "['score'] clash with the pipeline's table columns"),
        (_with_metric("date"), "['date'] clash"),
        ({**base_document(), "checks": {"min_alert_rate": 0.3, "max_alert_rate": 0.2}}, "no day could pass"),
        (
            {**base_document(), "timestamp": {"format": "%s"}},
            "timestamp format '%s' is not a strptime format",
        ),
    ],
)
def test_mistakes_that_used_to_fail_a_run_fail_the_load(tmp_path: Path, document: dict, message: str) -> None:
    """Each of these loaded, then failed a run after ingest had written its day (or never passed a check)."""
    path, error = config_error(tmp_path, document)
    assert str(path) in error and message in error
