"""on_initialise: once per process, before the first request, also under concurrent first requests and after fork."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from flask import Flask, current_app

from flask_nucleon_amqp import AMQP, AMQPState, InitialisationError, Message, PukaConnection, on_initialise
from flask_nucleon_amqp import lifecycle as lifecycle_module
from flask_nucleon_amqp.gunicorn import post_worker_init, worker_exit

from conftest import Names, make_app, outcome


@pytest.fixture
def apps(names: Names) -> Iterator[list[Flask]]:
    """Apps a test makes; closed before ``names`` deletes their queues."""
    made: list[Flask] = []
    yield made
    for app in made:
        app.extensions["amqp"].close(timeout=5)


def _app(apps: list[Flask], amqp: AMQP, **config: Any) -> Flask:
    app = make_app(**config)
    amqp.init_app(app)

    @app.get("/")
    def index() -> str:
        return "ok"

    apps.append(app)
    return app


def test_runs_once_when_50_greenlets_send_the_first_requests_at_once(apps: list[Flask]) -> None:
    amqp = AMQP()
    calls: list[Any] = []
    finished: list[bool] = []

    @amqp.on_initialise
    def slow_start() -> None:
        calls.append(gevent.getcurrent())
        gevent.sleep(0.1)  # every other first request arrives while this runs
        finished.append(True)

    app = _app(apps, amqp)

    @app.get("/seen")
    def seen() -> str:
        return str(len(finished))

    client = app.test_client()
    greenlets = [gevent.spawn(outcome, client.get, "/seen") for _ in range(50)]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    responses = [g.value for g in greenlets]
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.text for r in responses} == {"1"}  # no request was served before the handler finished
    assert len(calls) == 1
    assert client.get("/").status_code == 200 and len(calls) == 1


def test_handlers_run_in_order_in_an_app_context(apps: list[Flask]) -> None:
    amqp = AMQP()
    order: list[str] = []

    @on_initialise
    def module_level() -> None:
        order.append(f"module:{current_app.name}")

    @amqp.on_initialise
    def bound() -> None:
        order.append(f"bound:{current_app.amqp is current_app.extensions['amqp']}")  # type: ignore[attr-defined]  # Nucleon's name for the state

    try:
        app = _app(apps, amqp)
        app.extensions["amqp"].initialise()  # as `flask amqp declare/listen` and post_worker_init do
        app.test_client().get("/")
        assert order == [f"module:{app.name}", "bound:True"]
        other = _app(apps, AMQP())
        other.test_client().get("/")  # module-level handlers run for every app
        assert order[-1] == f"module:{other.name}"
    finally:
        lifecycle_module._global_handlers.remove(module_level)


def test_a_raising_handler_stops_the_process_from_serving(names: Names, apps: list[Flask]) -> None:
    queue = names.queue()
    amqp = AMQP()
    calls: list[int] = []

    @amqp.on_initialise
    def starts_a_listener() -> None:
        current_app.amqp.register_and_spawn_amqp_listener(queue, lambda c, p, m: None)  # type: ignore[attr-defined]  # Nucleon's name for the state

    @amqp.on_initialise
    def broken() -> None:
        calls.append(1)
        raise ValueError("the database is not there")

    app = _app(apps, amqp, AMQP_TOPOLOGY={"queues": {queue: {}}})
    client = app.test_client()
    for _ in range(2):
        with pytest.raises(InitialisationError) as caught:
            client.get("/")
        assert "test_lifecycle.test_a_raising_handler_stops_the_process_from_serving.<locals>.broken" in str(
            caught.value)
        assert "the database is not there" in str(caught.value)
        assert isinstance(caught.value.__cause__, ValueError)
    assert calls == [1]  # not retried
    state: AMQPState = app.extensions["amqp"]
    [listener] = state.listeners
    assert not listener.consuming  # not half started: the listener it had started was stopped
    assert state.queue_declare(queue, passive=True)["consumer_count"] == 0
    app.testing = False  # outside tests, every request is a 500 with the cause in the log
    assert client.get("/").status_code == 500


def test_listeners_start_after_handlers_and_topology_before(names: Names, apps: list[Flask]) -> None:
    queue = names.queue()
    amqp = AMQP()
    seen: list[Any] = []

    @amqp.on_initialise
    def check() -> None:
        seen.append(current_app.amqp.queue_declare(queue, passive=True)["queue"])  # type: ignore[attr-defined]  # already declared
        seen.append(len(current_app.amqp.listeners))  # type: ignore[attr-defined]  # not started yet

    @amqp.listener(queue)
    def handle(connection: PukaConnection, promise: int, message: Message) -> None:
        seen.append(message.body)

    app = _app(apps, amqp, AMQP_TOPOLOGY={"queues": {queue: {}}})
    app.test_client().get("/")
    assert seen == [queue, 0]
    assert app.extensions["amqp"].listeners[0].consuming


def test_start_listeners_false_leaves_them_to_flask_amqp_listen(names: Names, apps: list[Flask]) -> None:
    queue = names.queue()
    amqp = AMQP()
    amqp.listener(queue)(lambda c, p, m: None)
    app = _app(apps, amqp, AMQP_TOPOLOGY={"queues": {queue: {}}}, AMQP_START_LISTENERS=False)
    state: AMQPState = app.extensions["amqp"]
    assert app.test_client().get("/").status_code == 200
    [listener] = state.listeners
    assert not listener.started and state.queue_declare(queue, passive=True)["consumer_count"] == 0
    state.lifecycle.start_listeners()
    assert listener.consuming


def test_broker_down_does_not_stop_the_app_from_serving(apps: list[Flask]) -> None:
    amqp = AMQP()
    amqp.listener("nowhere")(lambda c, p, m: None)
    app = _app(apps, amqp, AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F", AMQP_TOPOLOGY={"queues": {"nowhere": {}}})
    assert app.test_client().get("/").status_code == 200
    [listener] = app.extensions["amqp"].listeners
    assert listener.started and not listener.consuming  # retrying in the background


def test_the_child_of_a_fork_initialises_again(apps: list[Flask]) -> None:
    amqp = AMQP()
    pids: list[int] = []
    amqp.on_initialise(lambda: pids.append(os.getpid()))
    app = _app(apps, amqp)
    client = app.test_client()
    client.get("/")
    assert pids == [os.getpid()]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            client.get("/")
            client.get("/")
            os.write(write, repr(pids).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as reader:
        reported = reader.read()
    os.waitpid(child, 0)
    assert reported == repr([os.getpid(), child])  # once more, in the child only
    assert pids == [os.getpid()]


def test_gunicorn_hooks_initialise_at_boot_and_close_at_exit(names: Names, apps: list[Flask]) -> None:
    queue = names.queue()
    amqp = AMQP()
    amqp.listener(queue)(lambda c, p, m: None)
    app = _app(apps, amqp, AMQP_TOPOLOGY={"queues": {queue: {}}})

    class Worker:  # what the hooks read of a gunicorn worker
        wsgi = app
        pid = os.getpid()

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)}
    try:
        post_worker_init(Worker())
        state: AMQPState = app.extensions["amqp"]
        assert state.listeners[0].consuming  # before any request
        Worker.pid = -1
        worker_exit(None, Worker())  # in the master, for a dead worker: nothing to do here
        assert not state.closed
        Worker.pid = os.getpid()
        worker_exit(None, Worker())
        assert state.closed and not state.listeners[0].consuming
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_stop_request_abandons_start_up_in_progress(names: Names, apps: list[Flask]) -> None:
    queue = names.queue()
    amqp = AMQP()
    entered: list[bool] = []

    @amqp.on_initialise
    def slow_start() -> None:
        entered.append(True)
        gevent.sleep(30)  # as a handler waiting on something that does not come

    amqp.listener(queue)(lambda c, p, m: None)
    app = _app(apps, amqp, AMQP_TOPOLOGY={"queues": {queue: {}}})
    state: AMQPState = app.extensions["amqp"]
    assert state.lifecycle is not None
    gevent.spawn_later(0.3, state.lifecycle.request_stop)  # as the SIGTERM handler does
    started = time.monotonic()
    with pytest.raises(InitialisationError, match="abandoned in on_initialise handler .*slow_start"):
        state.initialise()
    assert time.monotonic() - started < 5
    assert entered == [True] and state.listeners == []  # the listener after it never started
    with pytest.raises(RuntimeError, match="is stopping: the listener on"):
        state.register_and_spawn_amqp_listener(queue, lambda c, p, m: None)
    assert state.queue_declare(queue, passive=True)["consumer_count"] == 0


def test_a_worker_told_to_stop_before_post_worker_init_does_not_initialise(apps: list[Flask]) -> None:
    amqp = AMQP()
    ran: list[bool] = []
    amqp.on_initialise(lambda: ran.append(True))
    app = _app(apps, amqp)

    class Worker:  # SIGTERM came while gunicorn loaded the app
        wsgi = app
        pid = os.getpid()
        alive = False

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)}
    try:
        post_worker_init(Worker())
        assert ran == [] and app.extensions["amqp"].lifecycle.stopping
        worker_exit(None, Worker())
        assert app.extensions["amqp"].closed
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
