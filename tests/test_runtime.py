"""Any server: `flask run`, gunicorn gthread/gevent, plain scripts and OS threads (runtime.py).

The servers run as subprocesses with AMQP_RUNTIME left at "auto", so each proves
that auto mode picks right for that kind of server. The `flask run` server talks
to the broker through the test's own TCP proxy, so that its connections can be
cut without touching anyone else's.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import gevent
import gevent.threadpool
import pytest
from test_gunicorn import _HAS_CONTROL_SOCKET

from flask_nucleon_amqp import AMQP, AMQPState, ConfigError, PukaConnection, Timeout, signals
from flask_nucleon_amqp.runtime import THREAD_NAME, ThreadBridge

from _proxy import Proxy
from conftest import BROKER_HOST, BROKER_PORT, BROKER_URL, Names, make_app, wait_until

ROOT = Path(__file__).parent.parent
TESTS = Path(__file__).parent
HEARTBEAT = 2.0


def _control(where: Path) -> list[str]:  # gunicorn >= 25: a control socket per test server
    return ["--control-socket", str(where / "g.ctl")] if _HAS_CONTROL_SOCKET else []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(port: int, method: str, path: str) -> tuple[int, Any]:
    """(status, JSON body); (0, the error) when there was no answer (errors must not reach the hub)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if response.status == 200 else body
    except OSError as exc:
        return 0, repr(exc)
    finally:
        conn.close()


# Blocking HTTP runs in real threads, so that this process's hub (and the proxy in it) keeps running.
_threads = gevent.threadpool.ThreadPool(50)


def _request(port: int, method: str, path: str) -> tuple[int, Any]:
    return cast(tuple[int, Any], _threads.apply(_http, (port, method, path)))


def _try_state(port: int) -> dict[str, Any] | None:
    status, body = _request(port, "GET", "/state")
    return body if status == 200 else None


def _env(names: Names, url: str, **extra: str) -> tuple[dict[str, str], str, str]:
    queue, results = names.queue("work"), names.queue("results")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "SERVERS_AMQP_URL": url,
           "SERVERS_QUEUE": queue, "SERVERS_RESULTS": results, "SERVERS_HEARTBEAT": str(HEARTBEAT), **extra}
    env.pop("AMQP_RUNTIME", None)
    return env, queue, results


class Results:
    """What the listener of the served app reported, read from its results queue."""

    def __init__(self, state: AMQPState, queue: str) -> None:
        self.state = state
        self.queue = queue
        self.events: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        while (message := self.state.get(self.queue)) is not None:
            self.events.append(message.json())
            message.ack()
        return self.events

    def bodies(self) -> list[str]:
        return [event["body"] for event in self.read()]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[str]:
        wait_until(lambda: len(self.bodies()) >= count, timeout=timeout, interval=0.05)
        return self.bodies()


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- flask run ----------------------------------------------------------------------------------------
class FlaskRun:
    def __init__(self, port: int, proxy: Proxy, queue: str, results: Results, log: Path) -> None:
        self.port, self.proxy, self.queue, self.results, self.log = port, proxy, queue, results, log


@pytest.fixture(scope="module")
def flask_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskRun]:
    """`flask run` (Werkzeug's threaded development server, the default), through a TCP proxy."""
    names = Names()
    app = make_app()
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    proxy = Proxy((BROKER_HOST, BROKER_PORT))
    env, queue, results = _env(names, f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
    state.queue_declare(queue)
    state.queue_declare(results)
    port = _free_port()
    log = tmp_path_factory.mktemp("flask_run") / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "flask", "--app", "_servers_app:create_app", "run",
                                   "--port", str(port)], cwd=TESTS, env=env, stdout=out, stderr=out)
    try:
        assert wait_until(lambda: _try_state(port) is not None, timeout=30, interval=0.2), log.read_text()
        yield FlaskRun(port, proxy, queue, Results(state, results), log)
    finally:
        _stop(server)
        proxy.close()
        state.close(timeout=5)
        names.cleanup()


def test_flask_run_serves_concurrent_publishes_and_its_listener_handles_each_once(flask_run: FlaskRun) -> None:
    outcomes = _threads.map(lambda i: _http(flask_run.port, "POST", f"/publish/{i}"), range(50))
    assert [status for status, _ in outcomes] == [200] * 50, outcomes
    assert len({body["thread"] for _, body in outcomes}) > 1  # really served by several OS threads
    bodies = flask_run.results.wait_for(100)
    assert sorted(bodies) == sorted([f"sync-{i}" for i in range(50)] + [f"async-{i}" for i in range(50)])
    events = flask_run.results.read()
    assert {event["app"] for event in events} == {"_servers_app"}  # current_app in the listener callback
    assert {event["thread"] for event in events} == {THREAD_NAME}
    assert wait_until(lambda: (_try_state(flask_run.port) or {}).get("callbacks", {}).get("fired") == 50,
                      timeout=10, interval=0.1)
    state = _try_state(flask_run.port)
    assert state is not None and state["callbacks"]["errors"] == []
    assert state["health"]["runtime"]["mode"] == "thread" and state["health"]["ok"] is True
    assert state["stats"]["publish"]["runtime"] == "thread" and state["stats"]["publish"]["confirmed"] >= 100
    assert state["threads"].count(THREAD_NAME) == 1  # one hub thread per process
    log = flask_run.log.read_text()
    assert "Traceback" not in log and "runs its connections in thread" in log, log


