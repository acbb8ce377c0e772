"""The ``flask amqp`` commands: declare, teardown, listen, publish, status.

Each command is a thin wrapper over the library (topology, lifecycle,
connection) and runs inside the app context. Expected failures (a refused
connection, a conflicting declaration, a missing exchange) print one line and
exit with status 1, without a traceback; output never shows a password.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click
import gevent
from flask import current_app
from flask.cli import AppGroup
from gevent.event import AsyncResult

from .exceptions import AMQPError, NotFound
from .topology import Queue

if TYPE_CHECKING:
    from .extension import AMQPState

__all__ = ["amqp_cli"]

amqp_cli = AppGroup("amqp", help="Declare, inspect and use the app's AMQP broker (flask_nucleon_amqp).")


def _state() -> AMQPState:
    state = current_app.extensions.get("amqp")
    if state is None:
        raise click.ClickException("this app does not use flask_nucleon_amqp: call AMQP(app) or amqp.init_app(app)")
    return state  # type: ignore[no-any-return]


@contextmanager
def _expected_errors() -> Iterator[None]:
    """Broker and initialisation errors are expected: one clear line, exit status 1."""
    try:
        yield
    except AMQPError as exc:
        raise click.ClickException(str(exc)) from exc


def _where(state: AMQPState, pool: str = "publish") -> str:
    return state.get_amqp_pool(pool).settings.safe_url()


@amqp_cli.command("declare")
@click.option("--check", is_flag=True,
              help="Declare nothing: compare the broker's topology with the declared one; exit 1 if they differ.")
@click.option("--dry-run", is_flag=True, help="Print what would be declared; connect to nothing.")
def declare_command(check: bool, dry_run: bool) -> None:
    """Declare the configured and registered exchanges, queues and bindings.

    Idempotent. Also runs the on_initialise handlers (listeners they register
    are not started). --check and --dry-run run no handlers (they may touch
    the broker), so they see AMQP_TOPOLOGY, amqp.topology and the retry queues
    of @amqp.listener listeners, not what handlers declare.
    """
    state = _state()
    if check and dry_run:
        raise click.UsageError("give --check or --dry-run, not both")
    if dry_run:
        _dry_run(state)
        return
    if check:
        _check(state)
        return
    with _expected_errors():
        conn = state.connection()
        state.topology.declare(conn)
        state.initialise(start_listeners=False)
        declared = state.topology.declare(conn)  # again: handlers and listeners may have added some
    for declaration in declared:
        click.echo(f"declared {declaration.describe()}")
    if not declared:
        click.echo("nothing to declare: set AMQP_TOPOLOGY or register declarations with amqp.topology.add(...)")
    else:
        click.echo(f"{len(declared)} declarations on {_where(state)}")


def _dry_run(state: AMQPState) -> None:
    declarations = list(state.topology)
    for declaration in declarations:
        click.echo(f"would declare {declaration.describe()}")
    click.echo(f"{len(declarations)} declarations for {_where(state)} (dry run: nothing declared, "
               "no connection opened, no on_initialise handler run)")


def _check(state: AMQPState) -> None:
    declarations = list(state.topology)
    if not declarations:
        click.echo("nothing to check: the topology is empty")
        return
    with _expected_errors():
        results = state.topology.check(state.connection())
    for result in results:
        click.echo(str(result))
    wrong = [result for result in results if not result.matches]
    if wrong:
        missing = sum(result.status == "missing" for result in wrong)
        differs = sum(result.status == "differs" for result in wrong)
        errors = len(wrong) - missing - differs
        parts = [f"{missing} missing" if missing else "", f"{differs} with other settings" if differs else "",
                 f"{errors} could not be checked" if errors else ""]
        advice = []
        if missing:
            advice.append("`flask amqp declare` creates missing ones")
        if differs:
            advice.append("one with other settings must be deleted (or its declaration changed) first")
        raise click.ClickException(f"the broker at {_where(state)} differs from the declared topology: "
                                   f"{', '.join(p for p in parts if p)} of {len(results)} declarations"
                                   + (f"; {'; '.join(advice)}" if advice else ""))
    click.echo(f"{len(results)} declarations match {_where(state)}")


@amqp_cli.command("teardown")
@click.option("--yes", is_flag=True, help="Delete without asking for confirmation.")
def teardown_command(yes: bool) -> None:
    """Delete the configured and registered topology (queues with their messages)."""
    state = _state()
    declarations = list(reversed(list(state.topology)))
    if not declarations:
        click.echo("nothing to delete: the topology is empty")
        return
    click.echo(f"On {_where(state)} this deletes:")
    for declaration in declarations:
        click.echo(f"  {declaration.describe()}")
    if not yes:
        click.confirm("Delete them, with every message in those queues?", abort=True)
    with _expected_errors():
        deleted = state.topology.delete(state.connection())
    for declaration in deleted:
        click.echo(f"deleted {declaration}")


@amqp_cli.command("listen")
@click.option("--timeout", type=float, default=None,
              help="Seconds running callbacks get to finish at shutdown (default: AMQP_SHUTDOWN_TIMEOUT).")
def listen_command(timeout: float | None) -> None:
    """Run the registered listeners in the foreground until SIGTERM or Ctrl-C.

    On the signal: stop taking deliveries, let running callbacks finish (up to
    the timeout) and ack them, close. Messages not acked go back to the queue.
    """
    gevent.get_hub()  # this command runs gevent's hub in its main thread: AMQP_RUNTIME="auto" picks gevent
    state = _state()
    assert state.lifecycle is not None
    with _expected_errors():
        state.initialise(start_listeners=True)
        listeners = state.lifecycle.start_listeners()
    if not listeners:
        raise click.ClickException("no listeners: decorate a function with @amqp.listener(queue) or call "
                                   "current_app.amqp.register_and_spawn_amqp_listener in an on_initialise handler")
    for listener in listeners:
        click.echo(f"listening on {listener.describe()}")
    click.echo(f"{len(listeners)} listener(s) on {_where(state, 'listen')}; Ctrl-C or SIGTERM stops")
    signum = _wait_for_signal()
    click.echo(f"{signal.Signals(signum).name}: stopping (cancelling consumers, waiting for running callbacks)")
    finished = state.lifecycle.stop(timeout)
    state.close(timeout)
    handled = sum(listener.stats["handled"] for listener in listeners)
    failed = sum(listener.stats["failed"] for listener in listeners)
    click.echo(f"stopped: {handled} messages handled, {failed} failed"
               + ("" if finished else "; callbacks cut off at the timeout had their messages requeued"))


def _wait_for_signal() -> int:
    """Block this greenlet (not the hub) until SIGTERM or SIGINT; return which."""
    received: AsyncResult = AsyncResult()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    watchers = [gevent.signal_handler(signum, received.set, signum) for signum in signals]
    try:
        while not received.ready():  # with a timeout: a hub with only signal watchers would exit its loop
            received.wait(1.0)
        return int(received.get())
    finally:
        for watcher in watchers:
            watcher.cancel()
        for signum, handler in previous.items():  # libev leaves SIG_DFL behind
            if handler is not None:
                signal.signal(signum, handler)


def _header(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint="--header")
    return name, text


@amqp_cli.command("publish")
@click.argument("exchange")
@click.argument("routing_key")
@click.argument("body", required=False)
@click.option("--header", "-H", "headers", multiple=True, metavar="NAME=VALUE", help="A header (repeatable).")
@click.option("--persistent", is_flag=True, help="Persistent message (delivery_mode 2).")
@click.option("--json", "as_json", is_flag=True, help="BODY is JSON: check it, send it as application/json.")
@click.option("--mandatory", is_flag=True, help="Fail when no queue takes the message.")
@click.option("--content-type", default=None, help="The content_type property.")
def publish_command(exchange: str, routing_key: str, body: str | None, headers: tuple[str, ...], persistent: bool,
                    as_json: bool, mandatory: bool, content_type: str | None) -> None:
    """Publish one message and wait for the broker's confirm.

    BODY comes from the argument, or from stdin when omitted or "-". Use ""
    as EXCHANGE for the default exchange (ROUTING_KEY is then a queue name).
    """
    state = _state()
    if body is None or body == "-":
        stdin = sys.stdin.buffer
        if stdin.isatty():
            raise click.UsageError("give BODY, or pipe it on stdin")
        data = stdin.read()
    else:
        data = body.encode("utf-8")
    options: dict[str, Any] = {"headers": dict(_header(h) for h in headers) or None, "persistent": persistent,
                               "mandatory": mandatory, "content_type": content_type}
    if as_json:
        try:
            options["json"] = json.loads(data)
        except ValueError as exc:
            raise click.ClickException(f"--json: BODY is not valid JSON: {exc}") from None
        data = b""
    with _expected_errors():
        state.connection().publish(exchange, routing_key, data or None, **options)
    target = f"exchange {exchange!r}" if exchange else "the default exchange"
    size = len(json.dumps(options["json"], separators=(",", ":")).encode()) if as_json else len(data)
    click.echo(f"published {size} bytes to {target} with routing key {routing_key!r} (confirmed)")


@amqp_cli.command("status")
def status_command() -> None:
    """Show each pool's broker (reachable? version) and each declared queue's counts.

    Queue counts come from a passive queue.declare: messages ready for
    delivery and consumers (AMQP does not report unacked messages; the
    management API does). Exit status 1 when a broker cannot be reached or a
    declared queue is missing.
    """
    state = _state()
    reachable = None
    unreachable = []
    for name, pool in state.pools.items():
        where = f"pool {name!r}: {pool.settings.safe_url()} (size {pool.settings.size})"
        try:
            conn = pool.connection()
            properties = conn.server_properties
        except AMQPError as exc:
            unreachable.append(name)
            click.echo(f"{where}: UNREACHABLE: {exc}")
            continue
        reachable = reachable or conn
        product = _text(properties.get("product", "broker"))
        click.echo(f"{where}: reachable, {product} {_text(properties.get('version', '?'))}")
    listened = [spec.queue for spec in state.lifecycle.registry.listeners] if state.lifecycle else []
    queues = dict.fromkeys([q.name for q in state.topology if isinstance(q, Queue)] + listened)
    missing = []
    if reachable is not None:
        for queue in queues:
            try:
                counts = reachable.queue_declare(queue, passive=True)
            except NotFound:
                missing.append(queue)
                click.echo(f"queue {queue!r}: MISSING (run `flask amqp declare`)")
                continue
            except AMQPError as exc:
                raise click.ClickException(f"queue {queue!r}: {exc}") from exc
            click.echo(f"queue {queue!r}: {counts['message_count']} ready, {counts['consumer_count']} consumers")
    if unreachable:
        raise click.ClickException(f"cannot reach the broker of pool(s) {', '.join(map(repr, unreachable))}")
    if missing:
        raise click.ClickException(f"{len(missing)} declared queue(s) missing: {', '.join(map(repr, missing))}")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

