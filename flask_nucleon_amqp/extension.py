"""The Flask wiring: ``AMQP(app)`` / ``init_app`` and ``current_app.amqp``.

Only Flask glue lives here; broker logic is in plain classes (pool,
connection) that work without Flask.
"""

from __future__ import annotations

import atexit
import copy
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flask import Flask, current_app, has_app_context

from . import runtime as _runtime
from .config import APP_KEYS, EXTRA_APP_KEYS, PoolSettings, read_config
from .exceptions import ConfigError
from .lifecycle import Lifecycle, ListenerSpec, Registry, attach
from .listener import Listener, ListenerOptions, MessageCallback
from .message import Message
from .pool import Pool
from .protocol import Callback, Connection
from .retry import RetryPolicy, retry_declarations
from .runtime import Runtime, in_hub
from .topology import Declaration, Topology

__all__ = ["AMQP", "AMQPState"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class AMQPState:
    """What ``current_app.amqp`` and ``app.extensions["amqp"]`` are: one app's pools.

    The convenience methods use the ``publish`` pool for publishing and
    declaring, and the ``listen`` pool for consuming.
    """

    def __init__(self, settings: dict[str, PoolSettings], shutdown_timeout: float, runtime: str = "auto") -> None:
        self.settings = settings
        self.shutdown_timeout = shutdown_timeout
        #: AMQP_RUNTIME: "auto", "gevent" or "thread" (see runtime.py).
        self.runtime_mode = _runtime.check_mode(runtime)
        self._runtime: Runtime | None = None
        self.pools = {name: Pool(pool_settings, self.runtime_mode) for name, pool_settings in settings.items()}
        self.closed = False
        #: This app's topology: AMQP_TOPOLOGY plus the extension's registry (set by init_app).
        self.topology = Topology()
        #: Start-up and shut-down of this process (set by init_app).
        self.lifecycle: Lifecycle | None = None

    def __repr__(self) -> str:
        return f"<AMQPState pools={sorted(self.pools)}>"

    @property
    def runtime(self) -> Runtime:
        """Where this app's connections, listeners and callbacks run (see runtime.py)."""
        runtime = self._runtime
        if runtime is None or not runtime.alive:
            runtime = self._runtime = _runtime.get(self.runtime_mode)
        return runtime

    def get_amqp_pool(self, type: str = "publish") -> Pool:
        """The pool named ``type`` ("publish" and "listen" always exist)."""
        try:
            return self.pools[type]
        except KeyError:
            raise KeyError(f"no AMQP pool named {type!r}; configured pools: {sorted(self.pools)}") from None

    def connection(self, type: str = "publish") -> Connection:
        """A shared connection of the pool named ``type``."""
        return self.get_amqp_pool(type).connection()

    # Shortcuts, as on a connection.
    def publish(self, exchange: str, routing_key: str, body: Any = None, **options: Any) -> Any:
        """Publish through the ``publish`` pool; see :meth:`PukaConnection.publish`."""
        return self.connection("publish").publish(exchange, routing_key, body, **options)

    def consume(self, queue: str, callback: Callback | None = None, **options: Any) -> Any:
        """Consume through the ``listen`` pool; see :meth:`PukaConnection.consume`."""
        return self.connection("listen").consume(queue, callback, **options)

    def get(self, queue: str, **options: Any) -> Message | None:
        return self.connection("listen").get(queue, **options)

    def ack(self, message: Message) -> None:
        message.ack()

    def reject(self, message: Message, requeue: bool = True) -> None:
        message.reject(requeue)

    def nack(self, message: Message, requeue: bool = True) -> None:
        message.nack(requeue)

    @in_hub
    def cancel(self, promise: int, timeout: float | None = None) -> None:
        """Cancel a consumer started through any pool of this app."""
        for pool in self.pools.values():
            for conn in pool.connections():
                if conn.has_consumer(promise):
                    conn.cancel(promise, timeout)
                    return
        raise ValueError(f"no consumer with promise {promise!r}")

    def exchange_declare(self, exchange: str, type: str = "direct", **options: Any) -> Any:
        return self.connection().exchange_declare(exchange, type, **options)

    def exchange_delete(self, exchange: str, **options: Any) -> Any:
        return self.connection().exchange_delete(exchange, **options)

    def exchange_bind(self, destination: str, source: str, routing_key: str = "", **options: Any) -> Any:
        return self.connection().exchange_bind(destination, source, routing_key, **options)

    def exchange_unbind(self, destination: str, source: str, routing_key: str = "", **options: Any) -> Any:
        return self.connection().exchange_unbind(destination, source, routing_key, **options)

    def queue_declare(self, queue: str = "", **options: Any) -> Any:
        return self.connection().queue_declare(queue, **options)

    def queue_delete(self, queue: str, **options: Any) -> Any:
        return self.connection().queue_delete(queue, **options)

    def queue_purge(self, queue: str, **options: Any) -> Any:
        return self.connection().queue_purge(queue, **options)

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "", **options: Any) -> Any:
        return self.connection().queue_bind(queue, exchange, routing_key, **options)

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "", **options: Any) -> Any:
        return self.connection().queue_unbind(queue, exchange, routing_key, **options)

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
        assert self.lifecycle is not None, "set up by init_app"
        options = ListenerOptions(type=type, prefetch_count=prefetch_count, concurrency=concurrency,
                                  on_error=on_error, retry=RetryPolicy.parse(retry))
        self.get_amqp_pool(type)  # an unknown pool fails here, naming it
        return self.lifecycle.register_listener(queue, callback, options)

    @property
    def listeners(self) -> list[Listener]:
        """The listeners of this process."""
        return self.lifecycle.listeners if self.lifecycle is not None else []

    @in_hub
    def initialise(self, start_listeners: bool | None = None) -> None:
        """Run the on_initialise steps now if this process has not yet (see lifecycle.py)."""
        assert self.lifecycle is not None, "set up by init_app"
        self.lifecycle.initialise(start_listeners=start_listeners)

    @in_hub
    def health(self) -> dict[str, Any]:
        """A JSON-able health report for a ``/healthz`` route; never waits, never opens a new connection
        per call (a pool with no open connection starts one attempt in the background).
        """
        pools = {name: pool.health() for name, pool in self.pools.items()}
        listeners = [{"queue": listener.queue, "consuming": listener.consuming} for listener in self.listeners]
        ok = all(pool["ok"] for pool in pools.values()) and all(entry["consuming"] for entry in listeners)
        return {"ok": ok, "pools": pools, "listeners": listeners, "runtime": self.runtime.describe()}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per pool: connections open, pending operations, publishes confirmed/failed, deliveries,
        and ``runtime``: "gevent" or "thread" (None before first use; see runtime.py)."""
        return {name: pool.stats() for name, pool in self.pools.items()}

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
        if self.lifecycle is not None:
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
        for key, default in APP_KEYS.items():
            app.config.setdefault(key, default)
        for key, default in EXTRA_APP_KEYS.items():
            app.config.setdefault(key, copy.deepcopy(default))
        settings = read_config(app.config)
        shutdown_timeout = app.config["AMQP_SHUTDOWN_TIMEOUT"]
        if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, (int, float)):
            raise ConfigError("AMQP_SHUTDOWN_TIMEOUT", f"must be a number of seconds, got {shutdown_timeout!r}")
        state = AMQPState(settings, float(shutdown_timeout), _runtime.check_mode(app.config["AMQP_RUNTIME"]))
        attach(app, state, self._registry)  # topology, on_initialise, listeners, `flask amqp`
        app.extensions["amqp"] = state
        app.amqp = state  # type: ignore[attr-defined]
        _live_states.add(state)
        self._apps.add(app)

    @property
    def state(self) -> AMQPState:
        """The state of the current app, or of the only app this extension was set up on."""
        if has_app_context() and "amqp" in current_app.extensions:
            return current_app.extensions["amqp"]  # type: ignore[no-any-return]
        apps = list(self._apps)
        if len(apps) == 1:
            return apps[0].extensions["amqp"]  # type: ignore[no-any-return]
        raise RuntimeError("no application context: use current_app.amqp inside a request or app context")

    def get_amqp_pool(self, type: str = "publish") -> Pool:
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

    def __getattr__(self, name: str) -> Any:
        # publish, consume, cancel, queue_declare, close, stats... as on current_app.amqp.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.state, name)
