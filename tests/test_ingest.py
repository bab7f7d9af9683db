"""Raw ingestion: mixed landing formats → typed UTC events per day, bad rows and files → quarantine."""

from __future__ import annotations

import gzip
import json
import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_dagster import ingest
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, SourceConfig, load_source
from anomaly_dagster.ingest import LandingFileError, LandingIndex, discover, ingest_window

DAY1, DAY2, DAY3 = date(2020, 7, 7), date(2020, 7, 8), date(2020, 7, 9)
COLUMNS = ["timestamp", "page", "user", "session_id"]


@pytest.fixture(scope="module")
def source() -> SourceConfig:
    return load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")


def with_timezone(source: SourceConfig, timezone: str) -> SourceConfig:
    return source.model_copy(update={"timestamp": source.timestamp.model_copy(update={"timezone": timezone})})


# --- writing landing files -------------------------------------------------------------------------


def make_events(rng: np.random.Generator, n: int, days: list[date]) -> pd.DataFrame:
    """Raw events as strings, padded like the reference data (`` p03 ``, `` u0000000007 ``)."""
    day = rng.choice(len(days), n)
    seconds = rng.integers(0, 86400, n)
    stamps = [
        (pd.Timestamp(days[d]) + pd.Timedelta(seconds=int(s))).strftime("%Y-%m-%d %H:%M:%S")
        for d, s in zip(day, seconds, strict=True)
    ]
    pages = [f" p{k:02d} " for k in rng.integers(0, 12, n)]
    users = [f" u{k:010d} " for k in rng.integers(0, 60, n)]
    sessions = [f"{t} ; {p.strip()} ; {u.strip()}" for t, p, u in zip(stamps, pages, users, strict=True)]
    return pd.DataFrame({"timestamp": stamps, "page": pages, "user": users, "session_id": sessions})


def write_frame(path: Path, frame: pd.DataFrame) -> Path:
    """Write string rows as CSV (optionally .gz), JSON lines or Parquet, chosen by the file name."""
    if path.name.endswith((".csv", ".csv.gz")):
        frame.to_csv(path, index=False)  # pandas compresses by suffix
    elif path.name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in frame.to_dict(orient="records")))
    elif path.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    else:
        raise AssertionError(path)
    return path


def line_of_row(path: Path, row: int) -> int:
    """The 1-based line of the 0-based data row ``row`` (CSV files have a header on line 1)."""
    return row + 2 if ".csv" in path.name else row + 1


def set_mtime(path: Path, when: datetime) -> None:
    stamp = when.replace(tzinfo=UTC).timestamp()
    os.utime(path, (stamp, stamp))


def index_and_ingest(
    source: SourceConfig, landing: Path, days: list[date], index_path: Path | None = None
) -> tuple[list[ingest.LandingFile], ingest.IngestedWindow]:
    index = LandingIndex(index_path or landing.parent / f"{landing.name}-index.json")
    entries = index.refresh(source, discover(source, landing))
    return entries, ingest_window(source, entries, days)


def events_of(window: ingest.IngestedWindow, day: date) -> pd.DataFrame:
    return window.connection.execute(window.events_sql(day)).df()


# --- a clean mixed landing folder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, source: SourceConfig):
    """Four formats each spanning two shuffled days, plus a file of a third day that must not be read."""
    landing = tmp_path_factory.mktemp("mixed") / "landing"
    landing.mkdir()
    rng = np.random.default_rng(11)
    events = make_events(rng, 800, [DAY1, DAY2])
    written: dict[Path, pd.DataFrame] = {}
    names = ["clicks_a.csv", "clicks_b.csv.gz", "clicks_c.jsonl", "clicks_d.parquet"]
    for name, part in zip(names, np.array_split(rng.permutation(len(events)), len(names)), strict=True):
        frame = events.iloc[part].reset_index(drop=True)
        written[write_frame(landing / name, frame).resolve()] = frame
    later = make_events(rng, 50, [DAY3])
    later_path = write_frame(landing / "clicks_later.csv", later).resolve()
    (landing / "notes.txt").write_text("not a source file\n")
    entries, window = index_and_ingest(source, landing, [DAY1, DAY2])
    return {
        "events": events,
        "written": written,
        "later": (later_path, later),
        "entries": entries,
        "window": window,
    }


def expected_events(raw: pd.DataFrame) -> pd.DataFrame:
    trimmed = raw.apply(lambda column: column.str.strip())
    trimmed["timestamp"] = pd.to_datetime(trimmed["timestamp"])
    return trimmed


def test_discover_matches_source_globs(mixed, source: SourceConfig) -> None:
    landing = next(iter(mixed["written"])).parent
    (landing / ".clicks_hidden.csv").write_text("timestamp,page,user,session_id\n")
    found = [path.name for path in discover(source, landing)]
    assert found == [
        "clicks_a.csv",
        "clicks_b.csv.gz",
        "clicks_c.jsonl",
        "clicks_d.parquet",
        "clicks_later.csv",
    ]


def test_a_landing_folder_that_does_not_exist_is_an_error_not_an_empty_day(
    tmp_path, source: SourceConfig
) -> None:
    """A mistyped ANOMALY_LANDING_DIR ingested nothing, and the run reported a quiet day."""
    with pytest.raises(
        LandingFileError, match=r"landing folder .*nowhere does not exist .*ANOMALY_LANDING_DIR"
    ):
        discover(source, tmp_path / "nowhere")
    (tmp_path / "emptied").mkdir()
    assert discover(source, tmp_path / "emptied") == []  # emptied by a retention job: fine


