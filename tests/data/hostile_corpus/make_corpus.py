"""Regenerate the hostile clickstream corpus and its MANIFEST.json (deterministic).

    .venv/bin/python tests/data/hostile_corpus/make_corpus.py

Every file is built from a list of records, each one the exact bytes written (with its own line
ending) and what a correct pipeline must do with it. Line numbers are computed here, never typed by
hand: a record's line is the 1-based physical line (count of b"\\n" before it, plus one) where it
starts in the *decompressed* file, the CSV header being line 1. Parquet rows are numbered 1..n.

Good rows use pages ``hxp*`` and users ``hx*`` that never occur in the reference clickstream, so
their contribution to a bucket's distinct pages / users / clicks adds exactly to the reference.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DAY = "2020-07-15"
HEADER = "timestamp,page,user,session_id"
GZIP_MTIME = 0  # deterministic gzip headers

JUDGEMENT = {
    "line_numbers": "1-based physical line in the decompressed file; the CSV header is line 1; "
    "JSON lines start at 1; Parquet rows are numbered 1..n. CSV records are lines (see quoting).",
    "blank_lines": "empty lines (\\n or \\r\\n alone) are skipped: not events, not quarantined. "
    "Revised after part 2: a line of only spaces/tabs is not empty; quarantining it (wrong column "
    "count) is visible and harmless, so it is listed as bad (first blind version: skipped).",
    "offsets_and_zones": "ISO timestamps with an offset or Z are good and converted to UTC: "
    "2020-07-15T10:00:00+02:00 is 08:00 UTC; 2020-07-14T23:30:00-02:00 lands on 2020-07-15 01:30 "
    "UTC. An ISO 'T' timestamp without offset is in the source time zone (UTC). Fractional seconds "
    "are good (bucketed by their instant). Zone abbreviations (PST) and offsets beyond +-24h are "
    "quarantined.",
    "epoch_numbers": "quarantined: the source declares '%Y-%m-%d %H:%M:%S' (ISO also parses); a "
    "bare number is not a timestamp of that source and seconds vs milliseconds is a guess.",
    "date_only": "'2020-07-15' without a time is quarantined: bucketing it at 00:00 would invent a "
    "spike in the first bucket.",
    "leap_second_and_24h": "'10:00:60' is quarantined. Revised after part 2: '2020-07-15 24:00:00' "
    "is ISO 8601's end of day, 2020-07-16 00:00 UTC, a good event of the next day (the pipeline "
    "documents this; first blind version: quarantined).",
    "duplicates": "an identical line repeated within one file is a separate event (double click, "
    "as the README says) and is kept; the same event (same UTC instant, trimmed page, user, "
    "session_id) in another file is a replay: quarantined in the file that sorts later by name, "
    "even when written in another format (CSV vs JSON lines, ' 10:00:00' vs 'T10:00:00Z').",
    "repeated_header": "a header line repeated mid-file is quarantined (not silently skipped).",
    "column_count": "a CSV row whose field count differs from the header's is quarantined, also a "
    "row missing only the optional session_id. Revised after part 2: ONE trailing delimiter (an "
    "empty extra last field) is harmless and the row is good (first blind version: quarantined). A "
    "header AND all rows with one trailing delimiter is a consistent extra empty column: rows good.",
    "quoting": "RFC 4180: quoted commas / doubled quotes are good; text after a closing quote is "
    "malformed (quarantined); an unterminated quote quarantines only its own line and parsing "
    "resumes on the next line (log records are lines; it must not swallow the rest of the file). "
    "Revised after part 2, for consistency with records-are-lines: a quoted field with an embedded "
    "newline is two bad lines (each has an unbalanced quote), not one multi-line record; a quote "
    'inside an unquoted field (hxp"stray) is invalid RFC 4180 and quarantined (first blind '
    "version: kept as a literal).",
    "control_characters": "any C0/C1 control character inside a value (NUL, ESC, VT, FF, U+0085, "
    "a newline embedded in a quoted CSV field or escaped in JSON) quarantines the row; U+2028 "
    "(LINE SEPARATOR) is not a control character and not a line end: good.",
    "encoding": "files are UTF-8 (a leading BOM is stripped); a row with invalid UTF-8 (latin-1 "
    "bytes, overlong, surrogates, truncated sequences) is quarantined, the rest of the file kept. "
    "A UTF-16 file is unreadable as a whole: file quarantined (not a missing-column run failure).",
    "field_length": "max_field_length 1024 counts characters after trimming: 1024 is good (also "
    "1024 two-byte characters), 1025 is quarantined.",
    "missing_values": "empty or whitespace-only page/user is a missing required value: quarantined; "
    "empty/null session_id is fine (optional). Strings are never null literals: a user named "
    "'null' or a page 'NA' is kept as text; numeric-looking ids keep their text ('007' != '7', "
    "'1e3' != '1000').",
    "header": "header names are matched after trimming and columns by name in any order; extra "
    "columns are ignored; a missing optional column (session_id) is fine.",
    "json_types": "a JSON line must be one object; arrays, scalars, null, pretty-printed fragments, "
    "two objects on a line, trailing garbage, NaN and malformed JSON are quarantined. An integer "
    "user id is kept as its decimal text (numeric ids are common and lossless); booleans, objects "
    "and arrays as page/user are wrong types: quarantined. null session_id is fine.",
    "compression": "multi-member gzip (concatenated streams) is read in full. Revised after part 2: "
    "a .csv.gz that is plain text and a .csv that is gzip are quarantined as whole files with a "
    "clear reason (the name is the contract; first blind version: sniff the content and read).",
    "unreadable_files": "a truncated gzip, truncated Parquet, binary garbage or UTF-16 file is "
    "quarantined as a whole file (on 2020-07-15, the date in its name); none of its rows are "
    "events; the run goes on.",
    "empty_files": "header-only CSV and zero-byte JSON lines files contribute nothing and are not "
    "quarantined. Revised after part 2: a CSV with no header line (zero bytes, or a gzip of zero "
    "bytes) is quarantined as a file ('empty file (no header line)'): visible, not a run failure "
    "(first blind version: ignored).",
    "ignored_files": "files not matching the source globs (README_clicks.csv, hidden "
    ".clicks_*.csv) are not read at all.",
    "long_lines": "a 3 MB line (in a .csv.gz) and a 40 KB line are quarantined for the overlong "
    "field; the lines around them are good.",
}


class File:
    """Records of one file: bytes written plus the expectation for each."""

    def __init__(self, name: str, tag: str, note: str = "", whole: str = ""):
        self.name, self.tag, self.note, self.whole = name, tag, note, whole
        self.records: list[tuple[bytes, dict]] = []
        self.n = 0

    def user(self) -> str:
        self.n += 1
        return f"hx{self.tag}u{self.n:03d}"

    def raw(self, data: bytes | str, expect: dict) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.records.append((data, expect))

    def header(self, text: str = HEADER, eol: str = "\n") -> None:
        self.raw(text + eol, {"kind": "header"})

    def blank(self, text: str = "\n") -> None:
        self.raw(text, {"kind": "blank"})

    def good(self, data, ts, page, user, session_id=None, note=""):
        exp = {"kind": "good", "timestamp": ts, "page": page, "user": user}
        if session_id is not None:
            exp["session_id"] = session_id
        if note:
            exp["note"] = note
        self.raw(data, exp)

    def bad(self, data, category: str, **extra) -> None:
        self.raw(data, {"kind": "bad", "category": category, **extra})

    def csv_good(self, ts, page="hxpA", user=None, sid=None, eol="\n", raw_ts=None, note=""):
        user = user or self.user()
        sid = sid if sid is not None else f"s-{user}"
        line = f"{raw_ts or ts},{page},{user},{sid}{eol}"
        self.good(line, ts, page.strip(), user.strip(), sid.strip(), note)
        return line

    def bytes(self) -> bytes:
        return b"".join(data for data, _ in self.records)

    def manifest(self) -> dict:
        good, bad, continuation, blank, header = [], [], [], [], []
        line = 1
        for data, exp in self.records:
            span = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            if not data:
                span = 0
            kind = exp["kind"]
            if kind == "good":
                good.append({"line": line, **{k: v for k, v in exp.items() if k != "kind"}})
            elif kind == "bad":
                bad.append({"line": line, **{k: v for k, v in exp.items() if k != "kind"}})
            elif kind == "blank":
                blank.extend(range(line, line + span))
            elif kind == "header":
                header.append(line)
            if kind in ("good", "bad") and span > 1:
                continuation.extend(range(line + 1, line + span))
            line += data.count(b"\n")
        total = self.bytes().count(b"\n") + (0 if self.bytes().endswith(b"\n") or not self.bytes() else 1)
        listed = [g["line"] for g in good] + [b["line"] for b in bad] + continuation + blank + header
        assert sorted(listed) == list(range(1, total + 1)), (self.name, sorted(listed), total)
        if self.whole:
            return {
                "format": fmt_of(self.name),
                "action": "quarantine_file",
                "category": self.whole,
                "note": self.note,
            }
        out = {"format": fmt_of(self.name), "action": "ingest", "lines": total, "header_lines": header}
        out.update(good=good, bad=bad, continuation_lines=continuation, blank_lines=blank)
        if self.note:
            out["note"] = self.note
        return out


def fmt_of(name: str) -> str:
    for ext in (".csv.gz", ".jsonl.gz", ".csv", ".jsonl", ".parquet"):
        if name.endswith(ext):
            return ext[1:]
    return "other"


def gz(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=GZIP_MTIME, filename="") as f:
        f.write(data)
    return buf.getvalue()


def jl(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def t(hm: str) -> str:
    return f"{DAY} {hm}"


FILES: list[File] = []
WHOLE: dict[str, dict] = {}  # name -> manifest entry for files not built from records
PAYLOAD: dict[str, bytes] = {}


def add(f: File) -> File:
    FILES.append(f)
    return f


# --- h01: UTF-8 BOM, CRLF everywhere, blank CRLF line, no newline at EOF -------------------------
f = add(File(f"clicks_{DAY}_h01_bom_crlf.csv", "01", "UTF-8 BOM before the header, CRLF line ends"))
f.raw("\ufeff" + HEADER + "\r\n", {"kind": "header"})
f.csv_good(t("10:01:00"), eol="\r\n")
f.csv_good(t("10:02:00"), page="hxpB", eol="\r\n")
f.blank("\r\n")
f.csv_good(t("10:03:00"), eol="\r\n")
f.csv_good(t("10:04:00"), eol="")  # last line without a line end

# --- h02: mixed LF / CRLF, blank and whitespace-only lines, padded fields ------------------------
f = add(File(f"clicks_{DAY}_h02_mixed_eol.csv", "02", "LF and CRLF mixed, padding like the reference"))
f.header(eol="\r\n")
f.csv_good(t("10:05:00"), page=" hxpA ", user=" hx02u900 ", sid="s-pad2", eol="\n")
f.csv_good(
    t("10:05:30"),
    page="hxpA",
    user="hx02u900",
    sid=" s-pad ",
    eol="\r\n",
    note="same page/user as the padded line above once trimmed: adds 1 page, 1 user, 2 clicks",
)
f.blank("\n")
f.bad("   \n", "whitespace_only_line")
f.blank("\r\n")
f.csv_good(t("10:06:00"), raw_ts=f"  {t('10:06:00')}  ", eol="\n", note="padded timestamp")
f.bad("\t \n", "whitespace_only_line")
f.csv_good(t("10:07:00"), page="hxpC", eol="\r\n")

# --- h03: quoting ---------------------------------------------------------------------------------
f = add(File(f"clicks_{DAY}_h03_quoting.csv", "03", "RFC 4180 quoting, good and malformed"))
f.header()
u = f.user()
f.good(f'{t("10:11:00")},"hxp, with comma",{u},s1\n', t("10:11:00"), "hxp, with comma", u)
u = f.user()
f.good(f'{t("10:11:10")},"hxp ""quoted""",{u},s2\n', t("10:11:10"), 'hxp "quoted"', u)
u = f.user()
f.good(f'"{t("10:11:20")}","hxpA","{u}","s3"\n', t("10:11:20"), "hxpA", u, note="every field quoted")
u = f.user()
f.good(f'{t("10:11:30")}," hxpB ",{u},s4\n', t("10:11:30"), "hxpB", u, note="quoted padding trimmed")
u = f.user()
f.bad(f'{t("10:11:40")},"hxp\n', "quote_not_closed_on_its_line_embedded_newline")
f.bad(f'split",{u},s5\n', "fragment_after_embedded_newline")
u = f.user()
f.bad(f'{t("10:11:50")},hxp"stray,{u},s6\n', "quote_inside_unquoted_field")
u = f.user()
f.bad(f'{t("10:12:00")},"hxpA"junk,{u},s7\n', "malformed_quote_text_after_closing_quote")
f.csv_good(t("10:12:10"))
u = f.user()
f.good(f'{t("10:12:20")},hxpA,{u},"s,8,""x"""\n', t("10:12:20"), "hxpA", u, 's,8,"x"')

