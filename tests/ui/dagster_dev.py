"""Start ``make dev`` as a user would, talk to it over GraphQL, launch backfills and stop it with Ctrl-C.

Shared by the end-to-end tests in this folder. ``make dev`` runs in its own session (so SIGINT to its
process group is the Ctrl-C a person would press) with ``DAGSTER_HOME``, ``ANOMALY_LANDING_DIR`` and
``ANOMALY_WAREHOUSE_DIR`` pointing into the test's temporary folder; runs launched by the daemon inherit
them. Every wait is bounded and every failure carries the tail of the server's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
SOURCE = "clickstream"
ASSETS = ("raw_events", "quarantine", "resampled", "features", "model", "scores", "anomalies", "incidents")
TERMINAL_BACKFILL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
TERMINAL_RUN = {"SUCCESS", "FAILURE", "CANCELED"}
# DuckDB's "Could not set lock on file", SQLite's "database is locked", flock timeouts, ...
LOCK_ERROR = re.compile(r"\b(?:f|dead|file)?lock(?:ed|ing|s)?\b|LockError|LockTimeout", re.IGNORECASE)

LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on ConflictingExecutionParamsError { message }
    ... on InvalidSubsetError { message }
    ... on RunConflict { message }
  }
}
"""
BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      id status
      error { message stack }
      runs { runId status startTime endTime assetSelection { path } }
    }
    ... on PythonError { message stack }
    ... on BackfillNotFoundError { message }
  }
}
"""
TARGETED = """
query Targeted($id: String!, $key: AssetKeyInput) {
  partitionBackfillOrError(backfillId: $id) {
    ... on PartitionBackfill { partitionsTargetedForAssetKey(assetKey: $key) { ranges { start end } } }
  }
}
"""
BACKFILLS = """
{ partitionBackfillsOrError { __typename ... on PartitionBackfills { results { id } } } }
"""
RUN_EVENTS = """
query Events($runId: ID!, $cursor: String) {
  logsForRun(runId: $runId, afterCursor: $cursor) {
    __typename
    ... on EventConnection {
      cursor hasMore
      events {
        __typename
        ... on MessageEvent { message level stepKey }
        ... on ErrorEvent { error { message stack causes { message stack } } }
      }
    }
    ... on PythonError { message }
    ... on RunNotFoundError { message }
  }
}
"""
ALL_RUNS = "{ runsOrError { __typename ... on Runs { results { runId status tags { key value } } } } }"
LOCATION_STATUS = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message stack } } } } } }
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Addresses with a listening TCP socket on ``port`` (IPv4 and IPv6), read from /proc/net."""
    addresses = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            host, local_port = fields[1].split(":")
            if fields[3] == "0A" and int(local_port, 16) == port:
                raw = bytes.fromhex(host)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.add(socket.inet_ntop(family, raw))
    return addresses


def group_processes(pgid: int) -> list[str]:
    """``pid command`` of every live process in process group ``pgid`` (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may contain spaces, so split after the last ')'
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            try:
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
            except OSError:
                command = "?"
            found.append(f"{stat.parent.name} {command}")
    return found


def graphql(port: int, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
    """POST a query; returns ``data`` and raises on GraphQL errors."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = json.loads(response.read())
    if body.get("errors"):
        raise AssertionError(f"GraphQL errors: {json.dumps(body['errors'], indent=1)[:3000]}")
    return body["data"]


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored signal stays
    # ignored across exec (dagster dev then ignores SIGTERM too, mapping it to SIGINT's disposition).
    # Restore the default so that our SIGINT is the Ctrl-C a person presses, whoever started pytest.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class DagsterDev:
    """A running ``make dev``: its process (the leader of its own process group), port and log."""

    process: subprocess.Popen
    port: int
    log: Path
    home: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        return graphql(self.port, query, variables, timeout)

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]

    def processes(self) -> list[str]:
        return group_processes(self.process.pid)


def start(tmp: Path, landing: Path, warehouse: Path, port: int | None = None) -> DagsterDev:
    """``make dev PORT=<port>`` from the repository, with instance, landing and warehouse under ``tmp``.

    ``make`` copies ``deploy/dagster.yaml`` into the fresh ``DAGSTER_HOME`` itself (its ``setup``
    prerequisite), so the instance is configured by the project's own files.
    """
    port = port or free_port()
    home = tmp / "dagster_home"
    log = tmp / "make_dev.log"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}  # as typed, not nested
    }
    env.update(
        DAGSTER_HOME=str(home),
        ANOMALY_LANDING_DIR=str(landing),
        ANOMALY_WAREHOUSE_DIR=str(warehouse),
        PYTHONUNBUFFERED="1",
    )
    with open(log, "w") as output:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "dev", f"PORT={port}"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
    return DagsterDev(process, port, log, home)


