"""`flask amqp` commands through Flask's CLI runner, and each once as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import gevent
import pytest
from flask import Flask
from flask.testing import FlaskCliRunner

from flask_nucleon_amqp import AMQP, AMQPState, Connection, Message, NotFound, Queue
from flask_nucleon_amqp.lifecycle import ListenerSpec
from flask_nucleon_amqp.listener import ListenerOptions

from conftest import BROKER_HOST, BROKER_PORT, BROKER_URL, Names, make_app, wait_until

pytest_plugins = ["_brokers"]  # a private node with the management plugin, for `status`

TESTS = Path(__file__).parent


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on (just released by the kernel): connecting there is refused."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def capp(names: Names) -> Iterator[Flask]:
    """An app with a small topology, closed before ``names`` deletes it."""
    room, queue = names.exchange("room"), names.queue()
    app = make_app(AMQP_TOPOLOGY={"exchanges": {room: {"type": "topic"}}, "queues": {queue: {"expires": 600_000}},
                                  "bindings": [{"exchange": room, "queue": queue, "routing_key": "#"}]})
    app.config["ROOM"], app.config["QUEUE"] = room, queue
    AMQP(app)
    yield app
    app.extensions["amqp"].close(timeout=5)


@pytest.fixture
def runner(capp: Flask) -> FlaskCliRunner:
    return capp.test_cli_runner()


def _exists(state: AMQPState, queue: str) -> bool:
    try:
        state.queue_declare(queue, passive=True)
    except NotFound:
        return False
    return True


def test_declare_prints_what_it_declared(capp: Flask, runner: FlaskCliRunner) -> None:
    room, queue = capp.config["ROOM"], capp.config["QUEUE"]
    result = runner.invoke(args=["amqp", "declare"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"declared exchange {room!r} (topic, durable)",
        f"declared queue {queue!r} (durable, x-expires=600000)",
        f"declared binding {room!r} -> queue {queue!r} (routing key '#')",
        "3 declarations on amqp://guest:***@127.0.0.1:5672/%2F",
    ]
    assert _exists(capp.extensions["amqp"], queue)
    assert runner.invoke(args=["amqp", "declare"]).exit_code == 0  # idempotent


def test_declare_conflict_is_one_clear_line(capp: Flask, runner: FlaskCliRunner) -> None:
    capp.extensions["amqp"].exchange_declare(capp.config["ROOM"], "fanout", durable=True)
    result = runner.invoke(args=["amqp", "declare"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: 406 cannot declare exchange {capp.config['ROOM']!r} (topic, durable): "
                                    "PRECONDITION_FAILED")
    assert "Traceback" not in result.output and result.exception is not None


def test_teardown_asks_first(capp: Flask, runner: FlaskCliRunner) -> None:
    state: AMQPState = capp.extensions["amqp"]
    queue = capp.config["QUEUE"]
    runner.invoke(args=["amqp", "declare"])
    result = runner.invoke(args=["amqp", "teardown"], input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output and f"queue {queue!r}" in result.output
    assert _exists(state, queue)
    result = runner.invoke(args=["amqp", "teardown"], input="y\n")
    assert result.exit_code == 0 and f"deleted queue {queue!r}" in result.output
    assert not _exists(state, queue)
    runner.invoke(args=["amqp", "declare"])
    result = runner.invoke(args=["amqp", "teardown", "--yes"])
    assert result.exit_code == 0 and f"deleted exchange {capp.config['ROOM']!r}" in result.output
    assert not _exists(state, queue)


def test_publish_argument_stdin_headers_json(capp: Flask, runner: FlaskCliRunner) -> None:
    state: AMQPState = capp.extensions["amqp"]
    room, queue = capp.config["ROOM"], capp.config["QUEUE"]
    runner.invoke(args=["amqp", "declare"])
    result = runner.invoke(args=["amqp", "publish", room, "a.b", "héllo", "--header", "k=v", "-H", "x=1=2",
                                 "--persistent"])
    assert result.exit_code == 0, result.output
    assert result.output == f"published 6 bytes to exchange {room!r} with routing key 'a.b' (confirmed)\n"
    result = runner.invoke(args=["amqp", "publish", room, "a.b"], input=b"\x00\xff binary")
    assert result.exit_code == 0, result.output
    result = runner.invoke(args=["amqp", "publish", "", queue, "--json", '{"n": [1, 2]}'])
    assert result.exit_code == 0 and "the default exchange" in result.output
    first, second, third = state.get(queue), state.get(queue), state.get(queue)
    assert first is not None and second is not None and third is not None
    assert first.body == "héllo".encode() and first.headers == {"k": "v", "x": "1=2"} and first.delivery_mode == 2
    assert second.body == b"\x00\xff binary"
    assert third.json() == {"n": [1, 2]} and third.content_type == "application/json"
    for message in (first, second, third):
        message.ack()


@pytest.mark.parametrize("args, status, message", [
    (["{nope", "--json"], 1, "Error: --json: BODY is not valid JSON"),
    (["body", "--header", "novalue"], 2, "expected NAME=VALUE"),
    (["body", "--mandatory"], 1, "Error: 312 NO_ROUTE"),
])
def test_publish_errors(names: Names, runner: FlaskCliRunner, args: list[str], status: int, message: str) -> None:
    result = runner.invoke(args=["amqp", "publish", "", names.queue("absent"), *args])
    assert result.exit_code == status and message in result.output, result.output
    assert "Traceback" not in result.output


def test_publish_warns_when_no_queue_took_the_message(names: Names, runner: FlaskCliRunner) -> None:
    absent = names.queue("absent")
    result = runner.invoke(args=["amqp", "publish", "", absent, "body"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"Warning: no queue took the message: nothing is bound to the default exchange with routing key {absent!r}, "
        "so the broker dropped it (--mandatory makes this an error)",
        f"published 4 bytes to the default exchange with routing key {absent!r} (confirmed, unroutable: dropped)",
    ]


def test_publish_refuses_empty_stdin_unless_asked(capp: Flask, runner: FlaskCliRunner) -> None:
    queue = capp.config["QUEUE"]
    runner.invoke(args=["amqp", "declare"])
    result = runner.invoke(args=["amqp", "publish", "", queue], input=b"")
    assert result.exit_code == 1 and result.output == "Error: stdin is empty: give --empty to publish an empty body\n"
    state: AMQPState = capp.extensions["amqp"]
    assert state.get(queue) is None  # nothing was published
    result = runner.invoke(args=["amqp", "publish", "", queue, "--empty"], input=b"")
    assert result.exit_code == 0
    assert result.output == f"published 0 bytes to the default exchange with routing key {queue!r} (confirmed)\n"
    message = state.get(queue)
    assert message is not None and message.body == b""
    message.ack()


def test_every_option_is_documented_in_help_and_the_guide() -> None:
    from flask_nucleon_amqp.cli import amqp_cli

    guide = (TESTS.parent / "docs" / "guide.rst").read_text()
    section = guide.split("The ``flask amqp`` commands\n", 1)[1].split("\n----", 1)[0]  # that section
    commands: list[click.Command] = [amqp_cli, *amqp_cli.commands.values()]
    undocumented = []
    for command in commands:
        for param in command.params:
            if isinstance(param, click.Option):
                long_names = [name for name in param.opts if name.startswith("--")]
                mentioned = all(re.search(rf"(?<![\w-]){name}(?![\w-])", section) for name in long_names)
                if not param.help or not mentioned:
                    undocumented.append(f"{command.name} {'/'.join(param.opts)}")
    assert undocumented == []
    assert len(amqp_cli.commands["publish"].params) == 9  # 3 arguments, 6 options: this test sees them all


def test_publish_to_a_missing_exchange(names: Names, runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["amqp", "publish", names.exchange("missing"), "k", "body"])
    assert result.exit_code == 1 and result.output.startswith("Error: 404 NOT_FOUND - no exchange")


def test_status_reports_pools_and_queues(capp: Flask, runner: FlaskCliRunner) -> None:
    queue = capp.config["QUEUE"]
    [silent] = free_ports(1)  # nothing listens there: the management API "does not answer", for real
    management = ["--management-url", f"http://127.0.0.1:{silent}/"]
    result = runner.invoke(args=["amqp", "status", *management])
    assert result.exit_code == 1 and f"queue {queue!r}: MISSING (run `flask amqp declare`)" in result.output
    runner.invoke(args=["amqp", "declare"])
    capp.extensions["amqp"].publish("", queue, b"waiting")
    result = runner.invoke(args=["amqp", "status", *management])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("pool 'publish': amqp://guest:***@127.0.0.1:5672/%2F (size 2): reachable, RabbitMQ 3.")
    assert lines[1].startswith("pool 'listen': amqp://guest:***@127.0.0.1:5672/%2F (size 1): reachable, RabbitMQ 3.")
    assert lines[2] == (f"management API at http://127.0.0.1:{silent}/ does not answer ([Errno 111] Connection "
                        "refused): unacked counts and consumer utilisation need the rabbitmq_management plugin "
                        "(--management-url if it listens elsewhere)")
    assert lines[3] == f"queue {queue!r}: 1 ready, 0 consumers"
    assert len(lines) == 4


def test_status_shows_unacked_and_utilisation_when_the_management_plugin_answers(node_up: Any) -> None:
    """The shared broker runs no management plugin; the private node does (tests/_brokers.py)."""
    queue = f"status-{os.getpid()}-{time.monotonic_ns()}"
    app = make_app(AMQP_URL=node_up.url(), AMQP_TOPOLOGY={"queues": {queue: {"durable": False}}})
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    held: list[Message] = []
    try:
        assert app.test_cli_runner().invoke(args=["amqp", "declare"]).exit_code == 0
        for i in range(3):
            state.publish("", queue, f"m{i}")
        consumer = state.connection("listen").consume(queue, callback=lambda _p, message: held.append(message),
                                                      prefetch_count=2)
        assert wait_until(lambda: len(held) == 2)  # two unacked, one ready
        management = ["--management-url", f"http://127.0.0.1:{node_up.management_port}/"]
        expected = re.compile(rf"queue '{queue}': 1 ready, 2 unacked, 1 consumers, consumer utilisation "
                              r"(\d+%|n/a)")
        outputs: list[str] = []

        def shown() -> bool:  # the plugin samples its counts every 500 ms on that node
            result = app.test_cli_runner().invoke(args=["amqp", "status", *management])
            outputs.append(result.output)
            return result.exit_code == 0 and expected.fullmatch(result.output.splitlines()[-1]) is not None

        assert wait_until(shown, timeout=20, interval=0.5), outputs[-1]
        assert "does not answer" not in outputs[-1] and node_up.password not in outputs[-1]
        state.connection("listen").cancel(consumer)
        for message in held:
            message.ack()
    finally:
        state.queue_delete(queue)
        state.close(timeout=5)


def test_status_of_an_unreachable_broker_fails_without_traceback_or_password() -> None:
    app = make_app(AMQP_URL="amqp://guest:s3cret-pw@127.0.0.1:1/%2F", AMQP_POOLS={"listen": {"url": BROKER_URL}})
    AMQP(app)
    try:
        result = app.test_cli_runner().invoke(args=["amqp", "status"])
    finally:
        app.extensions["amqp"].close(timeout=5)
    assert result.exit_code == 1
    assert "pool 'publish': amqp://guest:***@127.0.0.1:1/%2F (size 1): UNREACHABLE: cannot connect" in result.output
    assert "pool 'listen': amqp://guest:***@127.0.0.1:5672/%2F (size 1): reachable" in result.output
    assert result.output.rstrip().endswith("Error: cannot reach the broker of pool(s) 'publish'")
    assert "s3cret-pw" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", [["declare"], ["teardown", "--yes"], ["publish", "", "q", "body"], ["listen"]])
def test_refused_connection_is_one_clear_line(command: list[str]) -> None:
    amqp = AMQP()
    amqp.topology.add(Queue("q"))
    amqp.listener("q")(lambda c, p, m: None)
    app = make_app(AMQP_URL="amqp://guest:s3cret-pw@127.0.0.1:1/%2F")
    amqp.init_app(app)
    try:
        if command == ["listen"]:
            # A worker must start while the broker restarts: listen keeps retrying, so stop it at once.
            gevent.spawn_later(0.3, os.kill, os.getpid(), signal.SIGTERM)
        result = app.test_cli_runner().invoke(args=["amqp", *command])
    finally:
        app.extensions["amqp"].close(timeout=5)
    assert "Traceback" not in result.output and "s3cret-pw" not in result.output
    if command == ["listen"]:
        assert result.exit_code == 0 and "stopped: 0 messages handled" in result.output
    else:
        assert result.exit_code == 1
        assert result.output.splitlines()[-1].startswith("Error: cannot connect to amqp://guest:***@127.0.0.1:1/%2F")


def test_listen_runs_until_sigterm(capp: Flask, runner: FlaskCliRunner) -> None:
    queue = capp.config["QUEUE"]
    handled: list[bytes] = []
    state: AMQPState = capp.extensions["amqp"]

    def handle(connection: Connection, promise: int, message: Message) -> None:
        handled.append(message.body)

    def drive() -> None:
        assert wait_until(lambda: state.listeners and state.listeners[0].consuming)
        for i in range(3):
            state.publish("", queue, str(i))
        assert wait_until(lambda: len(handled) == 3)
        os.kill(os.getpid(), signal.SIGTERM)

    state.lifecycle.registry.listeners.append(ListenerSpec(queue, handle, ListenerOptions()))  # as @amqp.listener
    driver = gevent.spawn(drive)
    result = runner.invoke(args=["amqp", "listen"])
    driver.get(timeout=1)
    assert result.exit_code == 0, result.output
    assert f"listening on queue {queue!r} -> test_cli.test_listen_runs_until_sigterm.<locals>.handle" in result.output
    assert "SIGTERM: stopping" in result.output and "stopped: 3 messages handled, 0 failed" in result.output
    assert sorted(handled) == [b"0", b"1", b"2"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_listen_without_listeners_says_how_to_add_one(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["amqp", "listen"])
    assert result.exit_code == 1 and "no listeners: decorate a function with @amqp.listener" in result.output


def test_commands_need_the_extension() -> None:
    app = Flask("bare")
    from flask_nucleon_amqp.cli import amqp_cli

    app.cli.add_command(amqp_cli)
    result = app.test_cli_runner().invoke(args=["amqp", "status"])
    assert result.exit_code == 1 and "does not use flask_nucleon_amqp" in result.output


# -- the real thing: `python -m flask --app ... amqp ...` in a subprocess ------------------------------
def _environment(names: Names, **extra: str) -> dict[str, str]:
    queue, results = names.queue("work"), names.queue("results")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
           "LIFECYCLE_AMQP_URL": BROKER_URL, "LIFECYCLE_QUEUE": queue, "LIFECYCLE_RESULTS": results,
           "LIFECYCLE_TOPOLOGY": json.dumps({"queues": {queue: {"quorum": True}, results: {"expires": 600_000}}}),
           **extra}
    return env


def _flask(env: dict[str, str], *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "_lifecycle_app:create_app", "amqp", *args],
                          env=env, cwd=TESTS, capture_output=True, text=True, timeout=60, **options)


def _events(state: AMQPState, results: str) -> list[dict[str, Any]]:
    events = []
    while (message := state.get(results)) is not None:
        events.append(message.json())
        message.ack()
    return events


def test_every_command_as_a_subprocess(names: Names, app: Flask) -> None:
    env = _environment(names)
    queue, results = env["LIFECYCLE_QUEUE"], env["LIFECYCLE_RESULTS"]
    state: AMQPState = app.extensions["amqp"]
    declared = _flask(env, "declare")
    assert declared.returncode == 0, declared.stderr
    assert f"declared queue {queue!r} (quorum)" in declared.stdout
    assert [e["event"] for e in _events(state, results)] == ["initialised"]  # on_initialise ran
    published = _flask(env, "publish", "", queue, "--header", "sleep=0", input="from stdin")
    assert published.returncode == 0 and "(confirmed)" in published.stdout, published.stderr
    status = _flask(env, "status")
    assert status.returncode == 0 and f"queue {queue!r}: 1 ready, 0 consumers" in status.stdout, status.stderr
    refused = _flask({**env, "LIFECYCLE_AMQP_URL": "amqp://guest:s3cret-pw@127.0.0.1:1/%2F"}, "status")
    assert refused.returncode == 1 and "UNREACHABLE" in refused.stdout
    assert "Traceback" not in refused.stderr and "s3cret-pw" not in refused.stdout + refused.stderr
    torn = _flask(env, "teardown", "--yes")
    assert torn.returncode == 0 and f"deleted queue {queue!r}" in torn.stdout, torn.stderr
    assert not _exists(state, queue)


def test_sigterm_during_slow_callbacks_loses_no_message(names: Names, app: Flask) -> None:
    """`flask amqp listen` as a worker process: SIGTERM while callbacks sleep; every message is
    either handled and acked, or back in the queue."""
    env = _environment(names, LIFECYCLE_PREFETCH="2")
    queue, results = env["LIFECYCLE_QUEUE"], env["LIFECYCLE_RESULTS"]
    state: AMQPState = app.extensions["amqp"]
    assert _flask(env, "declare").returncode == 0
    for i in range(6):
        state.publish("", queue, f"m{i}", headers={"sleep": "1.0"}, persistent=True)
    worker = subprocess.Popen([sys.executable, "-m", "flask", "--app", "_lifecycle_app:create_app", "amqp", "listen"],
                              env=env, cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while sum(e["event"] == "started" for e in events) < 2 and time.monotonic() < deadline:
            events += _events(state, results)
            gevent.sleep(0.05)
        assert sum(e["event"] == "started" for e in events) == 2, events
        worker.send_signal(signal.SIGTERM)  # two callbacks are sleeping now
        out, err = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err
    assert "SIGTERM: stopping" in out and "stopped: 2 messages handled, 0 failed" in out, out + err
    events += _events(state, results)
    done = [e["body"] for e in events if e["event"] == "done"]
    assert sorted(done) == sorted(e["body"] for e in events if e["event"] == "started")  # every started one finished
    assert len(done) == len(set(done)) == 2
    remaining = []
    while (message := state.get(queue)) is not None:
        remaining.append(message.text)
        message.ack()
    assert sorted(done + remaining) == [f"m{i}" for i in range(6)]  # nothing lost, nothing twice


# -- declare --check and --dry-run -------------------------------------------------------------------
def _exchange_exists(state: AMQPState, exchange: str) -> bool:
    probe = "test-probe"
    try:
        state.exchange_bind(exchange, "amq.direct", probe)
    except NotFound:
        return False
    state.exchange_unbind(exchange, "amq.direct", probe)
    return True


def test_declare_check_on_a_matching_topology(capp: Flask, runner: FlaskCliRunner) -> None:
    room, queue = capp.config["ROOM"], capp.config["QUEUE"]
    assert runner.invoke(args=["amqp", "declare"]).exit_code == 0
    result = runner.invoke(args=["amqp", "declare", "--check"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"ok: exchange {room!r} (topic, durable)",
        f"ok: queue {queue!r} (durable, x-expires=600000)",
        f"unverifiable: binding {room!r} -> queue {queue!r} (routing key '#'): both ends exist; AMQP cannot see "
        "the binding itself (`rabbitmqctl list_bindings` can)",
        "the broker at amqp://guest:***@127.0.0.1:5672/%2F matches the declared topology: 2 match, 0 differ, "
        "0 missing, 1 unverifiable (of 3 declarations)",
    ]


def test_declare_check_on_a_missing_topology_creates_nothing(capp: Flask, runner: FlaskCliRunner) -> None:
    room, queue = capp.config["ROOM"], capp.config["QUEUE"]
    result = runner.invoke(args=["amqp", "declare", "--check"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"MISSING: exchange {room!r} (topic, durable): the broker has no exchange of that name",
        f"MISSING: queue {queue!r} (durable, x-expires=600000): the broker has no queue of that name",
        f"MISSING: binding {room!r} -> queue {queue!r} (routing key '#'): exchange {room!r} and queue {queue!r} "
        "missing",
        "Error: the broker at amqp://guest:***@127.0.0.1:5672/%2F differs from the declared topology: 0 match, "
        "0 differ, 3 missing, 0 unverifiable (of 3 declarations); `flask amqp declare` creates missing ones",
    ]
    state: AMQPState = capp.extensions["amqp"]
    assert not _exists(state, queue) and not _exchange_exists(state, room)


def test_declare_check_on_a_differing_topology(capp: Flask, runner: FlaskCliRunner) -> None:
    room, queue = capp.config["ROOM"], capp.config["QUEUE"]
    state: AMQPState = capp.extensions["amqp"]
    state.exchange_declare(room, "fanout", durable=True)
    state.queue_declare(queue, durable=True, arguments={"x-expires": 300_000})
    result = runner.invoke(args=["amqp", "declare", "--check"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"DIFFERS: exchange {room!r} (topic, durable): type: declared 'topic', the broker has 'fanout'"
    assert lines[1] == (f"DIFFERS: queue {queue!r} (durable, x-expires=600000): x-expires: declared '600000', "
                        "the broker has '300000'")
    assert lines[2].startswith(f"unverifiable: binding {room!r} -> queue {queue!r}")
    assert lines[3] == ("Error: the broker at amqp://guest:***@127.0.0.1:5672/%2F differs from the declared "
                        "topology: 0 match, 2 differ, 0 missing, 1 unverifiable (of 3 declarations); one with other "
                        "settings must be deleted (or its declaration changed) first")
    # The broker's objects are as they were.
    state.exchange_declare(room, "fanout", durable=True)
    state.queue_declare(queue, durable=True, arguments={"x-expires": 300_000})


def test_declare_check_leaves_an_auto_delete_exchange_alone(names: Names) -> None:
    """The existence probe binds the exchange as a destination: unbinding it never auto-deletes it."""
    exchange = names.exchange("auto")
    app = make_app(AMQP_TOPOLOGY={"exchanges": {exchange: {"type": "fanout", "auto_delete": True}}})
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        state.exchange_declare(exchange, "fanout", durable=True, auto_delete=True)  # no binding yet
        for _ in range(2):
            result = app.test_cli_runner().invoke(args=["amqp", "declare", "--check"])
            assert result.exit_code == 0, result.output
            assert result.output.startswith(f"ok: exchange {exchange!r} (fanout, durable, auto-delete)\n")
        assert _exchange_exists(state, exchange)
    finally:
        state.close(timeout=5)


def test_declare_check_sees_a_retry_queue_with_another_delay(names: Names) -> None:
    queue = names.queue("work")
    names.queues += [f"{queue}.retry", f"{queue}.dead"]

    def app_with_delay(delay: float) -> Flask:
        amqp = AMQP()
        amqp.listener(queue, retry=dict(max_attempts=3, delay=delay))(lambda c, p, m: None)
        app = make_app(AMQP_TOPOLOGY={"queues": {queue: {}}})
        amqp.init_app(app)
        return app

    before, after = app_with_delay(0.2), app_with_delay(0.3)
    try:
        assert before.test_cli_runner().invoke(args=["amqp", "declare"]).exit_code == 0
        assert before.test_cli_runner().invoke(args=["amqp", "declare", "--check"]).exit_code == 0
        result = after.test_cli_runner().invoke(args=["amqp", "declare", "--check"])
        assert result.exit_code == 1
        assert (f"DIFFERS: queue '{queue}.retry' (durable, x-dead-letter-exchange='', x-dead-letter-routing-key="
                f"'{queue}', x-message-ttl=300): x-message-ttl: declared '300', the broker has '200'") in result.output
        assert f"ok: queue '{queue}.dead' (durable)" in result.output
        assert "2 match, 1 differ, 0 missing, 0 unverifiable (of 3 declarations)" in result.output
    finally:
        before.extensions["amqp"].close(timeout=5)
        after.extensions["amqp"].close(timeout=5)


def test_declare_dry_run_connects_to_nothing(names: Names) -> None:
    queue = names.queue("work")
    names.queues += [f"{queue}.retry", f"{queue}.dead"]
    amqp = AMQP()
    amqp.listener(queue, retry=dict(max_attempts=3, delay=0.25))(lambda c, p, m: None)
    app = make_app(AMQP_URL="amqp://guest:s3cret-pw@127.0.0.1:1/%2F", AMQP_TOPOLOGY={"queues": {queue: {}}})
    amqp.init_app(app)
    try:
        result = app.test_cli_runner().invoke(args=["amqp", "declare", "--dry-run"])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [
            f"would declare queue {queue!r} (durable)",
            f"would declare queue '{queue}.retry' (durable, x-dead-letter-exchange='', "
            f"x-dead-letter-routing-key='{queue}', x-message-ttl=250)",
            f"would declare queue '{queue}.dead' (durable)",
            "3 declarations for amqp://guest:***@127.0.0.1:1/%2F (dry run: nothing declared, no connection opened, "
            "no on_initialise handler run)",
        ]
        assert all(pool.connections() == [] for pool in app.extensions["amqp"].pools.values())
    finally:
        app.extensions["amqp"].close(timeout=5)
    # The same app against the real broker: declare creates what the dry run listed.
    app = make_app(AMQP_TOPOLOGY={"queues": {queue: {}}})
    amqp = AMQP()
    amqp.listener(queue, retry=dict(max_attempts=3, delay=0.25))(lambda c, p, m: None)
    amqp.init_app(app)
    try:
        result = app.test_cli_runner().invoke(args=["amqp", "declare"])
        assert result.exit_code == 0, result.output
        assert f"declared queue '{queue}.retry' (durable, x-dead-letter-exchange=''" in result.output
        assert all(_exists(app.extensions["amqp"], name) for name in (queue, f"{queue}.retry", f"{queue}.dead"))
    finally:
        app.extensions["amqp"].close(timeout=5)


def test_declare_check_and_dry_run_exclude_each_other(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["amqp", "declare", "--check", "--dry-run"])
    assert result.exit_code == 2 and "give --check or --dry-run, not both" in result.output


# -- one-line errors, as a user sees them: `python -m flask` in a subprocess, stdout and stderr apart ----------
BROKER = f"{BROKER_HOST}:{BROKER_PORT}"
ONE_LINE_ERRORS = {
    "bad config key": (f"amqp://guest:guest@{BROKER}/%2F?heartbeat=x",
                       "Error: AMQP_URL ?heartbeat: must be a number of seconds >= 0, got 'x'"),
    "wrong password": (f"amqp://guest:s3cret-pw@{BROKER}/%2F",
                       f"Error: broker at amqp://guest:***@{BROKER}/%2F refused the login: ACCESS_REFUSED - Login "
                       "was refused using authentication mechanism PLAIN. For details see the broker logfile."),
    "refused vhost": (f"amqp://guest:guest@{BROKER}/nucleon-no-such-vhost",
                      f"Error: broker at amqp://guest:***@{BROKER}/nucleon-no-such-vhost refused the vhost: "
                      "NOT_ALLOWED - vhost nucleon-no-such-vhost not found"),
    "refused connection": ("amqp://guest:s3cret-pw@127.0.0.1:{port}/%2F",
                           "Error: cannot connect to amqp://guest:***@127.0.0.1:{port}/%2F: [Errno 111] Connection "
                           "refused"),
    "TLS to a plain port": (f"amqps://guest:s3cret-pw@{BROKER}/%2F",
                            f"Error: cannot connect to amqps://guest:***@{BROKER}/%2F: TLS handshake failed: "
                            "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
}


def _flask_with_url(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "LIFECYCLE_AMQP_URL": url,
           "LIFECYCLE_QUEUE": "unused", "LIFECYCLE_RESULTS": "unused"}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "_lifecycle_app:create_app", "amqp", *args],
                          env=env, cwd=TESTS, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", list(ONE_LINE_ERRORS))
def test_errors_are_one_line_on_stderr(case: str) -> None:
    [port] = free_ports(1)
    url, expected = (text.replace("{port}", str(port)) for text in ONE_LINE_ERRORS[case])
    result = _flask_with_url(url, "publish", "", "q", "body")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", expected + "\n")


def test_listen_that_cannot_start_says_why_in_one_line() -> None:
    """No library log line (the failed declare, the handler's traceback) before the error."""
    url, expected = ONE_LINE_ERRORS["wrong password"]
    result = _flask_with_url(url, "listen")
    reason = expected.removeprefix("Error: ")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", (
        "Error: AMQP initialisation of app '_lifecycle_app' failed in on_initialise handler "
        f"_lifecycle_app.create_app.<locals>.announce: {reason}; this process will not serve requests until it is "
        "restarted\n"))