# --- h04: unterminated quote in the middle; good lines after it have no quotes ------------------
f = add(
    File(f"clicks_{DAY}_h04_unterminated_quote.csv", "04", "an unterminated quote must not swallow the file")
)
f.header()
f.csv_good(t("10:13:00"))
f.csv_good(t("10:13:10"))
f.bad(f'{t("10:13:20")},"hxp unterminated,{f.user()},s\n', "unterminated_quote")
f.csv_good(t("10:13:30"))
f.csv_good(t("10:13:40"), page="hxpB")
f.csv_good(t("10:13:50"))

# --- h05: column counts, repeated header ----------------------------------------------------------
f = add(File(f"clicks_{DAY}_h05_columns.csv", "05", "wrong column counts and a repeated header"))
f.header()
f.csv_good(t("10:21:00"))
f.bad(f"{t('10:21:10')},hxpA,{f.user()}\n", "wrong_column_count_3_of_4")
f.bad(f"{t('10:21:20')},hxpA,{f.user()},s,extra\n", "wrong_column_count_5_of_4")
u = f.user()
f.good(f"{t('10:21:30')},hxpA,{u},s,\n", t("10:21:30"), "hxpA", u, "s", note="one trailing delimiter")
f.bad(",,,\n", "missing_required_values_only_delimiters")
f.bad("just one field\n", "wrong_column_count_1_of_4")
f.csv_good(t("10:21:40"))
f.bad(HEADER + "\n", "repeated_header")
f.csv_good(t("10:21:50"), page="hxpB")
f.bad(f"{t('10:22:00')};hxpA;{f.user()};s\n", "wrong_column_count_semicolon_delimited")
f.csv_good(t("10:22:10"))

