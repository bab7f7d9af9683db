"""The Spark engine gives the DuckDB engine's results: the reference clickstream, then malformed input.

Both engines run on the same landing folder into separate warehouses; every output is compared frame
for frame (values and dtypes), and the Spark engine's resampled clickstream against the published
10-minute aggregates, in-process and through ``ANOMALY_ENGINE=spark make backfill``. The session-wide
local Spark session (``local[2]``, tests/conftest.py) serves the module.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
from datetime import UTC, date, datetime
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_dagster import pipeline
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, ConfigError, SourceConfig, load_source
from anomaly_dagster.engines.spark import (
    java_datetime_pattern,
    numbered_lines,
    run_ingest_spark,
    run_resample_spark,
)
from anomaly_dagster.generate import generate_sensors
from anomaly_dagster.pipeline import StageContext
from anomaly_dagster.warehouse import RunInfo, Warehouse, file_checksum
from resources.spark import SparkResource

pytestmark = [pytest.mark.spark, pytest.mark.slow]

REFERENCE_DAYS = [date(2020, 7, 14), date(2020, 7, 15)]
EDGE_DAYS = [date(2020, 10, 24), date(2020, 10, 25)]  # Berlin leaves summer time on the 25th
ASSETS = ["raw_events", "quarantine", "resampled"]
REPO = Path(__file__).resolve().parents[2]


def run_engines(
    spark, source: SourceConfig, landing: Path, days: list[date], root: Path
) -> dict[str, Warehouse]:
    """Both engines' ingest and resample stages over ``days``, each into a fresh warehouse."""
    warehouses = {}
    for engine in ("duckdb", "spark"):
        warehouse = Warehouse(root / engine)
        context = StageContext(source, warehouse, landing, RunInfo(f"test-{engine}", "test"))
        if engine == "duckdb":
            pipeline.run_ingest(context, days)
            pipeline.run_resample(context, days)
        else:
            run_ingest_spark(context, days, spark)
            run_resample_spark(context, days, spark)
        warehouses[engine] = warehouse
    return warehouses


def outputs(warehouses: dict[str, Warehouse], source: str, asset: str, day: date) -> list[pd.DataFrame]:
    return [warehouses[engine].read_partitions(source, asset, [day]) for engine in ("duckdb", "spark")]


# --- the reference clickstream, plus a file of bad rows ---------------------------------------------


@pytest.fixture(scope="module")
def clickstream() -> SourceConfig:
    return load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")