def test_index_gives_each_files_days(mixed) -> None:
    by_name = {Path(entry.path).name: entry for entry in mixed["entries"]}
    assert set(by_name) == {
        "clicks_a.csv",
        "clicks_b.csv.gz",
        "clicks_c.jsonl",
        "clicks_d.parquet",
        "clicks_later.csv",
    }
    for name in ["clicks_a.csv", "clicks_b.csv.gz", "clicks_c.jsonl", "clicks_d.parquet"]:
        assert by_name[name].days == ["2020-07-07", "2020-07-08"]
        assert by_name[name].home_day == "2020-07-07"
        assert by_name[name].touched_days == {DAY1, DAY2}
    assert by_name["clicks_later.csv"].days == ["2020-07-09"]
    assert by_name["clicks_later.csv"].size == mixed["later"][0].stat().st_size


def test_window_reads_only_files_touching_its_days(mixed) -> None:
    window = mixed["window"]
    expected = sorted(str(path) for path in mixed["written"])
    assert sorted(window.files[DAY1]) == expected
    assert sorted(window.files[DAY2]) == expected
    total = window.connection.execute("SELECT count(*) FROM events").fetchone()[0]
    assert total == len(mixed["events"])


@pytest.mark.parametrize("day", [DAY1, DAY2])
def test_events_per_day_are_exactly_the_raw_rows(mixed, day: date) -> None:
    got = events_of(mixed["window"], day)
    want = expected_events(mixed["events"])
    want = want[want["timestamp"].dt.date == day]
    assert len(got) == len(want) > 100
    assert got["user"].nunique() == want["user"].nunique()
    assert got["page"].nunique() == want["page"].nunique()
    columns = ["timestamp", "page", "user", "session_id"]
    pd.testing.assert_frame_equal(
        got[columns].sort_values(columns, ignore_index=True),
        want[columns].sort_values(columns, ignore_index=True),
        check_dtype=False,
    )
    assert got["timestamp"].is_monotonic_increasing
    assert got["timestamp"].dt.tz is None


def test_events_are_trimmed(mixed) -> None:
    got = events_of(mixed["window"], DAY1)
    for column in ["page", "user", "session_id"]:
        assert (got[column] == got[column].str.strip()).all()
    assert got["page"].str.fullmatch(r"p\d{2}").all()


def test_event_source_file_and_line_point_at_the_raw_row(mixed) -> None:
    got = pd.concat([events_of(mixed["window"], day) for day in (DAY1, DAY2)], ignore_index=True)
    assert set(got["source_file"]) == {str(path) for path in mixed["written"]}
    for path, frame in mixed["written"].items():
        rows = got[got["source_file"] == str(path)]
        assert sorted(rows["line"]) == [line_of_row(path, row) for row in range(len(frame))]
        for event in rows.sample(25, random_state=0).itertuples():
            raw = frame.iloc[event.line - (2 if ".csv" in path.name else 1)]
            assert (raw["user"].strip(), raw["page"].strip()) == (event.user, event.page)
            assert pd.Timestamp(raw["timestamp"]) == event.timestamp


def test_clean_files_have_empty_quarantine(mixed) -> None:
    for day in (DAY1, DAY2):
        quarantine = mixed["window"].quarantine[day]
        assert list(quarantine.columns) == ingest.QUARANTINE_COLUMNS
        assert quarantine.empty


# --- bad rows ---------------------------------------------------------------------------------------------


LONG = "x" * 33


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, source: SourceConfig):
    landing = tmp_path_factory.mktemp("bad") / "landing"
    landing.mkdir()
    csv_lines = [
        "timestamp,page,user,session_id",
        "2020-07-07 01:00:00, p01 , u1 ,s1",  # 2 good
        "not-a-time,p01,u2,s2",  # 3 unparseable timestamp (home day)
        "2020-07-08 02:00:00,p01,,s3",  # 4 missing user (its own day)
        "2020-07-07 03:00:00,p01,u4,s4,extra",  # 5 too many columns (home day)
        "2020-07-07 03:10:00,p01,u5,s5,extra,more",  # 6 too many columns
        f"2020-07-08 04:00:00,p01,{LONG},s6",  # 7 field too long (its own day)
        "2020-07-08 05:00:00,p02,u7,s7",  # 8 good, after rejected lines
        ",p01,u8,s8",  # 9 missing timestamp
        "2020-07-06 23:59:59,p01,u9,s9",  # 10 before the source's start date
        "2020-07-07 06:00:00,p03,u10,",  # 11 good, optional session_id empty
    ]
    csv_path = landing / "clicks_bad.csv"
    csv_path.write_text("\n".join(csv_lines) + "\n")
    json_lines = [
        json.dumps({"timestamp": "2020-07-07 05:00:00", "page": "p01", "user": "u11"}),  # 1 good
        '{"timestamp": "2020-07-07 05:00:00", "page": "p01", "user": ',  # 2 malformed
        json.dumps({"timestamp": "2020-07-08 05:00:00", "page": "p04", "user": "u12"}),  # 3 good
        json.dumps({"timestamp": "2020-07-08 06:00:00", "page": "p01"}),  # 4 missing user
    ]
    json_path = landing / "clicks_bad.jsonl"
    json_path.write_text("\n".join(json_lines) + "\n")
    parquet_path = write_frame(
        landing / "clicks_bad.parquet",
        pd.DataFrame(
            {
                "timestamp": ["2020-07-07 07:00:00", "2020-07-07 07:10:00", "garbage"],
                "page": ["p05", "p05", "p05"],
                "user": ["u13", None, "u14"],
                "session_id": ["s", "s", "s"],
            }
        ),
    )
    narrow = source.model_copy(update={"max_field_length": 32})
    entries, window = index_and_ingest(narrow, landing, [DAY1, DAY2])
    return {
        "csv": str(csv_path.resolve()),
        "json": str(json_path.resolve()),
        "parquet": str(parquet_path.resolve()),
        "entries": entries,
        "window": window,
    }