# --- h06: encodings and control characters ---------------------------------------------------------
f = add(File(f"clicks_{DAY}_h06_encoding.csv", "06", "invalid UTF-8 and control characters per row"))
f.header()
f.csv_good(t("10:31:00"))
f.bad(f"{t('10:31:05')},caf".encode() + b"\xe9" + f",{f.user()},s\n".encode(), "invalid_utf8_latin1")
f.bad(f"{t('10:31:10')},hxp".encode() + b"\xff\xfe" + f",{f.user()},s\n".encode(), "invalid_utf8_ff_fe")
f.bad(f"{t('10:31:15')},hxp".encode() + b"\xc0\xaf" + f",{f.user()},s\n".encode(), "invalid_utf8_overlong")
f.bad(
    f"{t('10:31:20')},hxp".encode() + b"\xed\xa0\x80" + f",{f.user()},s\n".encode(), "invalid_utf8_surrogate"
)
f.bad(
    f"{t('10:31:25')},hxp".encode() + b"\xe2\x82" + f",{f.user()},s\n".encode(),
    "invalid_utf8_truncated_sequence",
)
f.bad(f"{t('10:31:30')},hxp\x00nul,{f.user()},s\n", "control_character_nul")
f.bad(f"{t('10:31:35')},hxp\x1b[31mred,{f.user()},s\n", "control_character_esc")
f.bad(f"{t('10:31:40')},hxp\x0bvt,{f.user()},s\n", "control_character_vertical_tab")
f.bad(f"{t('10:31:45')},hxp\x0cff,{f.user()},s\n", "control_character_form_feed")
f.bad(f"{t('10:31:50')},hxp\x85nel,{f.user()},s\n", "control_character_c1_nel")
f.bad(f"{t('10:31:55')},hxp\x00,{f.user()},\x00\n", "control_character_nul_in_session")
f.csv_good(t("10:32:00"), page="hxpäge", note="valid UTF-8 non-ASCII page")
f.csv_good(t("10:32:05"), page="hxp页面", user="hx06u😀", note="CJK page and emoji user")
f.csv_good(t("10:32:10"), page="hxp\u2028sep", note="U+2028 inside a value is not a line end (judgement)")
f.csv_good(t("10:32:15"))

