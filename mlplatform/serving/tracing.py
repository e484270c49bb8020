"""OpenTelemetry traces of the serving path: the one place that sets up a tracer provider.

A request to ``/predict`` is a trace: FastAPI's instrumentation makes the request span, and the
service adds its own spans under it (names below): the prediction, the feature lookup, the
real-time (rt_) features the stream moved, the feature SQL for a flight computed on request,
the scoring by each answering version (attributes: model name and version, its role champion or
canary, the number of flights, whether the probabilities were scored ahead) and, off the request
path, the shadow's scoring (a child of the same request). Every inference log record carries
the trace id and the id of the scoring span that gave its probability, so one line of the log
leads to its trace, and the trace to the model version and the features.

Spans go out only when asked for (``from_environment``): with ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, over OTLP/HTTP in batches off the request path
(the exporter reads the endpoint, headers and timeout from the standard variables), with the
service name ``mlplatform-serving`` unless ``OTEL_SERVICE_NAME`` says otherwise. Otherwise there
is no provider: the service's tracer is OpenTelemetry's no-op one and the app is not
instrumented. A caller (a test) may pass its own provider instead. Nothing here touches
OpenTelemetry's global provider, and importing this module does nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.trace import Span, Tracer, TracerProvider

log = logging.getLogger("mlplatform.serving")
SERVICE_NAME = "mlplatform-serving"
TRACER_NAME = "mlplatform.serving"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# our spans, children of FastAPI's request span
PREDICT = "predict"
FEATURE_LOOKUP = "feature lookup"
REALTIME_FEATURES = "real-time features"
COMPUTED_FEATURES = "features computed on request"
SCORING = "scoring"
SHADOW_SCORING = "shadow scoring"
# their attributes
MODEL_NAME = "mlplatform.model.name"
MODEL_VERSION = "mlplatform.model.version"
MODEL_ROLE = "mlplatform.model.role"  # champion, canary or shadow
FLIGHTS = "mlplatform.flights"  # how many flights the span is about
FLIGHT_ID = "mlplatform.flight_id"  # the flight of a single prediction
SCORED_AHEAD = "mlplatform.scored_ahead"  # probabilities looked up, not computed
LOOKED_UP = "mlplatform.features.looked_up"  # flights whose features are the schedule's rows
COMPUTED = "mlplatform.features.computed"  # flights whose features the feature SQL computed
MOVED = "mlplatform.features.moved_by_stream"  # flights whose rt_ features the stream moved
STREAM_CLOCK = "mlplatform.features.stream_clock"
AS_OF = "mlplatform.features.as_of"
# the URLs not traced: probes and scrapes (regular expressions, as the instrumentation takes them)
NOT_TRACED = "/health,/metrics"

# spans per export (the SDK's default is 512): encoding 512 spans holds the GIL for ~13 ms, which a
# request waiting for it sees (p99 at 200 req/s: 15-28 ms with 512, 8.6 ms with 128, 4-5 ms untraced)
EXPORT_BATCH = 128

NO_TRACER: Tracer = trace.NoOpTracer()


def from_environment(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A provider exporting over OTLP/HTTP (``BatchSpanProcessor``) when an OTLP endpoint is
    configured, else None: then nothing is traced or exported. ``OTEL_SDK_DISABLED=true`` wins."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service_name = environ.get("OTEL_SERVICE_NAME", "").strip() or SERVICE_NAME
    provider = new_provider(service_name)
    log.info("tracing: spans of %s go over OTLP/HTTP to %s", service_name,
             next(environ[name] for name in reversed(ENDPOINT_VARIABLES) if environ.get(name, "").strip()))
    # (the exporter reads the OTEL_EXPORTER_OTLP_* variables, the processor the OTEL_BSP_* ones)
    batch = None if environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "").strip() else EXPORT_BATCH
    provider.add_span_processor(BatchSpanProcessor(InBackground(OTLPSpanExporter()), max_export_batch_size=batch))
    return provider


class InBackground:
    """A span exporter that lowers the CPU priority of the thread it exports from (the batch
    processor's), as the server's other background threads do (``live.in_background``): encoding
    and sending spans gives way to the requests."""

    def __init__(self, exporter):
        self.exporter, self._niced = exporter, False

    def export(self, spans):
        if not self._niced:
            from mlplatform.serving.live import in_background

            in_background()
            self._niced = True
        return self.exporter.export(spans)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def new_provider(service_name: str = SERVICE_NAME):
    """An SDK provider with the serving's resource and no processor yet (a test adds its own)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    return SdkTracerProvider(resource=Resource.create({"service.name": service_name}))


def tracer_of(provider: TracerProvider | None) -> Tracer:
    return provider.get_tracer(TRACER_NAME) if provider is not None else NO_TRACER


def instrument(app, provider: TracerProvider) -> None:
    """FastAPI's request spans for ``app``, from ``provider`` (not the global one)."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.metrics import NoOpMeterProvider

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, meter_provider=NoOpMeterProvider(),
                                       excluded_urls=NOT_TRACED, exclude_spans=["receive", "send"])


def shutdown(provider: TracerProvider | None) -> None:
    """Export what is pending and stop (an SDK provider; the API's has nothing to flush)."""
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


def ids_of(span: Span) -> dict[str, str]:
    """{"trace_id", "span_id"} of a recording span, as W3C trace context writes them (32 and 16
    lowercase hex digits); {} for a span that records nothing (tracing off)."""
    if not span.is_recording():
        return {}
    context = span.get_span_context()
    return {"trace_id": trace.format_trace_id(context.trace_id), "span_id": trace.format_span_id(context.span_id)}
