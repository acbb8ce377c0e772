"""gunicorn server hooks: initialise each worker at boot, stop its listeners gracefully at exit.

In ``gunicorn.conf.py``::

    from flask_nucleon_amqp import gunicorn as amqp_hooks

    worker_class = "gevent"
    pre_fork = amqp_hooks.pre_fork
    post_worker_init = amqp_hooks.post_worker_init
    worker_exit = amqp_hooks.worker_exit

* ``pre_fork(server, worker)`` runs in the master before each fork: it holds
  SIGTERM, SIGINT and SIGQUIT from the fork until the new worker installed its
  own handlers. Without it, a stop signal the master passes on in that window
  hits the master's handler copied into the worker and is lost: the worker
  boots and serves on until ``graceful_timeout`` kills it.

* ``post_worker_init(worker)`` runs in each worker after the fork and after
  the app was loaded: it initialises every app using the extension (topology,
  ``on_initialise`` handlers, listeners), so listeners consume from boot, not
  from the first request. If a handler raises, the worker fails to boot and
  gunicorn stops with "Worker failed to boot", showing the cause.
* On SIGTERM (or SIGINT/SIGQUIT) the worker's consumers are cancelled at once
  (no new deliveries) while gunicorn finishes its in-flight requests. If it
  comes while the worker initialises, start-up is abandoned where it is and
  the worker exits; one that came before skips start-up altogether.
* ``worker_exit(server, worker)`` then lets running callbacks finish (up to
  ``AMQP_SHUTDOWN_TIMEOUT``), acks them and closes the connections. Keep
  gunicorn's ``graceful_timeout`` above that timeout; anything cut off is
  redelivered by the broker, never lost.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

from flask import Flask

from .extension import live_apps, state_of
from .lifecycle import InitialisationError

__all__ = ["pre_fork", "post_worker_init", "worker_exit"]

log = logging.getLogger(__name__)

#: What gunicorn's master sends a worker to stop it (gracefully, or at once).
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})

#: True in the master between pre_fork and the end of the fork.
_held = False
_unblock_registered = False


def pre_fork(server: Any, worker: Any) -> None:
    """gunicorn hook (master): hold stop signals from the fork until the worker handles them itself."""
    global _held, _unblock_registered
    if not _unblock_registered:
        os.register_at_fork(after_in_parent=_release_after_fork)
        _unblock_registered = True
    init_signals = worker.init_signals

    def init_signals_then_release() -> None:  # in the worker, once its own handlers are in place
        init_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # a held signal is handled now

    worker.init_signals = init_signals_then_release
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    _held = True


def _release_after_fork() -> None:
    global _held
    if _held:  # the master handles what came meanwhile
        _held = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _apps(worker: Any) -> list[Flask]:
    """The worker's Flask app; when the WSGI callable is wrapped, every app set up in this process."""
    wsgi = getattr(worker, "wsgi", None)
    if isinstance(wsgi, Flask) and "amqp" in wsgi.extensions:
        return [wsgi]
    return live_apps()


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: initialise this worker's apps now, and cancel consumers on a stop signal.

    The stop handlers come first: a stop request while initialising abandons start-up
    (see :mod:`flask_nucleon_amqp.lifecycle`), and the worker exits without serving.

    :raises InitialisationError: a step failed; gunicorn then refuses to boot the worker.
    """
    apps = _apps(worker)
    if not apps:
        log.warning("post_worker_init: no Flask app with flask_nucleon_amqp in this worker")
    for signum in _STOP_SIGNALS:
        _on_stop_signal(signum, apps)
    for app in apps:
        state = state_of(app)
        if not getattr(worker, "alive", True):  # told to stop while it booted
            state.lifecycle.request_stop()
            continue
        try:
            state.initialise()
        except InitialisationError:
            # Abandoned by a stop signal (gunicorn's SIGQUIT handler marks the worker only a little later).
            if getattr(worker, "alive", True) and not state.lifecycle.stopping:
                raise
            log.info("worker %s stopped while initialising %r", os.getpid(), app.name)


def _on_stop_signal(signum: int, apps: list[Flask]) -> None:
    previous = signal.getsignal(signum)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)  # gunicorn's own: stop accepting, finish requests (or exit at once)
        for app in apps:
            app.extensions["amqp"].lifecycle.request_stop()  # never blocks
        # Blocking calls do not belong in a signal handler (gunicorn does the same for SIGQUIT).
        for app in apps:  # in the hub of the app's connections (the worker's, or thread mode's hub thread)
            app.extensions["amqp"].runtime.submit(_cancel_listeners, [app])

    signal.signal(signum, on_stop)


def _cancel_listeners(apps: list[Flask]) -> None:
    for app in apps:
        lifecycle = state_of(app).lifecycle
        try:
            lifecycle.cancel_listeners()
        except Exception:  # noqa: BLE001 - worker_exit still stops and closes
            log.exception("cancelling the listeners of %r failed", app.name)


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: stop listeners gracefully (running callbacks finish and are acked), close.

    gunicorn also calls it in the master for a worker that already died:
    there is nothing of that worker to stop there.
    """
    if getattr(worker, "pid", None) != os.getpid():
        return
    for app in _apps(worker):
        state_of(app).close()