# --- h07: timestamps -------------------------------------------------------------------------------
f = add(
    File(f"clicks_{DAY}_h07_timestamps.csv", "07", "unparseable, out-of-range, zoned and epoch timestamps")
)
f.header()
for raw, cat in [
    ("0000-07-15 10:00:00", "timestamp_year_0"),
    ("2020-02-30 10:00:00", "timestamp_feb_30"),
    ("2020-07-15 25:61:00", "timestamp_hour_25_minute_61"),
    ("2020-07-15 10:00:60", "timestamp_second_60"),
    ("2020-07-15", "timestamp_date_only"),
    ("1594807200", "timestamp_epoch_seconds"),
    ("1594807200000", "timestamp_epoch_millis"),
    ("", "timestamp_empty"),
    ("NaT", "timestamp_nat"),
    ("null", "timestamp_null_literal"),
    ("15/07/2020 10:00:00", "timestamp_day_first"),
    ("2020-07-15T10:00:00+25:00", "timestamp_offset_out_of_range"),
    ("2020-07-15 10:00:00 PST", "timestamp_zone_abbreviation"),
    ("2020-07-15 10:0", "timestamp_truncated"),
    ("2020-13-15 10:00:00", "timestamp_month_13"),
    ("10000-07-15 10:00:00", "timestamp_year_10000"),
]:
    f.bad(f"{raw},hxpA,{f.user()},s\n", cat)
f.csv_good(t("08:40:00"), raw_ts="2020-07-15T10:40:00+02:00", note="offset +02:00 -> 08:40 UTC")
f.csv_good(t("10:40:10"), raw_ts="2020-07-15T10:40:10Z", note="Z")
f.csv_good(t("10:40:20"), raw_ts="2020-07-15 10:40:20+00:00", note="+00:00 with a space")
f.csv_good(t("10:40:30"), raw_ts="2020-07-15T10:40:30", note="ISO T without offset: source zone UTC")
f.csv_good(t("10:40:40.123456"), raw_ts="2020-07-15T10:40:40.123456Z", note="fractional seconds")
f.csv_good(t("10:49:59.999"), raw_ts="2020-07-15 10:49:59.999", note="last millisecond of bucket 10:40")
f.csv_good(t("10:50:00"), note="exact bucket boundary -> bucket 10:50")
f.csv_good(t("01:30:00"), raw_ts="2020-07-14T23:30:00-02:00", note="local date 14th, UTC 15th")
f.csv_good(t("23:00:00"), raw_ts="2020-07-16T01:00:00+02:00", note="local date 16th, UTC 15th")
f.csv_good(t("00:00:00"), note="first instant of the day")
f.csv_good("2020-07-16 00:00:00", raw_ts=t("24:00:00"), note="ISO end of day: the next day's first instant")
f.csv_good(t("23:59:59"), note="last second of the day")

# --- h08: field values and lengths -------------------------------------------------------------------
f = add(File(f"clicks_{DAY}_h08_fields.csv", "08", "lengths, missing values, numeric-looking ids"))
f.header()
f.csv_good(t("11:01:00"), page="hxp" + "x" * 1021, note="page of exactly 1024 characters")
f.bad(f"{t('11:01:10')},{'hxp' + 'y' * 1022},{f.user()},s\n", "field_over_max_length_1025")
f.csv_good(t("11:01:20"), page="hxp" + "é" * 1021, note="1024 characters, 2045 bytes (judgement: chars)")
f.bad(f"{t('11:01:30')},,{f.user()},s\n", "missing_required_page_empty")
f.bad(f"{t('11:01:40')},hxpA,   ,s\n", "missing_required_user_whitespace_only")
f.bad(f'{t("11:01:50")},hxpA,"",s\n', "missing_required_user_quoted_empty")
f.csv_good(t("11:02:00"), sid="", note="empty optional session_id")
f.csv_good(t("11:02:10"), user="007", note="leading zeros kept: 007, 7 and 0007 are three users")
f.csv_good(t("11:02:20"), user="7")
f.csv_good(t("11:02:30"), user="0007")
f.csv_good(t("11:02:40"), page="1e3", note="1e3 and 1000 are two pages, not numbers")
f.csv_good(t("11:02:50"), page="1000")
f.csv_good(t("11:03:00"), user="null", note="a user named null is a string (judgement)")
f.csv_good(t("11:03:10"), page="NA", note="a page named NA is a string (judgement)")
f.bad(f"{t('11:03:20')},{'hxp' + 'L' * 40000},{f.user()},s\n", "extremely_long_line_40kb_overlong_field")
f.csv_good(t("11:03:30"))
f.bad(f"{t('11:03:40')},hxpA,{f.user()},{'s' * 1025}\n", "optional_field_over_max_length")

# --- h09 / h10: duplicates within a file (kept) and a replay in another file (quarantined) ---------
f = add(File(f"clicks_{DAY}_h09_duplicates.csv", "09", "identical lines within one file are separate events"))
f.header()
dup = f"{t('11:11:00')}, hxpA , hx09u900,s-dup\n"
for _ in range(2):
    f.good(dup, t("11:11:00"), "hxpA", "hx09u900", "s-dup", note="exact duplicate line kept")
trip = f"{t('11:11:10')},hxpB,hx09u901,s-trip\n"
for _ in range(3):
    f.good(trip, t("11:11:10"), "hxpB", "hx09u901", "s-trip", note="triplicate kept")
REPLAY = len(f.bytes().splitlines()) + 1
f.csv_good(t("11:11:20"), user="hx09u902", sid="s-replayed-1")
f.csv_good(t("11:11:30"), user="hx09u903", sid="s-replayed-2")

