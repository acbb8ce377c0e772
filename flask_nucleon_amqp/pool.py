"""Named pools of shared connections.

A pool hands out one of up to ``size`` connections
(:class:`~flask_nucleon_amqp.protocol.Connection`), round-robin; every
greenlet shares them. Connections are created on first use, so a pool built
in a gunicorn master that forks opens nothing there.
Pools belong to their process: after ``os.fork()`` the child forgets the
parent's connections without touching their sockets and opens its own.

Which class a pool's connections are is chosen by the URL scheme, in one
table (:data:`TRANSPORTS`), or given as ``Pool(settings, connection_class=...)``.
"""

from __future__ import annotations

import importlib
import os
import weakref
from collections.abc import Callable
from typing import Any, cast

import gevent
import gevent.monkey

from . import runtime as _runtime
from .config import PoolSettings
from .exceptions import ConfigError, ConnectionError
from .protocol import Connection
from .runtime import Runtime, ThreadBridge, in_hub

__all__ = ["Pool", "TRANSPORTS", "transport_class"]

#: URL scheme -> the connection class serving it, as "module:Class" (imported on first use:
#: only tests need the memory transport).
TRANSPORTS: dict[str, str] = {
    "amqp": "flask_nucleon_amqp.connection:PukaConnection",
    "amqps": "flask_nucleon_amqp.connection:PukaConnection",
    "memory": "flask_nucleon_amqp.memory:MemoryConnection",
}


def transport_class(scheme: str) -> Callable[[PoolSettings, int], Connection]:
    """The connection class for URLs with ``scheme`` (a key of :data:`TRANSPORTS`)."""
    where = TRANSPORTS.get(scheme)
    if where is None:
        raise ConfigError("AMQP_URL", f"no transport for URL scheme {scheme!r}; "
                                      f"known: {', '.join(sorted(TRANSPORTS))}")
    module, _, name = where.partition(":")
    found: Callable[[PoolSettings, int], Connection] = getattr(importlib.import_module(module), name)
    return found


def _scheme(settings: PoolSettings) -> str:
    if settings.transport != "amqp":
        return settings.transport
    return "amqps" if settings.tls else "amqp"

_all_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


