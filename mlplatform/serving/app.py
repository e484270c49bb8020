"""The HTTP API: FastAPI over ``PredictionService``; ``mlplatform serve`` runs it with uvicorn.

    POST /predict[?explain=true]        one flight -> delay probability, model version, request id
    POST /predict/batch[?explain=true]  {"flights": [...]} -> {"predictions": [...]}
    GET  /health                        200 when a champion and a warehouse snapshot are loaded, else 503
    GET  /metrics                       Prometheus text format
    GET  /openapi.json, /docs           the schema

Client errors are 422 with one entry per field at fault (FastAPI's format: loc, msg, type), all
of a request's at once: malformed fields as well as dates, carriers and airports the warehouse
does not serve. The OpenAPI schema states the same: once a warehouse snapshot is loaded, the
served dates, carriers, origins and destinations are enums and origin != dest is a ``not``; the
schema is restated whenever the snapshot changes. 503 says why the service cannot predict yet.

Traces (``tracing``): with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, or a tracer provider given to
``create_app``, every request but the probes and scrapes is a span (FastAPI's instrumentation)
with the service's spans under it; otherwise nothing is instrumented.
"""

# no `from __future__ import annotations`: the routes' models are made in create_app, and FastAPI
# must see them as objects, not names to resolve in this module
import copy
import datetime as dt
import logging
import math
import re
import secrets
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from mlplatform.serving import tracing
from mlplatform.serving.features import Snapshot
from mlplatform.settings import Settings
from mlplatform.serving.service import CHECKED_FIELDS, InvalidFlight, NotReady, PredictionService, unserved

log = logging.getLogger("mlplatform.serving")
MAX_BATCH = 10_000
EXAMPLE = {
    "flight_date": "2013-03-15", "carrier": "UA", "flight_number": 1545, "origin": "EWR", "dest": "IAH",
    "sched_dep_time": 515, "tailnum": "N14228",
}


ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
CODE_PATTERN = {"carrier": r"^[A-Z0-9]{2}$", "origin": r"^[A-Z]{3}$", "dest": r"^[A-Z]{3}$"}


def _iso_date(value):
    """Only a string YYYY-MM-DD is a date: not a number (pydantic reads 0 and "0" as 1970-01-01),
    not a timestamp, not a datetime."""
    if not (isinstance(value, str) and ISO_DATE.fullmatch(value)):
        raise PydanticCustomError("date_format", "must be a date as a string YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise PydanticCustomError("date_format", "not a calendar date: {reason}", {"reason": str(exc)}) from None


ISO_DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?"
                          r"([Zz]|[+-][0-9]{2}:[0-9]{2})?")


def _iso_datetime(value):
    """Only an ISO 8601 date and time as a string is an instant: not a number (pydantic reads
    "0.0" as a Unix time), not a date alone (it would read "2013-03-15" as its midnight)."""
    if not (isinstance(value, str) and ISO_DATETIME.fullmatch(value)):
        raise PydanticCustomError("datetime_format", "must be a date and time as a string, ISO 8601: "
                                                     "YYYY-MM-DDTHH:MM[:SS[.f]][Z|+HH:MM]")
    try:
        return dt.datetime.fromisoformat(value[:-1] + "Z" if value.endswith("z") else value)
    except ValueError as exc:
        raise PydanticCustomError("datetime_format", "not a calendar date and time: {reason}",
                                  {"reason": str(exc)}) from None


def _json_integer(value):
    """A JSON integer: a number without a fraction (JSON Schema's ``integer`` admits 14.0), never a
    string or a boolean (pydantic's lax mode would read "14" and true as integers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise PydanticCustomError("int_from_float", "Input should be a valid integer, got a number with a "
                                                        "fractional part")
        return int(value)
    return value


def _json_number(value):
    """A JSON number, never a string or a boolean."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]
Instant = Annotated[dt.datetime, BeforeValidator(_iso_datetime)]
# every local time as HHMM (0 = 00:00, 2359 = 23:59): the schema lists them, the server checks them
HHMM = [h * 100 + m for h in range(24) for m in range(60)]
# (the schema is given whole: pydantic would state the bounds of a type with a before-validator as
# "ge"/"le", which JSON Schema does not know)
Hhmm = Annotated[JsonInt, Field(ge=0, le=2359), WithJsonSchema({"type": "integer", "enum": HHMM})]
JsonNumber = Annotated[float, BeforeValidator(_json_number)]
Miles = Annotated[JsonNumber, Field(ge=1, le=12_000), WithJsonSchema({"type": "number", "minimum": 1,
                                                                       "maximum": 12_000})]