f = add(File(f"clicks_{DAY}_h10_replay.jsonl", "10", "replays of h09 events, in JSON and ISO form"))
f.raw(
    jl(
        {
            "timestamp": "2020-07-15T11:11:20Z",
            "page": "hxpA",
            "user": "hx09u902",
            "session_id": "s-replayed-1",
        }
    )
    + "\n",
    {
        "kind": "bad",
        "category": "duplicate_replay",
        "replay_of": [f"clicks_{DAY}_h09_duplicates.csv", REPLAY],
    },
)
f.raw(
    jl(
        {
            "timestamp": "2020-07-15 11:11:30",
            "page": " hxpA",
            "user": "hx09u903 ",
            "session_id": "s-replayed-2",
        }
    )
    + "\n",
    {
        "kind": "bad",
        "category": "duplicate_replay",
        "replay_of": [f"clicks_{DAY}_h09_duplicates.csv", REPLAY + 1],
    },
)
u = f.user()
f.good(
    jl({"timestamp": t("11:11:40"), "page": "hxpA", "user": u, "session_id": "s"}) + "\n",
    t("11:11:40"),
    "hxpA",
    u,
    "s",
)

# --- h11..h14: headers ------------------------------------------------------------------------------
f = add(File(f"clicks_{DAY}_h11_reordered_extra.csv", "11", "columns in another order plus an extra column"))
f.header("user,session_id,referrer,timestamp,page")
for hm, page in [("11:21:00", "hxpA"), ("11:21:10", "hxpB"), ("11:21:20", "hxpA")]:
    u = f.user()
    f.good(f"{u},s-{u},https://example.com/?a=1,{t(hm)},{page}\n", t(hm), page, u, f"s-{u}")

f = add(File(f"clicks_{DAY}_h12_no_session.csv", "12", "the optional session_id column is absent"))
f.header("timestamp,page,user")
for hm in ("11:22:00", "11:22:10"):
    u = f.user()
    f.good(f"{t(hm)},hxpC,{u}\n", t(hm), "hxpC", u)

f = add(File(f"clicks_{DAY}_h13_trailing_comma_all.csv", "13", "header and every row end with a delimiter"))
f.header(HEADER + ",")
for hm in ("11:23:00", "11:23:10"):
    u = f.user()
    f.good(f"{t(hm)},hxpA,{u},s-{u},\n", t(hm), "hxpA", u, f"s-{u}")

f = add(File(f"clicks_{DAY}_h14_padded_header.csv", "14", "header names padded with spaces like the data"))
f.header(" timestamp , page , user , session_id ")
f.csv_good(t("11:24:00"), page=" hxpA ")
f.csv_good(t("11:24:10"), page=" hxpD ")

# --- h15..h18: empty files ------------------------------------------------------------------------
f = add(File(f"clicks_{DAY}_h15_header_only.csv", "15", "header only"))
f.header()
f = add(File(f"clicks_{DAY}_h16_header_only_no_eol.csv", "16", "header only, no final newline"))
f.header(eol="")
f = add(File(f"clicks_{DAY}_h17_zero_bytes.csv", "17", "zero bytes", whole="csv_without_header_line"))
f = add(File(f"clicks_{DAY}_h18_zero_bytes.jsonl", "18", "zero bytes"))

# --- h19..h24: gzip -------------------------------------------------------------------------------
f = add(File(f"clicks_{DAY}_h19_good.csv.gz", "19", "ordinary gzip with one bad row"))
f.header()
f.csv_good(t("12:01:00"))
f.bad(f"2020-02-30 12:01:10,hxpA,{f.user()},s\n", "timestamp_feb_30")
f.csv_good(t("12:01:20"), page="hxpB")
GZIP_FILES = {f.name: "gzip"}

f = add(
    File(f"clicks_{DAY}_h21_plain_text.csv.gz", "21", "named .gz, content is plain CSV", whole="not_gzip")
)
f.header()
f.csv_good(t("12:11:00"))
f.csv_good(t("12:11:10"))
f.bad(f"{t('12:11:20')},hxpA\n", "wrong_column_count_2_of_4")

f = add(
    File(f"clicks_{DAY}_h22_actually_gzip.csv", "22", "named .csv, content is gzip", whole="gzip_named_csv")
)
f.header()
f.csv_good(t("12:12:00"))
f.csv_good(t("12:12:10"), page="hxpB")
GZIP_FILES[f.name] = "gzip"

f = add(File(f"clicks_{DAY}_h23_multimember.csv.gz", "23", "two concatenated gzip members (cat a.gz b.gz)"))
f.header()
f.csv_good(t("12:13:00"))
f.csv_good(t("12:13:10"))
f.csv_good(t("12:13:20"), page="hxpB")  # second member starts here
f.csv_good(t("12:13:30"))
GZIP_FILES[f.name] = "multimember:3"

f = add(File(f"clicks_{DAY}_h24_longline.csv.gz", "24", "a 3 MB line inside a small gzip"))
f.header()
f.csv_good(t("12:14:00"))
f.bad(f"{t('12:14:10')},hxp{'Z' * 3_000_000},{f.user()},s\n", "extremely_long_line_3mb_overlong_field")
f.csv_good(t("12:14:20"))
GZIP_FILES[f.name] = "gzip"

f = add(
    File(
        f"clicks_{DAY}_h27_empty_gzip.csv.gz",
        "27",
        "a valid gzip of zero bytes",
        whole="csv_without_header_line",
    )
)
GZIP_FILES[f.name] = "gzip"

# --- h28: JSON lines --------------------------------------------------------------------------------
f = add(File(f"clicks_{DAY}_h28_objects.jsonl", "28", "JSON lines: BOM, CRLF, wrong shapes and types"))


