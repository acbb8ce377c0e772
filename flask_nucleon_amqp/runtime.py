"""Where the connections live: the gevent hub that runs their greenlets, and how other threads reach it.

Every connection's I/O, callbacks, listeners, heartbeats and recovery are
greenlets of one gevent hub, its **home**. The runtime has two modes:

``gevent``
    A gevent server runs the main thread's hub (gunicorn's gevent worker,
    ``gevent.pywsgi``, any monkey-patched process, the test suite). The
    connections live in that hub, as they always did: no thread, no hand-off.

``thread``
    Nothing runs a hub for us (``flask run``, gunicorn ``sync``/``gthread``,
    uWSGI threads, Celery's prefork workers, a plain script). The extension
    runs its own hub in one daemon OS thread per process
    (``flask_nucleon_amqp-hub``), started lazily on first use, stopped by
    ``close()`` and at exit, and made anew in a child after ``fork()``.

``auto`` (the default, ``AMQP_RUNTIME``) picks ``gevent`` when the process is
monkey-patched, or when the main thread is already a gevent program (the
first use comes from a greenlet, or the main thread has a hub); ``thread``
otherwise. A process decides once (and once again in a child after a fork).

A call made from a thread that is not the home thread (puka is not
thread-safe) is **handed** to the home hub: it runs there in a greenlet of its
own, and the calling thread blocks on a real lock until it is done (or,
when the calling thread runs a gevent hub of its own, waits cooperatively
so that its other greenlets go on). The hand-off uses
``loop.run_callback_threadsafe`` (gevent's async watcher) in one direction
and a lock, or the caller's own loop, in the other.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

import gevent
import gevent.monkey
from gevent._hub_local import get_hub_if_exists
from gevent.event import Event

from .exceptions import ConfigError, ConnectionError, Timeout

__all__ = ["MODES", "Runtime", "check_mode", "get", "of", "bind", "in_hub", "ThreadBridge", "shutdown"]

log = logging.getLogger(__name__)

#: The values of ``AMQP_RUNTIME``.
MODES = ("auto", "gevent", "thread")

#: The name of the hub thread of ``thread`` mode.
THREAD_NAME = "flask_nucleon_amqp-hub"

# Real threads and locks, also in a monkey-patched process (where threading's are greenlets').
_get_ident: Callable[[], int] = gevent.monkey.get_original("_thread", "get_ident")
_allocate_lock: Callable[[], Any] = gevent.monkey.get_original("_thread", "allocate_lock")

#: How often a waiting caller checks that the hub thread still lives.
_LIVENESS_SLICE = 1.0

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def check_mode(value: Any, key: str = "AMQP_RUNTIME") -> str:
    """The mode named by a configuration value, or a ConfigError naming ``key``."""
    if value not in MODES:
        raise ConfigError(key, f"must be one of {', '.join(map(repr, MODES))}, got {value!r}")
    return cast(str, value)


def _patched() -> bool:
    return bool(gevent.monkey.is_module_patched("threading") or gevent.monkey.is_module_patched("socket"))


def _auto() -> tuple[str, str]:
    """The auto rule: (mode, why)."""
    if _patched():
        return "gevent", "the process is monkey-patched by gevent"
    if threading.current_thread() is threading.main_thread():
        if gevent.getcurrent().parent is not None:
            return "gevent", "first used from a greenlet of the main thread's gevent hub"
        if get_hub_if_exists() is not None:
            return "gevent", "the main thread runs a gevent hub"
        return "thread", "no gevent hub runs the main thread (not monkey-patched)"
    return "thread", "first used from an OS thread (not monkey-patched)"


class _Request:
    """One call handed to the home hub, and the way back to the thread that waits for it."""

    __slots__ = ("function", "args", "kwargs", "result", "error", "done", "_lock", "_event", "_caller_loop",
                 "_context")

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.function = function
        #: The caller's context variables (OpenTelemetry's current span among them) go with the call.
        self._context = contextvars.copy_context()
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        hub = get_hub_if_exists()
        self._event: Event | None = None
        self._lock: Any = None
        self._caller_loop: Any = None
        if hub is not None and hub.loop is not None and gevent.getcurrent() is not hub:
            # The caller runs a gevent hub of its own: wait cooperatively, its other greenlets go on.
            self._event = Event()
            self._caller_loop = hub.loop
        else:
            self._lock = _allocate_lock()
            self._lock.acquire()

    def run(self) -> None:
        """Runs in a greenlet of the home hub."""
        try:
            self.result = self._context.run(self.function, *self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            self.error = exc
        finally:
            self.done = True
            if self._event is not None:
                self._caller_loop.run_callback_threadsafe(self._event.set)
            else:
                self._lock.release()

    def wait(self, runtime: Runtime, limit: float | None) -> Any:
        waited = 0.0
        while True:
            piece = _LIVENESS_SLICE if limit is None else max(0.0, min(_LIVENESS_SLICE, limit - waited))
            if self._event is not None:
                finished = self._event.wait(piece)
            else:
                finished = self._lock.acquire(timeout=piece)
            if finished or self.done:
                break
            waited += piece
            if not runtime.alive:
                raise ConnectionError(f"the AMQP hub thread of this process stopped before answering "
                                      f"{_name(self.function)} (closed, or the interpreter is exiting)")
            if limit is not None and waited >= limit:
                raise Timeout(f"{_name(self.function)} got no answer from the AMQP hub within {limit:g}s "
                              "(is a callback blocking the hub?)")
        if self.error is not None:
            if isinstance(self.error, gevent.GreenletExit):
                raise ConnectionError(f"the AMQP hub stopped while running {_name(self.function)}")
            raise self.error
        return self.result


def _name(function: Any) -> str:
    return str(getattr(function, "__qualname__", None) or function)


class Runtime:
    """The home of a process's connections (see the module doc); get one with :func:`get`."""

    def __init__(self, mode: str, reason: str) -> None:
        self.mode = mode
        self.reason = reason
        self.pid = os.getpid()
        self.hub: Any = None
        self.thread: threading.Thread | None = None
        self.home_ident: int | None = None
        self._stopped: Event | None = None
        self._closing = False
        #: Calls from other threads, taken by the hub when the async watcher fires.
        self._inbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._watcher: Any = None
        if mode == "gevent":
            self.home_ident = _get_ident()
            self.hub = gevent.get_hub()
            self._watch()
        else:
            self._start_thread()
        where = f"in thread {THREAD_NAME!r}" if mode == "thread" else "in the main gevent hub"
        log.info("flask_nucleon_amqp runs its connections %s (%s mode: %s)", where, mode, reason)

    def __repr__(self) -> str:
        return f"<Runtime {self.mode} ({self.reason})>"

    def describe(self) -> dict[str, Any]:
        """For stats() and health(): the mode, why, and the hub thread (thread mode)."""
        return {"mode": self.mode, "reason": self.reason,
                "thread": self.thread.name if self.thread is not None else None, "alive": self.alive}

    # -- the hub thread ---------------------------------------------------------------------------
    def _watch(self) -> None:
        """In the home thread: the async watcher other threads send() to. Referenced: it keeps the hub thread's
        loop alive while it waits for work (in gevent mode it is unreferenced: it must not keep a script alive)."""
        self._watcher = self.hub.loop.async_(ref=self.mode == "thread")
        self._watcher.start(self._drain)

    def _drain(self) -> None:
        """Runs in the home hub when another thread handed something over: one greenlet per call."""
        inbox = self._inbox
        while inbox:
            function, args = inbox.popleft()
            gevent.spawn_raw(function, *args)

    def _hand_over(self, function: Callable[..., Any], *args: Any) -> None:
        self._inbox.append((function, args))
        self._watcher.send()

    def _start_thread(self) -> None:
        if _patched():
            raise ConfigError("AMQP_RUNTIME", "'thread' needs real OS threads, but this process is "
                                              "monkey-patched by gevent: use 'auto' or 'gevent'")
        ready = _allocate_lock()
        ready.acquire()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.hub = gevent.get_hub()
                self._stopped = Event()
                self.home_ident = _get_ident()
                self._watch()
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                raise
            finally:
                ready.release()
            try:
                self._stopped.wait()
            finally:
                self._watcher.stop()
                self._watcher.close()
                hub, self.hub = self.hub, None
                hub.destroy(destroy_loop=True)

        self.thread = threading.Thread(target=run, name=THREAD_NAME, daemon=True)
        self.thread.start()
        if not ready.acquire(timeout=10.0) or failure:
            raise RuntimeError(f"the AMQP hub thread did not start: {failure[0] if failure else 'timed out'}")

    @property
    def alive(self) -> bool:
        """False once stopped, and in a child after fork (which gets its own runtime)."""
        if self.pid != os.getpid():
            return False
        if self.mode == "gevent":
            return True
        return self.thread is not None and self.thread.is_alive() and not self._closing

    def stop(self, timeout: float = 5.0) -> None:
        """End the hub thread (thread mode); connections must be closed first."""
        if self.mode != "thread" or self._closing or self.thread is None or self.pid != os.getpid():
            return
        self._closing = True
        stopped = self._stopped
        if self.hub is None or stopped is None:
            return
        if self.is_home():
            stopped.set()
        else:
            self._hand_over(stopped.set)
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # -- handing calls over -----------------------------------------------------------------------
    def is_home(self) -> bool:
        """True in the home thread, where connections may be used directly."""
        return _get_ident() == self.home_ident

    def call(self, function: Callable[..., T], *args: Any, _limit: float | None = None, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in the home hub; blocks only the calling thread.

        ``_limit`` bounds the wait (None: as long as the hub lives; the call's own timeouts apply).
        """
        if _get_ident() == self.home_ident:
            return function(*args, **kwargs)
        if not self.alive or self.hub is None:
            raise ConnectionError(f"the AMQP hub thread of this process has stopped; cannot run {_name(function)}")
        request = _Request(function, args, kwargs)
        self._hand_over(request.run)
        return cast(T, request.wait(self, _limit))

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` in the home hub soon, without waiting (from any thread)."""
        if _get_ident() == self.home_ident:
            gevent.spawn_raw(function, *args)
        elif self.alive and self.hub is not None:
            self._hand_over(function, *args)


# -- one runtime per mode and process -----------------------------------------------------------------
_runtimes: dict[str, Runtime] = {}
_auto_choice: tuple[str, str] | None = None
_guard = _allocate_lock()
#: Which runtime each connection belongs to (set by the pool that makes it).
_owners: weakref.WeakKeyDictionary[Any, Runtime] = weakref.WeakKeyDictionary()


def get(mode: str = "auto") -> Runtime:
    """The runtime for ``mode`` in this process (decided and started on first use)."""
    global _auto_choice
    with _guard:
        if mode == "auto":
            if _auto_choice is None:
                _auto_choice = _auto()
            mode, reason = _auto_choice
        else:
            reason = "AMQP_RUNTIME = " + repr(mode)
        runtime = _runtimes.get(mode)
        if runtime is None or runtime.pid != os.getpid() or (mode == "thread" and not runtime.alive):
            runtime = _runtimes[mode] = Runtime(mode, reason)
        return runtime


def bind(connection: Any, runtime: Runtime) -> None:
    """Record ``connection``'s runtime, so that messages it delivered settle in its hub."""
    _owners[connection] = runtime


def of(connection: Any) -> Runtime | None:
    """The runtime of a connection a pool made (None for one made by hand, or no connection)."""
    if connection is None:
        return None
    return _owners.get(connection)


def shutdown(timeout: float = 5.0) -> None:
    """Stop this process's hub thread, if any (at exit, and once every app state is closed)."""
    runtime = _runtimes.get("thread")
    if runtime is not None:
        runtime.stop(timeout)


def _forget_in_child() -> None:
    """After fork: the parent's hub thread does not exist here; decide and start anew on first use."""
    global _auto_choice, _guard
    _guard = _allocate_lock()
    _runtimes.clear()
    _auto_choice = None
    _owners.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def in_hub(method: F) -> F:
    """Decorate a method of an object with a ``runtime`` property: called elsewhere, it runs in the home hub."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime: Runtime = self.runtime
        if _get_ident() == runtime.home_ident:
            return method(self, *args, **kwargs)
        return runtime.call(method, self, *args, **kwargs)

    return cast(F, wrapper)


class ThreadBridge:
    """Stands for a connection in a thread other than its home: every method call is handed to the home hub.

    ``pool.connection()`` returns one when called outside the home thread. It
    passes for the connection (``isinstance`` works); attributes that are not
    methods (``stats``, ``settings``, ``is_open``) are read directly.
    """

    __slots__ = ("_target", "_runtime", "__weakref__")

    def __init__(self, target: Any, runtime: Runtime) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_runtime", runtime)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - isinstance(bridge, PukaConnection) holds
        return type(self._target)

    def __repr__(self) -> str:
        return f"<ThreadBridge to {self._target!r}>"

    def __enter__(self) -> ThreadBridge:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Connections are shared: leaving a ``with`` block does not close it."""

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not callable(value):
            return value
        return functools.partial(self._call, value)

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._runtime.call(method, *args, _limit=self._limit(method, args, kwargs), **kwargs)

    def _limit(self, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        """How long the calling thread waits at most, so that a hub stalled by a blocking callback cannot
        hang it: the call's own timeout plus what opening a connection and a broker alarm may take.

        None (as long as the hub lives) for a synchronous consume without timeout, which waits for a
        message by design, and for close(), which has its own timeout.
        """
        name = getattr(method, "__name__", "")
        timeout = kwargs.get("timeout")
        callback = kwargs.get("callback", args[1] if len(args) > 1 else None)
        if name in ("close", "forget") or (name in ("consume", "basic_consume") and timeout is None
                                           and callback is None):
            return None
        settings = getattr(self._target, "settings", None)
        if settings is None:
            return None
        own = float(settings.operation_timeout if timeout is None else timeout)
        return own + float(settings.connect_timeout) * len(settings.nodes) + float(settings.blocked_timeout) + 2.0

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)