class Flight(BaseModel):
    """A flight as known before departure. What the warehouse serves (the dates, carriers and
    airports) is checked by the subclass ``served_models`` makes, and stated by ``/openapi.json``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE]})

    flight_date: Annotated[dt.date, BeforeValidator(_iso_date)] = Field(
        description="Local date of departure, YYYY-MM-DD: one of the days the warehouse serves, from its first "
                    "day of flights to the end of its holiday calendar (listed as an enum once it is loaded).")
    carrier: str = Field(pattern=CODE_PATTERN["carrier"],
                         description="Two-character airline code, e.g. UA: one in the warehouse's airlines table.")
    flight_number: JsonInt = Field(ge=1, le=9999)
    origin: str = Field(pattern=CODE_PATTERN["origin"],
                        description="FAA code of the departure airport: one the warehouse has departures from (EWR, JFK, LGA).")
    dest: str = Field(pattern=CODE_PATTERN["dest"],
                      description="FAA code of the destination airport: one the warehouse knows, not the origin.")
    sched_dep_time: Hhmm = Field(description="Scheduled departure, local HHMM (515 = 05:15).")
    tailnum: str | None = Field(None, min_length=1, max_length=10, pattern=r"^[A-Z0-9]+$")
    sched_arr_time: Hhmm | None = Field(
        None, description="Scheduled arrival, HHMM; looked up in the published schedule when absent."
    )
    distance_miles: Miles | None = Field(
        None, description="Looked up in the schedule (or the great-circle distance) when absent."
    )

    @field_validator("sched_dep_time", "sched_arr_time")
    @classmethod
    def _hhmm(cls, value: int | None) -> int | None:
        if value is not None and value % 100 > 59:
            raise PydanticCustomError("time_format", "must be a time as HHMM with minutes 00-59")
        return value

    @field_validator("dest")
    @classmethod
    def _not_origin(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("origin"):
            raise PydanticCustomError("same_as_origin", "must differ from origin")
        return value


class Batch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flights: list[Flight] = Field(min_length=1, max_length=MAX_BATCH)


def served_models(current: Callable[[], Snapshot | None]) -> tuple[type[Flight], type[Batch]]:
    """``Flight`` and ``Batch`` that also check the dates, carriers and airports against the
    snapshot ``current()`` returns (``unserved``), while the request is parsed: so one 422 lists
    every field at fault, whatever kind of fault. Without a snapshot nothing is checked here (the
    request then gets the 503 that says why)."""

    def served(cls, value, info: ValidationInfo):
        snapshot = current()
        problem = unserved(snapshot, info.field_name, value) if snapshot is not None else None
        if problem:
            raise PydanticCustomError(problem[0], problem[1])
        return value

    served_flight = create_model(
        "Flight", __base__=Flight, __module__=__name__,
        __validators__={"_served": field_validator(*CHECKED_FIELDS)(classmethod(served))},
    )
    served_batch = create_model(
        "Batch", __base__=Batch, __module__=__name__,
        flights=(list[served_flight], Field(min_length=1, max_length=MAX_BATCH)),
    )
    return served_flight, served_batch


def served_schema(schema: dict, snapshot: Snapshot | None) -> dict:
    """The OpenAPI schema with what ``snapshot`` serves stated in it: the dates, carriers, origins
    and destinations as enums (exactly the values the server accepts), and origin != dest."""
    if snapshot is None or snapshot.served_dates is None:
        return schema
    schema = copy.deepcopy(schema)
    flight = schema["components"]["schemas"]["Flight"]
    low, high = snapshot.served_dates
    days = [(low + dt.timedelta(days=i)).isoformat() for i in range((high - low).days + 1)]
    flight["properties"]["flight_date"]["enum"] = days
    known = {"carrier": snapshot.carriers, "origin": snapshot.origins, "dest": snapshot.airports}
    for name, codes in known.items():
        flight["properties"][name]["enum"] = sorted(c for c in codes if re.fullmatch(CODE_PATTERN[name], c))
    flight["not"] = {"anyOf": [
        {"properties": {"origin": {"const": code}, "dest": {"const": code}}, "required": ["origin", "dest"]}
        for code in flight["properties"]["origin"]["enum"]
    ]}
    return schema


class Prediction(BaseModel):
    request_id: str
    flight_id: str = Field(description="<date>_<carrier><number>_<origin>_<HHMM>, as in the warehouse.")
    delay_probability: float = Field(description="Probability that the arrival is more than 15 minutes late.")
    model_name: str
    model_version: str = Field(description="The version that answered.")
    stage: str = Field("champion", description="Its stage: champion, or canary (a share of flights, by flight id).")
    warnings: list[str] = Field(description="What the features of this prediction lacked, if anything.")
    features: dict[str, float | str | bool | None] | None = Field(
        None, description="With ?explain=true: the feature vector the model was given."
    )


class Predictions(BaseModel):
    predictions: list[Prediction]


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='Where: ["body", <field>] or ["body", "flights", <index>, <field>].')
    msg: str
    type: str = Field(description="The kind of error, e.g. missing, date_format, unknown_carrier, same_as_origin.")
    input: Any = None
    ctx: dict | None = None


class ClientErrors(BaseModel):
    detail: list[FieldError] = Field(description="Every field at fault, each once.")


class Unreadable(BaseModel):
    detail: str = Field(description="FastAPI's answer to a body it cannot decode.")


class Unavailable(BaseModel):
    detail: str = Field(description="Why the service cannot predict yet.")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlplatform_serving_requests", "HTTP requests by path and status.", ["path", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mlplatform_serving_request_latency_seconds", "Request latency by path.", ["path"], registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.predictions = Counter(
            "mlplatform_serving_predictions", "Flights scored.", ["model_version"], registry=self.registry
        )
        self.model_version = Gauge(
            "mlplatform_serving_model_version", "Version of the champion being served (0 = none).", registry=self.registry
        )
        self.ready = Gauge("mlplatform_serving_ready", "1 when the service can predict.", registry=self.registry)
        self.log_dropped = Gauge(
            "mlplatform_serving_inference_log_dropped", "Inference log records dropped (queue full).",
            registry=self.registry,
        )


AS_OF = ("The instant (ISO 8601; UTC when no offset is given) the intraday rt_ features are computed as of: only "
         "streamed events before it count. Default: now on the stream's clock, but never after the flight's "
         "prediction time (60 minutes before its scheduled departure), which is exactly the training row.")


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(service: PredictionService, start_service: bool = True, token: str | None = None,
               tracer_provider=None) -> FastAPI:
    """The API; with ``token``, predictions and metrics need ``Authorization: Bearer <token>``
    (401 otherwise); ``/health`` stays open for load balancers' probes. Traced with
    ``tracer_provider`` when given (the caller shuts it down), else as the environment says
    (``tracing.from_environment``: shut down, its spans flushed, with the app)."""
    provider = tracer_provider if tracer_provider is not None else tracing.from_environment()
    metrics = Metrics()
    bearer = HTTPBearer(auto_error=False, description="MLPLATFORM_SERVE_TOKEN, when the server has one")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(status_code=401, detail="a bearer token is required (Authorization: Bearer ...)",
                                headers={"WWW-Authenticate": "Bearer"})

    # (only with a token does the schema declare the bearer scheme: the API does what it says)
    protected = [Depends(authorized)] if token is not None else []

    started = threading.Event()

    def _start() -> None:
        try:
            service.start()
        finally:
            started.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_service:  # compile, snapshot and model load take seconds: answer 503 meanwhile
            threading.Thread(target=_start, name="startup", daemon=True).start()
        yield
        service.stop()
        if tracer_provider is None:  # ours: what is pending goes out
            tracing.shutdown(provider)

    app = FastAPI(
        title="mlplatform flight delay API",
        version="1.0",
        summary="The champion flight-delay model, with features computed by the warehouse's own dbt definitions.",
        lifespan=lifespan,
    )
    app.state.service, app.state.metrics = service, metrics
    if provider is not None:
        service.trace_with(provider)
        tracing.instrument(app, provider)
    ServedFlight, ServedBatch = served_models(lambda: service.features.snapshot)
    stated: list = [None, None]  # the snapshot the schema was last stated for, and that schema

    def openapi() -> dict:
        """FastAPI's schema with what the current snapshot serves (``served_schema``), restated
        when the snapshot changes."""
        snapshot = service.features.snapshot
        if stated[1] is None or stated[0] is not snapshot:
            stated[:] = [snapshot, served_schema(FastAPI.openapi(app), snapshot)]
        return stated[1]

    app.openapi = openapi

    @app.middleware("http")
    async def measure(request: Request, call_next):
        began = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.requests.labels(path, request.method, str(status)).inc()
            metrics.latency.labels(path).observe(time.perf_counter() - began)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes the input back, and a NaN or Infinity in it (Python's JSON
        # parser accepts them) cannot be encoded: that would turn a client error into a 500
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(InvalidFlight)
    async def invalid(request: Request, exc: InvalidFlight):
        return JSONResponse({"detail": exc.errors}, status_code=422)

    async def _predict(flights: list[BaseModel], explain: bool, batch: bool, as_of: dt.datetime | None) -> list[dict]:
        if not started.is_set() and start_service:
            raise NotReady("starting: compiling the feature SQL and loading the warehouse and the champion")
        flights = [f.model_dump() for f in flights]
        if as_of is not None:  # naive UTC, as the warehouse's event times
            as_of = as_of.astimezone(dt.timezone.utc).replace(tzinfo=None) if as_of.tzinfo else as_of
        if as_of is None and service.is_quick(flights):  # lookups: cheaper inline than a thread hop
            out = service.predict(flights, explain=explain, batch=batch)
        else:  # a query or a big batch: off the event loop
            out = await run_in_threadpool(service.predict, flights, explain=explain, batch=batch, as_of=as_of)
        if out:
            metrics.predictions.labels(out[0]["model_version"]).inc(len(out))
        return out

    @app.post("/predict", response_model=Prediction, response_model_exclude_none=True, dependencies=protected,
              responses={400: {"model": Unreadable, "description": "The body is not text (not UTF-8)"},
                         422: {"model": ClientErrors, "description": "Invalid flight"},
                         503: {"model": Unavailable, "description": "No champion or warehouse yet"}})
    async def predict(flight: ServedFlight, explain: bool = Query(False, description="Also return the feature vector."),
                      as_of: Instant | None = Query(None, description=AS_OF)):
        return (await _predict([flight], explain, batch=False, as_of=as_of))[0]

    @app.post("/predict/batch", response_model=Predictions, response_model_exclude_none=True,
              dependencies=protected,
              responses={400: {"model": Unreadable, "description": "The body is not text (not UTF-8)"},
                         422: {"model": ClientErrors, "description": "Invalid flights"},
                         503: {"model": Unavailable, "description": "No champion or warehouse yet"}})
    async def predict_batch(body: ServedBatch, explain: bool = Query(False, description="Also return the feature vectors."),
                            as_of: Instant | None = Query(None, description=AS_OF)):
        return {"predictions": await _predict(body.flights, explain, batch=True, as_of=as_of)}

    @app.get("/health", responses={503: {"description": "Not ready: the reasons say why"}})
    def health():
        state = service.health() if started.is_set() or not start_service else {
            "ready": False, "reasons": ["starting"], "model": None, "features": None}
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}},
             dependencies=protected)
    def prometheus():
        model = service.models.model
        metrics.model_version.set(int(model.version) if model and model.version.isdigit() else 0)
        metrics.ready.set(1 if service.health()["ready"] else 0)
        metrics.log_dropped.set(service.log.dropped)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def serve(settings: Settings, host: str, port: int, refresh_seconds: float, access_log: bool = False) -> None:
    import uvicorn
    from threadpoolctl import threadpool_limits

    # one request scores one row: OpenMP threads for the trees cost more than they save
    threadpool_limits(limits=1, user_api="openmp")
    # the background threads (the stream's recomputes, the refresh) hold the GIL in stretches of
    # Python; at the default 5 ms switch interval a request waits that long for each hand-over
    sys.setswitchinterval(0.0005)
    if not is_loopback(host) and not settings.serve_token:
        raise SystemExit(f"mlplatform serve on {host}: beyond loopback the API needs a bearer token; set "
                         "MLPLATFORM_SERVE_TOKEN (clients send `Authorization: Bearer <token>`)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = PredictionService.from_settings(settings, refresh_seconds=refresh_seconds)
    uvicorn.run(create_app(service, token=settings.serve_token), host=host, port=port, workers=1, access_log=access_log, log_level="info")