class Pool:
    """Up to ``settings.size`` connections to one broker (or cluster), shared by all greenlets."""

    def __init__(self, settings: PoolSettings, runtime: str = "auto",
                 connection_class: Callable[[PoolSettings, int], Connection] | None = None) -> None:
        self.settings = settings
        #: Makes this pool's connections: by default the class :data:`TRANSPORTS` names for the URL.
        self.connection_class = connection_class or transport_class(_scheme(settings))
        #: AMQP_RUNTIME: where the connections live (see runtime.py); resolved on first use.
        self.runtime_mode = _runtime.check_mode(runtime)
        self._runtime: Runtime | None = None
        self._bridges: dict[int, ThreadBridge] = {}
        self._connections: list[Connection | None] = [None] * settings.size
        self._next = 0
        self._pid = os.getpid()
        self.closed = False
        #: Hooks every connection of this pool runs after each (re)open, before its consumers
        #: resume (e.g. declaring the topology again); also for connections made later.
        self.on_open: list[Callable[[Connection], Any]] = []
        self._probe: gevent.Greenlet | None = None
        self._last_error: str | None = "not connected yet"
        _all_pools.add(self)

    def __repr__(self) -> str:
        return f"<Pool {self.settings.name!r} size={self.settings.size} {self.settings.safe_url()}>"

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def runtime(self) -> Runtime:
        """The hub this pool's connections live in (see runtime.py)."""
        runtime = self._runtime
        if runtime is None or not runtime.alive:
            runtime = self._runtime = _runtime.get(self.runtime_mode)
        return runtime

    def connection(self) -> Connection:
        """Return one of the pool's shared connections (round-robin).

        The connection opens on its first operation. Do not close it: it is
        shared. It can be used as a context manager, as in Nucleon. Outside
        the connections' hub thread (see runtime.py) it comes wrapped in a
        :class:`~flask_nucleon_amqp.runtime.ThreadBridge` that hands every call to that hub.
        """
        if self._pid != os.getpid():
            self._after_fork()
        if self.closed:
            node = self.settings.nodes[0]
            raise ConnectionError(f"AMQP pool {self.name!r} was closed", node.host, node.port)
        runtime = self.runtime
        index = self._next
        self._next = (index + 1) % len(self._connections)
        conn = self._connections[index]
        if runtime.is_home():
            if conn is None:
                conn = self._connections[index] = self._new_connection(index)
            return conn
        if conn is None:
            conn = runtime.call(self._connection_at, index, _limit=self.settings.connect_timeout + 2.0)
        return self._bridge(conn)

    def _connection_at(self, index: int) -> Connection:
        conn = self._connections[index]
        if conn is None:
            conn = self._connections[index] = self._new_connection(index)
        return conn

    def _bridge(self, conn: Connection) -> Connection:
        """The connection as seen from a thread that is not its hub's (one bridge per connection)."""
        bridge = self._bridges.get(id(conn))
        if bridge is None or bridge._target is not conn:
            bridge = self._bridges[id(conn)] = ThreadBridge(conn, self.runtime)
        return cast(Connection, bridge)

    def _new_connection(self, index: int) -> Connection:
        conn = self.connection_class(self.settings, index)
        conn.on_open = self.on_open  # shared: a hook added to the pool reaches every connection
        _runtime.bind(conn, self.runtime)
        return conn

    def connections(self) -> list[Connection]:
        """The connections created so far (bridged outside their hub thread, as by :meth:`connection`)."""
        made = [c for c in self._connections if c is not None]
        if self._runtime is None or self._runtime.is_home():
            return made
        return [self._bridge(c) for c in made]

    def stats(self) -> dict[str, Any]:
        """Counters summed over the pool's connections, and percentiles of the latest confirm latencies.

        ``confirm_ms`` holds p50 / p90 / p99 / max in milliseconds over the last
        (at most 1024 per connection) confirms, and how many that was (``samples``).
        """
        total: dict[str, Any] = {"size": self.settings.size, "open": 0, "pending": 0, "blocked": False,
                                 "waiting_confirm": 0, "waiting_room": 0, "waiting_connection": 0}
        latencies: list[float] = []
        for conn in [c for c in self._connections if c is not None]:
            total["open"] += conn.is_open
            total["pending"] += conn.pending
            total["blocked"] = total["blocked"] or conn.blocked
            for key, value in list(conn.stats.items()):
                total[key] = total.get(key, 0) + value
            latencies.extend(list(conn.confirm_latencies))  # list(): one C call, safe from another thread
        total["confirm_ms"] = _percentiles(latencies)
        total["runtime"] = self._runtime.mode if self._runtime is not None else None
        return total

    @in_hub
    def health(self) -> dict[str, Any]:
        """Is the pool connected? Cheap enough to call every second: it never waits.

        When no connection is open it starts one opening attempt in the
        background (at most one at a time) and reports the last error.
        """
        connections = [c for c in self._connections if c is not None]
        open_count = sum(conn.is_open for conn in connections)
        if open_count == 0 and not self.closed and (self._probe is None or self._probe.dead):
            self._probe = gevent.spawn(self._try_to_connect)
        server = next((info for info in (conn.server_info() for conn in connections) if info), {})
        return {
            "ok": open_count > 0,
            "open": open_count,
            "size": self.settings.size,
            "blocked": any(conn.blocked for conn in connections),
            "broker": self.settings.safe_url(),
            "server": f"{server.get('product', '')} {server.get('version', '')}".strip() or None,
            "error": None if open_count else self._last_error,
        }

    def _try_to_connect(self) -> None:
        try:
            self.connection().ensure_open()
            self._last_error = None
        except Exception as exc:  # noqa: BLE001 - reported by health()
            self._last_error = f"{type(exc).__name__}: {exc}"

    def close(self, timeout: float = 10.0) -> None:
        """Close every connection, waiting up to ``timeout`` for pending work."""
        if self._pid != os.getpid():
            self._after_fork()
            return
        if self._runtime is None:  # never used: nothing to close, and no hub to start for it
            self.closed = True
            return
        self._close(timeout)

    @in_hub
    def _close(self, timeout: float) -> None:
        self.closed = True
        for conn in [c for c in self._connections if c is not None]:
            conn.close(timeout)

    def _after_fork(self) -> None:
        # The parent's sockets are the parent's: forget them without a read or write.
        for conn in self._connections:
            if conn is not None:
                conn.forget()
        self._connections = [None] * self.settings.size
        self._bridges = {}
        self._runtime = None
        self._pid = os.getpid()


def _reset_pools_in_child() -> None:
    if not gevent.monkey.is_module_patched("os"):
        # A plain os.fork() leaves gevent's hub and resolver threads of the
        # parent behind; gevent's own fork (or a patched os) does this for us.
        gevent.reinit()
    for pool in list(_all_pools):
        pool._after_fork()


os.register_at_fork(after_in_child=_reset_pools_in_child)


def _percentiles(seconds: list[float]) -> dict[str, float | int | None]:
    """p50 / p90 / p99 / max of ``seconds``, in milliseconds (nearest rank); None without samples."""
    ordered = sorted(seconds)
    count = len(ordered)

    def rank(fraction: float) -> float | None:
        return round(ordered[min(count - 1, int(fraction * count))] * 1000, 3) if count else None

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": rank(1.0), "samples": count}
