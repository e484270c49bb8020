"""The landing zone's sensor.

``landing_sensor``: a new or changed daily file (name, size, mtime) starts one run for its day
through the whole daily graph: raw tables, dbt's daily models and features, and, once there is
a champion, its predictions and the day's monitoring (profiles, drift, realised performance, the
online evaluation of a shadow or a canary).
Contiguous changed days become one ranged run. One run, not a chain of runs that declarative
automation starts one after another: a landed day reaches its drift verdict in one run's time
(benchmarks: "Landing to drift verdict"). Declarative automation still covers everything else
(a backfill, a reloaded reference table).

A file counts as delivered when its run succeeds. A failed or cancelled run's files are
requested again, at most ``MAX_ATTEMPTS`` times for the same file; after that the sensor waits
for the file to change (a re-delivery) and says so on its tick, so a day that a blocking check
refuses (a null wave, say) does not start a failing run every tick. A file whose run is still
going is not requested twice. On its first tick the sensor records what is already there
without launching (history is a backfill's job).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from dagster import (
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from mlplatform import keys
from mlplatform.ingest.contracts import DAILY
from mlplatform.ingest.landing import landed_days
from mlplatform.partitions import FIRST_DAY, LAST_DAY, RANGE_END_TAG, RANGE_START_TAG
from mlplatform.settings import Settings

# Every daily-partitioned asset carries the tag "daily" (raw tables, dbt's daily models,
# predictions, the daily monitoring assets).
DAILY_ASSETS = AssetSelection.tag("daily", "")
# what needs a champion (they score with it, or compare with its reference)
NEEDS_CHAMPION = AssetSelection.assets(keys.PREDICTIONS).downstream()
MAX_ATTEMPTS = 3

def landing_signatures(landing: Path) -> dict[str, str]:
    """{'flights/2013-01-01.csv': '<size>:<mtime_ns>', ...} for every daily file in the window."""
    out = {}
    for contract in DAILY:
        for day, path in landed_days(landing, contract).items():
            if FIRST_DAY.isoformat() <= day <= LAST_DAY.isoformat():
                stat = path.stat()
                out[f"{contract.name}/{path.name}"] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return out


def contiguous_ranges(days: list[str]) -> list[tuple[str, str]]:
    """['2013-01-01', '2013-01-02', '2013-01-05'] -> [('2013-01-01', '2013-01-02'), ('2013-01-05', '2013-01-05')]"""
    ranges: list[list[str]] = []
    for day in sorted(set(days)):
        if ranges and dt.date.fromisoformat(day) - dt.date.fromisoformat(ranges[-1][1]) == dt.timedelta(days=1):
            ranges[-1][1] = day
        else:
            ranges.append([day, day])
    return [(a, b) for a, b in ranges]


RUN_KEY_TAG = keys.RUN_KEY_TAG
DONE = (DagsterRunStatus.SUCCESS,)
GAVE_UP = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


def _run_status(instance, run_key: str):
    runs = instance.get_runs(RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    return runs[0].status if runs else None


def landing_requests(instance, cursor: dict | None, current: dict[str, str],
                     selection: list | None = None) -> tuple[list[RunRequest], dict, list[str]]:
    """Run requests for days whose files are new or changed, the next cursor, and notes on files
    that are not requested (given up after ``MAX_ATTEMPTS`` failed runs).

    The cursor has ``ingested`` (file -> signature of its last successful run), ``inflight``
    (run key -> {file: signature}) and ``failed`` (file -> [signature, failed runs, last run
    key]). ``selection`` is the asset keys each request materializes."""
    if cursor is None:  # first tick: what is there already is history, a backfill's job
        return [], {"ingested": dict(current), "inflight": {}, "failed": {}, "attempt": 0}, []
    ingested, inflight = dict(cursor["ingested"]), dict(cursor["inflight"])
    failed, attempt = dict(cursor.get("failed", {})), cursor.get("attempt", 0)
    for run_key, files in list(inflight.items()):
        status = _run_status(instance, run_key)
        if status in DONE:
            ingested.update(files)
            for name in files:
                failed.pop(name, None)
            del inflight[run_key]
        elif status in GAVE_UP:
            for name, sig in files.items():
                count = failed[name][1] if name in failed and failed[name][0] == sig else 0
                failed[name] = [sig, count + 1, run_key]
            del inflight[run_key]
    waiting = {name: sig for files in inflight.values() for name, sig in files.items()}
    changed, notes = {}, []
    for name, sig in current.items():
        if ingested.get(name) == sig or waiting.get(name) == sig:
            continue
        if name in failed and failed[name][0] == sig and failed[name][1] >= MAX_ATTEMPTS:
            notes.append(f"{name}: {failed[name][1]} failed runs (last: {failed[name][2]}); waiting for it to "
                         "be delivered again (or re-execute the run from the UI)")
            continue
        changed[name] = sig
    requests = []
    for start, end in contiguous_ranges([Path(name).stem for name in changed]):
        files = {n: sig for n, sig in sorted(changed.items()) if start <= Path(n).stem <= end}
        attempt += 1
        run_key = f"landing:{start}..{end}:{attempt}"
        inflight[run_key] = files
        requests.append(RunRequest(
            run_key=run_key,
            asset_selection=selection,
            tags={RANGE_START_TAG: start, RANGE_END_TAG: end, keys.TRIGGER_TAG: "landing"},
        ))
    return requests, {"ingested": ingested, "inflight": inflight, "failed": failed, "attempt": attempt}, notes


def landed_selection(asset_graph, has_champion: bool) -> list:
    """The asset keys a landed day's run materializes: every daily asset, without what needs a
    champion while there is none."""
    selection = DAILY_ASSETS if has_champion else DAILY_ASSETS - NEEDS_CHAMPION
    return sorted(selection.resolve(asset_graph), key=lambda key: key.to_user_string())


def landing_sensor(settings: Settings):
    """The sensor over the landing zone of these settings."""

    @sensor(
        name="landing_sensor",
        asset_selection=DAILY_ASSETS,
        minimum_interval_seconds=settings.landing_sensor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Starts one run for a day whose landing file appears or changes (contiguous days: one ranged "
        "run), through every daily asset: raw tables, dbt's daily models and features, and, once there is a "
        f"champion, its predictions and the day's monitoring. A failed day is requested again at most {MAX_ATTEMPTS} "
        "times for the same file. Every MLPLATFORM_LANDING_SENSOR_INTERVAL_SECONDS (15).",
    )
    def _landing(context: SensorEvaluationContext):
        current = landing_signatures(settings.landing)
        previous = json.loads(context.cursor) if context.cursor else None
        has_champion = context.instance.get_latest_materialization_event(keys.CHAMPION_MODEL) is not None
        selection = landed_selection(context.repository_def.asset_graph, has_champion)
        requests, cursor, notes = landing_requests(context.instance, previous, current, selection)
        if previous is None:
            return SensorResult(skip_reason=SkipReason(f"first tick: recorded {len(current)} landed files"),
                                cursor=json.dumps(cursor))
        if not requests:
            waiting = len(cursor["inflight"])
            return SensorResult(skip_reason=SkipReason(
                "no new or changed landing files" + (f"; {waiting} run(s) not finished" if waiting else "")
                + "".join(f"; {note}" for note in notes[:5])), cursor=json.dumps(cursor))
        return SensorResult(run_requests=requests, cursor=json.dumps(cursor))

    return _landing
