"""OpenTelemetry tracing against the real broker, with the SDK's in-memory exporter.

The SDK provider is handed to the extension with ``tracing.use_tracer_provider``
(and to Flask's instrumentation with ``tracer_provider=``), never installed
globally: the rest of the suite runs with no tracer provider, as most users do.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pika
import pytest
from flask import Flask
from gevent.queue import Queue as GQueue
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from flask_nucleon_amqp import (
    AMQP,
    AMQPState,
    Connection,
    Message,
    NotFound,
    Unroutable,
    memory,
    tracing,
)
from flask_nucleon_amqp.cli import amqp_cli

from conftest import BROKER_HOST, BROKER_PORT, BROKER_URL, Names, make_app, wait_until

TESTS = Path(__file__).parent


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Finished spans of this test; the extension traces with a provider of the test's own."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    exporter.provider = provider  # type: ignore[attr-defined]
    yield exporter
    tracing.use_tracer_provider(None)
    assert not tracing.processing, "a process span was left open"


@pytest.fixture
def tapp(names: Names) -> Iterator[Flask]:
    app = make_app()
    AMQP(app)
    yield app
    app.extensions["amqp"].close(timeout=5)


@pytest.fixture
def state(tapp: Flask) -> AMQPState:
    return tapp.extensions["amqp"]  # type: ignore[no-any-return]


def _named(exporter: InMemorySpanExporter, prefix: str, count: int = 1) -> list[ReadableSpan]:
    assert wait_until(lambda: len([s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]) >= count)
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_http_request_publish_and_listener_make_one_trace(
        names: Names, tapp: Flask, state: AMQPState, spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    FlaskInstrumentor().instrument_app(tapp, tracer_provider=spans.provider)  # type: ignore[attr-defined, no-untyped-call]
    try:
        @tapp.post("/order")
        def order() -> str:
            state.publish("", queue, json={"id": 7}, message_id="order-7", correlation_id="conv-1")
            return "ok"

        handled: GQueue = GQueue()
        state.register_and_spawn_amqp_listener(queue, lambda conn, promise, message: handled.put(message))
        assert tapp.test_client().post("/order").status_code == 200
        message = handled.get(timeout=10)
    finally:
        FlaskInstrumentor().uninstrument_app(tapp)  # type: ignore[no-untyped-call]  # untyped library
    assert message.headers["traceparent"].startswith("00-")
    (server,) = [s for s in _named(spans, "POST") if s.kind is SpanKind.SERVER]
    (producer,) = _named(spans, "publish ")
    (consumer,) = _named(spans, "process ")
    assert len({server.context.trace_id, producer.context.trace_id, consumer.context.trace_id}) == 1
    assert _parent_id(producer) == server.context.span_id
    assert _parent_id(consumer) == producer.context.span_id
    assert producer.kind is SpanKind.PRODUCER and consumer.kind is SpanKind.CONSUMER
    assert producer.name == f"publish {queue}" and consumer.name == f"process {queue}"
    assert dict(producer.attributes or {}) == {
        "messaging.system": "rabbitmq", "messaging.operation.name": "publish", "messaging.operation.type": "send",
        "messaging.destination.name": queue, "messaging.rabbitmq.destination.routing_key": queue,
        "messaging.message.id": "order-7", "messaging.message.conversation_id": "conv-1",
        "messaging.message.body.size": len(message.body), "server.address": BROKER_HOST, "server.port": BROKER_PORT}
    attributes = dict(consumer.attributes or {})
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.rabbitmq.message.delivery_tag"] == message.delivery_tag
    assert attributes["messaging.message.id"] == "order-7"
    assert attributes[tracing.OUTCOME] == "acked"
    assert producer.status.status_code is StatusCode.UNSET and consumer.status.status_code is StatusCode.UNSET
    # The producer span ends at the confirm: within the request, before the listener is done.
    assert server.start_time is not None and producer.start_time is not None
    assert producer.end_time is not None and server.end_time is not None
    assert server.start_time <= producer.start_time and producer.end_time <= server.end_time


def test_the_callers_headers_are_not_changed(names: Names, state: AMQPState, spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    headers = {"kind": "order"}
    state.publish("", queue, b"x", headers=headers)
    assert headers == {"kind": "order"}
    message = state.get(queue, no_ack=True)
    assert message is not None and set(message.headers) == {"kind", "traceparent"}


def test_failed_publishes_end_their_span_with_the_error(
        names: Names, state: AMQPState, spans: InMemorySpanExporter) -> None:
    missing = names.exchange()
    with pytest.raises(NotFound):
        state.connection().publish(missing, "k", b"x")
    with pytest.raises(Unroutable):
        state.connection().publish("", names.queue("nobody"), b"x", mandatory=True)
    box: GQueue = GQueue()
    state.connection().publish("", names.queue("nobody"), b"x", mandatory=True,
                               callback=lambda promise, result: box.put(result))
    assert isinstance(box.get(timeout=10), Unroutable)
    not_found, unroutable, unroutable_async = _named(spans, "publish ", 3)
    for span, error in ((not_found, NotFound), (unroutable, Unroutable), (unroutable_async, Unroutable)):
        assert span.status.status_code is StatusCode.ERROR
        assert (span.attributes or {})["error.type"] == f"flask_nucleon_amqp.exceptions.{error.__name__}"
        assert [event.name for event in span.events] == ["exception"]
        assert cast(str, (span.events[0].attributes or {})["exception.type"]).endswith(error.__name__)
    assert not_found.name == f"publish {missing}:k"


def test_an_async_publish_span_ends_at_the_confirm(names: Names, state: AMQPState,
                                                   spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    box: GQueue = GQueue()
    state.connection().publish("", queue, b"x", callback=lambda promise, result: box.put(result))
    assert box.get(timeout=10) == {}
    (span,) = _named(spans, "publish ")
    assert span.status.status_code is StatusCode.UNSET and span.end_time is not None


def test_a_requeued_message_records_its_exception_and_outcome(
        names: Names, state: AMQPState, spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)

    def flaky(connection: Connection, promise: int, message: Message) -> None:
        if not message.redelivered:
            raise ValueError("first time fails")

    listener = state.register_and_spawn_amqp_listener(queue, flaky, on_error="requeue")
    state.publish("", queue, b"x")
    first, second = _named(spans, "process ", 2)
    assert wait_until(lambda: listener.stats["handled"] == 1)
    (producer,) = _named(spans, "publish ")
    assert (first.attributes or {})[tracing.OUTCOME] == "requeued"
    assert first.status.status_code is StatusCode.ERROR
    assert [event.name for event in first.events] == ["exception"]
    assert (first.events[0].attributes or {})["exception.message"] == "first time fails"
    assert (second.attributes or {})[tracing.OUTCOME] == "acked"
    assert second.status.status_code is StatusCode.UNSET
    assert _parent_id(first) == _parent_id(second) == producer.context.span_id


def test_rejected_retried_and_dead_lettered_outcomes(names: Names, state: AMQPState,
                                                     spans: InMemorySpanExporter) -> None:
    rejecting, retrying = names.queue("rej"), names.queue("retry")
    names.queues += [f"{retrying}.retry", f"{retrying}.dead"]
    state.queue_declare(rejecting)
    state.queue_declare(retrying)

    def fails(connection: Connection, promise: int, message: Message) -> None:
        raise RuntimeError("no")

    state.register_and_spawn_amqp_listener(rejecting, fails, on_error="reject")
    listener = state.register_and_spawn_amqp_listener(retrying, fails, retry=dict(max_attempts=2, delay=0.1))
    state.publish("", rejecting, b"x")
    state.publish("", retrying, b"y")
    assert wait_until(lambda: listener.stats["failed"] == 2)
    processed = _named(spans, "process ", 3)
    outcomes = {(span.name, (span.attributes or {})[tracing.OUTCOME]) for span in processed}
    assert outcomes == {(f"process {rejecting}", "rejected"), (f"process {retrying}", "retried"),
                        (f"process {retrying}", "dead-lettered")}
    # The retry is published from inside the first attempt's span, and the second attempt continues it.
    first, second = sorted((s for s in processed if s.name == f"process {retrying}"),
                           key=lambda s: cast(int, s.start_time))
    republish = [s for s in _named(spans, "publish ", 4) if _parent_id(s) == first.context.span_id]
    assert len(republish) == 1 and _parent_id(second) == republish[0].context.span_id
    assert len({first.context.trace_id, second.context.trace_id}) == 1


def test_a_consume_callback_runs_in_a_process_span(names: Names, state: AMQPState,
                                                    spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    done: GQueue = GQueue()

    def callback(promise: int, message: Message) -> None:
        message.reject(requeue=False)
        done.put(message)

    conn = state.get_amqp_pool("listen").connection()
    promise = conn.consume(queue, callback)
    try:
        state.publish("", queue, b"x")
        done.get(timeout=10)
        (consumer,) = _named(spans, "process ")
    finally:
        conn.cancel(promise)
    (producer,) = _named(spans, "publish ")
    assert _parent_id(consumer) == producer.context.span_id
    assert (consumer.attributes or {})[tracing.OUTCOME] == "rejected"


def test_a_message_without_trace_headers_starts_a_new_trace(names: Names, state: AMQPState,
                                                            spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    tracing.use_tracer_provider(None)  # published with tracing off: no trace context in the headers
    state.publish("", queue, b"x")
    tracing.use_tracer_provider(spans.provider)  # type: ignore[attr-defined]
    handled: GQueue = GQueue()
    state.register_and_spawn_amqp_listener(queue, lambda conn, promise, message: handled.put(message))
    assert "traceparent" not in handled.get(timeout=10).headers
    (consumer,) = _named(spans, "process ")
    assert consumer.parent is None and not _named_quiet(spans, "publish ")


def _named_quiet(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def test_a_traceparent_published_by_pika_is_continued(names: Names, state: AMQPState,
                                                      spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    trace_id, parent_id = "4bf92f3577b34a4e8e4b0a0a4b0b1c2d", "00f067aa0ba902b7"
    blocking = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    try:
        blocking.channel().basic_publish("", queue, b"from pika", pika.BasicProperties(
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "vendor=1"}))
    finally:
        blocking.close()
    handled: GQueue = GQueue()
    state.register_and_spawn_amqp_listener(queue, lambda conn, promise, message: handled.put(message))
    assert handled.get(timeout=10).body == b"from pika"
    (consumer,) = _named(spans, "process ")
    assert consumer.context.trace_id == int(trace_id, 16)
    assert consumer.parent is not None and consumer.parent.span_id == int(parent_id, 16)
    assert consumer.parent.is_remote and consumer.context.trace_state.get("vendor") == "1"


def test_a_message_published_here_carries_a_w3c_traceparent_for_other_clients(
        names: Names, state: AMQPState, spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    state.publish("", queue, b"x")
    (producer,) = _named(spans, "publish ")
    blocking = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    try:
        _, properties, body = blocking.channel().basic_get(queue, auto_ack=True)
    finally:
        blocking.close()
    version, trace_id, span_id, flags = properties.headers["traceparent"].split("-")
    assert (version, int(trace_id, 16), int(span_id, 16)) == ("00", producer.context.trace_id,
                                                               producer.context.span_id)
    assert int(flags, 16) & 1  # sampled


def test_call_is_one_span_until_the_reply(names: Names, state: AMQPState, spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    state.register_and_spawn_amqp_listener(queue, lambda conn, promise, message: b"pong")
    reply = state.connection().call("", queue, b"ping", timeout=10)
    assert reply.body == b"pong"
    (call,) = _named(spans, "call ")
    assert call.kind is SpanKind.PRODUCER and (call.attributes or {})["messaging.operation.name"] == "call"
    process = next(s for s in _named(spans, "process ") if s.name == f"process {queue}")
    assert _parent_id(process) == call.context.span_id
    # The replier's publish span ends after its write returns: the reply may reach the caller (and the call span
    # end) first, so wait for it, and check what is causal: the reply was sent between the call's start and end.
    def reply_publishes() -> list[Any]:
        return [s for s in _named(spans, "publish ") if _parent_id(s) == process.context.span_id]
    assert wait_until(lambda: len(reply_publishes()) == 1, timeout=5), reply_publishes()
    (reply_publish,) = reply_publishes()
    assert call.start_time is not None and process.start_time is not None and call.end_time is not None
    assert reply_publish.start_time is not None
    assert call.start_time < process.start_time <= reply_publish.start_time <= call.end_time


def test_cli_publish_is_traced(names: Names, tapp: Flask, state: AMQPState, spans: InMemorySpanExporter) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    result = tapp.test_cli_runner().invoke(amqp_cli, ["publish", "", queue, "hello"])
    assert result.exit_code == 0, result.output
    (producer,) = _named(spans, "publish ")
    message = state.get(queue, no_ack=True)
    assert message is not None and f"{producer.context.span_id:016x}" in message.headers["traceparent"]


def test_no_tracer_provider_means_no_spans_and_no_headers(names: Names, state: AMQPState) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    assert tracing.ON and tracing.tracer() is None  # installed, but no provider configured
    state.publish("", queue, b"x", headers={"a": 1})
    message = state.get(queue, no_ack=True)
    assert message is not None and message.headers == {"a": 1}


def test_without_opentelemetry_installed_nothing_is_imported_or_added(names: Names) -> None:
    queue = names.queue()
    script = textwrap.dedent(f"""
        import sys
        sys.modules["opentelemetry"] = None  # as if the extra were not installed
        sys.path.insert(0, "tests")
        from conftest import make_app
        from flask_nucleon_amqp import AMQP, tracing
        app = make_app()
        AMQP(app)
        state = app.extensions["amqp"]
        state.queue_declare({queue!r})
        state.publish("", {queue!r}, b"x", headers={{"a": 1}})
        message = state.get({queue!r}, no_ack=True)
        loaded = sorted(name for name, module in sys.modules.items()
                        if name.startswith("opentelemetry") and module is not None)
        print(tracing.ON, message.headers, loaded)
        state.close()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "False {'a': 1} []"


