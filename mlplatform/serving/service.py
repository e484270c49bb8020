"""The prediction service behind the HTTP API, as plain Python (no web framework here).

- ``OnlineFeatures``: the compiled feature SQL over a snapshot of the warehouse. At each
  snapshot the features of every flight in the published schedule are computed in one batch
  with that SQL, so a request for a scheduled flight is a lookup; any other request (a flight
  not in the schedule, or one whose scheduled arrival or distance the client overrides) runs the
  same SQL for that request. Either way the numbers come from the one dbt definition.
  The intraday (rt_) features move with the event stream: ``live.StreamTail`` adds each
  streamed departure to the snapshot as it is read, and at most every ``LIVE_INTERVAL_SECONDS``
  the scheduled flights those departures can move (``Live``: prediction time after the earliest
  of them, and within ``ORIGIN_WINDOW`` of the latest or on their local day) get their rt_
  features computed again with the
  same macro in one batch (``analyses/online_intraday_features.sql``) and are scored before they
  are swapped in, so a request for one stays a lookup. A request with ``as_of`` runs the SQL.
  (So a departure counts at once for a flight computed on request, and within about two seconds
  for a scheduled one.)
- ``Models``: the versions the registry's aliases point at (``champion``, and in a staged
  rollout ``canary`` and ``shadow``) and the canary's share (a tag of the registered model),
  reloaded when they move: no restart.
- ``PredictionService``: validates flights against the snapshot, scores them and writes the
  inference log; background threads refresh the snapshot and the models. A stable share of flights
  (``rollout.traffic``: by a hash of the flight id) is answered by the canary, the rest by the
  champion; the response and the log say which version answered, at what stage. Every request is
  also scored by the shadow off the request path (``ShadowScorer``): its scores go to the log with
  the stage ``shadow`` and never slow or fail the answer. The schedule's flights are scored ahead
  by every loaded version, so each of them stays a lookup.
- Tracing (``tracing``): with a tracer provider (``PredictionService.trace_with``) a prediction
  has spans for its feature lookup, the real-time features, the features computed on request,
  the scoring by each answering version and the shadow's scoring; its inference log records
  carry the trace id and the scoring span's id. Without one the tracer is a no-op.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from opentelemetry import context as otel_context

from mlplatform.serving.features import (
    CompiledFeatures,
    SERVING_TARGET,
    Snapshot,
    Streamed,
    WarehouseUnavailable,
    changed_at,
    compile_online_features,
    flight_id,
    requests_frame,
)
from mlplatform.serving import tracing
from mlplatform.serving.inference_log import InferenceLog
from mlplatform.rollout.traffic import DEFAULT_CANARY_SHARE, to_canary
from mlplatform.serving.live import StreamTail, in_background
from mlplatform import lake
from mlplatform.settings import Settings
from mlplatform.training.model import CATEGORICAL, INTRADAY, NUMERIC, as_number, model_input
from mlplatform.training.tracking import (
    CANARY_ALIAS,
    CANARY_SHARE_TAG,
    CHAMPION,
    SHADOW_ALIAS,
    MlflowTracking,
    tracking_from,
)

log = logging.getLogger("mlplatform.serving")
QUICK_BATCH = 32  # flights: larger batches are scored off the event loop
KEY = ["flight_date", "carrier", "flight_number", "origin", "dest", "sched_dep_time", "tailnum"]


class NotReady(RuntimeError):
    """No champion or no warehouse snapshot yet: the service cannot predict (HTTP 503)."""


class InvalidFlight(ValueError):
    """A flight refers to something the warehouse does not know (HTTP 422); ``errors`` are
    FastAPI-style: {"loc": [...], "msg": ..., "type": ..., "input": ...}."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class Vectors:
    """Feature vectors as the model takes them, held as arrays: one row is cheap to pick."""

    categorical: np.ndarray  # (n, len(CATEGORICAL)), object: text or None
    numeric: np.ndarray  # (n, len(NUMERIC)), float64: NaN where missing
    has_weather: np.ndarray  # (n,), bool

    @classmethod
    def from_features(cls, features: pd.DataFrame) -> "Vectors":
        X = model_input(features)
        return cls(X[CATEGORICAL].to_numpy(dtype=object), X[NUMERIC].to_numpy(dtype=np.float64),
                   features["has_weather"].fillna(False).to_numpy(dtype=bool))

    def take(self, rows) -> "Vectors":
        return Vectors(self.categorical[rows], self.numeric[rows], self.has_weather[rows])

    @classmethod
    def stack(cls, parts: list["Vectors"]) -> "Vectors":
        return cls(np.concatenate([p.categorical for p in parts]), np.concatenate([p.numeric for p in parts]),
                   np.concatenate([p.has_weather for p in parts]))

    def frame(self) -> pd.DataFrame:
        """The estimator's input (``model_input``'s schema)."""
        frame = pd.DataFrame(self.numeric, columns=NUMERIC)
        for i, column in enumerate(CATEGORICAL):
            frame.insert(i, column, self.categorical[:, i])
        return frame

    def vector(self, i: int) -> dict:
        numeric = [None if v != v else v for v in self.numeric[i].tolist()]  # NaN -> None
        return {**dict(zip(CATEGORICAL, self.categorical[i].tolist())), **dict(zip(NUMERIC, numeric))}


