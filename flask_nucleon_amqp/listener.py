"""Listeners: supervised consumers whose callbacks run in a bounded pool of greenlets.

A :class:`Listener` consumes one queue through a shared connection of a pool
and runs ``callback(connection, promise, message)`` (the signature of
Nucleon's ``register_and_spawn_amqp_listener``) for each delivery, inside an
application context, at most ``concurrency`` at a time.

Settling policy, so that no message is lost and none is stuck:

* the callback may ack/reject the message itself (``connection.ack(message)``
  as in Nucleon, or ``message.ack()``);
* a callback that **returns** without settling it gets it **acked**;
* a callback that **raises** is logged with its traceback and its message is
  settled by ``on_error`` (unless the callback settled it first):
  ``"requeue"`` gives it back to the queue, ``"reject"`` drops it (or the
  broker dead-letters it when the queue has a dead-letter exchange), and
  ``"dead-letter"`` does the same as ``"reject"`` but checks at start that the
  queue is declared with a dead-letter exchange, so a typo cannot silently
  drop messages. The listener itself never dies of a callback error.

Supervision: the connection layer reopens a lost connection and resumes the
consumer by itself; the listener's supervisor greenlet covers the rest (the
broker cancelled the consumer because its queue was deleted, or the broker
was unreachable when the listener started) by consuming again, with capped
back-off.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import gevent.pool
from gevent.event import AsyncResult, Event

from .exceptions import AMQPError, ConnectionError, MessageStateError, Timeout

if TYPE_CHECKING:
    from flask import Flask

    from .connection import PukaConnection
    from .message import Message
    from .topology import Topology

__all__ = ["Listener", "ListenerOptions", "MessageCallback", "ON_ERROR"]

log = logging.getLogger(__name__)

#: callback(connection, promise, message), as in Nucleon.
MessageCallback = Callable[["PukaConnection", int, "Message"], Any]

#: What a callback that raises does to its message.
ON_ERROR = ("requeue", "reject", "dead-letter")

#: Seconds between the supervisor's checks that its consumer still exists. The
#: connection layer has no "consumer cancelled" notification, and the broker
#: cancels a consumer when its queue is deleted; this is a watchdog, not I/O polling.
SUPERVISE_INTERVAL = 2.0

#: Longest wait between two attempts to consume again.
MAX_BACKOFF = 5.0


@dataclass(frozen=True)
class ListenerOptions:
    """How a listener consumes; checked when made, so a typo fails at import or start.

    :param type: the pool to consume through ("listen" by default).
    :param prefetch_count: how many unacked messages the broker sends ahead.
    :param concurrency: how many callbacks run at once; defaults to
        ``prefetch_count`` (more would idle, fewer holds messages back in a backlog).
    :param on_error: ``"requeue"``, ``"reject"`` or ``"dead-letter"`` (see the module doc).
    """

    type: str = "listen"
    prefetch_count: int = 10
    concurrency: int | None = None
    on_error: str = "requeue"

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise ValueError(f"type must name a pool, got {self.type!r}")
        if (isinstance(self.prefetch_count, bool) or not isinstance(self.prefetch_count, int)
                or not 1 <= self.prefetch_count <= 65535):
            raise ValueError(f"prefetch_count must be an integer from 1 to 65535, got {self.prefetch_count!r}")
        if self.concurrency is None:
            object.__setattr__(self, "concurrency", self.prefetch_count)
        elif isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {self.concurrency!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, got {self.on_error!r}")


def _callback_name(callback: Any) -> str:
    if isinstance(callback, functools.partial):
        bound = ", ".join([*map(repr, callback.args), *(f"{k}={v!r}" for k, v in callback.keywords.items())])
        return f"{_callback_name(callback.func)}({bound}, ...)"
    module = getattr(callback, "__module__", None)
    name = getattr(callback, "__qualname__", None) or repr(callback)
    return f"{module}.{name}" if module else name


class Listener:
    """One supervised consumer of ``queue`` feeding a bounded pool of callback greenlets.

    Made by ``current_app.amqp.register_and_spawn_amqp_listener`` (or the
    ``@amqp.listener`` decorator); call :meth:`stop` (or close the app's AMQP
    state) to shut it down gracefully.
    """

    def __init__(self, app: Flask, queue: str, callback: MessageCallback, options: ListenerOptions,
                 connect: Callable[[str], PukaConnection], topology: Topology | None = None,
                 redeclare: bool = False) -> None:
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue must be a non-empty string, got {queue!r}")
        if not callable(callback):
            raise TypeError(f"callback must be callable as callback(connection, promise, message), got {callback!r}")
        self.app = app
        self.queue = queue
        self.callback = callback
        self.options = options
        self._connect = connect
        self._topology = topology
        self._redeclare = redeclare
        #: The connection and consumer promise of the current consumer (None until it started).
        self.connection: PukaConnection | None = None
        self.promise: int | None = None
        #: received: deliveries; handled: callbacks that returned; failed: callbacks that raised.
        self.stats = {"received": 0, "handled": 0, "failed": 0}
        assert options.concurrency is not None
        self._concurrency = options.concurrency
        self._busy = 0  # workers between spawn and their final look at the backlog
        self._workers = gevent.pool.Pool(options.concurrency)
        self._backlog: deque[tuple[PukaConnection, int, Message]] = deque()
        self._stopping = Event()
        self._supervisor: gevent.Greenlet | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        state = "stopped" if self._stopping.is_set() else "consuming" if self.consuming else "idle"
        return f"<Listener {self.queue!r} {_callback_name(self.callback)} {state}>"

    @property
    def started(self) -> bool:
        return self._supervisor is not None

    @property
    def consuming(self) -> bool:
        """True while the broker has our consumer registered (as far as this process knows)."""
        return (self.promise is not None and self.connection is not None
                and self.connection.has_consumer(self.promise))

    @property
    def running_callbacks(self) -> int:
        return len(self._workers)

    def describe(self) -> str:
        o = self.options
        return (f"queue {self.queue!r} -> {_callback_name(self.callback)} (pool {o.type!r}, "
                f"prefetch {o.prefetch_count}, concurrency {o.concurrency}, on error: {o.on_error})")

    # -- starting ---------------------------------------------------------------------------------
    def start(self) -> Listener:
        """Start consuming; return once the broker confirmed the consumer.

        When the broker cannot be reached, this logs a warning and returns
        while the supervisor keeps trying in the background: a worker must be
        able to boot while the broker restarts. Any other failure (the queue
        does not exist, access refused) is raised.
        """
        if self._supervisor is not None:
            return self
        if self._stopping.is_set():
            raise RuntimeError(f"{self!r} was stopped; register a new listener instead")
        self._check_dead_letter()
        first: AsyncResult = AsyncResult()
        self._supervisor = gevent.spawn(self._supervise, first)
        error = first.get()
        if error is not None:
            self._supervisor = None
            raise error
        return self

    def _check_dead_letter(self) -> None:
        if self.options.on_error != "dead-letter":
            return
        declared = self._topology.queue(self.queue) if self._topology is not None else None
        if declared is None:
            log.warning("listener on %r uses on_error='dead-letter' but the queue is not in the declared "
                        "topology, so its dead-letter exchange cannot be checked (a policy may set it); "
                        "without one, failed messages are dropped", self.queue)
        elif declared.dead_letter_exchange is None:
            raise ValueError(f"listener on queue {self.queue!r}: on_error='dead-letter' needs the queue declared "
                             "with dead_letter_exchange=... (or use on_error='reject' if a policy sets it)")

    def _supervise(self, first: AsyncResult) -> None:
        delay = 0.1
        while not self._stopping.is_set() and os.getpid() == self._pid:
            if self.consuming:
                delay = 0.1
                self._stopping.wait(SUPERVISE_INTERVAL)
                continue
            try:
                if self.promise is not None:  # it was consuming: the broker cancelled it
                    log.warning("listener on %r is not consuming any more (queue deleted?); consuming again",
                                self.queue)
                self._consume(again=first.ready())
            except (ConnectionError, Timeout) as exc:
                log.warning("listener on %r cannot consume yet, retrying in the background: %s", self.queue, exc)
            except AMQPError as exc:
                if not first.ready():
                    first.set(exc)
                    return
                log.error("listener on %r cannot consume, retrying in %.1fs: %s", self.queue, delay, exc)
            else:
                if not first.ready():
                    first.set(None)
                continue
            if not first.ready():
                first.set(None)
            self._stopping.wait(delay * (0.5 + random.random()))
            delay = min(delay * 2, MAX_BACKOFF)

    def _consume(self, again: bool) -> None:
        conn = self._connect(self.options.type)
        if self._redeclare and self._topology is not None:
            hook = self._topology.redeclare_hook
            if hook not in conn.on_open:
                conn.on_open.append(hook)
            if again:
                self._topology.declare(conn)
        self.promise = None
        self.connection = conn
        self.promise = conn.consume(self.queue, functools.partial(self._on_delivery, conn),
                                    prefetch_count=self.options.prefetch_count)
        log.info("listening on %r (%s)", self.queue, _callback_name(self.callback))

    # -- deliveries ---------------------------------------------------------------------------------
    def _on_delivery(self, conn: PukaConnection, promise: int, message: Message) -> None:
        """Runs in the connection's callback greenlet: hand over at once, never block it."""
        if self._stopping.is_set():
            self._settle(message, "reject", requeue=True)
            return
        self.stats["received"] += 1
        # Count busy workers ourselves: the pool still counts a worker that has just finished
        # until a later hub turn, and a delivery parked then would wait with no worker left.
        if self._busy < self._concurrency:
            self._busy += 1
            self._workers.spawn(self._work, conn, promise, message)
        else:
            self._backlog.append((conn, promise, message))

    def _work(self, conn: PukaConnection, promise: int, message: Message) -> None:
        try:
            self._handle(conn, promise, message)
            while self._backlog and not self._stopping.is_set():
                self._handle(*self._backlog.popleft())
        finally:
            self._busy -= 1  # after the last look at the backlog, with no yield in between

    def _handle(self, conn: PukaConnection, promise: int, message: Message) -> None:
        try:
            with self.app.app_context():
                self.callback(conn, promise, message)
        except gevent.GreenletExit:
            # Killed after the stop timeout: give the message back now rather than at close.
            if not message.settled:
                self._settle(message, "reject", requeue=True)
            raise
        except Exception:
            self.stats["failed"] += 1
            requeue = self.options.on_error == "requeue"
            outcome = "already settled by the callback" if message.settled else (
                "requeued" if requeue else "rejected (dead-lettered if the queue has a dead-letter exchange)")
            log.exception("listener on %r: %s raised on delivery %s; message %s", self.queue,
                          _callback_name(self.callback), message.delivery_tag, outcome)
            if not message.settled:
                self._settle(message, "reject", requeue=requeue)
        else:
            self.stats["handled"] += 1
            if not message.settled:
                self._settle(message, "ack")

    def _settle(self, message: Message, action: str, requeue: bool = False) -> None:
        try:
            if action == "ack":
                message.ack()
            else:
                message.reject(requeue)
        except MessageStateError as exc:
            # The channel it came on is gone: the broker delivers it again.
            log.warning("listener on %r could not %s delivery %s: %s", self.queue, action,
                        message.delivery_tag, exc)

    # -- stopping -----------------------------------------------------------------------------------
    def cancel(self, timeout: float = 5.0) -> None:
        """Stop taking deliveries (basic.cancel); running callbacks go on. Safe to call twice.

        Messages received but not yet handed to a callback are requeued.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.dead and supervisor is not gevent.getcurrent():
            supervisor.join(timeout)  # it may be between consume and consume-ok
            supervisor.kill(block=False)
        conn, promise = self.connection, self.promise
        if conn is not None and promise is not None and conn.has_consumer(promise) and os.getpid() == self._pid:
            try:
                conn.cancel(promise, timeout=timeout)
            except (AMQPError, ValueError) as exc:
                log.info("cancelling the consumer on %r: %s (the broker requeues its messages)", self.queue, exc)
            except Exception:  # noqa: BLE001 - puka fails when the broker cancelled it at the same moment
                log.warning("cancelling the consumer on %r failed", self.queue, exc_info=True)
        while self._backlog:
            self._settle(self._backlog.popleft()[2], "reject", requeue=True)

    def stop(self, timeout: float = 10.0) -> bool:
        """Cancel, let running callbacks finish (and be acked) for up to ``timeout`` seconds.

        Callbacks still running then are killed and their messages requeued;
        a message that could not be settled is redelivered by the broker once
        the connection closes. Returns True when every callback finished.
        """
        self.cancel(timeout=min(timeout, 5.0))
        finished = bool(self._workers.join(timeout=timeout))
        if not finished:
            log.warning("listener on %r: %d callbacks still running after %gs; stopping them, their messages "
                        "go back to the queue", self.queue, len(self._workers), timeout)
            self._workers.kill(block=True, timeout=1)
        return finished
