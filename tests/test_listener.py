"""Listeners: Nucleon's callback signature, ack policy, errors, concurrency, supervision, graceful stop."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from flask import Flask, current_app
from gevent.queue import Queue as GQueue

from flask_nucleon_amqp import (
    AMQP,
    AMQPState,
    Binding,
    Connection,
    Exchange,
    Message,
    NotFound,
    Queue,
    memory,
)
from flask_nucleon_amqp import listener as listener_module

from _proxy import Proxy
from conftest import BROKER_HOST, BROKER_PORT, Names, close_broker_connection, make_app, wait_until


@pytest.fixture
def lapp(names: Names) -> Iterator[Flask]:
    """An app closed (listeners stopped) before ``names`` deletes its queues."""
    app = make_app()
    AMQP(app)
    yield app
    app.extensions["amqp"].close(timeout=5)


@pytest.fixture
def state(lapp: Flask) -> AMQPState:
    return lapp.extensions["amqp"]  # type: ignore[no-any-return]


def _ready(state: AMQPState, queue: str) -> int:
    return int(state.queue_declare(queue, passive=True)["message_count"])


def test_nucleon_pattern_callback_gets_connection_promise_message_in_app_context(
        names: Names, lapp: Flask, state: AMQPState) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    seen: GQueue = GQueue()

    def recv_callback(connection: Connection, promise: int, result: Message) -> None:
        seen.put((connection, promise, result["body"], current_app._get_current_object()))  # type: ignore[attr-defined]  # a LocalProxy
        connection.ack(result)  # as the Nucleon document does: no double ack follows

    listener = state.register_and_spawn_amqp_listener(queue, recv_callback)
    assert listener.consuming and listener in state.listeners
    for i in range(10):
        state.publish("", queue, f"Message {i}")
    got = [seen.get(timeout=10) for _ in range(10)]
    assert {body for _, _, body, _ in got} == {f"Message {i}".encode() for i in range(10)}
    assert all(conn is listener.connection and promise == listener.promise and app is lapp
               for conn, promise, _, app in got)
    assert wait_until(lambda: listener.stats["handled"] == 10)
    assert listener.stats == {"received": 10, "handled": 10, "failed": 0}
    listener.stop(timeout=5)
    assert _ready(state, queue) == 0  # all acked: nothing came back at cancel


def test_message_left_unsettled_is_acked_when_the_callback_returns(names: Names, state: AMQPState) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    listener = state.register_and_spawn_amqp_listener(queue, lambda conn, promise, message: None)
    state.publish("", queue, b"x")
    assert wait_until(lambda: listener.stats["handled"] == 1)
    listener.stop(timeout=5)  # cancelling requeues anything still unacked
    assert _ready(state, queue) == 0


def test_raising_callback_is_logged_and_its_message_requeued(
        names: Names, state: AMQPState, caplog: pytest.LogCaptureFixture) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    handled: GQueue = GQueue()

    def flaky(connection: Connection, promise: int, message: Message) -> None:
        if not message.redelivered:
            raise RuntimeError("first attempt fails")
        handled.put(message.body)

    listener = state.register_and_spawn_amqp_listener(queue, flaky, prefetch_count=1)
    with caplog.at_level(logging.ERROR, logger="flask_nucleon_amqp.listener"):
        state.publish("", queue, b"try again")
        assert handled.get(timeout=10) == b"try again"
    records = [r for r in caplog.records if "raised on delivery" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None
    assert queue in records[0].getMessage() and "requeued" in records[0].getMessage()
    assert "first attempt fails" in caplog.text  # the traceback
    assert wait_until(lambda: listener.stats == {"received": 2, "handled": 1, "failed": 1})
    assert listener.consuming  # the listener did not die
    state.publish("", queue, b"next")
    assert handled.get(timeout=10) == b"next"


def _dead_letter_topology(names: Names, state: AMQPState, with_dlx: bool = True) -> tuple[str, str]:
    dead, dead_queue, queue = names.exchange("dead"), names.queue("dead"), names.queue("work")
    state.declare(Exchange(dead, "fanout"), Queue(dead_queue), Binding(dead, queue=dead_queue),
                  Queue(queue, dead_letter_exchange=dead if with_dlx else None))
    return queue, dead_queue


@pytest.mark.parametrize("on_error", ["reject", "dead-letter"])
def test_reject_and_dead_letter_send_failed_messages_to_the_dead_letter_exchange(
        names: Names, state: AMQPState, on_error: str) -> None:
    queue, dead_queue = _dead_letter_topology(names, state)

    def poison(connection: Connection, promise: int, message: Message) -> None:
        message.json()  # not JSON: raises

    listener = state.register_and_spawn_amqp_listener(queue, poison, on_error=on_error)
    state.publish("", queue, b"not json")
    assert wait_until(lambda: _ready(state, dead_queue) == 1, timeout=5)
    dead = state.get(dead_queue)
    assert dead is not None and dead.body == b"not json"
    assert dead.headers["x-death"][0]["reason"] == "rejected" and dead.headers["x-death"][0]["queue"] == queue
    dead.ack()
    assert listener.stats["failed"] == 1 and listener.consuming


def test_dead_letter_policy_needs_a_dead_letter_exchange(names: Names, state: AMQPState) -> None:
    queue, _ = _dead_letter_topology(names, state, with_dlx=False)
    with pytest.raises(ValueError, match=f"queue '{queue}': on_error='dead-letter' needs"):
        state.register_and_spawn_amqp_listener(queue, lambda c, p, m: None, on_error="dead-letter")


@pytest.mark.parametrize("options, match", [
    ({"on_error": "drop"}, "on_error must be one of"),
    ({"prefetch_count": 0}, "prefetch_count must be"),
    ({"concurrency": 0}, "concurrency must be"),
])
def test_bad_listener_options_fail_at_once(state: AMQPState, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        state.register_and_spawn_amqp_listener("q", lambda c, p, m: None, **options)
    with pytest.raises(ValueError, match=match):
        AMQP().listener("q", **options)  # at decoration time, before any app exists


def test_unknown_pool_is_named(state: AMQPState) -> None:
    with pytest.raises(KeyError, match="no AMQP pool named 'nope'"):
        state.register_and_spawn_amqp_listener("q", lambda c, p, m: None, type="nope")


def test_missing_queue_is_raised_at_start(names: Names, state: AMQPState) -> None:
    with pytest.raises(NotFound):
        state.register_and_spawn_amqp_listener(names.queue("absent"), lambda c, p, m: None)
    assert state.listeners == []  # not kept half-started


def test_concurrency_is_bounded_and_the_backlog_drains(names: Names, state: AMQPState) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    running, peak, done = [0], [0], []

    def slow(connection: Connection, promise: int, message: Message) -> None:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        gevent.sleep(0.05)
        running[0] -= 1
        done.append(message.body)

    listener = state.register_and_spawn_amqp_listener(queue, slow, prefetch_count=10, concurrency=3)
    for i in range(12):
        state.publish("", queue, str(i))
    assert wait_until(lambda: len(done) == 12, timeout=10)
    assert peak[0] == 3
    assert sorted(done) == sorted(str(i).encode() for i in range(12))
    assert listener.stats == {"received": 12, "handled": 12, "failed": 0}


def test_decorator_works_before_init_app(names: Names) -> None:
    queue = names.queue()
    amqp = AMQP()
    got: GQueue = GQueue()

    @amqp.listener(queue, prefetch_count=5)
    def on_message(connection: Connection, promise: int, message: Message) -> None:
        got.put(message.body)

    app = make_app(AMQP_TOPOLOGY={"queues": {queue: {}}})
    amqp.init_app(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        state.initialise()
        [listener] = state.listeners
        assert listener.options.prefetch_count == 5 and listener.options.concurrency == 5 and listener.consuming
        state.publish("", queue, b"decorated")
        assert got.get(timeout=10) == b"decorated"
    finally:
        state.close(timeout=5)


def test_listener_consumes_again_after_the_broker_closes_its_connection(names: Names, state: AMQPState) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    got: GQueue = GQueue()
    listener = state.register_and_spawn_amqp_listener(queue, lambda c, p, m: got.put(m.body))
    assert listener.connection is not None
    close_broker_connection(listener.connection, "listener test")
    assert wait_until(lambda: listener.connection is not None and listener.connection.stats["lost"] == 1)
    state.publish("", queue, b"after the cut")
    assert got.get(timeout=15) == b"after the cut"
    assert listener.consuming


def test_listener_comes_back_after_its_queue_is_deleted(names: Names, state: AMQPState) -> None:
    queue = names.queue()
    state.declare(Queue(queue))
    got: GQueue = GQueue()
    listener = state.register_and_spawn_amqp_listener(queue, lambda c, p, m: got.put(m.body))
    first_promise = listener.promise
    state.queue_delete(queue)  # the broker cancels the consumer: signals.consumer_cancelled wakes the supervisor
    # The supervisor declares the queue again (it is in the topology) and consumes.
    assert wait_until(lambda: listener.consuming and listener.promise != first_promise, timeout=10)
    state.publish("", queue, b"back")
    assert got.get(timeout=10) == b"back"


def test_listener_started_while_the_broker_is_unreachable_consumes_once_it_is_back(names: Names) -> None:
    queue = names.queue()
    proxy = Proxy((BROKER_HOST, BROKER_PORT))
    proxy.refuse = True
    app = make_app(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", AMQP_TOPOLOGY={"queues": {queue: {}}})
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    got: GQueue = GQueue()
    try:
        listener = state.register_and_spawn_amqp_listener(queue, lambda c, p, m: got.put(m.body))
        assert not listener.consuming  # start() returned; the supervisor keeps trying
        proxy.refuse = False
        assert wait_until(lambda: listener.consuming, timeout=15)
        state.publish("", queue, b"late")
        assert got.get(timeout=10) == b"late"
    finally:
        state.close(timeout=5)
        proxy.close()


def test_stop_lets_running_callbacks_finish_and_requeues_the_rest(names: Names, state: AMQPState) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    started, finished = [], []

    def slow(connection: Connection, promise: int, message: Message) -> None:
        started.append(message.body)
        gevent.sleep(0.3)
        finished.append(message.body)

    listener = state.register_and_spawn_amqp_listener(queue, slow, prefetch_count=5, concurrency=2)
    for i in range(5):
        state.publish("", queue, str(i))
    assert wait_until(lambda: len(started) == 2)
    assert listener.stop(timeout=5) is True
    assert finished == started and len(finished) == 2  # finished and acked
    assert not listener.consuming
    assert _ready(state, queue) == 3  # the backlog went back to the queue: nothing lost


def test_stop_timeout_cuts_off_a_callback_and_requeues_its_message(names: Names, state: AMQPState) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    listener = state.register_and_spawn_amqp_listener(queue, lambda c, p, m: gevent.sleep(30))
    state.publish("", queue, b"too slow")
    assert wait_until(lambda: listener.running_callbacks == 1)
    assert listener.stop(timeout=0.2) is False
    assert listener.running_callbacks == 0
    assert wait_until(lambda: _ready(state, queue) == 1, timeout=5)
    message = state.get(queue)
    assert message is not None and message.body == b"too slow" and message.redelivered
    message.ack()


@pytest.fixture(params=["rabbitmq", "memory"])
def any_state(request: pytest.FixtureRequest, names: Names) -> Iterator[AMQPState]:
    """The state of an app on the real broker, or on a memory broker of this test's own."""
    if request.param == "rabbitmq":
        app = make_app()
    else:
        app = make_app(AMQP_URL=f"memory://listener-{names.run}")
    AMQP(app)
    yield app.extensions["amqp"]
    app.extensions["amqp"].close(timeout=5)
    if request.param == "memory":
        memory.reset(f"listener-{names.run}")