@pytest.mark.parametrize("case", ["bad config key", "wrong password"])
def test_verbose_adds_the_traceback(case: str) -> None:
    url, expected = ONE_LINE_ERRORS[case]
    result = _flask_with_url(url, "--verbose", "publish", "", "q", "body")
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback (most recent call last):" in result.stderr and result.stderr.endswith(f"\n{expected}\n")
    assert "s3cret-pw" not in result.stderr


@pytest.mark.parametrize("where, dotenv", [("example_app", True), ("example_app", False), (".", True)])
def test_flask_amqp_finds_the_example_app(where: str, dotenv: bool) -> None:
    """Bare `flask amqp` inside example_app/ (wsgi.py, or .flaskenv) and at the repository root (.flaskenv)."""
    env = {**os.environ, **({} if dotenv else {"FLASK_SKIP_DOTENV": "1"})}
    env.pop("FLASK_APP", None)
    flask = str(Path(sys.executable).parent / "flask")  # the script: unlike `python -m`, no cwd on sys.path
    result = subprocess.run([flask, "amqp", "declare", "--dry-run"], env=env,
                            cwd=TESTS.parent / where, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "would declare exchange 'unit_test_room' (direct, durable)" in result.stdout
    assert result.stdout.splitlines()[-1].endswith(" declarations for amqp://guest:***@localhost:5672/%2F (dry run: "
                                                   "nothing declared, no connection opened, no on_initialise "
                                                   "handler run)")
