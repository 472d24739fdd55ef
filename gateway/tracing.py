"""Tracing: one invalidation followed from the producer to the UNLINK in every region.

A producer puts its W3C ``traceparent`` in the stream entry. The gateway carries it through the
mirror envelope and emits, per sampled invalidation, OpenTelemetry messaging spans joined to the
producer's trace:

- ``send <mirror stream>`` (PRODUCER) in the origin, one per peer, around the append to the peer;
- ``process <stream>`` (CONSUMER) in every region, around the UNLINK, with the lag in seconds
  (``invalgw.lag_seconds``); a failed apply makes ``process`` spans with ERROR status.

A failed send ends its span with ERROR status and ``error.type``; ``send`` spans name the
peer's Redis in ``server.address`` / ``server.port``.

The forward span's context replaces the event's ``traceparent`` in the envelope, so each far
``process`` span is a child of the ``send`` span that carried it. Invalidations without a sampled
``traceparent`` cost nothing here. Export follows the standard ``OTEL_*`` variables (see
:func:`configure`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
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


OTLP_DEFAULT_ENDPOINTS = {"http/protobuf": "http://localhost:4318", "grpc": "http://localhost:4317"}


def _env(*names: str) -> str:
    """The first of ``names`` set in the environment (stripped), else ``""``."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return ""


def configure(service_name: str) -> TracerProvider | None:
    """Set up export from the standard ``OTEL_*`` environment; None when nothing is exported.

    ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console``, both (comma-separated) or ``none``; unset,
    traces go over OTLP only when an endpoint is set. ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``:
    ``http/protobuf`` (default) or ``grpc``. ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``: the
    collector (default ``http://localhost:4318``, ``:4317`` for grpc). Logs one line saying
    where spans go, or why they cannot go anywhere although tracing was asked for.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    names = [n.strip().lower() for n in _env("OTEL_TRACES_EXPORTER").split(",") if n.strip()]
    if not names:
        names = ["otlp"] if endpoint else []
    processors = [p for p in (_processor(name, endpoint) for name in names) if p is not None]
    if not processors:
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def _processor(name: str, endpoint: str) -> SpanProcessor | None:
    if name == "none":
        return None
    if name == "console":
        log.info("tracing: spans are printed on stdout (OTEL_TRACES_EXPORTER=console)")
        return BatchSpanProcessor(ConsoleSpanExporter())
    if name != "otlp":
        log.warning(
            "tracing: OTEL_TRACES_EXPORTER=%s is not supported (otlp, console or none); "
            "traces are not exported",
            name,
        )
        return None
    exporter = _otlp_exporter(endpoint)
    return None if exporter is None else BatchSpanProcessor(exporter)


def _otlp_exporter(endpoint: str) -> SpanExporter | None:
    protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol or "http/protobuf"
    if protocol not in OTLP_DEFAULT_ENDPOINTS:
        log.warning(
            "tracing: OTLP protocol %r is not supported (http/protobuf or grpc); "
            "traces are not exported",
            protocol,
        )
        return None
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            exporter: SpanExporter = GrpcExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
    except ImportError:
        package = "opentelemetry-exporter-otlp-proto-grpc" if protocol == "grpc" else ""
        log.warning(
            "tracing: asked for OTLP (%s) but its exporter is not installed: %s; "
            "traces are not exported",
            protocol,
            f"pip install {package}" if package else "pip install 'invalgw[otlp]'",
        )
        return None
    log.info(
        "tracing: exporting spans with OTLP %s to %s",
        protocol,
        endpoint or f"{OTLP_DEFAULT_ENDPOINTS[protocol]} (the default: no endpoint set)",
    )
    return exporter


def shutdown(provider: TracerProvider, timeout_ms: int = 3000) -> None:
    """Export the spans still buffered (waiting at most ``timeout_ms``), then stop."""
    provider.force_flush(timeout_ms)
    provider.shutdown()


class InvalidationTracer:
    """Emits the gateway's spans for sampled invalidations of one region."""

    def __init__(
        self,
        region: str,
        provider: trace.TracerProvider | None = None,
        *,
        peers: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        self.region = region
        self.tracer: Tracer = (provider or trace.get_tracer_provider()).get_tracer("invalgw")
        self.peers = dict(peers or {})
        """Each peer's Redis (host, port), for ``server.address`` / ``server.port``."""

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
                    **self._server(peer),
                },
            )
            carrier: dict[str, str] = {}
            _propagator.inject(carrier, context=trace.set_span_in_context(span))
            spans.append(span)
            out.append(msgspec.structs.replace(event, traceparent=carrier.get("traceparent")))
        return out, spans

    def send_again(self, spans: Sequence[Span]) -> list[Span]:
        """Fresh ``send`` spans, siblings of ``spans`` (ended as failed), for an envelope sent
        again unchanged: the events in it keep naming the first attempt as their parent."""
        fresh: list[Span] = []
        for span in spans:
            parent = getattr(span, "parent", None)
            context = None
            if parent is not None:
                context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
            fresh.append(
                self.tracer.start_span(
                    getattr(span, "name", "send"),
                    context=context,
                    kind=SpanKind.PRODUCER,
                    attributes=dict(getattr(span, "attributes", None) or {}),
                )
            )
        return fresh

    def _server(self, peer: str) -> dict[str, str | int]:
        address = self.peers.get(peer)
        return {} if address is None else {"server.address": address[0], "server.port": address[1]}

    @staticmethod
    def end_forward(
        spans: Sequence[Span], *, duplicate: bool, error: BaseException | None = None
    ) -> None:
        """End the ``send`` spans; with ``error`` (an Exception), as failed: ERROR status and
        ``error.type``. A cancellation (a drain, a stop) is not an error of the send."""
        for span in spans:
            span.set_attribute("invalgw.duplicate", duplicate)
            if isinstance(error, Exception):
                _set_error(span, error)
            span.end()

    def failed(
        self,
        origin: str,
        stream: str,
        events: Sequence[Invalidation],
        started_ns: int,
        error: Exception,
    ) -> None:
        """Record ERROR ``process`` spans for sampled events whose apply failed (they are read
        again and retried, so a later ``process`` span of the same message may succeed)."""
        for event in events:
            if sampled(event.traceparent):
                span = self._process_span(origin, stream, event, started_ns)
                _set_error(span, error)
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
            lag_s = max(0.0, origin_now_ms - int(event.id.partition("-")[0])) / 1000
            span = self._process_span(origin, stream, event, started_ns)
            span.set_attribute("invalgw.lag_seconds", round(lag_s, 6))
            span.end(end_time=ended_ns)

    def _process_span(self, origin: str, stream: str, event: Invalidation, started_ns: int) -> Span:
        parent = _propagator.extract({"traceparent": event.traceparent or ""})
        return self.tracer.start_span(
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
                "invalgw.keys": len(event.keys),
            },
        )


def _set_error(span: Span, error: Exception) -> None:
    """The OpenTelemetry way to say a span failed: ERROR status and ``error.type``."""
    span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
    span.set_attribute("error.type", type(error).__qualname__)