def wait_until_loaded(dev: DagsterDev, timeout: float = 180) -> dict:
    """Wait until GraphQL answers and the code location is LOADED without error; returns its entry."""
    deadline = time.monotonic() + timeout
    entry = None
    while time.monotonic() < deadline:
        if dev.process.poll() is not None:
            raise AssertionError(
                f"make dev exited with {dev.process.returncode} before serving:\n{dev.log_tail()}"
            )
        try:
            data = dev.graphql(LOCATION_STATUS, timeout=10)["workspaceOrError"]
            entries = data.get("locationEntries") or []
            entry = entries[0] if entries else None
            if entry and entry["loadStatus"] == "LOADED":
                kind = entry["locationOrLoadError"]["__typename"]
                assert kind == "RepositoryLocation", f"code location failed to load: {entry}"
                return entry
        except (OSError, urllib.error.URLError, json.JSONDecodeError):
            pass  # not listening yet
        time.sleep(1)
    raise AssertionError(f"location not LOADED within {timeout}s (last: {entry}):\n{dev.log_tail()}")


def stop(dev: DagsterDev, timeout: float = 90) -> int:
    """Ctrl-C: SIGINT to the process group; wait for ``make`` and every process of the group to exit.

    Returns make's return code. On timeout the group is killed and AssertionError raised.
    """
    pgid = dev.process.pid
    if dev.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    try:
        dev.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        left = dev.processes()
        kill(dev)
        raise AssertionError(
            f"make dev did not exit within {timeout}s of SIGINT; still running: {left}\n{dev.log_tail()}"
        ) from None
    while dev.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = dev.processes()
    if left:
        kill(dev)
        raise AssertionError(f"processes left in the group after make exited: {left}\n{dev.log_tail()}")
    return dev.process.returncode


def kill(dev: DagsterDev) -> None:
    """Last resort (cleanup after a failure): SIGKILL the whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(dev.process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        dev.process.wait(timeout=30)


# grpc's asyncio poller, when a process's event loops stop, can hand a closed notification socket to a
# loop's reader callback; asyncio's default handler prints that traceback and nothing else goes wrong
# (grpc/grpc#25364, grpc/grpc#36096). It is the only traceback tolerated in the dev log.
_GRPC_AIO_POLLER_NOISE = re.compile(
    r"Exception in callback .*\nhandle: .*\nTraceback \(most recent call last\):\n"
    r"(?:  .*\n)*?  File \"src/python/grpcio/grpc/_cython/_cygrpc/aio/completion_queue\.pyx\.pxi\".*"
    r"PollerCompletionQueue\._handle_events\n(?:OSError|BlockingIOError): \[Errno \d+\] .*\n?"
)


def assert_clean_exit(dev: DagsterDev, returncode: int) -> None:
    """``make`` ended by Ctrl-C and ``dagster dev`` shut its services down in order, leaving nothing behind.

    GNU make answers SIGINT by waiting for its recipe and then re-raising the signal on itself, so its
    status is "killed by SIGINT" (-2) or 0 when the recipe finished first; anything else is an error.
    """
    text = dev.log.read_text(errors="replace")
    assert returncode in (0, -signal.SIGINT, 128 + signal.SIGINT), (returncode, text[-4000:])
    assert "Dagster services shut down." in text, text[-4000:]
    own = _GRPC_AIO_POLLER_NOISE.sub("", text)
    for problem in ("did not terminate cleanly", "shut down unexpectedly", "Traceback"):
        assert problem not in own, f"{problem!r} in the make dev log:\n{own[-4000:]}"
    assert not dev.processes()
    assert not listening_addresses(dev.port), f"port {dev.port} still listening"


def launch_backfill(dev: DagsterDev, start_day: str, end_day: str, title: str) -> str:
    """An asset backfill of every clickstream asset over ``start_day..end_day``, as the UI launches it.

    The asset graph's *Materialize all* dialog sends ``assetSelection`` + ``partitionNames``; Dagster
    applies the days to the root assets and widens them downstream through the partition mappings.
    Every asset must still target exactly the chosen days (checked here): a widened backfill reaches
    days whose inputs were never ingested and fails.
    """
    first, last = date.fromisoformat(start_day), date.fromisoformat(end_day)
    days = [(first + timedelta(days=offset)).isoformat() for offset in range((last - first).days + 1)]
    params = {
        "assetSelection": [{"path": [SOURCE, asset]} for asset in ASSETS],
        "partitionNames": days,
        "title": title,
    }
    result = dev.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    assert_targets(dev, result["backfillId"], start_day, end_day)
    return result["backfillId"]


def assert_targets(dev: DagsterDev, backfill_id: str, start_day: str, end_day: str) -> None:
    """Every partitioned asset of the backfill targets exactly ``start_day..end_day``, no day more."""
    for asset in ASSETS:
        targeted = dev.graphql(TARGETED, {"id": backfill_id, "key": {"path": [SOURCE, asset]}})
        ranges = targeted["partitionBackfillOrError"]["partitionsTargetedForAssetKey"]["ranges"]
        assert ranges == [{"start": start_day, "end": end_day}], (asset, ranges)


def backfill_ids(dev: DagsterDev) -> list[str]:
    result = dev.graphql(BACKFILLS)["partitionBackfillsOrError"]
    assert result["__typename"] == "PartitionBackfills", result
    return [entry["id"] for entry in result["results"]]


def backfill(dev: DagsterDev, backfill_id: str) -> dict:
    result = dev.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
    assert result["__typename"] == "PartitionBackfill", result
    return result


def wait_for_backfills(dev: DagsterDev, backfill_ids: list[str], timeout: float = 300) -> dict[str, dict]:
    """Poll until every backfill and all of its runs are finished; returns the final state of each."""
    deadline = time.monotonic() + timeout
    states: dict[str, dict] = {}
    while time.monotonic() < deadline:
        if dev.process.poll() is not None:
            raise AssertionError(f"make dev exited with {dev.process.returncode}:\n{dev.log_tail()}")
        states = {backfill_id: backfill(dev, backfill_id) for backfill_id in backfill_ids}
        if all(
            state["status"] in TERMINAL_BACKFILL
            and all(run["status"] in TERMINAL_RUN for run in state["runs"])
            for state in states.values()
        ):
            return states
        time.sleep(3)
    summary = {
        key: (state["status"], [(run["runId"], run["status"]) for run in state["runs"]])
        for key, state in states.items()
    }
    raise AssertionError(f"backfills not finished within {timeout}s: {summary}\n{dev.log_tail()}")


def run_event_texts(dev: DagsterDev, run_id: str) -> list[str]:
    """Every message and error (with stack and causes) of a run's event log, paged through."""
    texts: list[str] = []
    cursor = None
    while True:
        page = dev.graphql(RUN_EVENTS, {"runId": run_id, "cursor": cursor})["logsForRun"]
        assert page["__typename"] == "EventConnection", page
        for event in page["events"]:
            texts.append(f"{event['__typename']} [{event.get('stepKey')}] {event.get('message', '')}")
            error = event.get("error")
            while error:
                texts.append(f"{event['__typename']} error: {error['message']}\n{error.get('stack') or ''}")
                error = (error.get("causes") or [None])[0]
        cursor = page["cursor"]
        if not page["hasMore"]:
            return texts


