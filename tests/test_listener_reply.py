"""Listeners that reply: a callback's return value goes back to the caller of ``call()``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from flask import Flask
from gevent.queue import Queue as GQueue

from flask_nucleon_amqp import AMQP, AMQPState, Binding, Connection, Exchange, Message, Queue, Timeout

from conftest import Names, make_app, wait_until


@pytest.fixture
def state(names: Names) -> Iterator[AMQPState]:
    """An app's AMQP state, closed (listeners stopped) before ``names`` deletes the queues."""
    app: Flask = make_app()
    AMQP(app)
    yield app.extensions["amqp"]
    app.extensions["amqp"].close(timeout=5)


def _ready(state: AMQPState, queue: str) -> int:
    return int(state.queue_declare(queue, passive=True)["message_count"])


def _answer(connection: Connection, promise: int, request: Message) -> Any:
    kind = request.headers.get("kind")
    if kind == "bytes":
        return b"\x00raw " + request.body
    if kind == "str":
        return f"text: {request.text}"
    if kind == "empty":
        return b""  # an empty reply, not "no reply"
    return {"echo": request.json(), "routing_key": request.routing_key}


@pytest.mark.parametrize("pool", ["listen", "publish"])
def test_call_round_trip_through_a_listener(names: Names, state: AMQPState, pool: str) -> None:
    queue = names.queue("rpc")
    state.queue_declare(queue)
    listener = state.register_and_spawn_amqp_listener(queue, _answer, type=pool)
    client = state.connection()

    reply = client.call("", queue, json={"n": 1}, timeout=5)
    assert reply.json() == {"echo": {"n": 1}, "routing_key": queue}
    assert reply.content_type == "application/json"
    assert reply.correlation_id is not None and reply.correlation_id.startswith("rpc-")
    raw = client.call("", queue, b"\xff\x01", headers={"kind": "bytes"}, timeout=5)
    assert raw.body == b"\x00raw \xff\x01" and raw.content_type is None  # bytes go as they are
    text = client.call("", queue, "héllo", headers={"kind": "str"}, timeout=5)
    assert text.text == "text: héllo"
    empty = client.call("", queue, b"", headers={"kind": "empty"}, timeout=5)
    assert empty.body == b""

    # Many callers at once, each gets its own reply.
    jobs = [gevent.spawn(client.call, "", queue, json={"n": i}, timeout=10) for i in range(30)]
    gevent.joinall(jobs, raise_error=True)
    assert sorted(job.value.json()["echo"]["n"] for job in jobs) == list(range(30))
    assert wait_until(lambda: listener.stats == {"received": 34, "handled": 34, "failed": 0})
    assert _ready(state, queue) == 0  # every request acked once its reply was confirmed


def test_a_value_returned_for_a_message_without_reply_to_is_not_sent(names: Names, state: AMQPState) -> None:
    queue = names.queue()
    state.queue_declare(queue)
    listener = state.register_and_spawn_amqp_listener(queue, lambda c, p, m: {"ignored": True})
    state.publish("", queue, b"fire and forget")
    assert wait_until(lambda: listener.stats == {"received": 1, "handled": 1, "failed": 0})
    listener.stop(timeout=5)
    assert _ready(state, queue) == 0


def _dead_lettered_queue(names: Names, state: AMQPState) -> tuple[str, str]:
    dead, dead_queue, queue = names.exchange("dead"), names.queue("dead"), names.queue("rpc")
    state.declare(Exchange(dead, "fanout"), Queue(dead_queue), Binding(dead, queue=dead_queue),
                  Queue(queue, dead_letter_exchange=dead))
    return queue, dead_queue


class _Unserialisable:
    pass


@pytest.mark.parametrize("failure", ["raises", "returns what JSON cannot carry"])
def test_a_failing_callback_times_the_caller_out_and_its_request_is_handled_per_on_error(
        names: Names, state: AMQPState, caplog: pytest.LogCaptureFixture, failure: str) -> None:
    queue, dead_queue = _dead_lettered_queue(names, state)

    def broken(connection: Connection, promise: int, request: Message) -> Any:
        if failure == "raises":
            raise RuntimeError("cannot answer")
        return _Unserialisable()

    listener = state.register_and_spawn_amqp_listener(queue, broken, on_error="reject")
    started = time.monotonic()
    with pytest.raises(Timeout):
        state.connection().call("", queue, json={"n": 1}, timeout=0.5)
    assert time.monotonic() - started < 2
    assert wait_until(lambda: _ready(state, dead_queue) == 1, timeout=5)
    request = state.get(dead_queue)
    assert request is not None and request.json() == {"n": 1}
    assert request.reply_to is not None and request.reply_to.startswith("amq.rabbitmq.reply-to")
    assert request.headers["x-death"][0]["reason"] == "rejected"
    request.ack()
    assert listener.stats == {"received": 1, "handled": 0, "failed": 1} and listener.consuming
    expected = "cannot answer" if failure == "raises" else "is not JSON serializable"
    assert expected in caplog.text and "rejected" in caplog.text


def test_a_reply_comes_after_retries(names: Names, state: AMQPState) -> None:
    """reply_to and correlation_id survive the trip through the retry queue."""
    queue = names.queue("rpc")
    names.queues += [f"{queue}.retry", f"{queue}.dead"]
    state.queue_declare(queue)
    attempts: GQueue = GQueue()

    def flaky(connection: Connection, promise: int, request: Message) -> Any:
        attempts.put(request.headers.get("x-retry-count"))
        if "x-retry-count" not in request.headers:
            raise RuntimeError("first attempt fails")
        return {"answer": request.json()["n"] * 2}

    listener = state.register_and_spawn_amqp_listener(queue, flaky, retry=dict(max_attempts=2, delay=0.1))
    reply = state.connection().call("", queue, json={"n": 21}, timeout=5)
    assert reply.json() == {"answer": 42}
    assert [attempts.get(timeout=1), attempts.get(timeout=1)] == [None, 1]
    assert wait_until(lambda: listener.stats == {"received": 2, "handled": 1, "failed": 1})
