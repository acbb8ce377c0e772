"""What only the memory transport has: its registry, simulated faults, matchers, and its place in the suite.

Everything it shares with RabbitMQ is proven in test_api.py, against both.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from flask import Flask
from gevent.event import Event
from gevent.queue import Queue

from flask_nucleon_amqp import (
    AMQP,
    AMQPState,
    ConnectionBlocked,
    ConnectionError,
    ConnectionLost,
    Message,
    MessageStateError,
    NotFound,
    PukaConnection,
    _memory_broker,
    memory,
    signals,
)
from flask_nucleon_amqp._memory_routing import _erlang_equal, _headers_match, _topic_match, _words
from flask_nucleon_amqp.config import read_config
from flask_nucleon_amqp.memory import MemoryConnection

from conftest import BROKER_URL, make_app, outcome, wait_until


def _memory_app(name: str, **pools: Any) -> Flask:
    app = make_app(AMQP_URL=f"memory://{name}",
                   AMQP_POOLS=pools or {"publish": {"size": 1}, "listen": {"size": 1}})
    AMQP(app)
    return app


@pytest.fixture
def broker_name() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    memory.reset(name)


@pytest.fixture
def state(broker_name: str) -> Iterator[AMQPState]:
    app = _memory_app(broker_name, publish={"size": 1, "blocked_timeout": 0.2}, listen={"size": 1})
    yield app.extensions["amqp"]
    app.extensions["amqp"].close(timeout=5)


# -- its place ---------------------------------------------------------------------------------------

def test_never_the_default() -> None:
    assert BROKER_URL.startswith("amqp://")  # the project's own tests talk to RabbitMQ
    assert {s.transport for s in read_config({}).values()} == {"amqp"}
    app = make_app()
    AMQP(app)
    try:
        assert type(app.extensions["amqp"].connection()) is PukaConnection
    finally:
        app.extensions["amqp"].close(timeout=1)


def test_pools_naming_one_broker_share_it(broker_name: str) -> None:
    first, second = _memory_app(broker_name), _memory_app(broker_name)
    elsewhere = _memory_app(broker_name + "-other")
    try:
        conn = first.extensions["amqp"].connection()
        assert isinstance(conn, MemoryConnection) and conn.broker is memory.broker(broker_name)
        conn.queue_declare("shared")
        second.extensions["amqp"].publish("", "shared", b"across apps")
        message = first.extensions["amqp"].connection("listen").get("shared", no_ack=True)
        assert message is not None and message.body == b"across apps"
        with pytest.raises(NotFound):
            elsewhere.extensions["amqp"].queue_declare("shared", passive=True)
        assert memory.broker(broker_name).message_count("shared") == 0
    finally:
        for app in (first, second, elsewhere):
            app.extensions["amqp"].close(timeout=1)
        memory.reset(broker_name + "-other")


def test_reset_empties_the_broker_and_connections_stay_usable(state: AMQPState, broker_name: str) -> None:
    conn = state.connection()
    conn.exchange_declare("x", "fanout")
    conn.queue_declare("q")
    conn.queue_bind("q", "x")
    conn.publish("x", "", b"before")
    promise = state.connection("listen").consume("q", callback=lambda p, m: None)
    memory.reset(broker_name)
    assert wait_until(lambda: not state.connection("listen").has_consumer(promise))
    with pytest.raises(NotFound):
        conn.queue_declare("q", passive=True)
    with pytest.raises(NotFound):
        conn.publish("x", "", b"after")
    conn.queue_declare("q")  # the same connection goes on
    assert conn.queue_declare("q", passive=True)["message_count"] == 0
    assert broker_name in _memory_broker._brokers  # kept: connections are attached to it


def test_reset_forgets_a_broker_nobody_uses(broker_name: str) -> None:
    memory.broker(broker_name).exchanges["left-over"] = memory.broker(broker_name).exchanges["amq.direct"]
    memory.reset(broker_name)
    assert broker_name not in _memory_broker._brokers
    assert "left-over" not in memory.broker(broker_name).exchanges


def test_callbacks_run_in_the_callback_greenlet_in_order(state: AMQPState) -> None:
    conn = state.connection()
    conn.queue_declare("q")
    ran: list[tuple[int, Any]] = []
    done = Event()

    def record(promise: int, result: Any) -> None:
        ran.append((promise, gevent.getcurrent()))
        if len(ran) == 10:
            done.set()

    promises = [conn.publish("", "q", str(i), callback=record) for i in range(10)]
    assert ran == []  # not run in the caller, not before it yields
    assert done.wait(5)
    assert [promise for promise, _ in ran] == promises
    assert len({greenlet for _, greenlet in ran}) == 1 and ran[0][1] is not gevent.getcurrent()


def test_synchronous_calls_yield_to_the_hub(state: AMQPState) -> None:
    conn = state.connection()
    conn.queue_declare("q")
    ticks: list[int] = []
    ticker = gevent.spawn(lambda: [ticks.append(1) or gevent.sleep(0) for _ in range(1000)])  # type: ignore[func-returns-value]  # side effects in a lambda
    for i in range(50):
        conn.publish("", "q", str(i))
    ticker.kill()
    assert len(ticks) >= 40


def test_a_callback_requeueing_forever_does_not_starve_the_hub(state: AMQPState) -> None:
    conn = state.connection()
    conn.queue_declare("q")
    conn.publish("", "q", b"hot potato")
    bounces: list[int] = []
    promise = conn.consume("q", callback=lambda p, m: (bounces.append(1), m.reject(requeue=True)))  # type: ignore[func-returns-value]  # side effects in a lambda
    gevent.sleep(0.05)  # a timer still fires while the message bounces
    conn.cancel(promise)
    assert len(bounces) > 10


def test_server_properties_and_repr(state: AMQPState, broker_name: str) -> None:
    conn = state.connection()
    assert "idle" in repr(conn) and f"memory://{broker_name}" in repr(conn)
    assert conn.server_properties["product"] == "flask_nucleon_amqp memory broker"
    assert "open" in repr(conn) and conn.is_open


def test_closed_connection_refuses_work_and_gives_back_what_it_held(state: AMQPState) -> None:
    conn, listen = state.connection(), state.connection("listen")
    conn.queue_declare("q")
    conn.publish("", "q", b"held")
    held = listen.get("q")
    exclusive = listen.queue_declare("", exclusive=True)["queue"]
    listen.close()
    assert not listen.is_open
    with pytest.raises(ConnectionError, match="was closed"):
        listen.get("q")
    with pytest.raises(MessageStateError):
        assert held is not None and held.ack()
    with pytest.raises(NotFound):
        conn.queue_declare(exclusive, passive=True)
    again = conn.get("q")
    assert again is not None and again.redelivered
    assert listen.stats["opened"] == 1 and listen.stats["lost"] == 1


# -- simulated faults --------------------------------------------------------------------------------

def test_disconnect_fails_waiters_requeues_and_recovers(state: AMQPState, broker_name: str) -> None:
    conn, listen = state.connection(), state.connection("listen")
    conn.queue_declare("q")
    conn.queue_declare("waiting")
    exclusive = conn.queue_declare("", exclusive=True)["queue"]
    got: Queue = Queue()
    promise = listen.consume("q", callback=lambda p, m: got.put(m))
    conn.publish("", "q", b"held when the connection dropped")
    held = got.get(timeout=5)
    waiter = gevent.spawn(outcome, conn.consume, "waiting", timeout=10)
    gevent.sleep(0.01)
    events: list[tuple[str, Any]] = []

    def lost(sender: Any, **kwargs: Any) -> None:
        events.append(("lost", kwargs["reason"]))

    def recovered(sender: Any, **kwargs: Any) -> None:
        events.append(("recovered", sender))

    signals.connection_lost.connect(lost)
    signals.connection_recovered.connect(recovered)
    try:
        memory.broker(broker_name).disconnect("broker restart")
        error = waiter.get(timeout=5)
        assert isinstance(error, ConnectionLost) and "320 CONNECTION_FORCED - broker restart" in str(error)
        with pytest.raises(MessageStateError, match="deliver it again"):
            held.ack()
        again = got.get(timeout=5)  # the consumer resumed by itself, and the message came back
        assert again.body == held.body and again.redelivered
        again.ack()
        assert wait_until(lambda: len([e for e in events if e[0] == "recovered"]) == 2)
    finally:
        signals.connection_lost.disconnect(lost)
        signals.connection_recovered.disconnect(recovered)
    assert [e for e in events if e[0] == "lost"] == [("lost", "320 CONNECTION_FORCED - broker restart")] * 2
    assert listen.has_consumer(promise) and listen.stats["lost"] == 1 and listen.stats["recovered"] == 1
    with pytest.raises(NotFound):
        conn.queue_declare(exclusive, passive=True)  # exclusive queues die with their connection
    listen.cancel(promise)


def test_on_open_hooks_run_on_every_open(state: AMQPState, broker_name: str) -> None:
    conn = state.connection()
    opened: list[Any] = []
    conn.on_open.append(lambda c: (opened.append(c), c.queue_declare("declared-on-open")))  # type: ignore[func-returns-value]  # side effects in a lambda
    conn.publish("", "nowhere", b"x")
    memory.broker(broker_name).disconnect()
    assert wait_until(lambda: len(opened) == 2)
    assert opened == [conn, conn]
    assert conn.queue_declare("declared-on-open", passive=True)["queue"] == "declared-on-open"


def test_retry_publishes_again_when_the_connection_is_lost(broker_name: str) -> None:
    """As on RabbitMQ (tests/test_connection.py): a lost publish is reported, and ``retry=`` sends it again."""
    app = _memory_app(broker_name, publish={"size": 1, "blocked_timeout": 10})
    conn = app.extensions["amqp"].connection()
    conn.queue_declare("q")
    broker = memory.broker(broker_name)
    broker.block("disk alarm")  # holds both publishes until the connection is gone
    without_retry = gevent.spawn(outcome, conn.publish, "", "q", b"lost with its connection")
    with_retry = gevent.spawn(outcome, conn.publish, "", "q", b"retried", retry=1)
    gevent.sleep(0.05)
    broker.disconnect("broker restart", connection=conn)
    assert isinstance(without_retry.get(timeout=5), ConnectionLost)
    gevent.sleep(0.05)
    assert not with_retry.ready()  # published again on the new connection, which the alarm holds too
    broker.unblock()
    assert with_retry.get(timeout=5) is None
    assert [m.body for m in iter(lambda: conn.get("q", no_ack=True), None)] == [b"retried"]
    app.extensions["amqp"].close(timeout=5)


def test_block_holds_publishers_until_unblock(state: AMQPState, broker_name: str) -> None:
    conn = state.connection()
    conn.queue_declare("q")
    events: list[str] = []

    def blocked(sender: Any, **kwargs: Any) -> None:
        events.append(f"blocked: {kwargs['reason']}")

    def unblocked(sender: Any, **kwargs: Any) -> None:
        events.append("unblocked")

    signals.connection_blocked.connect(blocked)
    signals.connection_unblocked.connect(unblocked)
    broker = memory.broker(broker_name)
    try:
        broker.block("disk alarm")
        assert conn.blocked and conn.blocked_reason == "disk alarm"
        with pytest.raises(ConnectionBlocked, match="disk alarm"):
            conn.publish("", "q", b"refused after blocked_timeout")
        waiting = gevent.spawn(conn.publish, "", "q", b"goes through")
        gevent.sleep(0.05)
        broker.unblock()
        assert waiting.get(timeout=5) is None
    finally:
        signals.connection_blocked.disconnect(blocked)
        signals.connection_unblocked.disconnect(unblocked)
    assert events == ["blocked: disk alarm", "unblocked"]
    assert not conn.blocked and conn.stats["blocked_seconds"] > 0.2
    assert broker.message_count("q") == 1
    assert state.stats()["publish"]["blocked"] is False


# -- matchers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "key", "matches"), [
    ("a.b.c", "a.b.c", True), ("a.*.c", "a.b.c", True), ("a.*.c", "a.c", False), ("a.#.c", "a.c", True),
    ("a.#.c", "a.b.x.c", True), ("#", "", True), ("*", "", False), ("#.a.#", "a", True),
    ("#.a.#", "x.y.a.z", True), ("*.*", "a", False), ("*.*", "a.", True), ("a.#.#.b", "a.b", True),
    ("#.*", "", False), ("#.*", "a.b.c", True), ("a", "a.b", False),
])
def test_topic_match(pattern: str, key: str, matches: bool) -> None:
    assert _topic_match(_words(pattern), _words(key)) is matches


def test_headers_match_and_erlang_equality() -> None:
    assert _headers_match({"x-match": "all", "a": 1, "b": None}, {"a": 1.0, "b": "anything"})
    assert not _headers_match({"x-match": "all", "a": 1}, {"a": True})
    assert _headers_match({"x-match": "any", "a": 1, "b": 2}, {"b": 2})
    assert not _headers_match({"x-match": "any", "x-a": 1}, {"x-a": 1})
    assert _headers_match({"x-match": "any-with-x", "x-a": 1}, {"x-a": 1})
    assert _erlang_equal("text", b"text") and not _erlang_equal(1, True) and _erlang_equal(2, 2.0)
    import decimal

    assert not _erlang_equal(decimal.Decimal("1.0"), decimal.Decimal("1.00"))
    assert not _erlang_equal(decimal.Decimal("1"), 1)


def test_listener_on_the_memory_transport(state: AMQPState) -> None:
    state.queue_declare("jobs")
    done: Queue = Queue()

    def work(connection: Any, promise: int, message: Message) -> None:
        done.put(message.json())

    listener = state.register_and_spawn_amqp_listener("jobs", work, prefetch_count=2)
    for i in range(5):
        state.publish("", "jobs", json={"n": i})
    assert sorted(done.get(timeout=5)["n"] for _ in range(5)) == list(range(5))
    assert listener.stop(timeout=5)
    assert state.connection().queue_declare("jobs", passive=True)["message_count"] == 0
