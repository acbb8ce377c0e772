"""What PukaConnection and MemoryConnection share: the transport-independent half of a connection.

:class:`BaseConnection` implements the :class:`~flask_nucleon_amqp.protocol.Connection`
contract wherever it does not depend on how frames reach the broker. It is
assembled from parts, a module each:

* :mod:`._session_life`: the session opened on demand, ``on_open`` hooks, the
  consumers resumed after a reopen, recovery with back-off, the blocked state;
* :mod:`._publishing`: publish set-up (body, properties, headers), ``retry=``,
  outcome counting and signals;
* :mod:`._topology_methods`: the nine topology methods;
* :mod:`._request_reply`: request / reply over direct reply-to;
* :mod:`._argument_checks`: the argument checks they share;

and here:

* the one place an operation is either waited for or its result dispatched to a
  ``callback=`` (:meth:`BaseConnection._await_or_dispatch`), the dispatcher
  greenlet that runs operation callbacks in order, and each consumer's own
  greenlet for its deliveries;
* consumer bookkeeping: the registry, one-shot consumes, broker cancels;
* counting and signals of deliveries, settling and its accounting; get, cancel, qos, close.

A received message's ``_context`` has one shape on every transport:
``(session, channel, handle, no_ack)``, where ``handle`` is what the transport
settles with (puka's promise number, the memory broker's delivery).

A transport subclass supplies sessions and I/O through small hooks, each
named for what it does: ``_live_session``, ``_send_publish``,
``_publish_and_wait``, ``_send_topology``, ``_subscribe``, ``_resume_consumer``,
``_consume_one``, ``_send_settle``, ``_reply_channel``, ``_send_request``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent.event import AsyncResult, Event
from greenlet import greenlet

from . import _puka, signals
from . import tracing as _tracing
from ._argument_checks import _check_prefetch, _check_timeout
from ._connection_records import _ConsumerT, _promise_ids, _SessionT
from ._publishing import CONFIRM_WINDOW, Publishing
from ._request_reply import RequestReply
from ._session_life import SessionLife
from ._topology_methods import TopologyMethods
from .config import PoolSettings
from .exceptions import ConnectionLost, MessageStateError, Timeout
from .message import Message
from .protocol import Callback, Connection, MessageHandler
from .signals import _emit

__all__ = ["BaseConnection"]

log = logging.getLogger(__name__)

#: How long (seconds) a consumer's greenlet waits for more deliveries after its inbox empties.
WORKER_LINGER = 1.0

_Self = TypeVar("_Self", bound="BaseConnection[Any, Any]")


class BaseConnection(SessionLife[_ConsumerT, _SessionT], Publishing[_ConsumerT, _SessionT], TopologyMethods,
                     RequestReply[_ConsumerT, _SessionT]):
    """The part of a connection's API that is the same on every transport.

    See :class:`~flask_nucleon_amqp.protocol.Connection` for the conventions
    (synchronous calls, ``callback=``, ``timeout``).
    """

    #: Where the shared methods log: the transport module's logger, as if they were written there.
    _log: logging.Logger = log

    def __init__(self, settings: PoolSettings, index: int = 0) -> None:
        self.settings = settings
        self.index = index
        self._closed = False
        self._consumers: dict[int, _ConsumerT] = {}
        self._dispatch_queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._dispatch_wake = Event()
        self._dispatcher: gevent.Greenlet | None = None
        #: True while the dispatcher runs a callback: if another greenlet runs meanwhile, that callback blocks.
        self._dispatcher_busy = False
        #: Operation callbacks and consumer greenlets running now (close() waits for them).
        self._callbacks_running = 0
        #: Set whenever nothing is pending and no callback waits or runs: close() waits on it.
        self._idle = Event()
        self._idle.set()
        self._recovery: gevent.Greenlet | None = None
        self._unblocked = Event()
        self._unblocked.set()
        self._blocked_since = 0.0
        self.pending = 0
        self.blocked_reason: str | None = None
        self._replies: dict[str, AsyncResult] = {}
        self._reply_consumer: _ConsumerT | None = None
        self.stats: dict[str, Any] = {"opened": 0, "lost": 0, "recovered": 0, "published": 0, "confirmed": 0,
                                      "failed": 0, "delivered": 0, "acked": 0, "rejected": 0,
                                      "blocked_seconds": 0.0, "buffer_peak": 0,
                                      # greenlets waiting right now: for a confirm, for room in the
                                      # write buffer (or the end of a broker alarm), for a connection
                                      "waiting_confirm": 0, "waiting_room": 0, "waiting_connection": 0}
        #: The latest confirm latencies (seconds): a bounded window for stats()' percentiles.
        self.confirm_latencies: deque[float] = deque(maxlen=CONFIRM_WINDOW)
        self._lost_at = 0.0
        self._session: _SessionT | None = None
        #: How many queued callbacks may run now (a transport may hold some back: see MemoryConnection).
        self._arrived = 0
        #: Called with this connection after every (re)open, before consumers resume.
        self.on_open: list[Callable[[Connection], Any]] = []

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed" if self._closed else "idle"
        return f"<{type(self).__name__} {self.settings.name}#{self.index} {self.settings.safe_url()} {state}>"

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Connections are shared: leaving a ``with`` block does not close it."""

    def _limit(self, timeout: float | None) -> float:
        """An operation's time limit: ``timeout``, or the pool's operation_timeout."""
        return self.settings.operation_timeout if timeout is None else timeout

    # -- waiting or dispatching ---------------------------------------------------------------------
    def _await_or_dispatch(self, start: Callable[[Callable[[Any], None]], None], callback: Callback | None,
                           timeout: float | None, what: str) -> Any:
        """The one place an operation is waited for, or its outcome handed to ``callback``.

        ``start(done)`` sends the operation; ``done(outcome)`` is then called once
        with its result, or with the exception it failed with. Synchronously
        (no callback), wait up to ``timeout`` and return the result or raise;
        with a callback, return a promise at once and run
        ``callback(promise, outcome)`` in the callback greenlet.
        """
        if callback is None:
            box: AsyncResult = AsyncResult()
            self._begin()
            try:
                start(box.set)
                limit = self._limit(timeout)
                outcome = box.wait(limit)
                if outcome is None and not box.ready():
                    node = self._session.node if self._session is not None else None
                    raise Timeout(f"{what} on {self.settings.safe_url(node)} got no answer within {limit:g}s")
            finally:
                self._end()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        promise = next(_promise_ids)
        self._begin()

        def done(outcome: Any) -> None:
            self._end()
            self._dispatch(callback, promise, outcome)

        try:
            start(done)
        except BaseException:
            self._end()  # never sent: nothing will call done()
            raise
        return promise

    def _in_background(self, work: Callable[[], Any], callback: Callback, what: str) -> int:
        """The asynchronous form of an operation made of several broker round trips.

        ``work()`` (the synchronous form, arguments already checked) runs in a
        greenlet of its own; its result, or the exception it raised, goes to
        ``callback`` like any other outcome (see :meth:`_await_or_dispatch`).
        """
        def start(done: Callable[[Any], None]) -> None:
            def run() -> None:
                try:
                    result = work()
                except Exception as exc:  # noqa: BLE001 - delivered to the callback, never raised
                    result = exc
                done(result)
            gevent.spawn(run)
        promise: int = self._await_or_dispatch(start, callback, None, what)
        return promise

    def _begin(self) -> None:
        self.pending += 1
        self._idle.clear()

    def _end(self) -> None:
        self.pending -= 1
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.pending and not self._dispatch_queue and not self._callbacks_running:
            self._idle.set()

    # -- callbacks ------------------------------------------------------------------------------
    # Operation callbacks run in order in the dispatcher greenlet; each consumer's deliveries run
    # in order in a greenlet of that consumer's own. A callback that blocks holds up only its own
    # consumer, or (an operation callback) hands the operation queue to a fresh dispatcher: so any
    # callback may wait for anything on its own connection.
    def _dispatch(self, function: Callable[..., Any], *args: Any) -> None:
        """Run an operation callback in this connection's dispatcher greenlet, in order."""
        self._dispatch_queue.append((function, args))
        self._arrived += 1
        self._idle.clear()
        self._wake_dispatcher()

    def _wake_dispatcher(self) -> None:
        """Have queued callbacks run: wake the dispatcher, or start one if there is none or it is blocked."""
        dispatcher = self._dispatcher
        if dispatcher is None or (self._dispatcher_busy and gevent.getcurrent() is not dispatcher):
            self._dispatcher_busy = False
            self._dispatcher = gevent.spawn(self._dispatch_loop)
        elif not self._dispatch_wake.is_set():
            self._dispatch_wake.set()

    def _dispatch_loop(self) -> None:
        me = gevent.getcurrent()
        queue, wake = self._dispatch_queue, self._dispatch_wake
        while self._dispatcher is me:
            while self._arrived > 0 and queue:
                self._arrived -= 1
                function, args = queue.popleft()
                self._dispatcher_busy = True
                self._callbacks_running += 1
                try:
                    function(*args)
                except Exception:  # noqa: BLE001 - a failing callback must not stop the others
                    self._log.exception("AMQP callback %r raised", function)
                finally:
                    self._callbacks_running -= 1
                if self._dispatcher is not me:  # it blocked, and a fresh dispatcher took the queue over
                    self._maybe_idle()
                    return
                self._dispatcher_busy = False
            wake.clear()
            self._maybe_idle()
            if not queue or not self._arrived:
                wake.wait()

    def _in_callback(self) -> bool:
        """True in a greenlet running this connection's callbacks (waiting there for idleness never ends)."""
        current = gevent.getcurrent()
        return current is self._dispatcher or any(c.worker is current for c in self._consumers.values())

    def _to_consumer(self, consumer: _ConsumerT, message: Message) -> None:
        """Queue a delivery for its consumer's greenlet (woken, or started when it has none)."""
        consumer.inbox.append(message)
        if consumer.worker is None or consumer.parked:
            self._callbacks_running += 1
            self._idle.clear()
            if consumer.worker is None:
                # The lightest greenlet there is; it ends into the hub, like gevent.spawn_raw's.
                consumer.worker = greenlet(self._consumer_loop, gevent.get_hub())
            else:
                consumer.parked = False
                consumer.linger.stop()  # woken by us: the timer must not wake it too
            self._start_worker(consumer.worker, consumer)

    def _start_worker(self, worker: greenlet, consumer: _ConsumerT) -> None:
        """Start or wake a consumer's greenlet once the current one yields (a transport may do it sooner)."""
        worker.parent.loop.run_callback(worker.switch, consumer)

    def _consumer_loop(self, consumer: _ConsumerT) -> None:
        """Run one consumer's callback for each of its deliveries, in order.

        Once the inbox is empty the greenlet parks for up to ``WORKER_LINGER``
        seconds, where the next delivery wakes it: a new greenlet for every
        burst of deliveries costs more than the rest of the way to the callback.
        """
        inbox = consumer.inbox
        hub = gevent.get_hub()
        linger = consumer.linger = hub.loop.timer(WORKER_LINGER, ref=False)
        me = gevent.getcurrent()
        try:
            while True:
                while inbox:
                    try:
                        self._deliver(consumer, inbox.popleft())
                    except Exception:  # noqa: BLE001 - a failing callback must not stop the others
                        self._log.exception("AMQP callback %r raised", consumer.callback)
                consumer.parked = True
                self._callbacks_running -= 1
                self._maybe_idle()
                linger.start(me.switch)
                hub.switch()  # back when _to_consumer wakes it (no longer parked) or the timer fires
                if consumer.parked:
                    return
        finally:
            linger.stop()
            consumer.worker = None
            if consumer.parked:
                consumer.parked = False
            else:  # left while running (killed): it still counts as a running callback
                self._callbacks_running -= 1
                self._maybe_idle()

    # -- counting and signalling --------------------------------------------------------------------
    def _published(self, context: dict[str, str], body: bytes, properties: dict[str, Any]) -> None:
        self.stats["published"] += 1
        _emit(signals.message_published, self, body_size=len(body), body=body, properties=properties, **context)

    def _received(self, message: Message) -> None:
        self.stats["delivered"] += 1
        _emit(signals.message_received, self, message=message)

    def _deliver(self, consumer: _ConsumerT, message: Message) -> None:
        if consumer.cancelled:
            if not message.settled:  # requeue what the callback never saw
                try:
                    self._settle(message, "reject", True, quiet=True)
                    message.settled = True
                except MessageStateError:
                    pass
            return
        assert consumer.callback is not None
        if _tracing.ON:  # tracing hook D1: the callback runs in a process span
            _tracing.process(consumer.queue, message, consumer.callback, consumer.promise, message)
            return
        consumer.callback(consumer.promise, message)

    # -- settling -------------------------------------------------------------------------------------
    def _settle(self, message: Message, action: str, requeue: bool, quiet: bool = False) -> None:
        """Ack / reject / nack a message this connection received (Message calls it).

        ``quiet`` settles a message the application never saw: not counted, not signalled.
        """
        self._send_settle(message, action, requeue)
        if _tracing.processing:  # tracing hook S1: the outcome of a message in a process span
            _tracing.settled(message, action, requeue)
        if quiet:
            return
        if action == "ack":
            self.stats["acked"] += 1
            _emit(signals.message_acked, self, message=message)
        else:
            self.stats["rejected"] += 1
            _emit(signals.message_rejected, self, message=message, requeue=requeue)

    def _send_settle(self, message: Message, action: str, requeue: bool) -> None:
        """Hand ``action`` for ``message`` to the broker, or raise MessageStateError."""
        raise NotImplementedError

    @staticmethod
    def _settle_refused(message: Message, action: str) -> MessageStateError:
        """The error for settling a message whose channel has gone."""
        return MessageStateError(
            f"cannot {action} message {message.delivery_tag}: the channel it arrived on has closed "
            "(connection lost or channel error), so the broker will deliver it again")

    def ack(self, message: Message) -> None:
        """Acknowledge a message: processed, never to be delivered again."""
        message.ack()

    basic_ack = ack

    def reject(self, message: Message, requeue: bool = True) -> None:
        """Reject a message: requeue it, or drop / dead-letter it with ``requeue=False``."""
        message.reject(requeue)

    basic_reject = reject

    def nack(self, message: Message, requeue: bool = True) -> None:
        """Negatively acknowledge a message (basic.nack)."""
        message.nack(requeue)

    def has_consumer(self, promise: int) -> bool:
        """True if ``promise`` is a consumer of this connection."""
        return promise in self._consumers

    # -- get, cancel, qos -------------------------------------------------------------------------
    def get(self, queue: str, *, no_ack: bool = False, callback: Callback | None = None,
            timeout: float | None = None) -> Any:
        """Fetch one message with basic.get: the message, or None when the queue is empty.

        With ``callback=``, return a promise at once; ``callback(promise, message or None)``
        follows (or the exception).
        """
        _puka.shortstr(queue, "queue")
        _check_timeout(timeout)
        return self._await_or_dispatch(lambda done: self._send_get(queue, no_ack, done), callback, timeout,
                                       f"get from {queue!r}")

    basic_get = get

    def _send_get(self, queue: str, no_ack: bool, done: Callable[[Any], None]) -> None:
        """Send basic.get; ``done(message, None when empty, or the error)``."""
        raise NotImplementedError

    def cancel(self, promise: int, timeout: float | None = None, *, callback: Callback | None = None) -> Any:
        """Stop a consumer started with ``consume(queue, callback)``; returns None.

        Deliveries that arrived but were not yet handed to the callback are
        requeued; messages the callback already has can still be acked. The
        consumer is unregistered at once, also with ``callback=`` (which then
        gets ``None`` once the broker confirmed, or the exception).
        """
        consumer = self._registered(promise)
        _check_timeout(timeout)
        del self._consumers[promise]
        consumer.cancelled = True
        if callback is None:
            self._stop_consumer(consumer, timeout)
            return None
        return self._in_background(lambda: self._stop_consumer(consumer, timeout), callback, "cancel")

    basic_cancel = cancel

    def _stop_consumer(self, consumer: _ConsumerT, timeout: float | None) -> None:
        """Cancel an unregistered consumer with the broker, waiting up to ``timeout``."""
        raise NotImplementedError

    def qos(self, promise: int | None = None, prefetch_count: int | None = None, timeout: float | None = None, *,
            callback: Callback | None = None) -> Any:
        """Change how many unacked messages one consumer may hold; returns None.

        Two spellings: ``qos(promise, 10)`` (puka's), and Nucleon's / AMQP's
        ``qos(prefetch_count=10)``, which applies to the consumer ``promise=``
        names or, without it, to the connection's only consumer (ValueError when
        it has none or several). RabbitMQ applies a per-consumer prefetch when a
        consumer starts, so the consumer is subscribed again with the new limit;
        messages it holds stay valid.
        """
        if prefetch_count is None:
            raise ValueError("qos needs prefetch_count=")
        _check_prefetch(prefetch_count)
        _check_timeout(timeout)
        consumer = self._registered(promise) if promise is not None else self._only_consumer()
        if callback is None:
            self._set_prefetch(consumer, prefetch_count, timeout)
            return None
        return self._in_background(lambda: self._set_prefetch(consumer, prefetch_count, timeout), callback, "qos")

    def _only_consumer(self) -> _ConsumerT:
        """The consumer ``qos(prefetch_count=...)`` without ``promise=`` means: the only one there is."""
        mine = [c for c in self._consumers.values() if c is not self._reply_consumer]
        if len(mine) != 1:
            raise ValueError(f"qos(prefetch_count=...) without promise= needs exactly one consumer on {self!r}, "
                             f"it has {len(mine)}: name one with promise=")
        return mine[0]

    def _set_prefetch(self, consumer: _ConsumerT, prefetch_count: int, timeout: float | None) -> None:
        """Subscribe ``consumer`` again with a new prefetch count (before ending the old subscription)."""
        raise NotImplementedError

    # -- closing --------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0, *, callback: Callback | None = None) -> Any:
        """Wait (up to ``timeout``) for pending operations and callbacks, cancel consumers, close.

        With ``callback=``, return a promise at once and close in the background;
        ``callback(promise, None)`` then runs in that background greenlet (the
        connection's callback greenlet ends with it), or with the exception.
        """
        _check_timeout(timeout)
        if callback is None:
            self._close(timeout)
            return None
        promise = next(_promise_ids)

        def run() -> None:
            try:
                self._close(timeout)
                outcome: Any = None
            except Exception as exc:  # noqa: BLE001 - delivered to the callback, never raised
                outcome = exc
            try:
                callback(promise, outcome)
            except Exception:  # noqa: BLE001
                self._log.exception("AMQP callback %r raised", callback)

        gevent.spawn(run)
        return promise

    def _close(self, timeout: float) -> None:
        raise NotImplementedError

    # -- consuming ------------------------------------------------------------------------------
    def consume(self, queue: str, callback: MessageHandler | None = None, *,
                prefetch_count: int = 100, no_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Consume from ``queue``.

        Without a callback, wait for the first message and return it (None
        when ``timeout`` passes first); ack it when done. With a callback,
        register a consumer (once the broker has confirmed it) and return its
        promise; ``callback(promise, message)`` then runs for each delivery.
        Every consumer needs a :meth:`cancel` when it is no longer wanted.
        It is resumed by itself after the connection is lost and reopened.
        """
        _puka.shortstr(queue, "queue")
        _check_prefetch(prefetch_count)
        table = self._table(dict(arguments or {}))
        if callback is None:
            return self._consume_one(queue, no_ack, exclusive, table, timeout)
        consumer = self._new_consumer(next(_promise_ids), queue, callback, prefetch_count, no_ack, exclusive, table)
        self._live_session()  # open first: opening resumes the registered consumers, and this one is new
        self._consumers[consumer.promise] = consumer
        try:
            self._subscribe(consumer, self._limit(timeout))
        except BaseException:
            self._consumers.pop(consumer.promise, None)
            raise
        return consumer.promise

    basic_consume = consume

    def _table(self, table: dict[str, Any]) -> dict[str, Any]:
        """Check a field table (consumer or declare arguments); what the broker will see of it."""
        _puka.encode_table(table, "arguments")
        return table

    def _new_consumer(self, promise: int, queue: str, callback: MessageHandler | None, prefetch_count: int,
                      no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> _ConsumerT:
        raise NotImplementedError

    def _subscribe(self, consumer: _ConsumerT, limit: float) -> None:
        """Start a registered consumer and wait (up to ``limit``) until the broker confirmed it."""
        raise NotImplementedError

    def _consume_one(self, queue: str, no_ack: bool, exclusive: bool, arguments: dict[str, Any],
                     timeout: float | None) -> Message | None:
        """A consume without callback: the first message, or None after ``timeout``."""
        raise NotImplementedError

    def _one_shot_result(self, consumer: _ConsumerT, session: _SessionT, timeout: float | None) -> Message | None:
        """Wait for the message of a one-shot consume: the message, None after ``timeout``, or raise."""
        message = consumer.box.wait(timeout)
        if isinstance(message, BaseException):
            raise message
        if isinstance(message, Message):
            return message
        if not session.usable:
            raise ConnectionLost(f"connection lost while consuming from {consumer.queue!r}",
                                 session.node.host, session.node.port)
        return None

    def _hand_over(self, consumer: _ConsumerT, message: Message) -> None:
        """A delivery for ``consumer``: to the waiting one-shot consume, or to the callback greenlet.

        A one-shot consumer must already be cancelled, before any ack opens its prefetch window.
        """
        if consumer.callback is None:
            if consumer.no_ack:  # the broker was asked for acks, so that prefetch=1 holds back the rest
                self._settle(message, "ack", False, quiet=True)
                message.settled = True
            self._received(message)
            consumer.box.set(message)
            return
        self._received(message)
        self._deliver_later(consumer, message)

    def _deliver_later(self, consumer: _ConsumerT, message: Message) -> None:
        """Hand a delivery to its consumer's greenlet (a transport may first hold it back a turn)."""
        self._to_consumer(consumer, message)

    def _cancelled_by_broker(self, consumer: _ConsumerT) -> None:
        """The broker cancelled the consumer (its queue was deleted): unregister it, tell the app."""
        if not consumer.cancelled:
            self._log.warning("broker cancelled the consumer on queue %r (deleted?)", consumer.queue)
            consumer.cancelled = True
            self._consumers.pop(consumer.promise, None)
            _emit(signals.consumer_cancelled, self, promise=consumer.promise, queue=consumer.queue)

    def _registered(self, promise: int) -> _ConsumerT:
        consumer = self._consumers.get(promise)
        if consumer is None:
            raise ValueError(f"no consumer with promise {promise!r} on {self!r}")
        return consumer

    # -- topology: the nine methods are in TopologyMethods; here, what they end in ---------------------
    def _topology(self, method: str, names: dict[str, str], callback: Callback | None, timeout: float | None,
                  **options: Any) -> Any:
        """Check the names, then send one topology method (see :meth:`_send_topology`)."""
        for name, value in names.items():
            _puka.shortstr(value, name)
        _check_timeout(timeout)
        return self._await_or_dispatch(lambda done: self._send_topology(method, names, options, done),
                                       callback, timeout, method)

    def _send_topology(self, method: str, names: dict[str, str], options: dict[str, Any],
                       done: Callable[[Any], None]) -> None:
        """Send topology ``method`` (a name of the AMQP method, e.g. ``queue_bind``); ``done(result or error)``."""
        raise NotImplementedError