@dataclass(frozen=True)
class ScheduledFeatures:
    """The feature vectors of every flight in the snapshot's schedule, by flight key."""

    index: dict[tuple, int]
    keys: list[tuple]  # row -> flight key (KEY's values), to compute a row again
    vectors: Vectors
    prediction_time: np.ndarray  # (n,) datetime64: as of when each row's rt_ features are
    flight_date: np.ndarray  # (n,) datetime64[D]


# A departure moves the rt_ features of flights whose prediction time is after it: those of the
# next 2 hours (at its origin) and the rest of its local day (its carrier, its aircraft); see
# macros/flight_features.sql.
ORIGIN_WINDOW = dt.timedelta(hours=2)
LIVE_INTERVAL_SECONDS = 2.0  # how often, at most, the streamed departures reach the scheduled rows
INTRADAY_AT = [NUMERIC.index(c) for c in INTRADAY]  # the rt_ features' columns in Vectors.numeric


@dataclass(frozen=True)
class Live:
    """The scheduled flights whose rt_ features the stream moved since the snapshot, computed
    again on the snapshot with the streamed departures in it: scheduled row -> row of ``vectors``."""

    rows: dict[int, int]
    vectors: Vectors
    scored: dict[str, np.ndarray] | None = None  # {model version: probabilities of ``vectors``}

    def hits(self, rows: list[int]) -> list[tuple[int, int]]:
        """(position in ``rows``, row of ``vectors``) for the rows this overlay replaces."""
        return [(i, self.rows[r]) for i, r in enumerate(rows) if r in self.rows]


@dataclass(frozen=True)
class Loaded:
    """A snapshot, the schedule's features computed on it and what the stream moved since:
    swapped together, read together."""

    snapshot: Snapshot
    scheduled: ScheduledFeatures
    live: Live | None = None


