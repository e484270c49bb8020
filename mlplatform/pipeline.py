"""Headless runs of the main jobs against the Dagster instance in ``DAGSTER_HOME``.

``run_range`` is what ``make run`` calls: the reference job, then the daily job for the whole
range as one run (single-run backfill), then a per-asset summary. The runs are recorded in the
instance, so they show in the UI like any other.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import TextIO

from dagster import DagsterEventType, DagsterInstance, EventRecordsFilter

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

MAIN_JOBS = ("reference_job", "daily_job", "training_job", "predictions_job")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run_range(start: dt.date, end: dt.date, out: TextIO = sys.stdout, instance: DagsterInstance | None = None) -> bool:
    from mlplatform.definitions import defs

    instance = instance or DagsterInstance.get()
    ok = True
    for job_name in MAIN_JOBS:
        job = defs.resolve_job_def(job_name)
        tags = {}
        if job.partitions_def is not None:
            tags = {RANGE_START_TAG: start.isoformat(), RANGE_END_TAG: end.isoformat()}
        result = job.execute_in_process(
            instance=instance, tags=tags, raise_on_error=False, run_config=QUIET
        )
        print(f"\n{job_name} {start}..{end}: {'SUCCESS' if result.success else 'FAILURE'} (run {result.run_id})", file=out)
        print(summarize(instance, result.run_id), file=out)
        if not result.success:
            ok = False
            break
    return ok


def summarize(instance: DagsterInstance, run_id: str) -> str:
    """Per asset: rows (of the last materialization), its step's seconds, check results."""
    records = instance.all_logs(run_id)
    step_seconds: dict[str, float] = {}
    for stat in instance.get_run_step_stats(run_id):
        if stat.end_time and stat.start_time:
            step_seconds[stat.step_key] = stat.end_time - stat.start_time
    rows: dict[str, object] = {}
    steps: dict[str, str] = {}
    checks: dict[str, list[str]] = {}
    for record in records:
        event = record.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.step_materialization_data.materialization
            key = mat.asset_key.to_user_string()
            count = mat.metadata.get("dagster/row_count")
            rows[key] = getattr(count, "value", count)
            steps[key] = event.step_key
        elif event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            key = evaluation.asset_key.to_user_string()
            mark = "ok" if evaluation.passed else ("FAIL" if evaluation.severity.value == "ERROR" else "warn")
            checks.setdefault(key, []).append(f"{evaluation.check_name}:{mark}")
    lines = [f"  {'asset':36} {'rows':>9} {'step s':>7}  checks"]
    for key in sorted(rows, key=lambda k: (steps[k], k)):
        results = checks.get(key, [])
        failed = [c for c in results if not c.endswith(":ok")]
        passed = len(results) - len(failed)
        check_text = f"{passed}/{len(results)} passed" + (f"; {', '.join(failed)}" if failed else "") if results else "-"
        rows_text = "-" if rows[key] is None else str(rows[key])
        lines.append(f"  {key:36} {rows_text:>9} {step_seconds.get(steps[key], 0):7.2f}  {check_text}")
    return "\n".join(lines)
