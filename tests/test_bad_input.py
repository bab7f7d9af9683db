"""A corpus of bad landing files: every bad line lands in quarantine with its file, line and reason,
every good row of the same file and of the other files is kept, and file-level problems either
quarantine the file (unreadable) or fail with one message naming it (a required column missing).

The headline test puts the whole corpus beside one good reference day (2020-07-15, cut from the
reference clickstream in its own format) and checks that the day still resamples to exactly the
published 10-minute aggregates while the quarantine table holds every bad line with its reason.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from anomaly_dagster import ingest, pipeline
from anomaly_dagster.config import PACKAGE_SOURCES_DIR, SourceConfig, load_source
from anomaly_dagster.ingest import LandingFileError, LandingIndex, discover, ingest_window
from anomaly_dagster.warehouse import RunInfo, Warehouse

BEFORE, DAY, AFTER = date(2020, 7, 14), date(2020, 7, 15), date(2020, 7, 16)
WINDOW = [BEFORE, DAY, AFTER]
HEADER = "timestamp,page,user,session_id"
REFERENCE_FILE = "clicks_2020-07-15.csv.gz"


@pytest.fixture(scope="module")
def source() -> SourceConfig:
    return load_source(PACKAGE_SOURCES_DIR / "clickstream.yaml")


def good(stamp: str, user: str, page: str = "p01") -> str:
    """A valid line in the reference format (padded page and user, session id built from the three)."""
    return f"{stamp}, {page} , {user},{stamp} ; {page} ; {user}"


def csv_bytes(*lines: str | bytes) -> bytes:
    return b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)


def at_noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, 0, tzinfo=UTC)


@dataclass
class Case:
    """Landing files of one kind of bad input and what ingestion must make of them."""

    name: str
    files: dict[str, bytes]
    bad: list[tuple[str, int | None, str]]  # (file, line or None for the whole file, reason regex)
    good: list[tuple[str, int, str]]  # (file, line, user) of the rows that must be kept
    mtimes: dict[str, datetime] = field(default_factory=dict)
    home: dict[str, date] = field(default_factory=dict)  # where a file-level quarantine row must go

    def write(self, landing: Path) -> None:
        for name, data in self.files.items():
            (landing / name).write_bytes(data)
            if name in self.mtimes:
                stamp = self.mtimes[name].timestamp()
                os.utime(landing / name, (stamp, stamp))


def truncated_gzip(text: bytes, keep: float) -> bytes:
    payload = gzip.compress(text, mtime=0)
    return payload[: int(len(payload) * keep)]


def corrupt_gzip() -> bytes:
    payload = bytearray(gzip.compress(csv_bytes(HEADER, good("2020-07-15 01:00:00", "corrupt")), mtime=0))
    payload[10:30] = b"\xff" * 20  # the deflate stream right after the 10-byte header
    return bytes(payload)


def build_cases() -> list[Case]:
    cases = []
    cases.append(
        Case(
            "wrong column counts",
            {
                "clicks_columns.csv": csv_bytes(
                    HEADER,
                    good("2020-07-14 00:00:01", "col2"),
                    "2020-07-15 10:00:00,p01,col3,s,extra",
                    "2020-07-15 10:00:01,p01",
                    good("2020-07-14 00:00:05", "col5"),
                )
            },
            bad=[
                ("clicks_columns.csv", 3, r"TOO MANY COLUMNS: Expected Number of Columns: 4 Found: 5"),
                ("clicks_columns.csv", 4, r"MISSING COLUMNS: Expected Number of Columns: 4 Found: 2.*"),
            ],
            good=[("clicks_columns.csv", 2, "col2"), ("clicks_columns.csv", 5, "col5")],
        )
    )
    timestamps = [
        ("not-a-time", r"unparseable timestamp not-a-time"),
        ("2020-02-30 10:00:00", r"unparseable timestamp 2020-02-30 10:00:00"),
        ("2020-07-15 10:61:00", r"unparseable timestamp 2020-07-15 10:61:00"),
        ("1594807200", r"unparseable timestamp 1594807200"),
        ("infinity", r"unparseable timestamp infinity"),
        ("2020-07-06 23:59:59", r"timestamp outside the source range 2020-07-06 23:59:59"),
        ("2999-01-01 00:00:00", r"timestamp outside the source range 2999-01-01 00:00:00"),
        ("10000-01-01 00:00:00", r"timestamp outside the source range 10000-01-01 00:00:00"),
        ("0020-07-15 10:00:00", r"timestamp outside the source range 0020-07-15 10:00:00"),
        ("2020-07-15T10:00:00+25:00", r"timestamp offset beyond ±18:00 2020-07-15T10:00:00\+25:00"),
        ("", r"missing timestamp"),
        (
            "2020-07-15 10:00:00 CEST",
            r"ambiguous time zone abbreviation in timestamp 2020-07-15 10:00:00 CEST",
        ),
        # ICU would read PST as Los Angeles time, daylight saving (-07:00) included
        ("2020-07-15 10:00:00 PST", r"ambiguous time zone abbreviation in timestamp 2020-07-15 10:00:00 PST"),
        ("2020-07-15", r"unparseable timestamp 2020-07-15"),  # no time of day: not midnight
        ("2020-07-15 10:0", r"unparseable timestamp 2020-07-15 10:0"),  # truncated: not 10:00
        ("2020-07-15T10:5", r"unparseable timestamp 2020-07-15T10:5"),  # not 10:05
        ("2020-07-15 10:00", r"unparseable timestamp 2020-07-15 10:00"),  # the format has seconds
    ]
    after = 3 + len(timestamps)
    cases.append(
        Case(
            "unparseable and out-of-range timestamps",
            {
                "clicks_timestamps.csv": csv_bytes(
                    HEADER,
                    good("2020-07-14 00:00:02", "ts2"),
                    *(f"{stamp},p01,ts{line},s" for line, (stamp, _) in enumerate(timestamps, 3)),
                    good("2020-07-16 00:00:15", f"ts{after}"),
                    good("2020-07-15 24:00:00", f"ts{after + 1}"),  # ISO 8601 end of day: 2020-07-16 00:00
                    good("2020-07-14 10:00:00 UTC", f"ts{after + 2}"),
                )
            },
            bad=[("clicks_timestamps.csv", line, reason) for line, (_, reason) in enumerate(timestamps, 3)],
            good=[
                ("clicks_timestamps.csv", 2, "ts2"),
                *(("clicks_timestamps.csv", line, f"ts{line}") for line in range(after, after + 3)),
            ],
        )
    )
    zones = [
        "2020-07-14T12:00:00+02:00",
        "2020-07-14T05:00:00-05:00",
        "2020-07-14T10:00:00Z",
        "2020-07-14 12:00:00 +02:00",
        "2020-07-14T12:00:00+0200",
        "2020-07-14 12:00:00 Europe/Berlin",
        "2020-07-14 10:00:00",
        "2020-07-14T10:00:00.250+00:00",
        "2020-07-15T01:30:00+02:00",
        "2020-07-15 23:30:00-02:00",
    ]
    cases.append(
        Case(
            "mixed time zones and offsets",
            {
                "clicks_zones.csv": csv_bytes(
                    HEADER, *(good(stamp, f"zone{line}") for line, stamp in enumerate(zones, 2))
                ),
            },
            bad=[],
            good=[("clicks_zones.csv", line, f"zone{line}") for line in range(2, 2 + len(zones))],
        )
    )
    cases.append(
        Case(
            "empty and header-only files",
            {
                "clicks_empty.csv": b"",
                "clicks_header_only.csv": csv_bytes(HEADER),
                "clicks_header_only.csv.gz": gzip.compress(csv_bytes(HEADER), mtime=0),
                "clicks_empty.jsonl": b"",
                "clicks_blank_first.csv": csv_bytes("", HEADER, good("2020-07-14 00:00:03", "blank3")),
            },
            bad=[
                ("clicks_empty.csv", None, r"unreadable file: empty file \(no header line\)"),
                (
                    "clicks_blank_first.csv",
                    None,
                    r"unreadable file: blank first line where the CSV header was expected",
                ),
            ],
            good=[],
            mtimes={"clicks_empty.csv": at_noon(DAY), "clicks_blank_first.csv": at_noon(DAY)},
            home={"clicks_empty.csv": DAY, "clicks_blank_first.csv": DAY},
        )
    )
    day_log = csv_bytes(
        HEADER, *(good(f"2020-07-15 {n // 60:02d}:{n % 60:02d}:07", f"trunc{n}") for n in range(400))
    )
    cases.append(
        Case(
            "truncated and corrupt gzip",
            {
                # named for the 16th, but its readable prefix holds the 15th: the prefix wins
                "clicks_2020-07-16_truncated.csv.gz": truncated_gzip(day_log, 0.6),
                "clicks_2020-07-15_no_trailer.csv.gz": gzip.compress(day_log, mtime=0)[:-8],
                "clicks_2020-07-14_cut.csv.gz": gzip.compress(day_log, mtime=0)[:14],  # no complete line
                "clicks_2020-07-16_truncated.jsonl.gz": truncated_gzip(
                    b"".join(
                        json.dumps(
                            {"timestamp": f"2020-07-16 00:{n:02d}:00", "page": "p", "user": f"j{n}"}
                        ).encode()
                        + b"\n"
                        for n in range(60)
                    ),
                    0.5,
                ),
                "clicks_corrupt.csv.gz": corrupt_gzip(),
            },
            bad=[
                (
                    "clicks_2020-07-16_truncated.csv.gz",
                    None,
                    r"unreadable file: cannot read: Compressed file ended .*",
                ),
                (
                    "clicks_2020-07-15_no_trailer.csv.gz",
                    None,
                    r"unreadable file: cannot read: Compressed file ended .*",
                ),
                ("clicks_2020-07-14_cut.csv.gz", None, r"unreadable file: .+"),
                (
                    "clicks_2020-07-16_truncated.jsonl.gz",
                    None,
                    r"unreadable file: cannot read: Compressed file ended .*",
                ),
                ("clicks_corrupt.csv.gz", None, r"unreadable file: .+"),
            ],
            good=[],
            mtimes={
                "clicks_2020-07-14_cut.csv.gz": at_noon(date(2020, 7, 20)),
                "clicks_corrupt.csv.gz": at_noon(DAY),
            },
            home={
                "clicks_2020-07-16_truncated.csv.gz": DAY,  # first day of the readable prefix
                "clicks_2020-07-15_no_trailer.csv.gz": DAY,
                "clicks_2020-07-14_cut.csv.gz": BEFORE,  # no complete line: the day in its name
                "clicks_2020-07-16_truncated.jsonl.gz": AFTER,
                "clicks_corrupt.csv.gz": DAY,  # nothing readable, no day in the name: modification day
            },
        )
    )
    cases.append(
        Case(
            "binary garbage",
            {
                "clicks_binary.csv": bytes(range(256)) * 8,
                "clicks_binary.jsonl": b"\x00\x01\x02garbage\x89PNG\r\n\x1a\n" + bytes(range(256)),
                "clicks_binary.parquet": b"PAR1" + bytes(range(256)) * 4,
                "clicks_garbage_lines.csv": csv_bytes(
                    HEADER,
                    good("2020-07-14 00:00:04", "garb2"),
                    b"2020-07-15 10:00:00,p\x00\x01,garb3,s",
                    b"\x89PNG\xff\xfe\x00\x1b\x7f garbage,\xc3\x28,\xa0\xa1,\xf0\x28\x8c\x28",
                    good("2020-07-14 00:00:05", "garb5"),
                ),
            },
            bad=[
                (
                    "clicks_binary.csv",
                    None,
                    r"unreadable file: binary content where a CSV header was expected",
                ),
                (
                    "clicks_binary.jsonl",
                    None,
                    r"unreadable file: binary content where JSON lines were expected",
                ),
                ("clicks_binary.parquet", None, r"unreadable file: .+"),
                ("clicks_garbage_lines.csv", 3, r"control characters in page"),
                ("clicks_garbage_lines.csv", 4, r"INVALID ENCODING: .*not utf-8 encoded.*"),
            ],
            good=[("clicks_garbage_lines.csv", 2, "garb2"), ("clicks_garbage_lines.csv", 5, "garb5")],
            mtimes={
                name: at_noon(DAY)
                for name in ["clicks_binary.csv", "clicks_binary.jsonl", "clicks_binary.parquet"]
            },
            home={
                name: DAY for name in ["clicks_binary.csv", "clicks_binary.jsonl", "clicks_binary.parquet"]
            },
        )
    )
    cases.append(
        Case(
            "C1 control characters",
            {
                "clicks_c1.csv": csv_bytes(
                    HEADER,
                    good("2020-07-14 00:06:00", "c1u2", page="p\u0085nel"),
                    good("2020-07-14 00:06:01", "c1u3\u009b[31m"),
                    "2020-07-14 00:06:02,p01,c1u4,s\u0080",
                    good("2020-07-14 00:06:03", "c1u5\u00a0\u00ff", page="p\u00e9\u2028"),  # not controls
                ),
                "clicks_c1.jsonl": csv_bytes(
                    '{"timestamp": "2020-07-14 00:06:04", "page": "p\\u009f", "user": "c1j1"}'
                ),
            },
            bad=[
                ("clicks_c1.csv", 2, r"control characters in page"),
                ("clicks_c1.csv", 3, r"control characters in user"),
                ("clicks_c1.csv", 4, r"control characters in session_id"),
                ("clicks_c1.jsonl", 1, r"control characters in page"),
            ],
            good=[("clicks_c1.csv", 5, "c1u5\u00a0\u00ff")],
        )
    )
    exact = "long3" + "x" * (1024 - len("long3"))
    cases.append(
        Case(
            "fields longer than max_field_length (1,024)",
            {
                "clicks_long.csv": csv_bytes(
                    HEADER,
                    good("2020-07-14 00:00:06", "long2"),
                    f"2020-07-14 00:00:07,p01,{exact},s",  # exactly 1,024 characters: kept
                    "2020-07-15 10:00:00,p01,long4" + "x" * 1020 + ",s",
                    "2020-07-15 10:00:00" + " " * 2000 + ",p01,long5,s",
                    "2020-07-15 10:00:00,p01,long6," + "s" * 5000,
                    "2020-07-15 10:00:00,p01,long7," + "s" * 3_000_000,
                    good("2020-07-14 00:00:08", "long8"),
                )
            },
            bad=[
                ("clicks_long.csv", 4, r"field user longer than 1024 characters"),
                ("clicks_long.csv", 5, r"field timestamp longer than 1024 characters"),
                ("clicks_long.csv", 6, r"field session_id longer than 1024 characters"),
                ("clicks_long.csv", 7, r"LINE SIZE OVER MAXIMUM: Maximum line size of \d+ bytes exceeded.*"),
            ],
            good=[
                ("clicks_long.csv", 2, "long2"),
                ("clicks_long.csv", 3, exact),
                ("clicks_long.csv", 8, "long8"),
            ],
        )
    )
    cases.append(
        Case(
            "unterminated quotes",
            {
                "clicks_quote.csv": csv_bytes(
                    HEADER,
                    good("2020-07-14 00:01:00", "quote2"),
                    '2020-07-15 10:00:00,"p01,quote3,s',  # opens a quote that never closes on its line
                    *(good(f"2020-07-14 00:01:{n:02d}", f"quote{n}") for n in range(4, 9)),
                    '2020-07-15 10:00:00,p01,quote9,"s""',
                    '2020-07-14 00:01:10,"p01, quoted",quote10,"s ""q"""',  # valid quoting: a good row
                    good("2020-07-14 00:01:11", "quote11"),
                )
            },
            bad=[
                ("clicks_quote.csv", 3, re.escape(ingest.UNTERMINATED_QUOTE)),
                ("clicks_quote.csv", 9, re.escape(ingest.UNTERMINATED_QUOTE)),
            ],
            good=[("clicks_quote.csv", n, f"quote{n}") for n in [2, 4, 5, 6, 7, 8, 10, 11]],
        )
    )
    cases.append(
        Case(
            "non-UTF-8 bytes",
            {
                "clicks_latin1.csv": csv_bytes(
                    HEADER,
                    good("2020-07-14 00:02:00", "latin2"),
                    b"2020-07-15 10:00:00,caf\xe9,latin3,s",
                    good("2020-07-14 00:02:04", "latin4"),
                ),
                "clicks_latin1.jsonl": csv_bytes(
                    json.dumps({"timestamp": "2020-07-14 00:02:05", "page": "p", "user": "latin_j1"}),
                    b'{"timestamp": "2020-07-15 10:00:00", "page": "caf\xe9", "user": "latin_j2"}',
                    json.dumps({"timestamp": "2020-07-14 00:02:06", "page": "p", "user": "latin_j3"}),
                ),
            },
            bad=[
                ("clicks_latin1.csv", 3, r"INVALID ENCODING: .*not utf-8 encoded.*"),
                ("clicks_latin1.jsonl", 2, r"INVALID ENCODING: .*not utf-8 encoded.*"),
            ],
            good=[
                ("clicks_latin1.csv", 2, "latin2"),
                ("clicks_latin1.csv", 4, "latin4"),
                ("clicks_latin1.jsonl", 1, "latin_j1"),
                ("clicks_latin1.jsonl", 3, "latin_j3"),
            ],
        )
    )
    twice = good("2020-07-14 00:03:00", "dup2")
    cases.append(
        Case(
            "duplicated events",
            {
                # the same line twice in one file: two events (the reference has 42 such pairs)
                "clicks_dupes.csv": csv_bytes(HEADER, twice, twice, good("2020-07-14 00:03:01", "dup4")),
                # the same event replayed in another file (and format): quarantined
                "clicks_zz_replay.jsonl": csv_bytes(
                    json.dumps(
                        {
                            "timestamp": "2020-07-14 00:03:00",
                            "page": " p01 ",
                            "user": "dup2",
                            "session_id": "2020-07-14 00:03:00 ; p01 ; dup2",
                        }
                    ),
                    json.dumps({"timestamp": "2020-07-14 00:03:02", "page": "p01", "user": "dup_j2"}),
                ),
            },
            bad=[("clicks_zz_replay.jsonl", 1, r"duplicate event: also in .*/clicks_dupes\.csv line 2")],
            good=[
                ("clicks_dupes.csv", 2, "dup2"),
                ("clicks_dupes.csv", 3, "dup2"),
                ("clicks_dupes.csv", 4, "dup4"),
                ("clicks_zz_replay.jsonl", 2, "dup_j2"),
            ],
        )
    )
    cases.append(
        Case(
            "bad JSON lines",
            {
                "clicks_bad.jsonl": csv_bytes(
                    json.dumps({"timestamp": "2020-07-14 00:04:00", "page": "p", "user": "json1"}),
                    '{"timestamp": "2020-07-15 10:00:00", "page": ',
                    "[1, 2]",
                    json.dumps({"timestamp": "2020-07-15 10:00:00", "page": "p01"}),
                    json.dumps({"timestamp": "2020-07-15 10:00:00", "page": "p\u0000", "user": "json5"}),
                    "",
                    json.dumps({"timestamp": "2020-07-16 00:04:00", "page": "p", "user": "json7"}),
                )
            },
            bad=[
                ("clicks_bad.jsonl", 2, r"malformed JSON"),
                ("clicks_bad.jsonl", 3, r"JSON line is not an object"),
                ("clicks_bad.jsonl", 4, r"missing user"),
                ("clicks_bad.jsonl", 5, r"control characters in page"),
            ],
            good=[("clicks_bad.jsonl", 1, "json1"), ("clicks_bad.jsonl", 7, "json7")],
        )
    )
    stamp = '{"timestamp": "2020-07-14 00:07:0'
    cases.append(
        Case(
            "JSON types and JSON beyond RFC 8259",
            {
                "clicks_types.jsonl": csv_bytes(
                    stamp + '0", "page": true, "user": "jt1"}',
                    stamp + '1", "page": "p", "user": {"id": "jt2"}}',
                    stamp + '2", "page": "p", "user": "jt3", "session_id": ["s"]}',
                    stamp + '3", "page": "p", "user": 28904}',  # a numeric id: kept as its text
                    stamp + '4", "page": "true", "user": "jt5", "session_id": null}',
                    stamp + '5", "page": "p", "user": "jt6",}',
                    stamp + '6", "page": "p", "user": "jt7", "n": NaN}',
                    stamp + '7", "page": "p, NaN,}", "user": "jt8", "n": [1, {"a": -1}]}',
                    stamp + '8", "page": "p", "user": "jt9", "n": [1, 2, ]}',
                )
            },
            bad=[
                ("clicks_types.jsonl", 1, r"wrong JSON type in page: boolean \(expected a string\)"),
                ("clicks_types.jsonl", 2, r"wrong JSON type in user: object \(expected a string\)"),
                ("clicks_types.jsonl", 3, r"wrong JSON type in session_id: array \(expected a string\)"),
                ("clicks_types.jsonl", 6, r"malformed JSON"),
                ("clicks_types.jsonl", 7, r"malformed JSON"),
                ("clicks_types.jsonl", 9, r"malformed JSON"),
            ],
            good=[
                ("clicks_types.jsonl", 4, "28904"),
                ("clicks_types.jsonl", 5, "jt5"),
                ("clicks_types.jsonl", 8, "jt8"),
            ],
        )
    )
    return cases


