"""Event-stream benchmarks, on a real redis-server started here (a free loopback port).

    python benchmarks/stream.py --workdir DIR [--home HOME] [--days N]

- ingestion: the events of whole days published, then consumed into a fresh DuckDB warehouse as
  fast as possible (a day: the median of 9 runs of each, taken in turn; a month: one), by the platform (``mlplatform.stream.ingest.consume``: validation, raw and
  quarantine in one transaction, acknowledgement after the commit) and, side by side, by a plain
  redis-py consumer writing the same rows (``json.loads``, one DataFrame insert, ``XACK``; no
  validation, no quarantine, no duplicate guard): events/s of each;
- freshness (with ``--home``: a home with features and a champion, e.g. the full-year figure's):
  ``mlplatform serve`` following the broker; a departure is published before a flight's
  prediction time and ``/predict?explain=true`` is polled every 10 ms until its
  ``rt_origin_departures_2h`` counts it: published -> served, p50 and p99.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DAY = dt.date(2013, 7, 1)  # a summer Monday: one of the year's busier days


def plain_consume(url: str, warehouse: Path, group: str = "plain", count: int = 20_000) -> int:
    """The floor: redis-py reading as a group member, JSON to rows, one insert, XACK."""
    import duckdb
    import pandas as pd
    import redis as redis_py

    r = redis_py.Redis.from_url(url)
    r.xgroup_create("mlplatform:flight_events", group, id="0")
    conn = duckdb.connect(str(warehouse))
    conn.execute("CREATE TABLE events (event_id VARCHAR, kind VARCHAR, event_time VARCHAR, flight_id VARCHAR, "
                 "origin VARCHAR, dep_delay DOUBLE, arr_delay DOUBLE)")
    n = 0
    while True:
        reply = r.xreadgroup(group, "plain-1", {"mlplatform:flight_events": ">"}, count=count)
        if not reply:
            break
        messages = reply[0][1]
        rows = []
        for _, fields in messages:
            b = json.loads(fields[b"event"])
            f, p = b.get("flight") or {}, b.get("payload") or {}
            rows.append((b["event_id"], b["kind"], b["event_time"], f.get("flight_id"), f.get("origin", b.get("origin")),
                         p.get("dep_delay"), p.get("arr_delay")))
        frame = pd.DataFrame(rows, columns=["event_id", "kind", "event_time", "flight_id", "origin", "dep_delay",
                                            "arr_delay"])
        conn.register("frame", frame)
        conn.execute("INSERT INTO events SELECT * FROM frame")
        conn.unregister("frame")
        r.xack("mlplatform:flight_events", group, *[i for i, _ in messages])
        n += len(messages)
    conn.close()
    return n


def ingestion(workdir: Path, start: dt.date, end: dt.date, repeats: int = 1) -> dict:
    """Both consumers over the same published days, ``repeats`` times each in turn (a fresh
    warehouse and consumer group each time): the median of each."""
    import statistics

    from mlplatform.stream.broker import GROUP, Broker
    from mlplatform.stream.events import publish_days
    from mlplatform.stream.ingest import consume

    import duckdb  # noqa: F401 - imported before either consumer is timed
    import pandas  # noqa: F401

    from benchmarks.serving import redis

    proc, url = redis(workdir)
    try:
        broker = Broker(url)
        published = publish_days(broker, start, end)
        out = {"days": f"{start}..{end}", "events": published["events"], "repeats": repeats,
               "publish_events_per_s": round(published["events"] / published["seconds"])}
        seconds = {"platform": [], "plain": []}
        for _ in range(repeats):
            for name in seconds:
                warehouse = workdir / f"stream-{name}.duckdb"
                warehouse.unlink(missing_ok=True)
                broker.redis.xgroup_destroy(broker.stream, GROUP if name == "platform" else "plain")
                began = time.perf_counter()
                if name == "platform":
                    n = sum(b.messages for b in consume(broker, warehouse, "bench-1"))
                else:
                    n = plain_consume(url, warehouse)
                seconds[name].append(time.perf_counter() - began)
                assert n == published["events"], (name, n, published["events"])
        for name, times in seconds.items():
            median = statistics.median(times)
            out[name] = {"seconds": round(median, 3), "events_per_s": round(published["events"] / median)}
        out["ratio"] = round(out["platform"]["seconds"] / out["plain"]["seconds"], 2)
        broker.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def freshness(workdir: Path, home: Path, samples: int) -> dict:
    """Published -> visible in a served rt_ feature (see the module)."""
    import duckdb
    import httpx
    import numpy as np

    from benchmarks.serving import free_port, redis, start_server
    from mlplatform.settings import Settings
    from mlplatform.stream.broker import Broker

    proc, url = redis(workdir)
    os.environ["MLPLATFORM_REDIS_URL"] = url
    settings = Settings.from_env({**os.environ, "MLPLATFORM_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")})
    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        rows = conn.execute(
            "SELECT strftime(flight_date, '%Y-%m-%d'), carrier, flight_number, origin, dest, sched_dep_time, "
            "prediction_time FROM features.flight_features WHERE flight_date = (SELECT max(flight_date) - 1 FROM "
            "features.flight_features) AND sched_dep_time BETWEEN 1200 AND 2000 ORDER BY flight_id LIMIT ?",
            [samples]).fetchall()
    port = free_port()
    server = start_server(settings, port, home / "logs" / "bench-stream-serve.log")
    latencies = []
    try:
        broker = Broker(url)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
        for i, (date, carrier, number, origin, dest, hhmm, pt) in enumerate(rows):
            flight = {"flight_date": date, "carrier": carrier, "flight_number": number, "origin": origin,
                      "dest": dest, "sched_dep_time": hhmm}

            def count():
                response = client.post("/predict", json=flight, params={"explain": "true"})
                response.raise_for_status()
                return response.json()["features"]["rt_origin_departures_2h"]

            # the clock moves to just before this flight's prediction time with a departure from its origin
            event = {"event_id": f"fresh-{i}", "kind": "departure",
                     "event_time": (pt - dt.timedelta(minutes=1)).isoformat() + "Z",
                     "flight": {"flight_id": f"{date}_ZZ{i}_{origin}_0001", "flight_date": date, "carrier": "ZZ",
                                "flight_number": i + 1, "origin": origin, "dest": "ORD", "sched_dep_time": 1,
                                "tailnum": None}, "payload": {"dep_delay": 10}}
            before = count()
            published = time.perf_counter()
            broker.publish([json.dumps(event).encode()])
            while count() == before:
                if time.perf_counter() - published > 30:
                    raise RuntimeError(f"event {i} not served in 30 s")
                time.sleep(0.01)
            latencies.append(time.perf_counter() - published)
        broker.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        proc.terminate()
        proc.wait(timeout=30)
    ms = np.array(latencies) * 1000
    return {"samples": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


def run(workdir: Path, home: Path | None, smoke: bool = False) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    out = {"one_day": ingestion(workdir, DAY, DAY, repeats=3 if smoke else 9)}
    if not smoke:
        out["one_month"] = ingestion(workdir, DAY, DAY + dt.timedelta(days=30))
    if home is not None:
        out["freshness"] = freshness(workdir, home, 5 if smoke else 50)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--home", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.workdir, args.home, args.smoke)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
