"""``mlplatform cluster start|stop|status|env``: the distributed profile (issue 18) on this machine.

Every component is a process of its own that could run on another host, each with its log
``$MLPLATFORM_HOME/logs/<name>.log``, all on loopback:

==================  ===========================================================  =================
component           what it is                                                    default port
==================  ===========================================================  =================
postgres            PostgreSQL 15, a cluster under ``$HOME/postgres``: Dagster's   5433
                    storage (db ``dagster``), MLflow's (``mlflow``), the DuckLake
                    catalog (``lake``); scram-sha-256 passwords, no ``trust``
redis               Redis 7: the Celery broker and results (db 1, 2) and the       6381
                    event stream (db 0); one ACL user, ``default`` off
mlflow              ``mlflow server`` behind its basic-auth app, PostgreSQL        5001
                    backend, artifacts proxied (``mlflow-artifacts:/``)
worker-1..N         Celery workers (``dagster-celery``): they execute the steps    -
code-server         ``dagster code-server start``: the code location, loaded once  4001
                    for the daemon and the webserver (``workspace.yaml`` of the
                    cluster's home); it starts the runs (the default run launcher)
dagster-daemon      schedules, sensors, the run queue (at most ``MAX_RUNS`` runs)  -
dagster-webserver   the UI, on loopback only (Dagster OSS has no login: put an     3001
                    authenticating proxy in front of it to open it further)
==================  ===========================================================  =================

The warehouse is a DuckLake (``mlplatform.lake``): its catalog in PostgreSQL, its data files
under ``$HOME/lake/data`` (a shared directory; an object store in a real deployment).

Credentials come from the environment, never from a file: ``PGPASSWORD`` (PostgreSQL's own
variable, which libpq, dagster-postgres, MLflow and DuckDB's postgres extension read),
``MLPLATFORM_REDIS_PASSWORD`` and ``MLFLOW_TRACKING_PASSWORD`` (MLflow's own client variable; the
server's admin user is created with it on the first start). What is written under the home
holds none of them: Redis' ACL file has the password's SHA-256, MLflow's auth database a salted
hash. ``mlplatform cluster env`` prints the variables a shell needs to use the cluster
(``eval "$(mlplatform cluster env)"``), URLs with the Redis password among them.

``start`` prepares what is missing (the PostgreSQL cluster and its databases, the DuckLake, the
Dagster instance, the dbt manifest), starts a supervisor (``services.Launcher``: every component
in a process group of its own, all stopped together) in the background and returns when every
component answers; ``stop`` stops the supervisor, which stops the rest.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import quote

from mlplatform.services import Launcher, Service, answers, process_stat
from mlplatform.settings import REPO_ROOT

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "mlplatform"  # the PostgreSQL role, the Redis ACL user and the MLflow admin
DATABASES = ("dagster", "mlflow", "lake")
MAX_RUNS = 4  # runs at once (the queued run coordinator's limit)
START_TIMEOUT_SECONDS = 180.0
HOME_VARIABLE = "MLPLATFORM_CLUSTER_HOME"
SECRETS = {
    "PGPASSWORD": "PostgreSQL's password for the role mlplatform",
    "MLPLATFORM_REDIS_PASSWORD": "Redis' password for the ACL user mlplatform",
    "MLFLOW_TRACKING_PASSWORD": "the MLflow server's password for the user mlplatform",
}


@dataclass(frozen=True)
class Cluster:
    home: Path
    host: str = "127.0.0.1"
    pg_port: int = 5433
    redis_port: int = 6381
    mlflow_port: int = 5001
    ui_port: int = 3001
    code_port: int = 4001
    workers: int = 2

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Cluster":
        """The cluster's home is MLPLATFORM_CLUSTER_HOME, by default ``cluster/`` in the embedded
        profile's home: the two never share a file."""
        env = os.environ if env is None else env
        home = Path(env.get(HOME_VARIABLE) or
                    Path(env.get("MLPLATFORM_HOME") or REPO_ROOT / ".mlplatform") / "cluster").resolve()

        def number(name: str, default: int) -> int:
            text = env.get(name)
            try:
                return int(text) if text else default
            except ValueError:
                raise SystemExit(f"{name}={text!r}: not a number") from None

        return cls(home=home, host=env.get("MLPLATFORM_CLUSTER_HOST") or "127.0.0.1",
                   pg_port=number("MLPLATFORM_CLUSTER_PG_PORT", 5433),
                   redis_port=number("MLPLATFORM_CLUSTER_REDIS_PORT", 6381),
                   mlflow_port=number("MLPLATFORM_CLUSTER_MLFLOW_PORT", 5001),
                   ui_port=number("MLPLATFORM_CLUSTER_UI_PORT", 3001),
                   code_port=number("MLPLATFORM_CLUSTER_CODE_PORT", 4001),
                   workers=number("MLPLATFORM_CLUSTER_WORKERS", 2))

    @property
    def pg_root(self) -> Path:
        return self.home / "postgres"

    @property
    def pidfile(self) -> Path:
        return self.home / "cluster.pid"

    @property
    def workspace(self) -> Path:
        """The daemon's and the webserver's workspace: the code server (written by ``prepare``)."""
        return self.home / "workspace.yaml"

    @property
    def redis_acl(self) -> Path:
        return self.home / "redis-cluster" / "users.acl"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow-cluster"

    def redis_url(self, db: int, password: str) -> str:
        return f"redis://{USER}:{quote(password, safe='')}@{self.host}:{self.redis_port}/{db}"

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The variables every component (and a shell using the cluster) needs, derived from the
        ports and the secrets in ``env``."""
        missing = [f"{name} ({meaning})" for name, meaning in SECRETS.items() if not env.get(name)]
        if missing:
            raise SystemExit("the distributed profile takes its credentials from the environment; set "
                             + ", ".join(missing) + " (e.g. `export PGPASSWORD=$(openssl rand -hex 16)`)")
        redis_password = env["MLPLATFORM_REDIS_PASSWORD"]
        return {
            HOME_VARIABLE: str(self.home),
            "MLPLATFORM_HOME": str(self.home),
            "DAGSTER_HOME": str(self.home / "dagster-cluster"),
            "MLPLATFORM_DAGSTER_PG_URL": f"postgresql+psycopg2://{USER}@{self.host}:{self.pg_port}/dagster",
            "MLPLATFORM_LAKE_CATALOG": f"postgres:dbname=lake host={self.host} port={self.pg_port} user={USER}",
            "MLPLATFORM_LAKE_DATA_PATH": str(self.home / "lake" / "data"),
            "MLPLATFORM_MLFLOW_URI": f"http://{self.host}:{self.mlflow_port}",
            "MLPLATFORM_MLFLOW_ARTIFACTS": "mlflow-artifacts:/",
            "MLFLOW_TRACKING_USERNAME": USER,
            "MLPLATFORM_REDIS_URL": self.redis_url(0, redis_password),
            "MLPLATFORM_CELERY_BROKER": self.redis_url(1, redis_password),
            "MLPLATFORM_CELERY_BACKEND": self.redis_url(2, redis_password),
        }


WORKSPACE_YAML = """\
# Written by `mlplatform cluster start` at every start: the code server of the cluster.
load_from:
  - grpc_server:
      host: {host}
      port: {port}
      location_name: {location}
