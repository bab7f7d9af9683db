"""Detections against labels: both label formats, point and event metrics, and the reference labels."""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from anomaly_dagster.evaluation import Evaluation, evaluate, load_labels, segments

STEP = pd.Timedelta(minutes=10)
T0 = pd.Timestamp("2020-07-07")


def flags(n: int, on: list[int] | range) -> pd.Series:
    index = pd.date_range(T0, periods=n, freq=STEP)
    series = pd.Series(False, index=index)
    series.iloc[list(on)] = True
    return series


# --- loading labels ------------------------------------------------------------------------------------


def test_zero_one_line_is_aligned_from_the_first_day(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("0,1,1,0,0,1\n")
    labels = load_labels(path, bucket_minutes=10, first_day=date(2020, 7, 8))
    assert labels.name == "label"
    assert labels.dtype == bool
    assert list(labels.index) == list(pd.date_range("2020-07-08", periods=6, freq="10min"))
    assert labels.tolist() == [False, True, True, False, False, True]


def test_zero_one_line_uses_bucket_minutes(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("1,0,1")
    labels = load_labels(path, bucket_minutes=30, first_day=date(2020, 7, 7))
    assert list(labels[labels].index) == [pd.Timestamp("2020-07-07 00:00"), pd.Timestamp("2020-07-07 01:00")]


def test_zero_one_line_needs_first_day(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("0,1\n")
    with pytest.raises(ValueError, match="needs the day its first bucket belongs to"):
        load_labels(path, bucket_minutes=10)


def test_ranges_csv_expands_to_inclusive_buckets(tmp_path: Path) -> None:
    path = tmp_path / "incidents.csv"
    path.write_text(
        "start,end,kind\n"
        "2020-07-07 10:10:00,2020-07-07 10:40:00,program_error\n"
        "2020-07-08 17:20:00,2020-07-08 17:20:00,outage\n"
        "2020-07-07 10:30:00,2020-07-07 10:50:00,outage\n"  # overlaps the first range
    )
    labels = load_labels(path, bucket_minutes=10)
    expected = [
        *pd.date_range("2020-07-07 10:10", "2020-07-07 10:50", freq="10min"),
        pd.Timestamp("2020-07-08 17:20"),
    ]
    assert list(labels.index) == expected
    assert labels.all()
    assert labels.name == "label"


def test_range_bounds_inside_a_bucket_or_with_a_zone_label_the_bucket_holding_them(tmp_path: Path) -> None:
    path = tmp_path / "incidents.csv"
    path.write_text(
        "start,end,kind\n"
        "2020-07-07 10:05:00,2020-07-07 10:25:30,program_error\n"  # inside buckets 10:00 and 10:20
        "2020-07-07T14:00:00+02:00,2020-07-07T12:10:00Z,outage\n"  # 12:00 and 12:10 UTC
    )
    labels = load_labels(path, bucket_minutes=10)
    expected = [
        *pd.date_range("2020-07-07 10:00", periods=3, freq="10min"),
        *pd.date_range("2020-07-07 12:00", periods=2, freq="10min"),
    ]
    assert list(labels.index) == expected


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (
            "2020-07-07 11:00:00,2020-07-07 10:00:00,x",
            r"line 3: the range ends \(2020-07-07 10:00:00\) before it starts",
        ),
        ("2020-07-07 10:00:00,soon,x", "line 3: 'soon' is not a time"),
    ],
)
def test_a_range_that_labels_nothing_is_an_error_naming_its_line(
    tmp_path: Path, row: str, problem: str
) -> None:
    path = tmp_path / "incidents.csv"
    path.write_text(f"start,end,kind\n2020-07-07 09:00:00,2020-07-07 09:00:00,x\n{row}\n")
    with pytest.raises(ValueError, match=problem):
        load_labels(path, bucket_minutes=10)


@pytest.mark.parametrize(
    "text",
    [
        "0\n1\n1\n0\n",  # one flag per line, not one line of flags
        "2020-07-07 09:00:00,2020-07-07 09:20:00\n",  # a range file without its header line
    ],
)
def test_a_labels_file_in_neither_format_is_an_error_saying_what_is_expected(
    tmp_path: Path, text: str
) -> None:
    """These crashed (no ``start`` attribute) or, for a headerless range file, labelled nothing at all."""
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match="needs a header line with 'start,end"):
        load_labels(path, bucket_minutes=10, first_day=date(2020, 7, 7))


