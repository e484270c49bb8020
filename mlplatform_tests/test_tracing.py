"""OpenTelemetry traces of the serving path (mlplatform/serving/tracing.py): the real app over a
real ``PredictionService`` on a champion world. Spans go to the SDK's in-memory exporter (a
provider the test gives ``create_app``), or, from the provider ``create_app`` makes from the
environment, over OTLP/HTTP to a receiver on a free loopback port (``benchmarks.serving.
OtlpReceiver``, which the serving benchmark's traced figure uses too); without an endpoint nothing
is traced. A prediction's inference log record names its trace and its scoring span, and that
span names the model version the record names."""

from __future__ import annotations

import json
import re
import time

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from benchmarks.serving import OtlpReceiver
from mlplatform.serving import tracing
from mlplatform.serving.app import create_app
from mlplatform.serving.service import PredictionService
from mlplatform.settings import Settings
from mlplatform.training.tracking import CANARY_ALIAS, CANARY_SHARE_TAG, CHAMPION, SHADOW_ALIAS, tracking_from
from mlplatform_tests.test_serving import offline_rows, request_of

LANE = "system"
HEX32, HEX16 = re.compile(r"[0-9a-f]{32}"), re.compile(r"[0-9a-f]{16}")


def flights_of(settings: Settings, n: int) -> list[dict]:
    """Requests for scheduled flights of the world's last days (their features are lookups)."""
    rows = offline_rows(settings, "flight_date BETWEEN '2013-02-01' AND '2013-02-06'", n)
    return [request_of(r) for r in rows.to_dict("records")]