CASES = build_cases()
COMPANION = csv_bytes(HEADER, *(good(f"2020-07-14 00:59:{n:02d}", f"companion{n}") for n in range(5)))


def ingest_folder(source: SourceConfig, landing: Path, days: list[date] = WINDOW):
    index = LandingIndex(landing.parent / "index.json")
    entries = index.refresh(source, discover(source, landing))
    return entries, ingest_window(source, entries, days)


def all_events(window: ingest.IngestedWindow, days: list[date] = WINDOW) -> pd.DataFrame:
    return pd.concat(
        [window.connection.execute(window.events_sql(day)).df() for day in days], ignore_index=True
    )


def assert_quarantine(quarantine: pd.DataFrame, expected: list[tuple[str, int | None, str]]) -> None:
    """Quarantine rows (file name, line, reason) match the expected regexes one to one."""
    got = sorted(
        (Path(row.source_file).name, None if pd.isna(row.line) else int(row.line), row.reason)
        for row in quarantine.itertuples()
    )
    want = sorted(expected, key=lambda item: (item[0], -1 if item[1] is None else item[1]))
    got.sort(key=lambda item: (item[0], -1 if item[1] is None else item[1]))
    assert [(name, line) for name, line, _ in got] == [(name, line) for name, line, _ in want]
    for (name, line, reason), (_, _, pattern) in zip(got, want, strict=True):
        assert re.fullmatch(pattern, reason), f"{name}:{line}: {reason!r} !~ {pattern!r}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_lines_are_quarantined_and_every_good_row_is_kept(
    tmp_path: Path, source: SourceConfig, case
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    case.write(landing)
    (landing / "clicks_companion.csv").write_bytes(COMPANION)
    entries, window = ingest_folder(source, landing)

    quarantine = pd.concat([window.quarantine[day] for day in WINDOW], ignore_index=True)
    assert_quarantine(quarantine, case.bad)
    for name, day in case.home.items():  # a file-level row goes to the file's home day
        rows = window.quarantine[day]
        assert (rows["source_file"].map(lambda path: Path(path).name) == name).sum() == 1, (name, day)

    events = all_events(window)
    kept = sorted(
        (Path(row.source_file).name, int(row.line), row.user)
        for row in events.itertuples()
        if Path(row.source_file).name != "clicks_companion.csv"
    )
    assert kept == sorted(case.good)
    companion = events[events["source_file"].str.endswith("clicks_companion.csv")]
    assert sorted(companion["user"]) == [f"companion{n}" for n in range(5)]
    assert companion["line"].tolist() == [2, 3, 4, 5, 6]
    assert {Path(entry.path).name for entry in entries} == {*case.files, "clicks_companion.csv"}


