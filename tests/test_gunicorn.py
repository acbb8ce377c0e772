"""Under gunicorn with two gevent workers, started by the test: the example app, and graceful SIGTERM.

Both use example_app/gunicorn.conf.py (the documented post_worker_init and
worker_exit hooks) with only the bind address overridden.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.config import KNOWN_SETTINGS

from flask_nucleon_amqp import AMQPState

from conftest import BROKER_URL, Names, wait_until

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "example_app"
TESTS = ROOT / "tests"
#: gunicorn >= 25 opens a control socket, by default one per user: each test server gets its own.
#: (Not --no-control-socket: with it, gunicorn 27 exits 1 instead of 3 when a worker fails to boot.)
_HAS_CONTROL_SOCKET = any(setting.name == "control_socket" for setting in KNOWN_SETTINGS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@contextmanager
def _gunicorn(cwd: Path, app: str, env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """gunicorn -c example_app/gunicorn.conf.py on a free port; stopped by its pid at the end."""
    port = _free_port()
    control = ["--control-socket", str(log.with_suffix(".ctl"))] if _HAS_CONTROL_SOCKET else []
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"),
                                   "-b", f"127.0.0.1:{port}", *control, app],
                                  cwd=cwd, env=env, stdout=out, stderr=out)
    try:
        yield server, port
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **extra}


def _consumers(state: AMQPState, queue: str) -> int:
    return int(state.queue_declare(queue, passive=True)["consumer_count"])


def test_example_app_under_gunicorn_consumes_in_each_worker(names: Names, app: Flask, tmp_path: Path) -> None:
    state: AMQPState = app.extensions["amqp"]
    prefix, room, dead, dead_queue = f"test-chat-{names.run}", names.exchange("room"), names.exchange("dead"), \
        names.queue("dead")
    users = ["alice", "bob"]
    for user in users:
        names.queues += [f"{prefix}.listener.{user}", f"{prefix}.inbox.{user}"]
    settings = tmp_path / "chat.cfg"
    settings.write_text(
        f"AMQP_URL = {BROKER_URL!r}\nCHAT_ROOM = {room!r}\nCHAT_USERS = {users!r}\nCHAT_PREFIX = {prefix!r}\n"
        f"CHAT_DEAD_LETTER_EXCHANGE = {dead!r}\n"
        f"AMQP_TOPOLOGY = {{'exchanges': {{{dead!r}: {{'type': 'fanout'}}}}, 'queues': {{{dead_queue!r}: {{}}}},"
        f" 'bindings': [{{'exchange': {dead!r}, 'queue': {dead_queue!r}}}]}}\n")
    env = _env(CHAT_SETTINGS=str(settings))
    # As `make run` does: declare first, from inside example_app/.
    declared = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "amqp", "declare"], cwd=EXAMPLE,
                              env=env, capture_output=True, text=True, timeout=60)
    assert declared.returncode == 0, declared.stderr
    assert f"declared queue '{prefix}.listener.alice' (quorum, x-dead-letter-exchange={dead!r})" in declared.stdout
    with _gunicorn(EXAMPLE, "wsgi:app", env, tmp_path / "gunicorn.log") as (server, port):
        # post_worker_init started the listeners at boot: both workers consume every user's queue.
        listener_queues = [f"{prefix}.listener.{user}" for user in users]
        assert wait_until(lambda: all(_consumers(state, q) == 2 for q in listener_queues), timeout=20), \
            (tmp_path / "gunicorn.log").read_text()
        # Health never waits: a pool not used yet reports "down" once and connects in the background.
        assert wait_until(lambda: _http(port, "GET", "/healthz")[0] == 200, timeout=10, interval=0.1)
        status, health = _http(port, "GET", "/healthz")
        assert status == 200 and health["ok"] is True
        assert health["pools"]["listen"]["server"].startswith("RabbitMQ")
        assert all(entry["consuming"] for entry in health["listeners"])
        for i in range(20):
            assert _http(port, "POST", "/messages", {"from": "alice", "to": "all", "text": f"hi {i}"})[0] == 202
        assert _http(port, "POST", "/messages", {"from": "alice", "to": "nobody", "text": "x"})[0] == 400
        received: list[dict[str, Any]] = []

        def inbox_complete() -> bool:
            received.extend(_http(port, "GET", "/users/bob/messages")[1]["messages"])
            return len(received) >= 20

        assert wait_until(inbox_complete, timeout=10, interval=0.1)
        assert sorted(m["text"] for m in received) == sorted(f"hi {i}" for i in range(20))
        workers = {m["delivered_by"] for m in received}
        assert len(workers) == 2 and all(_parent_of(pid) == server.pid for pid in workers)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
    assert all(_consumers(state, q) == 0 for q in listener_queues)  # worker_exit cancelled and closed
    log = (tmp_path / "gunicorn.log").read_text()
    assert "Traceback" not in log and "guest:guest" not in log


def test_sigterm_stops_workers_gracefully_losing_no_message(names: Names, app: Flask, tmp_path: Path) -> None:
    state: AMQPState = app.extensions["amqp"]
    queue, results = names.queue("work"), names.queue("results")
    state.queue_declare(queue, durable=True)
    state.queue_declare(results, arguments={"x-expires": 600_000})
    env = _env(LIFECYCLE_AMQP_URL=BROKER_URL, LIFECYCLE_QUEUE=queue, LIFECYCLE_RESULTS=results,
               LIFECYCLE_PREFETCH="2")
    events: list[dict[str, Any]] = []

    def collect() -> list[dict[str, Any]]:
        while (message := state.get(results)) is not None:
            events.append(message.json())
            message.ack()
        return events

    def count(event: str) -> int:
        return sum(e["event"] == event for e in collect())

    with _gunicorn(TESTS, "_lifecycle_app:create_app()", env, tmp_path / "gunicorn.log") as (server, _port):
        # No request is ever sent: on_initialise ran at boot, once in each worker.
        assert wait_until(lambda: count("initialised") == 2, timeout=20), (tmp_path / "gunicorn.log").read_text()
        booted = {e["pid"] for e in events if e["event"] == "initialised"}
        assert len(booted) == 2 and all(_parent_of(pid) == server.pid for pid in booted)
        assert wait_until(lambda: _consumers(state, queue) == 2, timeout=10)
        for i in range(8):
            state.publish("", queue, f"m{i}", headers={"sleep": "1.0"}, persistent=True)
        assert wait_until(lambda: count("started") == 4, timeout=10)  # prefetch 2 in each of 2 workers
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert server.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
    collect()
    started_bodies = sorted(e["body"] for e in events if e["event"] == "started")
    done = sorted(e["body"] for e in events if e["event"] == "done")
    assert done == started_bodies and len(done) == 4  # the running callbacks finished
    assert {e["pid"] for e in events if e["event"] == "done"} == booted
    remaining = []
    while (message := state.get(queue)) is not None:
        remaining.append(message.text)
        message.ack()
    assert sorted(done + remaining) == [f"m{i}" for i in range(8)]  # acked or back in the queue: none lost
    assert "Traceback" not in (tmp_path / "gunicorn.log").read_text()


def test_a_raising_on_initialise_handler_stops_gunicorn_with_the_cause(names: Names, app: Flask,
                                                                       tmp_path: Path) -> None:
    state: AMQPState = app.extensions["amqp"]
    queue, results = names.queue("work"), names.queue("results")
    state.queue_declare(queue)
    state.queue_declare(results, arguments={"x-expires": 600_000})
    env = _env(LIFECYCLE_AMQP_URL=BROKER_URL, LIFECYCLE_QUEUE=queue, LIFECYCLE_RESULTS=results,
               LIFECYCLE_FAIL="the cache is not there")
    log = tmp_path / "gunicorn.log"
    with _gunicorn(TESTS, "_lifecycle_app:create_app()", env, log) as (server, _port):
        # gunicorn halts: "Worker failed to boot", exit status 3 (1 when both workers fail at once:
        # gunicorn 27 then halts from inside its SIGCHLD handler).
        assert server.wait(timeout=30) != 0
    text = log.read_text()
    assert "Worker failed to boot" in text
    assert "on_initialise handler _lifecycle_app.create_app.<locals>.announce" in text
    assert "the cache is not there" in text
    assert _consumers(state, queue) == 0  # no half-started listener