def quarantine_summary(frame: pd.DataFrame, bad: dict) -> list[tuple[str, int, str]]:
    names = {bad[kind]: kind for kind in ("csv", "json", "parquet")}
    return [(names[row.source_file], int(row.line), row.reason) for row in frame.itertuples()]


def test_bad_rows_of_first_day_are_quarantined_with_file_line_and_reason(bad) -> None:
    rows = quarantine_summary(bad["window"].quarantine[DAY1], bad)
    assert [(kind, line) for kind, line, _ in rows] == sorted(
        [
            ("csv", 3),
            ("csv", 5),
            ("csv", 6),
            ("csv", 9),
            ("csv", 10),
            ("json", 2),
            ("parquet", 2),
            ("parquet", 3),
        ],
        key=lambda pair: (bad[pair[0]], pair[1]),
    )
    reasons = {(kind, line): reason for kind, line, reason in rows}
    assert reasons[("csv", 3)] == "unparseable timestamp not-a-time"
    assert reasons[("csv", 5)].lower().startswith("too many columns")
    assert reasons[("csv", 6)].lower().startswith("too many columns")
    assert reasons[("csv", 9)] == "missing timestamp"
    assert reasons[("csv", 10)] == "timestamp outside the source range 2020-07-06 23:59:59"
    assert reasons[("json", 2)] == "malformed JSON"
    assert reasons[("parquet", 2)] == "missing user"
    assert reasons[("parquet", 3)] == "unparseable timestamp garbage"


def test_bad_rows_with_usable_timestamp_go_to_their_own_day(bad) -> None:
    rows = quarantine_summary(bad["window"].quarantine[DAY2], bad)
    assert rows == sorted(
        [
            ("csv", 4, "missing user"),
            ("csv", 7, "field user longer than 32 characters"),
            ("json", 4, "missing user"),
        ],
        key=lambda row: (bad[row[0]], row[1]),
    )


def test_quarantine_keeps_the_raw_text(bad) -> None:
    assert str(bad["window"].quarantine[DAY1]["line"].dtype) == "Int64"
    quarantine = bad["window"].quarantine[DAY1].set_index(["source_file", "line"])
    assert (
        quarantine.loc[(bad["json"], 2), "raw"]
        == '{"timestamp": "2020-07-07 05:00:00", "page": "p01", "user": '
    )
    assert "extra,more" in quarantine.loc[(bad["csv"], 6), "raw"]
    assert quarantine.loc[(bad["csv"], 3), "raw"].startswith("not-a-time,p01,u2")


def test_good_rows_around_bad_rows_keep_their_lines(bad) -> None:
    events = pd.concat([events_of(bad["window"], day) for day in (DAY1, DAY2)], ignore_index=True)
    summary = sorted(
        (Path(row.source_file).suffix, int(row.line), row.user, row.page) for row in events.itertuples()
    )
    assert summary == sorted(
        [
            (".csv", 2, "u1", "p01"),
            (".csv", 8, "u7", "p02"),
            (".csv", 11, "u10", "p03"),
            (".jsonl", 1, "u11", "p01"),
            (".jsonl", 3, "u12", "p04"),
            (".parquet", 1, "u13", "p05"),
        ]
    )
    optional = events[events["user"] == "u10"]
    assert optional["session_id"].isna().all()


def test_index_days_of_bad_files(bad) -> None:
    by_name = {Path(entry.path).name: entry for entry in bad["entries"]}
    assert by_name["clicks_bad.csv"].days == ["2020-07-07", "2020-07-08"]
    assert by_name["clicks_bad.parquet"].days == ["2020-07-07"]


def test_field_length_limit_is_configurable(tmp_path: Path, source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.csv").write_text(
        f"timestamp,page,user,session_id\n2020-07-07 00:00:00,p,{'u' * 40},s\n"
    )
    _, strict = index_and_ingest(
        source.model_copy(update={"max_field_length": 39}), landing, [DAY1], tmp_path / "a.json"
    )
    _, relaxed = index_and_ingest(
        source.model_copy(update={"max_field_length": 40}), landing, [DAY1], tmp_path / "b.json"
    )
    assert strict.quarantine[DAY1]["reason"].tolist() == ["field user longer than 39 characters"]
    assert events_of(strict, DAY1).empty
    assert relaxed.quarantine[DAY1].empty
    assert len(events_of(relaxed, DAY1)) == 1


@pytest.mark.parametrize("name", ["clicks_blank.csv", "clicks_blank.csv.gz"])
def test_blank_lines_do_not_shift_line_numbers(tmp_path: Path, source: SourceConfig, name: str) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    text = (
        "timestamp,page,user,session_id\r\n"  # 1
        "2020-07-07 01:00:00,p,u2,s\r\n"  # 2
        "\r\n"  # 3 blank
        "\r\n"  # 4 blank
        "2020-07-07 01:00:00,p,u5,s,extra\r\n"  # 5 rejected
        "2020-07-07 01:00:00,p,,s\r\n"  # 6 missing user
        "\r\n"  # 7 blank
        "2020-07-07 01:00:00,p,u8,s\r\n"  # 8
    )
    path = landing / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    _, window = index_and_ingest(source, landing, [DAY1])
    assert dict(zip(events_of(window, DAY1)["user"], events_of(window, DAY1)["line"], strict=True)) == {
        "u2": 2,
        "u8": 8,
    }
    assert window.quarantine[DAY1]["line"].tolist() == [5, 6]


