"""gunicorn server hooks: initialise each worker at boot, stop its listeners gracefully at exit.

In ``gunicorn.conf.py``::

    from flask_nucleon_amqp import gunicorn as amqp_hooks

    worker_class = "gevent"
    post_worker_init = amqp_hooks.post_worker_init
    worker_exit = amqp_hooks.worker_exit

* ``post_worker_init(worker)`` runs in each worker after the fork and after
  the app was loaded: it initialises every app using the extension (topology,
  ``on_initialise`` handlers, listeners), so listeners consume from boot, not
  from the first request. If a handler raises, the worker fails to boot and
  gunicorn stops with "Worker failed to boot", showing the cause.
* On SIGTERM the worker's consumers are cancelled at once (no new deliveries)
  while gunicorn finishes its in-flight requests.
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

__all__ = ["post_worker_init", "worker_exit"]

log = logging.getLogger(__name__)


def _apps(worker: Any) -> list[Flask]:
    """The worker's Flask app; when the WSGI callable is wrapped, every app set up in this process."""
    wsgi = getattr(worker, "wsgi", None)
    if isinstance(wsgi, Flask) and "amqp" in wsgi.extensions:
        return [wsgi]
    return live_apps()


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: initialise this worker's apps now, and cancel consumers on SIGTERM.

    :raises InitialisationError: a step failed; gunicorn then refuses to boot the worker.
    """
    apps = _apps(worker)
    if not apps:
        log.warning("post_worker_init: no Flask app with flask_nucleon_amqp in this worker")
    for app in apps:
        state_of(app).initialise()
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)  # gunicorn's own: stop accepting, finish requests
        # Blocking calls do not belong in a signal handler (gunicorn does the same for SIGQUIT).
        for app in apps:  # in the hub of the app's connections (the worker's, or thread mode's hub thread)
            app.extensions["amqp"].runtime.submit(_cancel_listeners, [app])

    signal.signal(signal.SIGTERM, on_sigterm)


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
