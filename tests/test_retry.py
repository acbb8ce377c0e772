"""Listener retries with delay: a TTL queue that dead-letters back, then a dead-letter queue with the reason."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from gevent.queue import Queue as GQueue

from flask_nucleon_amqp import AMQP, AMQPState, Binding, Connection, Exchange, Message, NotFound, Queue
from flask_nucleon_amqp.retry import MAX_REASON_LENGTH, RetryPolicy, retry_declarations
from flask_nucleon_amqp.topology import Topology

from conftest import Names, close_broker_connection, make_app, wait_until


@pytest.fixture
def state(names: Names) -> Iterator[AMQPState]:
    """An app's AMQP state, closed (listeners stopped) before ``names`` deletes the queues."""
    app: Flask = make_app()
    AMQP(app)
    yield app.extensions["amqp"]
    app.extensions["amqp"].close(timeout=5)


def _work_queue(names: Names, state: AMQPState, label: str = "work") -> str:
    """A queue to listen on; its retry and dead-letter queues are deleted with it."""
    queue = names.queue(label)
    names.queues += [f"{queue}.retry", f"{queue}.dead"]
    state.queue_declare(queue)
    return queue


def _ready(state: AMQPState, queue: str) -> int:
    return int(state.queue_declare(queue, passive=True)["message_count"])


def _exists(state: AMQPState, queue: str) -> bool:
    try:
        state.queue_declare(queue, passive=True)
    except NotFound:
        return False
    return True


def test_a_message_failing_twice_is_handled_once_on_its_third_attempt(names: Names, state: AMQPState) -> None:
    room = names.exchange("room")
    queue = names.queue("orders")
    names.queues += [f"{queue}.retry", f"{queue}.dead"]
    state.declare(Exchange(room, "topic"), Queue(queue), Binding(room, queue=queue, routing_key="orders.*"))
    attempts: list[tuple[Any, ...]] = []
    handled: GQueue = GQueue()

    def flaky(connection: Connection, promise: int, message: Message) -> None:
        attempts.append((time.monotonic(), message.headers.get("x-retry-count"), message.exchange,
                         message.routing_key, message.body, message.message_id, message.delivery_mode,
                         message.headers.get("tenant"), message.timestamp))
        if len(attempts) < 3:
            raise RuntimeError(f"attempt {len(attempts)} fails")
        handled.put(message.body)

    listener = state.register_and_spawn_amqp_listener(queue, flaky, retry=dict(max_attempts=3, delay=0.2))
    state.publish(room, "orders.new", b"order 7", persistent=True, message_id="m-7", headers={"tenant": "acme"},
                  timestamp=1_700_000_000)
    assert handled.get(timeout=10) == b"order 7"
    assert wait_until(lambda: listener.stats == {"received": 3, "handled": 1, "failed": 2})
    # Counted in the header; the callback sees the message as first published on every attempt.
    assert [a[1] for a in attempts] == [None, 1, 2]
    assert {a[2:] for a in attempts} == {(room, "orders.new", b"order 7", "m-7", 2, "acme", 1_700_000_000)}
    gaps = [later[0] - earlier[0] for earlier, later in zip(attempts, attempts[1:], strict=False)]
    assert all(gap >= 0.18 for gap in gaps), gaps  # the broker held it for the delay
    listener.stop(timeout=5)
    assert handled.empty() and len(attempts) == 3  # handled exactly once, no stray copy came back
    assert [_ready(state, q) for q in (queue, f"{queue}.retry", f"{queue}.dead")] == [0, 0, 0]


class PaymentDeclined(Exception):
    pass


