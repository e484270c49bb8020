"""Headless runs of the main jobs against the Dagster instance in ``DAGSTER_HOME``.

``run_range`` is what ``make run`` calls: the reference job, then the daily job for the whole
range as one run (single-run backfill), then a per-asset summary. The runs are recorded in the
instance, so they show in the UI like any other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
from typing import TextIO

from dagster import DagsterEventType, DagsterInstance

from mlplatform.keys import CHAMPION_MODEL, MODEL_EVALUATION
from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG
from mlplatform.settings import Settings


MAIN_JOBS = ("reference_job", "daily_job", "training_job", "predictions_job", "monitoring_job")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def gate_rejection(result) -> str | None:
    """The promotion gate's reason when the run's model_evaluation rejected the challenger (a
    successful run: a rejection is a decision, not a failure)."""
    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key == MODEL_EVALUATION:
                metadata = materialization.metadata
                if getattr(metadata.get("decision"), "value", None) == "REJECTED":
                    return metadata["reason"].value
    return None


def status_of(result) -> tuple[str, str | None]:
    """('SUCCESS' | 'CHALLENGER REJECTED' | 'FAILURE', the gate's reason when rejected)."""
    if not result.success:
        return "FAILURE", None
    rejected = gate_rejection(result)
    return ("CHALLENGER REJECTED", rejected) if rejected else ("SUCCESS", None)


def run_range(
    settings: Settings,
    start: dt.date,
    end: dt.date,
    out: TextIO = sys.stdout,
    instance: DagsterInstance | None = None,
    full_refresh: bool = False,
) -> bool:
    """Run the main jobs for start..end. A challenger the gate rejects is a normal outcome;
    predictions need a champion (this run's or an earlier one). True when nothing failed.
    ``full_refresh`` rebuilds the dbt tables from scratch (give it the whole range of days)."""
    from mlplatform.definitions import load_defs
    from mlplatform.operations import recover_dead_runs

    defs = load_defs(settings)
    instance = instance or DagsterInstance.from_config(str(settings.dagster_home))
    recovered = recover_dead_runs(instance)  # their pool slots would block every warehouse step
    if recovered:
        print(f"marked {len(recovered)} runs whose process died as failed: {', '.join(recovered)}", file=out)
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"run-{start}-{end}-{dt.datetime.now():%Y%m%dT%H%M%S}.log"
    print(f"dbt and step output: {log_path}", file=out)
    ok = True
    for job_name in MAIN_JOBS:
        job = defs.resolve_job_def(job_name)
        tags = {}
        if job.partitions_def is not None:
            tags = {RANGE_START_TAG: start.isoformat(), RANGE_END_TAG: end.isoformat()}
        if job_name in ("predictions_job", "monitoring_job") and not _has_champion(instance):
            print(f"\n{job_name}: skipped, there is no champion model yet", file=out)
            continue
        run_config = dict(QUIET)
        if full_refresh and job_name in ("reference_job", "daily_job"):
            op = "dbt_reference" if job_name == "reference_job" else "dbt_daily"
            run_config["ops"] = {op: {"config": {"full_refresh": True}}}
        with open(log_path, "a") as log, contextlib.redirect_stdout(log):
            result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False, run_config=run_config)
        status, rejected = status_of(result)
        print(f"\n{job_name} {start}..{end}: {status} (run {result.run_id})", file=out)
        if rejected:
            print(f"  promotion gate: {rejected}", file=out)
        print(summarize(instance, result), file=out)
        if not result.success:
            ok = False
            for event in result.all_events:
                if event.event_type == DagsterEventType.STEP_FAILURE:
                    error = event.event_specific_data.error
                    print(f"  {event.step_key} failed: {error.message.strip() if error else ''}", file=out)
            if job_name in ("reference_job", "daily_job"):
                break
    return ok


def _has_champion(instance: DagsterInstance) -> bool:
    """Whether champion_model was ever materialized (predictions score with what it promoted)."""
    return instance.get_latest_materialization_event(CHAMPION_MODEL) is not None


def summarize(instance: DagsterInstance, result) -> str:
    """Per asset: rows (of the last materialization), its step's seconds, check results. Reads
    the run's events from ``result`` (in memory) and only the step events from the instance: a
    year's run has thousands of partition events, which take seconds to read back."""
    step_seconds: dict[str, float] = {}
    starts: dict[str, float] = {}
    step_events = {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}
    for record in instance.all_logs(result.run_id, of_type=step_events):
        event = record.dagster_event
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        elif event.step_key in starts:
            step_seconds[event.step_key] = record.timestamp - starts[event.step_key]
    rows: dict[str, object] = {}
    steps: dict[str, str] = {}
    checks: dict[str, list[str]] = {}
    for event in result.all_events:
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
