"""The broker, behind one small class: Redis Streams (redis-py).

What the platform needs of a broker, and nothing else: append events to one ordered log
(``publish``); consumer groups that deliver each message to one consumer, keep it pending until
it is acknowledged, and hand a pending message to another consumer after an idle timeout
(``read``, ``claim_stale``, ``ack``); the group's lag (``lag``); and reading the log from a
position without a group, for the server that keeps the latest events in memory (``tail``).

Kafka would replace it method for method: a topic (one partition keeps the order this class
gives; more partitions, keyed by origin airport, would order events per airport only), a
consumer group whose offsets are committed after the warehouse commit (the ``ack``), the
group's lag from the committed offsets, and ``tail`` a consumer outside any group seeking to an
offset. What would change is redelivery: Kafka redelivers from the last committed offset after
a consumer dies (a rebalance), not message by message after an idle timeout, so
``claim_stale`` would go and the same idempotent write would absorb the replays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

STREAM = "mlplatform:flight_events"
GROUP = "warehouse"  # the consumer group that writes raw.flight_events
FIELD = b"event"     # each message has one field: the event's JSON


@dataclass(frozen=True)
class Lag:
    pending: int       # delivered to a consumer, not yet acknowledged
    undelivered: int   # in the stream, not yet delivered to the group
    last_id: str       # the stream's last message id

    @property
    def total(self) -> int:
        return self.pending + self.undelivered


class Broker:
    def __init__(self, url: str, stream: str = STREAM):
        import redis

        self.url, self.stream = url, stream
        self.redis = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)

    def ping(self) -> bool:
        import redis

        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def publish(self, payloads: Iterable[bytes], batch: int = 5_000) -> list[str]:
        """Append messages in order (pipelined ``XADD``, ``batch`` at a time); their ids."""
        ids, pipe, n = [], self.redis.pipeline(transaction=False), 0
        for payload in payloads:
            pipe.xadd(self.stream, {FIELD: payload})
            n += 1
            if n == batch:
                ids += [i.decode() for i in pipe.execute()]
                n = 0
        if n:
            ids += [i.decode() for i in pipe.execute()]
        return ids

    def ensure_group(self, group: str = GROUP) -> None:
        """The consumer group, reading the stream from its beginning (created once)."""
        import redis

        try:
            self.redis.xgroup_create(self.stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, consumer: str, count: int, block_ms: int | None = None, group: str = GROUP) -> list[tuple[str, bytes]]:
        """New messages for ``consumer`` (``XREADGROUP >``): pending for it until acknowledged."""
        reply = self.redis.xreadgroup(group, consumer, {self.stream: ">"}, count=count, block=block_ms)
        return [(i.decode(), fields.get(FIELD, b"")) for _, messages in reply or [] for i, fields in messages]

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int, group: str = GROUP) -> list[tuple[str, bytes]]:
        """Messages another consumer took and has not acknowledged for ``min_idle_ms`` (it died
        between its read and its acknowledgement): now ``consumer``'s (``XAUTOCLAIM``)."""
        found, start = [], "0-0"
        while len(found) < count:
            start, messages, *_ = self.redis.xautoclaim(self.stream, group, consumer, min_idle_ms, start,
                                                        count=count - len(found))
            found += [(i.decode(), (fields or {}).get(FIELD, b"")) for i, fields in messages if fields is not None]
            if start in (b"0-0", "0-0"):
                break
        return found

    def ack(self, ids: list[str], group: str = GROUP) -> int:
        return int(self.redis.xack(self.stream, group, *ids)) if ids else 0

    def lag(self, group: str = GROUP) -> Lag:
        """Pending and undelivered messages of the group (``XINFO GROUPS``)."""
        import redis

        try:
            groups = self.redis.xinfo_groups(self.stream)
            last = self.redis.xinfo_stream(self.stream)["last-generated-id"]
        except redis.ResponseError:  # no stream yet
            return Lag(0, 0, "0-0")
        info = next((g for g in groups if g["name"].decode() == group), None)
        last = last.decode() if isinstance(last, bytes) else str(last)
        if info is None:
            return Lag(0, self.length(), last)
        undelivered = info.get("lag")
        if undelivered is None:  # (Redis cannot tell after deletions: count from the last delivered id)
            undelivered = len(self.redis.xrange(self.stream, min=f"({info['last-delivered-id'].decode()}"))
        return Lag(int(info["pending"]), int(undelivered), last)

    def length(self) -> int:
        return int(self.redis.xlen(self.stream))

    def tail(self, after: str, count: int, block_ms: int | None = None) -> list[tuple[str, bytes]]:
        """Messages after id ``after`` (no group: a reader of the whole log, ``XREAD``)."""
        reply = self.redis.xread({self.stream: after}, count=count, block=block_ms)
        return [(i.decode(), fields.get(FIELD, b"")) for _, messages in reply or [] for i, fields in messages]

    def close(self) -> None:
        self.redis.close()
