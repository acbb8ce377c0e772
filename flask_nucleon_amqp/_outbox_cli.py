"""``flask amqp outbox``: show the outbox, run its relay in the foreground, put parked rows back."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import click
import sqlalchemy as sa
from flask import current_app
from flask.cli import AppGroup, with_appcontext

from ._outbox_relay import OutboxState, _first_line
from .exceptions import AMQPError

__all__ = ["outbox_cli"]


@contextmanager
def _database_errors() -> Iterator[None]:
    """A database error in a command: one line, exit status 1."""
    try:
        yield
    except (sa.exc.SQLAlchemyError, AMQPError) as exc:
        raise click.ClickException(_first_line(exc)) from exc


@click.group("outbox", cls=AppGroup, invoke_without_command=True)
@click.pass_context
@with_appcontext
def outbox_cli(ctx: click.Context) -> None:
    """Show the transactional outbox: pending messages, the oldest one's age, parked rows with their errors."""
    if ctx.invoked_subcommand is not None:
        return
    for state in _outboxes():
        with _database_errors():
            report = state.pending()
            parked = state.parked_rows()
        age = "-" if report["oldest_age"] is None else f"{report['oldest_age']:.1f}s"
        click.echo(f"outbox {state.outbox.table.name!r}: {report['pending']} pending, oldest {age}, "
                   f"{report['parked']} parked")
        for row in parked:
            click.echo(f"  parked #{row['id']} to exchange {row['exchange']!r} routing key {row['routing_key']!r} "
                       f"after {row['attempts']} attempts: {row['error']}")
        if report["parked"]:
            click.echo("  `flask amqp outbox retry` puts parked rows back once their cause is fixed")


def _outboxes() -> list[OutboxState]:
    found = list(current_app.extensions.get("amqp_outbox", {}).values())
    if not found:
        raise click.ClickException("this app has no outbox: call Outbox(db).init_app(app) "
                                   "(flask_nucleon_amqp.outbox)")
    return found


@outbox_cli.command("relay")
@click.option("--timeout", type=float, default=None, help="Seconds the batch in flight gets at shutdown.")
def relay_command(timeout: float | None) -> None:
    """Run the outbox relay in the foreground until SIGTERM or Ctrl-C."""
    from ._cli_group import _wait_for_signal

    states = _outboxes()
    for state in states:
        state.relay.start()
        click.echo(f"relaying outbox {state.outbox.table.name!r} to "
                   f"{state.amqp.get_amqp_pool(state.settings.pool).settings.safe_url()}; Ctrl-C or SIGTERM stops")
    signal_number = _wait_for_signal()
    click.echo(f"{signal.Signals(signal_number).name}: stopping the relay")
    for state in states:
        state.relay.stop(timeout if timeout is not None else state.settings.timeout)
        click.echo(f"stopped: {state.relay.stats['relayed']} messages relayed")
    current_app.extensions["amqp"].close(timeout)


@outbox_cli.command("retry")
@click.argument("ids", nargs=-1, type=int)
def retry_command(ids: tuple[int, ...]) -> None:
    """Put parked rows (all, or the given IDS) back: the relay publishes them again."""
    with _database_errors():
        total = sum(state.retry_parked(ids or None) for state in _outboxes())
    click.echo(f"{total} parked message(s) put back for the relay")