def test_idle_flask_run_keeps_its_connections_then_still_listens(flask_run: FlaskRun) -> None:
    before = _try_state(flask_run.port)
    assert before is not None
    gevent.sleep(3.5 * HEARTBEAT)  # idle: only the hub thread's heartbeats keep the connections
    after = _try_state(flask_run.port)
    assert after is not None
    for pool in ("publish", "listen"):
        assert after["stats"][pool]["lost"] == before["stats"][pool]["lost"], after["stats"]
        assert after["stats"][pool]["opened"] == before["stats"][pool]["opened"], after["stats"]
    count = len(flask_run.results.read())
    flask_run.results.state.publish("", flask_run.queue, "after-idle")
    assert "after-idle" in flask_run.results.wait_for(count + 1, timeout=10)


def test_flask_run_listener_comes_back_after_the_connection_is_cut(flask_run: FlaskRun) -> None:
    before = _try_state(flask_run.port)
    assert before is not None and before["health"]["listeners"][0]["consuming"]
    flask_run.proxy.cut()

    def recovered() -> bool:
        state = _try_state(flask_run.port) or {}
        stats = state.get("stats", {}).get("listen", {})
        return (stats.get("lost", 0) > before["stats"]["listen"]["lost"]
                and stats.get("recovered", 0) > before["stats"]["listen"]["recovered"]
                and all(entry["consuming"] for entry in state["health"]["listeners"]))

    assert wait_until(recovered, timeout=20, interval=0.2), _try_state(flask_run.port)
    count = len(flask_run.results.read())
    flask_run.results.state.publish("", flask_run.queue, "after-cut")
    assert "after-cut" in flask_run.results.wait_for(count + 1, timeout=15)


# -- scripts and OS threads -------------------------------------------------------------------------------
def test_plain_script_listener_handles_messages_while_main_thread_sleeps(names: Names, amqp: AMQPState) -> None:
    env, queue, results = _env(names, BROKER_URL)
    amqp.queue_declare(queue)
    amqp.queue_declare(results)
    for i in range(20):
        amqp.publish("", queue, f"m{i}")
    script = subprocess.Popen([sys.executable, str(TESTS / "_servers_app.py"), "listen", "20"], cwd=TESTS, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = _threads.apply(script.communicate, kwds={"timeout": 60})
    finally:
        _stop(script)
    assert script.returncode == 0, out + err
    ready = json.loads(out.splitlines()[0].split(" ", 1)[1])
    assert ready["mode"] == "thread" and ready["thread"] == THREAD_NAME
    assert "handled 20" in out and "Traceback" not in err
    assert sorted(Results(amqp, results).wait_for(20)) == sorted(f"m{i}" for i in range(20))
    assert amqp.queue_declare(queue, passive=True)["consumer_count"] == 0  # closed at exit


def test_eight_threads_publish_synchronously_each_message_confirmed_once(names: Names, amqp: AMQPState) -> None:
    env, queue, _ = _env(names, BROKER_URL)
    amqp.queue_declare(queue)
    done = _threads.apply(subprocess.run, ([sys.executable, str(TESTS / "_servers_app.py"), "publish", "8", "500"],),
                          {"cwd": TESTS, "env": env, "capture_output": True, "text": True, "timeout": 90})
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["runtime"]["mode"] == "thread"
    assert report["stats"]["confirmed"] == 4000 and report["stats"]["failed"] == 0
    assert amqp.queue_declare(queue, passive=True)["message_count"] == 4000
    bodies: list[bytes] = []
    promise = amqp.consume(queue, lambda _promise, message: bodies.append(message.body), prefetch_count=1000,
                           no_ack=True)
    assert wait_until(lambda: len(bodies) >= 4000, timeout=20)
    amqp.cancel(promise)
    assert sorted(bodies) == sorted(f"{t}-{i}".encode() for t in range(8) for i in range(500))


# -- gunicorn ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("worker", ["gthread", "gevent"])
def test_gunicorn_workers(worker: str, names: Names, amqp: AMQPState, tmp_path: Path) -> None:
    """gthread (4 threads per worker): thread mode; gevent: the worker's own hub, no hub thread."""
    env, queue, results = _env(names, BROKER_URL)
    amqp.queue_declare(queue)
    amqp.queue_declare(results)
    port = _free_port()
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", worker, "--threads", "4", "-w", "2", "-b", f"127.0.0.1:{port}",
             "-c", "python:flask_nucleon_amqp.gunicorn", *_control(tmp_path), "_servers_app:create_app()"],
            cwd=TESTS, env=env, stdout=out, stderr=out)
    try:
        assert wait_until(lambda: amqp.queue_declare(queue, passive=True)["consumer_count"] == 2, timeout=30,
                          interval=0.2), log.read_text()  # post_worker_init started both workers' listeners
        outcomes = _threads.map(lambda i: _http(port, "POST", f"/publish/{i}"), range(20))
        assert [status for status, _ in outcomes] == [200] * 20, outcomes
        bodies = Results(amqp, results).wait_for(40)
        assert sorted(bodies) == sorted([f"sync-{i}" for i in range(20)] + [f"async-{i}" for i in range(20)])
        state = _try_state(port)
        assert state is not None
        expected = "thread" if worker == "gthread" else "gevent"
        assert state["health"]["runtime"]["mode"] == expected and state["health"]["ok"] is True
        assert state["threads"].count(THREAD_NAME) == (1 if worker == "gthread" else 0)
        server.send_signal(signal.SIGTERM)
        assert _threads.apply(server.wait, kwds={"timeout": 30}) == 0
    finally:
        _stop(server)
    assert amqp.queue_declare(queue, passive=True)["consumer_count"] == 0  # worker_exit closed them
    assert "Traceback" not in log.read_text()


