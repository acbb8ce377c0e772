"""Start-up and shut-down of a process: ``on_initialise`` handlers, topology, listeners.

Flask 3 has no ``before_first_request`` and gunicorn forks its workers after
importing the app, so "start-up" here means: the first time **this process**
(keyed on ``os.getpid()``) needs the app. That happens in one of four places,
whichever comes first:

* the first request (a ``before_request`` hook, guarded by a gevent lock so
  that 50 concurrent first requests run the handlers once and all wait for them);
* gunicorn's ``post_worker_init`` hook (:mod:`flask_nucleon_amqp.gunicorn`), so
  a worker starts its listeners at boot rather than at its first request;
* ``flask amqp declare`` (handlers run, listeners are registered but not started);
* ``flask amqp listen``.

Initialising means, in order: declare the configured and registered topology
(unless ``AMQP_DECLARE_ON_START`` is False; a broker that is down is not an
error here, the topology is declared when the connections open), run the
``on_initialise`` handlers in registration order inside an app context, then
register the ``@amqp.listener`` listeners, starting them unless
``AMQP_START_LISTENERS`` is False. If any step raises, the listeners started so
far are stopped and every later request raises :class:`InitialisationError`
with the cause: the process does not serve half-started.

A stop request (:meth:`Lifecycle.request_stop`, :meth:`Lifecycle.stop`) may
come at any moment, also while initialising (a gunicorn worker told to stop
as it boots): the step in progress is abandoned at once (whatever it waits
on, a connection opening or a declaration, is interrupted), no later step
runs and nothing starts any more; what started is stopped by :meth:`Lifecycle.stop`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import gevent.lock
from flask import Flask
from gevent.event import Event

from .exceptions import AMQPError, ConnectionError, Timeout
from .listener import Listener, ListenerOptions, MessageCallback, callback_name
from .pool import Pool
from .protocol import Connection
from .runtime import Runtime, in_hub
from .topology import Topology

__all__ = ["on_initialise", "InitialisationError", "Lifecycle", "Registry", "ListenerSpec"]

log = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[[], Any])

#: Handlers registered with the module-level :func:`on_initialise`: they run for every app.
_global_handlers: list[Callable[[], Any]] = []


def on_initialise(handler: Handler) -> Handler:
    """Run ``handler()`` once per process, before the process serves its first request.

    As in Nucleon (``from nucleon.signals import on_initialise``). Handlers
    registered here run for every app that uses the extension; use
    ``amqp.on_initialise`` for one extension's apps. They run inside an
    application context, so ``current_app.amqp`` works; typical handlers
    declare topology and call ``register_and_spawn_amqp_listener``. A handler
    that raises stops the process from serving (see :class:`InitialisationError`).
    """
    if not callable(handler):
        raise TypeError(f"on_initialise takes a function, got {handler!r}")
    _global_handlers.append(handler)
    return handler


class InitialisationError(AMQPError, RuntimeError):
    """Initialising the process failed; it will not serve until restarted. ``__cause__`` is why."""


class _Abandoned(gevent.GreenletExit):  # type: ignore[misc]
    """Thrown into the greenlet that initialises when a stop is requested meanwhile."""


@dataclass(frozen=True)
class ListenerSpec:
    """A listener registered with ``@amqp.listener`` before any app exists."""

    queue: str
    callback: MessageCallback
    options: ListenerOptions


class Registry:
    """What an ``AMQP`` extension collects before ``init_app``: handlers, listeners, topology."""

    def __init__(self) -> None:
        self.handlers: list[Callable[[], Any]] = []
        self.listeners: list[ListenerSpec] = []
        self.topology = Topology()


class Lifecycle:
    """One app's start-up and shut-down in the current process (see the module doc).

    Plain: the Flask wiring (the ``before_request`` hook calling
    :meth:`ensure_initialised`) is done by ``extension.py``.
    """

    def __init__(self, app: Flask, pools: Mapping[str, Pool], connect: Callable[[str], Connection],
                 topology: Topology, registry: Registry, *, declare: bool, start_listeners: bool,
                 shutdown_timeout: float, runtime_of: Callable[[], Runtime]) -> None:
        self.app = app
        #: ``runtime_of()``: the app's runtime (resolved on first use, see runtime.py).
        self._runtime_of = runtime_of
        self.pools = pools
        #: ``connect(pool_name)``: a shared connection of that pool (raises KeyError naming unknown pools).
        self.connect = connect
        #: The app's topology: AMQP_TOPOLOGY plus what was registered.
        self.topology = topology
        self.registry = registry
        self.shutdown_timeout = shutdown_timeout
        #: AMQP_DECLARE_ON_START: declare the topology at start and after every reconnect.
        self.declare = declare
        #: AMQP_START_LISTENERS: start listeners when a web process initialises.
        self.autostart = start_listeners
        #: Background services (``start()``, ``stop(timeout) -> bool``) started and stopped with the
        #: listeners, e.g. the outbox relay.
        self.services: list[Any] = []
        self._pid = -1
        self._this_process()

    def _this_process(self) -> None:
        """After a fork, forget the parent's progress: the child initialises for itself."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._lock = gevent.lock.RLock()  # a lock held in the parent at fork time must not bind the child
        self._done = False
        self._running = False
        self._error: InitialisationError | None = None
        self._start_new_listeners = True
        self.listeners: list[Listener] = []
        #: Set by a stop request: start-up is abandoned, nothing starts any more.
        self.stopping = False
        self._runner: Any = None  # the greenlet running the steps, while _running
        self._not_running = Event()
        self._not_running.set()

    @property
    def runtime(self) -> Runtime:
        """The app's runtime: initialising, listeners and stopping run in its hub, whatever thread asks."""
        return self._runtime_of()

    @property
    def initialised(self) -> bool:
        return self._pid == os.getpid() and self._done and self._error is None

    # -- initialising --------------------------------------------------------------------------------
    def ensure_initialised(self) -> None:
        """The ``before_request`` hook: cheap once done; raises for good if initialising failed."""
        if self._done and self._pid == os.getpid() and self._error is None:
            return
        self.initialise()

    @in_hub
    def initialise(self, *, start_listeners: bool | None = None) -> None:
        """Initialise this process once: topology, handlers, listeners (see the module doc).

        :param start_listeners: start the registered listeners (default: ``AMQP_START_LISTENERS``).
        :raises InitialisationError: now and on every later call, if a step failed.
        """
        self._this_process()
        if not self._done:
            with self._lock:  # concurrent first requests wait here for the one that runs the handlers
                if not self._done and not self._running:  # _running: re-entered from a handler
                    if self.stopping:
                        self._error = InitialisationError(
                            f"AMQP initialisation of app {self.app.name!r} did not run: the process is stopping")
                        self._done = True
                    else:
                        self._run_steps(self.autostart if start_listeners is None else start_listeners)
        if self._error is not None:
            # A new exception each time: re-raising one object would grow its traceback per request.
            raise InitialisationError(str(self._error)) from self._error.__cause__

    def _run_steps(self, start_listeners: bool) -> None:
        """Declare, run the handlers, register (and maybe start) the listeners; remember a failure."""
        self._running = True
        self._runner = gevent.getcurrent()
        self._not_running.clear()
        self._start_new_listeners = start_listeners
        step = "declaring the topology"
        try:
            self._declare_at_start()
            for handler in [*_global_handlers, *self.registry.handlers]:
                self._check_stopping()
                step = f"on_initialise handler {callback_name(handler)}"
                with self.app.app_context():
                    handler()
            for spec in self.registry.listeners:
                self._check_stopping()
                step = f"starting the listener on {spec.queue!r}"
                self.register_listener(spec.queue, spec.callback, spec.options)
            if start_listeners:
                self._check_stopping()
                step = "starting the background services"
                self.start_services()
        except _Abandoned:
            self._error = InitialisationError(f"AMQP initialisation of app {self.app.name!r} was abandoned in "
                                              f"{step}: the process is stopping")
            log.info("%s", self._error)
        except Exception as exc:
            self._runner = None  # not interrupted while it cleans up
            self._error = InitialisationError(
                f"AMQP initialisation of app {self.app.name!r} failed in {step}: {exc}; "
                "this process will not serve requests until it is restarted")
            self._error.__cause__ = exc
            log.error("%s", self._error, exc_info=exc)
            self._stop_listeners(timeout=min(self.shutdown_timeout, 2.0))
        finally:
            self._running = False
            self._runner = None
            self._start_new_listeners = True
            self._done = True
            self._not_running.set()

    def _check_stopping(self) -> None:
        if self.stopping:  # a step swallowed the interruption: the next one does not run
            raise _Abandoned

    def _check_running_step(self) -> None:
        if self._running and self._runner is gevent.getcurrent():
            raise _Abandoned  # a handler registering a listener while the process stops

    def _declare_at_start(self) -> None:
        if not self.declare:
            return
        topology = self.topology
        if topology:
            try:
                declared = topology.declare(self.connect("publish"))
                log.info("declared %d AMQP objects", len(declared))
            except (ConnectionError, Timeout) as exc:
                log.warning("cannot declare the AMQP topology now (%s); it will be declared when the "
                            "connections open", exc)
        # Every connection re-declares it after each (re)open, before its consumers resume.
        for pool in self.pools.values():
            if topology.redeclare_hook not in pool.on_open:
                pool.on_open.append(topology.redeclare_hook)

    # -- listeners -----------------------------------------------------------------------------------
    def register_listener(self, queue: str, callback: MessageCallback,
                          options: ListenerOptions | None = None) -> Listener:
        """Make a listener and start it, unless this is a ``flask amqp declare`` initialisation."""
        self._this_process()
        listener = Listener(self.app, queue, callback, options or ListenerOptions(), self.connect,
                            topology=self.topology, redeclare=self.declare)
        if self.stopping and self._start_new_listeners:
            self._check_running_step()
            raise RuntimeError(f"app {self.app.name!r} is stopping: the listener on {queue!r} was not started")
        self.listeners.append(listener)
        if self._start_new_listeners:
            try:
                listener.start()
            except BaseException:
                if not listener.started:  # interrupted while starting, it is stopped with the others
                    self.listeners.remove(listener)
                raise
        else:
            listener.register_declarations()  # `flask amqp declare` declares its retry queues
        return listener

    @in_hub
    def start_listeners(self) -> list[Listener]:
        """Start every registered listener not started yet (``flask amqp listen``)."""
        self._this_process()
        for listener in self.listeners:
            if not listener.started and not self.stopping:
                listener.start()
        self.start_services()
        return list(self.listeners)

    @in_hub
    def start_services(self) -> None:
        """Start the background services (idempotent)."""
        for service in self.services:
            service.start()

    @in_hub
    def cancel_listeners(self) -> None:
        """Stop taking deliveries at once (basic.cancel); running callbacks go on (SIGTERM)."""
        for listener in list(self.listeners):
            listener.cancel()

    def request_stop(self) -> None:
        """Abandon start-up in progress and start nothing more; safe from a signal handler (never blocks)."""
        if self._pid != os.getpid():
            return
        self.stopping = True
        if not self.runtime.is_home():  # the steps run in the home hub: interrupt them there
            self.runtime.submit(self.request_stop)
            return
        runner = self._runner
        if self._running and runner is not None and runner is not gevent.getcurrent():
            gevent.get_hub().loop.run_callback(self._interrupt, runner)

    def _interrupt(self, runner: Any) -> None:
        # A hub callback: nothing runs between this check and the throw, so a runner that
        # finished meanwhile is never hit (it may be the main greenlet, serving by now).
        if self._running and self._runner is runner and not runner.dead:
            runner.throw(_Abandoned)

    @in_hub
    def stop(self, timeout: float | None = None) -> bool:
        """Abandon start-up, stop every listener gracefully; True when every running callback finished in time."""
        if self._pid != os.getpid():
            return True
        timeout = self.shutdown_timeout if timeout is None else timeout
        self.request_stop()
        if self._runner is not gevent.getcurrent():
            self._not_running.wait(min(timeout, 5.0))  # the abandoned step winds up (listeners it started)
        return self._stop_listeners(timeout)

    def _stop_listeners(self, timeout: float) -> bool:
        listeners = [listener for listener in self.listeners if listener.started]
        for listener in listeners:
            listener.cancel(timeout=min(timeout, 5.0))
        deadline = time.monotonic() + timeout
        finished = True
        for listener in listeners:
            finished = listener.stop(max(0.0, deadline - time.monotonic())) and finished
        for service in self.services:
            finished = service.stop(max(0.0, deadline - time.monotonic())) and finished
        return finished
