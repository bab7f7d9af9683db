"""Realistic sample raw logs with labelled injected faults, so the demo runs without reference data.

Two sources: the web clickstream (below) and the sensor log (``generate_sensors``, further down).

Calibrated on a public nine-day simulated clickstream (10-minute buckets): about 105 events and 77 distinct
users per bucket at night, about 3.8 times that in the early afternoon (UTC), events/users near 1.4 at night
and 1.5 by day, about 16 of 20 pages seen per night bucket, noise a little above Poisson. Users browse in
sessions of a few clicks minutes apart, so a session often spans two buckets, as in the reference.

Faults are the two kinds the detectors must find: "program errors", where the logged user id is corrupted
(many events get the same default id, or every event a fresh id) so distinct users drop or jump while events
stay normal, and "outages", where events and users drop to a small fraction or to nothing.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from anomaly_dagster.storage import atomic_write_bytes

BUCKET_SECONDS = 600
DAY_SECONDS = 86_400
BUCKETS_PER_DAY = DAY_SECONDS // BUCKET_SECONDS
BUCKETS_PER_HOUR = 3600 // BUCKET_SECONDS

N_USERS = 5_000
N_PAGES = 20
PAGE_ZIPF_EXPONENT = 1.4  # home page ~42% of views, ~16 distinct pages per night bucket, ~20 by day
USER_ACTIVITY_SIGMA = 0.5  # log-normal spread of how often a user comes back

NIGHT_EVENTS_PER_BUCKET = 105.0
PEAK_HOUR = 13.6  # UTC
PEAK_GAIN = 2.95  # the afternoon peak is ~3.9x the night level
PEAK_SPREAD_HOURS = (2.4, 3.2)  # steeper morning rise than evening decline
WEEKDAY_FACTOR = (1.0, 1.01, 1.02, 1.02, 1.0, 0.97, 0.95)  # Monday..Sunday: slightly quieter weekends
DAY_NOISE_SIGMA = 0.015
BUCKET_NOISE_SIGMA = 0.03  # AR(1) log-noise on the session rate: noise a little above Poisson
BUCKET_NOISE_PHI = 0.7

EXTRA_CLICKS_NIGHT = 1.25  # clicks per session = 1 + Poisson(extra); daytime sessions are a bit longer
EXTRA_CLICKS_PEAK = 2.05
CLICK_GAP_SECONDS = 420.0  # mean pause between clicks of a session (exponential)
WARMUP_BUCKETS = 6  # sessions started the hour before the first day, so day one starts in steady state

SPILL_SECONDS = 90  # events this close to midnight may be flushed into the next day's file
SPILL_PROBABILITY = 0.5
JSONL_EVERY = 3  # every third day is written by the JSON-lines producer

SEGMENTS_PER_DAY = 0.9  # ~8 labelled segments over 9 days, as in the reference
FAULT_HOURS = (6, 21)  # faults start between these hours (deploys and load happen by day)
FAULT_MIN_SEPARATION = 12  # buckets between segments, so each has a clean neighbourhood
PROGRAM_ERROR_BUCKETS = (2, 8)
OUTAGE_BUCKETS = (1, 4)  # 10-40 minutes
DEFAULT_ID_PROBABILITY = (
    0.7  # program errors that log a default id (users drop); the rest mint fresh ids (jump)
)
DEFAULT_ID_SHARE = (0.6, 0.85)  # share of events given the default id: some servers still log correctly
TOTAL_OUTAGE_PROBABILITY = 1 / 3  # outages that lose every event; the rest keep a trickle
PARTIAL_OUTAGE_LOST = (0.85, 0.98)
DEFAULT_USER_CODE = 0  # the id a buggy logger falls back to: u0000000000
FRESH_USER_BASE = 9_000_000_000  # ids a buggy logger mints per event, never seen before

Kind = Literal["program_error", "outage", "spike", "drift", "stuck", "dropout"]
Effect = Literal["default_id", "fresh_ids", "lost"]


@dataclass(frozen=True)
class InjectedIncident:
    """One labelled fault: inclusive first and last 10-minute bucket starts (naive UTC), and the
    entity it hit (a sensor), if the log has entities."""

    kind: Kind
    start: datetime
    end: datetime
    entity: str | None = None


@dataclass(frozen=True)
class GeneratedLogs:
    """What a generation wrote, and the faults it injected (the ground truth for evaluating detectors)."""

    files: list[Path]
    labels: Path
    incidents: list[InjectedIncident]


@dataclass(frozen=True)
class _Fault:
    kind: Kind
    effect: Effect
    share: float  # share of the segment's events affected
    first: int  # bucket index from the start of the first day
    last: int  # inclusive


def generate_clickstream(
    out_dir: Path,
    days: int,
    start: date = date(2020, 7, 7),
    seed: int = 7,
    labels_path: Path | None = None,
) -> GeneratedLogs:
    """Write one raw log file per day into ``out_dir`` and the fault labels beside it; deterministic per seed.

    Labels default to ``out_dir.parent / "labels"`` so they stay out of the landing glob (``clicks*``).
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    rng = np.random.default_rng(seed)
    faults = _plan_faults(rng, days)
    seconds, user, page = _events(rng, start, days)
    keep, logged_user = _inject(rng, faults, seconds, user)
    seconds, logged_user, user, page = seconds[keep], logged_user[keep], user[keep], page[keep]
    file_day = _file_day(rng, seconds, days)

    out_dir = Path(out_dir)
    origin = datetime.combine(start, datetime.min.time())
    files = []
    for day in range(days):
        rows = np.flatnonzero(file_day == day)
        rows = rows[rng.permutation(len(rows))]  # producers do not write in time order
        frame = _frame(start, seconds[rows], page[rows], logged_user[rows], user[rows])
        jsonl = day % JSONL_EVERY == JSONL_EVERY - 1
        files.append(_write_day(out_dir, start + timedelta(days=day), frame, jsonl))

    incidents = [
        InjectedIncident(
            kind=fault.kind,
            start=origin + timedelta(seconds=fault.first * BUCKET_SECONDS),
            end=origin + timedelta(seconds=fault.last * BUCKET_SECONDS),
        )
        for fault in faults
    ]
    labels = (
        Path(labels_path) if labels_path is not None else out_dir.parent / "labels" / "clickstream_labels.csv"
    )
    atomic_write_bytes(labels, _labels_csv(incidents))
    return GeneratedLogs(files=files, labels=labels, incidents=incidents)


