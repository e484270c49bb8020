"""Streamed events into the warehouse, exactly once: read, validate, write, acknowledge.

A micro-batch (``read_and_check``, then ``write_and_ack``; ``consume`` loops over them): first
the messages another consumer read and never acknowledged for ``min_idle_ms`` (it died between
its write and its acknowledgement: ``claim_stale``), then new ones; each is parsed and checked
against the event contract; the valid ones go to ``raw.flight_events`` and the others to
``quarantine.flight_events`` (with the rule and the reason; a message that cannot be parsed at
all is kept whole, its raw payload), both in one transaction; only after the commit are the
messages acknowledged. A message delivered twice (its consumer was killed after the commit and
before the acknowledgement) is written once: ``event_id`` is the raw table's primary key and the
message id the quarantine's, and a batch meeting a row already there is written again ignoring
it. Nothing is dropped and nothing blocks the stream: a bad message is quarantined and
acknowledged like a good one.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson

from mlplatform.stream.broker import Broker
from mlplatform.stream.events import KINDS, WEATHER_FIELDS
from mlplatform.warehouse import create_tables, in_one_transaction, on_lake

STREAM_SOURCE = "redis-stream"  # the raw table's _source_file for streamed rows
FLIGHT_KINDS = ("departure", "arrival", "cancellation")
EARLIEST, LATEST = dt.datetime(2012, 12, 31), dt.datetime(2014, 1, 2)  # event times the platform accepts (UTC)
DELAY_RANGE = (-720, 2880)  # minutes, as the batch contract's
BIGINT = 2**63  # the raw table's integers are 64-bit

# (a DuckDB file keys the events, and a redelivered event is skipped by the key; a DuckLake has no
# keys: ``write_and_ack`` skips what is there by an anti-join over the batch's days, ``events_ddl``)
EVENTS_DDL = """
CREATE SCHEMA IF NOT EXISTS raw;
CREATE SCHEMA IF NOT EXISTS quarantine;
CREATE TABLE IF NOT EXISTS raw.flight_events (
    event_id VARCHAR {key}, kind VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL,
    flight_id VARCHAR, carrier VARCHAR, flight_number BIGINT, origin VARCHAR NOT NULL, dest VARCHAR,
    sched_dep_time BIGINT, tailnum VARCHAR, dep_delay DOUBLE, arr_delay DOUBLE, weather JSON,
    _partition_date DATE NOT NULL, _source_file VARCHAR, _message_id VARCHAR, _ingested_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS quarantine.flight_events (
    _message_id VARCHAR {key}, event_id VARCHAR, kind VARCHAR, event_time TIMESTAMP,
    _partition_date DATE, payload VARCHAR, _rule VARCHAR NOT NULL, _reason VARCHAR NOT NULL, _ingested_at TIMESTAMP
);
"""


def events_ddl(conn) -> str:
    return EVENTS_DDL.format(key="" if on_lake(conn) else "PRIMARY KEY")


COLUMNS = ["event_id", "kind", "event_time", "flight_id", "carrier", "flight_number", "origin", "dest",
           "sched_dep_time", "tailnum", "dep_delay", "arr_delay", "weather", "_partition_date", "_source_file",
           "_message_id", "_ingested_at"]
VALIDATED = COLUMNS[:COLUMNS.index("_source_file")]  # what ``validate`` returns; the lineage columns follow


class Invalid(ValueError):
    def __init__(self, rule: str, reason: str):
        super().__init__(f"{rule}: {reason}")
        self.rule, self.reason = rule, reason


UTC = dt.timezone.utc


def _time(text) -> dt.datetime:
    if not isinstance(text, str):
        raise Invalid("event_time_valid", f"event_time {text!r} is not an ISO 8601 timestamp")
    try:
        when = dt.datetime.fromisoformat(text)  # ("Z" included, Python 3.11)
    except ValueError:
        raise Invalid("event_time_valid", f"event_time {text!r} is not an ISO 8601 timestamp") from None
    if when.tzinfo is None:
        raise Invalid("event_time_valid", f"event_time {text!r} has no time zone (UTC is required)")
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    when = when.replace(tzinfo=None)
    if not EARLIEST <= when <= LATEST:
        raise Invalid("event_time_valid", f"event_time {text} is outside {EARLIEST:%Y-%m-%d}..{LATEST:%Y-%m-%d}")
    return when


def _date(text, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise Invalid("key_present", f"{what} {text!r} is not a date YYYY-MM-DD") from None


def _delay(payload: dict, name: str, required: bool) -> float | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise Invalid("payload_complete", f"a departure needs {name}")
        return None
    if value.__class__ not in (int, float) or value != value:
        raise Invalid("payload_complete", f"{name} {value!r} is not a number")
    if not DELAY_RANGE[0] <= value <= DELAY_RANGE[1]:
        raise Invalid("delay_in_range", f"{name} {value} min is outside {DELAY_RANGE[0]}..{DELAY_RANGE[1]}")
    return float(value)


def _text(flight: dict, name: str) -> str:
    value = flight.get(name)
    if value.__class__ is not str or not value:
        raise Invalid("key_present", f"flight.{name} is missing")
    return value


def _integer(flight: dict, name: str) -> int:
    value = flight.get(name)
    if value.__class__ is not int or not -BIGINT <= value < BIGINT:  # (not a bool either; the column's range)
        raise Invalid("key_present", f"flight.{name} {value!r} is not an integer")
    return value


def parse(raw: bytes) -> dict:
    """A message's event, parsed (``orjson``: bytes in), or ``Invalid`` (rule ``parseable``)."""
    try:
        body = orjson.loads(raw)
    except ValueError as exc:  # malformed JSON or UTF-8
        raise Invalid("parseable", f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Invalid("parseable", "the message is not a JSON object")
    return body


def validate(body: dict) -> dict:
    """The raw row of one parsed event (``COLUMNS`` up to ``weather``), or ``Invalid`` naming
    the rule it breaks and why."""
    event_id, kind = body.get("event_id"), body.get("kind")
    if event_id.__class__ is not str or not event_id:
        raise Invalid("key_present", "event_id is missing")
    if kind not in KINDS:
        raise Invalid("kind_known", f"kind {kind!r} is not one of {', '.join(KINDS)}")
    when = _time(body.get("event_time"))
    payload = body.get("payload") or {}
    if payload.__class__ is not dict:
        raise Invalid("payload_complete", "payload is not an object")
    if kind == "weather":
        origin = body.get("origin")
        if origin.__class__ is not str or len(origin) != 3:
            raise Invalid("key_present", f"origin {origin!r} is not an airport code")
        return {"event_id": event_id, "kind": kind, "event_time": when, "flight_id": None, "carrier": None,
                "flight_number": None, "origin": origin, "dest": None, "sched_dep_time": None, "tailnum": None,
                "dep_delay": None, "arr_delay": None,
                "weather": json.dumps({k: payload.get(k) for k in WEATHER_FIELDS}),
                "_partition_date": _date(body.get("flight_date"), "flight_date")}
    flight = body.get("flight") or {}
    if flight.__class__ is not dict:
        raise Invalid("key_present", "flight is not an object")
    tailnum = flight.get("tailnum")
    return {"event_id": event_id, "kind": kind, "event_time": when, "flight_id": _text(flight, "flight_id"),
            "carrier": _text(flight, "carrier"), "flight_number": _integer(flight, "flight_number"),
            "origin": _text(flight, "origin"), "dest": _text(flight, "dest"),
            "sched_dep_time": _integer(flight, "sched_dep_time"),
            "tailnum": tailnum if tailnum.__class__ is str else None,
            "dep_delay": _delay(payload, "dep_delay", required=kind == "departure"),
            "arr_delay": _delay(payload, "arr_delay", required=kind == "arrival"), "weather": None,
            "_partition_date": _date(flight.get("flight_date"), "flight.flight_date")}


@dataclass
class MicroBatch:
    messages: int = 0
    events: int = 0          # written to raw (new)
    duplicates: int = 0      # valid, but already in raw (a redelivery, or the same event published again)
    quarantined: int = 0
    claimed: int = 0         # of the messages, taken over from a consumer that did not acknowledge them
    last_event_time: dt.datetime | None = None
    days: dict = field(default_factory=dict)  # day -> [events, quarantined]
    by_rule: dict = field(default_factory=dict)
    seconds: float = 0.0


def quarantined(message_id: str, raw, body, invalid: Invalid, now: dt.datetime) -> dict:
    """The quarantine row of a message that breaks ``invalid``'s rule: what could be read of it
    (its event id, kind, time and day, when they parse), and its raw payload whole."""
    body = body if isinstance(body, dict) else {}
    try:
        when = _time(body.get("event_time"))
    except Invalid:
        when = None
    day = (body.get("flight") or {}).get("flight_date") if isinstance(body.get("flight"), dict) else \
        body.get("flight_date")
    try:
        day = dt.date.fromisoformat(day) if isinstance(day, str) else None
    except ValueError:
        day = None
    return {"_message_id": message_id, "event_id": body.get("event_id") if isinstance(body.get("event_id"), str)
            else None, "kind": body.get("kind") if isinstance(body.get("kind"), str) else None,
            "event_time": when, "_partition_date": day,
            "payload": raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw),
            "_rule": invalid.rule, "_reason": invalid.reason, "_ingested_at": now}


@dataclass
class Checked:
    """A micro-batch read from the broker and checked, not yet written."""
    messages: list          # (message id, raw payload), in the broker's order
    claimed: int
    rows: list              # ``validate``'s rows of the valid messages
    ids: list               # their message ids
    bad: list               # ``quarantined`` rows
    by_rule: dict
    began: float            # (perf_counter)
    now: dt.datetime | None = None


def read_and_check(broker: Broker, consumer: str, count: int = 20_000, min_idle_ms: int = 30_000,
                   block_ms: int | None = None) -> Checked:
    """The first half of a micro-batch: up to ``count`` messages (the stale ones claimed first),
    each parsed and checked against the contract. Nothing is written or acknowledged."""
    began = time.perf_counter()
    broker.ensure_group()
    claimed = broker.claim_stale(consumer, min_idle_ms, count)
    messages = claimed + (broker.read(consumer, count - len(claimed), block_ms=block_ms) if len(claimed) < count else [])
    checked = Checked(messages, len(claimed), [], [], [], {}, began)
    if not messages:
        return checked
    checked.now = now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    for message_id, raw in messages:
        body = None
        try:
            body = parse(raw)
            checked.rows.append(validate(body))
            checked.ids.append(message_id)
        except (ValueError, UnicodeDecodeError) as exc:
            invalid = exc if isinstance(exc, Invalid) else Invalid("parseable", f"not JSON: {exc}")
            checked.bad.append(quarantined(message_id, raw, body, invalid, now))
            checked.by_rule[invalid.rule] = checked.by_rule.get(invalid.rule, 0) + 1
    return checked


def write_and_ack(broker: Broker, conn, checked: Checked, before_ack=None) -> MicroBatch:
    """The second half: the valid rows to ``raw.flight_events`` and the others to quarantine in
    one transaction, then the acknowledgement. The valid rows reach DuckDB as an Arrow table built
    column by column (no per-row objects beyond ``validate``'s dict); the lineage columns are the
    insert's parameters."""
    import duckdb
    import pyarrow as pa

    rows, bad, messages = checked.rows, checked.bad, checked.messages
    batch = MicroBatch(messages=len(messages), claimed=checked.claimed, by_rule=checked.by_rule)
    # (types inferred: a column of nulls only is Arrow's null type, which DuckDB casts to the column's)
    good = pa.Table.from_pydict({**{c: [r[c] for r in rows] for c in VALIDATED}, "_message_id": checked.ids})
    insert = (f"INSERT {{}}INTO raw.flight_events ({', '.join(COLUMNS)}) "
              f"SELECT {', '.join(VALIDATED)}, ?, _message_id, ? FROM good")

    def write(conflicts: str) -> list:
        statements = [(insert.format(conflicts), [STREAM_SOURCE, checked.now])]
        if bad:
            statements.append("INSERT OR IGNORE INTO quarantine.flight_events BY NAME SELECT * FROM bad")
        return in_one_transaction(conn, statements)

    def write_without_keys() -> list:  # a DuckLake: what is there already, looked for on the batch's days
        statements = [(
            f"INSERT INTO raw.flight_events ({', '.join(COLUMNS)}) SELECT {', '.join(VALIDATED)}, ?, _message_id, ? "
            "FROM good g WHERE NOT EXISTS (SELECT 1 FROM raw.flight_events r WHERE r.event_id = g.event_id "
            "AND r._partition_date IN (SELECT DISTINCT _partition_date FROM good)) "
            "QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY _message_id) = 1",
            [STREAM_SOURCE, checked.now])]
        if bad:
            statements.append("INSERT INTO quarantine.flight_events BY NAME SELECT * FROM bad b WHERE NOT EXISTS "
                              "(SELECT 1 FROM quarantine.flight_events q WHERE q._message_id = b._message_id) "
                              "QUALIFY row_number() OVER (PARTITION BY _message_id) = 1")
        return in_one_transaction(conn, statements)

    if bad:
        conn.register("bad", pa.Table.from_pylist(bad))
    conn.register("good", good)
    try:
        if on_lake(conn):
            written = write_without_keys()
        else:
            try:
                # A plain insert first: an event already there is rare (a redelivery, an event published
                # twice), and asking DuckDB to skip conflicts costs a third of the insert every time.
                written = write("")
            except duckdb.ConstraintException:
                # the inserts' counts are the rows new to each table (what was there already is ignored)
                written = write("OR IGNORE ")
    finally:
        conn.unregister("good")
        if bad:
            conn.unregister("bad")
    if before_ack:
        before_ack()  # (fault injection: a consumer killed after the commit, before the acknowledgement)
    broker.ack([m for m, _ in messages])
    batch.events, batch.quarantined = written[0], written[1] if bad else 0
    batch.duplicates = len(rows) - batch.events
    if rows:
        batch.last_event_time = max(r["event_time"] for r in rows)
        for day, n in Counter(r["_partition_date"] for r in rows).items():
            batch.days.setdefault(day, [0, 0])[0] += n
    for row in bad:
        batch.days.setdefault(row["_partition_date"], [0, 0])[1] += 1
    batch.seconds = time.perf_counter() - checked.began
    return batch


def open_events_tables(warehouse):
    """A connection to ``warehouse`` with the events' tables created (``events_ddl``)."""
    from mlplatform.warehouse import connect

    conn = connect(warehouse)
    try:
        create_tables(conn, events_ddl(conn))
    except BaseException:
        conn.close()
        raise
    return conn


def consume(broker: Broker, warehouse, consumer: str, count: int = 20_000, max_seconds: float | None = None,
            min_idle_ms: int = 30_000, on_batch=None, before_ack=None) -> list[MicroBatch]:
    """Micro-batches until the group has nothing left, delivered or pending (or ``max_seconds``),
    on one connection to ``warehouse`` (opening the file costs more than a small batch; a
    caller in Dagster holds the warehouse writers' pool anyway). The warehouse opens in a
    thread while the first micro-batch is read and checked (a DuckDB instance takes ~20 ms to
    start, much of it outside the GIL: a fifth of a day's events' time). ``on_batch(batch, lag)``
    is told about each."""
    from concurrent.futures import ThreadPoolExecutor

    batches, began = [], time.monotonic()
    pool = ThreadPoolExecutor(1, thread_name_prefix="warehouse-open")
    opening = pool.submit(open_events_tables, warehouse)
    pool.shutdown(wait=False)  # (its thread ends with the opening)
    try:
        while max_seconds is None or time.monotonic() - began < max_seconds:
            checked = read_and_check(broker, consumer, count, min_idle_ms)
            if not checked.messages:
                lag = broker.lag()
                if lag.total == 0:
                    break
                # messages another consumer read and never acknowledged: they are claimed once idle
                time.sleep(min(1.0, min_idle_ms / 1000 / 4))
                continue
            batch = write_and_ack(broker, opening.result(), checked, before_ack=before_ack)
            batches.append(batch)
            if on_batch:
                on_batch(batch, broker.lag())
        opening.result()  # (an error opening the warehouse is raised even when nothing was to be written)
    finally:
        if opening.exception() is None:  # (waits for the opening)
            opening.result().close()
    return batches
