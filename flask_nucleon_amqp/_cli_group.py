"""The ``flask amqp`` click group: one-line errors, ``--verbose``, quiet library logs, waiting for a signal.

It lives below :mod:`~flask_nucleon_amqp.extension` (which adds it to every app) and
:mod:`~flask_nucleon_amqp.cli` (which fills it with the commands), so imports only go down.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import gevent
from flask.cli import AppGroup
from gevent.event import AsyncResult

from .exceptions import AMQPError

__all__ = ["amqp_cli"]

_VERBOSE = "flask_nucleon_amqp.verbose"
#: The loggers --verbose shows on stderr (at DEBUG). Without it, a command says what went wrong in its
#: own one line, so they are silent, except while `listen` runs its listeners (a worker's log).
_LOGGERS = ("flask_nucleon_amqp", "puka")


def _verbose() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context is not None and context.meta.get(_VERBOSE))


def _one_line(exc: BaseException) -> click.ClickException:
    """The error as click's one line ("Error: ..."); with --verbose the traceback comes first."""
    if _verbose():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return click.ClickException(str(exc))


class _AMQPGroup(AppGroup):
    """``flask amqp``: an error raised while Flask loads the app (a ConfigError names its key) is one line too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AMQPError as exc:
            raise _one_line(exc) from exc


class _EchoHandler(logging.Handler):
    """Log records on click's stderr (the one a test runner captures), for --verbose."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


@contextmanager
def _quiet_library() -> Iterator[None]:
    """Without --verbose: no library log line on stderr (the command reports failures itself)."""
    if _verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _group(verbose: bool) -> None:
    context = click.get_current_context()
    context.meta[_VERBOSE] = verbose
    if not verbose:
        if context.invoked_subcommand != "listen":  # listen is quiet only while it starts
            context.with_resource(_quiet_library())
        return
    handler = _EchoHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)

    def restore() -> None:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)

    context.call_on_close(restore)


amqp_cli = _AMQPGroup("amqp", help="Declare, inspect and use the app's AMQP broker (flask_nucleon_amqp).",
                      callback=_group, params=[click.Option(
                          ["--verbose", "-v"], is_flag=True,
                          help="On an error, show the traceback; show the library's log lines (DEBUG) on stderr.")])


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