def _daily_shape(hour: np.ndarray) -> np.ndarray:
    """0 at night, 1 at the afternoon peak; asymmetric so mornings ramp up faster than evenings wind down."""
    spread = np.where(hour < PEAK_HOUR, PEAK_SPREAD_HOURS[0], PEAK_SPREAD_HOURS[1])
    return np.exp(-0.5 * ((hour - PEAK_HOUR) / spread) ** 2)


def _events(rng: np.random.Generator, start: date, days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sessions started per bucket from a seasonal rate, expanded to clicks: (seconds, user code, page)."""
    buckets = np.arange(-WARMUP_BUCKETS, days * BUCKETS_PER_DAY)
    day = buckets // BUCKETS_PER_DAY  # -1 for the warm-up hour
    hour = (buckets % BUCKETS_PER_DAY + 0.5) * BUCKET_SECONDS / 3600
    shape = _daily_shape(hour)
    weekday = np.asarray(WEEKDAY_FACTOR)[(start.weekday() + day) % 7]
    day_noise = np.exp(rng.normal(0.0, DAY_NOISE_SIGMA, days + 1))[day + 1]
    innovations = rng.normal(0.0, BUCKET_NOISE_SIGMA * math.sqrt(1 - BUCKET_NOISE_PHI**2), len(buckets))
    bucket_noise = np.exp(lfilter([1.0], [1.0, -BUCKET_NOISE_PHI], innovations))
    events_rate = NIGHT_EVENTS_PER_BUCKET * (1 + PEAK_GAIN * shape) * weekday * day_noise * bucket_noise
    extra_clicks = EXTRA_CLICKS_NIGHT + (EXTRA_CLICKS_PEAK - EXTRA_CLICKS_NIGHT) * shape

    sessions_per_bucket = rng.poisson(events_rate / (1 + extra_clicks))
    n_sessions = int(sessions_per_bucket.sum())
    session_start = np.repeat(buckets, sessions_per_bucket) * BUCKET_SECONDS + rng.integers(
        0, BUCKET_SECONDS, n_sessions
    )
    activity = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, N_USERS)
    session_user = rng.choice(N_USERS, n_sessions, p=activity / activity.sum()) + 1
    clicks = 1 + rng.poisson(np.repeat(extra_clicks, sessions_per_bucket))

    first_click = np.cumsum(clicks) - clicks
    gaps = rng.exponential(CLICK_GAP_SECONDS, int(clicks.sum()))
    gaps[first_click] = 0.0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first_click], clicks)
    seconds = np.repeat(session_start, clicks) + elapsed.astype(np.int64)
    popularity = np.arange(1, N_PAGES + 1, dtype=float) ** -PAGE_ZIPF_EXPONENT
    page = rng.choice(N_PAGES, len(seconds), p=popularity / popularity.sum())

    inside = (seconds >= 0) & (seconds < days * DAY_SECONDS)
    return seconds[inside], np.repeat(session_user, clicks)[inside], page[inside]


def _plan_faults(rng: np.random.Generator, days: int) -> list[_Fault]:
    """Non-overlapping daytime segments after day one (the pipeline cold-starts there), half of each kind."""
    count = round(SEGMENTS_PER_DAY * (days - 1))
    faults: list[_Fault] = []
    for order in rng.permutation(count):
        if order % 2 == 0:
            kind: Kind = "program_error"
            length = int(rng.integers(PROGRAM_ERROR_BUCKETS[0], PROGRAM_ERROR_BUCKETS[1] + 1))
            if rng.random() < DEFAULT_ID_PROBABILITY:
                effect: Effect = "default_id"
                share = float(rng.uniform(*DEFAULT_ID_SHARE))
            else:
                effect, share = "fresh_ids", 1.0
        else:
            kind, effect = "outage", "lost"
            length = int(rng.integers(OUTAGE_BUCKETS[0], OUTAGE_BUCKETS[1] + 1))
            share = (
                1.0 if rng.random() < TOTAL_OUTAGE_PROBABILITY else float(rng.uniform(*PARTIAL_OUTAGE_LOST))
            )
        for _ in range(1000):
            day = int(rng.integers(1, days))
            first = day * BUCKETS_PER_DAY + int(
                rng.integers(
                    FAULT_HOURS[0] * BUCKETS_PER_HOUR, FAULT_HOURS[1] * BUCKETS_PER_HOUR - length + 1
                )
            )
            last = first + length - 1
            if all(
                first > f.last + FAULT_MIN_SEPARATION or last < f.first - FAULT_MIN_SEPARATION for f in faults
            ):
                faults.append(_Fault(kind, effect, share, first, last))
                break
        else:
            raise RuntimeError(f"could not place {count} fault segments in {days} days")
    return sorted(faults, key=lambda f: f.first)


def _inject(
    rng: np.random.Generator, faults: list[_Fault], seconds: np.ndarray, user: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the faults: which events survive, and the user id each one is logged with."""
    bucket = seconds // BUCKET_SECONDS
    keep = np.ones(len(seconds), dtype=bool)
    logged = user.copy()
    next_fresh = FRESH_USER_BASE
    for fault in faults:
        inside = np.flatnonzero((bucket >= fault.first) & (bucket <= fault.last))
        hit = inside[rng.random(len(inside)) < fault.share]
        if fault.effect == "lost":
            keep[hit] = False
        elif fault.effect == "default_id":
            logged[hit] = DEFAULT_USER_CODE
        else:
            logged[hit] = next_fresh + np.arange(len(hit))
            next_fresh += len(hit)
    return keep, logged


def _file_day(rng: np.random.Generator, seconds: np.ndarray, days: int) -> np.ndarray:
    """The day file each event lands in: its own day, except some of the last seconds flushed after rotation."""
    day = seconds // DAY_SECONDS
    late = (seconds % DAY_SECONDS >= DAY_SECONDS - SPILL_SECONDS) & (day < days - 1)
    return day + (late & (rng.random(len(seconds)) < SPILL_PROBABILITY))


def _frame(
    start: date, seconds: np.ndarray, page: np.ndarray, logged_user: np.ndarray, user: np.ndarray
) -> pd.DataFrame:
    """Unpadded string columns; the session id keeps the real user, as the buggy user-id logger does not."""
    day, second = np.divmod(seconds, DAY_SECONDS)
    dates = np.array(
        [f"{start + timedelta(days=int(d))} " for d in range(int(day.max(initial=0)) + 1)], dtype=object
    )
    stamps = dates[day] + _clock()[second]
    pages = np.array([f"p{p:02d}" for p in range(N_PAGES)], dtype=object)[page]
    real = _user_ids(user)
    return pd.DataFrame(
        {
            "timestamp": stamps,
            "page": pages,
            "user": _user_ids(logged_user),
            "session_id": stamps + " ; " + pages + " ; " + real,
        }
    )


@cache
def _clock() -> np.ndarray:
    """``HH:MM:SS`` for every second of a day: a lookup is much faster than formatting each timestamp."""
    return np.array(
        [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(DAY_SECONDS)], dtype=object
    )


def _user_ids(codes: np.ndarray) -> np.ndarray:
    """``u`` and ten digits; population ids come from a lookup, only the rare fresh ids are formatted."""
    ids = np.array([f"u{code:010d}" for code in range(N_USERS + 1)], dtype=object)[np.minimum(codes, N_USERS)]
    fresh = np.flatnonzero(codes > N_USERS)
    ids[fresh] = [f"u{code:010d}" for code in codes[fresh].tolist()]
    return ids


def _write_day(out_dir: Path, day: date, frame: pd.DataFrame, jsonl: bool) -> Path:
    """One day's file, atomically; CSV values are space-padded like the reference export, JSON lines are not."""
    stem = f"clicks_{day.isoformat()}"
    if jsonl:
        path, other = out_dir / f"{stem}.jsonl", out_dir / f"{stem}.csv.gz"
        data = frame.to_json(orient="records", lines=True).encode()
    else:
        path, other = out_dir / f"{stem}.csv.gz", out_dir / f"{stem}.jsonl"
        # no value can hold a comma, quote or newline, so plain joining is valid CSV (and faster than to_csv)
        rows = frame["timestamp"] + ", " + frame["page"] + " , " + frame["user"] + "," + frame["session_id"]
        text = "\n".join(["timestamp,page,user,session_id", *rows]) + "\n"
        data = gzip.compress(text.encode(), compresslevel=1, mtime=0)
    atomic_write_bytes(path, data)
    other.unlink(missing_ok=True)  # a regeneration must not leave the same day in both formats
    return path


def _labels_csv(incidents: list[InjectedIncident], entity_column: str | None = None) -> bytes:
    """``start,end,kind`` ranges; with ``entity_column`` a fourth column names the entity hit
    (label readers that know only the first three still read the file)."""
    header = "start,end,kind" + (f",{entity_column}" if entity_column else "")
    lines = [header] + [
        f"{incident.start:%Y-%m-%d %H:%M:%S},{incident.end:%Y-%m-%d %H:%M:%S},{incident.kind}"
        + (f",{incident.entity}" if entity_column else "")
        for incident in incidents
    ]
    return ("\n".join(lines) + "\n").encode()


# --- sensors ---------------------------------------------------------------------------------------

SENSOR_START = date(2024, 3, 1)
SENSOR_INTERVAL_SECONDS = 30.0  # one reading per sensor every 30 s: ~20 per bucket
SENSOR_JITTER_SECONDS = 1.0  # clock jitter, so a bucket now and then holds 19 or 21 readings
SENSOR_LOSS = 0.01  # readings lost on the way
TEMPERATURE_LEVEL = (25.0, 3.0)  # °C: fleet mean, and the spread of sensor levels around it
TEMPERATURE_DAILY = 1.5  # amplitude of the daily cycle, warmest at 15:00 UTC
TEMPERATURE_WANDER = (0.15, 0.9)  # AR(1) per bucket: sd and phi
TEMPERATURE_NOISE = 0.05
PRESSURE_LEVEL = (1012.0, 3.0)  # hPa: fleet mean and the spread by altitude
PRESSURE_TIDE = 0.6  # semi-diurnal atmospheric tide
PRESSURE_WEATHER = (0.3, 0.98)  # AR(1) per bucket shared by the fleet (same weather): sd and phi
PRESSURE_NOISE = 0.1
SPIKE_READING = (100.0, 950.0)  # one corrupt reading: temperature and pressure
SENSOR_FAULTS_PER_DAY: dict[Kind, float] = {
    "spike": 1.5,
    "dropout": 0.5,
    "stuck": 0.35,
    "drift": 0.35,
}  # over the fleet
DROPOUT_BUCKETS = (3, 12)  # 30 minutes to 2 hours of silence
STUCK_BUCKETS = (6, 18)  # the sensor repeats its last reading for 1-3 hours
DRIFT_BUCKETS = (18, 36)  # 3-6 hours of drift, then recalibrated
DRIFT_DEGREES = (2.5, 4.0)  # reached at the end of the drift
SENSOR_FAULT_SEPARATION = 6  # clean buckets between faults of one sensor


@dataclass(frozen=True)
class _SensorFault:
    kind: Kind
    sensor: int
    first: int  # bucket index from the start of the first day
    last: int  # inclusive


def generate_sensors(
    out_dir: Path,
    days: int,
    start: date = SENSOR_START,
    seed: int = 7,
    labels_path: Path | None = None,
    sensors: int = 3,
) -> GeneratedLogs:
    """Write one ``sensors_<day>.csv.gz`` per day (``timestamp, sensor_id, temperature, pressure``) and
    the fault labels beside the landing folder; deterministic per seed.

    Each sensor has its own level (°C around 25, hPa around 1012), a daily cycle, slow wander and
    reading noise. Faults after the first day: a spike (one reading of 100.0 °C and 950.0 hPa),
    a dropout (no readings for 30 minutes to 2 hours), a stuck sensor (the last reading repeated for
    hours) and a slow drift (up to +4 °C over hours). With ``sensors=1`` the files have no
    ``sensor_id`` column: one series, as a single device logs it.
    """
    if days < 1 or sensors < 1:
        raise ValueError(f"days and sensors must be at least 1, got {days} and {sensors}")
    rng = np.random.default_rng(seed)
    names = [f"s{index + 1:02d}" for index in range(sensors)]
    faults = _plan_sensor_faults(rng, days, sensors)
    weather = _ar1(rng, days * BUCKETS_PER_DAY, *PRESSURE_WEATHER)  # the fleet shares the weather
    readings = pd.concat(
        [_sensor_readings(rng, days, index, faults, weather) for index in range(sensors)], ignore_index=True
    )
    readings = readings.sort_values("seconds", kind="stable", ignore_index=True)  # arrival order

    out_dir = Path(out_dir)
    origin = datetime.combine(start, datetime.min.time())
    stamps = pd.Timestamp(origin) + pd.to_timedelta(readings["seconds"].to_numpy(), unit="s")
    day_index = readings["seconds"].to_numpy() // DAY_SECONDS
    columns = ["timestamp", *(["sensor_id"] if sensors > 1 else []), "temperature", "pressure"]
    table = pd.DataFrame(
        {
            "timestamp": stamps.strftime("%Y-%m-%d %H:%M:%S"),
            "sensor_id": np.asarray(names, dtype=object)[readings["sensor"].to_numpy()],
            "temperature": readings["temperature"].map("{:.2f}".format),
            "pressure": readings["pressure"].map("{:.2f}".format),
        }
    )[columns]
    files = []
    for day in range(days):
        path = out_dir / f"sensors_{start + timedelta(days=day)}.csv.gz"
        text = table[day_index == day].to_csv(index=False, lineterminator="\n")
        atomic_write_bytes(path, gzip.compress(text.encode(), compresslevel=1, mtime=0))
        files.append(path)

    incidents = [
        InjectedIncident(
            kind=fault.kind,
            start=origin + timedelta(seconds=fault.first * BUCKET_SECONDS),
            end=origin + timedelta(seconds=fault.last * BUCKET_SECONDS),
            entity=names[fault.sensor] if sensors > 1 else None,
        )
        for fault in faults
    ]
    labels = (
        Path(labels_path) if labels_path is not None else out_dir.parent / "labels" / "sensors_labels.csv"
    )
    atomic_write_bytes(labels, _labels_csv(incidents, "sensor_id" if sensors > 1 else None))
    return GeneratedLogs(files=files, labels=labels, incidents=incidents)


def _plan_sensor_faults(rng: np.random.Generator, days: int, sensors: int) -> list[_SensorFault]:
    """Non-overlapping faults per sensor after day one (the pipeline cold-starts there); at least
    one spike whenever there is a day to put it in."""
    lengths = {"spike": (1, 1), "dropout": DROPOUT_BUCKETS, "stuck": STUCK_BUCKETS, "drift": DRIFT_BUCKETS}
    faults: list[_SensorFault] = []
    if days < 2:
        return faults
    for kind, rate in SENSOR_FAULTS_PER_DAY.items():
        count = max(round(rate * (days - 1)), 1 if kind == "spike" else 0)
        for _ in range(count):
            length = int(rng.integers(lengths[kind][0], lengths[kind][1] + 1))
            for _ in range(1000):
                sensor = int(rng.integers(sensors))
                first = int(rng.integers(BUCKETS_PER_DAY, days * BUCKETS_PER_DAY - length + 1))
                last = first + length - 1
                if all(
                    f.sensor != sensor
                    or first > f.last + SENSOR_FAULT_SEPARATION
                    or last < f.first - SENSOR_FAULT_SEPARATION
                    for f in faults
                ):
                    faults.append(_SensorFault(kind, sensor, first, last))
                    break
            else:
                raise RuntimeError(f"could not place {count} {kind} faults in {days} days")
    return sorted(faults, key=lambda f: (f.first, f.sensor))


def _ar1(rng: np.random.Generator, size: int, sd: float, phi: float) -> np.ndarray:
    """A stationary AR(1) series with standard deviation ``sd``."""
    innovations = rng.normal(0.0, sd * math.sqrt(1 - phi**2), size)
    innovations[0] = rng.normal(0.0, sd)
    return lfilter([1.0], [1.0, -phi], innovations)


def _sensor_readings(
    rng: np.random.Generator, days: int, sensor: int, faults: list[_SensorFault], weather: np.ndarray
) -> pd.DataFrame:
    """One sensor's readings (seconds from the first midnight, temperature, pressure), faults applied."""
    count = int(days * DAY_SECONDS / SENSOR_INTERVAL_SECONDS)
    phase = rng.uniform(0, SENSOR_INTERVAL_SECONDS)
    seconds = np.arange(count) * SENSOR_INTERVAL_SECONDS + phase + rng.normal(0, SENSOR_JITTER_SECONDS, count)
    seconds = np.clip(seconds, 0, days * DAY_SECONDS - 1).astype(np.int64)
    buckets = days * BUCKETS_PER_DAY
    centres = (np.arange(buckets) + 0.5) * BUCKET_SECONDS
    hours = seconds / 3600.0
    level = rng.normal(*TEMPERATURE_LEVEL)
    wander = np.interp(seconds, centres, _ar1(rng, buckets, *TEMPERATURE_WANDER))
    temperature = (
        level
        + TEMPERATURE_DAILY * np.cos(2 * np.pi * (hours - 15.0) / 24.0)
        + wander
        + rng.normal(0, TEMPERATURE_NOISE, count)
    )
    pressure = (
        rng.normal(*PRESSURE_LEVEL)
        + PRESSURE_TIDE * np.cos(4 * np.pi * (hours - 10.0) / 24.0)
        + np.interp(seconds, centres, weather)
        + rng.normal(0, PRESSURE_NOISE, count)
    )
    keep = rng.random(count) >= SENSOR_LOSS
    bucket = seconds // BUCKET_SECONDS
    for fault in (f for f in faults if f.sensor == sensor):
        inside = (bucket >= fault.first) & (bucket <= fault.last)
        if fault.kind == "spike":
            hit = int(rng.choice(np.flatnonzero(inside & keep)))
            temperature[hit], pressure[hit] = SPIKE_READING
        elif fault.kind == "dropout":
            keep &= ~inside
        elif fault.kind == "stuck":
            before = int(np.flatnonzero(bucket < fault.first)[-1])
            temperature[inside], pressure[inside] = temperature[before], pressure[before]
        else:  # drift: a linear ramp, then the sensor is recalibrated
            ramp = (seconds[inside] - fault.first * BUCKET_SECONDS) / (
                (fault.last - fault.first + 1) * BUCKET_SECONDS
            )
            temperature[inside] += rng.uniform(*DRIFT_DEGREES) * ramp
    return pd.DataFrame(
        {
            "seconds": seconds[keep],
            "sensor": sensor,
            "temperature": temperature[keep],
            "pressure": pressure[keep],
        }
    )
