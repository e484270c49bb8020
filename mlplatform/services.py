"""``mlplatform ui`` (``make ui``): start the platform's servers, stop all of them on Ctrl-C.

Each service is one entry of ``services()`` (a redis-server or Prometheus would be one more):
a command, the URL it answers on, its log ``$MLPLATFORM_HOME/logs/<name>.log``. The launcher
starts every service in a process group of its own and stays their parent; it is also the
*child subreaper* (Linux) of what they start, so no descendant escapes to init. On SIGINT or
SIGTERM it sends that signal to each group, waits up to ``STOP_GRACE_SECONDS`` for every
process it saw to end, then SIGKILLs what is left, so after Ctrl-C nothing it started is
running within ~``STOP_GRACE_SECONDS`` + 1 s. When one service exits by itself, the others are
stopped the same way and the launcher exits with its code.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from mlplatform.settings import REPO_ROOT, Settings

STOP_GRACE_SECONDS = 10.0  # after the forwarded signal, before SIGKILL
MAX_RESTARTS = 5  # of one service, before the launcher gives up and stops the others
POLL_SECONDS = 0.5
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    url: str | None  # what answers when it is up (None: nothing to ask, e.g. a worker)
    echo: bool = False  # also copy its output to the launcher's stdout (the terminal)
    env: tuple[tuple[str, str], ...] = ()  # set for this service only
    ready_first: bool = False  # the services after it start once it answers (a database, a broker)
    shown: str | None = None  # the URL as printed, when ``url`` holds a password
    restart: bool = False  # started again when it exits (a worker, a database), at most MAX_RESTARTS times

    @property
    def address(self) -> str:
        return self.shown or self.url or "-"


def services(settings: Settings, host: str, port: int) -> list[Service]:
    """The Dagster UI, the MLflow UI on ``settings.mlflow_ui_url`` over the platform's own
    MLflow store (none when MLPLATFORM_MLFLOW_URI is a tracking server: that is the UI), the
    platform's own broker (none when MLPLATFORM_REDIS_URL points elsewhere, or one answers), the
    serving API, and Prometheus with its Alertmanager and the platform's exporter."""
    from mlplatform.stream.server import broker_answers

    scripts = Path(sys.executable).parent
    found = []
    broker = broker_service(settings)
    if broker is not None and not broker_answers(settings.redis_url):
        found.append(broker)  # first: the stream sensor looks for it
    found += [Service(
        "dagster", [str(scripts / "dagster"), "dev", "-w", "workspace.yaml", "--host", host, "--port", str(port)],
        f"http://{host}:{port}", echo=True,
        # the instance of these settings (without DAGSTER_HOME `dagster dev` would use a temporary one)
        env=(("DAGSTER_HOME", str(settings.dagster_home)),),
    )]
    if not settings.mlflow_uri.startswith(("http://", "https://")):
        ui = urlsplit(settings.mlflow_ui_url)
        if ui.hostname is None or ui.port is None:
            raise SystemExit(f"MLPLATFORM_MLFLOW_UI_URL={settings.mlflow_ui_url!r}: give a host and a port, "
                             "e.g. http://127.0.0.1:5000")
        found.append(Service("mlflow", [
            str(scripts / "mlflow"), "server", "--backend-store-uri", settings.mlflow_uri,
            "--default-artifact-root", artifact_root_uri(settings.mlflow_artifacts),
            "--host", ui.hostname, "--port", str(ui.port), "--workers", "1",
        ], settings.mlflow_ui_url,
            # the server's job runner (7 huey consumers, ~1 GB) serves GenAI features the platform has none of
            env=(("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),)))
    # the serving API (not ready until there is a champion: it looks every refresh), and what
    # watches the platform: the exporter, Alertmanager, Prometheus (mlplatform/operating/prometheus.py)
    from mlplatform.operating.prometheus import monitoring_services

    found.append(Service("serving", [str(scripts / "mlplatform"), "serve"],
                         f"http://{settings.serve_host}:{settings.serve_port}/health"))
    found += [Service(name, argv, url) for name, argv, url in monitoring_services(settings)]
    return found


def broker_service(settings: Settings) -> Service | None:
    """The platform's own broker (a redis-server, its data under MLPLATFORM_HOME/redis), or None
    when MLPLATFORM_REDIS_URL points elsewhere."""
    from mlplatform.stream.server import own_broker, server_argv

    own = own_broker(settings)
    if own is None:
        return None
    return Service("redis", server_argv(settings.home / "redis", own[1], own[0]), settings.redis_url)


def artifact_root_uri(location: Path) -> str:
    """The artifact root as the MLflow server wants it: a URI (a path becomes file://)."""
    text = str(location)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", text):
        return text
    location.mkdir(parents=True, exist_ok=True)
    return location.resolve().as_uri()


def prepare(settings: Settings) -> None:
    """What the services need on disk before they start: the MLflow store's folder, the logs,
    Prometheus' and Alertmanager's configuration."""
    from mlplatform.operating.prometheus import write_configs

    if settings.mlflow_uri.startswith("sqlite:///"):
        store = Path(settings.mlflow_uri.removeprefix("sqlite:///"))
        store.parent.mkdir(parents=True, exist_ok=True)
        if not store.exists():
            # made here, once: the MLflow UI, the serving API and the exporter each open the store at
            # start, and on a new home each would create its tables at the same moment (one then
            # fails, "table ... already exists", and the launcher stops everything)
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri).search_experiments(
                max_results=1)
    (settings.home / "logs").mkdir(parents=True, exist_ok=True)
    write_configs(settings)


# --- processes, read from /proc (Linux); elsewhere only the process groups are known ---

def process_stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, pgid, state, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[2]), fields[0], int(fields[19])


def _processes() -> dict[int, tuple[int, int, str, int]]:
    found = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and (stat := process_stat(int(entry))) is not None:
            found[int(entry)] = stat
    return found


def descendants(root: int, groups: set[int]) -> dict[int, int]:
    """{pid: start time} of every living process below ``root`` or in one of ``groups``."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][3]
                todo.append(child)
    found.update({pid: stat[3] for pid, stat in table.items() if stat[1] in groups and pid != root})
    return {pid: start for pid, start in found.items() if table[pid][2] != "Z"}


def alive(recorded: dict[int, int]) -> dict[int, int]:
    """The recorded processes still running (same pid and start time, not a zombie)."""
    living = {}
    for pid, start in recorded.items():
        stat = process_stat(pid)
        if stat is not None and stat[3] == start and stat[2] != "Z":
            living[pid] = start
    return living


def become_subreaper() -> None:
    """Orphans among our descendants become our children, not init's (Linux; else a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap(own: set[int]) -> None:
    """Collect the exit status of adopted orphans (never of our own Popen children)."""
    for pid, (ppid, _, state, _) in _processes().items():
        if ppid == os.getpid() and pid not in own and state == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120].strip()
    except OSError:
        return "?"


def _tee(source, log: TextIO, out: TextIO) -> None:
    for line in iter(source.readline, ""):
        log.write(line)
        log.flush()
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):
            pass


