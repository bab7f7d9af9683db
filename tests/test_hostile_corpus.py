"""The hostile corpus (tests/data/hostile_corpus, written blind to the ingestion code) beside the real
reference day 2020-07-15: the day must resample to the published aggregates plus exactly the
corpus's good rows, every bad line must be in the quarantine table with its file, line and a reason,
unreadable files are quarantined as files, nothing is lost, and a file without a required column
fails the run naming it.

MANIFEST.json says what a correct pipeline must do with every line. The cases where the pipeline
once disagreed with it are listed in DISAGREEMENTS, each also its own test on the original file, so
that a regression names its defect.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import test_bad_input
from test_bad_input import AFTER, DAY, all_events, ingest_folder, reference_day

from anomaly_dagster import pipeline
from anomaly_dagster.config import SourceConfig
from anomaly_dagster.ingest import LandingFileError
from anomaly_dagster.warehouse import RunInfo, Warehouse

source = test_bad_input.source  # the fixture: the shipped clickstream source

CORPUS = Path(__file__).resolve().parent / "data" / "hostile_corpus"
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text(encoding="utf-8"))
FILES: dict[str, dict] = MANIFEST["files"]
DAYS = [DAY, AFTER]  # '2020-07-15 24:00:00' is the 16th's first instant
NOT_DATA = {"MANIFEST.json", "make_corpus.py"}


@dataclass(frozen=True)
class Disagreement:
    """A manifest expectation the pipeline once missed: the file, the category of its bad line(s) in
    the manifest (None: the whole file was read wrongly), and the defect it had."""

    file: str
    category: str | None
    reason: str

    def lines(self) -> list[int]:
        if self.category is None:
            return []
        lines = [bad["line"] for bad in FILES[self.file]["bad"] if bad["category"] == self.category]
        assert lines, self
        return lines


H02, H06, H07 = (
    f"clicks_2020-07-15_{n}" for n in ("h02_mixed_eol.csv", "h06_encoding.csv", "h07_timestamps.csv")
)
H28, H29 = "clicks_2020-07-15_h28_objects.jsonl", "clicks_2020-07-15_h29_good.jsonl.gz"
DISAGREEMENTS = {
    "mixed_crlf_lf_line_ends": Disagreement(
        H02,
        None,
        "a CSV mixing CRLF and LF line ends (header CRLF, rows LF, or the reverse) is quarantined as a whole: "
        "'unreadable file: Invalid Input Error: The CSV Parser state machine reached an invalid state'; "
        "its 4 good rows are lost to the day (expected: every line read, as a pure-LF or pure-CRLF file is)",
    ),
    "c1_control_character_u0085": Disagreement(
        H06,
        "control_character_c1_nel",
        "page 'hxp\\x85nel' (U+0085 NEXT LINE, a C1 control and a line end for str.splitlines) is kept; "
        "CONTROL_CHARACTERS covers C0 and DEL only, so C1 controls (U+0080-U+009F, e.g. U+009B CSI) pass",
    ),
    "date_only_timestamp": Disagreement(
        H07,
        "timestamp_date_only",
        "'2020-07-15' without a time is kept as 2020-07-15 00:00:00 (TRY_CAST to TIMESTAMPTZ): an event "
        "with no time of day is silently put in the first bucket (expected: quarantined)",
    ),
    "zone_abbreviation_pst_csv": Disagreement(
        H07,
        "timestamp_zone_abbreviation",
        "'2020-07-15 10:00:00 PST' is kept as 17:00 UTC: ICU reads PST as America/Los_Angeles (PDT in July, "
        "-07:00) but PST is -08:00 (18:00 UTC); CST/IST are likewise read as Chicago/Kolkata while CEST is "
        "rejected (expected: zone abbreviations quarantined)",
    ),
    "zone_abbreviation_pst_jsonl_gz": Disagreement(
        H29,
        "timestamp_zone_abbreviation",
        "same as zone_abbreviation_pst_csv in a gzipped JSON lines file: kept at 17:00 UTC",
    ),
    "truncated_time": Disagreement(
        H07,
        "timestamp_truncated",
        "'2020-07-15 10:0' is kept as 10:00:00: a malformed/truncated time is read leniently "
        "('10:5' becomes 10:05, not 10:5x, a different bucket) (expected: unparseable timestamp)",
    ),
    "json_bool_page": Disagreement(
        H28,
        "wrong_type_bool_page",
        "JSON page true is kept as the page 'true' (expected: wrong type)",
    ),
    "json_object_page": Disagreement(
        H28,
        "wrong_type_nested_object",
        'JSON page {"name": "hxpA"} is kept as the page \'{"name":"hxpA"}\' (expected: wrong type)',
    ),
    "json_array_page": Disagreement(
        H28,
        "wrong_type_array_value",
        'JSON page ["hxpA"] is kept as the page \'["hxpA"]\' (expected: wrong type)',
    ),
    "json_trailing_comma": Disagreement(
        H28,
        "malformed_json_trailing_comma",
        'malformed JSON {"timestamp":...,"user":"hx28u918",} (trailing comma) is accepted by json_valid and '
        "kept; the README promises malformed JSON is quarantined (low severity: the event is unambiguous)",
    ),
}


def corpus_files(action: str | None = None) -> list[str]:
    return sorted(name for name, spec in FILES.items() if action is None or spec["action"] == action)


def expected_good() -> pd.DataFrame:
    rows = [{"file": name, **good} for name in corpus_files("ingest") for good in FILES[name]["good"]]
    frame = pd.DataFrame(rows)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], format="ISO8601")
    return frame


def expected_bad() -> list[tuple[str, int]]:
    return sorted((name, bad["line"]) for name in corpus_files("ingest") for bad in FILES[name]["bad"])


def text_of(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def stage(source: SourceConfig, root: Path, landing: Path, days: list[date]) -> Warehouse:
    warehouse = Warehouse(root / "warehouse")
    context = pipeline.StageContext(source, warehouse, landing, RunInfo("hostile", "test"))
    pipeline.run_ingest(context, days)
    pipeline.run_resample(context, [DAY])
    return warehouse


@pytest.fixture(scope="module")
def main_run(reference_dir: Path, source: SourceConfig, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile")
    landing = root / "landing"
    landing.mkdir()
    for path in CORPUS.iterdir():
        if path.is_file() and path.name not in NOT_DATA:
            shutil.copyfile(path, landing / path.name)
    reference, lines = reference_day(reference_dir, landing)
    warehouse = stage(source, root, landing, DAYS)
    events = warehouse.query(
        'SELECT source_file, line, timestamp, page, "user", session_id, date FROM clickstream.raw_events '
        "WHERE source_file <> ?",
        [str(reference.resolve())],
    )
    quarantine = warehouse.query("SELECT * FROM clickstream.quarantine")
    for frame in (events, quarantine):
        frame["file"] = frame["source_file"].map(lambda path: Path(path).name)
    return {
        "warehouse": warehouse,
        "landing": landing,
        "reference": reference,
        "reference_lines": lines,
        "events": events,
        "quarantine": quarantine,
    }


def test_manifest_accounts_for_every_line_of_every_file() -> None:
    """The manifest is checked against the committed bytes: every physical line is header, blank,
    good or bad (so 'nothing lost' below is a statement about all lines)."""
    for name, spec in FILES.items():
        if spec["action"] != "ingest":
            continue
        listed = (
            spec["header_lines"]
            + spec["blank_lines"]
            + spec["continuation_lines"]
            + [row["line"] for row in spec["good"] + spec["bad"]]
        )
        if spec["format"] == "parquet":
            total = pq.read_metadata(CORPUS / name).num_rows
        else:
            data = text_of(CORPUS / name)
            total = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        assert total == spec["lines"], name
        assert sorted(listed) == list(range(1, total + 1)), name


def test_day_resamples_to_the_reference_plus_the_corpus_good_rows(main_run, reference_dir: Path) -> None:
    good = expected_good()
    good = good[good["timestamp"].dt.date == DAY]
    reference_rows = [line.decode().split(",") for line in main_run["reference_lines"]]
    assert not {row[1].strip() for row in reference_rows} & set(good["page"])
    assert not {row[2].strip() for row in reference_rows} & set(good["user"])  # so distinct counts add
    added = (
        good.assign(bucket=good["timestamp"].dt.floor("10min"))
        .groupby("bucket")
        .agg(pages=("page", "nunique"), users=("user", "nunique"), clicks=("line", "size"))
    )
    reference = pd.read_csv(reference_dir / "clicks_10T.csv", parse_dates=["timestamp"])
    reference = reference[reference["timestamp"].dt.date == DAY].set_index("timestamp")
    expected = pd.DataFrame(
        {"pages": reference["page"], "users": reference["user"], "clicks": reference["click"]}
    )
    expected = expected.add(added.reindex(expected.index, fill_value=0)).astype("int64")
    assert added.index.isin(expected.index).all()
    resampled = main_run["warehouse"].query(
        "SELECT bucket_start, pages, users, clicks FROM clickstream.resampled "
        "WHERE bucket_start >= '2020-07-15' AND bucket_start < '2020-07-16' ORDER BY bucket_start"
    )
    got = resampled.set_index("bucket_start")[["pages", "users", "clicks"]].astype("int64")
    got.index, expected.index = (index.strftime("%Y-%m-%d %H:%M") for index in (got.index, expected.index))
    assert len(got) == 144
    differing = got.compare(expected, result_names=("got", "expected"))
    assert differing.empty, differing.to_string()
    assert int(added["clicks"].sum()) == len(good) == 96


def test_every_good_line_is_an_event_with_its_values(main_run) -> None:
    events = main_run["events"]
    events = events[events["file"].isin(FILES)]
    good = expected_good()
    got = sorted(zip(events["file"], events["line"].astype(int), strict=True))
    assert got == sorted(zip(good["file"], good["line"], strict=True))
    by_line = events.set_index(["file", "line"])
    for row in good.itertuples():
        event = by_line.loc[(row.file, row.line)]
        where = f"{row.file}:{row.line}"
        assert event["timestamp"] == row.timestamp, where
        assert (event["page"], event["user"]) == (row.page, row.user), where
        if isinstance(row.session_id, str):
            assert event["session_id"] == (row.session_id or None), where
        assert pd.Timestamp(event["date"]).date() == row.timestamp.date(), where


def test_every_bad_line_is_quarantined_with_its_file_line_and_a_reason(main_run) -> None:
    quarantine = main_run["quarantine"]
    assert not (quarantine["source_file"] == str(main_run["reference"].resolve())).any()
    lines = quarantine[quarantine["line"].notna() & quarantine["file"].isin(FILES)]
    got = sorted(zip(lines["file"], lines["line"].astype(int), strict=True))
    assert got == expected_bad()
    assert lines["reason"].map(lambda reason: isinstance(reason, str) and reason.strip() != "").all()
    assert (pd.to_datetime(lines["date"]).dt.date == DAY).all()
    reasons = lines.set_index(["file", "line"])["reason"]
    for name in corpus_files("ingest"):
        for bad in FILES[name]["bad"]:
            if "replay_of" in bad:
                source_file, line = bad["replay_of"]
                landed = main_run["landing"].resolve() / source_file
                assert re.fullmatch(
                    rf"duplicate event: also in {re.escape(str(landed))} line {line}",
                    reasons[(name, bad["line"])],
                ), (name, bad["line"])


def test_unreadable_files_are_quarantined_as_whole_files(main_run) -> None:
    quarantine, events = main_run["quarantine"], main_run["events"]
    unreadable = corpus_files("quarantine_file")
    assert len(unreadable) == 10
    whole = quarantine[quarantine["line"].isna()]
    assert sorted(whole["file"]) == unreadable
    assert whole["reason"].str.startswith("unreadable file: ").all()
    assert (pd.to_datetime(whole["date"]).dt.date == DAY).all()
    assert not quarantine[quarantine["line"].notna()]["file"].isin(unreadable).any()
    assert not events["file"].isin(unreadable).any()


def test_nothing_is_lost_and_ignored_files_are_not_read(main_run) -> None:
    events, quarantine = main_run["events"], main_run["quarantine"]
    for name in corpus_files("ingest"):
        spec = FILES[name]
        rows = (events["file"] == name).sum() + (quarantine["file"] == name).sum()
        assert rows == len(spec["good"]) + len(spec["bad"]), name
    ignored = {name for name, spec in FILES.items() if spec["action"] == "ignore"}
    assert len(ignored) == 3
    assert not (events["file"].isin(ignored).any() or quarantine["file"].isin(ignored).any())
    assert set(events["file"]) | set(quarantine["file"]) <= set(FILES)
    assert not events["page"].str.contains("DECOY").any()


@pytest.mark.parametrize("name", sorted(MANIFEST["file_level"]))
def test_a_file_missing_a_required_column_fails_the_run_naming_it(
    tmp_path: Path, source: SourceConfig, name: str
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    shutil.copyfile(CORPUS / "file_level" / name, landing / name)
    companion = "clicks_2020-07-15_h01_bom_crlf.csv"
    shutil.copyfile(CORPUS / companion, landing / companion)
    context = pipeline.StageContext(source, Warehouse(tmp_path / "warehouse"), landing, RunInfo("run", "v"))
    with pytest.raises(LandingFileError) as raised:
        pipeline.run_ingest(context, [DAY])
    message = str(raised.value)
    assert message.startswith(f"{(landing / name).resolve()}: ")
    assert f"'{MANIFEST['file_level'][name]['missing_column']}'" in message
    assert companion not in message
    assert "\n" not in message


@pytest.mark.parametrize("case", DISAGREEMENTS.values(), ids=DISAGREEMENTS.keys())
def test_disagreement(tmp_path: Path, source: SourceConfig, case: Disagreement) -> None:
    """The original file alone, held to its manifest entry (for a line case: only those lines); read
    by the ingestion library that run_ingest calls, without a warehouse, to keep this fast."""
    landing = tmp_path / "landing"
    landing.mkdir()
    shutil.copyfile(CORPUS / case.file, landing / case.file)
    _, window = ingest_folder(source, landing, DAYS)
    events = all_events(window, DAYS)["line"].astype(int).tolist()
    quarantine = pd.concat([window.quarantine[day] for day in DAYS], ignore_index=True)
    assert quarantine["line"].notna().all(), quarantine[["line", "reason"]].to_string()  # no file-level row
    quarantined = dict(zip(quarantine["line"].astype(int), quarantine["reason"], strict=True))
    spec = FILES[case.file]
    if case.category is None:
        assert sorted(events) == sorted(good["line"] for good in spec["good"])
        assert sorted(quarantined) == sorted(bad["line"] for bad in spec["bad"])
    for line in case.lines():
        assert line not in events, f"{case.file}:{line} kept as an event"
        assert quarantined.get(line, "").strip(), f"{case.file}:{line} not quarantined"