class OnlineFeatures:
    def __init__(self, settings: Settings, compiled: CompiledFeatures | None = None, tail: StreamTail | None = None,
                 score=None):
        self.settings = settings
        # ``score(vectors) -> {model version: probabilities}``: the rows the stream moves are
        # scored before they are swapped in (by the service's loaded versions), or None
        self.score = score
        self.compiled = compiled  # compiled on the first refresh when not given
        self.loaded: Loaded | None = None
        self.error: str | None = None
        self.tail = tail  # the event stream, when the server follows one
        self._swap = threading.Lock()  # one writer of ``loaded`` at a time (refresh, the stream)
        self._pending: Streamed | None = None  # streamed, not in ``loaded.live`` yet
        self._live_at = 0.0  # monotonic time of the last ``catch_up`` that recomputed
        self.live_updates, self.live_seconds = 0, 0.0  # how often, and how long in all
        self.tracer = tracing.NO_TRACER  # spans of the lookups (PredictionService.trace_with)

    @property
    def clock(self) -> dt.datetime | None:
        """Now on the stream's clock: just after the latest event time the server has seen (so
        that event counts: the rt_ features take the events strictly before their instant); None
        without a stream."""
        clock = self.tail.clock if self.tail else None
        return clock + dt.timedelta(microseconds=1) if clock else None

    def add_departures(self, departures: pd.DataFrame) -> None:
        """``StreamTail``'s callback: streamed departures into the current snapshot; the flights
        they move are recomputed by the next ``catch_up``."""
        with self._swap:
            loaded = self.loaded
            span = loaded.snapshot.add_events(departures) if loaded is not None else None
            if span is not None:
                self._pending = span if self._pending is None else self._pending | span

    def catch_up(self, interval: float = LIVE_INTERVAL_SECONDS) -> bool:
        """Recompute the scheduled flights the departures added since the last time can move,
        if there are some and ``interval`` seconds have passed; returns whether it did."""
        if self._pending is None or time.monotonic() - self._live_at < interval:
            return False
        with self._swap:
            if self._pending is None or self.loaded is None:
                return False
            began = time.monotonic()
            try:
                self.loaded = self.relive(self.loaded, self._pending)
            except Exception:  # noqa: BLE001 - the stream goes on; the moved flights are tried again
                self._live_at = time.monotonic()
                log.exception("recomputing the flights the stream moved failed")
                return False
            self._pending, self._live_at = None, time.monotonic()
            self.live_updates, self.live_seconds = self.live_updates + 1, self.live_seconds + self._live_at - began
        return True

    def _score_safely(self, vectors: Vectors) -> dict[str, np.ndarray] | None:
        """``score(vectors)``, or None without a scorer or when it fails (the rows are then
        scored on request, and again at the next refresh)."""
        if self.score is None:
            return None
        try:
            return self.score(vectors)
        except Exception:  # noqa: BLE001 - e.g. a champion trained on other features: the server says so
            log.exception("scoring the flights the stream moved failed")
            return None

    def relive(self, loaded: Loaded, streamed: Streamed) -> Loaded:
        """``loaded`` with the scheduled flights ``streamed`` departures can move (see
        ``ORIGIN_WINDOW``) computed again (the intraday SQL, one batch) and scored (``score``)."""
        scheduled, previous = loaded.scheduled, loaded.live
        pt = scheduled.prediction_time
        soon = pt <= np.datetime64(streamed.until + ORIGIN_WINDOW, "us")
        same_day = np.isin(scheduled.flight_date, np.array(sorted(streamed.days), dtype="datetime64[D]"))
        moved = np.flatnonzero((pt > np.datetime64(streamed.since, "us")) & (soon | same_day))
        if not len(moved):
            return loaded
        # only the rt_ features move with the stream: the scheduled rows with those computed again
        requests = requests_frame([dict(zip(KEY, scheduled.keys[r])) for r in moved])
        intraday = loaded.snapshot.features(self.compiled.intraday_sql, requests)
        computed = scheduled.vectors.take(moved)  # (a copy)
        computed.numeric[:, INTRADAY_AT] = np.column_stack([as_number(intraday[c]).to_numpy() for c in INTRADAY])
        rows, parts = {int(r): i for i, r in enumerate(moved)}, [computed]
        scored = self._score_safely(computed)
        if previous is not None:  # what the stream moved before and this did not recompute
            kept = [(r, j) for r, j in previous.rows.items() if r not in rows]
            if kept:
                positions = [j for _, j in kept]
                parts.append(previous.vectors.take(positions))
                rows.update({r: len(moved) + i for i, (r, _) in enumerate(kept)})
                if scored is not None:
                    earlier = previous.scored
                    kept_scored = {v: p[positions] for v, p in earlier.items()} \
                        if earlier and earlier.keys() == scored.keys() else self._score_safely(parts[-1])
                    scored = {v: np.concatenate([p, kept_scored[v]]) for v, p in scored.items()} \
                        if kept_scored and kept_scored.keys() == scored.keys() else None
        return Loaded(loaded.snapshot, scheduled, Live(rows, Vectors.stack(parts), scored))

    def rescore(self, versions: set[str]) -> None:
        """The rows the stream moved, scored again (``score``) unless by exactly ``versions``."""
        with self._swap:
            loaded = self.loaded
            live = loaded.live if loaded is not None else None
            if live is None or self.score is None or (live.scored is not None and set(live.scored) == set(versions)):
                return
            scored = self._score_safely(live.vectors)
            if scored is not None:
                self.loaded = Loaded(loaded.snapshot, loaded.scheduled, Live(live.rows, live.vectors, scored))

    @property
    def snapshot(self) -> Snapshot | None:
        return self.loaded.snapshot if self.loaded else None

    @property
    def scheduled(self) -> ScheduledFeatures | None:
        return self.loaded.scheduled if self.loaded else None

    def refresh(self) -> bool:
        """Load a new snapshot when the warehouse changed since the last one; returns whether
        one was loaded. On failure the previous snapshot stays in use and ``error`` says why."""
        warehouse = self.settings.database
        try:
            if self.compiled is None:
                self.compiled = compile_online_features(self.settings, self.settings.home / SERVING_TARGET)
            current = self.loaded
            if current is not None and (lake.is_lake(warehouse) or Path(warehouse).exists()) \
                    and changed_at(warehouse) <= current.snapshot.source_mtime:
                return False
            snapshot = Snapshot.load(warehouse, self.compiled.relations)
            loaded = Loaded(snapshot, self.schedule_features(snapshot))
            with self._swap:
                if self.tail is not None:  # what the stream brought that the warehouse may not have yet
                    span = snapshot.add_events(self.tail.recent())
                    if span is not None:
                        loaded = self.relive(loaded, span)
                # one assignment: a request sees the old snapshot and its rows or the new ones,
                # never a mix; the old snapshot is freed when the last request using it is done
                self.loaded, self.error, self._pending = loaded, None, None
        except WarehouseUnavailable as exc:
            self.error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a broken warehouse or project must not stop the server
            self.error = f"could not load the features: {type(exc).__name__}: {exc}"
            log.exception("loading the online features failed")
            return False
        return True

    def schedule_features(self, snapshot: Snapshot, dates: list[dt.date] | None = None) -> ScheduledFeatures:
        """The features of every flight in the snapshot's schedule (of ``dates`` only, if given),
        computed with the feature SQL in one batch."""
        stg_flights = next(r for r in self.compiled.relations if r.name == "stg_flights")
        where, params = ("true", []) if dates is None else ("flight_date IN (SELECT unnest(?))", [list(dates)])
        schedule = snapshot.conn.execute(
            f"SELECT {', '.join(KEY)} FROM {stg_flights.sql} WHERE {where} ORDER BY flight_date, flight_id", params
        ).df()
        requests = requests_frame(schedule.to_dict("records")) if len(schedule) else requests_frame([])
        features = snapshot.features(self.compiled.sql, requests)
        keys = list(zip(*(schedule[c].tolist() for c in KEY)))
        index = {_key(dict(zip(KEY, k))): i for i, k in enumerate(keys)}
        return ScheduledFeatures(index, keys, Vectors.from_features(features),
                                 features["prediction_time"].to_numpy(dtype="datetime64[us]"),
                                 pd.to_datetime(features["flight_date"]).to_numpy(dtype="datetime64[D]"))

    def rows(self, flights: list[dict], scheduled: ScheduledFeatures,
             as_of: dt.datetime | None = None) -> list[int | None]:
        """Each flight's row among the scheduled ones, or None when its features must be
        computed on demand: not in the schedule, arrival time or distance given, or an
        ``as_of`` asked for."""
        if as_of is not None:
            return [None] * len(flights)
        return [None if f.get("sched_arr_time") is not None or f.get("distance_miles") is not None
                else scheduled.index.get(_key(f)) for f in flights]

    def lookup(self, flights: list[dict], rows: list[int | None], scheduled: ScheduledFeatures,
               snapshot: Snapshot, as_of: dt.datetime | None = None, live: Live | None = None) -> Vectors:
        """The flights' feature vectors, in order: scheduled rows where there are some (those
        the stream moved from ``live``), the feature SQL for the others (as of ``as_of``, else of
        the stream's clock)."""
        found = [r for r in rows if r is not None]
        looked_up = scheduled.vectors.take(found)  # (a copy: fancy indexing)
        if found:
            with self.tracer.start_as_current_span(tracing.REALTIME_FEATURES) as span:  # the rt_ the stream moved
                hits = live.hits(found) if live is not None else []
                for i, j in hits:
                    looked_up.categorical[i], looked_up.numeric[i] = live.vectors.categorical[j], live.vectors.numeric[j]
                    looked_up.has_weather[i] = live.vectors.has_weather[j]
                if span.is_recording():
                    span.set_attributes({tracing.LOOKED_UP: len(found), tracing.MOVED: len(hits)})
                    if self.clock is not None:
                        span.set_attribute(tracing.STREAM_CLOCK, self.clock.isoformat())
        if len(found) == len(rows):
            return looked_up
        missing = [f for f, r in zip(flights, rows) if r is None]
        with self.tracer.start_as_current_span(tracing.COMPUTED_FEATURES) as span:
            clock = self.clock
            if span.is_recording():
                span.set_attribute(tracing.COMPUTED, len(missing))
                if as_of is not None or clock is not None:  # the instant the rt_ features are as of
                    span.set_attribute(tracing.AS_OF if as_of is not None else tracing.STREAM_CLOCK,
                                       (as_of or clock).isoformat())
            requests = requests_frame(missing, as_of=as_of, stream_clock=clock)
            computed = Vectors.from_features(snapshot.features(self.compiled.sql, requests))
        if not found:
            return computed
        # back in the flights' order: the looked-up ones, then the computed ones, taken by position
        order, seen, other = [], 0, len(found)
        for r in rows:
            order.append(seen if r is not None else other)
            seen, other = seen + (r is not None), other + (r is None)
        return Vectors.stack([looked_up, computed]).take(order)

    def validate(self, flights: list[dict], snapshot: Snapshot, batch: bool = False) -> None:
        """Dates, carriers and airports must be ones the warehouse serves: anything else is the
        client's error (422), not a prediction from features that are all missing. The HTTP layer
        checks the same (``unserved``) while it parses a request; this catches a snapshot that
        changed in between, and callers without the HTTP layer."""
        errors = []
        for i, f in enumerate(flights):
            loc = ("body", "flights", i) if batch else ("body",)
            for field in CHECKED_FIELDS:
                problem = unserved(snapshot, field, f[field])
                if problem:
                    errors.append({"loc": [*loc, field], "msg": problem[1], "type": problem[0], "input": f[field]})
        if errors:
            raise InvalidFlight(errors)

    def status(self) -> dict:
        s = self.snapshot
        return {
            "loaded": s is not None,
            "loaded_at": s.loaded_at.isoformat() if s else None,
            "last_flight_date": s.last_flight_date.isoformat() if s and s.last_flight_date else None,
            "scheduled_flights": len(self.scheduled.index) if self.scheduled else 0,
            "events_up_to": s.events_clock.isoformat() if s and s.events_clock else None,
            "stream": self.tail.status() if self.tail else None,
            "live": {"flights": len(self.loaded.live.rows) if self.loaded and self.loaded.live else 0,
                     "updates": self.live_updates, "seconds": round(self.live_seconds, 3)},
            "error": self.error,
        }


