"""One invalidation followed in one trace: producer → forward → apply in every region."""

from __future__ import annotations

import importlib.util

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from invalgw.config import RegionConfig
from invalgw.producer import Invalidator
from invalgw.tracing import sampled
from tests.conftest import clients, running, wait_gone, wait_until

pytestmark = pytest.mark.anyio


async def test_one_trace_spans_producer_forward_and_apply_in_every_region(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    producer_tracer = provider.get_tracer("orders-service")
    key = f"{namespace}:order:1"
    async with clients(configs) as redis_by_region, running(configs, tracer_provider=provider):
        for client in redis_by_region.values():
            await client.set(key, "cached")
        with producer_tracer.start_as_current_span("update order", kind=SpanKind.PRODUCER):
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            invalidator = Invalidator(
                redis_by_region["us-east"], stream=configs["us-east"].streams.local
            )
            await invalidator.invalidate(key, traceparent=carrier["traceparent"])
        for region, client in redis_by_region.items():
            await wait_gone(client, [key], region=region)

        async def all_spans_ended() -> bool:
            return len(exporter.get_finished_spans()) >= 6

        await wait_until(all_spans_ended, what="producer, 2 send and 3 process spans")
    provider.shutdown()

    spans = exporter.get_finished_spans()
    producer = one(spans, "update order")
    assert {span.context.trace_id for span in spans} == {producer.context.trace_id}

    sends = [span for span in spans if span.name.startswith("send ")]
    assert sorted(str(s.attributes["invalgw.peer"]) for s in sends if s.attributes) == [
        "ap-south",
        "eu-west",
    ]
    for send in sends:
        assert send.kind is SpanKind.PRODUCER
        assert parent_of(send) == producer.context.span_id
        assert send.attributes is not None
        assert send.attributes["messaging.system"] == "redis"
        assert send.attributes["messaging.destination.name"] == f"{namespace}-gw:mirror:{{us-east}}"

    processes = {
        str(span.attributes["invalgw.region"]): span
        for span in spans
        if span.name.startswith("process ") and span.attributes
    }
    assert set(processes) == {"us-east", "eu-west", "ap-south"}
    assert parent_of(processes["us-east"]) == producer.context.span_id
    send_to = {str(s.attributes["invalgw.peer"]): s for s in sends if s.attributes}
    for region in ("eu-west", "ap-south"):
        far = processes[region]
        assert far.kind is SpanKind.CONSUMER
        assert parent_of(far) == send_to[region].context.span_id
        assert far.attributes is not None
        assert far.attributes["invalgw.origin"] == "us-east"
        sent = send_to[region].attributes or {}
        assert far.attributes["messaging.message.id"] == sent["messaging.message.id"]
        assert 0 <= float(str(far.attributes["invalgw.lag_seconds"])) < 10
    peer_ports = {
        peer.name: int(peer.url.rsplit(":", 1)[1].split("/")[0])
        for peer in configs["us-east"].peers
    }
    for peer, send in send_to.items():
        assert send.attributes is not None
        assert send.attributes["server.address"] == "127.0.0.1"
        assert send.attributes["server.port"] == peer_ports[peer]


async def test_unsampled_invalidations_make_no_spans(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    key = f"{namespace}:quiet"
    unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    assert not sampled(unsampled)
    async with clients(configs) as redis_by_region, running(configs, tracer_provider=provider):
        for client in redis_by_region.values():
            await client.set(key, "cached")
        invalidator = Invalidator(
            redis_by_region["us-east"], stream=configs["us-east"].streams.local
        )
        await invalidator.invalidate(key, traceparent=unsampled)
        await invalidator.invalidate(f"{key}:2")
        for region, client in redis_by_region.items():
            await wait_gone(client, [key], region=region)
    provider.shutdown()
    assert exporter.get_finished_spans() == ()


def one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, [span.name for span in spans]
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_sampled_flag_is_read_from_the_traceparent() -> None:
    assert sampled("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert not sampled(None)
    assert not sampled("garbage")
    assert not sampled("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz")


OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("variables", "exports", "said"),
    [
        ({}, False, ""),
        (
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
            False,
            "",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp"},
            True,
            "exporting spans with OTLP http/protobuf to http://localhost:4318 (the default",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"},
            True,
            "to http://collector:4318/v1/traces",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            False,
            "asked for OTLP (grpc) but its exporter is not installed",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            False,
            "OTLP protocol 'http/json' is not supported",
        ),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, False, "OTEL_TRACES_EXPORTER=zipkin is not supported"),
    ],
)
def test_the_otel_variables_are_honoured_and_the_outcome_is_said_once(
    otel_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variables: dict[str, str],
    exports: bool,
    said: str,
) -> None:
    from invalgw import tracing

    grpc = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None
    if grpc and "grpc" in variables.values():
        pytest.skip("the grpc exporter is installed here")
    for name, value in variables.items():
        otel_env.setenv(name, value)
    with caplog.at_level("INFO", logger="invalgw.tracing"):
        provider = tracing.configure("invalgw-test")
    try:
        assert (provider is not None) == exports
        lines = [r.getMessage() for r in caplog.records if r.name == "invalgw.tracing"]
        if said:
            assert len(lines) == 1, lines
            assert said in lines[0]
        else:
            assert lines == []
    finally:
        if provider is not None:
            provider.shutdown()