def obj(hm, page="hxpA", user=None, **extra):
    return {"timestamp": t(hm), "page": page, "user": user or f.user(), **extra}


o = obj("12:21:00", session_id="s")
f.good("\ufeff" + jl(o) + "\r\n", o["timestamp"], "hxpA", o["user"], "s", note="BOM before the first object")
o = obj("12:21:05", referrer="x", extra={"deep": [1, 2]})
f.good(jl(o) + "\r\n", o["timestamp"], "hxpA", o["user"], note="extra fields ignored")
o = obj("12:21:10")
f.good(jl(o) + "\n", o["timestamp"], "hxpA", o["user"], note="no session_id")
o = obj("12:21:15", session_id=None)
f.good(jl(o) + "\n", o["timestamp"], "hxpA", o["user"], note="null session_id")
o = obj("12:21:20", page="  hxpB ", user=" hx28u900 ")
f.good(jl(o) + "\n", o["timestamp"], "hxpB", "hx28u900", note="padded strings trimmed")
f.good(
    jl({"timestamp": "2020-07-15T14:21:25+02:00", "page": "hxpA", "user": "hx28u901"}) + "\n",
    t("12:21:25"),
    "hxpA",
    "hx28u901",
    note="offset",
)
f.good(
    jl({"timestamp": t("12:21:30"), "page": "hxpA", "user": 28902}) + "\n",
    t("12:21:30"),
    "hxpA",
    "28902",
    note="integer user id kept as text (judgement)",
)
f.good(
    '{"timestamp":"' + t("12:21:35") + '","page":"hxp\\u00e9","user":"hx28u903"}\n',
    t("12:21:35"),
    "hxpé",
    "hx28u903",
    note="\\u escape of a valid character",
)
f.blank("\n")
f.blank("  \r\n")
bad_json = [
    (jl({"timestamp": t("12:22:00"), "page": "hxpA"}), "missing_required_user"),
    (jl({"timestamp": t("12:22:05"), "page": "hxpA", "user": None}), "missing_required_user_null"),
    (jl({"page": "hxpA", "user": "hx28u910"}), "missing_timestamp_in_row"),
    (jl({"timestamp": t("12:22:10"), "page": True, "user": "hx28u911"}), "wrong_type_bool_page"),
    (
        jl({"timestamp": t("12:22:15"), "page": {"name": "hxpA"}, "user": "hx28u912"}),
        "wrong_type_nested_object",
    ),
    (jl({"timestamp": t("12:22:20"), "page": ["hxpA"], "user": "hx28u913"}), "wrong_type_array_value"),
    (jl({"timestamp": 1594815740, "page": "hxpA", "user": "hx28u914"}), "timestamp_epoch_number"),
    (jl([t("12:22:25"), "hxpA", "hx28u915", "s"]), "not_an_object_array"),
    (
        jl([{"timestamp": t("12:22:30"), "page": "hxpA", "user": "hx28u916"}]),
        "not_an_object_array_of_objects",
    ),
    ('"just a string"', "not_an_object_string"),
    ("42", "not_an_object_number"),
    ("null", "not_an_object_null"),
    ("{}", "missing_all_fields_empty_object"),
    ('{"timestamp":"' + t("12:22:35") + '","page":"hxpA","user":"hx28u917"', "malformed_json_truncated"),
    (
        '{"timestamp":"' + t("12:22:40") + '","page":"hxpA","user":"hx28u918",}',
        "malformed_json_trailing_comma",
    ),
    ('{"timestamp":NaN,"page":"hxpA","user":"hx28u919"}', "malformed_json_nan"),
    (jl(obj("12:22:45")) + jl(obj("12:22:50")), "malformed_json_two_objects"),
    (jl(obj("12:22:55")) + " trailing", "malformed_json_trailing_garbage"),
    (
        '{"timestamp":"' + t("12:23:00") + '","page":"hxp\\u0000","user":"hx28u920"}',
        "control_character_nul_escape",
    ),
    (
        '{"timestamp":"' + t("12:23:05") + '","page":"hxp\\nx","user":"hx28u921"}',
        "control_character_newline_escape",
    ),
    (
        '{"timestamp":"' + t("12:23:10") + '","page":"hxp\\ud800","user":"hx28u922"}',
        "invalid_unicode_lone_surrogate",
    ),
    (jl({"timestamp": t("12:23:15"), "page": "", "user": "hx28u923"}), "missing_required_page_empty"),
    (jl({"timestamp": t("12:23:20"), "page": "hxpA", "user": "   "}), "missing_required_user_whitespace"),
    (jl({"timestamp": "2020-07-15 25:61:00", "page": "hxpA", "user": "hx28u924"}), "timestamp_hour_25"),
    (
        "{'timestamp': '" + t("12:23:25") + "', 'page': 'hxpA', 'user': 'hx28u925'}",
        "malformed_json_single_quotes",
    ),
    (
        jl({"timestamp": t("12:23:30"), "page": "hxp" + "J" * 40000, "user": "hx28u926"}),
        "extremely_long_line_40kb_overlong_field",
    ),
]
for text, cat in bad_json:
    f.bad(text + "\n", cat)
f.bad(
    b'{"timestamp":"' + t("12:23:35").encode() + b'","page":"caf\xe9","user":"hx28u927"}\n',
    "invalid_utf8_latin1",
)
for part in [
    "{\n",
    f'  "timestamp": "{t("12:23:40")}",\n',
    '  "page": "hxpA",\n',
    '  "user": "hx28u928"\n',
    "}\n",
]:
    f.bad(part, "pretty_printed_object_fragment")
