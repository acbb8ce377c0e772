"""Fixtures shared by the test suite. Every broker test talks to the real broker."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any, cast

import gevent
import pytest
from flask import Flask

from flask_nucleon_amqp import AMQP, AMQPState, Connection, PukaConnection

BROKER_HOST = os.environ.get("AMQP_TEST_HOST", "127.0.0.1")
BROKER_PORT = int(os.environ.get("AMQP_TEST_PORT", "5672"))
BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fail the whole run with one clear message when the broker is not there (never skip)."""
    try:
        socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=3).close()
    except OSError as exc:
        pytest.exit(f"RabbitMQ is not reachable at {BROKER_HOST}:{BROKER_PORT} ({exc}); "
                    "run `make broker` (or rabbitmq-server -detached) first", returncode=3)


@pytest.fixture(autouse=True)
def _fail_on_hub_errors() -> Iterator[None]:
    """An exception that reaches the gevent hub (an unhandled greenlet error) fails the test."""
    hub = gevent.get_hub()
    errors: list[Any] = []
    original = hub.handle_error

    def handle_error(context: Any, type_: Any, value: Any, tb: Any) -> None:
        if not issubclass(type_, gevent.GreenletExit):
            errors.append((context, type_, value))
        original(context, type_, value, tb)

    hub.handle_error = handle_error
    yield
    hub.handle_error = original
    assert not errors, f"exceptions reached the gevent hub: {errors}"


def make_app(**config: Any) -> Flask:
    app = Flask("flask_nucleon_amqp_tests")
    app.config["TESTING"] = True
    app.config["AMQP_URL"] = BROKER_URL
    app.config["AMQP_POOLS"] = {"publish": {"size": 2}, "listen": {"size": 1}}
    app.config.update(config)
    return app


@pytest.fixture
def app() -> Iterator[Flask]:
    """A Flask app with the extension set up against the test broker (pytest-flask uses it)."""
    app = make_app()
    AMQP(app)
    yield app
    app.extensions["amqp"].close(timeout=5)


@pytest.fixture
def amqp(app: Flask) -> AMQPState:
    return app.extensions["amqp"]  # type: ignore[no-any-return]


@pytest.fixture
def conn(amqp: AMQPState) -> PukaConnection:
    return cast(PukaConnection, amqp.get_amqp_pool().connection())  # the broker tests run puka connections


class Names:
    """Unique exchange and queue names for one test; deletes what they name at the end."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:10]
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def queue(self, label: str = "q") -> str:
        name = f"test-{label}-{self.run}-{len(self.queues)}"
        self.queues.append(name)
        return name

    def exchange(self, label: str = "x") -> str:
        name = f"test-{label}-{self.run}-{len(self.exchanges)}"
        self.exchanges.append(name)
        return name

    def cleanup(self) -> None:
        if not (self.queues or self.exchanges):
            return
        app = make_app(AMQP_POOLS={"publish": {"size": 1}})
        AMQP(app)
        conn = app.extensions["amqp"].connection()
        try:
            for name in reversed(self.queues):
                conn.queue_delete(name, timeout=10)
            for name in reversed(self.exchanges):
                conn.exchange_delete(name, timeout=10)
        finally:
            app.extensions["amqp"].close(timeout=5)


@pytest.fixture
def names() -> Iterator[Names]:
    names = Names()
    yield names
    names.cleanup()


def close_broker_connection(conn: Connection, why: str = "test") -> None:
    """Make the broker close this connection (320 CONNECTION_FORCED), as an operator would."""
    session = cast(PukaConnection, conn)._session
    assert session is not None and session.alive
    local_port = session.client.sd.getsockname()[1]
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    pids = [line.split()[0] for line in listing.splitlines() if line.split()[-1:] == [str(local_port)]]
    assert pids, f"the broker does not list a connection from port {local_port}"
    subprocess.run(["rabbitmqctl", "-q", "close_connection", pids[0], why], check=True, capture_output=True,
                   timeout=60)


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Wait (cooperatively) until ``predicate()`` is true; False if it never was."""
    with gevent.Timeout(timeout, False):
        while not predicate():
            gevent.sleep(interval)
        return True
    return bool(predicate())


def outcome(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``function`` and return its result or the exception it raised (for spawned greenlets)."""
    try:
        return function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return exc