def ready(client: TestClient, condition=lambda health: True, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = client.get("/health").json()
        if health["ready"] and condition(health):
            return health
        assert time.monotonic() < deadline, json.dumps(health)
        time.sleep(0.3)


def logged(settings: Settings, request_ids: set[str], per_request: int = 1, timeout: float = 30) -> list[dict]:
    """The inference log's records of these requests, once there are ``per_request`` of each."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for path in settings.inference_log.glob("*.jsonl") for line in path.read_text().splitlines()
                   if (r := json.loads(line)).get("request_id") in request_ids]
        if len(records) >= per_request * len(request_ids):
            return records
        assert time.monotonic() < deadline, f"{len(records)} of {per_request * len(request_ids)} records logged"
        time.sleep(0.2)


def hex_id(span) -> str:
    return trace.format_span_id(span.context.span_id)


def test_a_prediction_is_followed_from_its_log_line_to_its_trace_and_model_version(champion_home):
    """With a canary and a shadow loaded: each answered record's span id is the scoring span that
    gave its probability (that version, that role), under the request's span; each shadow record's
    is the shadow's scoring span in the same trace. Lookup, computed and batch requests."""
    tracking = tracking_from(champion_home)
    registry, name = tracking.client(), tracking.registered_model
    champion = registry.get_model_version_by_alias(name, CHAMPION)
    # a second version of the same estimator (no training needed): the canary and the shadow
    source = registry.get_model_version_download_uri(name, champion.version)
    candidate = str(registry.create_model_version(name, source=source, run_id=champion.run_id).version)
    registry.set_registered_model_tag(name, CANARY_SHARE_TAG, "0.5")
    tracking.set_alias(CANARY_ALIAS, candidate)
    tracking.set_alias(SHADOW_ALIAS, candidate)
    exporter = InMemorySpanExporter()
    provider = tracing.new_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = PredictionService.from_settings(champion_home, stream=False)
    flights = flights_of(champion_home, 41)
    try:
        with TestClient(create_app(service, tracer_provider=provider)) as client:
            ready(client, lambda h: h["rollout"]["canary"] == candidate and h["rollout"]["shadow"] == candidate)
            looked_up = client.post("/predict", json=flights[0]).json()
            computed = client.post("/predict", json={**flights[0], "distance_miles": 777.0}).json()
            response = client.post("/predict/batch", json={"flights": flights[1:]})  # > QUICK_BATCH: a thread
            assert response.status_code == 200, response.text
            batch = response.json()["predictions"]
            answers = [looked_up, computed, *batch]
            records = logged(champion_home, {a["request_id"] for a in answers}, per_request=2)  # + the shadow's
    finally:
        provider.shutdown()
    spans = exporter.get_finished_spans()
    by_id = {hex_id(s): s for s in spans}

    def parent(span):
        return by_id[trace.format_span_id(span.parent.span_id)]

    def trace_of(answer) -> list:
        record = next(r for r in records if r["request_id"] == answer["request_id"] and r["stage"] != "shadow")
        return [s for s in spans if trace.format_trace_id(s.context.trace_id) == record["trace_id"]]

    answered = {r["request_id"]: r for r in records if r["stage"] != "shadow"}
    assert len(answered) == len(answers) and {a["stage"] for a in answers} == {"champion", "canary"}
    for answer in answers:
        record = answered[answer["request_id"]]
        assert HEX32.fullmatch(record["trace_id"]) and HEX16.fullmatch(record["span_id"])
        scoring = by_id[record["span_id"]]
        assert scoring.name == tracing.SCORING
        assert trace.format_trace_id(scoring.context.trace_id) == record["trace_id"]
        assert scoring.attributes[tracing.MODEL_VERSION] == record["model_version"] == answer["model_version"]
        assert scoring.attributes[tracing.MODEL_ROLE] == record["stage"] == answer["stage"]
        assert scoring.attributes[tracing.MODEL_NAME] == name
        predict = parent(scoring)
        assert predict.name == tracing.PREDICT
        request = parent(predict)  # FastAPI's span: the root of the trace
        assert request.kind == trace.SpanKind.SERVER and request.parent is None
        assert request.name in ("POST /predict", "POST /predict/batch")
    # the three requests are three traces; the batch is one
    assert len({answered[a["request_id"]]["trace_id"] for a in answers}) == 3

    one = trace_of(looked_up)
    named = {s.name: s for s in one}
    assert named[tracing.PREDICT].attributes[tracing.FLIGHT_ID] == looked_up["flight_id"]
    assert named[tracing.FEATURE_LOOKUP].attributes[tracing.LOOKED_UP] == 1
    assert parent(named[tracing.REALTIME_FEATURES]) is named[tracing.FEATURE_LOOKUP]
    assert named[tracing.SCORING].attributes[tracing.SCORED_AHEAD] is True
    assert tracing.COMPUTED_FEATURES not in named

    named = {s.name: s for s in trace_of(computed)}  # distance given: the feature SQL on request
    assert named[tracing.COMPUTED_FEATURES].attributes[tracing.COMPUTED] == 1
    assert parent(named[tracing.COMPUTED_FEATURES]) is named[tracing.FEATURE_LOOKUP]
    assert named[tracing.FEATURE_LOOKUP].attributes[tracing.LOOKED_UP] == 0
    assert named[tracing.SCORING].attributes[tracing.SCORED_AHEAD] is False

    scorings = [s for s in trace_of(batch[0]) if s.name == tracing.SCORING]
    assert sorted(s.attributes[tracing.MODEL_ROLE] for s in scorings) == ["canary", "champion"]
    assert {s.attributes[tracing.MODEL_ROLE]: s.attributes[tracing.FLIGHTS] for s in scorings} == {
        stage: sum(a["stage"] == stage for a in batch) for stage in ("champion", "canary")}
    assert {s.attributes[tracing.MODEL_VERSION] for s in scorings} == {str(champion.version), candidate}

    # the shadow: off the request path, a span of its own in the request's trace
    shadows = [r for r in records if r["stage"] == "shadow"]
    assert len(shadows) == len(answers)
    for record in shadows:
        span = by_id[record["span_id"]]
        assert span.name == tracing.SHADOW_SCORING and record["trace_id"] == answered[record["request_id"]]["trace_id"]
        assert span.attributes[tracing.MODEL_VERSION] == record["model_version"] == candidate
        assert span.attributes[tracing.MODEL_ROLE] == "shadow"
        assert parent(span).name == tracing.PREDICT
    # probes and scrapes are not traced
    assert not [s for s in spans if "/health" in s.name or "/metrics" in s.name]


def test_without_an_endpoint_nothing_is_traced(champion_home, monkeypatch):
    for variable in (*tracing.ENDPOINT_VARIABLES, "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(variable, raising=False)
    assert tracing.from_environment() is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    assert tracing.from_environment({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    for environ, service_name in ((endpoint, tracing.SERVICE_NAME), ({**endpoint, "OTEL_SERVICE_NAME": "api-b"}, "api-b")):
        provider = tracing.from_environment(environ)
        assert provider.resource.attributes["service.name"] == service_name
        provider.shutdown()

    service = PredictionService.from_settings(champion_home, stream=False)
    app = create_app(service)
    assert service.tracer is tracing.NO_TRACER and service.features.tracer is tracing.NO_TRACER
    with TestClient(app) as client:
        ready(client)
        answer = client.post("/predict", json=flights_of(champion_home, 1)[0]).json()
        assert type(app.middleware_stack).__name__ == "ServerErrorMiddleware"  # no OpenTelemetryMiddleware
        [record] = logged(champion_home, {answer["request_id"]})
    assert record["model_version"] == answer["model_version"]
    assert "trace_id" not in record and "span_id" not in record


@pytest.fixture
def receiver():
    with OtlpReceiver() as server:
        yield server


def test_with_an_endpoint_the_spans_are_posted_over_otlp_http(champion_home, monkeypatch, receiver):
    """``create_app`` without a provider, OTEL_EXPORTER_OTLP_ENDPOINT pointing at the receiver:
    the spans of a prediction arrive as protobuf at /v1/traces (at the latest when the app stops),
    under the service name mlplatform-serving, in the trace the log line names."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    for variable in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    service = PredictionService.from_settings(champion_home, stream=False)
    with TestClient(create_app(service)) as client:
        ready(client)
        answer = client.post("/predict", json=flights_of(champion_home, 1)[0]).json()
        [record] = logged(champion_home, {answer["request_id"]})
    assert receiver.posts, "nothing was exported"
    assert {(path, kind) for path, kind, _ in receiver.posts} == {("/v1/traces", "application/x-protobuf")}
    exported = {}
    for _, _, body in receiver.posts:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == tracing.SERVICE_NAME
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    exported[span.span_id.hex()] = span
    scoring = exported[record["span_id"]]
    assert scoring.name == tracing.SCORING and scoring.trace_id.hex() == record["trace_id"]
    attributes = {a.key: a.value for a in scoring.attributes}
    assert attributes[tracing.MODEL_VERSION].string_value == record["model_version"]
    assert {s.name for s in exported.values() if s.trace_id.hex() == record["trace_id"]} >= {
        "POST /predict", tracing.PREDICT, tracing.FEATURE_LOOKUP, tracing.REALTIME_FEATURES, tracing.SCORING}
