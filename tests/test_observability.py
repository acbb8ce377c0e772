"""Logs, stats and metrics that tell what a connection is doing (issue 11).

Waiting greenlets are made by stalling a TCP proxy owned by the test; the
memory alarm, the lost and recovered connection happen on a private node
(tests/_brokers.py), never on the shared broker.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import gevent
import prometheus_client
import pytest
from flask import Flask

from flask_nucleon_amqp import AMQP, AMQPState, NotFound, PukaConnection, Unroutable, signals
from flask_nucleon_amqp.metrics import register_metrics

from _proxy import Proxy
from conftest import BROKER_HOST, BROKER_PORT, Names, make_app, outcome, wait_until

if TYPE_CHECKING:
    from _brokers import RabbitNode

pytest_plugins = ["_brokers"]


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    proxy = Proxy((BROKER_HOST, BROKER_PORT))
    yield proxy
    proxy.close()


def _app(url: str, **pool: Any) -> Flask:
    app = make_app(AMQP_URL=url, AMQP_POOLS={"publish": {"size": 1, **pool}, "listen": {"size": 1}})
    AMQP(app)
    return app


def test_stats_and_metrics_show_greenlets_waiting_and_buffered_bytes(app: Flask, names: Names, proxy: Proxy) -> None:
    proxied = _app(f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", max_buffer=65536, operation_timeout=60)
    state: AMQPState = proxied.extensions["amqp"]
    registry = prometheus_client.CollectorRegistry()
    register_metrics(proxied, registry)
    pool = state.get_amqp_pool("publish")

    def waiting(what: str) -> tuple[int, float | None]:
        return pool.stats()[f"waiting_{what}"], registry.get_sample_value(
            "amqp_waiting_greenlets", {"pool": "publish", "for": what})

    queue = names.queue()
    app.extensions["amqp"].queue_declare(queue)  # directly: the proxied pool has no connection yet
    try:
        proxy.stall()
        publishers = [gevent.spawn(outcome, state.publish, "", queue, b"x") for _ in range(3)]
        assert wait_until(lambda: waiting("connection") == (3, 3.0), timeout=10), waiting("connection")
        proxy.resume()
        assert [g.get(timeout=30) for g in publishers] == [None] * 3
        assert waiting("connection") == (0, 0.0)

        proxy.stall()
        publishers = [gevent.spawn(outcome, state.publish, "", queue, b"x") for _ in range(5)]
        assert wait_until(lambda: waiting("confirm") == (5, 5.0), timeout=10), waiting("confirm")
        confirms = []

        def fill() -> None:  # 8 MiB, more than the kernel takes, so more than max_buffer stays; the next waits
            for _ in range(2):  # (a message that fits in the kernel might leave fewer bytes than max_buffer)
                state.publish("", queue, b"b" * 8388608, callback=lambda promise, result: confirms.append(result))

        filling = gevent.spawn(fill)
        assert wait_until(lambda: (registry.get_sample_value("amqp_send_buffer_bytes", {"pool": "publish"})
                                   or 0) > 65536 and waiting("room") == (1, 1.0), timeout=10), waiting("room")
        blocked = gevent.spawn(outcome, state.publish, "", queue, b"after")
        assert wait_until(lambda: waiting("room") == (2, 2.0), timeout=10), waiting("room")
        gevent.sleep(0.3)  # the five publishes wait at least that long for their confirm
        proxy.resume()
        assert [g.get(timeout=60) for g in publishers] == [None] * 5 and blocked.get(timeout=60) is None
        filling.get(timeout=60)
        assert wait_until(lambda: len(confirms) == 2, timeout=60) and confirms == [{}] * 2
        assert [waiting(what) for what in ("confirm", "room", "connection")] == [(0, 0.0)] * 3
        assert registry.get_sample_value("amqp_send_buffer_bytes", {"pool": "publish"}) == 0
        latency = pool.stats()["confirm_ms"]
        assert latency["samples"] == 3 + 5 + 2 + 1
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert latency["max"] >= 300
    finally:
        proxy.resume()
        state.close(timeout=5)


def test_confirm_percentiles_are_none_before_any_confirm(app: Flask) -> None:
    assert app.extensions["amqp"].stats()["publish"]["confirm_ms"] == {
        "p50": None, "p90": None, "p99": None, "max": None, "samples": 0}


def test_metrics_count_failed_publishes_by_reason_and_listener_handling_time(app: Flask, names: Names) -> None:
    registry = prometheus_client.CollectorRegistry()
    register_metrics(app, registry)
    state: AMQPState = app.extensions["amqp"]
    queue = names.queue()
    state.queue_declare(queue)
    with pytest.raises(NotFound):
        state.publish(names.exchange(), "k", b"x")
    for _ in range(2):
        with pytest.raises(Unroutable):
            state.publish("", names.queue("nobody"), b"x", mandatory=True)
    listener = state.register_and_spawn_amqp_listener(queue, lambda conn, promise, message: gevent.sleep(0.05))
    for _ in range(3):
        state.publish("", queue, b"x")
    assert wait_until(lambda: listener.stats["handled"] == 3)
    value = registry.get_sample_value
    assert value("amqp_publish_failures_total", {"pool": "publish", "reason": "NotFound"}) == 1
    assert value("amqp_publish_failures_total", {"pool": "publish", "reason": "Unroutable"}) == 2
    assert wait_until(lambda: value("amqp_listener_handling_seconds_count", {"queue": queue}) == 3)
    handling = value("amqp_listener_handling_seconds_sum", {"queue": queue})
    assert handling is not None
    assert 0.15 <= handling < 30
    assert value("amqp_listener_handling_seconds_bucket", {"queue": queue, "le": "0.025"}) == 0


def test_frames_are_logged_at_debug_without_contents_or_password(
        names: Names, caplog: pytest.LogCaptureFixture) -> None:
    password = "guest"  # noqa: S105 - the test broker's; what must never show
    app = _app(f"amqp://guest:{password}@{BROKER_HOST}:{BROKER_PORT}/%2F")
    state: AMQPState = app.extensions["amqp"]
    queue = names.queue()
    try:
        state.queue_declare(queue)
        conn = cast(PukaConnection, state.connection())
        assert conn._session is not None and not conn._session.client.x_log_frames  # off by default
        with caplog.at_level(logging.DEBUG, logger="flask_nucleon_amqp.frames"):
            state.publish("", queue, b"top secret body", headers={"h": "secret header"})
            message = state.get(queue, no_ack=True)
        assert message is not None and message.body == b"top secret body"
        lines = [r.getMessage() for r in caplog.records if r.name == "flask_nucleon_amqp.frames"]
        assert re.search(r"^sent basic\.publish on channel \d+, \d+ bytes$", "\n".join(lines), re.M), lines
        assert "sent content body on channel" in "\n".join(lines)
        assert any(re.fullmatch(r"sent content header \(body 15 bytes\) on channel \d+, \d+ bytes", line)
                   for line in lines), lines
        assert any(line.startswith("received basic.ack on channel") for line in lines), lines
        assert any(line.startswith("received basic.get_ok on channel") for line in lines), lines
        assert all("secret" not in line and password not in line for line in lines)
        caplog.clear()
        state.publish("", queue, b"x")  # back at the default level: nothing logged
        assert not [r for r in caplog.records if r.name == "flask_nucleon_amqp.frames"]
    finally:
        state.close(timeout=5)


# -- on a private node --------------------------------------------------------------------------------


@pytest.mark.slow
def test_log_lines_and_signals_of_opening_losing_recovering_and_a_memory_alarm(
        node_up: RabbitNode, names: Names, caplog: pytest.LogCaptureFixture) -> None:
    app = _app(node_up.url(), blocked_timeout=30)
    state: AMQPState = app.extensions["amqp"]
    registry = prometheus_client.CollectorRegistry()
    register_metrics(app, registry)
    received: list[tuple[str, Any, dict[str, Any]]] = []

    def record(name: str) -> Any:
        def receiver(sender: Any, **kwargs: Any) -> None:
            received.append((name, sender, kwargs))
        getattr(signals, name).connect(receiver)
        return receiver

    receivers = [record(name) for name in ("connection_blocked", "connection_unblocked")]
    user, password = node_up.url().split("://", 1)[1].split("@", 1)[0].split(":", 1)
    where = f"amqp://{user}:***@127.0.0.1:{node_up.port}/%2F"
    queue = names.queue()
    try:
        with caplog.at_level(logging.INFO, logger="flask_nucleon_amqp"):
            conn = state.connection()
            conn.queue_declare(queue, arguments={"x-expires": 600_000})
            assert f"connected to {where} (publish pool)" in caplog.messages

            node_up.close_all_connections("observability test")
            assert wait_until(lambda: any("recovered connection" in m for m in caplog.messages), timeout=20)
            lost = [m for m in caplog.messages if m.startswith(f"connection to {where} lost:")]
            assert lost and "320" in lost[0] and "observability test" in lost[0], caplog.messages
            recovered = [m for m in caplog.messages if m.startswith("recovered connection to")][0]
            assert re.fullmatch(rf"recovered connection to {re.escape(where)} after \d+\.\d{{3}}s", recovered)
            assert 0.0 < float(recovered.rsplit(" ", 1)[1][:-1]) < 10
            assert [r.levelname for r in caplog.records if r.getMessage() in lost] == ["WARNING"]

            node_up.set_memory_watermark(0.000001)
            try:
                # The broker blocks a connection (and says so) when it publishes during the alarm.
                first = gevent.spawn(outcome, conn.publish, "", queue, b"during the alarm")
                assert wait_until(lambda: conn.blocked, timeout=20)
                assert registry.get_sample_value("amqp_connections_blocked", {"pool": "publish"}) == 1
                waiter = gevent.spawn(outcome, conn.publish, "", queue, b"while blocked")
                assert wait_until(lambda: state.stats()["publish"]["waiting_room"] == 1, timeout=10)
            finally:
                node_up.set_memory_watermark(0.4)
            assert first.get(timeout=30) is None and waiter.get(timeout=30) is None
            assert wait_until(lambda: not conn.blocked, timeout=20)
            assert registry.get_sample_value("amqp_connections_blocked", {"pool": "publish"}) == 0
        assert [(name, sender) for name, sender, _ in received] == [("connection_blocked", conn),
                                                                     ("connection_unblocked", conn)]
        reason = received[0][2]["reason"]
        assert "memory" in reason
        blocked_lines = [r for r in caplog.records if r.getMessage().startswith("broker blocked publishing on")]
        assert [(r.levelname, r.getMessage().endswith(f": {reason}")) for r in blocked_lines] == [("WARNING", True)]
        assert any(r.levelname == "INFO" and r.getMessage().startswith("broker unblocked publishing on")
                   for r in caplog.records)
        assert all(password not in m for m in caplog.messages)
    finally:
        for receiver in receivers:
            for name in ("connection_blocked", "connection_unblocked"):
                getattr(signals, name).disconnect(receiver)
        state.close(timeout=5)