def test_mixed_offsets_and_zones_become_utc(tmp_path: Path, source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    next(case for case in CASES if case.name.startswith("mixed")).write(landing)
    _, window = ingest_folder(source, landing)
    got = dict(zip(*(all_events(window)[column] for column in ("user", "timestamp")), strict=True))
    ten = pd.Timestamp("2020-07-14 10:00:00")
    assert got == {
        **{f"zone{line}": ten for line in range(2, 9)},
        "zone9": pd.Timestamp("2020-07-14 10:00:00.250"),
        "zone10": pd.Timestamp("2020-07-14 23:30:00"),
        "zone11": pd.Timestamp("2020-07-16 01:30:00"),
    }


def test_local_times_in_daylight_saving_gaps_and_overlaps(tmp_path: Path, source: SourceConfig) -> None:
    """Documented behaviour, not quarantine: a local time that does not exist (spring forward) or
    exists twice (fall back) is read at the zone's standard offset (CET, UTC+1)."""
    berlin = source.model_copy(
        update={"timestamp": source.timestamp.model_copy(update={"timezone": "Europe/Berlin"})}
    )
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.csv").write_bytes(
        csv_bytes(HEADER, good("2021-03-28 02:30:00", "gap"), good("2020-10-25 02:30:00", "twice"))
    )
    _, window = ingest_folder(berlin, landing, [date(2021, 3, 28), date(2020, 10, 25)])
    got = all_events(window, [date(2021, 3, 28), date(2020, 10, 25)])
    assert dict(zip(got["user"], got["timestamp"], strict=True)) == {
        "gap": pd.Timestamp("2021-03-28 01:30:00"),
        "twice": pd.Timestamp("2020-10-25 01:30:00"),
    }
    assert all(frame.empty for frame in window.quarantine.values())


