"""The ``flask amqp`` commands: declare, teardown, listen, publish, status.

Each command is a thin wrapper over the library (topology, lifecycle,
connection) and runs inside the app context. Expected failures (a bad
configuration key, a refused connection, login or vhost, a TLS failure, a
conflicting declaration, a missing exchange) print one line on stderr and exit
with status 1, without a traceback; ``flask amqp --verbose ...`` adds the
traceback and the library's log lines. Output never shows a password.
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import click
import gevent
from flask import current_app

from ._cli_group import _one_line, _quiet_library, _wait_for_signal, amqp_cli
from .exceptions import AMQPError, NotFound, Unroutable
from .extension import AMQPState
from .topology import CHECK_STATUSES, Queue

if TYPE_CHECKING:
    from .config import PoolSettings

__all__ = ["amqp_cli"]


def _state() -> AMQPState:
    state = current_app.extensions.get("amqp")
    if not isinstance(state, AMQPState):
        raise click.ClickException("this app does not use flask_nucleon_amqp: call AMQP(app) or amqp.init_app(app)")
    return state


@contextmanager
def _expected_errors() -> Iterator[None]:
    """Broker and initialisation errors are expected: one clear line, exit status 1."""
    try:
        yield
    except AMQPError as exc:
        raise _one_line(exc) from exc


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
    counts = {status: sum(result.status == status for result in results) for status in CHECK_STATUSES}
    summary = (f"{counts['ok']} match, {counts['differs']} differ, {counts['missing']} missing, "
               f"{counts['unverifiable']} unverifiable" + (f", {counts['error']} could not be checked"
                                                             if counts["error"] else "")
               + f" (of {len(results)} declarations)")
    if any(not result.matches for result in results):
        advice = []
        if counts["missing"]:
            advice.append("`flask amqp declare` creates missing ones")
        if counts["differs"]:
            advice.append("one with other settings must be deleted (or its declaration changed) first")
        raise click.ClickException(f"the broker at {_where(state)} differs from the declared topology: {summary}"
                                   + (f"; {'; '.join(advice)}" if advice else ""))
    click.echo(f"the broker at {_where(state)} matches the declared topology: {summary}")


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
    with _expected_errors(), _quiet_library():
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


def _header(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint="--header")
    return name, text


@amqp_cli.command("publish")
@click.argument("exchange")
@click.argument("routing_key")
@click.argument("body", required=False)
@click.option("--header", "-H", "headers", multiple=True, metavar="NAME=VALUE",
              help="An application header, its value a string (repeatable).")
@click.option("--persistent", is_flag=True, help="Persistent message (delivery_mode 2): survives a broker restart "
              "in a durable queue.")
@click.option("--json", "as_json", is_flag=True, help="BODY is JSON: check it, send it as application/json.")
@click.option("--mandatory", is_flag=True, help="Fail (exit 1) when no queue takes the message. Without it, an "
              "unroutable message is a warning on stderr (the broker drops it).")
@click.option("--content-type", default=None, metavar="TYPE",
              help="The content_type property, e.g. text/plain (--json sets application/json).")
@click.option("--empty", is_flag=True, help="Publish an empty body when stdin is empty (otherwise an error).")
def publish_command(exchange: str, routing_key: str, body: str | None, headers: tuple[str, ...], persistent: bool,
                    as_json: bool, mandatory: bool, content_type: str | None, empty: bool) -> None:
    """Publish one message and wait for the broker's confirm.

    BODY comes from the argument, or from stdin when omitted or "-". Use ""
    as EXCHANGE for the default exchange (ROUTING_KEY is then a queue name).
    The message is always published as mandatory, so that a message no queue
    takes is reported: an error with --mandatory, a warning without.
    """
    state = _state()
    if body is None or body == "-":
        stdin = sys.stdin.buffer
        if stdin.isatty():
            raise click.UsageError("give BODY, or pipe it on stdin")
        data = stdin.read()
        if not data and not empty:
            raise click.ClickException("stdin is empty: give --empty to publish an empty body")
    else:
        data = body.encode("utf-8")
    options: dict[str, Any] = {"headers": dict(_header(h) for h in headers) or None, "persistent": persistent,
                               "mandatory": True, "content_type": content_type}
    if as_json:
        try:
            options["json"] = json.loads(data)
        except ValueError as exc:
            raise click.ClickException(f"--json: BODY is not valid JSON: {exc}") from None
        data = b""
    target = f"exchange {exchange!r}" if exchange else "the default exchange"
    routed = True
    with _expected_errors():
        try:
            state.connection().publish(exchange, routing_key, data or None, **options)
        except Unroutable:
            if mandatory:
                raise
            routed = False
    size = len(json.dumps(options["json"], separators=(",", ":")).encode()) if as_json else len(data)
    if routed:
        click.echo(f"published {size} bytes to {target} with routing key {routing_key!r} (confirmed)")
        return
    click.echo(f"Warning: no queue took the message: nothing is bound to {target} with routing key "
               f"{routing_key!r}, so the broker dropped it (--mandatory makes this an error)", err=True)
    click.echo(f"published {size} bytes to {target} with routing key {routing_key!r} (confirmed, unroutable: "
               "dropped)")


@amqp_cli.command("status")
@click.option("--management-url", default=None, metavar="URL",
              help="The RabbitMQ management plugin's URL, for unacked counts and consumer utilisation "
                   "(default: http://<the publish pool's broker host>:15672/). It is asked with the pool's "
                   "user and password.")
def status_command(management_url: str | None) -> None:
    """Show each pool's broker (reachable? version) and each declared queue's counts.

    Queue counts come from a passive queue.declare: messages ready for
    delivery and consumers. Unacked messages and consumer utilisation come
    from the management plugin when it answers (AMQP does not report them);
    when it does not, a line says so. Exit status 1 when a broker cannot be
    reached or a declared queue is missing.
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
    listened = [spec.queue for spec in state.lifecycle.registry.listeners]
    queues = dict.fromkeys([q.name for q in state.topology if isinstance(q, Queue)] + listened)
    missing = []
    if reachable is not None and queues:
        managed = _management_queues(state.get_amqp_pool().settings, management_url)
        for queue in queues:
            try:
                counts = reachable.queue_declare(queue, passive=True)
            except NotFound:
                missing.append(queue)
                click.echo(f"queue {queue!r}: MISSING (run `flask amqp declare`)")
                continue
            except AMQPError as exc:
                raise _one_line(exc) from exc
            click.echo(f"queue {queue!r}: {counts['message_count']} ready, "
                       + _managed_counts(managed.get(queue), counts["consumer_count"]))
    if unreachable:
        raise click.ClickException(f"cannot reach the broker of pool(s) {', '.join(map(repr, unreachable))}")
    if missing:
        raise click.ClickException(f"{len(missing)} declared queue(s) missing: {', '.join(map(repr, missing))}")