def test_a_message_failing_every_attempt_ends_in_the_dead_letter_queue_with_its_reason(
        names: Names, state: AMQPState, caplog: pytest.LogCaptureFixture) -> None:
    queue = _work_queue(names, state)
    dead = f"{queue}.dead"
    calls: list[Any] = []

    def hopeless(connection: Connection, promise: int, message: Message) -> None:
        calls.append(message.headers.get("x-retry-count"))
        raise PaymentDeclined("card 4242 declined: " + "x" * 2000)

    with caplog.at_level(logging.ERROR, logger="flask_nucleon_amqp.listener"):
        listener = state.register_and_spawn_amqp_listener(queue, hopeless, retry=dict(max_attempts=3, delay=0.1))
        state.publish("", queue, json={"order": 7}, correlation_id="c-7")
        assert wait_until(lambda: _ready(state, dead) == 1, timeout=10)
    assert calls == [None, 1, 2]
    assert listener.stats == {"received": 3, "handled": 0, "failed": 3}
    message = state.get(dead)
    assert message is not None
    assert message.json() == {"order": 7} and message.correlation_id == "c-7"
    assert message.content_type == "application/json"
    assert message.headers["x-retry-count"] == 2  # tried three times: sent back twice
    reason = message.headers["x-failure-reason"]
    assert reason.startswith("test_retry.PaymentDeclined: card 4242 declined: xxx")
    assert len(reason) == MAX_REASON_LENGTH and reason.endswith("...")
    message.ack()
    assert [_ready(state, q) for q in (queue, f"{queue}.retry", dead)] == [0, 0, 0]
    plans = [r.getMessage() for r in caplog.records if "raised on delivery" in r.getMessage()]
    assert len(plans) == 3 and all(r.exc_info is not None for r in caplog.records if "raised" in r.getMessage())
    assert "attempt 1 of 3; trying again in 0.1s" in plans[0]
    assert f"attempt 3 of 3; message sent to '{dead}'" in plans[2]


def test_max_attempts_one_dead_letters_at_the_first_failure(names: Names, state: AMQPState) -> None:
    queue = _work_queue(names, state)

    def fails(connection: Connection, promise: int, message: Message) -> None:
        raise KeyError("sku")

    listener = state.register_and_spawn_amqp_listener(queue, fails, retry=dict(max_attempts=1, delay=0))
    state.publish("", queue, b"once")
    assert wait_until(lambda: _ready(state, f"{queue}.dead") == 1, timeout=5)
    message = state.get(f"{queue}.dead")
    assert message is not None and message.headers["x-failure-reason"] == "KeyError: 'sku'"
    assert message.headers["x-retry-count"] == 0
    message.ack()
    assert listener.stats == {"received": 1, "handled": 0, "failed": 1}


def test_retry_queues_are_declared_with_the_listener(names: Names, state: AMQPState) -> None:
    queue = _work_queue(names, state)
    listener = state.register_and_spawn_amqp_listener(queue, lambda c, p, m: None,
                                                      retry=RetryPolicy(max_attempts=4, delay=1.5))
    retry_queue, dead_queue = retry_declarations(queue, RetryPolicy(4, 1.5))
    assert retry_queue == Queue(f"{queue}.retry", message_ttl=1500, dead_letter_exchange="",
                                dead_letter_routing_key=queue)
    assert dead_queue == Queue(f"{queue}.dead")
    assert listener.retry_declarations == (retry_queue, dead_queue)
    assert state.topology.queue(f"{queue}.retry") == retry_queue  # re-declared with the topology
    # The broker has them, with these very arguments.
    assert [r.status for r in Topology(retry_queue, dead_queue).check(state.connection())] == ["ok", "ok"]
    assert f"on error: retry (4 attempts, 1.5s apart), then '{queue}.dead'" in listener.describe()


@pytest.mark.parametrize("declare_on_start", [True, False])
def test_retry_queues_come_back_after_a_reconnect(names: Names, declare_on_start: bool) -> None:
    queue = names.queue("work")
    names.queues += [f"{queue}.retry", f"{queue}.dead"]
    app = make_app(AMQP_DECLARE_ON_START=declare_on_start)
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        state.queue_declare(queue)
        listener = state.register_and_spawn_amqp_listener(queue, lambda c, p, m: None,
                                                          retry=dict(max_attempts=2, delay=0.1))
        state.queue_delete(f"{queue}.retry")
        state.queue_delete(f"{queue}.dead")
        assert listener.connection is not None
        close_broker_connection(listener.connection, "retry test")
        assert wait_until(lambda: listener.connection is not None and listener.connection.stats["recovered"] == 1,
                          timeout=15)
        assert _exists(state, f"{queue}.retry") and _exists(state, f"{queue}.dead")
    finally:
        state.close(timeout=5)


def test_a_missing_retry_queue_loses_nothing(
        names: Names, state: AMQPState, caplog: pytest.LogCaptureFixture) -> None:
    queue = _work_queue(names, state)
    seen: list[Any] = []
    handled: GQueue = GQueue()

    def flaky(connection: Connection, promise: int, message: Message) -> None:
        seen.append((message.redelivered, message.headers.get("x-retry-count")))
        if len(seen) == 1:
            raise RuntimeError("first attempt fails")
        handled.put(message.body)

    listener = state.register_and_spawn_amqp_listener(queue, flaky, retry=dict(max_attempts=3, delay=0.1))
    state.queue_delete(f"{queue}.retry")  # an operator deleted it; the copy would be unroutable
    with caplog.at_level(logging.ERROR, logger="flask_nucleon_amqp.listener"):
        state.publish("", queue, b"keep me")
        assert handled.get(timeout=10) == b"keep me"
    # Not dropped: given back to the queue (after a pause), and tried again.
    assert seen == [(False, None), (True, None)]
    assert f"could not send delivery 1 to '{queue}.retry'" in caplog.text and "NO_ROUTE" in caplog.text
    assert wait_until(lambda: listener.stats == {"received": 2, "handled": 1, "failed": 1})