def test_quarantined_raw_text_is_capped(tmp_path: Path, source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    next(case for case in CASES if case.name.startswith("fields longer")).write(landing)
    _, window = ingest_folder(source, landing)
    quarantine = pd.concat([window.quarantine[day] for day in WINDOW], ignore_index=True).set_index("line")
    assert quarantine.loc[7, "raw"].startswith("2020-07-15 10:00:00,p01,long7,sss")
    assert quarantine.loc[7, "raw"].endswith(" more characters]")
    assert len(quarantine.loc[7, "raw"]) < ingest.RAW_MAX_CHARS + 50
    assert len(quarantine.loc[6, "raw"]) < ingest.RAW_MAX_CHARS + 50


# --- numbers: NaN, infinities and values below a column's minimum -------------------------------------------


@pytest.fixture(scope="module")
def timed_source(tmp_path_factory: pytest.TempPathFactory) -> SourceConfig:
    """The clickstream source with a numeric column that cannot be negative and a metric over it."""
    document = yaml.safe_load((PACKAGE_SOURCES_DIR / "clickstream.yaml").read_text())
    document["columns"].append({"name": "duration_ms", "type": "number", "min_value": 0, "required": False})
    document["metrics"].append({"name": "p95_duration", "agg": "p95", "column": "duration_ms"})
    path = tmp_path_factory.mktemp("sources") / "clickstream_timed.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_source(path)


NUMBERS = [
    ("12.5", None),
    ("0", None),
    ("-0", None),
    ("", None),  # optional: kept, as NULL
    (" 7 ", None),
    ("NaN", "non-finite duration_ms"),
    ("inf", "non-finite duration_ms"),
    ("-Infinity", "non-finite duration_ms"),
    ("1e400", "non-finite duration_ms"),  # overflows to infinity
    ("-5", "duration_ms below minimum"),
    ("-1e-3", "duration_ms below minimum"),
    ("abc", "not a number in duration_ms"),
    ("0x10", "not a number in duration_ms"),
]


def test_non_finite_and_negative_numbers_are_quarantined(tmp_path: Path, timed_source: SourceConfig) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    header = HEADER + ",duration_ms"
    (landing / "clicks_timed.csv").write_bytes(
        csv_bytes(
            header, *(f"2020-07-14 00:05:{n:02d},p,num{n},s,{value}" for n, (value, _) in enumerate(NUMBERS))
        )
    )
    (landing / "clicks_timed.jsonl").write_bytes(
        csv_bytes(
            json.dumps({"timestamp": "2020-07-14 00:06:00", "page": "p", "user": "jnum1", "duration_ms": -1}),
            '{"timestamp": "2020-07-14 00:06:01", "page": "p", "user": "jnum2", "duration_ms": 1e999}',
            # not JSON (RFC 8259), though DuckDB's parser reads NaN: malformed
            '{"timestamp": "2020-07-14 00:06:02", "page": "p", "user": "jnum3", "duration_ms": NaN}',
            json.dumps(
                {"timestamp": "2020-07-14 00:06:03", "page": "p", "user": "jnum4", "duration_ms": 250}
            ),
        )
    )
    pq.write_table(
        pa.table(
            {
                "timestamp": ["2020-07-14 00:07:00"] * 4,
                "page": ["p"] * 4,
                "user": ["pnum0", "pnum1", "pnum2", "pnum3"],
                "duration_ms": [1.5, float("nan"), float("-inf"), -2.0],
            }
        ),
        landing / "clicks_timed.parquet",
    )
    _, window = ingest_folder(timed_source, landing, [BEFORE])
    assert_quarantine(
        window.quarantine[BEFORE],
        [("clicks_timed.csv", n + 2, re.escape(reason)) for n, (_, reason) in enumerate(NUMBERS) if reason]
        + [
            ("clicks_timed.jsonl", 1, "duration_ms below minimum"),
            ("clicks_timed.jsonl", 2, "non-finite duration_ms"),
            ("clicks_timed.jsonl", 3, "malformed JSON"),
            ("clicks_timed.parquet", 2, "non-finite duration_ms"),
            ("clicks_timed.parquet", 3, "non-finite duration_ms"),
            ("clicks_timed.parquet", 4, "duration_ms below minimum"),
        ],
    )
    events = all_events(window, [BEFORE]).set_index("user")
    assert events["duration_ms"].to_dict() == pytest.approx(
        {"num0": 12.5, "num1": 0.0, "num2": 0.0, "num3": np.nan, "num4": 7.0, "jnum4": 250.0, "pnum0": 1.5},
        nan_ok=True,
    )


# --- file-level problems: one clear error naming the file ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        (
            "clicks_a.csv",
            csv_bytes("time,page,user,session_id", good("2020-07-15 00:00:00", "u")),
            "['timestamp']",
        ),
        ("clicks_b.csv.gz", gzip.compress(csv_bytes("timestamp,page", "2020-07-15 00:00:00,p")), "['user']"),
        (
            "clicks_c.csv",
            csv_bytes("timestamp;page;user;session_id", "2020-07-15 00:00:00;p;u;s"),
            "['timestamp', ",
        ),
        (
            "clicks_d.jsonl",
            csv_bytes(
                *(json.dumps({"ts": "2020-07-15 00:00:00", "page": "p", "user": f"u{n}"}) for n in range(3))
            ),
            "field(s) ['timestamp']",
        ),
        ("clicks_e.parquet", None, "['timestamp']"),
    ],
)
def test_file_missing_a_required_column_fails_naming_the_file(
    tmp_path: Path, source: SourceConfig, name: str, data: bytes | None, problem: str
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks_good.csv").write_bytes(COMPANION)
    if data is None:
        pq.write_table(
            pa.table({"time": ["2020-07-15 00:00:00"], "page": ["p"], "user": ["u"]}), landing / name
        )
    else:
        (landing / name).write_bytes(data)
    context = pipeline.StageContext(source, Warehouse(tmp_path / "warehouse"), landing, RunInfo("run", "v"))
    with pytest.raises(LandingFileError) as raised:
        pipeline.run_ingest(context, [DAY])
    message = str(raised.value)
    assert message.startswith(f"{(landing / name).resolve()}: missing required ")
    assert problem in message
    assert "'clickstream'" in message
    assert "\n" not in message


def test_a_json_lines_file_with_some_objects_missing_a_field_is_not_a_file_error(
    tmp_path: Path, source: SourceConfig
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "clicks.jsonl").write_bytes(
        csv_bytes(
            json.dumps({"ts": "2020-07-15 00:00:00", "page": "p", "user": "u1"}),
            json.dumps({"timestamp": "2020-07-15 00:00:01", "page": "p", "user": "u2"}),
        )
    )
    _, window = ingest_folder(source, landing)
    assert all_events(window)["user"].tolist() == ["u2"]
    # the line without a timestamp goes to the file's home day, its first valid day
    assert window.quarantine[DAY][["line", "reason"]].values.tolist() == [[1, "missing timestamp"]]


# --- the headline: one good reference day beside the whole bad corpus ---------------------------------------


def reference_day(reference_dir: Path, landing: Path) -> tuple[Path, list[bytes]]:
    """2020-07-15's lines of the reference clickstream, in its format and order, as a gzipped day file."""
    with gzip.open(reference_dir / "clicks.csv.gz", "rb") as handle:
        header = handle.readline()
        lines = [line for line in handle if line.startswith(b"2020-07-15")]
    path = landing / REFERENCE_FILE
    path.write_bytes(gzip.compress(header + b"".join(lines), mtime=0))
    return path, lines


@pytest.fixture(scope="module")
def headline(reference_dir: Path, source: SourceConfig, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("headline")
    landing = root / "landing"
    landing.mkdir()
    reference, lines = reference_day(reference_dir, landing)
    for case in CASES:
        case.write(landing)
    # a replay of reference lines in another file: one of a pair the reference holds twice, and others
    counts = pd.Series(lines).value_counts()
    pair = counts[counts == 2].index[0]
    replayed = [pair, *lines[100:130]]
    (landing / "clicks_2020-07-15_replay.csv").write_bytes(
        b"timestamp,page,user,session_id\n" + b"".join(replayed)
    )
    first_line = {}
    for number, line in enumerate(lines, 2):
        first_line.setdefault(line, number)
    replay_rows = [
        (
            "clicks_2020-07-15_replay.csv",
            number,
            rf"duplicate event: also in {re.escape(str(reference.resolve()))} "
            rf"line {first_line[line]}",
        )
        for number, line in enumerate(replayed, 2)
    ]
    warehouse = Warehouse(root / "warehouse")
    context = pipeline.StageContext(source, warehouse, landing, RunInfo("headline", "test"))
    pipeline.run_ingest(context, WINDOW)
    pipeline.run_resample(context, WINDOW)
    return {
        "warehouse": warehouse,
        "reference": reference,
        "lines": lines,
        "replayed": replayed,
        "replay_rows": replay_rows,
    }


def test_reference_day_beside_the_bad_corpus_resamples_to_the_published_aggregates(headline, reference_dir):
    resampled = headline["warehouse"].query(
        "SELECT bucket_start, pages, users, clicks FROM clickstream.resampled "
        "WHERE bucket_start >= '2020-07-15' AND bucket_start < '2020-07-16' ORDER BY bucket_start"
    )
    reference = pd.read_csv(reference_dir / "clicks_10T.csv", parse_dates=["timestamp"])
    reference = reference[reference["timestamp"].dt.date == DAY].reset_index(drop=True)
    assert len(reference) == len(resampled) == 144
    assert (resampled["bucket_start"].to_numpy() == reference["timestamp"].to_numpy()).all()
    np.testing.assert_array_equal(resampled["clicks"].to_numpy(), reference["click"].to_numpy())
    np.testing.assert_array_equal(resampled["users"].to_numpy(), reference["user"].to_numpy())
    np.testing.assert_array_equal(resampled["pages"].to_numpy(), reference["page"].to_numpy())
    raw = headline["warehouse"].query(
        "SELECT count(*) AS n FROM clickstream.raw_events WHERE source_file = ?",
        [str(headline["reference"].resolve())],
    )
    assert raw["n"].iloc[0] == len(headline["lines"]) == 28_084  # with its 6 pairs of identical lines


def test_every_bad_line_of_the_corpus_is_in_the_quarantine_table(headline):
    quarantine = headline["warehouse"].query("SELECT * FROM clickstream.quarantine")
    assert not (quarantine["source_file"] == str(headline["reference"].resolve())).any()
    expected = [row for case in CASES for row in case.bad] + headline["replay_rows"]
    assert_quarantine(quarantine, expected)
    assert quarantine["raw"].notna().sum() == sum(1 for _, line, _ in expected if line is not None)
    # a replayed line is good input, whose raw text typing does not keep: it is read again from its file
    replays = quarantine[quarantine["source_file"].str.endswith("_replay.csv")].sort_values("line")
    assert replays["raw"].tolist() == [line.decode().rstrip("\r\n") for line in headline["replayed"]]
    by_day = {
        (Path(row.source_file).name, None if pd.isna(row.line) else int(row.line)): pd.Timestamp(
            row.date
        ).date()
        for row in quarantine.itertuples()
    }
    # a bad row with a usable timestamp lands on that day; a file-level row on the file's home day
    assert by_day[("clicks_long.csv", 4)] == DAY
    assert by_day[("clicks_bad.jsonl", 4)] == DAY
    assert by_day[("clicks_2020-07-15_replay.csv", 2)] == DAY
    for case in CASES:
        for name, day in case.home.items():
            assert by_day[(name, None)] == day, name


def test_every_good_corpus_row_is_a_raw_event(headline):
    events = headline["warehouse"].query('SELECT source_file, line, "user" FROM clickstream.raw_events')
    events = events[events["source_file"] != str(headline["reference"].resolve())]
    got = sorted((Path(row.source_file).name, int(row.line), row.user) for row in events.itertuples())
    assert got == sorted(row for case in CASES for row in case.good)


# --- the line scan behind line numbers ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 22])
def test_line_scan_matches_a_line_by_line_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Blank lines (``\\n`` or ``\\r\\n``) and mixed line ends are found wherever chunks of the stream
    happen to split, and the copy with ``\\n`` line ends keeps every other byte."""
    rng = np.random.default_rng(chunk)
    pieces = [b"", b"\r", b"a", b"\r\r", b"xy\rz", b'"q"', b"\x00"]
    lines = [pieces[i] for i in rng.integers(0, len(pieces), 400)]
    monkeypatch.setattr(ingest, "_SCAN_CHUNK", chunk)
    for ends in ("mixed", "crlf"):
        if ends == "crlf":
            lines = [line.rstrip(b"\r") + b"\r" for line in lines]
        data = b"\n".join(lines) + (b"\n" if chunk % 2 else b"")
        terminated = data.split(b"\n")[: data.count(b"\n")]
        expected = [n for n, line in enumerate(terminated, 1) if line in (b"", b"\r")]
        for name, payload in (("plain.csv", data), ("packed.csv.gz", gzip.compress(data))):
            (tmp_path / name).write_bytes(payload)
            scan = ingest._scan_lines(tmp_path / name)
            assert (scan.blank, scan.mixed) == (expected, ends == "mixed"), (name, ends)
            copy = ingest._with_lf_line_ends(tmp_path / name, tmp_path)
            assert copy.read_bytes() == data.replace(b"\r\n", b"\n"), (name, ends)


# ¡ is \xc2\xa1, just past the C1 controls
CLEAN_TEXT = ["p,u\tv", "café ¡olé! €5 中文 😀", '"quoted, with comma"']
CONTROL_TEXT = ["nul\x00", "esc\x1b", "del\x7f", "lone\rreturn", "next\x85line", "csi\x9b", "vt\x0bff\x0c"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 22])
def test_line_scan_says_whether_a_field_may_hold_control_characters_or_quotes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """The scan that lets the typing skip its control-character search must see every control character
    (C0 but tab and line ends, a \\r not ending a line, DEL, C1 in UTF-8) wherever a chunk splits it,
    and must not flag ordinary text; without a quote character the check for records spanning lines
    is skipped."""
    monkeypatch.setattr(ingest, "_SCAN_CHUNK", chunk)
    header = "timestamp,page,user\n"
    for text in CLEAN_TEXT + CONTROL_TEXT:
        path = tmp_path / "scan.csv"
        path.write_bytes((header + f"2020-07-15 10:00:00,{text},u1\r\n" * 2).encode())
        scan = ingest._scan_lines(path)
        assert scan.controls == (text in CONTROL_TEXT), (text, chunk)
        assert scan.quotes == ('"' in text), (text, chunk)


def test_trim_shortcut_gives_what_trim_gives() -> None:
    """Typing skips ``trim`` for ASCII values without an outer space; every value must still come out
    exactly as DuckDB's trim leaves it (only spaces and Unicode white space go, tabs and controls stay)."""
    values = [
        None,
        "",
        " ",
        "a",
        " a",
        "a ",
        " a b ",
        "\ta\t",
        "a\r\n",
        "\u00a0a",
        "a\u3000",
        "é",
        " é",
        "e\u0301 ",
    ]
    values += [chr(code) + "x" + chr(code) for code in range(1, 128)] + ["\u2003x\u2028", "\u0085x"]
    with duckdb.connect() as connection:
        connection.execute("CREATE TABLE v AS SELECT unnest(?::VARCHAR[]) AS x", [values])
        pairs = connection.execute(f"SELECT x, trim(x), {ingest._trimmed('x')} FROM v").fetchall()
    assert len(pairs) == len(values)
    assert [(value, shortcut) for value, trimmed, shortcut in pairs if trimmed != shortcut] == []
    assert sum(trimmed != value for value, trimmed, _ in pairs if value is not None) >= 10  # trim did work