def answers(url: str) -> bool:
    """Whether the service at ``url`` answers (http(s), redis, grpc, or postgresql: the server asks
    for a password, or lets the connection in)."""
    if url.startswith("postgresql://"):
        import psycopg2

        parts = urlsplit(url)
        try:
            psycopg2.connect(host=parts.hostname, port=parts.port, dbname="postgres", user="-",
                             password="-", connect_timeout=1).close()
            return True
        except psycopg2.OperationalError as exc:
            return "authentication" in str(exc) or "does not exist" in str(exc)
    if url.startswith("grpc://"):  # a Dagster code server: the standard gRPC health service says SERVING
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(url.removeprefix("grpc://")) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                   timeout=POLL_SECONDS)
            except grpc.RpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING
    if url.startswith("redis://"):
        from mlplatform.stream.server import broker_answers

        return broker_answers(url)
    try:
        with urllib.request.urlopen(url, timeout=POLL_SECONDS):
            return True
    except urllib.error.HTTPError:  # it answered: not ready, or not without a password, but up
        return True
    except OSError:
        return False


class Launcher:
    def __init__(self, entries: list[Service], log_dir: Path, out: TextIO = sys.stdout,
                 grace: float = STOP_GRACE_SECONDS, label: str = "mlplatform ui"):
        self.entries, self.log_dir, self.out, self.grace, self.label = entries, log_dir, out, grace, label
        self.started: list[tuple[Service, subprocess.Popen]] = []
        self.recorded: dict[int, int] = {}
        self.signal: int | None = None
        self.restarts: dict[str, int] = {}

    def say(self, text: str) -> None:
        print(f"[{self.label}] {text}", file=self.out, flush=True)

    def start(self, service: Service) -> None:
        log_path = self.log_dir / f"{service.name}.log"
        log = log_path.open("a", buffering=1)
        log.write(f"--- {dt.datetime.now().isoformat(timespec='seconds')} {' '.join(service.argv)}\n")
        process = subprocess.Popen(
            service.argv, cwd=REPO_ROOT, env={**os.environ, **dict(service.env)}, stdin=subprocess.DEVNULL,
            start_new_session=True,
            stdout=subprocess.PIPE if service.echo else log, stderr=subprocess.STDOUT, text=service.echo,
        )
        if service.echo:
            threading.Thread(target=_tee, args=(process.stdout, log, self.out), daemon=True).start()
        self.started.append((service, process))
        self.say(f"{service.name}: pid {process.pid}, {service.address}, log {log_path}")

    def wait_until_answers(self, service: Service, process: subprocess.Popen, timeout: float = 60.0) -> None:
        """Before the services that need it start: until it answers, exits, or a signal comes."""
        deadline = time.monotonic() + timeout
        while self.signal is None and process.poll() is None and time.monotonic() < deadline:
            if answers(service.url):
                self.say(f"{service.name} answers")
                return
            time.sleep(0.2)

    def record(self) -> None:
        self.recorded.update(descendants(os.getpid(), {p.pid for _, p in self.started}))

    def run(self) -> int:
        """Start every service, wait for a signal or for one of them to exit, stop them all."""
        def on_signal(signum, frame):
            if self.signal is None:
                self.signal = signum
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        become_subreaper()
        code, exited, waiting = 0, None, {}
        try:
            for service in self.entries:
                if self.signal is None:
                    self.start(service)
                    if service.ready_first:
                        self.wait_until_answers(service, self.started[-1][1])
            waiting = {service.name: service.url for service, _ in self.started if service.url}
            started_at = time.monotonic()
            while self.signal is None and exited is None:
                self.record()
                reap({p.pid for _, p in self.started})
                for index, (service, process) in enumerate(self.started):
                    if process.poll() is None:
                        continue
                    if service.restart and self.restarts.get(service.name, 0) < MAX_RESTARTS:
                        self.restarts[service.name] = self.restarts.get(service.name, 0) + 1
                        self.say(f"{service.name} exited with code {process.returncode}: starting it again")
                        del self.started[index]
                        self.start(service)
                        break
                    exited, code = service, process.returncode
                    break
                for name, url in list(waiting.items()):
                    if self.signal is None and answers(url):
                        self.say(f"{name} answers ({time.monotonic() - started_at:.0f} s)")
                        del waiting[name]
                time.sleep(POLL_SECONDS)
        finally:
            if exited is not None:
                self.say(f"{exited.name} exited with code {code}: stopping the others")
            self.stop(self.signal or signal.SIGTERM)
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.signal is not None:
            return 128 + self.signal  # as a shell reports a process ended by the signal
        return (code or 1) if exited is not None else 0

    def stop(self, signum: int) -> None:
        """``signum`` to each group, then SIGKILL to what is left after the grace period."""
        began = time.monotonic()
        self.record()
        groups = [p.pid for _, p in self.started]
        self.say(f"stopping {len(self.recorded)} process(es) in {len(groups)} group(s) "
                 f"with {signal.Signals(signum).name}")
        for group in groups:
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                pass
        own = set(groups)
        deadline = began + self.grace
        while time.monotonic() < deadline and (self._left() or any(p.poll() is None for _, p in self.started)):
            reap(own)
            time.sleep(0.1)
        left = self._left()
        if left or any(p.poll() is None for _, p in self.started):
            self.say(f"still running after {self.grace:.0f} s, SIGKILL: " + ", ".join(
                f"{pid} ({_name(pid)})" for pid in sorted(left)))
            for group in groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _, process in self.started:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        end = time.monotonic() + 2
        while self._left() and time.monotonic() < end:
            reap(own)
            time.sleep(0.05)
        reap(own)
        self.say(f"stopped in {time.monotonic() - began:.1f} s" +
                 (f"; still running: {sorted(self._left())}" if self._left() else ""))

    def _left(self) -> dict[int, int]:
        self.recorded.update(descendants(os.getpid(), {p.pid for _, p in self.started}))
        return alive(self.recorded)


def run_services(settings: Settings, host: str, port: int) -> int:
    prepare(settings)
    return Launcher(services(settings, host, port), settings.home / "logs").run()