"""

DAGSTER_CLUSTER_YAML = """\
# Written by `mlplatform cluster start` when absent (the distributed profile); edit freely.
# Storage on PostgreSQL (the password from PGPASSWORD); runs queued, at most {max_runs} at once;
# the steps run on Celery workers (the executor, definitions.executor_of). The warehouse is a
# DuckLake: its writers need no pool (a conflicting commit is tried again), so none is limited.
storage:
  postgres:
    postgres_url:
      env: MLPLATFORM_DAGSTER_PG_URL
concurrency:
  runs:
    max_concurrent_runs: {max_runs}
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 30
"""


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: as root, its commands run as the user postgres."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _pg_run(*args) -> None:
    result = subprocess.run([*_as_postgres(), *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{Path(str(args[0])).name} failed: {result.stderr.strip() or result.stdout.strip()}")


def postgres_argv(cluster: Cluster) -> list[str]:
    return [*_as_postgres(), str(PG_BIN / "postgres"), "-D", str(cluster.pg_root / "data"), "-p", str(cluster.pg_port),
            "-k", str(cluster.pg_root), "-c", f"listen_addresses={cluster.host}"]


def init_postgres(cluster: Cluster, env: Mapping[str, str]) -> bool:
    """initdb with scram-sha-256 for every connection, the role ``mlplatform`` with PGPASSWORD,
    the databases, the DuckLake (once: False when the cluster existed)."""
    data = cluster.pg_root / "data"
    if (data / "PG_VERSION").exists():
        return False
    if not (PG_BIN / "postgres").exists():
        raise SystemExit("PostgreSQL 15 is not installed: `make system-deps` (.ci/system-deps) installs it")
    cluster.pg_root.mkdir(parents=True, exist_ok=True)
    cluster.pg_root.chmod(0o700)
    pwfile = cluster.pg_root / "initdb.pw"
    pwfile.write_text(env["PGPASSWORD"])
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        for path in (cluster.pg_root, pwfile):
            shutil.chown(path, "postgres", "postgres")
    try:
        _pg_run(PG_BIN / "initdb", "-D", data, "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                "-E", "UTF8", "--no-locale")
    finally:
        pwfile.unlink(missing_ok=True)
    _pg_run(PG_BIN / "pg_ctl", "-D", data, "-l", cluster.pg_root / "init.log", "-w", "-t", "60", "-o",
            f"-p {cluster.pg_port} -k {cluster.pg_root} -c listen_addresses={cluster.host}", "start")
    try:
        import psycopg2

        conn = psycopg2.connect(host=cluster.host, port=cluster.pg_port, user=USER, dbname="postgres",
                                password=env["PGPASSWORD"])
        conn.autocommit = True
        with conn.cursor() as cursor:
            for database in DATABASES:
                cursor.execute(f"CREATE DATABASE {database}")
        conn.close()
        derived = cluster.env(env)
        from mlplatform.lake import create_lake

        create_lake(derived["MLPLATFORM_LAKE_CATALOG"], Path(derived["MLPLATFORM_LAKE_DATA_PATH"]))
    finally:
        _pg_run(PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    return True


def write_redis_acl(cluster: Cluster, password: str) -> None:
    """The ACL file: ``default`` off, ``mlplatform`` by its password's SHA-256 (not the password)."""
    cluster.redis_acl.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(password.encode()).hexdigest()
    cluster.redis_acl.write_text(f"user default off\nuser {USER} on #{digest} ~* &* +@all\n")
    cluster.redis_acl.chmod(0o600)


