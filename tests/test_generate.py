"""The sample clickstream generator: readable mixed-format files, realistic seasonality, detectable labelled faults."""

from __future__ import annotations

import gzip
from datetime import date, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_dagster.evaluation import load_labels
from anomaly_dagster.generate import (
    SENSOR_START,
    GeneratedLogs,
    InjectedIncident,
    _plan_faults,
    generate_clickstream,
    generate_sensors,
)

DAYS = 10
COLUMNS = ["timestamp", "page", "user", "session_id"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> GeneratedLogs:
    return generate_clickstream(tmp_path_factory.mktemp("gen") / "landing", days=DAYS, seed=7)


def read_raw(path: Path) -> pd.DataFrame:
    """One raw file as strings, exactly as written (no trimming)."""
    if path.name.endswith(".jsonl"):
        return pd.read_json(path, lines=True, dtype=str)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def events(generated: GeneratedLogs) -> pd.DataFrame:
    """All events, trimmed, with their parsed time and the day of the file they came from."""
    frame = pd.concat(
        [read_raw(path).assign(file_day=pd.Timestamp(path.name[7:17])) for path in generated.files],
        ignore_index=True,
    )
    for column in COLUMNS:
        frame[column] = frame[column].str.strip()
    frame["ts"] = pd.to_datetime(frame["timestamp"], format="%Y-%m-%d %H:%M:%S")
    return frame


@pytest.fixture(scope="module")
def buckets(events: pd.DataFrame, generated: GeneratedLogs) -> pd.DataFrame:
    """Per 10-minute bucket: distinct users, events, residual, time-of-day slot and the injected kind ('' if none)."""
    grouped = events.groupby(events["ts"].dt.floor("10min"))
    table = pd.DataFrame({"users": grouped["user"].nunique(), "clicks": grouped.size()})
    table = table.reindex(pd.date_range("2020-07-07", periods=DAYS * 144, freq="10min"), fill_value=0)
    table["residual"] = table["clicks"] - table["users"]
    table["slot"] = table.index.hour * 6 + table.index.minute // 10
    table["kind"] = ""
    for incident in generated.incidents:
        table.loc[incident.start : incident.end, "kind"] = incident.kind
    return table


@pytest.fixture(scope="module")
def normal(buckets: pd.DataFrame) -> pd.DataFrame:
    """Median of the fault-free buckets per time-of-day slot: what each bucket should look like."""
    clean = buckets[buckets["kind"] == ""]
    return clean.groupby("slot")[["users", "clicks", "residual"]].median()


def incident_buckets(buckets: pd.DataFrame, normal: pd.DataFrame, incident: InjectedIncident) -> pd.DataFrame:
    rows = buckets.loc[incident.start : incident.end]
    expected = normal.loc[rows["slot"]].set_axis(rows.index)
    return rows[["users", "clicks", "residual"]].join(expected, rsuffix="_normal")


def test_one_file_per_day_in_mixed_formats(generated: GeneratedLogs) -> None:
    names = [path.name for path in generated.files]
    days = [date(2020, 7, 7) + timedelta(days=offset) for offset in range(DAYS)]
    assert [name.split(".")[0] for name in names] == [f"clicks_{day}" for day in days]
    assert {path.suffixes[-1] for path in generated.files} == {".gz", ".jsonl"}
    assert sum(name.endswith(".jsonl") for name in names) == DAYS // 3
    landing = generated.files[0].parent
    assert sorted(path.name for path in landing.iterdir()) == sorted(names)  # no temporary files left behind


def test_csv_values_are_padded_like_the_reference(generated: GeneratedLogs) -> None:
    csv_file = next(path for path in generated.files if path.name.endswith(".csv.gz"))
    with gzip.open(csv_file, "rt") as handle:
        assert handle.readline() == "timestamp,page,user,session_id\n"
    frame = read_raw(csv_file)
    assert list(frame.columns) == COLUMNS
    assert frame["page"].str.fullmatch(r" p\d\d ").all()
    assert frame["user"].str.fullmatch(r" u\d{10}").all()
    assert frame["timestamp"].str.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d").all()
    session = frame["session_id"].str.split(" ; ", expand=True)
    assert (session[0] == frame["timestamp"]).all()
    assert (session[1] == frame["page"].str.strip()).all()
    assert session[2].str.fullmatch(r"u\d{10}").all()


def test_jsonl_has_the_same_fields(generated: GeneratedLogs) -> None:
    jsonl_file = next(path for path in generated.files if path.name.endswith(".jsonl"))
    frame = read_raw(jsonl_file)
    assert list(frame.columns) == COLUMNS
    assert len(frame) > 10_000
    assert frame["page"].str.strip().str.fullmatch(r"p\d\d").all()
    assert frame["user"].str.strip().str.fullmatch(r"u\d{10}").all()
    pd.to_datetime(frame["timestamp"], format="%Y-%m-%d %H:%M:%S")  # raises if any timestamp is malformed


def test_rows_are_not_in_time_order(generated: GeneratedLogs) -> None:
    frame = read_raw(generated.files[0])
    assert not frame["timestamp"].is_monotonic_increasing


def test_a_few_events_spill_into_the_next_days_file(events: pd.DataFrame) -> None:
    day = events["ts"].dt.normalize()
    spilled = events[day != events["file_day"]]
    assert 0 < len(spilled) < 0.001 * len(events)
    assert (spilled["file_day"] - spilled["ts"]).between(pd.Timedelta(0), pd.Timedelta(minutes=5)).all()


def test_population_pages_and_sessions_are_realistic(events: pd.DataFrame) -> None:
    codes = events["user"].str[1:].astype(int)
    assert 4_000 < codes[codes.between(1, 5_000)].nunique() <= 5_000  # a fixed population, most active
    popularity = events["page"].value_counts(normalize=True)
    assert len(popularity) == 20
    assert 0.3 < popularity.iloc[0] < 0.5  # a dominant home page
    assert popularity.iloc[-1] < 0.02  # and a long tail
    per_user_day = events.groupby([events["user"], events["ts"].dt.date]).size()
    assert 4 < per_user_day.median() < 10  # several clicks a day, in sessions


def test_daily_seasonality_matches_the_reference(buckets: pd.DataFrame) -> None:
    clean = buckets[buckets["kind"] == ""]
    night = clean[clean.index.hour < 6]
    afternoon = clean[(clean.index.hour >= 13) & (clean.index.hour < 15)]
    # reference: ~107 events and ~78 users per bucket at night; ~415 and ~270 in the early afternoon
    assert 90 < night["clicks"].mean() < 125
    assert 65 < night["users"].mean() < 95
    assert 3.2 < afternoon["clicks"].mean() / night["clicks"].mean() < 4.6
    assert 2.8 < afternoon["users"].mean() / night["users"].mean() < 4.0
    assert 1.25 < (night["clicks"] / night["users"]).mean() < 1.5
    # noise a little above Poisson, like the reference (sd ~14 at night)
    assert 9 < night.groupby("slot")["clicks"].std().mean() < 20


def test_incidents_are_placed_like_the_reference(generated: GeneratedLogs) -> None:
    incidents = generated.incidents
    assert round(0.9 * (DAYS - 1)) == len(incidents)
    assert {incident.kind for incident in incidents} == {"program_error", "outage"}
    for incident in incidents:
        assert incident.start.date() > date(2020, 7, 7)  # never on the cold-start day
        assert incident.start.minute % 10 == 0 and incident.start.second == 0
        buckets = (incident.end - incident.start) // timedelta(minutes=10) + 1
        assert 1 <= buckets <= (8 if incident.kind == "program_error" else 4)
    for before, after in pairwise(incidents):
        assert before.end < after.start


@pytest.mark.parametrize("days", [2, 9, 30])
def test_fault_plans_follow_the_rules_for_any_seed(days: int) -> None:
    for seed in range(200):
        faults = _plan_faults(np.random.default_rng(seed), days)
        assert len(faults) == round(0.9 * (days - 1))
        for fault in faults:
            day, slot = divmod(fault.first, 144)
            assert day >= 1 and fault.last // 144 == day  # not on the cold-start day, within one day
            assert slot >= 6 * 6 and fault.last % 144 < 21 * 6  # starts and ends by day
        for before, after in pairwise(faults):
            assert after.first - before.last > 12


def test_program_errors_corrupt_users_but_not_clicks(
    generated: GeneratedLogs, buckets: pd.DataFrame, normal: pd.DataFrame
) -> None:
    errors = [incident for incident in generated.incidents if incident.kind == "program_error"]
    assert errors
    for incident in errors:
        rows = incident_buckets(buckets, normal, incident)
        # clicks stay within the day-to-day spread of that time of day, clicks - users is far off in every bucket
        assert (rows["clicks"] / rows["clicks_normal"]).between(0.7, 1.4).all(), rows
        assert (abs(rows["residual"] / rows["residual_normal"] - 1) > 0.5).all(), rows
        # users drop (default id) or jump (fresh ids; at most to the click count, so only ~35% at night)
        assert abs(rows["users"].sum() / rows["users_normal"].sum() - 1) > 0.2, rows


def test_program_errors_leave_the_real_user_in_the_session_id(
    generated: GeneratedLogs, events: pd.DataFrame
) -> None:
    error = next(incident for incident in generated.incidents if incident.kind == "program_error")
    inside = events[events["ts"].between(error.start, error.end + timedelta(minutes=10), inclusive="left")]
    real = inside["session_id"].str.split(" ; ").str[2]
    assert (inside["user"] != real).mean() > 0.5
    assert real.str[1:].astype(int).between(1, 5_000).all()


def test_outages_drop_clicks_and_users(
    generated: GeneratedLogs, buckets: pd.DataFrame, normal: pd.DataFrame
) -> None:
    outages = [incident for incident in generated.incidents if incident.kind == "outage"]
    assert outages
    for incident in outages:
        rows = incident_buckets(buckets, normal, incident)
        assert (rows["clicks"] < 0.3 * rows["clicks_normal"]).all(), rows
        assert (rows["users"] < 0.35 * rows["users_normal"]).all(), rows


def test_labels_file_matches_the_incidents(generated: GeneratedLogs) -> None:
    assert generated.labels == generated.files[0].parent.parent / "labels" / "clickstream_labels.csv"
    labels = pd.read_csv(generated.labels, dtype=str)
    assert list(labels.columns) == ["start", "end", "kind"]
    parsed = [
        InjectedIncident(
            kind=row.kind, start=datetime.fromisoformat(row.start), end=datetime.fromisoformat(row.end)
        )
        for row in labels.itertuples()
    ]
    assert parsed == generated.incidents


def test_labels_path_can_be_chosen(tmp_path: Path) -> None:
    result = generate_clickstream(tmp_path / "landing", days=2, labels_path=tmp_path / "truth.csv")
    assert result.labels == tmp_path / "truth.csv"
    assert result.labels.read_text().startswith("start,end,kind\n")
    assert not (tmp_path / "labels").exists()


def decompressed(result: GeneratedLogs) -> list[str]:
    return [
        gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for path in result.files
    ] + [result.labels.read_text()]


def test_same_seed_same_content_and_another_seed_differs(tmp_path: Path) -> None:
    first = generate_clickstream(tmp_path / "a" / "landing", days=3, seed=11)
    again = generate_clickstream(tmp_path / "b" / "landing", days=3, seed=11)
    other = generate_clickstream(tmp_path / "c" / "landing", days=3, seed=12)
    assert decompressed(first) == decompressed(again)
    assert first.incidents == again.incidents
    assert all(x != y for x, y in zip(decompressed(first)[:-1], decompressed(other)[:-1], strict=True))


def test_regenerating_leaves_one_file_per_day(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    generate_clickstream(landing, days=3, start=date(2020, 7, 7))  # 07-09 as JSON lines
    generate_clickstream(landing, days=3, start=date(2020, 7, 8))  # 07-09 as gzip CSV, 07-10 as JSON lines
    names = sorted(path.name for path in landing.iterdir())
    assert [name.split(".")[0] for name in names] == [f"clicks_2020-07-{day:02d}" for day in (7, 8, 9, 10)]


def test_a_single_day_has_no_incidents(tmp_path: Path) -> None:
    result = generate_clickstream(tmp_path / "landing", days=1)
    assert result.incidents == []
    assert result.labels.read_text() == "start,end,kind\n"
    with pytest.raises(ValueError, match="days"):
        generate_clickstream(tmp_path / "landing", days=0)


# --- sensors ---------------------------------------------------------------------------------------

SENSOR_DAYS = 4


@pytest.fixture(scope="module")
def sensor_logs(tmp_path_factory: pytest.TempPathFactory) -> GeneratedLogs:
    return generate_sensors(tmp_path_factory.mktemp("sensors") / "landing", days=SENSOR_DAYS, seed=9)


@pytest.fixture(scope="module")
def readings(sensor_logs: GeneratedLogs) -> pd.DataFrame:
    frame = pd.concat(
        [pd.read_csv(path, dtype={"sensor_id": str}) for path in sensor_logs.files], ignore_index=True
    )
    frame["ts"] = pd.to_datetime(frame["timestamp"], format="%Y-%m-%d %H:%M:%S")
    frame["bucket"] = frame["ts"].dt.floor("10min")
    return frame


def test_sensor_files_hold_a_few_sensors_near_25_degrees_and_1012_hpa(
    sensor_logs: GeneratedLogs, readings: pd.DataFrame
) -> None:
    assert [path.name for path in sensor_logs.files] == [
        f"sensors_{SENSOR_START + timedelta(days=day)}.csv.gz" for day in range(SENSOR_DAYS)
    ]
    assert readings.columns[:4].tolist() == ["timestamp", "sensor_id", "temperature", "pressure"]
    assert sorted(readings["sensor_id"].unique()) == ["s01", "s02", "s03"]
    normal = readings[readings["temperature"] < 60]
    assert 18 < normal["temperature"].median() < 32 and 1000 < normal["pressure"].median() < 1024
    per_bucket = readings.groupby(["sensor_id", "bucket"]).size()
    assert per_bucket.median() == 20  # one reading every 30 s
    levels = normal.groupby("sensor_id")["temperature"].median()
    assert levels.max() - levels.min() > 0.5  # each sensor has its own level


def test_sensor_faults_look_like_their_labels(sensor_logs: GeneratedLogs, readings: pd.DataFrame) -> None:
    kinds = {incident.kind for incident in sensor_logs.incidents}
    assert {"spike", "dropout"} <= kinds
    assert all(
        incident.start.date() > SENSOR_START for incident in sensor_logs.incidents
    )  # not the cold start
    for incident in sensor_logs.incidents:
        rows = readings[
            (readings["sensor_id"] == incident.entity)
            & readings["bucket"].between(incident.start, incident.end)
        ]
        if incident.kind == "spike":
            assert ((rows["temperature"] == 100.0) & (rows["pressure"] == 950.0)).sum() == 1
        elif incident.kind == "dropout":
            assert rows.empty
        elif incident.kind == "stuck":
            assert rows["temperature"].nunique() == 1 and rows["pressure"].nunique() == 1
        else:  # drift: the end of the ramp is degrees above the bucket before it starts
            before = readings[
                (readings["sensor_id"] == incident.entity)
                & (readings["bucket"] == incident.start - timedelta(minutes=10))
            ]
            assert rows["temperature"].tail(20).mean() - before["temperature"].mean() > 1.5
    spikes = readings[readings["temperature"] == 100.0]
    assert len(spikes) == sum(incident.kind == "spike" for incident in sensor_logs.incidents)


def test_sensor_labels_name_the_sensor_and_read_like_clickstream_labels(sensor_logs: GeneratedLogs) -> None:
    assert sensor_logs.labels == sensor_logs.files[0].parent.parent / "labels" / "sensors_labels.csv"
    table = pd.read_csv(sensor_logs.labels, parse_dates=["start", "end"])
    assert table.columns.tolist() == ["start", "end", "kind", "sensor_id"]
    assert table["sensor_id"].tolist() == [incident.entity for incident in sensor_logs.incidents]
    labelled = load_labels(
        sensor_logs.labels, 10
    )  # the reader of clickstream labels; the 4th column is extra
    assert set(labelled.index) == {
        bucket
        for incident in sensor_logs.incidents
        for bucket in pd.date_range(incident.start, incident.end, freq="10min")
    }


def test_sensor_generation_is_deterministic_and_one_sensor_has_no_id_column(tmp_path: Path) -> None:
    first = generate_sensors(tmp_path / "a" / "landing", days=2, seed=4)
    again = generate_sensors(tmp_path / "b" / "landing", days=2, seed=4)
    assert decompressed(first) == decompressed(again)
    single = generate_sensors(tmp_path / "c" / "landing", days=2, seed=4, sensors=1)
    assert (
        gzip.decompress(single.files[0].read_bytes()).decode().splitlines()[0]
        == "timestamp,temperature,pressure"
    )
    assert single.labels.read_text().splitlines()[0] == "start,end,kind"
    with pytest.raises(ValueError, match="sensors"):
        generate_sensors(tmp_path / "d", days=2, sensors=0)