CHECKED_FIELDS = ("flight_date", "carrier", "origin", "dest")  # the fields checked against the warehouse


def unserved(snapshot: Snapshot, field: str, value) -> tuple[str, str] | None:
    """Why the warehouse of ``snapshot`` cannot serve this value of one of ``CHECKED_FIELDS``, as
    (error type, message), or None when it can."""
    if field == "flight_date":
        served = snapshot.served_dates
        if served is None:
            return "date_not_served", "the warehouse has no flights yet"
        if not served[0] <= value <= served[1]:
            return ("date_not_served", f"{value} is not a day this server predicts for: {served[0]}..{served[1]} "
                    "(the warehouse's first day of flights to the end of its holiday calendar)")
    elif field == "carrier" and value not in snapshot.carriers:
        return "unknown_carrier", f"unknown carrier {value!r}: not in the airlines table"
    elif field == "origin" and value not in snapshot.origins:
        return ("unknown_origin",
                f"unknown origin {value!r}: the model serves departures from {', '.join(sorted(snapshot.origins))}")
    elif field == "dest" and value not in snapshot.airports:
        return "unknown_airport", f"unknown destination airport {value!r}"
    return None


def _key(flight: dict) -> tuple:
    date = flight["flight_date"]
    date = date.isoformat() if isinstance(date, (dt.date, pd.Timestamp)) else str(date)
    tailnum = flight.get("tailnum")
    return (date[:10], flight["carrier"], int(flight["flight_number"]), flight["origin"], flight["dest"],
            int(flight["sched_dep_time"]), tailnum if isinstance(tailnum, str) and tailnum else None)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    run_id: str
    estimator: object