def test_a_listener_on_a_missing_queue_leaves_no_retry_queues(names: Names, state: AMQPState) -> None:
    queue = names.queue("absent")
    names.queues += [f"{queue}.retry", f"{queue}.dead"]
    with pytest.raises(NotFound):
        state.register_and_spawn_amqp_listener(queue, lambda c, p, m: None, retry=dict(max_attempts=2, delay=1))
    assert state.listeners == [] and state.topology.queue(f"{queue}.retry") is None
    assert not _exists(state, f"{queue}.retry") and not _exists(state, f"{queue}.dead")


@pytest.mark.parametrize("retry, error, match", [
    ({"max_attempts": 0, "delay": 1}, ValueError, "retry: max_attempts must be an integer >= 1, got 0"),
    ({"max_attempts": True, "delay": 1}, ValueError, "retry: max_attempts must be an integer"),
    ({"max_attempts": 3, "delay": -1}, ValueError, "retry: delay must be a number of seconds >= 0, got -1"),
    ({"max_attempts": 3, "delay": float("nan")}, ValueError, "retry: delay must be"),
    ({"max_attempts": 3, "delay": 10**8}, ValueError, "longer than the broker's longest TTL"),
    ({"max_attempts": 3}, ValueError, "retry needs delay, e.g. retry=dict"),
    ({}, ValueError, "retry needs max_attempts and delay"),
    ({"max_attempts": 3, "delay": 1, "backoff": 2}, ValueError, "unknown option\\(s\\) 'backoff'"),
    (3, TypeError, "retry must be a dict like dict"),
])
def test_bad_retry_options_fail_at_once(state: AMQPState, retry: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        state.register_and_spawn_amqp_listener("q", lambda c, p, m: None, retry=retry)
    with pytest.raises(error, match=match):
        AMQP().listener("q", retry=retry)  # at decoration time, before any app exists


def test_retry_replaces_on_error(state: AMQPState) -> None:
    with pytest.raises(ValueError, match="on_error='reject' does not apply with retry=..."):
        state.register_and_spawn_amqp_listener("q", lambda c, p, m: None, on_error="reject",
                                               retry=dict(max_attempts=2, delay=1))


def test_a_queue_name_too_long_for_its_retry_queue_is_refused(state: AMQPState) -> None:
    with pytest.raises(ValueError, match="would be longer than 255 bytes"):
        state.register_and_spawn_amqp_listener("q" * 250, lambda c, p, m: None, retry=dict(max_attempts=2, delay=1))


def test_two_listeners_on_one_queue_need_the_same_delay(names: Names, state: AMQPState) -> None:
    queue = _work_queue(names, state)
    state.register_and_spawn_amqp_listener(queue, lambda c, p, m: None, retry=dict(max_attempts=2, delay=1))
    state.register_and_spawn_amqp_listener(queue, lambda c, p, m: None, retry=dict(max_attempts=5, delay=1))
    with pytest.raises(ValueError, match=f"queue '{queue}.retry' is registered twice with different settings"):
        state.register_and_spawn_amqp_listener(queue, lambda c, p, m: None, retry=dict(max_attempts=2, delay=2))


def test_the_decorator_registers_retry_queues_before_init_app(names: Names) -> None:
    queue = names.queue("work")
    names.queues += [f"{queue}.retry", f"{queue}.dead"]
    amqp = AMQP()
    handled: GQueue = GQueue()

    @amqp.listener(queue, retry=dict(max_attempts=2, delay=0.1))
    def on_message(connection: Connection, promise: int, message: Message) -> None:
        if "x-retry-count" not in message.headers:
            raise RuntimeError("first attempt fails")
        handled.put(message.body)

    assert [q.name for q in amqp.topology.queues()] == [f"{queue}.retry", f"{queue}.dead"]
    app = make_app(AMQP_TOPOLOGY={"queues": {queue: {}}})
    amqp.init_app(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        state.initialise()
        state.publish("", queue, b"decorated")
        assert handled.get(timeout=10) == b"decorated"
    finally:
        state.close(timeout=5)
