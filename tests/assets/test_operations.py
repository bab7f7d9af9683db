"""The daily schedule and the landing-folder sensor, evaluated against real files."""

from __future__ import annotations

import gzip
import os
import shutil
from datetime import date, datetime

import dagster as dg

from anomaly_dagster.config import load_sources
from anomaly_dagster.definitions import build_definitions
from anomaly_dagster.generate import generate_clickstream


def test_landing_sensor_runs_the_days_new_or_changed_files_touch_as_one_range(tmp_path):
    landing, warehouse = tmp_path / "landing", tmp_path / "warehouse"
    generated = generate_clickstream(landing, days=3, start=date(2020, 7, 7), seed=3)
    defs = build_definitions(load_sources(), str(landing), str(warehouse))
    sensor = defs.resolve_sensor_def("clickstream_landing")
    instance = dg.DagsterInstance.ephemeral()

    first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    # one run over the days in order (a file also holds late events of the day before it)
    (request,) = first.run_requests
    assert request.partition_key_range == dg.PartitionKeyRange("2020-07-07", "2020-07-09")
    assert request.run_key

    again = sensor.evaluate_tick(
        dg.build_sensor_context(cursor=first.cursor, instance=instance, definitions=defs)
    )
    assert again.run_requests == []

    changed = generated.files[0]  # the first day: nothing spilled into it from before
    shutil.copyfile(changed, changed.with_name("copy.tmp"))
    os.replace(changed.with_name("copy.tmp"), changed)  # rewritten as it was: new mtime, same rows
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = sensor.evaluate_tick(
        dg.build_sensor_context(cursor=again.cursor, instance=instance, definitions=defs)
    )
    assert touched.run_requests == []  # its rows per day are unchanged: nothing to re-run
    with gzip.open(changed, "rt") as handle:
        lines = handle.read().splitlines(keepends=True)
    with gzip.open(changed, "wt") as handle:  # a corrected file: one event of its day dropped
        handle.writelines(lines[:-1])
    third = sensor.evaluate_tick(
        dg.build_sensor_context(cursor=touched.cursor, instance=instance, definitions=defs)
    )
    # the changed day, then the days that read it (lags, models), as far as there is data
    (rerun,) = third.run_requests
    assert rerun.partition_key_range == dg.PartitionKeyRange("2020-07-07", "2020-07-09")
    assert rerun.run_key != request.run_key

    result = defs.resolve_job_def("clickstream_pipeline").execute_in_process(
        instance=instance, tags=rerun.tags
    )
    assert result.success
    days = {event.partition for event in result.get_asset_materialization_events()}
    assert days == {"2020-07-07", "2020-07-08", "2020-07-09"}


def test_landing_sensor_without_its_folder_skips_saying_which_folder(tmp_path):
    """It found no files and said nothing: a mistyped landing folder looked like a quiet source."""
    defs = build_definitions(load_sources(), str(tmp_path / "nowhere"), str(tmp_path / "warehouse"))
    sensor = defs.resolve_sensor_def("clickstream_landing")
    instance = dg.DagsterInstance.ephemeral()
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    assert tick.run_requests == []
    assert "nowhere does not exist" in tick.skip_message


def test_daily_schedule_targets_yesterday(tmp_path):
    defs = build_definitions(load_sources(), str(tmp_path), str(tmp_path / "warehouse"))
    schedule = defs.resolve_schedule_def("clickstream_daily")
    context = dg.build_schedule_context(
        scheduled_execution_time=datetime.fromisoformat("2024-03-05T00:30:00+00:00")
    )
    requests = schedule.evaluate_tick(context).run_requests
    assert [request.partition_key for request in requests] == ["2024-03-04"]