def write_mlflow_auth(cluster: Cluster) -> None:
    """The basic-auth app's configuration: its users in a SQLite file under the home; the admin
    (``mlplatform``) is created from MLFLOW_AUTH_ADMIN_* on the first start."""
    directory = cluster.mlflow_dir
    (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    (directory / "basic_auth.ini").write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{directory / 'basic_auth.db'}\n"
                   f"admin_username = {USER}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "grant_default_workspace_access = false\n")


def code_location() -> tuple[str, str]:
    """(module, location name) of the code location, as the repository's ``workspace.yaml`` names them."""
    import yaml

    entry = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    return entry["module_name"], entry["location_name"]


def services(cluster: Cluster, env: Mapping[str, str]) -> list[Service]:
    """The components, as the supervisor starts them (the files they read: ``prepare``)."""
    from mlplatform.stream.server import server_argv

    scripts = Path(sys.executable).parent
    derived = cluster.env(env)
    redis_argv = [*server_argv(cluster.redis_acl.parent, cluster.redis_port, cluster.host),
                  "--aclfile", str(cluster.redis_acl)]
    mlflow_dir = cluster.mlflow_dir
    found = [
        Service("postgres", postgres_argv(cluster), f"postgresql://{cluster.host}:{cluster.pg_port}", ready_first=True,
                restart=True),
        Service("redis", redis_argv, derived["MLPLATFORM_REDIS_URL"], ready_first=True, shown=f"redis://{cluster.host}:{cluster.redis_port}"),
        Service("mlflow", [
            str(scripts / "mlflow"), "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"postgresql+psycopg2://{USER}@{cluster.host}:{cluster.pg_port}/mlflow",
            "--artifacts-destination", (mlflow_dir / "artifacts").as_uri(),
            "--host", cluster.host, "--port", str(cluster.mlflow_port), "--workers", "1",
        ], f"http://{cluster.host}:{cluster.mlflow_port}/health", env=(
            ("MLFLOW_AUTH_CONFIG_PATH", str(mlflow_dir / "basic_auth.ini")),
            ("MLFLOW_AUTH_ADMIN_USERNAME", USER),
            ("MLFLOW_AUTH_ADMIN_PASSWORD", env["MLFLOW_TRACKING_PASSWORD"]),
            # the session/CSRF key of the server's forms: new at each start (one server process)
            ("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32)),
            ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        ), ready_first=True),
    ]
    for i in range(1, cluster.workers + 1):
        found.append(Service(f"worker-{i}", [
            str(scripts / "celery"), "--app", "mlplatform.celery_app", "worker", "--queues", "dagster",
            "--hostname", f"worker-{i}@%h", "--concurrency", "1", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle",
        ], None, restart=True))
    module, location = code_location()
    found += [
        # one code server for the daemon and the webserver (Dagster's deployment): each would
        # otherwise start its own, and the daemon a new one every minute
        Service("code-server", [
            str(scripts / "dagster"), "code-server", "start", "--module-name", module,
            "--location-name", location, "--host", cluster.host, "--port", str(cluster.code_port),
        ], f"grpc://{cluster.host}:{cluster.code_port}", ready_first=True, restart=True),
        Service("dagster-daemon", [str(scripts / "dagster-daemon"), "run", "-w", str(cluster.workspace)], None),
        Service("dagster-webserver", [str(scripts / "dagster-webserver"), "-w", str(cluster.workspace),
                                      "--host", cluster.host, "--port", str(cluster.ui_port)],
                f"http://{cluster.host}:{cluster.ui_port}/server_info"),
    ]
    return found


def prepare(cluster: Cluster, env: Mapping[str, str]) -> dict[str, str]:
    """Everything the components need before they start (idempotent); returns their environment."""
    from mlplatform.home import init_home
    from mlplatform.settings import Settings
    from mlplatform.transform.assets import dbt_project, ensure_manifest

    full = {**env, **cluster.env(env)}
    init_postgres(cluster, full)
    write_redis_acl(cluster, full["MLPLATFORM_REDIS_PASSWORD"])  # (the password may have changed)
    write_mlflow_auth(cluster)
    settings = Settings.from_env(full)
    dagster_yaml = settings.dagster_home / "dagster.yaml"
    if not dagster_yaml.exists():
        dagster_yaml.parent.mkdir(parents=True, exist_ok=True)
        dagster_yaml.write_text(DAGSTER_CLUSTER_YAML.format(max_runs=MAX_RUNS))
    init_home(settings, pools=False)
    cluster.workspace.write_text(WORKSPACE_YAML.format(host=cluster.host, port=cluster.code_port,
                                                       location=code_location()[1]))
    (cluster.home / "logs").mkdir(parents=True, exist_ok=True)
    ensure_manifest(dbt_project(settings), settings)
    return full


def running_pid(cluster: Cluster) -> int | None:
    """The supervisor's pid when it is running (the pidfile's pid with the same start time)."""
    try:
        pid, start = map(int, cluster.pidfile.read_text().split())
    except (OSError, ValueError):
        return None
    stat = process_stat(pid)
    return pid if stat is not None and stat[3] == start and stat[2] != "Z" else None


def start(cluster: Cluster, env: Mapping[str, str], out=sys.stdout) -> int:
    if (pid := running_pid(cluster)) is not None:
        print(f"the cluster is running already (pid {pid}): `mlplatform cluster stop`", file=out)
        return 1
    full = prepare(cluster, env)
    log = cluster.home / "logs" / "cluster.log"
    with log.open("a") as handle:
        supervisor = subprocess.Popen([sys.executable, "-m", "mlplatform.cluster", "supervise"], cwd=REPO_ROOT,
                                      env=full, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    cluster.pidfile.write_text(f"{supervisor.pid} {process_stat(supervisor.pid)[3]}\n")
    entries = services(cluster, full)
    waiting = {s.name: s.url for s in entries if s.url}
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while waiting and time.monotonic() < deadline and supervisor.poll() is None:
        for name, url in list(waiting.items()):
            if answers(url):
                del waiting[name]
        time.sleep(0.5)
    if supervisor.poll() is not None or waiting:
        why = "exited" if supervisor.poll() is not None else f"no answer from {', '.join(waiting)}"
        print(f"the cluster did not start ({why}); its log: {log}\n" + _tail(log), file=out)
        stop(cluster, out=open(os.devnull, "w"))
        return 1
    print(f"the cluster is up (supervisor pid {supervisor.pid}, logs in {cluster.home / 'logs'}):\n"
          f"  Dagster UI     http://{cluster.host}:{cluster.ui_port}\n"
          f"  MLflow         http://{cluster.host}:{cluster.mlflow_port} (user {USER})\n"
          f"  PostgreSQL     {cluster.host}:{cluster.pg_port} (role {USER})\n"
          f"  Redis          {cluster.host}:{cluster.redis_port} (user {USER})\n"
          f"  Celery workers {cluster.workers}\n"
          f"  code server    {cluster.host}:{cluster.code_port} (the daemon's and the UI's code location)\n"
          "use it from a shell: eval \"$(mlplatform cluster env)\"", file=out)
    return 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(cluster: Cluster, out=sys.stdout, timeout: float = 60.0) -> int:
    pid = running_pid(cluster)
    if pid is None:
        print("the cluster is not running", file=out)
        cluster.pidfile.unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)  # the supervisor stops every component (services.Launcher.stop)
    deadline = time.monotonic() + timeout
    while running_pid(cluster) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    if running_pid(cluster) is not None:
        os.killpg(pid, signal.SIGKILL)
        print(f"the supervisor did not stop within {timeout:.0f} s: killed its group", file=out)
    cluster.pidfile.unlink(missing_ok=True)
    print("the cluster is stopped", file=out)
    return 0


def supervise() -> int:
    cluster = Cluster.from_env()
    return Launcher(services(cluster, os.environ), cluster.home / "logs", label="mlplatform cluster").run()


def graphql(cluster: Cluster, query: str, variables: dict | None = None) -> dict:
    """A query to the cluster's webserver (Dagster's GraphQL API: what the UI itself sends)."""
    import httpx

    answer = httpx.post(f"http://{cluster.host}:{cluster.ui_port}/graphql", timeout=60,
                        json={"query": query, "variables": variables or {}}).json()
    if answer.get("errors"):
        raise RuntimeError(f"the webserver refused the query: {answer['errors']}")
    return answer["data"]


def launch_backfill(cluster: Cluster, first, last) -> str:
    """A backfill of daily_job's assets over the days first..last, as the UI's "Materialize" launches
    it; returns its id. By asset, each over exactly these days (a selection with partition names
    would also take in the later days the features' 28-day lookback maps them to). A run per week
    in this profile (``partitions.week_runs``)."""
    from mlplatform.definitions import DAILY_JOB, build_defs
    from mlplatform.settings import Settings

    keys = sorted(build_defs(Settings.from_env({**os.environ, **cluster.env(os.environ)}))
                  .resolve_job_def(DAILY_JOB).asset_layer.selected_asset_keys)
    params = {"partitionsByAssets": [{"assetKey": {"path": key.path},
                                      "partitions": {"range": {"start": str(first), "end": str(last)}}} for key in keys]}
    launched = graphql(cluster, """mutation($params: LaunchBackfillParams!) {
        launchPartitionBackfill(backfillParams: $params) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
                       {"params": params})["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"the backfill was not launched: {launched}")
    return launched["backfillId"]


def wait_for_backfill(cluster: Cluster, backfill_id: str, timeout: float = 3600.0, poll: float = 2.0) -> str:
    """The backfill's status once it is no longer REQUESTED (COMPLETED_SUCCESS, COMPLETED_FAILED, ...)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = graphql(cluster, """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
            __typename ... on PartitionBackfill { status } } }""", {"id": backfill_id})["partitionBackfillOrError"]
        if status.get("status") not in (None, "REQUESTED"):
            return status["status"]
        time.sleep(poll)
    raise TimeoutError(f"backfill {backfill_id} still running after {timeout:.0f} s")


def print_env(cluster: Cluster, env: Mapping[str, str], out=sys.stdout) -> int:
    for name, value in cluster.env(env).items():
        print(f"export {name}={shlex.quote(value)}", file=out)
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["supervise"]:
    sys.exit(supervise())