def test_a_poison_message_is_tried_about_once_a_second_while_the_others_flow(
        names: Names, any_state: AMQPState, caplog: pytest.LogCaptureFixture) -> None:
    """Default on_error="requeue": a callback that always raises on one message does not loop at full speed
    (it was redelivered 3,143 times in 2 s), the good messages are all handled meanwhile, and the traceback
    is logged once, then one line per 1, 2, 4... repeats."""
    state = any_state
    queue = names.queue()
    state.queue_declare(queue)
    poison_attempts: list[float] = []
    good: GQueue = GQueue()

    def handle(connection: Connection, promise: int, message: Message) -> None:
        if message.body == b"poison":
            poison_attempts.append(time.monotonic())
            raise ValueError("cannot handle this one")
        good.put(message.body)

    with caplog.at_level(logging.ERROR, logger="flask_nucleon_amqp.listener"):
        listener = state.register_and_spawn_amqp_listener(queue, handle, concurrency=1)
        state.publish("", queue, b"poison")
        assert wait_until(lambda: len(poison_attempts) >= 1, timeout=10)
        started = time.monotonic()
        for i in range(50):  # one worker: they pass the held poison message, not wait for it
            state.publish("", queue, f"good {i}")
        received = {good.get(timeout=5) for _ in range(50)}
        assert received == {f"good {i}".encode() for i in range(50)}
        assert time.monotonic() - started < 3  # not behind the poison message
        gevent.sleep(4.5 - (time.monotonic() - started))
        window = time.monotonic() - poison_attempts[0]
        attempts = len(poison_attempts)
    assert 2 <= attempts <= window / listener_module.REQUEUE_DELAY + 2, (attempts, window)
    failures = [r for r in caplog.records if "raised on delivery" in r.getMessage()]
    with_traceback = [r for r in failures if r.exc_info is not None]
    assert len(with_traceback) == 1 and "cannot handle this one" in caplog.text
    repeats = [r.getMessage() for r in failures if r.exc_info is None]
    assert repeats and all("the same error" in text for text in repeats)
    assert "the same error 1 times" in repeats[0] and len(failures) <= attempts
    assert listener.stats["handled"] == 50 and listener.stats["failed"] == attempts
    listener.stop(timeout=5)  # the held poison message goes back to the queue at once
    assert wait_until(lambda: _ready(state, queue) == 1, timeout=5)