def test_line_numbers_hold_in_a_file_duckdb_reads_in_parallel(tmp_path: Path, source: SourceConfig) -> None:
    """Rows are numbered by their position in the read (rowid); over a file of many read buffers, with
    blank, rejected and quarantined lines spread through it, every event still names its own line."""
    landing = tmp_path / "landing"
    landing.mkdir()
    rng = np.random.default_rng(7)
    special = {
        int(line): kind
        for line, kind in zip(rng.choice(np.arange(2, 400_000), 60, replace=False), "brq" * 20, strict=True)
    }
    lines = ["timestamp,page,user,session_id"]
    for number in range(2, 400_001):
        kind = special.get(number)
        second = number % 86_400
        stamp = f"2020-07-07 {second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
        if kind == "b":
            lines.append("")
        elif kind == "r":
            lines.append(f"{stamp},p,u{number},s,extra")
        elif kind == "q":
            lines.append(f"not a time,p,u{number},s")
        else:
            lines.append(f"{stamp}, p{number % 7} , u{number},session-{number:012d}-{'x' * 70}")
    (landing / "clicks_big.csv").write_text("\n".join(lines) + "\n")
    assert (landing / "clicks_big.csv").stat().st_size > 40 << 20  # many read buffers, read by every thread
    _, window = index_and_ingest(source, landing, [DAY1])
    events = events_of(window, DAY1)
    good = [number for number in range(2, 400_001) if number not in special]
    assert len(events) == len(good)
    assert (events["user"] == "u" + events["line"].astype(str)).all()
    assert sorted(events["line"]) == good
    quarantined = window.quarantine[DAY1]
    assert sorted(quarantined["line"]) == sorted(line for line, kind in special.items() if kind in "rq")
    assert (quarantined["raw"].str.extract(r",u(\d+),")[0].astype(int) == quarantined["line"]).all()


@pytest.mark.parametrize(
    ("header", "rows", "blank"),
    [("\r\n", "\n", "\n"), ("\n", "\r\n", "\r\n"), ("\n", "\n", "\r\n"), ("\r\n", "\r\n", "\n")],
    ids=["crlf-header", "crlf-rows", "one-crlf-blank", "one-lf-blank"],
)
@pytest.mark.parametrize("name", ["clicks_mixed.csv", "clicks_mixed.csv.gz"])
def test_mixed_line_ends_are_read_line_by_line(
    tmp_path: Path, source: SourceConfig, name: str, header: str, rows: str, blank: str
) -> None:
    """DuckDB's reader refuses a file mixing ``\\n`` and ``\\r\\n``: every line is still read."""
    landing = tmp_path / "landing"
    landing.mkdir()
    text = (
        f"timestamp,page,user,session_id{header}"  # 1
        f"2020-07-07 01:00:00,p,u2,s{rows}"  # 2
        f"{blank}"  # 3 blank
        f'2020-07-07 01:00:00,"p,u4,s{rows}'  # 4 unterminated quote
        f"2020-07-07 01:00:00,p,u5,s,extra{rows}"  # 5 rejected
        f"2020-07-07 01:00:00,p,,s{rows}"  # 6 missing user
        f"2020-07-07 01:00:00,p,u7,s{rows}"  # 7
    )
    path = landing / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    _, window = index_and_ingest(source, landing, [DAY1])
    events = events_of(window, DAY1)
    assert dict(zip(events["user"], events["line"], strict=True)) == {"u2": 2, "u7": 7}
    assert events["session_id"].tolist() == ["s", "s"]
    quarantine = window.quarantine[DAY1]
    assert quarantine["line"].tolist() == [4, 5, 6]
    assert quarantine["reason"].iloc[0] == ingest.UNTERMINATED_QUOTE
    assert quarantine["reason"].iloc[2] == "missing user"