o = obj("12:23:50", page="hxpC")
f.good(jl(o), o["timestamp"], "hxpC", o["user"], note="good after the mess, no final newline")

f = add(File(f"clicks_{DAY}_h29_good.jsonl.gz", "29", "gzipped JSON lines"))
for hm in ("12:31:00", "12:31:10"):
    o = obj(hm, page="hxpD", user=f.user())
    f.good(jl(o) + "\n", o["timestamp"], "hxpD", o["user"])
f.bad(
    jl({"timestamp": "2020-07-15 10:00:00 PST", "page": "hxpA", "user": f.user()}) + "\n",
    "timestamp_zone_abbreviation",
)
GZIP_FILES[f.name] = "gzip"


def write_records():
    for f in FILES:
        data = f.bytes()
        how = GZIP_FILES.get(f.name)
        if how == "gzip":
            data = gz(data)
        elif how and how.startswith("multimember:"):
            k = int(how.split(":")[1])
            lines = data.splitlines(keepends=True)
            data = gz(b"".join(lines[:k])) + gz(b"".join(lines[k:]))
        PAYLOAD[f.name] = data


# --- whole-file cases -------------------------------------------------------------------------------
def whole_files():
    body = (
        HEADER + "\n" + "".join(f"{t(f'12:41:{i:02d}')},hxpA,hx20u{i:03d},s\n" for i in range(40))
    ).encode()
    full = gz(body)
    PAYLOAD[f"clicks_{DAY}_h20_truncated.csv.gz"] = full[: len(full) // 2]
    WHOLE[f"clicks_{DAY}_h20_truncated.csv.gz"] = {"category": "truncated_gzip"}

    body = (jl({"timestamp": t("12:42:00"), "page": "hxpA", "user": "hx30u001"}) + "\n") * 30
    full = gz(body.encode())
    PAYLOAD[f"clicks_{DAY}_h30_truncated.jsonl.gz"] = full[:-12]  # CRC/size trailer cut
    WHOLE[f"clicks_{DAY}_h30_truncated.jsonl.gz"] = {"category": "truncated_gzip_trailer"}

    rng = random.Random(20200715)
    PAYLOAD[f"clicks_{DAY}_h25_garbage.csv"] = b"\x89PNG\r\n\x1a\n" + rng.randbytes(4000)
    WHOLE[f"clicks_{DAY}_h25_garbage.csv"] = {"category": "binary_garbage"}

    text = HEADER + "\n" + f"{t('12:43:00')},hxpA,hx26u001,s\n"
    PAYLOAD[f"clicks_{DAY}_h26_utf16.csv"] = text.encode("utf-16")
    WHOLE[f"clicks_{DAY}_h26_utf16.csv"] = {"category": "utf16_not_utf8"}

    good_table = parquet_bytes(
        pa.table(
            {
                "timestamp": pa.array(
                    [datetime(2020, 7, 15, 12, 44, tzinfo=UTC)] * 20, pa.timestamp("us", tz="UTC")
                ),
                "page": ["hxpA"] * 20,
                "user": [f"hx33u{i:03d}" for i in range(20)],
            }
        )
    )
    PAYLOAD[f"clicks_{DAY}_h33_truncated.parquet"] = good_table[: len(good_table) // 2]
    WHOLE[f"clicks_{DAY}_h33_truncated.parquet"] = {"category": "truncated_parquet"}

    PAYLOAD[f"clicks_{DAY}_h35_text.parquet"] = (
        HEADER + "\n" + f"{t('12:45:00')},hxpA,hx35u001,s\n"
    ).encode()
    WHOLE[f"clicks_{DAY}_h35_text.parquet"] = {"category": "parquet_that_is_csv_text"}


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    return buf.getvalue()


def parquet_files() -> dict[str, dict]:
    out = {}
    # h31: native tz-aware timestamps in Europe/Berlin, null / overlong / NUL values
    rows = [
        ("good", datetime(2020, 7, 15, 14, 51, 0), "hxpA", "hx31u001", "s"),  # 14:51 Berlin = 12:51 UTC
        ("good", datetime(2020, 7, 15, 14, 51, 10), "hxpB", "hx31u002", None),
        ("missing_required_page_null", datetime(2020, 7, 15, 14, 51, 20), None, "hx31u003", "s"),
        (
            "field_over_max_length_1025",
            datetime(2020, 7, 15, 14, 51, 30),
            "hxp" + "q" * 1022,
            "hx31u004",
            "s",
        ),
        ("control_character_nul", datetime(2020, 7, 15, 14, 51, 40), "hxp\x00", "hx31u005", "s"),
        ("missing_required_user_whitespace", datetime(2020, 7, 15, 14, 51, 50), "hxpA", "  ", "s"),
        ("missing_timestamp_null", None, "hxpA", "hx31u006", "s"),
        ("good", datetime(2020, 7, 15, 14, 52, 0), " hxpA ", " hx31u007 ", "s"),
    ]
    import zoneinfo

    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    ts = [r[1].replace(tzinfo=berlin) if r[1] else None for r in rows]
    table = pa.table(
        {
            "timestamp": pa.array(ts, pa.timestamp("us", tz="Europe/Berlin")),
            "page": [r[2] for r in rows],
            "user": [r[3] for r in rows],
            "session_id": [r[4] for r in rows],
        }
    )
    name = f"clicks_{DAY}_h31_native_ts.parquet"
    PAYLOAD[name] = parquet_bytes(table)
    out[name] = parquet_manifest(rows, ts, "native tz-aware timestamp[us, Europe/Berlin] column")

    # h32: timestamp as strings, user ids with leading zeros, naive local strings
    rows = [
        ("good", "2020-07-15 12:53:00", "hxpA", "hx32u001", "s"),
        ("good", "2020-07-15T14:53:10+02:00", "hxpA", "0042", None),
        ("timestamp_feb_30", "2020-02-30 12:53:20", "hxpA", "hx32u002", "s"),
        ("timestamp_epoch_seconds", "1594817600", "hxpA", "hx32u003", "s"),
        ("missing_required_user_null", "2020-07-15 12:53:30", "hxpA", None, "s"),
        ("good", " 2020-07-15 12:53:40 ", "hxpB", "42", "s"),
    ]
    table = pa.table(
        {
            "timestamp": [r[1] for r in rows],
            "page": [r[2] for r in rows],
            "user": [r[3] for r in rows],
            "session_id": [r[4] for r in rows],
        }
    )
    name = f"clicks_{DAY}_h32_string_ts.parquet"
    PAYLOAD[name] = parquet_bytes(table)
    parsed = {
        0: datetime(2020, 7, 15, 12, 53, 0, tzinfo=UTC),
        1: datetime(2020, 7, 15, 12, 53, 10, tzinfo=UTC),
        5: datetime(2020, 7, 15, 12, 53, 40, tzinfo=UTC),
    }
    out[name] = parquet_manifest(rows, [parsed.get(i) for i in range(len(rows))], "timestamp as strings")

    # h34: naive timestamp type (no zone) -> source time zone UTC
    rows = [("good", datetime(2020, 7, 15, 12, 54, s), "hxpC", f"hx34u{s:03d}", "s") for s in (0, 10, 20)]
    ts = [r[1] for r in rows]
    table = pa.table(
        {
            "timestamp": pa.array(ts, pa.timestamp("ms")),
            "page": [r[2] for r in rows],
            "user": [r[3] for r in rows],
            "session_id": [r[4] for r in rows],
        }
    )
    name = f"clicks_{DAY}_h34_naive_ts.parquet"
    PAYLOAD[name] = parquet_bytes(table)
    out[name] = parquet_manifest(rows, [x.replace(tzinfo=UTC) for x in ts], "naive timestamp[ms]: UTC")
    return out


def parquet_manifest(rows, ts, note) -> dict:
    good, bad = [], []
    for i, (kind, _, page, user, sid) in enumerate(rows, start=1):
        if kind == "good":
            utc = ts[i - 1].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
            entry = {"line": i, "timestamp": utc, "page": page.strip(), "user": user.strip()}
            if sid is not None:
                entry["session_id"] = sid
            good.append(entry)
        else:
            bad.append({"line": i, "category": kind})
    return {
        "format": "parquet",
        "action": "ingest",
        "lines": len(rows),
        "header_lines": [],
        "good": good,
        "bad": bad,
        "continuation_lines": [],
        "blank_lines": [],
        "note": note,
    }


def file_level() -> dict[str, dict]:
    out = {}
    name = f"clicks_{DAY}_no_timestamp_column.csv"
    PAYLOAD["file_level/" + name] = (f"time,page,user,session_id\n{t('13:00:00')},hxpA,hxFLu001,s\n").encode()
    out[name] = {
        "format": "csv",
        "action": "fail_run",
        "missing_column": "timestamp",
        "note": "header has 'time', not 'timestamp'",
    }
    name = f"clicks_{DAY}_no_user_column.csv"
    PAYLOAD["file_level/" + name] = (f"timestamp,page,session_id\n{t('13:00:10')},hxpA,s\n").encode()
    out[name] = {"format": "csv", "action": "fail_run", "missing_column": "user"}
    name = f"clicks_{DAY}_no_timestamp_column.parquet"
    PAYLOAD["file_level/" + name] = parquet_bytes(
        pa.table({"ts": [t("13:00:20")], "page": ["hxpA"], "user": ["u"]})
    )
    out[name] = {"format": "parquet", "action": "fail_run", "missing_column": "timestamp"}
    return out


def decoys() -> dict[str, dict]:
    out = {}
    for name in ("README_clicks.csv", f".clicks_{DAY}_hidden_partial.csv", f"clicks_{DAY}_h99.csv.part"):
        PAYLOAD[name] = (HEADER + "\n" + f"{t('13:10:00')},hxpDECOY,hxDECOYu001,s\n").encode()
        out[name] = {"format": "other", "action": "ignore", "note": "does not match the source globs"}
    return out


def main() -> None:
    write_records()
    whole_files()
    files = {f.name: f.manifest() for f in FILES}
    files.update(parquet_files())
    for name, info in WHOLE.items():
        files[name] = {"format": fmt_of(name), "action": "quarantine_file", **info}
    files.update(decoys())
    fl = file_level()
    for old in HERE.rglob("*"):
        if old.is_file() and old.name not in ("make_corpus.py",) and old.suffix != ".py":
            old.unlink()
    for name, data in PAYLOAD.items():
        path = HERE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = {
        "day": DAY,
        "description": "Hostile clickstream corpus: see make_corpus.py. 'good' lists every line that must "
        "become an event (expected UTC timestamp and trimmed values); 'bad' every line that must be in "
        "clickstream.quarantine (file, line, non-empty reason); action quarantine_file = the whole file "
        "is quarantined and contributes no events; ignore = not a source file; file_level/ files each "
        "fail the run naming the file.",
        "judgement": JUDGEMENT,
        "files": dict(sorted(files.items())),
        "file_level": fl,
    }
    (HERE / "MANIFEST.json").write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    n_good = sum(len(v.get("good", [])) for v in files.values())
    n_bad = sum(len(v.get("bad", [])) for v in files.values())
    print(f"{len(PAYLOAD)} files, {n_good} good, {n_bad} bad, {len(WHOLE)} unreadable, {total} bytes")


if __name__ == "__main__":
    main()