@pytest.fixture(scope="module")
def reference(clickstream, reference_dir, tmp_path_factory) -> dict[str, Warehouse]:
    """2020-07-14..15 of the reference (linked, not copied) and a file holding only bad rows: the DuckDB
    stages in-process, and the acceptance command on Spark, ``ANOMALY_ENGINE=spark make backfill``, as a
    user runs it (real Dagster materializations of the whole chain, in their own JVM)."""
    root = tmp_path_factory.mktemp("spark_reference")
    landing, home = root / "landing", root / "dagster_home"
    landing.mkdir()
    home.mkdir()
    (landing / "clicks.csv.gz").symlink_to(reference_dir / "clicks.csv.gz")
    (landing / "clicks_extra_2020-07-14.csv").write_text(
        "timestamp,page,user,session_id\n"
        "not-a-time, p01 , u0000000001,s\n"  # unparseable: the file's home day (the date in its name)
        "2020-07-14 10:00:00, p01 ,,s\n"  # missing user, its own day
        "2020-07-15 11:00:00, p02 ,   ,s\n"  # blank user, its own day
    )
    duckdb_warehouse = Warehouse(root / "duckdb")
    context = StageContext(clickstream, duckdb_warehouse, landing, RunInfo("test-duckdb", "test"))
    pipeline.run_ingest(context, REFERENCE_DAYS)
    pipeline.run_resample(context, REFERENCE_DAYS)
    env = os.environ | {
        "ANOMALY_ENGINE": "spark",
        "ANOMALY_SPARK_MASTER": "local[2]",
        "ANOMALY_LANDING_DIR": str(landing),
        "ANOMALY_WAREHOUSE_DIR": str(root / "spark"),
        "DAGSTER_HOME": str(home),
    }
    command = ["make", "backfill", "SOURCE=clickstream", "START=2020-07-14", "END=2020-07-15"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return {"duckdb": duckdb_warehouse, "spark": Warehouse(root / "spark")}


def test_spark_resampled_equals_the_reference_aggregates(reference, reference_dir):
    resampled = reference["spark"].read_partitions("clickstream", "resampled", REFERENCE_DAYS)
    published = pd.read_csv(reference_dir / "clicks_10T.csv", parse_dates=["timestamp"])
    published = published[published["timestamp"].dt.date.isin(REFERENCE_DAYS)].reset_index(drop=True)
    assert len(resampled) == len(published) == 288
    assert (resampled["bucket_start"].to_numpy() == published["timestamp"].to_numpy()).all()
    for ours, theirs in (("users", "user"), ("clicks", "click"), ("pages", "page")):
        np.testing.assert_array_equal(resampled[ours].to_numpy(), published[theirs].to_numpy())


@pytest.mark.parametrize("asset", ASSETS)
@pytest.mark.parametrize("day", REFERENCE_DAYS)
def test_reference_outputs_are_identical(reference, asset, day):
    duckdb_frame, spark_frame = outputs(reference, "clickstream", asset, day)
    assert len(spark_frame) == len(duckdb_frame) > 0
    pd.testing.assert_frame_equal(spark_frame, duckdb_frame)


def test_bad_rows_are_quarantined_alike(reference):
    for engine, warehouse in reference.items():
        quarantine = warehouse.read_partitions("clickstream", "quarantine", REFERENCE_DAYS)
        assert quarantine["reason"].value_counts().to_dict() == {
            "missing user": 2,
            "unparseable timestamp not-a-time": 1,
        }, engine
        assert sorted(quarantine["line"]) == [2, 3, 4], engine


def test_the_backfill_ran_its_ingest_and_resample_on_spark(reference):
    instance = dg.DagsterInstance.from_config(str(reference["spark"].root.parent / "dagster_home"))
    for asset in ("raw_events", "quarantine", "resampled"):
        event = instance.get_latest_materialization_event(dg.AssetKey(["clickstream", asset]))
        assert event.asset_materialization.metadata["engine"].value == "spark"
    # and the rest of the chain ran on its tables
    assert reference["spark"].query("SELECT count(*) AS n FROM clickstream.scores")["n"].iloc[0] > 288


def test_engine_is_chosen_per_source_or_for_a_run(reference, clickstream, spark, tmp_path, monkeypatch):
    """``engine: spark`` in the source, or ``ANOMALY_ENGINE`` for a run, sends the stage to Spark."""
    day = REFERENCE_DAYS[0]
    expected = reference["duckdb"].read_partitions("clickstream", "resampled", [day])
    for engine, source, variable in (
        ("spark", clickstream.model_copy(update={"engine": "spark"}), ""),
        ("spark", clickstream, "SPARK"),
        ("duckdb", clickstream.model_copy(update={"engine": "spark"}), "duckdb"),
    ):
        monkeypatch.setenv("ANOMALY_ENGINE", variable)
        warehouse = Warehouse(tmp_path / f"{engine}-{variable}")
        raw = warehouse.partition_file("clickstream", "raw_events", day)
        raw.parent.mkdir(parents=True)
        shutil.copyfile(reference["duckdb"].partition_file("clickstream", "raw_events", day), raw)
        context = StageContext(source, warehouse, tmp_path, RunInfo("dispatch", "test"), spark=lambda: spark)
        (output,) = pipeline.run_resample(context, [day])
        assert output.summary.get("engine", "duckdb") == engine
        pd.testing.assert_frame_equal(warehouse.read_partitions("clickstream", "resampled", [day]), expected)
    monkeypatch.setenv("ANOMALY_ENGINE", "flink")
    with pytest.raises(ConfigError, match="ANOMALY_ENGINE='flink'"):
        pipeline.run_resample(context, [day])


def test_raw_events_have_the_same_schema(reference):
    for day in REFERENCE_DAYS:
        schemas = [
            pq.read_schema(reference[engine].partition_file("clickstream", "raw_events", day))
            for engine in ("duckdb", "spark")
        ]
        assert [(field.name, field.type) for field in schemas[1]] == [
            (field.name, field.type) for field in schemas[0]
        ]


def test_lineage_is_recorded_alike(reference):
    query = (
        "SELECT asset, partition, row_count, upstream, path, checksum FROM meta.lineage "
        "WHERE asset IN ('raw_events', 'quarantine', 'resampled') ORDER BY asset, partition"
    )
    duckdb_lineage, spark_lineage = (reference[engine].query(query) for engine in ("duckdb", "spark"))
    columns = ["asset", "partition", "row_count"]
    pd.testing.assert_frame_equal(spark_lineage[columns], duckdb_lineage[columns])
    upstream = [[entry["asset"] for entry in json.loads(value)] for value in spark_lineage["upstream"]]
    assert upstream == [[]] * 4 + [["raw_events"]] * 2
    spark_root = reference["spark"].root
    assert all(file_checksum(spark_root / row.path) == row.checksum for row in spark_lineage.itertuples())
    assert (
        spark_lineage[spark_lineage["asset"] == "resampled"]["checksum"].to_numpy()
        == duckdb_lineage[duckdb_lineage["asset"] == "resampled"]["checksum"].to_numpy()
    ).all()


def test_views_union_across_engines(reference, tmp_path):
    """Days written by either engine read as one table, as the catalog's views read them."""
    for engine, day in zip(("duckdb", "spark"), REFERENCE_DAYS, strict=True):
        target = tmp_path / "raw_events" / f"date={day}" / "part.parquet"
        target.parent.mkdir(parents=True)
        shutil.copyfile(reference[engine].partition_file("clickstream", "raw_events", day), target)
    pattern = str(tmp_path / "raw_events" / "date=*" / "part.parquet")
    with duckdb.connect() as connection:
        view = connection.sql(
            f"SELECT * FROM read_parquet('{pattern}', hive_partitioning = true, union_by_name = true)"
        )
        assert view.columns == ["timestamp", "page", "user", "session_id", "source_file", "line", "date"]
        assert [str(kind) for kind in view.types][:6] == ["TIMESTAMP", *["VARCHAR"] * 4, "BIGINT"]
        counts = connection.sql(
            f"SELECT date, count(*) FROM read_parquet('{pattern}', hive_partitioning = true) GROUP BY 1 ORDER BY 1"
        ).fetchall()
    expected = [
        len(reference[engine].read_partitions("clickstream", "raw_events", [day]))
        for engine, day in zip(("duckdb", "spark"), REFERENCE_DAYS, strict=True)
    ]
    assert [count for _, count in counts] == expected


# --- malformed input: every rule of ``ingest``, in another time zone, with every aggregation ---------------


EDGE_SOURCE = {
    "name": "edge",
    "start_date": "2020-10-01",
    "files": ["edge*"],
    "timestamp": {"column": "ts", "format": "%d/%m/%Y %H:%M:%S", "timezone": "Europe/Berlin"},
    "columns": [
        {"name": "user"},
        {"name": "amount", "type": "number", "min_value": 0},
        {"name": "note", "required": False},
    ],
    "metrics": [
        {"name": "events", "agg": "count"},
        {"name": "users", "agg": "nunique", "column": "user"},
        {"name": "revenue", "agg": "sum", "column": "amount"},
        {"name": "mean_amount", "agg": "mean", "column": "amount"},
        {"name": "min_amount", "agg": "min", "column": "amount"},
        {"name": "max_amount", "agg": "max", "column": "amount"},
        {"name": "p95_amount", "agg": "p95", "column": "amount"},
    ],
    "detectors": [{"name": "zscore", "kind": "robust_zscore", "features": ["events"]}],
}

EDGE_CSV_LINES = [
    '24/10/2020 10:00:00, u1 ,12.5,"a, quoted ""note"""',
    "24/10/2020 10:01:00,u2,1_000,",
    "24/10/2020 10:02:00,u3,abc,x",  # not a number
    "24/10/2020 10:03:00,u4,-5,x",  # below minimum
    "24/10/2020 10:04:00,u5,nan,x",  # non-finite
    "24/10/2020 10:05:00,,3,x",  # missing user
    "24/10/2020 10:06:00,u7,3,x,extra",  # too many columns
    "24/10/2020 10:07:00,u8",  # missing columns
    "",  # blank: skipped, still counted
    '24/10/2020 10:08:00,"u9"x,3,x',  # a quote closed in mid-field
    '24/10/2020 10:09:00,u"10,3,x',  # a literal quote inside a field: fine
    "2020-10-24T10:10:00+02:00,u11,3,x",  # ISO with an offset
    "2020-10-24 10:11:00 +0200,u12,3,x",  # an offset after a blank
    "2020-10-24 10:12:00+19:00,u13,3,x",  # offset beyond 18 hours
    "2020-10-24T08:13:00Z,u14,3,x",
    "25/10/2020 02:30:00,u15,3,x",  # ambiguous: summer time ends at 03:00; DuckDB takes the later 02:30
    "25/10/2020 1:5:0,u16,3,x",  # unpadded fields parse as in strptime
    "30/09/2020 23:00:00,u17,3,x",  # before the source's start date
    "nonsense,u18,3,x",
    ",u19,3,x",  # missing timestamp
    "24/10/2020 10:20:00,u20,3,n\x01te",  # a control character
    "24/10/2020 10:21:00,u21,3," + "n" * 1100,  # longer than max_field_length
    "24/10/2020 10:22:00,\u00a0u22\u3000,3,x",  # Unicode blanks are trimmed
    "24/10/2020 10:24:00,u24,3,x,",  # a trailing delimiter: DuckDB reads 4 fields
    "24/10/2020 10:25:00,u25,3,x,,",
    "24/10/2020 10:26:00,u26,3,x, ",  # a blank is a value: 5 fields
    "24/10/2020 10:23:00,u23,3,x",
    "24/10/2020 10:23:00,u23,3,x",  # the same event twice in one file: both count
]


def write_edge_landing(landing: Path) -> None:
    rng = np.random.default_rng(7)
    seconds = np.sort(rng.integers(2 * 3600, 2 * 86400, 400))  # local times of the two UTC days
    stamps = [
        (pd.Timestamp("2020-10-24") + pd.Timedelta(seconds=int(second))).strftime("%d/%m/%Y %H:%M:%S")
        for second in seconds
    ]
    generated = [
        f"{stamp}, u{rng.integers(0, 40)} ,{rng.gamma(2.0, 10.0):.3f},n{index}"
        for index, stamp in enumerate(stamps)
    ]
    (landing / "edge_a.csv").write_text(
        "\n".join(["ts,user,amount,note", *EDGE_CSV_LINES, *generated]) + "\n"
    )
    # replays: edge_b.csv repeats events of edge_a.csv (one of them twice, one more often than edge_a)
    replayed = [EDGE_CSV_LINES[0], EDGE_CSV_LINES[1], *generated[:5], generated[5], generated[5]]
    replayed += [EDGE_CSV_LINES[-1]] * 3
    (landing / "edge_b.csv").write_text(
        "\n".join(["note,amount,user,ts", *(reorder(line) for line in replayed)]) + "\n"
    )
    json_lines = [
        json.dumps({"ts": "24/10/2020 11:00:00", "user": "j1", "amount": 4.25}),
        '{"ts": "24/10/2020 11:01:00", "user": ',  # malformed
        "",
        "[1, 2]",  # not an object
        json.dumps({"ts": "24/10/2020 11:02:00", "amount": 1}),  # missing user
        json.dumps({"ts": "2020-10-25T11:03:00+01:00", "user": "j2", "amount": "7", "note": {"a": [1]}}),
        json.dumps({"ts": "24/10/2020 11:04:00", "user": None, "amount": 1}),
        '{"ts": "24/10/2020 11:05:00", "user": "j3", "amount": 1e400}',  # infinite
    ]
    (landing / "edge_c.jsonl").write_text("\n".join(json_lines) + "\n")
    naive = pd.to_datetime(
        ["2020-10-24 12:00:00", "2020-10-25 12:00:00.5", "2020-10-25 13:00:00"], format="ISO8601"
    )
    pq.write_table(
        pa.Table.from_pandas(
            pd.DataFrame({"ts": naive, "user": ["p1", None, "p3"], "amount": [1.0, 2.0, -1.0]}),
            preserve_index=False,
        ),
        landing / "edge_d.parquet",
    )
    aware = pd.to_datetime(["2020-10-24 12:00:00", "2020-10-25 22:59:59"]).tz_localize("UTC")
    pq.write_table(
        pa.Table.from_pandas(
            pd.DataFrame({"ts": aware, "user": ["q1", "q2"], "amount": ["5", "6"]}), preserve_index=False
        ),
        landing / "edge_e.parquet",
    )
    unterminated = [
        "ts,user,amount,note",
        "24/10/2020 14:00:00,u1,1,x",
        '24/10/2020 14:01:00,u2,1,s"q',  # an odd quote: emptied once a quote runs over a line end
        '24/10/2020 14:02:00,"u3,1,x',  # opens a quote the line never closes
        "24/10/2020 14:03:00,u4,1,x",
    ]
    (landing / "edge_f.csv").write_text("\n".join(unterminated) + "\n")
    payload = gzip.compress(("ts,user,amount,note\n" + "24/10/2020 15:00:00,u,1,x\n" * 5000).encode())
    truncated = landing / "edge_g_2020-10-24.csv.gz"
    truncated.write_bytes(payload[: len(payload) // 2])
    stamp = datetime(2020, 10, 24, 12, tzinfo=UTC).timestamp()
    os.utime(truncated, (stamp, stamp))


def reorder(line: str) -> str:
    """A line of ``ts,user,amount,note`` in edge_b.csv's column order ``note,amount,user,ts``."""
    ts, user, amount, note = next(csv.reader([line]))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([note, amount, user, ts])
    return buffer.getvalue()


@pytest.fixture(scope="module")
def edge(spark, tmp_path_factory) -> dict[str, Warehouse]:
    root = tmp_path_factory.mktemp("spark_edge")
    landing = root / "landing"
    landing.mkdir()
    write_edge_landing(landing)
    return run_engines(spark, SourceConfig.model_validate(EDGE_SOURCE), landing, EDGE_DAYS, root)


@pytest.mark.parametrize("asset", ["raw_events", "quarantine"])
@pytest.mark.parametrize("day", EDGE_DAYS)
def test_malformed_input_gives_identical_outputs(edge, asset, day):
    duckdb_frame, spark_frame = outputs(edge, "edge", asset, day)
    assert len(duckdb_frame) > 0
    pd.testing.assert_frame_equal(spark_frame, duckdb_frame)


@pytest.mark.parametrize("day", EDGE_DAYS)
def test_every_aggregation_matches(edge, day):
    duckdb_frame, spark_frame = outputs(edge, "edge", "resampled", day)
    assert len(spark_frame) == 144
    # sums and means may differ in the last bit: the engines add in different orders
    pd.testing.assert_frame_equal(spark_frame, duckdb_frame, check_exact=False, rtol=1e-12)


def test_malformed_input_covers_the_rules(edge):
    quarantine = edge["duckdb"].read_partitions("edge", "quarantine", EDGE_DAYS)
    reasons = quarantine["reason"].str.replace(r"(Found: |beyond ±18:00 |in ).*", r"\1…", regex=True)
    assert {
        "not a number in …",
        "amount below minimum",
        "non-finite amount",
        "missing user",
        "TOO MANY COLUMNS: Expected Number of Columns: 4 Found: …",
        "MISSING COLUMNS: Expected Number of Columns: 4 Found: …",
        "UNQUOTED VALUE: Value with unterminated quote found.",
        "timestamp offset beyond ±18:00 …",
        "missing timestamp",
        "control characters in …",
        "field note longer than 1024 characters",
        "malformed JSON",
        "JSON line is not an object",
        "unterminated quote: a quoted field does not close on its line",
        "duplicate event: also in …",
    } <= set(reasons)
    assert quarantine["reason"].str.startswith("unreadable file: ").sum() == 1


# --- an entity source: a grid per sensor and day -----------------------------------------------------------


SENSOR_DAYS = [date(2024, 3, 1), date(2024, 3, 2), date(2024, 3, 3)]


@pytest.fixture(scope="module")
def sensors(spark, tmp_path_factory) -> dict[str, Warehouse]:
    """Three days of generated sensor logs, plus a sensor heard on the first day only (its grid goes on,
    empty, for one more day) and readings without a sensor id (the series "default")."""
    root = tmp_path_factory.mktemp("spark_sensors")
    landing = root / "landing"
    generate_sensors(landing, days=len(SENSOR_DAYS), start=SENSOR_DAYS[0], labels_path=root / "labels.csv")
    (landing / "sensors_extra.csv").write_text(
        "timestamp,sensor_id,temperature,pressure\n"
        "2024-03-01 10:00:00,s99,20.5,1010\n"
        "2024-03-01 10:05:00,s99,21.5,1011\n"
        "2024-03-02 11:00:00,,22.0,1012\n"
        "2024-03-02 11:01:00,  ,23.0,1013\n"
    )
    source = load_source(PACKAGE_SOURCES_DIR / "sensors.yaml")
    return run_engines(spark, source, landing, SENSOR_DAYS, root)


@pytest.mark.parametrize("day", SENSOR_DAYS)
def test_an_entity_source_resamples_alike(sensors, day):
    duckdb_frame, spark_frame = outputs(sensors, "sensors", "resampled", day)
    assert len(duckdb_frame) >= 4 * 144
    pd.testing.assert_frame_equal(spark_frame, duckdb_frame, check_exact=False, rtol=1e-12)


def test_a_silent_sensor_keeps_its_grid_for_a_day(sensors):
    frames = {day: sensors["spark"].read_partitions("sensors", "resampled", [day]) for day in SENSOR_DAYS}
    rows = {day: frame.groupby("sensor_id").size().to_dict() for day, frame in frames.items()}
    fleet = {"s01": 144, "s02": 144, "s03": 144}
    assert rows == {
        SENSOR_DAYS[0]: fleet | {"s99": 144},
        SENSOR_DAYS[1]: fleet | {"s99": 144, "default": 144},
        SENSOR_DAYS[2]: fleet | {"default": 144},
    }
    silent = frames[SENSOR_DAYS[1]].query("sensor_id == 's99'")
    assert (silent["temperature_count"] == 0).all() and silent["temperature_mean"].isna().all()
    assert frames[SENSOR_DAYS[1]].query("sensor_id == 'default'")["temperature_count"].sum() == 2
    query = "SELECT partition, upstream FROM meta.lineage WHERE asset = 'resampled' ORDER BY partition"
    duckdb_lineage, spark_lineage = (sensors[engine].query(query) for engine in ("duckdb", "spark"))
    spark_days, duckdb_days = (
        [[entry["partition"] for entry in json.loads(value)] for value in lineage["upstream"]]
        for lineage in (spark_lineage, duckdb_lineage)
    )
    assert spark_days == duckdb_days
    assert spark_days[1] == ["2024-03-01", "2024-03-02"]  # day D reads raw events of D-1 and D


# --- pieces ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lines.txt", "lines.txt.gz"])
def test_lines_are_numbered_across_the_blocks_spark_reads_in_parallel(spark, tmp_path, name):
    text = "".join(
        f"line {number}{' ' * (number % 50)}\n" if number % 97 else "\n" for number in range(1, 20_001)
    )
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    settings = {"spark.sql.files.maxPartitionBytes": "64k", "spark.sql.files.openCostInBytes": "16k"}
    saved = {key: spark.conf.get(key) for key in settings}
    try:
        for key, value in settings.items():
            spark.conf.set(key, value)
        lines = numbered_lines(spark, path)
        if not name.endswith(".gz"):
            assert spark.read.text(str(path)).rdd.getNumPartitions() > 5  # several blocks indeed
        numbered = sorted((row.line, row.value) for row in lines.collect())
    finally:
        for key, value in saved.items():
            spark.conf.set(key, value)
    assert numbered == list(enumerate(text.splitlines(), 1))


def test_spark_resource_shares_the_engine_session(spark):
    assert SparkResource().spark_session is spark
    assert SparkResource(master="local[2]").spark_context is spark.sparkContext
    with pytest.raises(ValueError, match="cannot use"):
        _ = SparkResource(master="local[3]").spark_session


@pytest.mark.parametrize(
    ("strftime", "pattern"),
    [
        ("%Y-%m-%d %H:%M:%S", "yyyy'-'M'-'d' 'H':'m':'s"),
        ("%Y%m%d%H%M", "yyyyMMddHHmm"),
        ("%d/%m/%y %I:%M %p", "d'/'M'/'yy' 'h':'m' 'a"),
        ("%FT%T.%f", "yyyy'-'M'-'d'T'H':'m':'s'.'SSSSSS"),
        ("%j %% o'clock", "D' % o''clock'"),
    ],
)
def test_strftime_formats_become_spark_patterns(strftime, pattern):
    assert java_datetime_pattern(strftime) == pattern


def test_unsupported_format_directive_is_refused():
    with pytest.raises(ValueError, match="%z is not supported by the Spark engine"):
        java_datetime_pattern("%Y-%m-%d %H:%M:%S%z")


def test_a_carriage_return_inside_a_quoted_field_numbers_lines_alike(spark, tmp_path):
    """DuckDB ends lines at \\n (or \\r\\n) only: a lone \\r in a quoted value stays in it, and the
    lines after it keep their numbers. Spark's reader split the value in two and shifted them."""
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "edge_cr.csv").write_bytes(
        b"ts,user,amount,note\r\n24/10/2020 11:00:00,u1,1,x\r\n"
        b'24/10/2020 11:02:00,u3,3,"a\rb"\r\n24/10/2020 11:03:00,u4,4,y\r\n'
    )
    source = SourceConfig.model_validate(EDGE_SOURCE)
    warehouses = run_engines(spark, source, landing, EDGE_DAYS[:1], tmp_path)
    for asset in ("raw_events", "quarantine"):
        duckdb_frame, spark_frame = outputs(warehouses, "edge", asset, EDGE_DAYS[0])
        pd.testing.assert_frame_equal(spark_frame, duckdb_frame)