def test_columns_are_found_by_header_name_not_position(tmp_path: Path, source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.csv").write_text(" user , timestamp ,page\nu1,2020-07-07 00:10:00,p9\n")
    _, window = index_and_ingest(source, landing, [DAY1])
    events = events_of(window, DAY1)
    assert events[["user", "page"]].values.tolist() == [["u1", "p9"]]
    assert events["timestamp"].tolist() == [pd.Timestamp("2020-07-07 00:10:00")]
    assert events["session_id"].isna().all()


# --- whole-file problems ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("clicks.csv", lambda p: p.write_text("time,page,user,session_id\n2020-07-07 00:00:00,p,u,s\n")),
        ("clicks.csv.gz", lambda p: p.write_bytes(gzip.compress(b"page,user\np,u\n"))),
        (
            "clicks.parquet",
            lambda p: pq.write_table(pa.table({"page": ["p"], "user": ["u"], "session_id": ["s"]}), p),
        ),
    ],
)
def test_file_missing_timestamp_column_raises_naming_the_file(
    tmp_path: Path, source: SourceConfig, name: str, write
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    write(landing / name)
    with pytest.raises(LandingFileError) as raised:
        LandingIndex(tmp_path / "index.json").refresh(source, discover(source, landing))
    message = str(raised.value)
    assert str((landing / name).resolve()) in message
    assert "missing required column(s) ['timestamp']" in message
    assert "'clickstream'" in message


def test_file_missing_required_column_raises_but_optional_may_be_absent(
    tmp_path: Path, source: SourceConfig
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.csv").write_text("timestamp,page,session_id\n2020-07-07 00:00:00,p,s\n")
    with pytest.raises(LandingFileError, match=r"missing required column\(s\) \['user'\]"):
        LandingIndex(tmp_path / "index.json").refresh(source, discover(source, landing))


def test_truncated_gzip_is_quarantined_as_a_file_and_others_go_on(
    tmp_path: Path, source: SourceConfig
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    good = write_frame(landing / "clicks_good.csv", make_events(np.random.default_rng(3), 200, [DAY1]))
    payload = gzip.compress(
        ("timestamp,page,user,session_id\n" + "2020-07-07 00:00:00,p,u,s\n" * 5000).encode()
    )
    truncated = landing / "clicks_truncated.csv.gz"
    truncated.write_bytes(payload[: len(payload) // 2])
    garbage = landing / "clicks_garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 8)
    empty = landing / "clicks_empty.jsonl.gz"
    empty.write_bytes(b"\x1f\x8b\x08\x00broken")
    old_mac = landing / "clicks_old_mac.csv"  # bare CR line ends: the csv module raised, failing every file
    old_mac.write_bytes(b"timestamp,page,user\r2020-07-07 10:00:00,p1,u1\r2020-07-07 10:01:00,p1,u2\r")
    for path in (truncated, garbage, empty, old_mac):
        set_mtime(path, datetime(2020, 7, 7, 12, 0))

    entries, window = index_and_ingest(source, landing, [DAY1])
    by_name = {Path(entry.path).name: entry for entry in entries}
    unreadable = [
        "clicks_truncated.csv.gz",
        "clicks_garbage.csv",
        "clicks_empty.jsonl.gz",
        "clicks_old_mac.csv",
    ]
    for name in unreadable:
        assert by_name[name].days == []
        assert by_name[name].home_day == "2020-07-07"  # the modification day
    assert by_name["clicks_good.csv"].days == ["2020-07-07"]

    quarantine = window.quarantine[DAY1]
    assert sorted(Path(name).name for name in quarantine["source_file"]) == sorted(unreadable)
    assert quarantine["line"].isna().all()
    assert quarantine["reason"].str.startswith("unreadable file: ").all()
    events = events_of(window, DAY1)
    assert len(events) == 200
    assert set(events["source_file"]) == {str(good.resolve())}


def test_a_file_modified_before_the_source_starts_quarantines_on_its_first_day(
    tmp_path: Path, source: SourceConfig
) -> None:
    """An archive copied with its times kept: its rows must land on a day the pipeline has."""
    landing = tmp_path / "landing"
    landing.mkdir()
    garbage = landing / "clicks_archive.csv"
    garbage.write_bytes(bytes(range(256)) * 8)
    early = landing / "clicks_early.csv"
    early.write_text("timestamp,page,user,session_id\n2020-07-06 23:00:00,p,u,s\n2020-07-06 23:30:00,p,u,s\n")
    for path in (garbage, early):
        set_mtime(path, datetime(2019, 12, 31, 12, 0))
    entries, window = index_and_ingest(source, landing, [DAY1])
    assert {Path(entry.path).name: entry.home_day for entry in entries} == {
        "clicks_archive.csv": "2020-07-07",
        "clicks_early.csv": "2020-07-07",
    }
    reasons = window.quarantine[DAY1].groupby(
        window.quarantine[DAY1]["source_file"].map(lambda p: Path(p).name)
    )
    assert reasons.size().to_dict() == {"clicks_archive.csv": 1, "clicks_early.csv": 2}


def test_a_file_appended_to_while_it_is_read_is_read_again(
    tmp_path: Path, source: SourceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index keeps the size and time seen before the read, so the appended day is not lost."""
    landing = tmp_path / "landing"
    landing.mkdir()
    log = landing / "clicks_live.csv"
    log.write_text("timestamp,page,user,session_id\n2020-07-07 10:00:00,p,u1,s\n")
    read_file = ingest.load_file

    def read_then_append(*args, **kwargs):
        result = read_file(*args, **kwargs)
        monkeypatch.setattr(ingest, "load_file", read_file)  # only the first read races the writer
        with log.open("a") as handle:
            handle.write("2020-07-08 10:00:00,p,u2,s\n")
        return result

    monkeypatch.setattr(ingest, "load_file", read_then_append)
    index = LandingIndex(tmp_path / "index.json")
    first = ingest.ingest_landing(source, index, discover(source, landing), [DAY1, DAY2])
    assert len(events_of(first, DAY1)) == 1 and len(events_of(first, DAY2)) == 0
    again = ingest.ingest_landing(source, index, discover(source, landing), [DAY2])
    assert events_of(again, DAY2)["user"].tolist() == ["u2"]
    assert index.entries[str(log.resolve())].days == ["2020-07-07", "2020-07-08"]


def test_unreadable_file_outside_window_is_not_reported(tmp_path: Path, source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    write_frame(landing / "clicks_good.csv", make_events(np.random.default_rng(4), 20, [DAY1]))
    broken = landing / "clicks_broken.csv.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00")
    set_mtime(broken, datetime(2020, 7, 9, 1, 0))
    _, window = index_and_ingest(source, landing, [DAY1])
    assert window.quarantine[DAY1].empty
    assert window.files[DAY1] == [str((landing / "clicks_good.csv").resolve())]


# --- time zones -------------------------------------------------------------------------------------------


def test_iso_timestamps_with_offsets_become_naive_utc(tmp_path: Path, source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.csv").write_text(
        "timestamp,page,user,session_id\n"
        "2020-07-07T02:00:00+02:00,p,u1,s\n"
        "2020-07-07T23:30:00-02:00,p,u2,s\n"
        "2020-07-07T10:00:00Z,p,u3,s\n"
        "2020-07-07 11:00:00,p,u4,s\n"
    )
    write_frame(
        landing / "clicks.jsonl",
        pd.DataFrame({"timestamp": ["2020-07-08T09:15:00+05:30"], "page": ["p"], "user": ["u5"]}),
    )
    _, window = index_and_ingest(source, landing, [DAY1, DAY2])
    got = pd.concat([events_of(window, day) for day in (DAY1, DAY2)], ignore_index=True)
    assert got["timestamp"].dt.tz is None
    assert dict(zip(got["user"], got["timestamp"], strict=True)) == {
        "u1": pd.Timestamp("2020-07-07 00:00:00"),
        "u2": pd.Timestamp("2020-07-08 01:30:00"),
        "u3": pd.Timestamp("2020-07-07 10:00:00"),
        "u4": pd.Timestamp("2020-07-07 11:00:00"),
        "u5": pd.Timestamp("2020-07-08 03:45:00"),
    }
    assert sorted(events_of(window, DAY2)["user"]) == ["u2", "u5"]


def test_a_zone_name_in_the_format_still_gives_naive_utc(tmp_path: Path, source: SourceConfig) -> None:
    """With %Z in the format and timezone UTC the column came out as TIMESTAMPTZ, which the resample
    joined against its naive grid in the host's zone: on a New York host it shifted and lost events."""
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.csv").write_text(
        "timestamp,page,user\n2020-07-07 02:05:00 UTC,p,u1\n2020-07-07 10:05:00 UTC,p,u2\n"
    )
    zoned = source.model_copy(
        update={"timestamp": source.timestamp.model_copy(update={"format": "%Y-%m-%d %H:%M:%S %Z"})}
    )
    _, window = index_and_ingest(zoned, landing, [DAY1])
    events = events_of(window, DAY1)
    assert events["timestamp"].dt.tz is None
    assert events["timestamp"].tolist() == [
        pd.Timestamp("2020-07-07 02:05"),
        pd.Timestamp("2020-07-07 10:05"),
    ]


def test_source_timezone_converts_local_times_to_utc(tmp_path: Path, source: SourceConfig) -> None:
    berlin = with_timezone(source, "Europe/Berlin")
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.csv").write_text(
        "timestamp,page,user,session_id\n"
        "2020-07-07 12:00:00,p,summer,s\n"  # CEST, UTC+2
        "2020-07-08 01:30:00,p,after_midnight,s\n"  # still the 7th in UTC
        "2020-07-08 03:00:00+00:00,p,explicit,s\n"  # an explicit offset wins over the source zone
        "2020-07-07 01:00:00,p,too_early,s\n"  # 2020-07-06 23:00 UTC: before start_date
    )
    pq.write_table(
        pa.table({"timestamp": ["2020-12-01 12:00:00"], "page": ["p"], "user": ["winter"]}),
        landing / "clicks.parquet",
    )
    december = date(2020, 12, 1)
    _, window = index_and_ingest(berlin, landing, [DAY1, DAY2, december])
    got = pd.concat([events_of(window, day) for day in (DAY1, DAY2, december)], ignore_index=True)
    assert got["timestamp"].dt.tz is None
    assert dict(zip(got["user"], got["timestamp"], strict=True)) == {
        "summer": pd.Timestamp("2020-07-07 10:00:00"),
        "after_midnight": pd.Timestamp("2020-07-07 23:30:00"),
        "explicit": pd.Timestamp("2020-07-08 03:00:00"),
        "winter": pd.Timestamp("2020-12-01 11:00:00"),  # CET, UTC+1
    }
    assert sorted(events_of(window, DAY1)["user"]) == ["after_midnight", "summer"]
    assert window.quarantine[DAY1]["reason"].tolist() == [
        "timestamp outside the source range 2020-07-06 23:00:00"
    ]


def test_custom_timestamp_format(tmp_path: Path, source: SourceConfig) -> None:
    custom = source.model_copy(
        update={"timestamp": source.timestamp.model_copy(update={"format": "%d/%m/%Y %H:%M"})}
    )
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.csv").write_text("timestamp,page,user,session_id\n08/07/2020 13:45,p,u,s\n")
    _, window = index_and_ingest(custom, landing, [DAY2])
    assert events_of(window, DAY2)["timestamp"].tolist() == [pd.Timestamp("2020-07-08 13:45:00")]


# --- the landing index ------------------------------------------------------------------------------------


def test_index_rereads_only_new_or_changed_files(
    tmp_path: Path, source: SourceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    rng = np.random.default_rng(5)
    first = write_frame(landing / "clicks_1.csv", make_events(rng, 30, [DAY1]))
    second = write_frame(landing / "clicks_2.jsonl", make_events(rng, 30, [DAY2]))
    indexed: list[str] = []
    original = ingest._index_file

    def counting(connection, source, path, size, mtime_ns):
        indexed.append(Path(path).name)
        return original(connection, source, path, size, mtime_ns)

    monkeypatch.setattr(ingest, "_index_file", counting)
    index_path = tmp_path / "warehouse" / "index.json"
    index = LandingIndex(index_path)
    before = index.refresh(source, discover(source, landing))
    assert sorted(indexed) == ["clicks_1.csv", "clicks_2.jsonl"]
    assert index_path.exists()

    indexed.clear()
    again = index.refresh(source, discover(source, landing))
    assert indexed == []
    assert all(a is b for a, b in zip(before, again, strict=True))

    # a fresh index object reads the persisted JSON and still re-reads nothing
    reloaded = LandingIndex(index_path)
    assert reloaded.entries == index.entries
    assert reloaded.refresh(source, discover(source, landing)) == before
    assert indexed == []

    # appending changes size and mtime: only that file is re-read and its days updated
    with open(second, "a") as handle:
        handle.write(json.dumps({"timestamp": "2020-07-09 00:00:01", "page": "p", "user": "u"}) + "\n")
    changed = reloaded.refresh(source, discover(source, landing))
    assert indexed == ["clicks_2.jsonl"]
    assert changed[0] is reloaded.entries[str(first.resolve())]
    assert changed[1].days == ["2020-07-08", "2020-07-09"]

    # same size, new mtime: re-read too
    indexed.clear()
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    reloaded.refresh(source, discover(source, landing))
    assert indexed == ["clicks_1.csv"]


def test_index_entry_round_trips_through_json(tmp_path: Path, source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    write_frame(landing / "clicks.parquet", make_events(np.random.default_rng(6), 10, [DAY1, DAY3]))
    index_path = tmp_path / "index.json"
    (entry,) = LandingIndex(index_path).refresh(source, discover(source, landing))
    document = json.loads(index_path.read_text())
    assert document == {
        entry.path: {
            "path": entry.path,
            "size": entry.size,
            "mtime_ns": entry.mtime_ns,
            "days": ["2020-07-07", "2020-07-09"],
            "home_day": "2020-07-07",
            "digests": entry.digests,
            "version": ingest.INDEX_VERSION,
        }
    }
    assert sorted(entry.digests) == ["2020-07-07", "2020-07-09"]
    assert list(index_path.parent.glob(".*tmp*")) == []
    assert LandingIndex(index_path).entries[entry.path] == entry


def test_ingest_window_skips_files_not_touching_days(tmp_path: Path, source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    write_frame(landing / "clicks.csv", make_events(np.random.default_rng(8), 10, [DAY3]))
    _, window = index_and_ingest(source, landing, [DAY1, DAY2])
    assert window.files == {DAY1: [], DAY2: []}
    assert window.connection.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    assert events_of(window, DAY1).empty


# --- what the landing sensor asks for -----------------------------------------------------------------------


def landing_file(name: str, days: list[date], size: int = 100) -> ingest.LandingFile:
    return ingest.LandingFile(
        f"/landing/{name}", size, 1, [day.isoformat() for day in days], days[0].isoformat()
    )


def test_a_new_file_runs_its_days_and_those_that_read_them_in_one_range(source: SourceConfig) -> None:
    history = [landing_file(f"clicks_{offset}.csv", [DAY1 + timedelta(days=offset)]) for offset in range(12)]
    first = ingest.plan_landing_runs(source, history, {}, DAY1 + timedelta(days=11))
    assert (first.first, first.last) == (DAY1, DAY1 + timedelta(days=11))
    late = landing_file("clicks_late.csv", [DAY2])
    plan = ingest.plan_landing_runs(source, [*history, late], first.cursor, DAY1 + timedelta(days=11))
    # day 2, then the training_days (7) after it whose lags and models read it
    assert (plan.first, plan.last) == (DAY2, DAY2 + timedelta(days=7))
    again = ingest.plan_landing_runs(source, [*history, late], plan.cursor, DAY1 + timedelta(days=11))
    assert (again.first, again.last) == (None, None)


def test_the_range_stops_at_the_last_day_with_data(source: SourceConfig) -> None:
    plan = ingest.plan_landing_runs(source, [landing_file("clicks.csv", [DAY1, DAY2])], {}, date(2026, 1, 1))
    assert (plan.first, plan.last) == (DAY1, DAY2)


def test_a_day_that_is_not_a_partition_yet_runs_once_it_is(source: SourceConfig) -> None:
    today = landing_file("clicks_today.csv", [DAY2, DAY3])
    before = ingest.plan_landing_runs(source, [today], {}, DAY2)
    assert (before.first, before.last) == (DAY2, DAY2)
    after = ingest.plan_landing_runs(source, [today], before.cursor, DAY3)
    assert (after.first, after.last) == (DAY3, DAY3)
    assert ingest.plan_landing_runs(source, [today], after.cursor, DAY3).first is None


def test_a_changed_file_runs_the_days_it_left_too(source: SourceConfig) -> None:
    moved_from = ingest.plan_landing_runs(source, [landing_file("clicks.csv", [DAY1])], {}, DAY3)
    rewritten = landing_file("clicks.csv", [DAY3], size=120)  # its events moved from day 1 to day 3
    plan = ingest.plan_landing_runs(source, [rewritten], moved_from.cursor, DAY3)
    assert (plan.first, plan.last) == (DAY1, DAY3)
    assert plan.cursor["/landing/clicks.csv"] == [120, 1, ["2020-07-09"], {}]


def test_a_file_growing_with_todays_lines_asks_only_for_the_days_whose_rows_changed(
    tmp_path: Path, source: SourceConfig
) -> None:
    """Today's file also held a few late events of yesterday: every line appended today re-ran
    yesterday's whole chain on the next sensor tick."""
    landing = tmp_path / "landing"
    landing.mkdir()
    path = landing / "clicks_today.csv"
    lines = ["timestamp,page,user", "2020-07-08 23:58:00,p,late", "2020-07-09 00:01:00,p,u1"]
    path.write_text("\n".join(lines) + "\n")
    index = LandingIndex(tmp_path / "index.json")
    first = ingest.plan_landing_runs(source, index.refresh(source, [path]), {}, DAY3)
    assert (first.first, first.last) == (DAY2, DAY3)
    with open(path, "a") as handle:
        handle.write("2020-07-09 00:05:00,p,u2\n")
    grown = ingest.plan_landing_runs(source, index.refresh(source, [path]), first.cursor, DAY3)
    assert (grown.first, grown.last) == (DAY3, DAY3)
    with open(path, "a") as handle:
        handle.write("2020-07-08 23:59:00,p,later\n")  # yesterday's rows changed after all
    assert ingest.plan_landing_runs(source, index.refresh(source, [path]), grown.cursor, DAY3).first == DAY2


def test_a_deleted_file_or_an_older_cursor_asks_for_nothing(source: SourceConfig) -> None:
    kept = landing_file("clicks_kept.csv", [DAY1])
    cursor = {
        "/landing/clicks_kept.csv": [100, 1, ["2020-07-07"]],
        "/landing/clicks_gone.csv": [5, 1, ["2020-07-08"]],
    }
    plan = ingest.plan_landing_runs(source, [kept], cursor, DAY3)
    assert plan.first is None and list(plan.cursor) == ["/landing/clicks_kept.csv"]
    older = {"/landing/clicks_kept.csv": [100, 1]}  # a cursor without days: they were asked for
    assert ingest.plan_landing_runs(source, [kept], older, DAY3).first is None


@pytest.mark.parametrize("ends", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("stray", ["p\r", "s\r\r"], ids=["inside-a-field", "before-the-line-end"])
@pytest.mark.parametrize("name", ["clicks_cr.csv", "clicks_cr.csv.gz"])
def test_a_stray_carriage_return_quarantines_its_line_not_the_file(
    tmp_path: Path, source: SourceConfig, name: str, stray: str, ends: str
) -> None:
    """One \\r outside quotes that is not a line end made DuckDB's reader fail the whole file ("The CSV
    Parser state machine reached an invalid state"): every other event of the file was lost. A \\r
    inside quotes was always read (and quarantined as a control character), and still is."""
    landing = tmp_path / "landing"
    landing.mkdir()
    bad = "2020-07-07 01:00:00,p\r,u3,s" if stray == "p\r" else "2020-07-07 01:00:00,p,u3,s\r\r"
    lines = ["timestamp,page,user,session_id", "2020-07-07 01:00:00,p,u2,s", bad]
    lines += ['2020-07-07 01:00:00,"p\rq",u4,s', "2020-07-07 01:00:00,p,u5,s", ""]
    text = ends.join(lines)
    path = landing / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    _, window = index_and_ingest(source, landing, [DAY1])
    events = events_of(window, DAY1)
    assert dict(zip(events["user"], events["line"], strict=True)) == {"u2": 2, "u5": 5}
    quarantine = window.quarantine[DAY1]
    assert quarantine["line"].tolist() == [3, 4]
    assert quarantine["reason"].tolist() == [ingest.BARE_CARRIAGE_RETURN, "control characters in page"]


def test_a_day_files_bad_lines_go_to_its_own_day_not_the_day_of_its_late_events(tmp_path, source) -> None:
    """clicks_2020-07-08.csv carries a late event of 07-07, so its bad lines (no usable timestamp) went to
    07-07: the daily run of 07-08 dropped them, and only a rerun of 07-07 would ever have written them."""
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks_2020-07-08.csv").write_text(
        "timestamp,page,user,session_id\n"
        "2020-07-07 23:59:58,p1,u1,s1\n"
        "2020-07-08 00:00:03,p1,u1,s1\n"
        "2020-07-08 25:00:00,p2,u2,s2\n"
        "2020-07-08 00:10:00,p3,u3,s3\n"
    )
    entries, window = index_and_ingest(source, landing, [DAY2])  # the schedule's run of 07-08
    assert entries[0].days == ["2020-07-07", "2020-07-08"] and entries[0].home_day == "2020-07-08"
    quarantined = window.quarantine[DAY2]
    assert quarantined[["line", "reason"]].values.tolist() == [
        [4, "unparseable timestamp 2020-07-08 25:00:00"]
    ]
    # an index written by the earlier rule (no version, home day 07-07) is not trusted for the file
    index_path = landing.parent / "landing-index.json"
    document = json.loads(index_path.read_text())
    for entry in document.values():
        entry.pop("version")
        entry["home_day"] = "2020-07-07"
    index_path.write_text(json.dumps(document))
    entries, window = index_and_ingest(source, landing, [DAY2])
    assert entries[0].home_day == "2020-07-08" and len(window.quarantine[DAY2]) == 1
    (landing / "clicks_late.csv").write_text((landing / "clicks_2020-07-08.csv").read_text())
    (landing / "clicks_2020-07-08.csv").unlink()
    entries, _ = index_and_ingest(source, landing, [DAY2], tmp_path / "other-index.json")
    assert entries[0].home_day == "2020-07-07"  # no date in the name: its first valid day, as before


def test_a_tab_separated_file_is_refused_by_name(tmp_path: Path, source: SourceConfig) -> None:
    """A .tsv was read with commas: every line one field, all quarantined as missing columns."""
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks_1.tsv").write_text("timestamp\tpage\tuser\n2020-07-07 00:00:01\tp1\tu1\n")
    tsv = source.model_copy(update={"files": ["clicks*.tsv"]})
    with pytest.raises(LandingFileError, match=r"clicks_1.tsv: unknown file type \(expected .csv"):
        LandingIndex(tmp_path / "index.json").refresh(tsv, discover(tsv, landing))
