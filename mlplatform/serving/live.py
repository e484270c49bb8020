"""The event stream as the server sees it: a reader of the broker's log (no consumer group: it
acknowledges nothing and takes nothing from the warehouse's consumer) that keeps the departures
of the last hours and the stream's clock, within a second of their publication.

``StreamTail`` runs in a thread of the server. Each departure it reads is validated with the
warehouse's own contract (``mlplatform.stream.ingest.validate``: what ingestion would quarantine
is not served either) and handed to ``on_departures`` (the server adds it to its snapshot's copy
of ``staging.stg_departure_events``, where the feature SQL finds it); ``on_poll`` is called
after each read, also an empty one (the server recomputes the flights the departures moved). ``clock`` is the latest
event time read, of any kind: "now" on the stream's clock. The departures of the last
``KEEP`` of event time are kept, to be added again to the next snapshot of the warehouse (which
may not have them yet).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading

import pandas as pd

from mlplatform.stream.broker import Broker
from mlplatform.stream.ingest import Invalid, parse, validate

log = logging.getLogger("mlplatform.serving.live")
KEEP = dt.timedelta(hours=36)  # longer than the rt_ features look back (the flight's local day)
COLUMNS = ["event_id", "flight_id", "flight_date", "carrier", "origin", "tailnum", "event_time", "dep_delay_minutes"]


def departures_of(messages: list[tuple[str, bytes]]) -> tuple[pd.DataFrame, dt.datetime | None]:
    """The valid departures among broker messages, as ``stg_departure_events`` rows, and the
    latest event time among all the valid events."""
    rows, clock = [], None
    for _, raw in messages:
        try:
            row = validate(parse(raw))
        except Invalid:
            continue
        clock = row["event_time"] if clock is None else max(clock, row["event_time"])
        if row["kind"] == "departure":
            rows.append((row["event_id"], row["flight_id"], row["_partition_date"], row["carrier"], row["origin"],
                         row["tailnum"], row["event_time"], row["dep_delay"]))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["event_time"] = frame["event_time"].astype("datetime64[us]")
    return frame, clock


BACKGROUND_NICENESS = 10  # the server's background threads give way to the one answering requests


def in_background() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads one by one): on a busy
    machine the requests' thread runs first and the background work waits, not the reverse."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):  # not Linux: the default priority
        pass


class StreamTail:
    def __init__(self, url: str, on_departures, on_poll=None, batch: int = 5_000, block_ms: int = 500,
                 retry_seconds: float = 5.0):
        self.url, self.on_departures, self.on_poll = url, on_departures, on_poll
        self.batch, self.block_ms, self.retry_seconds = batch, block_ms, retry_seconds
        self.clock: dt.datetime | None = None
        self.last_id = "0-0"
        self.read = 0  # messages read
        self.error: str | None = None
        self._recent: list[tuple[pd.Timestamp, pd.DataFrame]] = []  # (latest event time, departures)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recent(self) -> pd.DataFrame:
        """The departures of the last ``KEEP`` of event time."""
        with self._lock:
            frames = [f for _, f in self._recent]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)

    def poll(self, broker: Broker, block_ms: int | None = None) -> int:
        """Read what was published since the last poll (waiting up to ``block_ms`` for some)."""
        messages = broker.tail(self.last_id, self.batch, block_ms=block_ms)
        if not messages:
            return 0
        self.last_id = messages[-1][0]
        self.read += len(messages)
        departures, clock = departures_of(messages)
        if clock is not None and (self.clock is None or clock > self.clock):
            self.clock = clock
        if len(departures):
            with self._lock:
                self._recent.append((departures["event_time"].max(), departures))
                horizon = pd.Timestamp(self.clock - KEEP)
                if self._recent[0][0] < horizon:
                    self._recent = [(t, f) for t, f in self._recent if t >= horizon]
            self.on_departures(departures)
        return len(messages)

    def _run(self) -> None:
        in_background()
        broker = None
        while not self._stop.is_set():
            try:
                if broker is None:
                    broker = Broker(self.url)
                    if not broker.ping():
                        raise ConnectionError(f"no broker answers at {self.url}")
                self.poll(broker, self.block_ms)
                self.error = None
                if self.on_poll:
                    self.on_poll()
            except Exception as exc:  # noqa: BLE001 - no broker yet, or it restarted: try again
                if self.error is None:
                    log.info("stream tail: %s", exc)
                self.error = str(exc)
                if broker is not None:
                    broker.close()
                    broker = None
                self._stop.wait(self.retry_seconds)
        if broker is not None:
            broker.close()

    def start(self) -> "StreamTail":
        self._thread = threading.Thread(target=self._run, name="stream-tail", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def status(self) -> dict:
        return {"broker": self.url, "clock": self.clock.isoformat() if self.clock else None, "messages_read": self.read,
                "last_id": self.last_id, "error": self.error}
