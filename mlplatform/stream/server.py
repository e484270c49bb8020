"""The platform's own broker: a redis-server on loopback, its data under ``MLPLATFORM_HOME``.

Debian's ``redis-server`` (7.x: Streams, consumer groups), installed by ``.ci/system-deps``. The
append-only file is fsynced every second (``appendfsync everysec``): a crash of the machine loses
at most the last second of published events, never one that was acknowledged after it was
written to the warehouse. ``make ui`` starts it with the other services (``services.py``);
``mlplatform run`` and ``mlplatform stream`` start one for as long as they need it when none
answers (``running_broker``). ``MLPLATFORM_REDIS_URL`` points at an external one instead.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from mlplatform.settings import REDIS_URL, Settings
from mlplatform.stream.broker import Broker


def redis_server() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if found is None:
        raise SystemExit("redis-server is not installed: `make test` installs it (.ci/system-deps), or "
                         "`apt-get install redis-server`, or point MLPLATFORM_REDIS_URL at a Redis 7")
    return found


def server_argv(data_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """A redis-server on ``host:port`` keeping its data and append-only file in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [redis_server(), "--bind", host, "--port", str(port), "--dir", str(data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
            "--daemonize", "no", "--logfile", ""]


def own_broker(settings: Settings) -> tuple[str, int] | None:
    """(host, port) of the broker the platform runs itself (the default URL), or None when
    MLPLATFORM_REDIS_URL points elsewhere."""
    url = urlsplit(settings.redis_url)
    default = urlsplit(REDIS_URL)
    if settings.redis_url != REDIS_URL and (url.hostname, url.port) != (default.hostname, default.port):
        return None
    return url.hostname, url.port


def wait_until_up(url: str, seconds: float = 20) -> None:
    broker = Broker(url)
    deadline = time.monotonic() + seconds
    try:
        while not broker.ping():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Redis answers at {url} after {seconds:.0f} s")
            time.sleep(0.1)
    finally:
        broker.close()


def broker_answers(url: str) -> bool:
    broker = Broker(url)
    try:
        return broker.ping()
    finally:
        broker.close()


@contextlib.contextmanager
def running_broker(settings: Settings):
    """The broker's URL: the one answering at MLPLATFORM_REDIS_URL, or the platform's own
    started for the block (and stopped after it, its data kept)."""
    up = broker_answers(settings.redis_url)
    own = own_broker(settings)
    if up or own is None:
        yield settings.redis_url
        return
    host, port = own
    log = (settings.home / "logs" / "redis.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        process = subprocess.Popen(server_argv(settings.home / "redis", port, host), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(settings.redis_url)
        yield settings.redis_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
