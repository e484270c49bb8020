"""The HTTP API: FastAPI over ``PredictionService``; ``mlplatform serve`` runs it with uvicorn.

    POST /predict[?explain=true]        one flight -> delay probability, model version, request id
    POST /predict/batch[?explain=true]  {"flights": [...]} -> {"predictions": [...]}
    GET  /health                        200 when a champion and a warehouse snapshot are loaded, else 503
    GET  /metrics                       Prometheus text format
    GET  /openapi.json, /docs           the schema

Client errors are 422 with one entry per field (FastAPI's format), including carriers and
airports the warehouse does not know; 503 says why the service cannot predict yet.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.concurrency import run_in_threadpool

from mlplatform.serving.service import InvalidFlight, NotReady, PredictionService

log = logging.getLogger("mlplatform.serving")
MAX_BATCH = 10_000
EXAMPLE = {
    "flight_date": "2013-03-15", "carrier": "UA", "flight_number": 1545, "origin": "EWR", "dest": "IAH",
    "sched_dep_time": 515, "tailnum": "N14228",
}


class Flight(BaseModel):
    """A flight as known before departure."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE]})

    flight_date: dt.date = Field(ge=dt.date(1970, 1, 1), le=dt.date(2100, 12, 31), description="Local date of departure.")
    carrier: str = Field(pattern=r"^[A-Z0-9]{2}$", description="Two-character airline code, e.g. UA.")
    flight_number: int = Field(ge=1, le=9999, strict=True)
    origin: str = Field(pattern=r"^[A-Z]{3}$", description="FAA code of the departure airport (EWR, JFK, LGA).")
    dest: str = Field(pattern=r"^[A-Z]{3}$", description="FAA code of the destination airport.")
    sched_dep_time: int = Field(ge=0, le=2359, strict=True, description="Scheduled departure, local HHMM (515 = 05:15).")
    tailnum: str | None = Field(None, min_length=1, max_length=10, pattern=r"^[A-Z0-9]+$")
    sched_arr_time: int | None = Field(
        None, ge=0, le=2359, strict=True, description="Scheduled arrival, HHMM; looked up in the published schedule when absent."
    )
    distance_miles: float | None = Field(
        None, gt=0, le=12_000, description="Looked up in the schedule (or the great-circle distance) when absent."
    )

    @field_validator("sched_dep_time", "sched_arr_time")
    @classmethod
    def _hhmm(cls, value: int | None) -> int | None:
        if value is not None and value % 100 > 59:
            raise ValueError("must be a time as HHMM with minutes 00-59")
        return value

    @field_validator("dest")
    @classmethod
    def _not_origin(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("origin"):
            raise ValueError("must differ from origin")
        return value


class Batch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flights: list[Flight] = Field(min_length=1, max_length=MAX_BATCH)


class Prediction(BaseModel):
    request_id: str
    flight_id: str = Field(description="<date>_<carrier><number>_<origin>_<HHMM>, as in the warehouse.")
    delay_probability: float = Field(description="Probability that the arrival is more than 15 minutes late.")
    model_name: str
    model_version: str
    warnings: list[str] = Field(description="What the features of this prediction lacked, if anything.")
    features: dict[str, float | str | bool | None] | None = Field(
        None, description="With ?explain=true: the feature vector the model was given."
    )


class Predictions(BaseModel):
    predictions: list[Prediction]


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


def create_app(service: PredictionService, start_service: bool = True) -> FastAPI:
    metrics = Metrics()
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

    app = FastAPI(
        title="mlplatform flight delay API",
        version="1.0",
        summary="The champion flight-delay model, with features computed by the warehouse's own dbt definitions.",
        lifespan=lifespan,
    )
    app.state.service, app.state.metrics = service, metrics

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

    async def _predict(flights: list[Flight], explain: bool, batch: bool) -> list[dict]:
        if not started.is_set() and start_service:
            raise NotReady("starting: compiling the feature SQL and loading the warehouse and the champion")
        flights = [f.model_dump() for f in flights]
        if service.is_quick(flights):  # lookups: cheaper inline than a thread hop
            out = service.predict(flights, explain=explain, batch=batch)
        else:  # a query or a big batch: off the event loop
            out = await run_in_threadpool(service.predict, flights, explain=explain, batch=batch)
        if out:
            metrics.predictions.labels(out[0]["model_version"]).inc(len(out))
        return out

    @app.post("/predict", response_model=Prediction, response_model_exclude_none=True,
              responses={422: {"description": "Invalid flight"}, 503: {"description": "No champion or warehouse yet"}})
    async def predict(flight: Flight, explain: bool = Query(False, description="Also return the feature vector.")):
        return (await _predict([flight], explain, batch=False))[0]

    @app.post("/predict/batch", response_model=Predictions, response_model_exclude_none=True,
              responses={422: {"description": "Invalid flights"}, 503: {"description": "No champion or warehouse yet"}})
    async def predict_batch(body: Batch, explain: bool = Query(False, description="Also return the feature vectors.")):
        return {"predictions": await _predict(body.flights, explain, batch=True)}

    @app.get("/health")
    def health():
        state = service.health() if started.is_set() or not start_service else {
            "ready": False, "reasons": ["starting"], "model": None, "features": None}
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    def prometheus():
        model = service.champion.model
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


def serve(host: str, port: int, refresh_seconds: float, access_log: bool = False) -> None:
    # one request scores one row: OpenMP threads for the trees cost more than they save
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import uvicorn

    from mlplatform.settings import apply_defaults

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = PredictionService.from_settings(apply_defaults(), refresh_seconds=refresh_seconds)
    uvicorn.run(create_app(service), host=host, port=port, workers=1, access_log=access_log, log_level="info")
