"""PukaConnection against the real broker: the sync/async API, errors, concurrency."""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import gevent
import pytest
from flask import Flask
from gevent.queue import Queue

from flask_nucleon_amqp import (
    AMQP,
    AMQPState,
    ConnectionError,
    ConnectionLost,
    Message,
    MessageStateError,
    NotFound,
    PreconditionFailed,
    PukaConnection,
    Timeout,
    Unroutable,
)
from flask_nucleon_amqp import _base as base_module
from flask_nucleon_amqp import connection as connection_module

from _proxy import Proxy
from conftest import BROKER_HOST, BROKER_PORT, BROKER_URL, Names, close_broker_connection, make_app, outcome, wait_until


def test_declare_returns_counts(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    assert conn.queue_declare(queue) == {"queue": queue, "message_count": 0, "consumer_count": 0}
    conn.publish("", queue, b"one")
    assert conn.queue_declare(queue, passive=True)["message_count"] == 1
    assert conn.queue_purge(queue) == {"message_count": 1}
    assert conn.queue_delete(queue) == {"message_count": 0}


def test_server_named_queue(conn: PukaConnection, names: Names) -> None:
    result = conn.queue_declare("", exclusive=True)
    assert result["queue"].startswith("amq.gen-")
    assert conn.queue_delete(result["queue"]) == {"message_count": 0}


def test_properties_round_trip(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    stamp = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    conn.publish("", queue, b"{}", headers={"h": 1}, persistent=True, content_type="application/json",
                 content_encoding="utf-8", correlation_id="corr-1", reply_to="replies", expiration=60000,
                 message_id="m-1", priority=3, timestamp=stamp, type="kind", app_id="tests", user_id="guest")
    message = conn.get(queue)
    assert message is not None
    assert message.headers == {"h": 1}  # properties are not mixed into the headers
    assert (message.delivery_mode, message.content_type, message.content_encoding) == (2, "application/json", "utf-8")
    assert (message.correlation_id, message.reply_to, message.expiration) == ("corr-1", "replies", "60000")
    assert (message.message_id, message.priority, message.type, message.app_id) == ("m-1", 3, "kind", "tests")
    assert message.user_id == "guest"
    assert message.timestamp == int(stamp.timestamp())
    assert message["content_type"] == "application/json"
    message.ack()


def test_json_and_text_bodies(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, json={"a": [1, "é"]})
    conn.publish("", queue, "héllo")
    first, second = conn.get(queue), conn.get(queue)
    assert first is not None and second is not None
    assert first.json() == {"a": [1, "é"]} and first.content_type == "application/json"
    assert second.text == "héllo" and second.body == "héllo".encode()
    first.ack()
    second.ack()


@pytest.mark.parametrize("body", [123, 1.5, {"a": 1}, ["x"], object()])
def test_bad_body_type_raises_before_sending(conn: PukaConnection, body: object) -> None:
    with pytest.raises(TypeError, match="body must be bytes or str"):
        conn.publish("", "nowhere", body)  # type: ignore[arg-type]
    assert not conn.is_open  # nothing was sent: the connection was not even opened


def test_body_and_json_together_is_an_error(conn: PukaConnection) -> None:
    with pytest.raises(TypeError, match="body or json"):
        conn.publish("", "q", b"x", json={})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"priority": 300}, "priority"),
    ({"delivery_mode": 5}, "delivery_mode"),
    ({"expiration": "soon"}, "expiration"),
    ({"headers": {"k": object()}}, r"headers\['k'\]"),
    ({"headers": {"big": 2**70}}, r"headers\['big'\]"),
    ({"correlation_id": "x" * 300}, "correlation_id"),
])
def test_bad_properties_name_the_argument(conn: PukaConnection, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        conn.publish("", "q", b"x", **kwargs)


def test_long_names_are_rejected_naming_the_argument(conn: PukaConnection) -> None:
    with pytest.raises(ValueError, match="queue is 300 bytes"):
        conn.queue_declare("q" * 300)
    with pytest.raises(ValueError, match="routing_key"):
        conn.publish("", "é" * 200, b"x")


def test_mandatory_unroutable_raises(conn: PukaConnection, names: Names) -> None:
    exchange = names.exchange()
    conn.exchange_declare(exchange, "direct")
    with pytest.raises(Unroutable) as info:
        conn.publish(exchange, "nobody", b"lost", mandatory=True)
    assert info.value.routing_key == "nobody" and info.value.exchange == exchange
    conn.publish(exchange, "nobody", b"dropped silently")  # not mandatory: confirmed, dropped


def test_mandatory_unroutable_async_reaches_callback(conn: PukaConnection, names: Names) -> None:
    exchange = names.exchange()
    conn.exchange_declare(exchange, "fanout")
    results: Queue = Queue()
    conn.publish(exchange, "", b"x", mandatory=True, callback=lambda p, r: results.put(r))
    assert isinstance(results.get(timeout=10), Unroutable)


def test_mandatory_routed_message_has_no_internal_header(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, b"x", mandatory=True, headers={"mine": "yes"})
    message = conn.get(queue)
    assert message is not None and message.headers == {"mine": "yes"}
    message.ack()


def test_channel_error_leaves_connection_usable(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue, durable=False)
    session = conn._session
    with pytest.raises(NotFound):
        conn.publish(names.exchange("missing"), "rk", b"x")
    with pytest.raises(PreconditionFailed):
        conn.queue_declare(queue, durable=True)
    with pytest.raises(NotFound):
        conn.queue_declare(names.queue("absent"), passive=True)
    conn.publish("", queue, b"still fine")
    assert conn._session is session  # same connection, not a reconnect
    message = conn.get(queue)
    assert message is not None and message.body == b"still fine"
    message.ack()


def test_consume_without_callback_times_out_with_none(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    started = time.monotonic()
    assert conn.consume(queue, timeout=0.3) is None
    assert 0.25 < time.monotonic() - started < 5
    conn.publish("", queue, b"later")  # the cancelled one-shot consumer took nothing
    message = conn.consume(queue, timeout=5)
    assert message is not None and message.body == b"later"
    message.ack()


def test_consume_waits_for_a_message(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    gevent.spawn_later(0.2, conn.publish, "", queue, b"arrives")
    message = conn.consume(queue, timeout=10)
    assert message is not None and message.body == b"arrives"
    message.ack()


def test_consume_missing_queue_raises(conn: PukaConnection, names: Names) -> None:
    with pytest.raises(NotFound):
        conn.consume(names.queue("absent"), callback=lambda p, m: None)
    with pytest.raises(NotFound):
        conn.consume(names.queue("absent"), timeout=1)


def test_get_empty_returns_none(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    assert conn.get(queue) is None


def test_reject_requeue_and_redelivered(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, b"again")
    first = conn.get(queue)
    assert first is not None and not first.redelivered
    first.reject(requeue=True)
    second = conn.get(queue)
    assert second is not None and second.redelivered and second.body == b"again"
    second.nack(requeue=False)
    assert conn.get(queue) is None


def test_double_ack_is_a_clear_error(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, b"x")
    message = conn.get(queue)
    assert message is not None
    message.ack()
    with pytest.raises(MessageStateError, match="already"):
        conn.ack(message)
    conn.publish("", queue, b"y")  # connection unharmed
    assert conn.get(queue, no_ack=True) is not None


def test_no_ack_message_cannot_be_acked(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, b"x")
    message = conn.get(queue, no_ack=True)
    assert message is not None
    with pytest.raises(MessageStateError, match="no_ack"):
        message.ack()


def test_callback_can_block_on_its_own_connection(conn: PukaConnection, names: Names) -> None:
    """A consumer callback that publishes (and waits for the confirm) on the same connection."""
    source, target = names.queue("src"), names.queue("dst")
    conn.queue_declare(source)
    conn.queue_declare(target)
    done: Queue = Queue()

    def forward(promise: int, message: object) -> None:
        conn.publish("", target, message.body + b"!")  # type: ignore[attr-defined]
        info = conn.queue_declare(target, passive=True)  # another blocking call
        message.ack()  # type: ignore[attr-defined]
        done.put(info)

    promise = conn.consume(source, callback=forward)
    conn.publish("", source, b"ping")
    assert done.get(timeout=10)["queue"] == target
    forwarded = conn.get(target)
    assert forwarded is not None and forwarded.body == b"ping!"
    forwarded.ack()
    conn.cancel(promise)


def test_each_consumer_runs_in_a_greenlet_of_its_own_kept_between_bursts(conn: PukaConnection,
                                                                          names: Names) -> None:
    """Issue 8: never the I/O greenlet; one greenlet per consumer, in order, parked (not remade) between bursts."""
    first, second = names.queue("a"), names.queue("b")
    conn.queue_declare(first)
    conn.queue_declare(second)
    ran: dict[str, list[tuple[bytes, Any]]] = {"a": [], "b": []}

    def recorder(key: str) -> Any:
        def callback(_promise: int, message: Message) -> None:
            ran[key].append((message.body, gevent.getcurrent()))
            message.ack()
        return callback

    promises = [conn.consume(first, callback=recorder("a")), conn.consume(second, callback=recorder("b"))]
    for i in range(3):  # three bursts, well within WORKER_LINGER of each other
        conn.publish("", first, str(i))
        conn.publish("", second, str(i))
        assert wait_until(lambda count=i + 1: len(ran["a"]) == len(ran["b"]) == count)
        gevent.sleep(0.05)
    assert conn._session is not None
    io = conn._session.io
    ran_a, ran_b = {g for _, g in ran["a"]}, {g for _, g in ran["b"]}
    assert [body for body, _ in ran["a"]] == [b"0", b"1", b"2"] == [body for body, _ in ran["b"]]
    assert len(ran_a) == 1 and len(ran_b) == 1 and ran_a != ran_b  # one each, kept for the next burst
    assert io not in ran_a | ran_b and gevent.getcurrent() not in ran_a | ran_b
    for promise in promises:
        conn.cancel(promise)


def test_a_lingering_consumer_greenlet_ends_and_the_next_delivery_starts_another(
        conn: PukaConnection, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base_module, "WORKER_LINGER", 0.05)
    queue = names.queue()
    conn.queue_declare(queue)
    seen: list[Any] = []

    def callback(_promise: int, message: Message) -> None:
        seen.append(gevent.getcurrent())
        message.ack()

    promise = conn.consume(queue, callback=callback)
    conn.publish("", queue, b"1")
    assert wait_until(lambda: len(seen) == 1)
    assert wait_until(lambda: seen[0].dead)  # nothing came within WORKER_LINGER: it ended
    conn.publish("", queue, b"2")
    assert wait_until(lambda: len(seen) == 2)
    assert seen[1] is not seen[0]
    conn.cancel(promise)
    assert conn.queue_declare(queue, passive=True)["message_count"] == 0  # both acked


def _seen_after_consume_returned(conn: PukaConnection, queue: str) -> list[bool]:
    """Consume three messages (then requeue them); for each, whether consume() had returned when it arrived."""
    returned: list[int] = []
    seen: list[bool] = []
    held: list[Message] = []

    def callback(_promise: int, message: Message) -> None:
        seen.append(bool(returned))
        held.append(message)

    promise = conn.consume(queue, callback=callback, prefetch_count=3)
    returned.append(promise)
    assert wait_until(lambda: len(seen) == 3)
    conn.cancel(promise)
    for message in held:
        message.reject(requeue=True)
    return seen


def test_a_synchronous_consume_returns_before_its_callback_runs(conn: PukaConnection, names: Names) -> None:
    """Deliveries read with consume-ok: the caller of consume() resumes first, then the consumer's greenlet."""
    queue = names.queue()
    conn.queue_declare(queue)
    for i in range(3):
        conn.publish("", queue, str(i))
    for _ in range(3):  # a few consumes: consume-ok and the first deliveries usually come in one read
        assert _seen_after_consume_returned(conn, queue) == [True, True, True]


def test_a_quiet_connection_sends_a_publish_at_once_the_rest_of_the_turn_in_one_batch(
        conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, b"0")  # opens the publish channel: publishes wait for nothing more
    session = conn._session
    assert session is not None
    outcomes: list[Any] = []
    conn.publish("", queue, b"1", callback=lambda _p, result: outcomes.append(result))
    assert not session.client.send_buf  # written before this greenlet yielded: no wait for the hub
    for body in (b"2", b"3"):
        conn.publish("", queue, body, callback=lambda _p, result: outcomes.append(result))
    assert session.client.send_buf  # the rest of the turn waits for one flush
    assert wait_until(lambda: outcomes == [{}, {}, {}])
    assert conn.queue_declare(queue, passive=True)["message_count"] == 4


def test_close_does_not_wait_for_a_parked_consumer_greenlet(names: Names) -> None:
    app = make_app()
    AMQP(app)
    state = app.extensions["amqp"]
    conn = state.get_amqp_pool().connection()
    queue = names.queue()
    conn.queue_declare(queue)
    seen: list[bytes] = []

    def callback(_promise: int, message: Message) -> None:
        seen.append(message.body)
        message.ack()

    conn.consume(queue, callback=callback)
    conn.publish("", queue, b"x")
    assert wait_until(lambda: seen == [b"x"])
    started = time.monotonic()
    state.close(timeout=10)  # the consumer's greenlet waits for more: that is no callback running
    assert time.monotonic() - started < base_module.WORKER_LINGER / 2


def test_cancel_requeues_undelivered_and_keeps_held_ackable(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    for i in range(20):
        conn.publish("", queue, str(i))
    held: list[Message] = []
    gate = gevent.event.Event()

    def slow(promise: int, message: Message) -> None:
        held.append(message)
        gate.wait()

    promise = conn.consume(queue, callback=slow, prefetch_count=20)
    assert wait_until(lambda: len(held) == 1)
    conn.cancel(promise)
    gate.set()
    assert wait_until(lambda: conn._dispatch_queue == type(conn._dispatch_queue)() and not conn._callbacks_running)
    assert len(held) == 1  # the others were never handed to the callback after cancel
    held[0].ack()  # the held one can still be acked
    assert wait_until(lambda: conn.queue_declare(queue, passive=True)["message_count"] == 19, timeout=10)
    assert conn.queue_purge(queue)["message_count"] == 19


def test_qos_changes_prefetch(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    for i in range(5):
        conn.publish("", queue, str(i))
    got: list[Message] = []
    promise = conn.consume(queue, callback=lambda p, m: got.append(m), prefetch_count=1)
    assert wait_until(lambda: len(got) == 1)
    gevent.sleep(0.2)
    assert len(got) == 1  # prefetch 1: nothing more until acked
    conn.qos(promise, 5)
    assert wait_until(lambda: len(got) == 5)
    for message in got:
        message.ack()
    conn.cancel(promise)


def test_async_declare_and_errors_reach_callback(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    results: Queue = Queue()
    conn.queue_declare(queue, callback=lambda p, r: results.put(r))
    assert results.get(timeout=10)["queue"] == queue
    conn.queue_declare(names.queue("absent"), passive=True, callback=lambda p, r: results.put(r))
    assert isinstance(results.get(timeout=10), NotFound)


def test_thousand_greenlets_two_connections_exactly_once(app: Flask, names: Names) -> None:
    state: AMQPState = app.extensions["amqp"]
    pool = state.get_amqp_pool("publish")
    queue = names.queue()
    pool.connection().queue_declare(queue)
    bodies = [f"m-{i}".encode() for i in range(1000)]
    jobs = [gevent.spawn(pool.connection().publish, "", queue, body) for body in bodies]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert all(job.successful() for job in jobs)
    assert len(pool.connections()) == 2 and all(c.is_open for c in pool.connections())
    received: Counter[bytes] = Counter()
    listen = state.get_amqp_pool("listen").connection()

    def record(promise: int, message: object) -> None:
        received[message.body] += 1  # type: ignore[attr-defined]
        message.ack()  # type: ignore[attr-defined]

    promise = listen.consume(queue, callback=record, prefetch_count=200)
    assert wait_until(lambda: sum(received.values()) >= 1000, timeout=30)
    gevent.sleep(0.2)
    listen.cancel(promise)
    assert set(received) == set(bodies)
    assert all(count == 1 for count in received.values())


def test_large_bodies(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    for size in (1 << 20, 16 << 20):
        body = os.urandom(size)
        conn.publish("", queue, body)
        message = conn.consume(queue, timeout=60)
        assert message is not None and len(message.body) == size and message.body == body
        message.ack()


def test_nothing_listening_fails_within_connect_timeout() -> None:
    with socket.socket() as probe:
        probe.bind((BROKER_HOST, 0))
        port = probe.getsockname()[1]
    app = make_app(AMQP_POOLS={"publish": {"port": port, "connect_timeout": 2, "password": "s3cret-pw"}})
    AMQP(app)  # starting is fine: nothing connects yet
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        app.extensions["amqp"].publish("", "q", b"x")
    assert time.monotonic() - started < 3
    assert str(port) in str(info.value) and "s3cret-pw" not in str(info.value)
    assert not isinstance(info.value, ConnectionLost)


def test_silent_peer_fails_after_connect_timeout() -> None:
    server = gevent.socket.socket()
    server.bind((BROKER_HOST, 0))
    server.listen(5)  # accepts TCP, never speaks AMQP
    try:
        app = make_app(AMQP_POOLS={"publish": {"port": server.getsockname()[1], "connect_timeout": 0.5}})
        AMQP(app)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="connect_timeout"):
            app.extensions["amqp"].queue_declare("q")
        assert 0.4 < time.monotonic() - started < 3
    finally:
        server.close()


def test_connection_forced_fails_waiters_and_next_call_reconnects(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    waiter = gevent.spawn(outcome, conn.consume, queue, timeout=30)  # a blocked greenlet
    gevent.sleep(0.2)
    old_session = conn._session
    close_broker_connection(conn, "test cut")
    error = waiter.get(timeout=10)
    assert isinstance(error, ConnectionLost)
    assert "test cut" in str(error)
    conn.publish("", queue, b"after")  # opens a new session
    assert conn._session is not old_session
    message = conn.get(queue)
    assert message is not None and message.body == b"after"
    message.ack()


def test_stale_message_from_dead_connection_cannot_be_acked(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, b"x")
    message = conn.get(queue)
    assert message is not None
    old_session = conn._session
    close_broker_connection(conn)
    assert wait_until(lambda: conn._session is not old_session)
    with pytest.raises(MessageStateError, match="deliver it again"):
        message.ack()
    again = conn.get(queue)
    assert again is not None and again.redelivered
    again.ack()


def test_consumer_resumes_after_connection_is_forced_closed(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    got: Queue = Queue()

    def record(promise: int, message: object) -> None:
        got.put(message.body)  # type: ignore[attr-defined]
        message.ack()  # type: ignore[attr-defined]

    promise = conn.consume(queue, callback=record)
    conn.publish("", queue, b"before")
    assert got.get(timeout=10) == b"before"
    old_session = conn._session
    close_broker_connection(conn)
    assert wait_until(lambda: conn._session not in (None, old_session) and conn.is_open
                      and conn._consumers[promise].started.ready(), timeout=15)
    conn.publish("", queue, b"after")
    received = [got.get(timeout=10)]
    if received[0] == b"before":  # its ack may not have left before the cut: redelivered, at least once
        received.append(got.get(timeout=10))
    assert received[-1] == b"after"
    assert conn.queue_declare(queue, passive=True)["consumer_count"] == 1  # exactly one consumer
    conn.cancel(promise)


def test_cancel_whose_consume_ok_comes_late_cancels_once_it_comes(names: Names) -> None:
    """cancel() gives up waiting for consume-ok; the broker's consumer must still go, not loop on requeues."""
    proxy = Proxy((BROKER_HOST, BROKER_PORT))
    app = make_app(AMQP_POOLS={"publish": {"port": proxy.port, "heartbeat": 0}})
    AMQP(app)
    conn = app.extensions["amqp"].connection("publish")
    direct_app = make_app()
    AMQP(direct_app)
    direct = direct_app.extensions["amqp"].connection("publish")  # to look at the queue past the proxy
    try:
        queue = names.queue()
        direct.queue_declare(queue)
        seen: list[bytes] = []
        promise = conn.consume(queue, lambda _p, message: seen.append(message.body))
        proxy.stall()
        resubscribe = gevent.spawn(conn.qos, promise, 10, timeout=30)  # a new subscription, not yet confirmed
        gevent.sleep(0.2)
        conn.cancel(promise, timeout=0.5)  # gives up before that subscription's consume-ok
        proxy.resume()
        resubscribe.join(timeout=30)
        assert wait_until(lambda: direct.queue_declare(queue, passive=True)["consumer_count"] == 0, timeout=10)
        direct.publish("", queue, b"after cancel")
        gevent.sleep(1)
        assert direct.queue_declare(queue, passive=True)["message_count"] == 1
        assert seen == [] and conn.stats["delivered"] == 0  # never delivered, rejected, redelivered...
    finally:
        app.extensions["amqp"].close(timeout=2)
        direct_app.extensions["amqp"].close(timeout=2)
        proxy.close()


def test_operation_timeout_raises_timeout_and_connection_recovers(names: Names) -> None:
    proxy = Proxy((BROKER_HOST, BROKER_PORT))
    app = make_app(AMQP_POOLS={"publish": {"port": proxy.port, "operation_timeout": 0.3, "heartbeat": 0}})
    AMQP(app)
    state = app.extensions["amqp"]
    try:
        queue = names.queue()
        state.queue_declare(queue)
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(Timeout, match="no answer within 0.3s"):
            state.queue_declare(queue, passive=True)
        with pytest.raises(Timeout):
            state.publish("", queue, b"held", timeout=0.2)
        assert time.monotonic() - started < 2
        assert issubclass(Timeout, TimeoutError)
        proxy.resume()
        assert state.queue_declare(queue, passive=True)["queue"] == queue
    finally:
        state.close(timeout=2)
        proxy.close()


def test_close_waits_for_pending_confirms(names: Names) -> None:
    app = make_app()
    AMQP(app)
    state = app.extensions["amqp"]
    queue = names.queue()
    state.queue_declare(queue)
    confirmed: list[Any] = []
    for i in range(200):
        state.publish("", queue, str(i), callback=lambda p, r: confirmed.append(r))
    state.close(timeout=10)
    assert len(confirmed) == 200 and all(r == {} for r in confirmed)
    with pytest.raises(ConnectionError, match="closed"):
        state.get_amqp_pool().connection().publish("", queue, b"x")


def test_works_without_monkey_patching_and_does_not_block_the_hub(conn: PukaConnection, names: Names) -> None:
    import gevent.monkey

    assert not gevent.monkey.is_module_patched("socket")
    queue = names.queue()
    conn.queue_declare(queue)
    ticks: list[int] = []

    def ticker() -> None:
        while True:
            ticks.append(1)
            gevent.sleep(0.01)

    tick = gevent.spawn(ticker)
    message = conn.consume(queue, timeout=0.5)  # waits 0.5s for nothing
    tick.kill()
    assert message is None
    assert len(ticks) >= 20  # the hub kept running other greenlets meanwhile


def test_password_never_in_repr_or_errors(names: Names) -> None:
    app = make_app(AMQP_URL="amqp://guest:wrong-Pa55word@127.0.0.1:5672/%2F")
    AMQP(app)
    state = app.extensions["amqp"]
    conn = state.connection()
    assert "wrong-Pa55word" not in repr(conn) + repr(state.get_amqp_pool()) + repr(conn.settings)
    from flask_nucleon_amqp import AuthenticationError

    started = time.monotonic()
    with pytest.raises(AuthenticationError) as info:
        conn.publish("", "q", b"x")
    assert time.monotonic() - started < 2  # told at once, not after the broker's 3 s drop (D11)
    assert "wrong-Pa55word" not in str(info.value)


def test_unknown_vhost_is_a_clear_error() -> None:
    app = make_app(AMQP_URL="amqp://guest:guest@127.0.0.1:5672/no-such-vhost")
    AMQP(app)
    from flask_nucleon_amqp import VhostNotAllowed

    with pytest.raises(VhostNotAllowed, match="vhost"):
        app.extensions["amqp"].publish("", "q", b"x")


def test_publish_retry_on_a_new_connection(names: Names) -> None:
    proxy = Proxy((BROKER_HOST, BROKER_PORT))
    app = make_app(AMQP_POOLS={"publish": {"port": proxy.port, "heartbeat": 0}})
    AMQP(app)
    state = app.extensions["amqp"]
    try:
        queue = names.queue()
        state.queue_declare(queue)
        proxy.stall()
        without_retry = gevent.spawn(outcome, state.publish, "", queue, b"lost in the cut")
        with_retry = gevent.spawn(outcome, state.publish, "", queue, b"retried", retry=2)
        gevent.sleep(0.3)
        proxy.cut()  # the held bytes never reach the broker
        proxy.resume()
        assert isinstance(without_retry.get(timeout=10), ConnectionLost)  # reported, not dropped silently
        assert with_retry.get(timeout=10) is None
        bodies = []
        while (message := state.get(queue)) is not None:
            bodies.append(message.body)
            message.ack()
        assert bodies == [b"retried"]
        assert state.stats()["publish"]["failed"] >= 2
    finally:
        state.close(timeout=2)
        proxy.close()


def test_works_under_monkey_patching(names: Names) -> None:
    """The same API in a process that ran gevent.monkey.patch_all() first (as gunicorn's gevent worker)."""
    import subprocess
    import sys
    import textwrap

    queue = names.queue()
    script = textwrap.dedent(f"""
        from gevent import monkey; monkey.patch_all()
        import os, sys
        import gevent
        from flask import Flask
        from flask_nucleon_amqp import AMQP
        app = Flask("patched")
        app.config["AMQP_URL"] = {BROKER_URL!r}
        state = AMQP(app) and app.extensions["amqp"]
        state.queue_declare({queue!r})
        big = os.urandom(3 << 20)
        jobs = [gevent.spawn(state.publish, "", {queue!r}, b"m%d" % i) for i in range(200)]
        gevent.joinall(jobs, raise_error=True)
        state.publish("", {queue!r}, big)
        got = []
        def on_message(promise, message):
            got.append(message.body)
            message.ack()
        promise = state.consume({queue!r}, on_message)
        with gevent.Timeout(20):
            while len(got) < 201:
                gevent.sleep(0.01)
        state.cancel(promise)
        assert sorted(got[:200]) == sorted(b"m%d" % i for i in range(200)), got[:5]
        assert got[200] == big
        state.close()
        print("OK", len(got))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OK 201"


def test_write_error_ends_the_session_at_once(conn: PukaConnection, names: Names) -> None:
    """A reset met by a write (not a read) still fails waiters at once and recovers the consumer."""
    queue = names.queue()
    conn.queue_declare(queue)
    got: Queue = Queue()
    promise = conn.consume(queue, callback=lambda p, m: (got.put(m.body), m.ack()))  # type: ignore[func-returns-value]  # a tuple, for both side effects
    session = conn._session
    assert session is not None
    session.client.sd.shutdown(socket.SHUT_WR)  # every write now fails with EPIPE
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match="Error"):
        conn.publish("", queue, b"x", timeout=5)
    assert time.monotonic() - started < 1
    assert wait_until(lambda: conn.is_open and conn._session is not session
                      and conn._consumers[promise].started.ready(), timeout=10)
    assert conn.stats["lost"] == 1 and "Error" in (session.death_reason or "")
    conn.publish("", queue, b"after")
    assert got.get(timeout=10) == b"after"
    conn.cancel(promise)


def test_one_shot_no_ack_consume_takes_exactly_one(conn: PukaConnection, names: Names) -> None:
    queue = names.queue()
    conn.queue_declare(queue)
    for i in range(3):
        conn.publish("", queue, str(i))
    taken = [conn.consume(queue, no_ack=True, timeout=5) for _ in range(3)]
    assert [(m.body, m.redelivered) for m in taken] == [(b"0", False), (b"1", False), (b"2", False)]
    assert conn.stats["rejected"] == 0
    assert conn.queue_declare(queue, passive=True)["message_count"] == 0


def test_qos_keeps_an_auto_delete_queue(conn: PukaConnection, names: Names) -> None:
    queue = names.queue("ad")
    conn.queue_declare(queue, auto_delete=True)
    got: list[Message] = []
    promise = conn.consume(queue, callback=lambda p, m: got.append(m), prefetch_count=1)
    conn.qos(promise, 10)  # subscribes anew before cancelling: the queue never loses its last consumer
    for i in range(3):
        conn.publish("", queue, str(i))
    assert wait_until(lambda: len(got) == 3)
    for message in got:
        message.ack()
    assert conn.has_consumer(promise)
    conn.cancel(promise)


def test_consumer_whose_queue_is_gone_after_a_reconnect_is_unregistered(conn: PukaConnection) -> None:
    queue = conn.queue_declare("", exclusive=True)["queue"]  # dies with the connection
    promise = conn.consume(queue, callback=lambda p, m: None)
    old_session = conn._session
    close_broker_connection(conn)
    assert wait_until(lambda: conn._session not in (None, old_session) and not conn.has_consumer(promise),
                      timeout=15)
    assert conn.is_open


def test_call_to_a_missing_exchange_fails_at_once(conn: PukaConnection, names: Names) -> None:
    started = time.monotonic()
    with pytest.raises(NotFound):
        conn.call(names.exchange("absent"), "rk", b"?", timeout=5)
    assert time.monotonic() - started < 2
    queue = names.queue()
    conn.queue_declare(queue)
    with pytest.raises(Timeout):  # the next call gets a fresh reply consumer
        conn.call("", queue, b"nobody answers", timeout=0.3)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_cancel_racing_the_brokers_own_cancel(conn: PukaConnection, names: Names, queue_type: str) -> None:
    """The queue is deleted under a consumer and the app cancels it at the same moment."""
    from flask_nucleon_amqp import signals

    cancelled: list[dict[str, object]] = []

    def on_cancelled(sender: object, **kwargs: object) -> None:
        cancelled.append(kwargs)

    signals.consumer_cancelled.connect(on_cancelled)
    try:
        queue = names.queue(queue_type)
        arguments = {"x-queue-type": queue_type}
        conn.queue_declare(queue, durable=queue_type == "quorum", arguments=arguments)
        promise = conn.consume(queue, callback=lambda p, m: None)
        other = make_app()
        AMQP(other)
        other.extensions["amqp"].queue_delete(queue)  # from another connection
        try:
            conn.cancel(promise, timeout=5)
        except ValueError:
            pass  # the broker's cancel was processed first: nothing left to cancel
        assert not conn.has_consumer(promise)
        session = conn._session
        conn.queue_declare(names.queue())  # the connection is unharmed
        assert conn._session is session
        other.extensions["amqp"].close()
    finally:
        signals.consumer_cancelled.disconnect(on_cancelled)
    assert all(event == {"promise": promise, "queue": queue} for event in cancelled)


def _only_message_left(queue: str, body: bytes) -> None:
    """After the consuming app closed: exactly one message is back in ``queue``, the one never acked."""
    other = make_app()
    AMQP(other)
    left = other.extensions["amqp"].get(queue)
    assert left is not None and left.body == body and left.redelivered
    left.ack()
    assert other.extensions["amqp"].get(queue) is None
    other.extensions["amqp"].close()


def test_acks_coalesce_only_over_settled_runs(names: Names) -> None:
    """Acks go out as basic.ack(multiple) for runs of settled tags; a held message is never covered."""
    import random

    app = make_app()
    AMQP(app)
    conn = app.extensions["amqp"].connection("listen")
    queue = names.queue()
    conn.queue_declare(queue)
    for i in range(300):
        conn.publish("", queue, str(i))
    got: list[Message] = []
    promise = conn.consume(queue, callback=lambda p, m: got.append(m), prefetch_count=300)
    assert wait_until(lambda: len(got) == 300)
    held, rejected, rest = got[0], got[150], got[1:150] + got[151:]
    random.Random(7).shuffle(rest)
    for i, message in enumerate(rest):
        message.ack()
        if i % 37 == 0:
            gevent.sleep(0)  # flush in between: several coalesced batches
    rejected.reject(requeue=False)  # dropped
    conn.cancel(promise)
    session = conn._session
    assert wait_until(lambda: not session.acks)
    app.extensions["amqp"].close()  # the held message was never acked: back in the queue
    _only_message_left(queue, held.body)


def test_a_long_held_message_stops_ack_tracking_for_its_channel(names: Names) -> None:
    app = make_app()
    AMQP(app)
    conn = app.extensions["amqp"].connection("listen")
    queue = names.queue()
    conn.queue_declare(queue)
    for i in range(5000):
        conn.publish("", queue, str(i), callback=lambda p, r: None)
    assert wait_until(lambda: conn.queue_declare(queue, passive=True)["message_count"] == 5000, timeout=30)
    got: list[Any] = []

    def work(promise: int, message: object) -> None:
        got.append(message)
        if len(got) > 1:
            message.ack()  # type: ignore[attr-defined]

    promise = conn.consume(queue, callback=work, prefetch_count=200)
    assert wait_until(lambda: len(got) == 5000, timeout=30)
    session = conn._session
    assert session.uncoalesced and not session.unsettled  # bounded: no per-tag bookkeeping left
    conn.cancel(promise)
    app.extensions["amqp"].close()
    _only_message_left(queue, got[0].body)


def test_recovered_connection_log_names_the_node_it_reached(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nothing listens on: the first node of the list is down
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    nodes = [f"amqp://guest:guest@127.0.0.1:{dead_port}/%2F", BROKER_URL]
    app = make_app(AMQP_POOLS={"publish": {"size": 1, "url": nodes}, "listen": {"size": 1}})
    AMQP(app)
    conn = app.extensions["amqp"].connection()
    try:
        conn.queue_declare("", exclusive=True)  # opens on the second node, the only live one
        with caplog.at_level("INFO", logger="flask_nucleon_amqp.connection"):
            close_broker_connection(conn)
            assert wait_until(lambda: conn.stats["recovered"] == 1, timeout=30)
        recovered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recovered connection")]
        assert len(recovered) == 1, recovered
        assert re.fullmatch(rf"recovered connection to amqp://guest:\*\*\*@{re.escape(BROKER_HOST)}:{BROKER_PORT}/%2F "
                            r"after \d+\.\d{3}s", recovered[0]), recovered
    finally:
        app.extensions["amqp"].close(timeout=5)


def _burst(mode: str) -> dict[str, int]:
    """Run tests/_buffer_burst.py in a fresh process (its peak RSS is its own) and read its figures."""
    script = os.path.join(os.path.dirname(__file__), "_buffer_burst.py")
    done = subprocess.run([sys.executable, script, mode, BROKER_URL], capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    print(mode, figures)
    return figures


def test_many_greenlets_publishing_buffer_at_most_max_buffer_per_connection() -> None:
    """10,000 greenlets x 4 KiB on a pool of 4 (max_buffer 1 MiB): every one confirmed, <= 1 MiB unsent each."""
    figures = _burst("greenlets")
    assert (figures["settled"], figures["failed"], figures["connections"]) == (10_000, 0, 4)
    # A publish waits for room before its frames are queued; a message's frame headers may exceed it a little.
    assert figures["buffer_peak"] <= 4 * (figures["max_buffer"] + 512), figures


def test_async_publishes_in_a_loop_wait_for_room_in_the_buffer() -> None:
    """10,000 async publishes of 16 KiB from one greenlet: the loop yields when the buffer is full."""
    figures = _burst("async")
    assert (figures["settled"], figures["failed"]) == (10_000, 0)
    assert figures["buffer_peak"] <= figures["max_buffer"] + 512, figures
    # Without the bound, all 160 MB of bodies were queued before the first byte left (RSS +170 MB).
    assert figures["rss_peak_kib"] - figures["rss_before_kib"] < 32 * 1024, figures


def test_a_publisher_finding_the_buffer_full_times_out_having_sent_nothing(names: Names) -> None:
    proxy = Proxy((BROKER_HOST, BROKER_PORT), receive_buffer=65536)
    app = make_app(AMQP_POOLS={"publish": {"port": proxy.port, "heartbeat": 0, "max_buffer": 65536}})
    AMQP(app)
    state = app.extensions["amqp"]
    try:
        bulk, late = names.queue("bulk"), names.queue("late")
        state.queue_declare(bulk, arguments={"x-max-length": 10})  # the broker keeps little of the bulk
        state.queue_declare(late)
        conn = state.connection("publish")
        conn.publish("", bulk, b"open")  # opened before the stall
        proxy.stall()
        confirmed: list[object] = []
        body = b"b" * 65536

        def publish_in_a_loop() -> None:
            for _ in range(1000):  # more than the socket buffers hold: the loop waits for room
                conn.publish("", bulk, body, callback=lambda _p, result: confirmed.append(result), timeout=60)

        loop = gevent.spawn(publish_in_a_loop)
        published = -1
        while published != conn.stats["published"]:  # until the loop stops getting room
            published = conn.stats["published"]
            gevent.sleep(0.5)
        assert published < 1000 and not loop.dead  # it yields, waiting for room
        with pytest.raises(Timeout, match="not sent"):  # no room for it: not queued at all
            conn.publish("", late, body, timeout=0.5)
        proxy.resume()
        loop.join(timeout=60)
        assert wait_until(lambda: len(confirmed) == 1000, timeout=60)
        assert confirmed == [{}] * 1000
        assert state.queue_declare(late, passive=True)["message_count"] == 0
        assert conn.stats["buffer_peak"] <= 65536 + 512
    finally:
        proxy.resume()
        state.close(timeout=5)
        proxy.close()


def test_each_resolved_address_has_a_connect_timeout_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """D26: a host name resolving to a silent address and then to the broker still connects.

    The silent address is a listener of this test on 127.0.0.2 that never answers; only name
    resolution is replaced (the host name resolves to it, then to the broker's address), the
    connections are real.
    """
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.2", BROKER_PORT))  # the broker listens on 127.0.0.1 only
    silent.listen(8)  # the kernel completes the TCP handshake; nobody ever speaks AMQP
    resolved: list[str] = []

    def resolve(host: str, port: int) -> list[object]:
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in ("127.0.0.2", BROKER_HOST)]

    monkeypatch.setattr(connection_module, "_resolve", resolve)
    app = make_app(AMQP_URL=f"amqp://guest:guest@broker.invalid:{BROKER_PORT}/?connect_timeout=3")
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        conn = state.connection("publish")
        started = time.monotonic()
        conn.ensure_open()  # the silent address uses its 3 s; the broker's address gets 3 s of its own
        assert time.monotonic() - started >= 2.9
        assert resolved == ["broker.invalid"]
        assert conn.queue_declare("", exclusive=True)["queue"].startswith("amq.gen-")
    finally:
        state.close(timeout=5)
        silent.close()
