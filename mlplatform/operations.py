"""Crash recovery: runs whose process died.

A run killed in the middle (SIGKILL, out of memory, the machine rebooting) leaves its record
STARTED and keeps the ``warehouse_writer`` pool slot its step had claimed, so every later
warehouse step would wait for it forever. Its data is fine: each partition is replaced in one
DuckDB transaction, which DuckDB rolls back on the next open. ``recover_dead_runs`` marks such
runs failed and frees their pool slots; the ``dead_run_sensor`` does it every minute in the
daemon, ``mlplatform run`` before it starts. Re-running the failed run's partitions is safe.

A run's process is found from its start event (the pid, and the process's start time so that a
reused pid is not mistaken for it). That is meaningful only on the machine the run executed on:
dead runs are looked for only when Dagster's storage is the local SQLite one. With PostgreSQL
storage shared by several hosts, or a launcher that runs elsewhere (Docker, Kubernetes), rely on
Dagster's run monitoring (`dagster.yaml`); the slots of runs that have ended are freed in all
cases (Dagster's code server marks a launched run whose process died as failed, but does not
free its slots).
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from mlplatform.private_api import free_slots_of_ended_runs, storage_is_local_sqlite


def run_start(instance: DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, timestamp) of the process that executed the run, from its start event."""
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.RUN_START):
        if entry.dagster_event is not None and entry.dagster_event.pid:
            return entry.dagster_event.pid, entry.timestamp
    return None


def process_alive(pid: int, started_before: float) -> bool:
    """Whether process ``pid`` exists and is the one that started a run at ``started_before``
    (a process with a reused pid started later is not it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        pass
    started = process_start_time(pid)
    return started is None or started <= started_before + 1.0


def process_start_time(pid: int) -> float | None:
    """When a process started (epoch seconds), from /proc; None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time after boot, in clock ticks
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def dead_runs(instance: DagsterInstance) -> list[tuple[str, int]]:
    """(run id, pid) of the STARTED or CANCELING runs whose process no longer exists."""
    if not storage_is_local_sqlite(instance):  # (with a shared PostgreSQL, a pid says nothing)
        return []
    out = []
    statuses = [DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    for record in instance.get_run_records(RunsFilter(statuses=statuses)):
        run_id = record.dagster_run.run_id
        start = run_start(instance, run_id)
        if start is not None and not process_alive(*start):
            out.append((run_id, start[0]))
    return out


def recover_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark the dead runs failed, and free the pool slots of every run that has ended (a run
    whose process died may already have been marked failed by Dagster's code server, which
    does not free its slots); the ids of the runs marked failed."""
    recovered = []
    for run_id, pid in dead_runs(instance):
        run = instance.get_run_by_id(run_id)
        if run is None or run.status not in (DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING):
            continue
        instance.report_run_failed(
            run, f"The run's process (pid {pid}) is gone: it was killed or crashed. Partitions it was writing "
            "were rolled back by DuckDB; re-run them."
        )
        recovered.append(run_id)
    free_slots_of_ended_runs(instance)
    return recovered


@sensor(
    name="dead_run_sensor",
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Marks runs whose process died as failed and frees their pool slots.",
)
def dead_run_sensor(context: SensorEvaluationContext):
    recovered = recover_dead_runs(context.instance)
    if recovered:
        context.log.warning(f"marked {len(recovered)} dead runs failed: {', '.join(recovered)}")
        return SkipReason(f"recovered {len(recovered)} dead runs: {', '.join(recovered)}")
    return SkipReason("no dead runs")