class Models:
    """The versions the registered model's aliases point at: ``champion`` (what answers), and in a
    staged rollout ``canary`` (answers ``share`` of the flights) and ``shadow`` (scores every
    request, answers none), loaded through the platform's MLflow resource (``MlflowTracking``: the
    same loader as the gate and the predictions) and reloaded when an alias or the share moves."""

    def __init__(self, tracking: MlflowTracking, alias: str = CHAMPION):
        self.tracking, self.alias = tracking, alias
        self.model_name = tracking.registered_model
        self.model: LoadedModel | None = None  # the champion
        self.canary: LoadedModel | None = None
        self.shadow: LoadedModel | None = None
        self.share = DEFAULT_CANARY_SHARE
        self.error: str | None = None

    def loaded(self) -> list[LoadedModel]:
        return [m for m in (self.model, self.canary, self.shadow) if m is not None]

    def refresh(self) -> bool:
        """Load the versions the aliases point at, where they are not the loaded ones; keep what
        is loaded when the registry cannot be read. Returns whether anything changed."""
        from mlflow.exceptions import MlflowException

        try:
            if self.tracking.tracking_uri.startswith("sqlite:///"):
                Path(self.tracking.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            try:
                registered = self.tracking.client().get_registered_model(self.model_name)
            except MlflowException as exc:
                if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                    raise
                registered = None
            aliases = {a: str(v) for a, v in (registered.aliases if registered else {}).items()}
            if self.alias not in aliases:
                self.error = f"no model version has the alias {self.alias!r} in {self.model_name!r} yet"
                return False
            before = (self.model, self.canary, self.shadow, self.share)
            self.model = self._load(aliases[self.alias], self.model)
            self.canary = self._load(aliases.get(CANARY_ALIAS), self.canary)
            self.shadow = self._load(aliases.get(SHADOW_ALIAS), self.shadow)
            share = (registered.tags or {}).get(CANARY_SHARE_TAG)
            self.share = min(max(float(share), 0.0), 1.0) if share else DEFAULT_CANARY_SHARE
            self.error = None
            return (self.model, self.canary, self.shadow, self.share) != before
        except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop the server
            self.error = f"could not load the champion: {exc}"
            log.warning(self.error)
            return False

    def _load(self, version: str | None, current: LoadedModel | None) -> LoadedModel | None:
        if version is None:
            return None
        if current is not None and current.version == version:
            return current
        for model in self.loaded():  # e.g. the canary promoted: the same version under another alias
            if model.version == version:
                return model
        details = self.tracking.client().get_model_version(self.model_name, version)
        model = LoadedModel(self.model_name, version, details.run_id, self.tracking.load_model(version))
        log.info("loaded %s version %s", self.model_name, version)
        return model

    def answering(self, flight_ids: list[str]) -> list[tuple[LoadedModel, str]]:
        """(the version that answers, its stage) for each flight: the canary for its share of the
        flights (sticky: by the flight id), the champion for the rest."""
        champion, canary, share = self.model, self.canary, self.share
        if canary is None or share <= 0.0:
            return [(champion, "champion")] * len(flight_ids)
        return [(canary, "canary") if to_canary(f, share) else (champion, "champion") for f in flight_ids]


def feature_hash(values: dict) -> str:
    """A short, stable hash of a feature vector (for the inference log)."""
    text = json.dumps(values, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PredictionService:
    def __init__(self, settings: Settings, features: OnlineFeatures, models: Models, inference_log: InferenceLog,
                 refresh_seconds: float = 30.0):
        self.settings, self.features, self.models, self.log = settings, features, models, inference_log
        self.refresh_seconds = refresh_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the schedule's probabilities by each loaded version: (schedule, {version: probabilities})
        self._scored: tuple[ScheduledFeatures, dict[str, np.ndarray]] | None = None
        self.shadow = ShadowScorer(self)
        self.error: str | None = None  # of the last preparation of the models for the schedule
        self.tracer = tracing.NO_TRACER

    def trace_with(self, provider) -> None:
        """Spans of the predictions from ``provider``'s tracer (None: no spans)."""
        self.tracer = self.features.tracer = tracing.tracer_of(provider)

    @classmethod
    def from_settings(cls, settings: Settings, refresh_seconds: float = 30.0, stream: bool = True) -> "PredictionService":
        features = OnlineFeatures(settings)
        service = cls(
            settings,
            features,
            Models(tracking_from(settings)),
            InferenceLog(settings.inference_log),
            refresh_seconds,
        )
        if stream:  # follow the event stream (retried quietly while no broker answers)
            features.tail = StreamTail(settings.redis_url, features.add_departures, on_poll=features.catch_up)
            features.score = service.score_rows
        return service

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.log.start()
        self.shadow.start()
        if self.features.tail is not None:
            self.features.tail.start()
        try:
            self.refresh()
        finally:  # whatever the first refresh met, keep trying
            self._thread = threading.Thread(target=self._loop, name="refresh", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.features.tail is not None:
            self.features.tail.stop()
        if self._thread:
            self._thread.join(timeout=10)
        self.shadow.stop()
        self.log.stop()

    def refresh(self) -> None:
        changed = self.models.refresh() | self.features.refresh()
        try:
            self._prepare()
            self.error = None
        except Exception as exc:  # noqa: BLE001 - e.g. a champion trained on other features
            self.error = f"the champion cannot score the schedule's features: {type(exc).__name__}: {exc}"
            log.exception("preparing the champion failed")
        if changed:
            # Move what is loaded now (the snapshot, the model, the imports) out of the garbage
            # collector's sight: a full collection over it otherwise stalls a request for ~0.2 s.
            gc.unfreeze()  # what the previous refresh froze may be garbage now
            gc.collect()
            gc.freeze()

    def _loop(self) -> None:
        # Until the server is ready there are no answers to give way to: the first snapshot and
        # model load at normal priority (on a busy machine a niced thread took over a minute).
        # Then lower (only lowering needs no privilege, so the order is this one).
        niced = False
        while not self._stop.wait(self.refresh_seconds):
            if not niced and self.health()["ready"]:
                in_background()
                niced = True
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep refreshing
                log.exception("refresh failed")

    # requests -------------------------------------------------------------------------------
    def health(self) -> dict:
        model, models = self.models.model, self.models
        reasons = [r for r in (models.error if model is None else None,
                               self.features.error if self.features.snapshot is None else None, self.error) if r]
        return {
            "ready": model is not None and self.features.snapshot is not None and self.error is None,
            "model": {"name": model.name, "version": model.version, "run_id": model.run_id} if model else None,
            "rollout": {"canary": models.canary.version if models.canary else None, "share": models.share,
                        "shadow": models.shadow.version if models.shadow else None,
                        "shadow_scored": self.shadow.scored, "shadow_dropped": self.shadow.dropped,
                        # the versions the schedule is scored ahead by (until then, requests compute)
                        "scored_ahead": sorted(self._scored[1]) if self._scored is not None else []},
            "features": self.features.status(),
            "reasons": reasons,
        }

    def is_quick(self, flights: list[dict]) -> bool:
        """Whether scoring these flights is a lookup of a few rows (well under a
        millisecond), cheaper on the event loop than a thread hop. A query, or a big batch, is not:
        the HTTP layer runs those in a thread so the server keeps answering meanwhile."""
        loaded = self.features.loaded
        return (loaded is not None and len(flights) <= QUICK_BATCH
                and None not in self.features.rows(flights, loaded.scheduled))


    def _prepare(self) -> None:
        """Score the scheduled flights with each loaded version once, in one batch: their features
        are fixed for a snapshot, so their probabilities are fixed for a (snapshot, version), and
        a request for one of them is a lookup (the 150 trees on one row cost 1.5-3 ms a request,
        most of the time a request took)."""
        models, scheduled = self.models.loaded(), self.features.scheduled
        if not models or scheduled is None:
            return
        earlier = self._scored[1] if self._scored is not None and self._scored[0] is scheduled else {}
        unique = {m.version: m for m in models}.values()  # (the canary may be the shadow too)
        self._scored = (scheduled, {m.version: earlier[m.version] if m.version in earlier
                                    else self._score(m, scheduled.vectors) for m in unique})
        self.features.rescore({m.version for m in models})

    def score_rows(self, vectors: Vectors) -> dict[str, np.ndarray] | None:
        """Each loaded version's probabilities for ``vectors`` (None without a champion)."""
        models = {m.version: m for m in self.models.loaded()}
        return {version: self._score(m, vectors) for version, m in models.items()} if models else None

    @staticmethod
    def _score(model: LoadedModel, vectors: Vectors) -> np.ndarray:
        encoded = np.asarray(model.estimator[:-1].transform(vectors.frame()), dtype=np.float64)
        return model.estimator[-1].predict_proba(encoded)[:, 1] if len(encoded) else np.array([])

    def predict(self, flights: list[dict], explain: bool = False, batch: bool = False,
                as_of: dt.datetime | None = None) -> list[dict]:
        with self.tracer.start_as_current_span(tracing.PREDICT) as span:
            if span.is_recording():
                span.set_attribute(tracing.FLIGHTS, len(flights))
            return self._predict(flights, explain, batch, as_of, span)

    def _predict(self, flights: list[dict], explain: bool, batch: bool, as_of: dt.datetime | None,
                 predict_span) -> list[dict]:
        started = time.perf_counter()
        models = self.models
        model, shadow = models.model, models.shadow
        if model is None:
            raise NotReady(models.error or "no champion model loaded yet")
        loaded = self.features.loaded
        if loaded is None:
            raise NotReady(self.features.error or "no warehouse snapshot loaded yet")
        snapshot, scheduled, live = loaded.snapshot, loaded.scheduled, loaded.live
        self.features.validate(flights, snapshot, batch=batch)
        with self.tracer.start_as_current_span(tracing.FEATURE_LOOKUP) as span:
            rows = self.features.rows(flights, scheduled, as_of)
            if span.is_recording():
                looked_up = sum(r is not None for r in rows)
                span.set_attributes({tracing.FLIGHTS: len(flights), tracing.LOOKED_UP: looked_up,
                                     tracing.COMPUTED: len(rows) - looked_up})
            vectors = self.features.lookup(flights, rows, scheduled, snapshot, as_of, live)
        ids = [flight_id(f) for f in flights]
        if len(ids) == 1 and predict_span.is_recording():
            predict_span.set_attribute(tracing.FLIGHT_ID, ids[0])
        answering = models.answering(ids)
        probability, errors = np.empty(len(flights)), {}
        traced: list[dict] = [{}] * len(flights)  # each flight's trace and scoring span ids (tracing on)
        for version, positions in _by_version(answering).items():
            answer, stage = answering[positions[0]]
            try:
                probability[positions] = self._traced_probabilities(answer, stage, scheduled, live, rows, vectors,
                                                                    positions, traced)
            except Exception as exc:
                if answer is model:  # the model does not fit the features: the server's problem, not the client's
                    raise NotReady(f"the champion cannot score these features: {type(exc).__name__}: {exc}") from exc
                # the canary failed: the champion answers, the failure counts against the canary
                errors[version] = f"{type(exc).__name__}: {exc}"
                log.warning("canary version %s failed, the champion answered: %s", version, errors[version])
                probability[positions] = self._traced_probabilities(model, "champion", scheduled, live, rows, vectors,
                                                                    positions, traced)
                for i in positions:
                    answering[i] = (model, "champion")
        elapsed_ms = (time.perf_counter() - started) * 1000
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        out, records = [], []
        for i, (flight, p) in enumerate(zip(flights, probability)):
            vector = vectors.vector(i)
            request_id = uuid.uuid4().hex
            answer, stage = answering[i]
            result = {
                "request_id": request_id,
                "flight_id": ids[i],
                "delay_probability": float(p),
                "model_name": answer.name,
                "model_version": answer.version,
                "stage": stage,
                "warnings": _warnings(flight, vector, bool(vectors.has_weather[i]), snapshot),
            }
            if explain:
                result["features"] = vector
            out.append(result)
            record = {
                "ts": now,
                "request_id": request_id,
                "flight_id": ids[i],
                "model_name": answer.name,
                "model_version": answer.version,
                "stage": stage,
                "feature_hash": feature_hash(vector),
                "delay_probability": result["delay_probability"],
                "latency_ms": round(elapsed_ms, 3),
                "batch_size": len(flights),
                **traced[i],
            }
            self.log.append(record)
            records.append(record)
        for version, error in errors.items():  # the canary's failures, as its own records
            self.log.append({"ts": now, "model_name": model.name, "model_version": version, "stage": "canary",
                             "error": error, "latency_ms": round(elapsed_ms, 3), "batch_size": len(flights)})
        if shadow is not None:
            self.shadow.submit(shadow, records, loaded, rows, vectors)
        return out

    def _traced_probabilities(self, model: LoadedModel, stage: str, scheduled: ScheduledFeatures, live: Live | None,
                              rows: list[int | None], vectors: Vectors, positions: list[int],
                              traced: list[dict]) -> np.ndarray:
        """``_probabilities`` in a scoring span, whose ids go to ``traced`` at ``positions``."""
        with self.tracer.start_as_current_span(tracing.SCORING) as span:
            if span.is_recording():
                span.set_attributes({tracing.MODEL_NAME: model.name, tracing.MODEL_VERSION: model.version,
                                     tracing.MODEL_ROLE: stage, tracing.FLIGHTS: len(positions)})
            probability = self._probabilities(model, scheduled, live, rows, vectors, positions, span)
            ids = tracing.ids_of(span)
            for i in positions:
                traced[i] = ids
            return probability

    def _probabilities(self, model: LoadedModel, scheduled: ScheduledFeatures, live: Live | None,
                       rows: list[int | None], vectors: Vectors, positions: list[int], span=None) -> np.ndarray:
        """``model``'s probabilities for the flights at ``positions``: looked up when scored ahead,
        else computed (which ``span``, when it records, says)."""
        probability = self._looked_up(model, scheduled, live, [rows[i] for i in positions])
        if span is not None and span.is_recording():
            span.set_attribute(tracing.SCORED_AHEAD, probability is not None)
        if probability is None:
            probability = model.estimator.predict_proba(vectors.take(positions).frame())[:, 1]
        return probability


    def _looked_up(self, model: LoadedModel, scheduled: ScheduledFeatures, live: Live | None,
                   rows: list[int | None]) -> np.ndarray | None:
        """The probabilities of scheduled rows scored ahead by this version (``_prepare``), or
        None when some are not (a row computed on demand, a snapshot or version just swapped)."""
        scored = self._scored
        if None in rows or scored is None or scored[0] is not scheduled or model.version not in scored[1]:
            return None
        probability = scored[1][model.version][rows]
        hits = live.hits(rows) if live is not None else []
        if hits:
            if live.scored is None or model.version not in live.scored:
                return None
            probability[[i for i, _ in hits]] = live.scored[model.version][[j for _, j in hits]]
        return probability


def _by_version(answering: list[tuple[LoadedModel, str]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, (model, _) in enumerate(answering):
        groups.setdefault(model.version, []).append(i)
    return groups


class ShadowScorer:
    """Scores answered requests with the shadow version off the request path: requests put their
    records on a bounded queue (dropped and counted when it is full, never waited for); a
    background thread looks their probabilities up (or computes them) and writes a record per
    flight to the inference log with the stage ``shadow`` and the answering request's id. A
    failure of the shadow is logged and counted, never seen by a client."""

    def __init__(self, service: "PredictionService", max_pending: int = 10_000):
        self.service = service
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self.scored = self.dropped = self.failed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=5)
            except queue.Full:
                pass
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, shadow: LoadedModel, records: list[dict], loaded: Loaded, rows, vectors: Vectors) -> None:
        try:  # (with the request's trace context: the shadow's span is a child of the request's)
            self._queue.put_nowait((shadow, records, loaded, rows, vectors, otel_context.get_current()))
        except queue.Full:
            self.dropped += len(records)

    def _run(self) -> None:
        in_background()
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._score(*item)
            except Exception:  # noqa: BLE001 - the shadow never stops the server
                self.failed += len(item[1])
                log.exception("shadow scoring failed")
            finally:
                self._queue.task_done()

    def _score(self, shadow: LoadedModel, records: list[dict], loaded: Loaded, rows, vectors: Vectors,
               context=None) -> None:
        started = time.perf_counter()
        with self.service.tracer.start_as_current_span(tracing.SHADOW_SCORING, context=context) as span:
            if span.is_recording():
                span.set_attributes({tracing.MODEL_NAME: shadow.name, tracing.MODEL_VERSION: shadow.version,
                                     tracing.MODEL_ROLE: "shadow", tracing.FLIGHTS: len(records)})
            probability = self.service._probabilities(shadow, loaded.scheduled, loaded.live, rows, vectors,
                                                      list(range(len(records))), span)
            traced = tracing.ids_of(span)
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        for record, p in zip(records, probability):
            self.service.log.append({**record, "model_version": shadow.version, "stage": "shadow",
                                     "delay_probability": float(p), "latency_ms": elapsed_ms, **traced})
        self.scored += len(records)


def _warnings(flight: dict, row: dict, has_weather: bool, snapshot: Snapshot) -> list[str]:
    """What the client should know about the features this prediction used."""
    out = []
    date, first, as_of = flight["flight_date"], snapshot.first_flight_date, snapshot.last_flight_date
    low, high = snapshot.holidays
    if low is None or not (low <= date <= high):
        out.append(f"{date} is outside the holiday calendar ({low}..{high}): days_to_holiday is not meaningful")
    if first is not None and date <= first:
        out.append(f"no history before {first} in the warehouse: the rolling delay rates are missing")
    if as_of is None or date > as_of:
        out.append(f"no published schedule for {date} in the warehouse (it has flights up to {as_of}): "
                   "departure counts are 0")
    elif not row["origin_departures_day"]:
        out.append(f"no published schedule for {flight['origin']} on {date}: departure counts are 0")
    if as_of is None or date - dt.timedelta(days=1) > as_of:
        out.append(f"the rolling delay rates are as of {as_of}, not {date - dt.timedelta(days=1)}")
    if not has_weather:
        out.append("no weather observation before the scheduled hour: weather features are missing")
    if row["sched_arr_time"] is None:
        out.append("flight not in the published schedule and no sched_arr_time given: it is missing")
    if row["plane_seats"] is None:
        out.append("aircraft unknown (tailnum not in the planes table): aircraft features are missing")
    return out
