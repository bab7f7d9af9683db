"""The code location: what it defines, that it loads without warnings of ours, and that
``dagster dev`` serves it on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUR_CODE = tuple(str(REPO / folder) for folder in ("anomaly_dagster", "assets", "resources"))
ASSETS = {
    *("raw_events", "quarantine", "resampled", "features", "model", "scores", "anomalies", "incidents"),
    "evaluation",
}


def test_code_location_defines_the_clickstream_chain():
    import dagster as dg

    from anomaly_dagster.definitions import defs

    keys = {key.path[1] for key in defs.resolve_all_asset_keys() if key.path[0] == "clickstream"}
    assert keys == ASSETS
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey(["clickstream", "features"])).parent_keys == {
        dg.AssetKey(["clickstream", "resampled"])
    }
    checks = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {
        "events_present",
        "complete_buckets",
        "quarantine_rate",
        "alert_rate",
        "stream_vs_batch",
    }
    descriptions = {key.path[1]: graph.get(key).description for key in graph.get_all_asset_keys()}
    # the UI names the earlier days a day reads (Dagster's graph declares the same day only); the model
    # said D-7..D+0, which reads as training on the scored day, and incidents named none
    assert "Day D reads features D-7..D-1, features D (a cold start" in descriptions["model"]
    assert (
        "Day D reads anomalies D-1 and any earlier day an incident runs on through"
        in descriptions["incidents"]
    )
    assert defs.resolve_job_def("clickstream_pipeline")
    assert defs.resolve_schedule_def("clickstream_daily").cron_schedule == "30 0 * * *"
    assert defs.resolve_sensor_def("clickstream_landing")


def test_loading_emits_no_warning_from_our_code():
    import importlib

    import anomaly_dagster.definitions as module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(module)
        module.defs.resolve_all_asset_keys()
    ours = [w for w in caught if w.filename.startswith(OUR_CODE)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on ``port``, read from /proc/net/tcp."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:
            addresses.add(socket.inet_ntoa(bytes.fromhex(host)[::-1]))
    return addresses


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_dagster_dev_serves_the_location_on_loopback(tmp_path):
    from anomaly_dagster.definitions import defs

    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "ANOMALY_WAREHOUSE_DIR": str(tmp_path / "warehouse")}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    log = tmp_path / "dev.log"
    dagster = Path(sys.executable).parent / "dagster"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            try:
                entries = _graphql(
                    port,
                    "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                    "locationOrLoadError { __typename ... on PythonError { message } } } } } }",
                )["data"]["workspaceOrError"]["locationEntries"]
                status = entries[0]
                if status["loadStatus"] == "LOADED":
                    break
            except OSError:
                pass
            time.sleep(1)
        assert status and status["locationOrLoadError"]["__typename"] == "RepositoryLocation", status
        nodes = _graphql(port, "{ assetNodes { assetKey { path } } }")["data"]["assetNodes"]
        served = {tuple(node["assetKey"]["path"]) for node in nodes}
        assert {asset for source, asset in served if source == "clickstream"} == ASSETS
        assert served == {tuple(key.path) for key in defs.resolve_all_asset_keys()}  # every source's
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
    text = log.read_text()
    assert "Error" not in text.replace("errors", ""), text[-3000:]
    assert "anomaly_dagster" not in "\n".join(line for line in text.splitlines() if "Warning" in line), text[
        -3000:
    ]


def test_a_source_without_labels_has_no_evaluation_and_a_working_job(tmp_path):
    from anomaly_dagster.config import load_sources
    from anomaly_dagster.definitions import build_definitions

    unlabelled = load_sources()["clickstream"].model_copy(update={"labels": None})
    defs = build_definitions({"clickstream": unlabelled}, str(tmp_path), str(tmp_path / "warehouse"))
    keys = {key.path[1] for key in defs.resolve_all_asset_keys()}
    assert keys == ASSETS - {"evaluation"}
    job = defs.resolve_job_def("clickstream_pipeline")
    assert {key.path[1] for key in job.asset_layer.executable_asset_keys} == keys