def test_listener_whose_queue_went_while_disconnected_consumes_again_when_it_is_back(
        names: Names, state: AMQPState) -> None:
    """The broker refuses to resume the consumer (queue gone) without a cancel notification: the supervisor
    looks after the connection recovered, and consumes again once the queue exists again."""
    queue = names.queue()
    proxy = Proxy((BROKER_HOST, BROKER_PORT))
    app = make_app(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
    AMQP(app)
    proxied: AMQPState = app.extensions["amqp"]
    got: GQueue = GQueue()
    try:
        state.queue_declare(queue)  # `state` talks to the broker directly
        listener = proxied.register_and_spawn_amqp_listener(queue, lambda c, p, m: got.put(m.body))
        proxy.refuse = True
        proxy.cut()
        assert wait_until(lambda: listener.connection is not None and not listener.connection.is_open)
        state.queue_delete(queue)
        proxy.refuse = False
        assert wait_until(lambda: not listener.consuming, timeout=10)  # resume refused: NotFound
        state.queue_declare(queue)
        assert wait_until(lambda: listener.consuming, timeout=15)
        state.publish("", queue, b"back again")
        assert got.get(timeout=10) == b"back again"
    finally:
        proxied.close(timeout=5)
        proxy.close()


def test_a_quorum_queues_delivery_limit_ends_a_poison_message(names: Names, state: AMQPState) -> None:
    """Each held-then-requeued attempt counts as a delivery (x-delivery-count): the broker drops the message
    at the queue's x-delivery-limit, about one attempt a second until then."""
    queue = names.queue()
    state.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 2})
    attempts: list[tuple[float, Any]] = []

    def poison(connection: Connection, promise: int, message: Message) -> None:
        attempts.append((time.monotonic(), (message.headers or {}).get("x-delivery-count")))
        raise ValueError("never works")

    listener = state.register_and_spawn_amqp_listener(queue, poison)
    state.publish("", queue, b"poison")
    assert wait_until(lambda: len(attempts) == 3, timeout=10)
    gevent.sleep(2.5)  # the third is held 1 s, requeued, and then dropped by the broker: no fourth attempt
    assert [count for _, count in attempts] == [None, 1, 2]
    assert _ready(state, queue) == 0 and listener.stats["failed"] == 3
    assert attempts[2][0] - attempts[0][0] >= 2 * listener_module.REQUEUE_DELAY * 0.9