def assert_backfills_succeeded(dev: DagsterDev, states: dict[str, dict]) -> list[dict]:
    """Every backfill COMPLETED_SUCCESS, every run a success, and the whole daily chain in one run (the
    single-run policy; an unpartitioned ``evaluation`` in the selection gets a run of its own).

    On failure the message carries each failed run's errors, not just its status. Returns the runs.
    """
    runs, problems = [], []
    for backfill_id, state in states.items():
        runs.extend(state["runs"])
        statuses = [run["status"] for run in state["runs"]]
        chain_runs = [run for run in state["runs"] if chain_run(run)]
        if state["status"] != "COMPLETED_SUCCESS" or set(statuses) != {"SUCCESS"} or len(chain_runs) != 1:
            problems.append(
                f"backfill {backfill_id}: {state['status']}, runs {statuses}, error {state['error']}"
            )
            for run in state["runs"]:
                if run["status"] != "SUCCESS":
                    errors = [text for text in run_event_texts(dev, run["runId"]) if "error" in text.lower()]
                    problems.append(f"run {run['runId']}:\n" + "\n".join(errors)[:4000])
    assert not problems, "\n".join(problems) + f"\n--- make dev log ---\n{dev.log_tail(2000)}"
    return runs


def chain_run(run: dict) -> bool:
    """Whether the run materializes every partitioned asset of the chain."""
    return {tuple(key["path"]) for key in run["assetSelection"]} >= {(SOURCE, asset) for asset in ASSETS}


def all_runs(dev: DagsterDev) -> list[dict]:
    result = dev.graphql(ALL_RUNS)["runsOrError"]
    assert result["__typename"] == "Runs", result
    return result["results"]


def compute_log_texts(dev: DagsterDev) -> dict[Path, str]:
    """Captured stdout/stderr of every step of every run (the instance's local compute logs)."""
    storage = dev.home / "storage"
    return {
        path: path.read_text(errors="replace")
        for path in sorted(storage.rglob("*"))
        if path.is_file() and path.suffix in {".out", ".err"}
    }


def lock_errors(texts: list[str]) -> list[str]:
    """Lines that mention a lock, with the text they came from cut short."""
    return [line[:500] for text in texts for line in text.splitlines() if LOCK_ERROR.search(line)]


def assert_png(path: Path, min_bytes: int = 10_000, min_colours: int = 16) -> tuple[int, int]:
    """A real screenshot: PNG signature, a decodable image of some size, more than a few colours."""
    from PIL import Image

    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"
    with Image.open(path) as image:
        image.load()
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert width >= 400 and height >= 300, f"{path} is {width}x{height}"
    assert colours is None or len(colours) >= min_colours, f"{path} has only {len(colours)} colours"
    return width, height