def test_one_trace_from_a_gunicorn_request_to_a_listener_in_another_process(
        names: Names, state: AMQPState, tmp_path: Path) -> None:
    """POST /messages in a gunicorn worker, the listener in `flask amqp listen`: spans from both, one trace."""
    from _traced_app import read, render
    from test_gunicorn import _env, _gunicorn, _http

    prefix, room, dead = f"test-tchat-{names.run}", names.exchange("room"), names.exchange("dead")
    names.queues += [f"{prefix}.listener.bob", f"{prefix}.inbox.bob", f"{prefix}.listener.alice",
                     f"{prefix}.inbox.alice"]
    settings = tmp_path / "chat.cfg"
    settings.write_text(f"AMQP_URL = {BROKER_URL!r}\nCHAT_ROOM = {room!r}\nCHAT_USERS = ['alice', 'bob']\n"
                        f"CHAT_PREFIX = {prefix!r}\nCHAT_DEAD_LETTER_EXCHANGE = {dead!r}\nAMQP_TOPOLOGY = {{}}\n"
                        "AMQP_START_LISTENERS = False\n")
    web_spans, listen_spans = tmp_path / "web.jsonl", tmp_path / "listen.jsonl"
    app_ref = "_traced_app:create_app()"
    declared = subprocess.run([sys.executable, "-m", "flask", "--app", app_ref, "amqp", "declare"], cwd=TESTS,
                              env=_env(CHAT_SETTINGS=str(settings), TRACE_FILE=str(tmp_path / "declare.jsonl")),
                              capture_output=True, text=True, timeout=60)
    assert declared.returncode == 0, declared.stderr
    with (tmp_path / "listen.log").open("wb") as listen_log:
        listen = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", app_ref, "amqp", "listen"], cwd=TESTS, stdout=listen_log,
            stderr=listen_log, env=_env(CHAT_SETTINGS=str(settings), TRACE_FILE=str(listen_spans),
                                        TRACE_SERVICE="flask amqp listen", AMQP_START_LISTENERS="1"))
    try:
        assert wait_until(lambda: int(state.queue_declare(f"{prefix}.listener.bob", passive=True)
                                      ["consumer_count"]) == 1, timeout=30), (tmp_path / "listen.log").read_text()
        web_env = _env(CHAT_SETTINGS=str(settings), TRACE_FILE=str(web_spans), TRACE_SERVICE="gunicorn worker")
        with _gunicorn(TESTS, app_ref, web_env, tmp_path / "gunicorn.log") as (_server, port):
            assert wait_until(lambda: _port_answers(port), timeout=30), (tmp_path / "gunicorn.log").read_text()
            status, _ = _http(port, "POST", "/messages", {"from": "alice", "to": "bob", "text": "traced"})
            assert status == 202
            assert wait_until(lambda: listen_spans.exists() and len(read(listen_spans)) >= 2, timeout=20)
    finally:
        listen.send_signal(signal.SIGTERM)
        listen.wait(timeout=30)
    (server,) = [s for s in read(web_spans) if s["kind"] == "SERVER" and s["name"].startswith("POST")]
    trace = [s for s in read(web_spans) + read(listen_spans) if s["trace_id"] == server["trace_id"]]
    print(render(trace))
    (producer,) = [s for s in trace if s["name"] == f"publish {room}:bob"]
    (process,) = [s for s in trace if s["name"] == f"process {room}:bob:{prefix}.listener.bob"]
    (inbox,) = [s for s in trace if s["name"] == f"publish {prefix}.inbox.bob"]
    assert producer["parent_id"] == server["span_id"] and producer["pid"] == server["pid"]
    assert process["parent_id"] == producer["span_id"] and process["pid"] == listen.pid != server["pid"]
    assert inbox["parent_id"] == process["span_id"] and process["attributes"]["nucleon.amqp.outcome"] == "acked"
    assert producer["kind"] == "PRODUCER" and process["kind"] == "CONSUMER"


