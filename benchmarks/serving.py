"""Serving benchmark: `mlplatform serve` (one uvicorn worker, loopback) under an open-loop load.

    python benchmarks/serving.py [--rate 200] [--seconds 30] [--out benchmarks/serving-results.json]

Needs an MLPLATFORM_HOME whose warehouse has features and whose registry has a champion (e.g.
after `make run`); `--build` makes one first (the whole year, about 5 minutes).

Open loop: request i is due at t0 + i/rate whatever happened to the earlier ones, and its
latency is counted from when it was due, so a stalled server shows up as queueing instead of
being hidden by a client that waits (no coordinated omission). Scenarios:

- scheduled: real flights of the published schedule, as a client sends them -> a lookup + trees;
- on_demand: the same flights with their scheduled arrival time given -> the feature SQL runs;
- batch: 100 flights per request, closed loop;
- streaming: the flights of one day while that day's departures are published again (new event
  ids, so each one moves the rt_ features of the flights after it) over the same seconds: the
  server follows the broker and recomputes the moved flights every second -> still lookups;
- rollout: the scheduled flights with a canary (10% of flights, sticky by flight id) and a shadow
  (every request scored again off the request path, written to the inference log): a second
  version of the champion's model, registered for the benchmark, under the aliases ``canary`` and
  ``shadow``, picked up by the running server without a restart;
- scheduled_traced: the scheduled flights again, against a server started with
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at ``OtlpReceiver`` (an OTLP/HTTP endpoint of ours on
  loopback): every request traced (FastAPI's span and the service's) and exported in batches;
- baseline: the same model in-process, no HTTP, no feature lookup (the floor the server adds to).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlplatform.settings import Settings  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_flights(settings: Settings, n: int, seed: int = 1) -> list[dict]:
    import duckdb

    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        rows = conn.execute(
            f"SELECT strftime(flight_date, '%Y-%m-%d'), carrier, flight_number, origin, dest, sched_dep_time, tailnum,"
            f" sched_arr_time FROM features.flight_features USING SAMPLE {int(n)} ROWS (reservoir, {int(seed)})"
        ).fetchall()
    keys = ["flight_date", "carrier", "flight_number", "origin", "dest", "sched_dep_time", "tailnum", "sched_arr_time"]
    out = []
    for row in rows:
        flight = dict(zip(keys, row))
        flight["_sched_arr_time"] = flight.pop("sched_arr_time")
        if flight["tailnum"] is None:
            flight.pop("tailnum")
        out.append(flight)
    return out


def open_loop(url: str, path: str, bodies: list[dict], rate: float, seconds: float, connections: int = 8) -> dict:
    """Send rate*seconds requests, request i due at t0 + i/rate; latency counted from the due time.

    One asyncio loop over ``connections`` keep-alive HTTP/1.1 connections, requests pre-encoded:
    a lean client, so that on a 2-core machine the load generator is not what is measured."""
    return asyncio.run(_open_loop(url, path, bodies, rate, seconds, connections))


async def _open_loop(url, path, bodies, rate, seconds, connections):
    host, port = url.removeprefix("http://").split(":")
    total = int(rate * seconds)
    payloads = []
    for body in bodies:
        data = json.dumps(body).encode()
        payloads.append(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )
    results: list[tuple[float, float, int] | None] = [None] * total
    next_index = iter(range(total))
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2

    async def connection():
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in next_index:
                due = t0 + i / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = loop.time()
                writer.write(payloads[i % len(payloads)])
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                done = loop.time()
                results[i] = (done - due, done - sent, int(status_line.split()[1]))
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = max(loop.time() - t0, 1e-9)
    latency = np.array([r[0] for r in results]) * 1000
    service = np.array([r[1] for r in results]) * 1000
    return {
        "requests": total,
        "target_rate": rate,
        "achieved_rate": round(total / elapsed, 1),
        "errors": sum(1 for r in results if r[2] != 200),
        "latency_ms": _percentiles(latency),
        "response_time_ms": _percentiles(service),
    }


def closed_loop(url: str, path: str, bodies: list[dict], seconds: float, concurrency: int) -> dict:
    import httpx

    stop = time.perf_counter() + seconds
    counts = [0] * concurrency
    times: list[list[float]] = [[] for _ in range(concurrency)]

    def work(k):
        with httpx.Client(base_url=url, timeout=30) as client:
            i = k
            while time.perf_counter() < stop:
                began = time.perf_counter()
                assert client.post(path, json=bodies[i % len(bodies)]).status_code == 200
                times[k].append(time.perf_counter() - began)
                counts[k] += 1
                i += concurrency

    threads = [threading.Thread(target=work, args=(k,)) for k in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return {"requests": sum(counts), "req_per_s": round(sum(counts) / elapsed, 1),
            "latency_ms": _percentiles(np.array([x for ts in times for x in ts]) * 1000)}


def baseline(settings: Settings, flights: list[dict], repeats: int = 500) -> dict:
    """The champion in-process on rows of the feature table: no HTTP, no lookup."""
    import duckdb
    import mlflow
    from mlflow import MlflowClient
    from mlflow import sklearn as mlflow_sklearn

    from mlplatform.training.model import model_input

    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_registry_uri(settings.mlflow_uri)
    version = MlflowClient(settings.mlflow_uri, settings.mlflow_uri).get_model_version_by_alias("flight_delay", "champion")
    estimator = mlflow_sklearn.load_model(f"models:/flight_delay/{version.version}")
    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        frame = conn.execute("SELECT * FROM features.flight_features USING SAMPLE 200 ROWS (reservoir, 1)").df()
    X = model_input(frame)
    encoded = np.asarray(estimator[:-1].transform(X), dtype=np.float64)
    pipeline, trees = [], []
    for i in range(repeats):
        began = time.perf_counter()
        estimator.predict_proba(X.iloc[[i % len(X)]])
        pipeline.append(time.perf_counter() - began)
        began = time.perf_counter()
        estimator[-1].predict_proba(encoded[[i % len(X)]])
        trees.append(time.perf_counter() - began)
    return {"model_version": str(version.version),
            "pipeline_predict_ms": _percentiles(np.array(pipeline) * 1000),
            "trees_only_predict_ms": _percentiles(np.array(trees) * 1000)}


def _percentiles(values: np.ndarray) -> dict:
    return {k: round(float(np.percentile(values, q)), 3) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": round(float(values.max()), 3)}


class OtlpReceiver(ThreadingHTTPServer):
    """An OTLP/HTTP endpoint on a free loopback port that keeps what is POSTed to it (path,
    content type, body) and answers 200: where a traced server's exporter sends its spans."""

    def __init__(self):
        self.posts: list[tuple[str, str, bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N802 - http.server's name
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                self.posts.append((handler.path, handler.headers["Content-Type"], body))
                handler.send_response(200)
                handler.send_header("Content-Type", "application/x-protobuf")
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "OtlpReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def spans(self) -> int:
        """How many spans were received."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        return sum(len(scope.spans) for _, _, body in list(self.posts)
                   for resource in ExportTraceServiceRequest.FromString(body).resource_spans
                   for scope in resource.scope_spans)


def start_server(settings: Settings, port: int, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    import httpx

    env = {**os.environ, **settings.as_env(), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "mlplatform.cli", "serve", "--port", str(port)], env=env,
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready in 180 s: see {log_path}")


def redis(workdir: Path):
    """A redis-server of the benchmark's own on a free port, its data under ``workdir``: (process, URL)."""
    from mlplatform.stream.server import server_argv, wait_until_up

    data = workdir / "redis"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    proc = subprocess.Popen(server_argv(data, port), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    wait_until_up(url)
    return proc, url


STREAMED_DAY = "2013-07-01"  # a summer Monday (benchmarks/stream.py's day)


def day_flights(settings: Settings, day: str) -> list[dict]:
    import duckdb

    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        rows = conn.execute(
            "SELECT strftime(flight_date, '%Y-%m-%d'), carrier, flight_number, origin, dest, sched_dep_time, tailnum "
            "FROM features.flight_features WHERE flight_date = ? ORDER BY hash(flight_id)", [day]).fetchall()
    keys = ["flight_date", "carrier", "flight_number", "origin", "dest", "sched_dep_time", "tailnum"]
    return [{k: v for k, v in zip(keys, row) if v is not None} for row in rows]


def publish_again(url: str, day: str, seconds: float) -> threading.Thread:
    """A thread publishing ``day``'s departures under new event ids, paced over ``seconds``."""
    import datetime as dt

    import orjson

    from mlplatform.stream.broker import Broker
    from mlplatform.stream.events import day_messages, paced

    date = dt.date.fromisoformat(day)
    messages = []
    for when, raw in day_messages(date, date):
        body = orjson.loads(raw)
        if body["kind"] == "departure":
            body["event_id"] = "again-" + body["event_id"]
            messages.append((when, orjson.dumps(body)))
    speed = (messages[-1][0] - messages[0][0]).total_seconds() / seconds

    def publish():
        broker = Broker(url)
        for batch in paced(messages, speed):
            broker.publish(batch)
        broker.close()

    thread = threading.Thread(target=publish, name="publish-again")
    thread.start()
    return thread


def rollout_on(settings: Settings, url: str) -> tuple[str, str]:
    """Register the champion's model again as a new version, make it the canary (10%) and the
    shadow, and wait until the server has loaded them; returns (champion, candidate)."""
    import httpx
    from mlflow import MlflowClient

    from mlplatform.training.tracking import CANARY_ALIAS, CANARY_SHARE_TAG, CHAMPION, SHADOW_ALIAS

    client = MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    champion = client.get_model_version_by_alias("flight_delay", CHAMPION)
    # (its files as the source: a models:/ source is resolved through MLflow's process-wide URI)
    source = client.get_model_version_download_uri("flight_delay", champion.version)
    candidate = client.create_model_version("flight_delay", source, champion.run_id,
                                            description="serving benchmark: the champion's model as a canary").version
    client.set_registered_model_tag("flight_delay", CANARY_SHARE_TAG, "0.1")
    client.set_registered_model_alias("flight_delay", CANARY_ALIAS, str(candidate))
    client.set_registered_model_alias("flight_delay", SHADOW_ALIAS, str(candidate))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rollout = httpx.get(f"{url}/health").json().get("rollout") or {}
        if (rollout.get("canary") == str(candidate) and rollout.get("shadow") == str(candidate)
                and str(candidate) in rollout.get("scored_ahead", [])):  # the schedule scored by it: steady state
            return str(champion.version), str(candidate)
        time.sleep(0.5)
    raise RuntimeError("the server did not pick up the canary and the shadow within 120 s")


def rollout_off(settings: Settings) -> None:
    from mlflow import MlflowClient

    from mlplatform.training.tracking import CANARY_ALIAS, CANARY_SHARE_TAG, SHADOW_ALIAS

    client = MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    for alias in (CANARY_ALIAS, SHADOW_ALIAS):
        client.delete_registered_model_alias("flight_delay", alias)
    client.delete_registered_model_tag("flight_delay", CANARY_SHARE_TAG)


def run(settings: Settings, rate: float = 200, seconds: float = 30, smoke: bool = False) -> dict:
    import dataclasses
    import httpx

    flights = sample_flights(settings, 2000)
    scheduled = [{k: v for k, v in f.items() if not k.startswith("_")} for f in flights]
    on_demand = [{**s, "sched_arr_time": f["_sched_arr_time"]} for s, f in zip(scheduled, flights)]
    streamed_day = day_flights(settings, STREAMED_DAY)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = settings.home / "logs" / "bench-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    broker, broker_url = redis(settings.home / "bench-serve-broker")  # the server follows it throughout
    proc = start_server(dataclasses.replace(settings, redis_url=broker_url), port, log_path)
    try:
        warm = 1 if smoke else 5
        open_loop(url, "/predict", scheduled, rate=50, seconds=warm)  # warm-up, not reported
        out = {
            "scheduled": open_loop(url, "/predict", scheduled, rate=rate, seconds=seconds),
            "scheduled_max_throughput": closed_loop(url, "/predict", scheduled, seconds=2 if smoke else 10,
                                                    concurrency=4),
            "on_demand": open_loop(url, "/predict", on_demand, rate=10, seconds=2 if smoke else 10),
            "batch_100": closed_loop(url, "/predict/batch",
                                     [{"flights": scheduled[i:i + 100]} for i in range(0, len(scheduled), 100)],
                                     seconds=2 if smoke else 10, concurrency=1),
        }
        out["batch_100"]["flights_per_s"] = round(out["batch_100"]["req_per_s"] * 100, 1)
        publisher = publish_again(broker_url, STREAMED_DAY, seconds)
        out["streaming"] = open_loop(url, "/predict", streamed_day, rate=rate, seconds=seconds)
        publisher.join()
        stream = httpx.get(f"{url}/health").json()["features"]
        out["streaming"].update(day=STREAMED_DAY, events_read=stream["stream"]["messages_read"],
                                recomputed=stream["live"])
        champion, candidate = rollout_on(settings, url)
        try:
            open_loop(url, "/predict", scheduled, rate=50, seconds=warm)  # warm-up, not reported
            out["rollout"] = open_loop(url, "/predict", scheduled, rate=rate, seconds=seconds)
            health = httpx.get(f"{url}/health").json()["rollout"]
        finally:
            rollout_off(settings)
        out["rollout"].update(champion=champion, canary=candidate, share=health["share"],
                              shadow_scored=health["shadow_scored"], shadow_dropped=health["shadow_dropped"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        broker.terminate()
        broker.wait(timeout=30)
    out["scheduled_traced"] = traced(settings, scheduled, rate=rate, seconds=seconds, warm=warm)
    out["baseline_in_process"] = baseline(settings, flights, repeats=50 if smoke else 500)
    out["target"] = {"rate": 200, "p99_ms": 10.0,
                     "met": all(out[k]["latency_ms"]["p99"] <= 10.0 and out[k]["errors"] == 0
                                for k in ("scheduled", "streaming", "rollout", "scheduled_traced")) and rate >= 200}
    out["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    return out


def traced(settings: Settings, flights: list[dict], rate: float, seconds: float, warm: float = 5,
           port: int | None = None) -> dict:
    """The scheduled flights' open loop against a server that traces every request and exports
    the spans over OTLP/HTTP to an ``OtlpReceiver`` (no broker: the stream is not what this measures)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = settings.home / "logs" / "bench-serve-traced.log"
    with OtlpReceiver() as receiver:
        proc = start_server(settings, port, log_path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
        try:
            open_loop(url, "/predict", flights, rate=50, seconds=warm)  # warm-up, not reported
            out = open_loop(url, "/predict", flights, rate=rate, seconds=seconds)
        finally:
            proc.terminate()  # the server flushes what is pending as it stops
            proc.wait(timeout=30)
        out.update(spans_exported=receiver.spans(), export_posts=len(receiver.posts))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--build", action="store_true", help="first build the whole year into MLPLATFORM_HOME")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("serving-results.json"))
    args = parser.parse_args()
    settings = Settings.from_env()
    if args.build:
        import datetime as dt

        from mlplatform.home import init_home
        from mlplatform.ingest.landing import replay
        from mlplatform.pipeline import run_range

        init_home(settings)
        replay(settings.landing, dt.date(2013, 1, 1), dt.date(2013, 12, 31), overwrite=False)
        run_range(settings, dt.date(2013, 1, 1), dt.date(2013, 12, 31))
    result = run(settings, rate=args.rate, seconds=args.seconds)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    s = result["scheduled"]
    print(f"\nscheduled flights at {s['target_rate']:.0f} req/s: p50 {s['latency_ms']['p50']} ms, "
          f"p99 {s['latency_ms']['p99']} ms, {s['errors']} errors; target p99 <= 10 ms: "
          f"{'met' if result['target']['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
