"""Tracing: one invalidation followed from the producer to the UNLINK in every region.

A producer puts its W3C ``traceparent`` in the stream entry. The gateway carries it through the
mirror envelope and emits, per sampled invalidation, OpenTelemetry messaging spans joined to the
producer's trace:

- ``send <mirror stream>`` (PRODUCER) in the origin, one per peer, around the append to the peer;
- ``process <stream>`` (CONSUMER) in every region, around the UNLINK, with the lag as attribute.

The forward span's context replaces the event's ``traceparent`` in the envelope, so each far
``process`` span is a child of the ``send`` span that carried it. Invalidations without a sampled
``traceparent`` cost nothing here. Export follows the standard ``OTEL_*`` variables: OTLP/HTTP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set and the ``otlp`` extra is
installed, the console with ``OTEL_TRACES_EXPORTER=console``, nothing otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from invalgw.proto import Invalidation

log = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()
_SAMPLED_FLAGS = frozenset(f"{flags:02x}" for flags in range(256) if flags & 1)


def sampled(traceparent: str | None) -> bool:
    """True for a well-formed ``traceparent`` whose sampled flag is set (cheap, no parsing)."""
    if traceparent is None or len(traceparent) != 55:
        return False
    return traceparent[-2:] in _SAMPLED_FLAGS


def configure(service_name: str) -> TracerProvider | None:
    """Set up export from the ``OTEL_*`` environment; None when nothing is to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    has_endpoint = any(
        os.environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    processor: SpanProcessor | None = None
    if exporter_name == "console":
        processor = BatchSpanProcessor(ConsoleSpanExporter())
    elif exporter_name in ("otlp", "") and has_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: "
                "pip install 'invalgw[otlp]'; traces are not exported"
            )
            return None
        processor = BatchSpanProcessor(OTLPSpanExporter())
    if processor is None:
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    return provider


def shutdown(provider: TracerProvider, timeout_ms: int = 3000) -> None:
    """Export the spans still buffered (waiting at most ``timeout_ms``), then stop."""
    provider.force_flush(timeout_ms)
    provider.shutdown()


class InvalidationTracer:
    """Emits the gateway's spans for sampled invalidations of one region."""

    def __init__(self, region: str, provider: trace.TracerProvider | None = None) -> None:
        self.region = region
        self.tracer: Tracer = (provider or trace.get_tracer_provider()).get_tracer("invalgw")

    def start_forward(
        self, peer: str, destination: str, events: Sequence[Invalidation]
    ) -> tuple[list[Invalidation], list[Span]]:
        """Open ``send`` spans for the sampled events; returns the events re-parented to them
        (to be put in the envelope) and the spans, for :meth:`end_forward`."""
        if not any(event.traceparent and sampled(event.traceparent) for event in events):
            return list(events), []
        out: list[Invalidation] = []
        spans: list[Span] = []
        for event in events:
            if not sampled(event.traceparent):
                out.append(event)
                continue
            parent = _propagator.extract({"traceparent": event.traceparent or ""})
            span = self.tracer.start_span(
                f"send {destination}",
                context=parent,
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "redis",
                    "messaging.operation.name": "send",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": destination,
                    "messaging.message.id": event.id,
                    "invalgw.origin": self.region,
                    "invalgw.peer": peer,
                    "invalgw.keys": len(event.keys),
                },
            )
            carrier: dict[str, str] = {}
            _propagator.inject(carrier, context=trace.set_span_in_context(span))
            spans.append(span)
            out.append(msgspec.structs.replace(event, traceparent=carrier.get("traceparent")))
        return out, spans

    @staticmethod
    def end_forward(spans: Sequence[Span], *, duplicate: bool) -> None:
        for span in spans:
            span.set_attribute("invalgw.duplicate", duplicate)
            span.end()

    def applied(
        self,
        origin: str,
        stream: str,
        events: Sequence[Invalidation],
        started_ns: int,
        origin_now_ms: float,
    ) -> None:
        """Record ``process`` spans for the sampled applied events, with their lag."""
        if not any(event.traceparent for event in events):
            return
        ended_ns = time.time_ns()
        for event in events:
            if not sampled(event.traceparent):
                continue
            lag_ms = max(0.0, origin_now_ms - int(event.id.partition("-")[0]))
            parent = _propagator.extract({"traceparent": event.traceparent or ""})
            span = self.tracer.start_span(
                f"process {stream}",
                context=parent,
                kind=SpanKind.CONSUMER,
                start_time=started_ns,
                attributes={
                    "messaging.system": "redis",
                    "messaging.operation.name": "process",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": stream,
                    "messaging.consumer.group.name": "apply",
                    "messaging.message.id": event.id,
                    "invalgw.origin": origin,
                    "invalgw.region": self.region,
                    "invalgw.lag_ms": round(lag_ms, 3),
                    "invalgw.keys": len(event.keys),
                },
            )
            span.end(end_time=ended_ns)
