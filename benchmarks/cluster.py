"""The distributed profile's month (``make bench``, figure ``cluster``): the daily assets of the
days backfilled on a cluster with one Celery worker and on one with two, and beside them the
embedded profile's ``daily_job`` over the same days (one run, in-process), all in one sitting.

Each cluster is started fresh (`mlplatform cluster start`, its own home and free ports, the sensors
slowed so that only the backfill runs), its reference job run, then the backfill timed from its
launch to its end; the machine's CPU seconds over the same span come from /proc/stat. Per step,
the seconds each worker spent executing (from the run events) say what more cores would give:
the backfill's wall time is bounded below by its longest chain of waves, not by the work."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLPLATFORM = str(Path(sys.executable).parent / "mlplatform")
SLOW_SENSORS = {f"MLPLATFORM_{name}_INTERVAL_SECONDS": "86400"
                for name in ("LANDING_SENSOR", "STREAM_SENSOR", "AUTOMATION", "RETRAINING_SENSOR")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (user + nice + system + irq + softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def embedded(workdir: Path, landing: Path, start: dt.date, end: dt.date) -> dict:
    """The embedded profile: reference_job, then daily_job over start..end in one run (timed)."""
    home = workdir / "cluster-embedded"
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(landing, home / "landing")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLPLATFORM_", "DAGSTER_"))},
           "MLPLATFORM_HOME": str(home), "MLPLATFORM_REDIS_URL": "redis://127.0.0.1:1/0"}
    subprocess.run([MLPLATFORM, "init"], env=env, check=True, capture_output=True)
    code = (
        "import sys, time\nfrom dagster import DagsterInstance\nfrom mlplatform.definitions import load_defs\n"
        "from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG\nfrom mlplatform.settings import Settings\n"
        "settings = Settings.from_env()\ndefs = load_defs(settings)\n"
        "with DagsterInstance.from_config(str(settings.dagster_home)) as instance:\n"
        "    assert defs.resolve_job_def('reference_job').execute_in_process(instance=instance).success\n"
        "    began = time.perf_counter()\n"
        "    result = defs.resolve_job_def('daily_job').execute_in_process(instance=instance, raise_on_error=False,\n"
        "        tags={RANGE_START_TAG: sys.argv[1], RANGE_END_TAG: sys.argv[2]})\n"
        "    print(result.success, time.perf_counter() - began)\n"
    )
    cpu = machine_cpu_seconds()
    done = subprocess.run([sys.executable, "-c", code, str(start), str(end)], env=env, capture_output=True, text=True,
                          cwd=ROOT)
    cpu = machine_cpu_seconds() - cpu
    success, seconds = done.stdout.strip().splitlines()[-1].split()
    assert success == "True", done.stdout[-3000:] + done.stderr[-3000:]
    shutil.rmtree(home, ignore_errors=True)
    return {"daily_job_s": round(float(seconds), 1), "machine_cpu_s_with_reference_and_start": round(cpu, 1)}


def on_cluster(workdir: Path, landing: Path, start: dt.date, end: dt.date, workers: int) -> dict:
    """A fresh cluster with ``workers`` Celery workers: the backfill of start..end, timed."""
    from mlplatform import cluster as c

    root = workdir / f"cluster-{workers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    root.chmod(0o755)  # (PostgreSQL runs as the user postgres)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLPLATFORM_", "DAGSTER_"))},
           "MLPLATFORM_CLUSTER_HOME": str(root / "home"), "MLPLATFORM_CLUSTER_WORKERS": str(workers),
           "PGPASSWORD": secrets.token_hex(12), "MLPLATFORM_REDIS_PASSWORD": secrets.token_hex(12),
           "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(12), **SLOW_SENSORS,
           **{f"MLPLATFORM_CLUSTER_{name}_PORT": str(free_port()) for name in ("PG", "REDIS", "MLFLOW", "UI")}}
    found = c.Cluster.from_env(env)
    began = time.perf_counter()
    started = subprocess.run([MLPLATFORM, "cluster", "start"], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    start_s = time.perf_counter() - began
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
    from dagster_graphql import DagsterGraphQLClient

    from mlplatform.transform.assets import environment

    try:
        shutil.copytree(landing, found.home / "landing", dirs_exist_ok=True)

        client = DagsterGraphQLClient(found.host, port_number=found.ui_port)
        cluster_env = {**env, **found.env(env)}  # (the instance's storage and launch_backfill read it)
        with environment(cluster_env), DagsterInstance.from_config(cluster_env["DAGSTER_HOME"]) as instance:
            reference = client.submit_job_execution("reference_job")
            while not instance.get_run_by_id(reference).is_finished:
                time.sleep(1)
            assert instance.get_run_by_id(reference).status == DagsterRunStatus.SUCCESS
            cpu, began = machine_cpu_seconds(), time.perf_counter()
            backfill_id = c.launch_backfill(found, start, end)
            status = c.wait_for_backfill(found, backfill_id, poll=1.0)
            seconds, cpu = time.perf_counter() - began, machine_cpu_seconds() - cpu
            assert status == "COMPLETED_SUCCESS", status
            runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
            busy: dict[str, float] = {}
            for run in runs:
                started_at = {}
                for record in instance.all_logs(run.run_id):
                    event = record.dagster_event
                    if not record.is_dagster_event:
                        continue
                    if event.event_type_value == "ENGINE_EVENT" and "Celery worker" in (event.engine_event_data.metadata or {}):
                        started_at[record.step_key] = (event.engine_event_data.metadata["Celery worker"].value,
                                                       record.timestamp)
                    elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and record.step_key in started_at:
                        worker, at = started_at.pop(record.step_key)
                        busy[worker.split("@")[0]] = busy.get(worker.split("@")[0], 0.0) + record.timestamp - at
    finally:
        subprocess.run([MLPLATFORM, "cluster", "stop"], env=env, capture_output=True, text=True)
        shutil.rmtree(root, ignore_errors=True)
    return {"workers": workers, "backfill_s": round(seconds, 1), "machine_cpu_s": round(cpu, 1), "runs": len(runs),
            "worker_busy_s": {k: round(v, 1) for k, v in sorted(busy.items())}, "cluster_start_s": round(start_s, 1)}


def run(workdir: Path, landing: Path, start: dt.date, end: dt.date) -> dict:
    """The month (start..end) on the embedded profile and on clusters of one and two workers."""
    results = {"window": f"{start}..{end}", "embedded": embedded(workdir, landing, start, end)}
    for workers in (1, 2):
        results[f"workers_{workers}"] = on_cluster(workdir, landing, start, end, workers)
    one, two = results["workers_1"]["backfill_s"], results["workers_2"]["backfill_s"]
    results["two_over_one"] = round(two / one, 2)
    results["one_worker_over_embedded"] = round(one / results["embedded"]["daily_job_s"], 2)
    return results