#: Where the rabbitmq_management plugin listens by default.
MANAGEMENT_PORT = 15672
MANAGEMENT_TIMEOUT = 3.0


def _management_queues(settings: PoolSettings, url: str | None) -> dict[str, dict[str, Any]]:
    """The vhost's queues as the management plugin sees them; {} (and a line saying why) when it does not answer."""
    if settings.transport != "amqp":
        return {}
    if url is None:
        host = settings.nodes[0].host
        url = f"http://{f'[{host}]' if ':' in host else host}:{MANAGEMENT_PORT}/"
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"  # never credentials
    request = urllib.request.Request(
        f"{base}/api/queues/{quote(settings.vhost, safe='')}?columns=name,messages_unacknowledged,"
        "consumer_utilisation,consumer_capacity",
        headers={"Authorization": "Basic " + b64encode(f"{settings.user}:{settings.password}".encode()).decode()})

    def fetch() -> Any:
        """In a worker thread (urllib blocks); the error is returned, not raised there (the hub would print it)."""
        try:
            with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT) as response:
                return json.load(response)
        except Exception as exc:  # noqa: BLE001 - re-raised in the calling greenlet
            return exc

    try:
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {base!r}")
        rows = gevent.get_hub().threadpool.apply(fetch)
        if isinstance(rows, Exception):
            raise rows
        if not isinstance(rows, list):
            raise ValueError(f"unexpected answer from {base}/api/queues")
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = str(exc.reason)
    except (OSError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
    else:
        return {row["name"]: row for row in rows if isinstance(row, dict) and "name" in row}
    click.echo(f"management API at {base}/ does not answer ({reason}): unacked counts and consumer utilisation "
               "need the rabbitmq_management plugin (--management-url if it listens elsewhere)")
    return {}


def _managed_counts(row: dict[str, Any] | None, consumers: int) -> str:
    if row is None:
        return f"{consumers} consumers"
    utilisation = row.get("consumer_capacity", row.get("consumer_utilisation"))
    used = f"{utilisation:.0%}" if isinstance(utilisation, int | float) else "n/a"
    return (f"{row.get('messages_unacknowledged', '?')} unacked, {consumers} consumers, "
            f"consumer utilisation {used}")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)



def _add_outbox_commands() -> None:
    """``flask amqp outbox ...`` when the ``sqlalchemy`` extra is installed (see flask_nucleon_amqp.outbox)."""
    try:
        from .outbox import outbox_cli
    except ImportError:
        return
    amqp_cli.add_command(outbox_cli)


_add_outbox_commands()