def test_ranges_csv_without_kind_column(tmp_path: Path) -> None:
    path = tmp_path / "incidents.csv"
    path.write_text("start,end\n2020-07-09 00:00:00,2020-07-09 00:20:00\n")
    labels = load_labels(path, bucket_minutes=10, first_day=date(2020, 7, 7))  # first_day unused here
    assert list(labels.index) == list(pd.date_range("2020-07-09", periods=3, freq="10min"))


def test_reference_labels(reference_dir: Path) -> None:
    labels = load_labels(reference_dir / "fault_label_10T.csv", bucket_minutes=10, first_day=date(2020, 7, 7))
    assert len(labels) == 1296
    assert labels.index[0] == pd.Timestamp("2020-07-07 00:00")
    assert labels.index[-1] == pd.Timestamp("2020-07-15 23:50")
    assert int(labels.sum()) == 27
    runs = segments(labels, STEP)
    assert len(runs) == 8
    assert sum(int((end - start) / STEP) + 1 for start, end in runs) == 27
    # two segments the data's README names
    assert (pd.Timestamp("2020-07-15 10:10"), pd.Timestamp("2020-07-15 11:20")) in runs
    assert (pd.Timestamp("2020-07-15 17:20"), pd.Timestamp("2020-07-15 17:30")) in runs


# --- segments ------------------------------------------------------------------------------------------


def test_segments_are_runs_of_consecutive_buckets() -> None:
    series = flags(20, [1, 2, 3, 7, 9, 10, 19])
    assert segments(series, STEP) == [
        (T0 + 1 * STEP, T0 + 3 * STEP),
        (T0 + 7 * STEP, T0 + 7 * STEP),
        (T0 + 9 * STEP, T0 + 10 * STEP),
        (T0 + 19 * STEP, T0 + 19 * STEP),
    ]
    assert segments(flags(20, []), STEP) == []


def test_segments_of_sparse_index_break_on_missing_buckets() -> None:
    index = pd.DatetimeIndex([T0, T0 + STEP, T0 + 3 * STEP])  # bucket 2 absent: not consecutive
    assert segments(pd.Series(True, index=index), STEP) == [(T0, T0 + STEP), (T0 + 3 * STEP, T0 + 3 * STEP)]


# --- evaluate ------------------------------------------------------------------------------------------


def test_evaluate_constructed_case() -> None:
    n = 288  # two days
    truth = flags(n, [*range(10, 15), 100, 101, 200, 201, 202])  # 3 labelled incidents, 10 buckets
    predicted = flags(n, [*range(12, 16), 98, 99, 100, 50, 51, 250])
    # true positives: 12, 13, 14, 100 -> 4 of 10 predicted, 4 of 10 labelled
    # incidents: [10-14] caught at 12 (20 min), [100-101] caught at 100 (0 min), [200-202] missed
    # false incidents: [50-51] and [250]; [12-15] and [98-100] overlap a label so they are not false
    # events: 2 of 4 predicted incidents are true, 2 of 3 labelled ones are caught
    # labels as load_labels gives them for ranges: only the labelled buckets
    result = evaluate(predicted, truth[truth], bucket_minutes=10)
    assert result == Evaluation(
        precision=0.4,
        recall=0.4,
        f1=0.4,
        event_precision=0.5,
        event_recall=0.6667,
        event_f1=0.5714,
        labelled_incidents=3,
        incidents_caught=2,
        false_incidents=2,
        false_incidents_per_day=1.0,
        mean_time_to_detect_minutes=10.0,
    )


def test_event_metrics_count_incidents_not_buckets() -> None:
    """A two-hour fault caught in its last bucket is one event caught (point recall 1/12), and a burst
    of four flags on it is one true event, not four."""
    truth = flags(144, range(60, 72))
    predicted = flags(144, [71, 72, 73, 74, 120])  # 71 on the fault, 72-74 run on past it, 120 false
    result = evaluate(predicted, truth, bucket_minutes=10)
    assert (result.precision, result.recall) == (0.2, 0.0833)
    assert (result.event_precision, result.event_recall, result.event_f1) == (0.5, 1.0, 0.6667)
    assert result.mean_time_to_detect_minutes == 110.0


def test_evaluate_rounds_f1() -> None:
    truth = flags(144, range(10, 20))
    predicted = flags(144, [*range(15, 20), 30, 31])  # precision 5/7, recall 1/2
    result = evaluate(predicted, truth, bucket_minutes=10)
    assert (result.precision, result.recall, result.f1) == (0.7143, 0.5, 0.5882)
    assert result.to_dict()["mean_time_to_detect_minutes"] == 50.0


