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
  ``"requeue"`` (the default) gives it back to the queue after holding it
  unacked for :data:`REQUEUE_DELAY` (1 s), ``"reject"`` drops it (or the
  broker dead-letters it when the queue has a dead-letter exchange), and
  ``"dead-letter"`` does the same as ``"reject"`` but checks at start that the
  queue is declared with a dead-letter exchange, so a typo cannot silently
  drop messages. The listener itself never dies of a callback error.

Poison messages do not spin: a message whose callback always raises is, with
the default ``"requeue"``, tried about once a second per listener rather than
as fast as the broker can redeliver it, while the worker it failed in goes
on with other messages (the held message takes one of the ``prefetch_count``
slots meanwhile; with ``prefetch_count=1`` that is the only one, and since
the broker requeues a message at its old place, a message that always fails
then holds up the queue: use ``retry=``, which moves it aside). The log shows the traceback of an error once; the same
error again (same callback, exception type and text) is logged as one line
with the count of repeats, at 1, 2, 4, 8... repeats and at least every
:data:`REPEAT_LOG_INTERVAL` seconds. ``on_error="reject"``/``"dead-letter"``
or ``retry=`` choose another policy. On a quorum queue declared with a
delivery limit (``x-delivery-limit``), each of these requeues counts as a
delivery (the ``x-delivery-count`` header), so the broker itself drops or
dead-letters the message once the limit is reached.

Replies: when the callback **returns** a value other than None and the
message has ``reply_to`` (a request made with :meth:`PukaConnection.call`, or
any RPC client), the value is published as the reply, to the default exchange
with ``routing_key=reply_to`` and the request's ``correlation_id``: bytes and
str as the body, anything else as JSON (return ``b""`` for an empty reply:
None means "no reply"). The reply is confirmed before the
request is acked; a reply that cannot be published counts as a failure of the
callback. It is not ``mandatory``: a caller that gave up has no reply queue
any more, and its reply is dropped, as RabbitMQ does for direct reply-to.

Retries: with ``retry=dict(max_attempts=..., delay=...)`` a failed message is
tried again after ``delay`` seconds, up to ``max_attempts`` in all, then goes
to the queue's dead-letter queue with the reason in a header; see
:mod:`flask_nucleon_amqp.retry` for the queues this declares and why.

Supervision: the connection layer reopens a lost connection and resumes the
consumer by itself; the listener's supervisor greenlet covers the rest (the
broker cancelled the consumer because its queue was deleted, or the broker
was unreachable when the listener started) by consuming again, with capped
back-off. It sleeps until there is news: the connection's
``signals.consumer_cancelled`` for its consumer, or
``signals.connection_recovered`` for its connection (a consumer the broker
refuses to resume, because its queue went while the connection was down, is
dropped without a cancel notification, so it looks a few times in the seconds
after a recovery).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import gevent.pool
from gevent.event import AsyncResult, Event

from . import retry as _retry
from . import signals
from . import tracing as _tracing
from .exceptions import AMQPError, ConnectionError, MessageStateError, Timeout
from .retry import RetryPolicy
from .signals import _emit
from .topology import Topology

if TYPE_CHECKING:
    from flask import Flask

    from .config import PoolSettings
    from .message import Message
    from .protocol import Connection
    from .topology import Declaration

__all__ = ["Listener", "ListenerOptions", "MessageCallback", "ON_ERROR"]

log = logging.getLogger(__name__)

#: callback(connection, promise, message), as in Nucleon.
MessageCallback = Callable[["Connection", int, "Message"], Any]

#: What a callback that raises does to its message.
ON_ERROR = ("requeue", "reject", "dead-letter")

#: Seconds after a connection recovered at which the supervisor looks whether its consumer was resumed
#: (a refused resume comes with no cancel notification).
CHECKS_AFTER_RECOVERY = (0.2, 1.0, 3.0)

#: Seconds a message whose callback raised is held unacked before it goes back to the queue
#: (``on_error="requeue"``): a poison message costs about one attempt a second, not a hot loop.
REQUEUE_DELAY = 1.0

#: The same error again is summed up in one line at least this often (seconds), between powers of two.
REPEAT_LOG_INTERVAL = 600.0

