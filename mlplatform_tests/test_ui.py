"""What `make ui` starts: `dagster dev` on loopback loads the code location, with its sensors on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlplatform.settings import REPO_ROOT

pytestmark = pytest.mark.slow

QUERY = """
{
  repositoriesOrError { ... on RepositoryConnection { nodes {
    name
    assetNodes { assetKey { path } groupName }
    sensors { name sensorState { status } }
  } } }
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_dagster_dev_serves_the_graph_with_sensors_running(home):
    from mlplatform.cli import init_home

    init_home(home)
    port = free_port()
    dagster = Path(sys.executable).parent / "dagster"
    env = {**os.environ, "DAGSTER_HOME": str(home.dagster_home)}
    process = subprocess.Popen(
        [str(dagster), "dev", "-w", "workspace.yaml", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline, data = time.time() + 120, None
        while time.time() < deadline:
            try:
                data = graphql(port, QUERY)
                nodes = data["data"]["repositoriesOrError"].get("nodes") or []
                if nodes and nodes[0]["assetNodes"]:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert data is not None, "dagster dev did not answer"
        (repo,) = data["data"]["repositoriesOrError"]["nodes"]
        groups = {n["groupName"] for n in repo["assetNodes"]}
        assert {"ingest", "transform", "features", "training", "predictions", "monitoring"} <= groups
        keys = {"/".join(n["assetKey"]["path"]) for n in repo["assetNodes"]}
        assert {"raw_flights", "features/flight_features", "flight_delay_model", "monitoring/drift_report"} <= keys
        sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
        assert sensors == {name: "RUNNING" for name in
                           ("landing_sensor", "retraining_sensor", "alert_on_run_failure", "automation_sensor")}
        # bound to loopback only
        with socket.socket() as s:
            s.settimeout(1)
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                assert s.connect_ex((other, port)) != 0
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