def test_evaluate_ignores_labels_outside_the_predictions() -> None:
    labels = flags(288, [5, 6, 200])  # 200 is on day two
    predicted = flags(144, [5])  # one day of predictions
    result = evaluate(predicted, labels, bucket_minutes=10)
    assert result.labelled_incidents == 1
    assert result.recall == 0.5
    assert result.precision == 1.0
    assert result.mean_time_to_detect_minutes == 0.0
    assert result.false_incidents_per_day == 0.0


def test_evaluate_without_detections() -> None:
    result = evaluate(flags(144, []), flags(144, [3, 4]), bucket_minutes=10)
    assert (result.precision, result.recall, result.f1) == (0.0, 0.0, 0.0)
    assert (result.event_precision, result.event_recall, result.event_f1) == (0.0, 0.0, 0.0)
    assert result.incidents_caught == 0
    assert result.labelled_incidents == 1
    assert math.isnan(result.mean_time_to_detect_minutes)


def test_evaluate_without_labels_counts_false_incidents_per_day() -> None:
    predicted = flags(432, [1, 2, 50, 300, 301, 302])  # three days, three false incidents
    result = evaluate(predicted, pd.Series(dtype=bool), bucket_minutes=10)
    assert result.recall == 0.0
    assert result.precision == 0.0
    assert result.false_incidents == 3
    assert result.false_incidents_per_day == 1.0
    assert (result.event_precision, result.event_recall) == (0.0, 0.0)


def test_evaluate_perfect_detection() -> None:
    truth = flags(144, [20, 21, 22, 90])
    result = evaluate(truth.copy(), truth, bucket_minutes=10)
    assert (result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0)
    assert (result.event_precision, result.event_recall, result.event_f1) == (1.0, 1.0, 1.0)
    assert result.incidents_caught == result.labelled_incidents == 2
    assert result.false_incidents == 0
    assert result.mean_time_to_detect_minutes == 0.0


def test_time_to_detect_uses_bucket_minutes() -> None:
    index = pd.date_range(T0, periods=48, freq="30min")
    truth = pd.Series(False, index=index)
    truth.iloc[10:14] = True
    predicted = pd.Series(False, index=index)
    predicted.iloc[13] = True
    result = evaluate(predicted, truth, bucket_minutes=30)
    assert result.mean_time_to_detect_minutes == 90.0
    assert result.false_incidents_per_day == 0.0
    assert result.recall == 0.25


def test_a_zero_one_line_says_nothing_about_buckets_after_its_end(tmp_path: Path) -> None:
    """A 0/1 line of one day against two scored days: the second day's flags were counted as false
    positives and a false incident, though no label covers that day."""
    from anomaly_dagster.evaluation import evaluation_table

    path = tmp_path / "labels.csv"
    path.write_text(",".join(["0"] * 10 + ["1"] * 3 + ["0"] * 131))
    labels = load_labels(path, bucket_minutes=10, first_day=date(2020, 7, 7))
    predicted = flags(288, [10, 11, 12, 200, 201, 202])
    result = evaluate(predicted, labels, bucket_minutes=10)
    assert (result.precision, result.recall, result.false_incidents, result.false_incidents_per_day) == (
        1.0,
        1.0,
        0,
        0.0,
    )
    scores = pd.DataFrame(
        {"bucket_start": predicted.index, "detector": "ensemble", "is_anomaly": predicted.to_numpy()}
    )
    row = evaluation_table(scores, labels, bucket_minutes=10).iloc[0]
    assert (row.precision, row.buckets, row.last_bucket) == (1.0, 144, pd.Timestamp("2020-07-07 23:50"))


def test_false_incidents_are_counted_like_the_incidents_table_with_a_gap() -> None:
    """incident_gap_buckets 2: flags at 50, 52, 54, 56 are one incident for on-call (merge_incidents),
    but the evaluation counted four false incidents per day."""
    predicted = flags(144, [50, 52, 54, 56, 100, 103, 107])  # 103-107: 3 unflagged
    result = evaluate(predicted, flags(144, [80, 81]), bucket_minutes=10, gap=2)
    assert (result.false_incidents, result.false_incidents_per_day) == (3, 3.0)
    assert evaluate(predicted, flags(144, [80, 81]), bucket_minutes=10).false_incidents == 7  # no gap
