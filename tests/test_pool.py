"""Pools: shared lazily-opened connections, round-robin, and fork safety."""

from __future__ import annotations

import os

import gevent
import pytest
from flask import Flask

from flask_nucleon_amqp import AMQP, ConfigError, Connection, ConnectionError, Pool, PukaConnection
from flask_nucleon_amqp.config import PoolSettings, read_config
from flask_nucleon_amqp.memory import MemoryConnection
from flask_nucleon_amqp.pool import TRANSPORTS, transport_class

from conftest import Names, make_app, wait_until


def test_connections_are_created_lazily_and_shared_round_robin() -> None:
    pool = Pool(read_config({"AMQP_POOLS": {"publish": {"size": 3}}})["publish"])
    assert pool.connections() == []
    handed = [pool.connection() for _ in range(7)]
    assert len(pool.connections()) == 3
    assert handed[0] is handed[3] is handed[6] and handed[1] is handed[4]
    assert not any(c.is_open for c in pool.connections())  # nothing opened until used
    pool.close()


def test_the_url_scheme_picks_the_transport() -> None:
    settings = read_config({"AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
                            "AMQP_POOLS": {"publish": {}, "tests": {"url": "memory://pool-tests"}}})
    assert type(Pool(settings["publish"]).connection()) is PukaConnection
    assert type(Pool(settings["tests"]).connection()) is MemoryConnection
    assert {scheme: transport_class(scheme) for scheme in TRANSPORTS} == {
        "amqp": PukaConnection, "amqps": PukaConnection, "memory": MemoryConnection}
    with pytest.raises(ConfigError, match="no transport for URL scheme 'redis'"):
        transport_class("redis")


def test_a_pool_takes_a_connection_class(names: Names) -> None:
    made: list[int] = []

    class Counted(PukaConnection):
        def __init__(self, settings: PoolSettings, index: int = 0) -> None:
            super().__init__(settings, index)
            made.append(index)

    pool = Pool(read_config({"AMQP_POOLS": {"publish": {"size": 2}}})["publish"], connection_class=Counted)
    try:
        conn: Connection = pool.connection()
        queue = names.queue()
        conn.queue_declare(queue)
        pool.connection().publish("", queue, b"through the second one")
        assert made == [0, 1] and all(type(c) is Counted for c in pool.connections())
        assert pool.health()["ok"] and pool.health()["server"].startswith("RabbitMQ")
    finally:
        pool.close()


def test_connection_is_a_context_manager_that_does_not_close(app: Flask, names: Names) -> None:
    queue = names.queue()
    with app.extensions["amqp"].get_amqp_pool().connection() as conn:
        conn.queue_declare(queue)
    assert conn.is_open
    conn.publish("", queue, b"still open")


def test_connections_open_in_parallel(names: Names) -> None:
    app = make_app(AMQP_POOLS={"publish": {"size": 4}})
    AMQP(app)
    pool = app.extensions["amqp"].get_amqp_pool()
    queue = names.queue()
    pool.connection().queue_declare(queue)
    jobs = [gevent.spawn(pool.connection().publish, "", queue, b"x") for _ in range(12)]
    gevent.joinall(jobs, raise_error=True, timeout=20)
    assert len(pool.connections()) == 4 and all(c.is_open for c in pool.connections())
    assert pool.stats()["open"] == 4 and pool.stats()["confirmed"] == 12
    app.extensions["amqp"].close()
    assert pool.stats()["open"] == 0
    with pytest.raises(ConnectionError, match="closed"):
        pool.connection()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_fork_child_opens_its_own_connections(host: str, names: Names) -> None:
    """A pool used in the parent, then fork: both publish and consume; the child never uses the parent's socket."""
    app = make_app(AMQP_URL=f"amqp://guest:guest@{host}:5672/%2F")
    AMQP(app)
    state = app.extensions["amqp"]
    queue = names.queue()
    state.queue_declare(queue)
    state.publish("", queue, b"from parent before fork")
    parent_conn = state.get_amqp_pool().connection()
    parent_session = parent_conn._session
    parent_fd = parent_session.client.fileno()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            os.close(read_end)
            pool = state.get_amqp_pool()
            conn = pool.connection()
            fresh = conn is not parent_conn and conn._session is None
            conn.publish("", queue, b"from child")
            message = state.get_amqp_pool("listen").connection().consume(queue, timeout=10)
            got = message.body if message else b""
            if message:
                message.ack()
            own_socket = conn._session.client.fileno() != parent_fd or fresh
            os.write(write_end, b"%d %d %s" % (fresh, own_socket, got))
            state.close(timeout=2)
            code = 0
        except BaseException:
            import traceback

            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with gevent.Timeout(30):
        report = b""
        while True:
            gevent.socket.wait_read(read_end)
            chunk = os.read(read_end, 1024)
            if not chunk:
                break
            report += chunk
        _, status = os.waitpid(pid, 0)
    os.close(read_end)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, report
    fresh, own_socket, got = report.split(b" ", 2)  # type: ignore[assignment]  # the parent reads the child's bytes
    assert fresh == b"1" and own_socket == b"1"  # type: ignore[comparison-overlap]
    assert got == b"from parent before fork"
    # The parent's connection was not disturbed by the child.
    assert parent_conn._session is parent_session and parent_session.usable
    state.publish("", queue, b"parent after fork")
    remaining = [state.get(queue), state.get(queue)]
    assert {m.body for m in remaining if m} == {b"from child", b"parent after fork"}
    for message in remaining:
        message.ack()
    state.close()


def test_health_never_waits_and_reports_up_and_down(names: Names) -> None:
    app = make_app(AMQP_POOLS={"publish": {"size": 1}, "listen": {"port": 1, "connect_timeout": 0.5}})
    AMQP(app)
    state = app.extensions["amqp"]
    publish, listen = state.get_amqp_pool("publish"), state.get_amqp_pool("listen")
    first = publish.health()
    assert first["ok"] is False and first["open"] == 0  # nothing opened yet: a background attempt starts
    assert wait_until(lambda: publish.health()["ok"], timeout=10)
    report = publish.health()
    assert report.pop("server").startswith("RabbitMQ 3.")
    assert report == {"ok": True, "open": 1, "size": 1, "blocked": False,
                      "broker": "amqp://guest:***@127.0.0.1:5672/%2F", "error": None}
    listen.health()
    assert wait_until(lambda: "ConnectionError" in (listen.health()["error"] or ""), timeout=10)
    assert listen.health()["ok"] is False
    opened_before = publish.stats()["opened"]
    for _ in range(50):
        publish.health()
    assert publish.stats()["opened"] == opened_before  # no new connection per call
    state.close()