#: How many distinct errors a listener remembers for its repeat counts.
_MAX_REMEMBERED_ERRORS = 100

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
    :param retry: a :class:`~flask_nucleon_amqp.retry.RetryPolicy` (or
        ``dict(max_attempts=..., delay=...)``): try a failed message again
        later, then dead-letter it. It replaces ``on_error``, which must stay at its default.
    """

    type: str = "listen"
    prefetch_count: int = 10
    concurrency: int | None = None
    on_error: str = "requeue"
    retry: RetryPolicy | None = None

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
        object.__setattr__(self, "retry", RetryPolicy.parse(self.retry))
        if self.retry is not None and self.on_error != "requeue":
            raise ValueError(f"on_error={self.on_error!r} does not apply with retry=...: a message that fails its "
                             "last attempt goes to the queue's dead-letter queue; leave on_error at its default")


def callback_name(callback: Any) -> str:
    """A readable name for a callback, for logs: module.qualname, with the bound arguments of a partial."""
    if isinstance(callback, functools.partial):
        bound = ", ".join([*map(repr, callback.args), *(f"{k}={v!r}" for k, v in callback.keywords.items())])
        return f"{callback_name(callback.func)}({bound}, ...)"
    module = getattr(callback, "__module__", None)
    name = getattr(callback, "__qualname__", None) or repr(callback)
    return f"{module}.{name}" if module else name


def _same_broker(a: PoolSettings, b: PoolSettings) -> bool:
    return (a.transport, a.nodes, a.vhost) == (b.transport, b.nodes, b.vhost)


class _RepeatedErrors:
    """Which errors a listener has logged with their traceback, and how often each came again since."""

    def __init__(self) -> None:
        #: (exception type, text) -> [repeats, when last summed up, when last seen]
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def note(self, exc: Exception) -> tuple[int, bool]:
        """Count ``exc``; return its repeats so far (0: new) and whether this one is to be logged."""
        key = (f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc)[:500])
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[2] > REPEAT_LOG_INTERVAL:  # new, or not seen for long: traceback again
            self._seen[key] = [0, now, now]
            self._seen.move_to_end(key)
            while len(self._seen) > _MAX_REMEMBERED_ERRORS:
                self._seen.popitem(last=False)
            return 0, True
        self._seen.move_to_end(key)
        entry[0] += 1
        entry[2] = now
        repeats = int(entry[0])
        due = repeats & (repeats - 1) == 0 or now - entry[1] >= REPEAT_LOG_INTERVAL  # 1, 2, 4, 8...
        if due:
            entry[1] = now
        return repeats, due


class Listener:
    """One supervised consumer of ``queue`` feeding a bounded pool of callback greenlets.

    Made by ``current_app.amqp.register_and_spawn_amqp_listener`` (or the
    ``@amqp.listener`` decorator); call :meth:`stop` (or close the app's AMQP
    state) to shut it down gracefully.
    """

    def __init__(self, app: Flask, queue: str, callback: MessageCallback, options: ListenerOptions,
                 connect: Callable[[str], Connection], topology: Topology | None = None,
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
        self.connection: Connection | None = None
        self.promise: int | None = None
        #: received: deliveries; handled: callbacks that returned; failed: callbacks that raised.
        self.stats = {"received": 0, "handled": 0, "failed": 0}
        assert options.concurrency is not None
        self._concurrency = options.concurrency
        self._busy = 0  # workers between spawn and their final look at the backlog
        self._workers = gevent.pool.Pool(options.concurrency)
        self._backlog: deque[tuple[Connection, int, Message]] = deque()
        self._stopping = Event()
        self._supervisor: gevent.Greenlet | None = None
        #: Set when the consumer may have stopped (see :meth:`_wait_for_news`).
        self._news = Event()
        self._recovered = False
        #: Messages whose callback raised, held unacked until their requeue timer fires.
        self._held: dict[gevent.Greenlet, Message] = {}
        self._errors = _RepeatedErrors()
        self._pid = os.getpid()
        #: The retry and dead-letter queues (empty without ``retry``). Once started, they join the app's
        #: topology: re-declared after reconnects, seen by ``flask amqp declare``/``status``/``teardown``.
        self.retry_declarations: tuple[Declaration, ...] = ()
        self._retry_topology = Topology()
        if options.retry is not None:
            self.retry_declarations = _retry.retry_declarations(queue, options.retry)
            self._retry_topology.add(*self.retry_declarations)
            if topology is not None:
                topology.ensure_compatible(*self.retry_declarations)  # another delay for the same queue fails now

    def __repr__(self) -> str:
        state = "stopped" if self._stopping.is_set() else "consuming" if self.consuming else "idle"
        return f"<Listener {self.queue!r} {callback_name(self.callback)} {state}>"

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
        on_error = (f"retry ({o.retry.describe()}), then {_retry.dead_queue_name(self.queue)!r}"
                    if o.retry is not None else o.on_error)
        return (f"queue {self.queue!r} -> {callback_name(self.callback)} (pool {o.type!r}, "
                f"prefetch {o.prefetch_count}, concurrency {o.concurrency}, on error: {on_error})")

    def register_declarations(self) -> None:
        """Put the retry queues in the app's topology (done by :meth:`start`, or for a listener not started).

        Not before: every connection that opens declares the topology, and a
        listener whose queue turns out to be missing must leave nothing behind.
        """
        if self._topology is not None and self.retry_declarations:
            self._topology.add(*self.retry_declarations)

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
        self.register_declarations()
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
        signals.consumer_cancelled.connect(self._on_consumer_cancelled)
        signals.connection_recovered.connect(self._on_connection_recovered)
        try:
            while not self._stopping.is_set() and os.getpid() == self._pid:
                if self.consuming:
                    delay = 0.1
                    self._wait_for_news()
                    continue
                try:
                    if self.promise is not None:  # it was consuming: the broker cancelled it
                        log.warning("listener on %r is not consuming any more (queue deleted?); consuming again",
                                    self.queue)
                    self._consume(again=first.ready())
                except (ConnectionError, Timeout) as exc:
                    log.warning("listener on %r cannot consume yet, retrying in the background: %s", self.queue,
                                exc)
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
        finally:
            signals.consumer_cancelled.disconnect(self._on_consumer_cancelled)
            signals.connection_recovered.disconnect(self._on_connection_recovered)

    def _wait_for_news(self) -> None:
        """Sleep while consuming, until the consumer may have stopped (no polling).

        Woken by the broker cancelling the consumer, by :meth:`cancel`, or by
        the connection recovering: a consumer whose resume the broker refused
        is dropped without a notification, so then it looks a few times.
        """
        self._news.wait()
        self._news.clear()
        if self._recovered:
            self._recovered = False
            for pause in CHECKS_AFTER_RECOVERY:
                if self._news.wait(pause) or not self.consuming:  # more news (a cancel, a stop) ends the looks
                    return

    def _on_consumer_cancelled(self, sender: Any, promise: int, **_: Any) -> None:
        """``signals.consumer_cancelled``: runs in the connection's greenlet; only wakes the supervisor."""
        if sender is self.connection and promise == self.promise:
            self._news.set()

    def _on_connection_recovered(self, sender: Any, **_: Any) -> None:
        if sender is self.connection:
            self._recovered = True
            self._news.set()

    def _consume(self, again: bool) -> None:
        conn = self._connect(self.options.type)
        if self._redeclare and self._topology is not None:
            hook = self._topology.redeclare_hook
            if hook not in conn.on_open:
                conn.on_open.append(hook)
            if again:
                self._topology.declare(conn)
        if self.retry_declarations:
            self._declare_retry_queues(conn)
        self.promise = None
        self.connection = conn
        on_delivery = functools.partial(self._on_delivery, conn)
        setattr(on_delivery, _tracing.SELF_TRACED, True)  # tracing hook L0: _handle makes the process span
        self.promise = conn.consume(self.queue, on_delivery, prefetch_count=self.options.prefetch_count)
        log.info("listening on %r (%s)", self.queue, callback_name(self.callback))

    def _declare_retry_queues(self, conn: Connection) -> None:
        """Declare the retry queues before consuming, so the first failure has somewhere to go.

        The queue itself is checked first (passively): a listener on a queue
        that does not exist fails without leaving retry queues behind.
        """
        conn.queue_declare(self.queue, passive=True)
        self._retry_topology.declare(conn)
        if not self._redeclare:
            # The app's topology is not re-declared after reconnects (AMQP_DECLARE_ON_START is False),
            # but these queues are the extension's own: a broker that lost them gets them back.
            hook = self._retry_topology.redeclare_hook
            if hook not in conn.on_open:
                conn.on_open.append(hook)

    # -- deliveries ---------------------------------------------------------------------------------
    def _on_delivery(self, conn: Connection, promise: int, message: Message) -> None:
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

    def _work(self, conn: Connection, promise: int, message: Message) -> None:
        try:
            self._handle(conn, promise, message)
            while self._backlog and not self._stopping.is_set():
                self._handle(*self._backlog.popleft())
        finally:
            self._busy -= 1  # after the last look at the backlog, with no yield in between

    def _handle(self, conn: Connection, promise: int, message: Message) -> None:
        started = _tracing.start_process(self.queue, message) if _tracing.ON else None  # tracing hook L1
        timed = signals.message_handled.receivers and time.monotonic()
        failed = self.stats["failed"]
        try:
            self._handle_message(conn, promise, message)
        finally:
            if started is not None:
                _tracing.end_process(started)  # tracing hook L2
            if timed:
                _emit(signals.message_handled, self, queue=self.queue, seconds=time.monotonic() - timed,
                      failed=self.stats["failed"] != failed)

    def _handle_message(self, conn: Connection, promise: int, message: Message) -> None:
        if message.decode_error is not None:
            self._undecodable(conn, message)
            return
        if self.options.retry is not None:
            _retry.restore_route(message)
        try:
            with self.app.app_context():
                result = self.callback(conn, promise, message)
            if result is not None:
                self._reply(conn, message, result)
        except gevent.GreenletExit:
            # Killed after the stop timeout: give the message back now rather than at close.
            if not message.settled:
                self._settle(message, "reject", requeue=True)
            raise
        except Exception as exc:
            self.stats["failed"] += 1
            self._failed(conn, message, exc)
        else:
            self.stats["handled"] += 1
            if not message.settled:
                self._settle(message, "ack")

    def _failed(self, conn: Connection, message: Message, exc: Exception) -> None:
        """The callback (or its reply) raised: log it, then requeue, reject, retry or dead-letter."""
        where = f"listener on {self.queue!r}: {callback_name(self.callback)} raised on delivery {message.delivery_tag}"
        policy = self.options.retry
        if _tracing.ON:
            _tracing.failed(exc)  # tracing hook L3: the exception, on the process span
        if message.settled:
            log.error("%s; message already settled by the callback", where, exc_info=exc)
            return
        if policy is None:
            if self.options.on_error == "requeue":
                _tracing.outcome(message, "requeued")  # tracing hook L4: settled after its span ended
                self._log_failure(where, f"message requeued in {REQUEUE_DELAY:g}s", exc)
                self._hold_then_requeue(message)
            else:
                if self.options.on_error == "dead-letter":
                    _tracing.outcome(message, "dead-lettered")  # tracing hook L4
                self._log_failure(where, "message rejected (dead-lettered if the queue has a dead-letter exchange)",
                                  exc)
                self._settle(message, "reject", requeue=False)
            return
        attempt = _retry.attempt_of(message)
        if attempt < policy.max_attempts:
            target, retries, reason = _retry.retry_queue_name(self.queue), attempt, None
            plan = f"attempt {attempt} of {policy.max_attempts}; trying again in {policy.delay:g}s"
        else:
            target, retries, reason = _retry.dead_queue_name(self.queue), attempt - 1, _retry.failure_reason(exc)
            plan = f"attempt {attempt} of {policy.max_attempts}; message sent to {target!r}"
        log.error("%s (%s)", where, plan, exc_info=exc)
        try:
            _retry.republish(self._publisher(conn), message, target, retries, reason)
        except Exception as error:  # noqa: BLE001 - whatever failed, the message must not be lost
            pause = min(policy.delay, MAX_BACKOFF)
            log.error("listener on %r: could not send delivery %s to %r (%s); requeueing it in %gs",
                      self.queue, message.delivery_tag, target, error, pause)
            self._stopping.wait(pause)  # not a hot loop while the retry queue is missing
            self._settle(message, "reject", requeue=True)
            return
        _tracing.outcome(message, "retried" if reason is None else "dead-lettered")  # tracing hook L5
        self._settle(message, "ack")  # only once the broker has confirmed the copy

    def _undecodable(self, conn: Connection, message: Message) -> None:
        """A delivery whose headers could not be decoded (already logged as a warning).

        It is not given to the callback, which would see it without its
        headers, and never requeued, which would bring it back forever:
        whatever ``on_error`` says, it is rejected without requeue (the broker
        dead-letters it when the queue has a dead-letter exchange); with
        ``retry=...`` it goes straight to the dead-letter queue.
        """
        self.stats["failed"] += 1
        policy = self.options.retry
        if policy is None:
            log.info("listener on %r: delivery %s not given to %s (undecodable); rejected without requeue "
                     "(dead-lettered if the queue has a dead-letter exchange)", self.queue, message.delivery_tag,
                     callback_name(self.callback))
            self._settle(message, "reject", requeue=False)
            return
        target = _retry.dead_queue_name(self.queue)
        try:
            _retry.republish(self._publisher(conn), message, target, 0,
                             f"undecodable headers: {message.decode_error}"[:_retry.MAX_REASON_LENGTH])
        except Exception as error:  # noqa: BLE001 - whatever failed, the message must not be lost
            pause = min(policy.delay, MAX_BACKOFF)
            log.error("listener on %r: could not send undecodable delivery %s to %r (%s); requeueing it in %gs",
                      self.queue, message.delivery_tag, target, error, pause)
            self._stopping.wait(pause)
            self._settle(message, "reject", requeue=True)
            return
        log.info("listener on %r: delivery %s not given to %s (undecodable); sent to %r", self.queue,
                 message.delivery_tag, callback_name(self.callback), target)
        self._settle(message, "ack")

    def _log_failure(self, where: str, outcome: str, exc: Exception) -> None:
        """The traceback of an error once; the same error again as one line with its repeat count."""
        repeats, due = self._errors.note(exc)
        if repeats == 0:
            log.error("%s; %s", where, outcome, exc_info=exc)
        elif due:
            log.error("%s; %s (%s: %s: the same error %d times since its traceback was logged)", where, outcome,
                      type(exc).__name__, exc, repeats)

    def _hold_then_requeue(self, message: Message) -> None:
        """Give a failed message back to the queue :data:`REQUEUE_DELAY` seconds from now, not at once.

        Requeued at once, a message whose callback always fails comes straight
        back: thousands of attempts a second. Held unacked, it waits without a
        worker; :meth:`cancel` requeues the held ones at once.
        """
        if self._stopping.is_set():
            self._settle(message, "reject", requeue=True)
            return
        timer = gevent.spawn_later(REQUEUE_DELAY, self._requeue_held, message)
        self._held[timer] = message

    def _requeue_held(self, message: Message) -> None:
        self._held.pop(gevent.getcurrent(), None)
        self._settle(message, "reject", requeue=True)

    def _reply(self, conn: Connection, message: Message, value: Any) -> None:
        """Publish what the callback returned to the request's ``reply_to`` (see the module doc)."""
        reply_to = message.reply_to
        if not reply_to:
            log.debug("listener on %r: %s returned a value but delivery %s has no reply_to; not replying",
                      self.queue, callback_name(self.callback), message.delivery_tag)
            return
        publisher = self._publisher(conn)
        correlation_id = message.correlation_id
        if isinstance(value, (bytes, str)):
            publisher.publish("", reply_to, value, correlation_id=correlation_id)
        elif isinstance(value, (bytearray, memoryview)):
            publisher.publish("", reply_to, bytes(value), correlation_id=correlation_id)
        else:
            publisher.publish("", reply_to, json=value, correlation_id=correlation_id)

    def _publisher(self, conn: Connection) -> Connection:
        """Where replies and retries are published: the publish pool when it reaches the same broker.

        A connection that publishes can be blocked by a resource alarm, which
        would stall this listener's deliveries too; but a publish pool set up
        for another broker cannot reach this request's reply queue or this
        queue's retry queue, so then the connection the message came on is used.
        """
        if self.options.type == "publish":
            return conn
        try:
            publisher = self._connect("publish")
        except KeyError:
            return conn
        return publisher if _same_broker(publisher.settings, conn.settings) else conn

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
        self._news.set()
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
        for timer, message in list(self._held.items()):
            timer.kill(block=False)
            self._settle(message, "reject", requeue=True)
        self._held.clear()

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
