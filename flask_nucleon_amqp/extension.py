"""The Flask wiring: ``AMQP(app)`` / ``init_app``, :func:`current_amqp` and ``current_app.amqp``.

All the Flask glue lives here and nowhere else: ``app.extensions["amqp"]``,
the ``before_request`` hook that initialises the process, the ``flask amqp``
command group (its commands are in :mod:`flask_nucleon_amqp.cli`). Broker
logic is in plain classes (pool, connection, lifecycle) that work without Flask.
"""

from __future__ import annotations

import atexit
import copy
import datetime
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flask import Flask, current_app, has_app_context

from . import runtime as _runtime
from ._cli_group import amqp_cli
from .config import APP_SETTINGS, AppSettings, read_settings
from .lifecycle import Lifecycle, ListenerSpec, Registry
from .listener import Listener, ListenerOptions, MessageCallback
from .message import _NOTHING, Message
from .pool import Pool
from .protocol import Callback, Connection
from .retry import RetryPolicy, retry_declarations
from .runtime import Runtime, in_hub
from .topology import Declaration, Topology, topology_from_config

__all__ = ["AMQP", "AMQPState", "current_amqp", "state_of", "amqp_cli", "live_apps"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


#: Apps set up in this process, for the gunicorn hooks when the WSGI callable is wrapped.
_apps: weakref.WeakSet[Flask] = weakref.WeakSet()


class AMQPState:
    """What ``current_app.amqp``, ``app.extensions["amqp"]`` and :func:`current_amqp` are: one app's pools.

    The shortcuts use the ``publish`` pool for publishing and declaring, and
    the ``listen`` pool for consuming; each has the signature of the
    connection method it calls.
    """

    def __init__(self, app: Flask, settings: AppSettings, registry: Registry | None = None) -> None:
        registry = registry if registry is not None else Registry()
        #: This app's topology: AMQP_TOPOLOGY plus the extension's registry.
        self.topology = topology_from_config(settings.topology).include(registry.topology)
        #: Each pool's settings, by pool name.
        self.settings = settings.pools
        self.shutdown_timeout = settings.shutdown_timeout
        #: AMQP_RUNTIME: "auto", "gevent" or "thread" (see runtime.py).
        self.runtime_mode = settings.runtime
        self._runtime: Runtime | None = None
        self.pools = {name: Pool(pool_settings, self.runtime_mode) for name, pool_settings in settings.pools.items()}
        self.closed = False
        #: Extra reports for health() and stats(), by name (e.g. "outbox"): each returns a JSON-able dict
        #: whose "ok" counts in health()'s.
        self.reports: dict[str, Callable[[], dict[str, Any]]] = {}
        #: Start-up and shut-down of this process (see lifecycle.py).
        self.lifecycle = Lifecycle(app, self.pools, self.connection, self.topology, registry,
                                   declare=settings.declare_on_start, start_listeners=settings.start_listeners,
                                   shutdown_timeout=settings.shutdown_timeout, runtime_of=lambda: self.runtime)

    def __repr__(self) -> str:
        return f"<AMQPState pools={sorted(self.pools)}>"

    @property
    def runtime(self) -> Runtime:
        """Where this app's connections, listeners and callbacks run (see runtime.py)."""
        runtime = self._runtime
        if runtime is None or not runtime.alive:
            runtime = self._runtime = _runtime.get(self.runtime_mode)
        return runtime

    def pool(self, name: str = "publish") -> Pool:
        """The pool called ``name`` ("publish" and "listen" always exist).

        :raises KeyError: naming the configured pools.
        """
        try:
            return self.pools[name]
        except KeyError:
            raise KeyError(f"no AMQP pool named {name!r}; configured pools: {sorted(self.pools)}") from None

    def get_amqp_pool(self, type: str = "publish") -> Pool:
        """Nucleon's name for :meth:`pool`: ``get_amqp_pool(type="listen")``."""
        return self.pool(type)

    def connection(self, type: str = "publish") -> Connection:
        """A shared connection of the pool named ``type``."""
        return self.pool(type).connection()

    # Shortcuts, as on a connection (see PukaConnection for the details).
    def publish(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
                headers: dict[str, Any] | None = None, mandatory: bool = False, json: Any = _NOTHING,
                persistent: bool = False, content_type: str | None = None, content_encoding: str | None = None,
                delivery_mode: int | None = None, priority: int | None = None, correlation_id: str | None = None,
                reply_to: str | None = None, expiration: int | str | None = None, message_id: str | None = None,
                timestamp: int | datetime.datetime | None = None, type: str | None = None,
                app_id: str | None = None, user_id: str | None = None,
                callback: Callback | None = None, timeout: float | None = None, retry: int = 0) -> Any:
        """Publish through the ``publish`` pool; synchronously, return once the broker confirmed it.

        See :meth:`PukaConnection.publish <flask_nucleon_amqp.connection.PukaConnection.publish>`.
        """
        return self.connection("publish").publish(
            exchange, routing_key, body, headers=headers, mandatory=mandatory, json=json, persistent=persistent,
            content_type=content_type, content_encoding=content_encoding, delivery_mode=delivery_mode,
            priority=priority, correlation_id=correlation_id, reply_to=reply_to, expiration=expiration,
            message_id=message_id, timestamp=timestamp, type=type, app_id=app_id, user_id=user_id,
            callback=callback, timeout=timeout, retry=retry)

    #: Nucleon's name for :meth:`publish`.
    basic_publish = publish

    def call(self, exchange: str, routing_key: str, body: bytes | str | None = None, *, json: Any = _NOTHING,
             headers: dict[str, Any] | None = None, timeout: float | None = None, callback: Callback | None = None,
             **properties: Any) -> Any:
        """Publish a request through the ``publish`` pool and wait for its reply (direct reply-to).

        See :meth:`PukaConnection.call <flask_nucleon_amqp.connection.PukaConnection.call>`.
        """
        return self.connection("publish").call(exchange, routing_key, body, json=json, headers=headers,
                                               timeout=timeout, callback=callback, **properties)

    def consume(self, queue: str, callback: Callable[[int, Message], Any] | None = None, *,
                prefetch_count: int = 100, no_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Consume through the ``listen`` pool: without ``callback``, the first message (None after
        ``timeout``); with one, a promise for :meth:`cancel`, and ``callback(promise, message)`` per delivery.

        See :meth:`PukaConnection.consume <flask_nucleon_amqp.connection.PukaConnection.consume>`.
        """
        return self.connection("listen").consume(queue, callback, prefetch_count=prefetch_count, no_ack=no_ack,
                                                 exclusive=exclusive, arguments=arguments, timeout=timeout)

    def get(self, queue: str, *, no_ack: bool = False, callback: Callback | None = None,
            timeout: float | None = None) -> Any:
        """Fetch one message through the ``listen`` pool (basic.get): the Message, None when the queue is
        empty (with ``callback=``, a promise at once; the callback gets the Message, None or the error)."""
        return self.connection("listen").get(queue, no_ack=no_ack, callback=callback, timeout=timeout)

    def ack(self, message: Message) -> None:
        """Acknowledge a message (the same as ``message.ack()``)."""
        message.ack()

    def reject(self, message: Message, requeue: bool = True) -> None:
        """Reject a message: back to the queue, or dropped/dead-lettered with ``requeue=False``."""
        message.reject(requeue)

    def nack(self, message: Message, requeue: bool = True) -> None:
        """basic.nack a message (as :meth:`reject`)."""
        message.nack(requeue)

    @in_hub
    def cancel(self, promise: int, timeout: float | None = None, *, callback: Callback | None = None) -> Any:
        """Cancel a consumer started through any pool of this app.

        :raises ValueError: no consumer of this app has that promise.
        """
        for pool in self.pools.values():
            for conn in pool.connections():
                if conn.has_consumer(promise):
                    return conn.cancel(promise, timeout, callback=callback)
        raise ValueError(f"no consumer with promise {promise!r}")

    def exchange_declare(self, exchange: str, type: str = "direct", *, durable: bool = False,
                         auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                         callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare an exchange (idempotent; PreconditionFailed if it exists with other settings)."""
        return self.connection().exchange_declare(exchange, type, durable=durable, auto_delete=auto_delete,
                                                  arguments=arguments, callback=callback, timeout=timeout)

    def exchange_delete(self, exchange: str, *, if_unused: bool = False,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Delete an exchange."""
        return self.connection().exchange_delete(exchange, if_unused=if_unused, callback=callback, timeout=timeout)

    def exchange_bind(self, destination: str, source: str, routing_key: str = "", *,
                      arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Bind exchange ``destination`` to exchange ``source``."""
        return self.connection().exchange_bind(destination, source, routing_key, arguments=arguments,
                                               callback=callback, timeout=timeout)

    def exchange_unbind(self, destination: str, source: str, routing_key: str = "", *,
                        arguments: dict[str, Any] | None = None,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Remove an exchange-to-exchange binding."""
        return self.connection().exchange_unbind(destination, source, routing_key, arguments=arguments,
                                                 callback=callback, timeout=timeout)

    def queue_declare(self, queue: str = "", *, durable: bool = False, exclusive: bool = False,
                      auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare a queue; returns ``{'queue', 'message_count', 'consumer_count'}``."""
        return self.connection().queue_declare(queue, durable=durable, exclusive=exclusive, auto_delete=auto_delete,
                                               passive=passive, arguments=arguments, callback=callback,
                                               timeout=timeout)

    def queue_delete(self, queue: str, *, if_unused: bool = False, if_empty: bool = False,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Delete a queue with its messages; returns ``{'message_count'}``."""
        return self.connection().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, callback=callback,
                                              timeout=timeout)

    def queue_purge(self, queue: str, *, callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Drop a queue's ready messages; returns ``{'message_count'}``."""
        return self.connection().queue_purge(queue, callback=callback, timeout=timeout)

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "", *,
                   arguments: dict[str, Any] | None = None,
                   callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Bind ``queue`` to ``exchange``."""
        return self.connection().queue_bind(queue, exchange, routing_key, arguments=arguments, callback=callback,
                                            timeout=timeout)

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "", *,
                     arguments: dict[str, Any] | None = None,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Remove a queue binding."""
        return self.connection().queue_unbind(queue, exchange, routing_key, arguments=arguments, callback=callback,
                                              timeout=timeout)

    # Lifecycle: topology, listeners, initialisation (see lifecycle.py).
    @in_hub
    def declare(self, *declarations: Declaration) -> list[Declaration]:
        """Register Exchange/Queue/Binding values in this app's topology and declare them now.

        :raises PreconditionFailed: one conflicts with the broker's; the message names it.
        """
        self.topology.add(*declarations)
        return self.topology.declare(self.connection(), only=declarations)

    @in_hub
    def register_and_spawn_amqp_listener(self, queue: str, callback: MessageCallback, type: str = "listen", *,
                                         prefetch_count: int = 10, concurrency: int | None = None,
                                         on_error: str = "requeue",
                                         retry: RetryPolicy | Mapping[str, Any] | None = None) -> Listener:
        """Consume ``queue`` and run ``callback(connection, promise, message)`` for each delivery.

        As in Nucleon. The callback runs in an app context, at most
        ``concurrency`` (default: ``prefetch_count``) at a time; a message it
        leaves unsettled is acked when it returns; when it raises, the
        traceback is logged and the message requeued, rejected or
        dead-lettered per ``on_error``. A value it returns is published as
        the reply when the message has ``reply_to``. With
        ``retry=dict(max_attempts=..., delay=...)`` a failed message is tried
        again ``delay`` seconds later, then goes to the ``<queue>.dead`` queue
        (see :mod:`flask_nucleon_amqp.retry`). The listener survives connection loss
        and is stopped gracefully by :meth:`close`. Returns once consuming
        (or, when the broker is unreachable, while retrying in the background).

        :raises NotFound: the queue does not exist.
        """
        options = ListenerOptions(type=type, prefetch_count=prefetch_count, concurrency=concurrency,
                                  on_error=on_error, retry=RetryPolicy.parse(retry))
        self.pool(type)  # an unknown pool fails here, naming it
        return self.lifecycle.register_listener(queue, callback, options)

    @property
    def listeners(self) -> list[Listener]:
        """The listeners of this process."""
        return self.lifecycle.listeners

    @in_hub
    def initialise(self, start_listeners: bool | None = None) -> None:
        """Run the on_initialise steps now if this process has not yet (see lifecycle.py)."""
        self.lifecycle.initialise(start_listeners=start_listeners)

    @in_hub
    def health(self) -> dict[str, Any]:
        """A JSON-able health report for a ``/healthz`` route; never waits, never opens a new connection
        per call (a pool with no open connection starts one attempt in the background).
        """
        pools = {name: pool.health() for name, pool in self.pools.items()}
        listeners = [{"queue": listener.queue, "consuming": listener.consuming} for listener in self.listeners]
        ok = all(pool["ok"] for pool in pools.values()) and all(entry["consuming"] for entry in listeners)
        report: dict[str, Any] = {"ok": ok, "pools": pools, "listeners": listeners,
                                  "runtime": self.runtime.describe()}
        for name, extra in self.reports.items():
            report[name] = extra()
            report["ok"] = report["ok"] and report[name].get("ok", True)
        return report

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per pool: connections open, pending operations, publishes confirmed/failed, deliveries,
        and ``runtime``: "gevent" or "thread" (None before first use; see runtime.py); and the extra
        reports (the outbox's pending count and oldest age).
        """
        stats = {name: pool.stats() for name, pool in self.pools.items()}
        for name, extra in self.reports.items():
            stats[name] = extra()
        return stats

    def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` for pending confirms and callbacks, cancel consumers, close.

        Safe to call more than once; also run at interpreter exit.
        """
        if self.closed:
            return
        used = {id(runtime): runtime for runtime in [self._runtime, *(pool._runtime for pool in self.pools.values())]
                if runtime is not None}
        if used:
            self._close_in_hub(timeout)
        else:  # never used: no hub to start just to close
            self._close(timeout)
        for runtime in used.values():  # the last app using a hub thread closed: stop it
            if not any(state._uses(runtime) for state in list(_live_states) if not state.closed):
                runtime.stop(min(self.shutdown_timeout, 5.0))

    def _uses(self, runtime: Runtime) -> bool:
        return self._runtime is runtime or any(pool._runtime is runtime for pool in self.pools.values())

    def _close(self, timeout: float | None) -> None:
        self.closed = True
        try:
            self.lifecycle.stop(timeout)  # listeners first: their callbacks finish and ack
        except Exception:  # noqa: BLE001 - the connections must still be closed
            log.exception("stopping the AMQP listeners failed")
        for pool in self.pools.values():
            try:
                pool.close(self.shutdown_timeout if timeout is None else timeout)
            except Exception:  # noqa: BLE001 - shutting down must go on for the other pools
                log.exception("closing AMQP pool %r failed", pool.name)

    _close_in_hub = in_hub(_close)


_live_states: weakref.WeakSet[AMQPState] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for state in list(_live_states):
        try:
            state.close()
        except Exception:  # noqa: BLE001 - never raise at interpreter exit
            pass
    _runtime.shutdown()


class AMQP:
    """The flask_nucleon_amqp extension.

    ``AMQP(app)``, or ``amqp = AMQP()`` then ``amqp.init_app(app)`` in an
    application factory. The configuration is read and checked once, in
    ``init_app``; no connection opens until the first operation.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        self._registry = Registry()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read ``AMQP_*`` config, register ``app.extensions["amqp"]`` and ``app.amqp``.

        :raises ConfigError: naming the offending key.
        """
        if "amqp" in app.extensions:
            raise RuntimeError("flask_nucleon_amqp is already set up on this app; "
                               "call init_app once per app (or close() the old state first)")
        for key, setting in APP_SETTINGS.items():
            app.config.setdefault(key, copy.deepcopy(setting.default))
        state = AMQPState(app, read_settings(app.config), self._registry)
        app.before_request(state.lifecycle.ensure_initialised)
        app.cli.add_command(amqp_cli)
        app.extensions["amqp"] = state
        app.amqp = state  # type: ignore[attr-defined]  # Nucleon's name; typed: current_amqp()
        _live_states.add(state)
        _apps.add(app)
        self._apps.add(app)

    @property
    def state(self) -> AMQPState:
        """The state of the current app, or of the only app this extension was set up on (typed)."""
        if has_app_context() and "amqp" in current_app.extensions:
            return current_amqp()
        apps = list(self._apps)
        if len(apps) == 1:
            return state_of(apps[0])
        raise RuntimeError("no application context: use current_amqp() inside a request or app context")

    def get_amqp_pool(self, type: str = "publish") -> Pool:
        """The pool named ``type`` of :attr:`state` (as in Nucleon)."""
        return self.state.get_amqp_pool(type)

    @property
    def topology(self) -> Topology:
        """Declarations shared by every app of this extension; ``topology.add(Queue(...))`` works before init_app."""
        return self._registry.topology

    def on_initialise(self, handler: F) -> F:
        """Decorator: run ``handler()`` once per process, before it serves (see lifecycle.py)."""
        if not callable(handler):
            raise TypeError(f"on_initialise takes a function, got {handler!r}")
        self._registry.handlers.append(handler)
        return handler

    def listener(self, queue: str, type: str = "listen", *, prefetch_count: int = 10,
                 concurrency: int | None = None, on_error: str = "requeue",
                 retry: RetryPolicy | Mapping[str, Any] | None = None) -> Callable[[F], F]:
        """Decorator form of :meth:`AMQPState.register_and_spawn_amqp_listener`; works before init_app.

        The listener starts when the process initialises (first request,
        gunicorn ``post_worker_init``, or ``flask amqp listen``)::

            @amqp.listener("listener1", prefetch_count=20, retry=dict(max_attempts=3, delay=5))
            def deliver(connection, promise, message): ...

        Its retry queues join :attr:`topology` at once, so ``flask amqp
        declare`` (and ``--check``, ``--dry-run``) know them before any process starts.
        """
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"@listener needs a queue name, got {queue!r}")
        options = ListenerOptions(type=type, prefetch_count=prefetch_count, concurrency=concurrency,
                                  on_error=on_error, retry=RetryPolicy.parse(retry))
        if options.retry is not None:
            self._registry.topology.add(*retry_declarations(queue, options.retry))

        def register(callback: F) -> F:
            if not callable(callback):
                raise TypeError(f"@listener decorates a function, got {callback!r}")
            self._registry.listeners.append(ListenerSpec(queue, callback, options))
            return callback

        return register


def state_of(app: Flask) -> AMQPState:
    """The :class:`AMQPState` of ``app``, typed (``app.extensions["amqp"]``).

    :raises RuntimeError: the extension is not set up on ``app``.
    """
    state = app.extensions.get("amqp")
    if not isinstance(state, AMQPState):
        raise RuntimeError(f"flask_nucleon_amqp is not set up on app {app.name!r}: call AMQP(app) or "
                           "amqp.init_app(app)")
    return state


def current_amqp() -> AMQPState:
    """The current app's :class:`AMQPState`, typed: ``current_amqp().publish(...)``.

    The same object as ``current_app.amqp``, which type checkers cannot see.

    :raises RuntimeError: outside an application context, or the extension is not set up on the app.
    """
    if not has_app_context():
        raise RuntimeError("no application context: current_amqp() works inside a request or app context")
    return state_of(current_app)


def live_apps() -> list[Flask]:
    """The apps set up with the extension in this process."""
    return [app for app in list(_apps) if "amqp" in app.extensions]