def _port_answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("transport", ["rabbitmq", "memory"])
def test_both_transports_trace_alike(transport: str, names: Names, spans: InMemorySpanExporter) -> None:
    """The memory transport makes the same spans as RabbitMQ (checked against the real broker here)."""
    broker = f"test-{names.run}"
    app = make_app(**({"AMQP_URL": f"memory://{broker}"} if transport == "memory" else {}))
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    queue = names.queue()
    try:
        state.queue_declare(queue)
        handled: GQueue = GQueue()
        state.register_and_spawn_amqp_listener(queue, lambda conn, promise, message: handled.put(message))
        state.publish("", queue, b"x", headers={"kind": "order"})
        assert handled.get(timeout=10).headers["kind"] == "order"
        with pytest.raises(NotFound):
            state.publish(names.exchange(), "k", b"x")
        sent, failed = _named(spans, "publish ", 2)
        (processed,) = _named(spans, "process ")
    finally:
        state.close(timeout=5)
        if transport == "memory":
            memory.reset(broker)
    assert _parent_id(processed) == sent.context.span_id and sent.context.trace_id == processed.context.trace_id
    assert (processed.attributes or {})[tracing.OUTCOME] == "acked"
    assert sent.status.status_code is StatusCode.UNSET and failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "flask_nucleon_amqp.exceptions.NotFound"


def test_a_publish_handed_over_from_an_os_thread_keeps_the_callers_span(
        amqp: AMQPState, names: Names, spans: InMemorySpanExporter) -> None:
    """The call runs in the hub (another thread, another greenlet): the caller's current span still parents it."""
    queue = names.queue()
    amqp.queue_declare(queue)
    outcome: dict[str, Any] = {}

    def in_thread() -> None:
        try:
            tracer = spans.provider.get_tracer("test")  # type: ignore[attr-defined]
            with tracer.start_as_current_span("request in a thread") as span:
                outcome["caller"] = span.get_span_context().span_id
                amqp.get_amqp_pool().connection().publish("", queue, b"x")
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    worker = threading.Thread(target=in_thread)
    worker.start()
    assert wait_until(lambda: not worker.is_alive(), timeout=20)
    assert "error" not in outcome, outcome
    (producer,) = _named(spans, "publish ")
    assert _parent_id(producer) == outcome["caller"]