# -- in this process -------------------------------------------------------------------------------------
def test_runtime_key_is_checked() -> None:
    with pytest.raises(ConfigError) as error:
        AMQP(make_app(AMQP_RUNTIME="threads"))
    assert error.value.key == "AMQP_RUNTIME" and "'thread'" in str(error.value)


def test_calls_and_acks_from_an_os_thread_are_handed_to_the_gevent_hub(conn: PukaConnection, amqp: AMQPState,
                                                                       names: Names) -> None:
    """gevent mode (this process): a real OS thread publishes, gets and acks; the main hub does the work."""
    queue = names.queue()
    conn.queue_declare(queue)
    outcome: dict[str, Any] = {}
    where: dict[str, set[int]] = {"published": set(), "acked": set()}

    def published(sender: Any, **_: Any) -> None:
        where["published"].add(threading.get_ident())

    def acked(sender: Any, **_: Any) -> None:
        where["acked"].add(threading.get_ident())

    def in_thread() -> None:
        try:
            bridge = amqp.get_amqp_pool().connection()
            outcome["bridged"] = type(bridge) is ThreadBridge and isinstance(bridge, PukaConnection)
            for i in range(20):
                bridge.publish("", queue, f"t{i}")
            message = amqp.get_amqp_pool("listen").connection().get(queue)
            assert message is not None
            message.ack()
            outcome["first"] = message.text
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    worker = threading.Thread(target=in_thread)
    with signals.message_published.connected_to(published), signals.message_acked.connected_to(acked):
        worker.start()
        assert wait_until(lambda: not worker.is_alive(), timeout=20)
    assert "error" not in outcome, outcome
    assert outcome == {"bridged": True, "first": "t0"}
    # puka was driven by the hub's thread only: signals are sent where the work is done.
    assert where == {"published": {threading.get_ident()}, "acked": {threading.get_ident()}}
    assert conn.queue_declare(queue, passive=True)["message_count"] == 19  # the ack went out


def test_a_stalled_hub_cannot_hang_a_calling_thread(names: Names) -> None:
    """A callback that blocks the hub thread (what the docs say not to do): callers still get Timeout in time."""
    timeouts = {"connect_timeout": 1, "blocked_timeout": 1}
    app = make_app(AMQP_RUNTIME="thread", AMQP_POOLS={"publish": {"size": 1, **timeouts}, "listen": timeouts})
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    queue = names.queue()
    try:
        state.queue_declare(queue)
        state.publish("", queue, "stall")
        state.consume(queue, lambda _promise, message: time.sleep(6) or message.ack())  # type: ignore[func-returns-value]  # side effects in a lambda
        gevent.sleep(0.5)  # the callback is sleeping in the hub thread now
        started = time.monotonic()
        with pytest.raises(Timeout, match="no answer from the AMQP hub"):
            state.queue_declare(queue, timeout=0.5)  # waits 0.5 + 1 + 1 + 2 s at most
        assert time.monotonic() - started < 5.0
    finally:
        state.close(timeout=10)


def test_a_thread_running_its_own_hub_waits_cooperatively(names: Names) -> None:
    """thread mode forced in this gevent process: this (main) thread's other greenlets run while it waits."""
    app = make_app(AMQP_RUNTIME="thread")
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    queue = names.queue()
    ticks: list[float] = []
    ticker = gevent.spawn(lambda: [ticks.append(time.monotonic()) or gevent.sleep(0.05) for _ in range(40)])  # type: ignore[func-returns-value]  # side effects in a lambda
    try:
        state.queue_declare(queue)
        started = time.monotonic()
        assert state.consume(queue, timeout=1.0) is None  # waits 1 s in the hub thread
        waited = [tick for tick in ticks if tick > started]
        assert len(waited) >= 5, ticks  # the ticker ran meanwhile
        assert state.health()["runtime"]["mode"] == "thread"
        state.publish("", queue, "x")
        message = state.get(queue)
        assert message is not None and message.text == "x"
        message.ack()
    finally:
        ticker.kill()
        state.close(timeout=5)
    assert not any(thread.name == THREAD_NAME for thread in threading.enumerate())  # close() ended it
