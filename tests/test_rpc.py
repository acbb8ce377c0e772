"""Request/reply with direct reply-to: round trip, timeout, late replies, unroutable requests."""

from __future__ import annotations

import time

import gevent
import pytest
from flask import Flask

from flask_nucleon_amqp import Message, PukaConnection, Timeout, Unroutable

from conftest import Names


def _serve(conn: PukaConnection, queue: str, delay: float = 0.0) -> int:
    def answer(promise: int, request: Message) -> None:
        if delay:
            gevent.sleep(delay)
        conn.publish("", request.reply_to, json={"echo": request.json()},
                     correlation_id=request.correlation_id)
        request.ack()

    return conn.consume(queue, callback=answer)  # type: ignore[no-any-return]


def test_call_round_trip(app: Flask, names: Names) -> None:
    state = app.extensions["amqp"]
    queue = names.queue("rpc")
    state.queue_declare(queue)
    server = _serve(state.connection("listen"), queue)
    client = state.connection()
    replies = [client.call("", queue, json={"n": i}, timeout=10) for i in range(5)]
    assert [reply.json() for reply in replies] == [{"echo": {"n": i}} for i in range(5)]
    # Many greenlets at once on one connection, each gets its own reply.
    jobs = [gevent.spawn(client.call, "", queue, json={"n": i}, timeout=10) for i in range(50)]
    gevent.joinall(jobs, raise_error=True)
    assert sorted(job.value.json()["echo"]["n"] for job in jobs) == list(range(50))
    state.cancel(server)


def test_call_timeout_and_late_reply_is_dropped(app: Flask, names: Names) -> None:
    state = app.extensions["amqp"]
    queue = names.queue("slow")
    state.queue_declare(queue)
    server = _serve(state.connection("listen"), queue, delay=0.5)
    client = state.connection()
    started = time.monotonic()
    with pytest.raises(Timeout):
        client.call("", queue, json={"n": 1}, timeout=0.2)
    assert time.monotonic() - started < 1
    gevent.sleep(0.6)  # the late reply arrives and is dropped
    assert client.call("", queue, json={"n": 2}, timeout=5).json() == {"echo": {"n": 2}}
    state.cancel(server)


def test_call_to_nowhere_is_unroutable(conn: PukaConnection, names: Names) -> None:
    started = time.monotonic()
    with pytest.raises(Unroutable):
        conn.call("", names.queue("nobody-listens"), b"?", timeout=5)
    assert time.monotonic() - started < 2
