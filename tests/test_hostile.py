"""Hostile deliveries (issue 18): no message anyone can publish kills a shared connection or wedges a queue.

Messages are published by pika. Some hostile headers RabbitMQ routes as they
are (deep nesting, a timestamp past the year 9999); others it refuses itself
(unknown field types, tables whose lengths do not add up: RabbitMQ closes the
publisher's connection with 541), so those are written into the content
header of a delivery by a proxy between the broker and this client, as a
broken broker or a man in the middle would. The connection goes through that
proxy in every test here; it leaves frames without the marker header alone.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from typing import Any, cast

import gevent
import pytest
from _pika_peer import RawTable, nested_tables, pika_peer, pika_publish, raw
from flask import Flask
from gevent.queue import Queue as GQueue

from flask_nucleon_amqp import AMQP, AMQPState, Binding, Exchange, Message, PukaConnection, Queue, signals

from _proxy import Proxy
from conftest import BROKER_HOST, BROKER_PORT, Names, make_app, wait_until

MARK = b"hostile-case"


@pytest.fixture(scope="module")
def pika_channel() -> Iterator[Any]:
    with pika_peer() as channel:
        yield channel


def _table(entries: bytes, size: int | None = None) -> bytes:
    return struct.pack(">I", len(entries) if size is None else size) + entries


#: Content-header property lists (flags first) the proxy puts in place of a delivery's own, by case.
REWRITTEN: dict[str, bytes] = {
    # an unknown field type, then a correlation_id that is still read
    "unknown-type": struct.pack(">H", 0x2000 | 0x0400) + _table(b"\x01aZ\x00") + b"\x03c-1",
    # a string longer than its table
    "string-past-its-table": struct.pack(">H", 0x2000) + _table(b"\x01aS\x00\x00\x00\x09x"),
    # a table longer than its frame: nothing after it can be found
    "truncated-table": struct.pack(">H", 0x2000) + _table(b"\x01aS\x00\x00\x00\x01x", size=100),
    # a key with no value
    "key-without-value": struct.pack(">H", 0x2000) + _table(b"\x01a"),
}


def _rewrite(frame_type: int, channel: int, payload: bytes) -> bytes:
    if frame_type == 0x02 and MARK in payload:
        for case, properties in REWRITTEN.items():
            if case.encode() in payload:
                return payload[:12] + properties
    return payload


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    proxy = Proxy((BROKER_HOST, BROKER_PORT), rewrite=_rewrite)
    yield proxy
    proxy.close()


@pytest.fixture
def app(proxy: Proxy) -> Iterator[Flask]:
    app = make_app(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F",
                   AMQP_POOLS={"publish": {"size": 1}, "listen": {"size": 1}})
    AMQP(app)
    yield app
    app.extensions["amqp"].close(timeout=5)


@pytest.fixture
def state(app: Flask) -> AMQPState:
    return app.extensions["amqp"]  # type: ignore[no-any-return]


@pytest.fixture
def lost() -> Iterator[list[str]]:
    """Reasons of every connection lost during the test."""
    reasons: list[str] = []

    def note(_sender: Any, reason: str, **_: Any) -> None:
        reasons.append(reason)

    signals.connection_lost.connect(note)
    yield reasons
    signals.connection_lost.disconnect(note)


class _Bystander:
    """A listener on another queue of the same connection, fed a message at each step."""

    def __init__(self, state: AMQPState, names: Names) -> None:
        self.state = state
        self.queue = names.queue("bystander")
        state.queue_declare(self.queue)
        self.received: GQueue[bytes] = GQueue()
        self.listener = state.register_and_spawn_amqp_listener(
            self.queue, lambda _conn, _promise, message: self.received.put(message.body))
        self.sent = 0

    def still_receives(self) -> None:
        self.sent += 1
        body = f"step {self.sent}".encode()
        self.state.publish("", self.queue, body)
        assert self.received.get(timeout=10) == body


#: (how pika publishes it, what a get then sees: decoded headers, or None for a decode error)
FROM_PIKA: dict[str, tuple[Any, Any]] = {
    "nested-450": (RawTable(nested_tables(450)), None),
    "nested-5000": (RawTable(nested_tables(5000)), None),
    "nested-101": (RawTable(nested_tables(101)), None),
    "timestamp-past-9999": ({"t": raw("T", "Q", 2**63)}, None),
    "unsigned-B": ({"b": raw("B", "B", 255)}, {"b": 255}),
    "unsigned-u": ({"u": raw("u", "H", 65535)}, {"u": 65535}),
    "unsigned-i": ({"i": raw("i", "I", 2**32 - 1)}, {"i": 2**32 - 1}),
}
CASES = [*FROM_PIKA, *REWRITTEN]


def _publish_hostile(case: str, queue: str, pika_channel: Any) -> None:
    if case in FROM_PIKA:
        pika_publish(pika_channel, queue, case.encode(), FROM_PIKA[case][0])
    else:  # a well-formed message the proxy turns into the hostile one on its way to us
        pika_publish(pika_channel, queue, case.encode(), {MARK.decode(): case})


def _check_hostile(case: str, message: Message | None) -> None:
    assert message is not None and message.body == case.encode()
    expected = FROM_PIKA[case][1] if case in FROM_PIKA else None
    if expected is not None:
        assert message.decode_error is None and message.headers == expected
        return
    assert message.decode_error and message.headers == {}
    assert isinstance(message.raw_properties, bytes) and message.raw_properties
    if case in REWRITTEN:
        assert message.raw_properties == REWRITTEN[case]
    if case == "unknown-type":
        assert "unknown field type 'Z'" in message.decode_error
        assert message.correlation_id == "c-1"  # what could be read is kept
    if case.startswith("nested"):
        assert "deeper than 100" in message.decode_error


@pytest.mark.parametrize("case", CASES)
def test_hostile_delivery_costs_nothing_but_itself(state: AMQPState, names: Names, pika_channel: Any,
                                                   lost: list[str], case: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    conn = cast(PukaConnection, state.connection("listen"))
    bystander = _Bystander(state, names)  # consumes on that same connection
    queue = names.queue()
    conn.queue_declare(queue)
    _publish_hostile(case, queue, pika_channel)
    pika_publish(pika_channel, queue, b"good", {"n": 1})
    bystander.still_receives()
    with caplog.at_level(logging.WARNING, logger="flask_nucleon_amqp"):
        first = conn.get(queue)
    _check_hostile(case, first)
    assert first is not None
    if first.decode_error:
        [warning] = [r for r in caplog.records if "undecodable" in r.getMessage()]
        text = warning.getMessage()
        assert queue in text and f"delivery {first.delivery_tag} " in text and first.decode_error in text
    first.reject(requeue=True)
    bystander.still_receives()
    again = conn.get(queue)  # the same message, again: no poison
    _check_hostile(case, again)
    assert again is not None and again.redelivered
    again.ack()
    bystander.still_receives()
    good = conn.get(queue)
    assert good is not None and good.body == b"good" and good.headers == {"n": 1}
    good.ack()
    bystander.still_receives()
    assert lost == [] and conn.stats["lost"] == 0 and conn.is_open


@pytest.mark.parametrize("case", ["nested-5000", "unknown-type", "truncated-table"])
def test_consumer_callback_and_sync_consume_get_the_hostile_message(
        state: AMQPState, names: Names, pika_channel: Any, lost: list[str], case: str) -> None:
    conn = state.connection("listen")
    queue = names.queue()
    conn.queue_declare(queue)
    _publish_hostile(case, queue, pika_channel)
    pika_publish(pika_channel, queue, b"good", {})
    one = conn.consume(queue, timeout=10)
    _check_hostile(case, one)
    assert one is not None
    one.ack()
    got: GQueue[Message] = GQueue()
    _publish_hostile(case, queue, pika_channel)
    promise = conn.consume(queue, lambda _promise, message: got.put(message))
    try:
        first, second = got.get(timeout=10), got.get(timeout=10)
        assert first.body == b"good"
        _check_hostile(case, second)
        first.ack()
        second.ack()
    finally:
        conn.cancel(promise)
    assert lost == [] and conn.stats["lost"] == 0


@pytest.mark.parametrize("case", ["nested-5000", "unknown-type"])
def test_listener_rejects_the_hostile_message_once_and_handles_the_rest(
        state: AMQPState, names: Names, pika_channel: Any, lost: list[str], case: str) -> None:
    dead, dead_queue, queue = names.exchange("dlx"), names.queue("dead"), names.queue()
    state.declare(Exchange(dead, "fanout"), Queue(dead_queue), Binding(dead, queue=dead_queue),
                  Queue(queue, dead_letter_exchange=dead))
    bystander = _Bystander(state, names)
    handled: GQueue[bytes] = GQueue()
    calls: list[bytes] = []

    def callback(_conn: Any, _promise: int, message: Message) -> None:
        calls.append(message.body)
        handled.put(message.body)

    listener = state.register_and_spawn_amqp_listener(queue, callback)  # on_error="requeue", the default
    pika_publish(pika_channel, queue, b"before", {})
    _publish_hostile(case, queue, pika_channel)
    pika_publish(pika_channel, queue, b"after", {})
    assert {handled.get(timeout=10), handled.get(timeout=10)} == {b"before", b"after"}
    bystander.still_receives()
    assert wait_until(lambda: state.queue_declare(dead_queue, passive=True)["message_count"] == 1, timeout=10)
    gevent.sleep(0.3)  # a requeue loop would show here
    assert calls == [b"before", b"after"] or calls == [b"after", b"before"]
    assert listener.stats["failed"] == 1 and listener.consuming
    assert state.queue_declare(queue, passive=True)["message_count"] == 0
    dead_letter = state.connection("listen").get(dead_queue)
    assert dead_letter is not None and dead_letter.body == case.encode()  # the original, as published
    dead_letter.ack()
    bystander.still_receives()
    assert lost == []


@pytest.mark.parametrize("case", ["nested-101", "unknown-type"])
def test_listener_with_retry_sends_the_hostile_message_to_its_dead_queue(
        state: AMQPState, names: Names, pika_channel: Any, case: str) -> None:
    queue = names.queue()
    names.queues += [f"{queue}.retry", f"{queue}.dead"]
    state.queue_declare(queue)
    handled: GQueue[bytes] = GQueue()
    listener = state.register_and_spawn_amqp_listener(
        queue, lambda _c, _p, message: handled.put(message.body), retry={"max_attempts": 3, "delay": 0.1})
    _publish_hostile(case, queue, pika_channel)
    pika_publish(pika_channel, queue, b"after", {})
    assert handled.get(timeout=10) == b"after"
    assert wait_until(lambda: state.queue_declare(f"{queue}.dead", passive=True)["message_count"] == 1, timeout=10)
    dead = state.connection("listen").get(f"{queue}.dead")
    assert dead is not None and dead.body == case.encode()
    assert dead.headers["x-failure-reason"].startswith("undecodable headers: ")
    dead.ack()
    assert listener.stats["failed"] == 1 and handled.empty()


# -- connection-level misbehaviour still ends the connection, cleanly and with a reason -----------

#: Bytes a broken broker sends between two frames, and what the connection's end says.
BROKEN_STREAMS = {
    "unknown-frame-type": (struct.pack("!BHI", 9, 0, 0) + b"\xce", "unknown frame type 9"),
    "frame-over-frame-max": (struct.pack("!BHI", 3, 1, 2**30), "more than frame_max"),
    "garbage": (b"HTTP/1.1 400 Bad Request\r\n\r\n", "more than frame_max"),
    "unknown-method": (struct.pack("!BHII", 1, 0, 4, 0xFFFF0001) + b"\xce", "unknown method 65535.1"),
    "channel-never-opened": (struct.pack("!BHI", 3, 999, 1) + b"x\xce", "channel 999, which was never opened"),
    "short-method-frame": (struct.pack("!BHII", 1, 0, 4, 0x003C0050) + b"\xce", "malformed"),  # basic.ack, no args
}


@pytest.mark.parametrize("case", BROKEN_STREAMS)
def test_connection_level_misbehaviour_ends_the_connection_with_a_reason_and_recovers(
        names: Names, lost: list[str], case: str) -> None:
    data, reason = BROKEN_STREAMS[case]
    proxy = Proxy((BROKER_HOST, BROKER_PORT), rewrite=lambda _t, _c, payload: payload)
    app = make_app(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F",
                   AMQP_POOLS={"publish": {"size": 1}})
    AMQP(app)
    try:
        conn = app.extensions["amqp"].connection()
        queue = names.queue()
        conn.queue_declare(queue)
        proxy.inject(data)
        assert wait_until(lambda: conn.stats["lost"] == 1, timeout=5)
        assert len(lost) == 1 and reason in lost[0], lost
        conn.publish("", queue, b"after")  # recovered: a new connection
        message = conn.get(queue)
        assert message is not None and message.body == b"after"
        message.ack()
        assert conn.stats["recovered"] == 1
    finally:
        app.extensions["amqp"].close(timeout=5)
        proxy.close()
