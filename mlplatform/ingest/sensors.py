"""The landing zone's sensor.

``landing_sensor``: a new or changed daily file (name, size, mtime) starts ingestion of its
day; contiguous changed days become one ranged run. A file counts as ingested when its run
succeeds; a failed or cancelled run's files are requested again (new run key), and a file
whose run is still going is not requested twice. On its first tick it records what is
already there without launching (history is a backfill's job).
Everything downstream of the raw assets follows by declarative automation.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from dagster import (
    AssetKey,
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

from mlplatform.ingest.contracts import DAILY
from mlplatform.ingest.landing import landed_days
from mlplatform.partitions import FIRST_DAY, LAST_DAY, RANGE_END_TAG, RANGE_START_TAG
from mlplatform.settings import Settings

RAW_DAILY = AssetSelection.assets("raw_flights", "raw_weather")

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


RUN_KEY_TAG = "dagster/run_key"
DONE = (DagsterRunStatus.SUCCESS,)
GAVE_UP = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


def _run_status(instance, run_key: str):
    runs = instance.get_runs(RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    return runs[0].status if runs else None


def landing_requests(instance, cursor: dict | None, current: dict[str, str]) -> tuple[list[RunRequest], dict]:
    """Run requests for days whose files are new or changed, and the next cursor.

    The cursor has ``ingested`` (file -> signature of its last successful ingestion) and
    ``inflight`` (run key -> {file: signature}). A file counts as ingested only when its run
    succeeds; when the run fails or is cancelled its files are requested again, under a new run
    key, so nothing is lost and no file starts two runs at once."""
    if cursor is None:  # first tick: what is there already is history, a backfill's job
        return [], {"ingested": dict(current), "inflight": {}, "attempt": 0}
    ingested, inflight, attempt = dict(cursor["ingested"]), dict(cursor["inflight"]), cursor.get("attempt", 0)
    for run_key, files in list(inflight.items()):
        status = _run_status(instance, run_key)
        if status in DONE:
            ingested.update(files)
            del inflight[run_key]
        elif status in GAVE_UP:
            del inflight[run_key]
    waiting = {name: sig for files in inflight.values() for name, sig in files.items()}
    changed = {
        name: sig for name, sig in current.items() if ingested.get(name) != sig and waiting.get(name) != sig
    }
    requests = []
    for start, end in contiguous_ranges([Path(name).stem for name in changed]):
        files = {n: sig for n, sig in sorted(changed.items()) if start <= Path(n).stem <= end}
        attempt += 1
        run_key = f"landing:{start}..{end}:{attempt}"
        inflight[run_key] = files
        requests.append(RunRequest(
            run_key=run_key,
            asset_selection=[AssetKey("raw_flights"), AssetKey("raw_weather")],
            tags={RANGE_START_TAG: start, RANGE_END_TAG: end, "mlplatform/trigger": "landing"},
        ))
    return requests, {"ingested": ingested, "inflight": inflight, "attempt": attempt}


@sensor(
    name="landing_sensor",
    asset_selection=RAW_DAILY,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Starts ingestion of a day when its landing file appears or changes.",
)
def landing_sensor(context: SensorEvaluationContext):
    current = landing_signatures(Settings.from_env().landing)
    previous = json.loads(context.cursor) if context.cursor else None
    requests, cursor = landing_requests(context.instance, previous, current)
    if previous is None:
        return SensorResult(skip_reason=SkipReason(f"first tick: recorded {len(current)} landed files"),
                            cursor=json.dumps(cursor))
    if not requests:
        waiting = len(cursor["inflight"])
        return SensorResult(skip_reason=SkipReason(
            f"no new or changed landing files{f'; {waiting} ingestion run(s) not finished' if waiting else ''}"),
            cursor=json.dumps(cursor))
    return SensorResult(run_requests=requests, cursor=json.dumps(cursor))
