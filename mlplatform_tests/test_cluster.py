"""The distributed profile (`mlplatform cluster`), started for real on loopback: PostgreSQL with
scram-sha-256, Redis with an ACL user, the MLflow server behind basic auth, two Celery workers,
Dagster's code server, daemon and webserver; the warehouse a DuckLake with its catalog in that PostgreSQL.

One cluster for the module (it takes ~30 s to start): a month's daily backfill launched through
the webserver, a run per week, executed by both workers, every source row once, the features
equal to the embedded profile's; then training on the MLflow server and a server answering with
that model from the DuckLake."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from mlplatform import lake
from mlplatform.cluster import USER, Cluster
from mlplatform.transform.assets import environment
from mlplatform_tests.conftest import CHAMPION_TRAINING, free_port

LANE = "system"
pytestmark = pytest.mark.xdist_group("cluster")

MONTH = (dt.date(2013, 1, 1), dt.date(2013, 1, 28))
WEEKS = [(MONTH[0] + dt.timedelta(days=7 * i), MONTH[0] + dt.timedelta(days=7 * i + 6)) for i in range(4)]
MLPLATFORM = str(Path(sys.executable).parent / "mlplatform")
RANGE = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")


@pytest.fixture(scope="module")
def cluster(replayed):
    """The profile started by `mlplatform cluster start` in a home of its own (PostgreSQL runs as
    the user postgres: the home is readable by it), the sensors slowed to leave the runs to the
    test; stopped by `mlplatform cluster stop`, which must leave no process behind."""
    root = Path(tempfile.mkdtemp(prefix="mlplatform-cluster-"))
    root.chmod(0o755)
    home = root / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLPLATFORM_", "DAGSTER_"))}
    env.update({
        "MLPLATFORM_HOME": str(home),
        "PGPASSWORD": secrets.token_hex(12), "MLPLATFORM_REDIS_PASSWORD": secrets.token_hex(12),
        "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(12),
        "MLPLATFORM_CLUSTER_PG_PORT": str(free_port()), "MLPLATFORM_CLUSTER_REDIS_PORT": str(free_port()),
        "MLPLATFORM_CLUSTER_MLFLOW_PORT": str(free_port()), "MLPLATFORM_CLUSTER_UI_PORT": str(free_port()),
        "MLPLATFORM_CLUSTER_CODE_PORT": str(free_port()),
        **{f"MLPLATFORM_{name}_INTERVAL_SECONDS": "86400"
           for name in ("LANDING_SENSOR", "STREAM_SENSOR", "AUTOMATION", "RETRAINING_SENSOR")},
    })
    found = Cluster.from_env(env)
    started = subprocess.run([MLPLATFORM, "cluster", "start"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        full = {**env, **found.env(env)}
        shutil.copytree(replayed, found.home / "landing", dirs_exist_ok=True)
        yield found, full
    finally:
        supervisor = found.pidfile.read_text().split()[0] if found.pidfile.exists() else None
        stopped = subprocess.run([MLPLATFORM, "cluster", "stop"], env=env, capture_output=True, text=True, timeout=120)
        left = running_in(int(supervisor), (str(home), f"--port {found.code_port}")) if supervisor else []
        shutil.rmtree(root, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not left, f"processes of the cluster still running after `cluster stop`: {left}"


def running_in(session: int, marks: tuple[str, ...], wait: float = 10.0) -> list[str]:
    """Living processes (not zombies) of the supervisor's session, or with one of ``marks`` (the
    cluster's home, the code server's port) on their command line, after at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        found = [f"{pid} {command[:100]}" for pid, (fields, command) in processes().items()
                 if pid != os.getpid() and (int(fields[3]) == session or any(mark in command for mark in marks))]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def processes() -> dict[int, tuple[list[str], str]]:
    """pid -> (the fields of /proc/<pid>/stat after the command's name: state, parent, group,
    session, ...; the command line) of the living processes (not zombies)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            found[int(entry.name)] = (fields, command)
    return found


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP port listens on (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                # an IPv4-mapped IPv6 address (gRPC's socket for 127.0.0.1) as its IPv4 address
                found.add(address.removeprefix("0000000000000000FFFF0000"))
    return found


def test_every_service_refuses_a_client_without_credentials(cluster):
    import httpx
    import psycopg2
    import redis

    found, env = cluster
    # PostgreSQL: scram-sha-256 for every connection, no `trust`
    hba = (found.pg_root / "data" / "pg_hba.conf").read_text().splitlines()
    rules = [line.split() for line in hba if line.strip() and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules), rules
    for password in (None, "wrong"):
        with pytest.raises(psycopg2.OperationalError, match="no password supplied|password authentication failed"):
            psycopg2.connect(host="127.0.0.1", port=found.pg_port, user=USER, dbname="lake",
                             **({"password": password} if password else {}),
                             **({"passfile": "/dev/null"}))
    with environment({"PGPASSWORD": ""}):
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(host="127.0.0.1", port=found.pg_port, user=USER, dbname="lake")
    psycopg2.connect(host="127.0.0.1", port=found.pg_port, user=USER, dbname="lake",
                     password=env["PGPASSWORD"]).close()
    # Redis: the default user is off; the ACL user needs its password
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=found.redis_port).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=found.redis_port, username=USER, password="wrong").ping()
    assert redis.Redis(port=found.redis_port, username=USER, password=env["MLPLATFORM_REDIS_PASSWORD"]).ping()
    assert env["MLPLATFORM_REDIS_PASSWORD"] not in found.redis_acl.read_text()
    # MLflow: the basic-auth app
    url = f"http://127.0.0.1:{found.mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, auth=(USER, "wrong")).status_code == 401
    assert httpx.get(url, auth=(USER, env["MLFLOW_TRACKING_PASSWORD"])).status_code == 200
    # every port listens on loopback only (the Dagster UI has no login: loopback, or a proxy)
    for port in (found.pg_port, found.redis_port, found.mlflow_port, found.ui_port, found.code_port):
        assert listening_addresses(port) == {"0100007F"}, port
    # nothing under the home holds a password
    for path in found.home.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000 and "postgres" not in path.parts:
            text = path.read_bytes()
            for name in ("PGPASSWORD", "MLPLATFORM_REDIS_PASSWORD", "MLFLOW_TRACKING_PASSWORD"):
                assert env[name].encode() not in text, f"{name} written in {path}"


def submit(found: Cluster, job: str, tags: dict | None = None, run_config: dict | None = None) -> str:
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=found.ui_port)
    return client.submit_job_execution(job, tags=tags or {}, run_config=run_config or {})


def wait_for(instance, run_ids: list[str], timeout: float = 900.0) -> dict:
    from dagster import DagsterRunStatus

    ended = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = {run_id: instance.get_run_by_id(run_id) for run_id in run_ids}
        if all(run.status in ended for run in runs.values()):
            return runs
        time.sleep(2)
    raise AssertionError(f"runs not ended in {timeout:.0f} s: " + ", ".join(
        f"{run_id[:8]} {run.status.value}" for run_id, run in runs.items()))


def step_failures(instance, run_id: str) -> str:
    return "\n".join(f"{e.step_key}: {e.dagster_event.event_specific_data.error.message[:1500]}"
                     for e in instance.all_logs(run_id) if e.is_dagster_event and e.dagster_event.is_step_failure)


def workers_of(instance, run_id: str) -> dict[str, str]:
    """step -> the Celery worker that executed it (dagster-celery's engine event)."""
    found = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if record.is_dagster_event and event.event_type_value == "ENGINE_EVENT" and record.step_key:
            metadata = event.engine_event_data.metadata or {}
            if "Celery worker" in metadata:
                found[record.step_key] = metadata["Celery worker"].value
    return found


@pytest.fixture(scope="module")
def month(cluster):
    """The month as a backfill of daily_job's assets, after the reference job: a run per week
    (partitions.week_runs). Returns (runs, step -> worker)."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from mlplatform.cluster import launch_backfill, wait_for_backfill
    from mlplatform.definitions import REFERENCE_JOB

    found, env = cluster
    with environment(env):
        with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            reference = submit(found, REFERENCE_JOB)
            runs = wait_for(instance, [reference])
            assert runs[reference].status == DagsterRunStatus.SUCCESS, step_failures(instance, reference)
            backfill_id = launch_backfill(found, *MONTH)
            status = wait_for_backfill(found, backfill_id, timeout=900)
            runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
            failed = {r.run_id[:8]: step_failures(instance, r.run_id) for r in runs if r.status != DagsterRunStatus.SUCCESS}
            assert status == "COMPLETED_SUCCESS", failed
            assert not failed, failed
            by_step = {(r.run_id, step): worker for r in runs for step, worker in workers_of(instance, r.run_id).items()}
            records = [instance.get_run_record_by_id(r.run_id) for r in runs]
    return records, by_step


def assert_days_as_embedded(env: dict, world: Path, first: dt.date, last: dt.date) -> None:
    """The DuckLake's raw and quarantined rows of first..last are the embedded world's, each once,
    and its feature table equals the world's for those days, row for row."""
    with environment(env), lake.connect_lake(env["MLPLATFORM_LAKE_CATALOG"]) as conn:
        conn.execute(f"ATTACH '{world / 'warehouse.duckdb'}' AS embedded (READ_ONLY)")
        window = f"BETWEEN DATE '{first}' AND DATE '{last}'"
        for table, key in (("flights", "year, month, day, carrier, flight, origin, sched_dep_time"),
                           ("weather", "origin, time_hour")):
            on_lake = conn.execute(f"SELECT count(*), count(DISTINCT ({key})) FROM lake.raw.{table} "
                                   f"WHERE _partition_date {window}").fetchone()
            embedded = conn.execute(f"SELECT count(*) FROM embedded.raw.{table} WHERE _partition_date {window}").fetchone()
            quarantined = conn.execute(f"SELECT count(*) FROM lake.quarantine.{table} WHERE _partition_date {window}"
                                       ).fetchone()[0]
            assert on_lake[0] == on_lake[1] == embedded[0] > 0, (table, on_lake, embedded)
            assert quarantined == conn.execute(
                f"SELECT count(*) FROM embedded.quarantine.{table} WHERE _partition_date {window}").fetchone()[0]
        query = f"SELECT * FROM {{}}.features.flight_features WHERE flight_date {window} ORDER BY flight_id"
        on_lake, on_file = conn.sql(query.format("lake")).df(), conn.sql(query.format("embedded")).df()
    assert len(on_lake) > 700 * ((last - first).days + 1)
    pd.testing.assert_frame_equal(on_lake, on_file)


def test_a_month_backfill_runs_on_both_workers_and_lands_every_row_once(cluster, month, world):
    """A run per week, some at the same time, each week's features once the days they look back on
    are built; every step on a worker, both workers busy; the month as the embedded profile has it."""
    records, by_step = month
    spans = sorted((r.start_time, r.end_time) for r in records)
    windows = sorted({(r.dagster_run.tags.get(RANGE[0]), r.dagster_run.tags.get(RANGE[1])) for r in records})
    assert {window[0] for window in windows} >= {str(week[0]) for week in WEEKS}, windows
    assert all(dt.date.fromisoformat(end) - dt.date.fromisoformat(start) <= dt.timedelta(days=6)
               for start, end in windows), windows
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two runs overlapped: {spans}"
    assert len(by_step) >= len(records), by_step
    assert {worker.split("@")[0] for worker in by_step.values()} == {"worker-1", "worker-2"}, by_step
    assert_days_as_embedded(cluster[1], world, *MONTH)


def test_the_daemon_and_the_webserver_share_one_code_server(cluster, month):
    """After the month's runs: the webserver's code location is the cluster's code server, and
    neither the daemon nor the webserver has started a code server of its own."""
    from mlplatform.cluster import graphql

    found, _ = cluster
    entries = graphql(found, """{ workspaceOrError { ... on Workspace { locationEntries {
        name loadStatus displayMetadata { key value } } } } }""")["workspaceOrError"]["locationEntries"]
    assert [(e["name"], e["loadStatus"]) for e in entries] == [("mlplatform", "LOADED")], entries
    shown = {m["key"]: m["value"] for m in entries[0]["displayMetadata"]}
    assert (shown.get("host"), shown.get("port")) == (found.host, str(found.code_port)), shown
    living = {pid: (int(fields[1]), command) for pid, (fields, command) in processes().items()}  # (parent, command)
    servers = {pid for pid, (_, command) in living.items()
               if ("dagster-daemon run" in command or "dagster-webserver" in command)
               and str(found.workspace) in command}
    assert len(servers) == 2, servers
    own = [command for pid, (parent, command) in living.items() if parent in servers and "api grpc" in command]
    assert not own, own
    code_server = [pid for pid, (_, command) in living.items()
                   if "code-server start" in command and f"--port {found.code_port}" in command]
    assert len(code_server) == 1 and any(parent == code_server[0] and "api grpc" in command
                                         for parent, command in living.values()), code_server


def test_training_registers_on_the_mlflow_server_and_serving_answers_from_the_lake(cluster, month):
    """Training on the workers registers a version on the MLflow server (through its basic auth);
    two serving processes load it from there, read the DuckLake, refuse a request without their
    bearer token, and give the same answers."""
    import httpx
    from dagster import DagsterInstance, DagsterRunStatus
    from mlflow import MlflowClient

    found, env = cluster
    training = {"ops": {"flight_delay_model": {"config": {**CHAMPION_TRAINING, "eval_end": str(MONTH[1])}}}}
    with environment(env):
        with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            run_id = submit(found, "training_job", run_config=training)
            runs = wait_for(instance, [run_id])
            assert runs[run_id].status == DagsterRunStatus.SUCCESS, step_failures(instance, run_id)
        client = MlflowClient(tracking_uri=env["MLPLATFORM_MLFLOW_URI"])
        versions = client.search_model_versions("name = 'flight_delay'")
        assert versions, "no model version registered on the MLflow server"
    # two serving processes, as two hosts behind one load balancer would run them: the same answers
    ports = [free_port(), free_port()]
    token = secrets.token_hex(12)  # what a server beyond loopback requires (here, asked for anyway)
    servers = [subprocess.Popen([MLPLATFORM, "serve", "--port", str(port)], env={**env, "MLPLATFORM_SERVE_TOKEN": token},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for port in ports]
    bearer = {"Authorization": f"Bearer {token}"}
    try:
        flights = [{"flight_date": "2013-01-28", "carrier": "UA", "flight_number": 1545, "origin": "EWR",
                    "dest": "IAH", "sched_dep_time": 515, "tailnum": "N14228"},
                   {"flight_date": "2013-01-27", "carrier": "DL", "flight_number": 461, "origin": "LGA",
                    "dest": "ATL", "sched_dep_time": 600}]
        answers = []
        for port, server in zip(ports, servers):
            deadline, ready = time.monotonic() + 180, None
            while time.monotonic() < deadline and server.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    ready = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                    if ready.status_code == 200:
                        break
                time.sleep(1)
            assert ready is not None and ready.status_code == 200, (ready and ready.text, server.poll())
            url = f"http://127.0.0.1:{port}/predict/batch"
            assert httpx.post(url, json={"flights": flights}, timeout=30).status_code == 401
            answer = httpx.post(url, json={"flights": flights}, headers=bearer, timeout=30)
            assert answer.status_code == 200, answer.text
            answers.append([(p["flight_id"], p["model_version"], p["delay_probability"])
                            for p in answer.json()["predictions"]])
        assert answers[0] == answers[1], answers
        assert {version for _, version, _ in answers[0]} <= {v.version for v in versions}, answers
    finally:
        for server in servers:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


def pool_processes(worker: str) -> list[int]:
    """The processes below the Celery worker started as ``worker`` (``worker-1``): its pool's child,
    which executes the step, and what that started (dbt)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().split(b"\0")
                table[int(entry.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), command)
    mains = [pid for pid, (_, command) in table.items() if f"{worker}@%h".encode() in command]
    below, todo = [], list(mains)
    while todo:
        parent = todo.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        below += children
        todo += children
    return below


def wait_for_step(instance, run_id: str, step: str, timeout: float = 300.0) -> str:
    """The worker executing ``step`` of the run, as soon as it starts it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker = workers_of(instance, run_id).get(step)
        if worker:
            return worker
        assert not instance.get_run_by_id(run_id).is_finished, f"run {run_id} ended before {step} started"
        time.sleep(0.2)
    raise AssertionError(f"{step} of {run_id} did not start in {timeout:.0f} s")


def test_a_worker_killed_mid_step_fails_the_run_and_a_rerun_lands_every_row_once(cluster, month, world):
    """SIGKILL to the worker's process executing a week's dbt step (and the dbt it started): the
    run fails, the worker carries on with a new pool process, nothing half-written is visible, and
    the week run again equals the embedded profile."""
    import signal

    from dagster import DagsterInstance, DagsterRunStatus

    from mlplatform.definitions import DAILY_JOB

    found, env = cluster
    week = WEEKS[1]
    with environment(env), DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        run_id = submit(found, DAILY_JOB, dict(zip(RANGE, map(str, week))))
        worker = wait_for_step(instance, run_id, "dbt_daily").split("@")[0]
        killed = pool_processes(worker)
        assert killed, f"no pool process under {worker}"
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        runs = wait_for(instance, [run_id], timeout=300)
        assert runs[run_id].status == DagsterRunStatus.FAILURE
        assert not [e for e in instance.all_logs(run_id) if e.is_dagster_event and e.step_key == "dbt_daily"
                    and e.dagster_event.is_step_success]
        assert_days_as_embedded(env, world, *week)  # what the killed step had written: nothing, or whole models
        rerun = submit(found, DAILY_JOB, dict(zip(RANGE, map(str, week))))
        runs = wait_for(instance, [rerun], timeout=600)
        assert runs[rerun].status == DagsterRunStatus.SUCCESS, step_failures(instance, rerun)
    assert_days_as_embedded(env, world, *week)


def test_a_postgres_restart_during_a_run_fails_it_cleanly_or_it_recovers(cluster, month, world):
    """PostgreSQL (Dagster's storage and the DuckLake catalog) restarted while a week's dbt step
    runs: the run ends (failed or succeeded, never stuck), nothing half-written is visible, and the
    week run again equals the embedded profile."""
    import signal

    import psycopg2
    from dagster import DagsterInstance, DagsterRunStatus

    from mlplatform.definitions import DAILY_JOB

    found, env = cluster
    week = WEEKS[2]
    postmaster = int((found.pg_root / "data" / "postmaster.pid").read_text().split()[0])
    with environment(env), DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        run_id = submit(found, DAILY_JOB, dict(zip(RANGE, map(str, week))))
        wait_for_step(instance, run_id, "dbt_daily")
        os.kill(postmaster, signal.SIGINT)  # a fast shutdown; the supervisor starts it again
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg2.OperationalError, FileNotFoundError, ValueError):
                restarted = int((found.pg_root / "data" / "postmaster.pid").read_text().split()[0])
                if restarted != postmaster:
                    psycopg2.connect(host="127.0.0.1", port=found.pg_port, user=USER, dbname="lake").close()
                    break
            time.sleep(0.5)
        else:
            raise AssertionError("PostgreSQL did not come back within 60 s")
        # the webserver held a connection to the old server in each of its storages: its first
        # query of each after the restart may fail (SQLAlchemy then drops that pool's connection)
        answers = [webserver_query(found, "{ runsOrError(limit: 1) { __typename } }") for _ in range(2)]
        assert answers[-1] == {"runsOrError": {"__typename": "Runs"}}, answers
        runs = wait_for(instance, [run_id], timeout=600)
        assert runs[run_id].status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)
        if runs[run_id].status == DagsterRunStatus.FAILURE:
            from dagster_graphql import DagsterGraphQLClientError

            for attempt in range(3):
                try:
                    rerun = submit(found, DAILY_JOB, dict(zip(RANGE, map(str, week))))
                    break
                except DagsterGraphQLClientError as exc:
                    assert "closed the connection" in str(exc) and attempt < 2, exc
            runs = wait_for(instance, [rerun], timeout=600)
            assert runs[rerun].status == DagsterRunStatus.SUCCESS, step_failures(instance, rerun)
    assert_days_as_embedded(env, world, *week)


def webserver_query(found: Cluster, query: str):
    import httpx

    answer = httpx.post(f"http://127.0.0.1:{found.ui_port}/graphql", json={"query": query}, timeout=60).json()
    return answer.get("data") or answer.get("errors")
