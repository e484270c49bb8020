"""Crash recovery: runs whose process died.

A run killed in the middle (SIGKILL, out of memory, the machine rebooting) leaves its record
STARTED and keeps the ``warehouse_writer`` pool slot its step had claimed, so every later
warehouse step would wait for it forever. Its data is fine: each partition is replaced in one
DuckDB transaction, which DuckDB rolls back on the next open. ``recover_dead_runs`` marks such
runs failed and frees their pool slots; the ``dead_run_sensor`` does it every minute in the
daemon, ``mlplatform run`` before it starts. Re-running the failed run's partitions is safe.

A run's process is found from its start event (the pid of the process that executed it). That is
meaningful on the machine the run executed on, which is the case with Dagster's default run
launcher (runs are subprocesses of the daemon or webserver host). With a launcher that runs
elsewhere (Docker, Kubernetes), use its run monitoring instead and turn this sensor off.
"""

from __future__ import annotations

import os

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


def run_pid(instance: DagsterInstance, run_id: str) -> int | None:
    """The pid of the process that executed the run, from its start event."""
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.RUN_START):
        if entry.dagster_event is not None and entry.dagster_event.pid:
            return entry.dagster_event.pid
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def dead_runs(instance: DagsterInstance) -> list[tuple[str, int]]:
    """(run id, pid) of the STARTED runs whose process no longer exists."""
    out = []
    for record in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        run_id = record.dagster_run.run_id
        pid = run_pid(instance, run_id)
        if pid is not None and not pid_alive(pid):
            out.append((run_id, pid))
    return out


def recover_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark the dead runs failed and free the pool slots they held; their ids."""
    recovered = []
    for run_id, pid in dead_runs(instance):
        run = instance.get_run_by_id(run_id)
        if run is None or run.status != DagsterRunStatus.STARTED:
            continue
        instance.report_run_failed(
            run, f"The run's process (pid {pid}) is gone: it was killed or crashed. Partitions it was writing "
            "were rolled back by DuckDB; re-run them."
        )
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        recovered.append(run_id)
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
