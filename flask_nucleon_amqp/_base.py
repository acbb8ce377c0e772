"""What PukaConnection and MemoryConnection share: the transport-independent half of a connection.

:class:`BaseConnection` implements the :class:`~flask_nucleon_amqp.protocol.Connection`
contract wherever it does not depend on how frames reach the broker:

* argument checks and publish set-up (body, properties, headers), ``retry=``;
* the one place an operation is either waited for or its result dispatched to a
  ``callback=`` (:meth:`BaseConnection._await_or_dispatch`), the dispatcher
  greenlet that runs operation callbacks in order, and each consumer's own
  greenlet for its deliveries;
* consumer bookkeeping: the registry, one-shot consumes, broker cancels;
* outcome counting and signals, settling and its accounting, the blocked state;
* on_open hooks, the consumers resumed after a reopen, recovery with back-off;
* the nine topology methods; request / reply over direct reply-to.

A received message's ``_context`` has one shape on every transport:
``(session, channel, handle, no_ack)``, where ``handle`` is what the transport
settles with (puka's promise number, the memory broker's delivery).

A transport subclass supplies sessions and I/O through small hooks, each
named for what it does: ``_live_session``, ``_send_publish``,
``_publish_and_wait``, ``_send_topology``, ``_subscribe``, ``_resume_consumer``,
``_consume_one``, ``_send_settle``, ``_reply_channel``, ``_send_request``.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import gevent
from gevent.event import AsyncResult, Event
from greenlet import greenlet

from . import _puka, signals
from . import tracing as _tracing
from .config import Node, PoolSettings
from .exceptions import (
    AMQPError,
    AuthenticationError,
    ConnectionBlocked,
    ConnectionLost,
    MessageStateError,
    Timeout,
    Unroutable,
    VhostNotAllowed,
)
from .message import _NOTHING, Message, encode_body
from .protocol import Callback, Connection, MessageHandler

__all__ = ["BaseConnection"]

log = logging.getLogger(__name__)

_EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic", "headers"})
#: Promise ids are unique in the process, so a promise names its connection too.
_promise_ids = itertools.count(1)
_REPLY_TO = "amq.rabbitmq.reply-to"
#: How many of the latest confirm latencies each connection keeps for the percentiles of stats().
CONFIRM_WINDOW = 1024

#: How long (seconds) a consumer's greenlet waits for more deliveries after its inbox empties.
WORKER_LINGER = 1.0


def _emit(signal: Any, sender: Any, **kwargs: Any) -> None:
    """Send a blinker signal if anyone listens; a failing receiver never breaks the connection."""
    if signal.receivers:
        try:
            signal.send(sender, **kwargs)
        except Exception:  # noqa: BLE001
            log.exception("a receiver of %s raised", signal.name)


class _BaseConsumer:
    """What every consumer records, whatever its transport."""

    def __init__(self, promise: int, queue: str, callback: MessageHandler | None,
                 prefetch_count: int, no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> None:
        self.promise = promise
        self.queue = queue
        self.callback = callback
        self.prefetch_count = prefetch_count
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.arguments = arguments
        self.cancelled = False
        #: Where the one-shot consumer of a synchronous consume puts its message.
        self.box: AsyncResult = AsyncResult()
        #: Deliveries waiting for the callback, and the greenlet running it (only while there are some).
        self.inbox: deque[Message] = deque()
        self.worker: greenlet | None = None
        #: True while the worker waits for deliveries (see WORKER_LINGER); ``linger`` ends that wait.
        self.parked = False
        self.linger: Any = None


class _BaseSession:
    """What every session (one opened connection to the broker) records, whatever its transport."""

    node: Node
    #: What the broker said about itself when this session opened.
    server_properties: dict[str, Any]

    @property
    def usable(self) -> bool:
        """True while operations can be sent on this session."""
        raise NotImplementedError


_ConsumerT = TypeVar("_ConsumerT", bound=_BaseConsumer)
_SessionT = TypeVar("_SessionT", bound=_BaseSession)
_Self = TypeVar("_Self", bound="BaseConnection[Any, Any]")


class _Publish:
    """One checked publish: what a transport needs to send it, and what counting needs."""

    __slots__ = ("exchange", "routing_key", "data", "properties", "mandatory", "context")

    def __init__(self, exchange: bytes, routing_key: bytes, data: bytes, properties: dict[str, Any],
                 mandatory: bool, context: dict[str, str]) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.data = data
        self.properties = properties
        self.mandatory = mandatory
        #: ``{"exchange", "routing_key"}`` as given (str): what signals and errors name.
        self.context = context


class BaseConnection(Generic[_ConsumerT, _SessionT]):
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

    @property
    def is_open(self) -> bool:
        """True while a session to the broker is up (never opens one)."""
        return self._session is not None and self._session.usable

    @property
    def server_properties(self) -> dict[str, Any]:
        """What the broker said about itself when the connection opened (opens it if needed)."""
        return self._live_session().server_properties

    def server_info(self) -> dict[str, Any]:
        """The broker's server properties when open, else ``{}``; never opens or waits."""
        session = self._session
        return dict(session.server_properties) if session is not None and session.usable else {}

    def ensure_open(self) -> None:
        """Open the connection now if it is not open; raise the ConnectionError if that fails."""
        self._live_session()

    def _live_session(self) -> _SessionT:
        """The open session, opening one if there is none (raises ConnectionError)."""
        session = self._session
        if session is not None and session.usable:
            return session
        return self._open()

    def _open(self) -> _SessionT:
        raise NotImplementedError

    def _limit(self, timeout: float | None) -> float:
        """An operation's time limit: ``timeout``, or the pool's operation_timeout."""
        return self.settings.operation_timeout if timeout is None else timeout

    # -- opening, losing, recovering ------------------------------------------------------------
    def _opened(self, session: _SessionT) -> None:
        """A session is up: count and signal it, run the on_open hooks, resume the consumers."""
        self._log.info("connected to %s (%s pool)", self.settings.safe_url(session.node), self.settings.name)
        self.stats["opened"] += 1
        _emit(signals.connection_opened, self, node=str(session.node))

    def _after_open(self, session: _SessionT) -> None:
        for hook in list(self.on_open):
            try:
                hook(cast(Connection, self))  # every transport subclass keeps the contract (mypy checks it there)
            except Exception:  # noqa: BLE001
                # Consumers still resume; a missing queue then shows as their own error.
                self._log.exception("on_open hook %r failed on %r", hook, self)
        for consumer in list(self._consumers.values()):
            if consumer.callback is not None and not consumer.cancelled and session.usable:
                self._resume_consumer(consumer, session)

    def _resume_consumer(self, consumer: _ConsumerT, session: _SessionT) -> None:
        """Subscribe a registered consumer again on a new session."""
        raise NotImplementedError

    def _session_lost(self, session: _SessionT, reason: str) -> bool:
        """The session ``session`` ended; True when the connection should recover (it was not closed)."""
        if self._session is session:
            self._session = None
        if self.blocked_reason is not None:  # an alarm belongs to the connection that got it
            self._set_unblocked()
        self.stats["lost"] += 1
        self._lost_at = time.monotonic()
        if self._closed:
            self._log.info("closed connection to %s", self.settings.safe_url(session.node))
            return False
        self._log.warning("connection to %s lost: %s", self.settings.safe_url(session.node), reason)
        _emit(signals.connection_lost, self, node=str(session.node), reason=reason)
        return True

    def _start_recovery(self) -> None:
        if self._recovery is None or self._recovery.dead:
            self._recovery = gevent.spawn(self._recover)

    def _recover(self) -> None:
        """Reopen in the background, with capped, jittered back-off, so consumers resume."""
        delay = 0.1
        while not self._closed and not self.is_open:
            try:
                session = self._open()
                self.stats["recovered"] += 1
                self._log.info("recovered connection to %s after %.3fs", self.settings.safe_url(session.node),
                               time.monotonic() - self._lost_at)
                _emit(signals.connection_recovered, self, node=str(session.node))
                return
            except (AuthenticationError, VhostNotAllowed) as exc:
                self._log.error("not reconnecting to %s: %s", self.settings.safe_url(), exc)
                return
            except AMQPError as exc:
                self._log.warning("reconnect failed, retrying in %.1fs: %s", delay, exc)
            gevent.sleep(delay * (0.5 + random.random()))
            # Capped so the longest sleep (1.5 x 3 s) plus one attempt stays under 5 s: a broker
            # that comes back is found within 5 s, however long it was away.
            delay = min(delay * 2, 3.0)

    @property
    def blocked(self) -> bool:
        """True while the broker blocks publishers (memory or disk alarm)."""
        return self.blocked_reason is not None

    # -- the blocked state --------------------------------------------------------------------------
    def _set_blocked(self, reason: Any) -> None:
        self.blocked_reason = str(reason or "blocked")
        self._unblocked.clear()
        self._blocked_since = time.monotonic()
        self._log.warning("broker blocked publishing on %r: %s", self, self.blocked_reason)
        _emit(signals.connection_blocked, self, reason=self.blocked_reason)

    def _set_unblocked(self) -> None:
        self.blocked_reason = None
        self.stats["blocked_seconds"] += time.monotonic() - self._blocked_since
        self._unblocked.set()
        self._log.info("broker unblocked publishing on %r", self)
        _emit(signals.connection_unblocked, self)

    def _wait_unblocked(self) -> None:
        """Backpressure: wait while the broker blocks publishers."""
        limit = self.settings.blocked_timeout
        self.stats["waiting_room"] += 1
        try:
            unblocked = self._unblocked.wait(limit)
        finally:
            self.stats["waiting_room"] -= 1
        if not unblocked:
            raise ConnectionBlocked(f"broker blocked publishing ({self.blocked_reason}) for more than "
                                    f"{limit:g}s (blocked_timeout)")

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

    # -- publishing -----------------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
                headers: dict[str, Any] | None = None, mandatory: bool = False, json: Any = _NOTHING,
                persistent: bool = False, content_type: str | None = None, content_encoding: str | None = None,
                delivery_mode: int | None = None, priority: int | None = None, correlation_id: str | None = None,
                reply_to: str | None = None, expiration: int | str | None = None, message_id: str | None = None,
                timestamp: int | datetime.datetime | None = None, type: str | None = None,
                app_id: str | None = None, user_id: str | None = None,
                callback: Callback | None = None, timeout: float | None = None, retry: int = 0) -> Any:
        """Publish a message; synchronously, return once the broker confirmed it.

        ``body`` is bytes (sent as is) or str (sent as UTF-8); ``json=`` sends
        an object as JSON. ``persistent=True`` is ``delivery_mode=2``.

        :raises Unroutable: ``mandatory`` and no queue took the message.
        :raises NotFound: the exchange does not exist.
        :raises PublishNacked: the broker nacked it (e.g. a full queue with ``x-overflow: reject-publish``).
        :raises ConnectionLost: the connection died before the confirm: the
            message may or may not have been routed.
        :raises ConnectionBlocked: the broker blocked publishing for longer than ``blocked_timeout``.

        ``retry=N`` (synchronous only) publishes again, up to N times, on a
        new connection when the connection died before the confirm; the
        broker may then hold the message twice.
        """
        properties: dict[str, Any] = {}
        data = encode_body(body, json, properties)
        if headers:
            if not isinstance(headers, dict):
                raise TypeError(f"headers must be a dict, got {headers.__class__.__name__}")
            properties["headers"] = headers
        if persistent:
            delivery_mode = 2
        if not (content_type is None and content_encoding is None and delivery_mode is None and priority is None
                and correlation_id is None and reply_to is None and expiration is None and message_id is None
                and timestamp is None and type is None and app_id is None and user_id is None):
            properties.update(_properties(
                content_type=content_type, content_encoding=content_encoding, delivery_mode=delivery_mode,
                priority=priority, correlation_id=correlation_id, reply_to=reply_to, expiration=expiration,
                message_id=message_id, timestamp=timestamp, type=type, app_id=app_id, user_id=user_id))
        exchange_b = _puka.shortstr(exchange, "exchange")
        routing_key_b = _puka.shortstr(routing_key, "routing_key")
        if "headers" in properties:  # raise here, naming the header, before anything is sent (D7, D8, issue 16)
            _puka.content_header(properties, len(data))
        if retry and (isinstance(retry, bool) or not isinstance(retry, int) or retry < 0):
            raise ValueError(f"retry must be a non-negative integer, got {retry!r}")
        message = _Publish(exchange_b, routing_key_b, data, properties, mandatory,
                           {"exchange": exchange, "routing_key": routing_key})
        if callback is not None and retry:
            raise ValueError("retry= works only for synchronous publishes (without callback=)")
        if _tracing.ON and (span := _tracing.start_publish(self, exchange, routing_key, properties, data)):
            # tracing hook P1: the span (its context now in the headers) ends at the confirm or the error
            return _tracing.publish_in_span(span, self._publish_message, message, callback, timeout, retry)
        return self._publish_message(message, callback, timeout, retry)

    basic_publish = publish

    def _publish_message(self, message: _Publish, callback: Callback | None, timeout: float | None,
                         retry: int) -> Any:
        if callback is not None:
            return self._send_publish(message, callback, timeout)
        for attempt in range(retry):
            try:
                return self._publish_and_wait(message, timeout)
            except ConnectionLost as exc:
                self._log.warning("publish to %r failed (%s); retrying on a new connection (%d of %d)",
                                  message.context["exchange"], exc, attempt + 1, retry)
        return self._publish_and_wait(message, timeout)

    def _publish_and_wait(self, message: _Publish, timeout: float | None) -> None:
        """Send one publish and wait for its confirm; raise its error."""
        raise NotImplementedError

    def _send_publish(self, message: _Publish, callback: Callback, timeout: float | None) -> int:
        """Send one publish; its outcome goes to ``callback`` (see :meth:`_publish_outcome`)."""
        raise NotImplementedError

    def _publish_outcome(self, error: BaseException | None, context: dict[str, str], started: float) -> Any:
        """Count and signal one publish's outcome: ``{}`` when confirmed, else the exception."""
        if error is not None:
            self.stats["failed"] += 1
            if isinstance(error, Unroutable):
                _emit(signals.message_returned, self, error=error, **context)
            _emit(signals.publish_failed, self, error=error, **context)
            return error
        self.stats["confirmed"] += 1
        seconds = max(time.monotonic() - started, 1e-9)
        self.confirm_latencies.append(seconds)
        if signals.message_confirmed.receivers:
            _emit(signals.message_confirmed, self, seconds=seconds, **context)
        return {}

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

    # -- topology -------------------------------------------------------------------------------
    def exchange_declare(self, exchange: str, type: str = "direct", *, durable: bool = False,
                         auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                         callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare an exchange (idempotent; PreconditionFailed if it exists with other settings).

        ``passive=True`` only checks that it exists (NotFound if not) and creates
        nothing; the other settings are then ignored, as RabbitMQ ignores them.
        """
        if type not in _EXCHANGE_TYPES and not (isinstance(type, str) and type.startswith("x-")):
            raise ValueError(f"type must be one of direct, fanout, topic, headers or an x- plugin type, got {type!r}")
        if passive:
            return self._topology("exchange_declare", {"exchange": exchange}, callback, timeout, type=type,
                                  durable=False, auto_delete=False, arguments={}, passive=True)
        return self._topology("exchange_declare", {"exchange": exchange}, callback, timeout, type=type,
                              durable=durable, auto_delete=auto_delete, arguments=self._declare_args(arguments))

    def exchange_delete(self, exchange: str, *, if_unused: bool = False,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Delete an exchange."""
        return self._topology("exchange_delete", {"exchange": exchange}, callback, timeout, if_unused=if_unused)

    def exchange_bind(self, destination: str, source: str, routing_key: str = "", *,
                      arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Bind exchange ``destination`` to exchange ``source``."""
        return self._topology("exchange_bind", {"destination": destination, "source": source,
                                                "routing_key": routing_key},
                              callback, timeout, arguments=self._declare_args(arguments))

    def exchange_unbind(self, destination: str, source: str, routing_key: str = "", *,
                        arguments: dict[str, Any] | None = None,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Remove an exchange-to-exchange binding."""
        return self._topology("exchange_unbind", {"destination": destination, "source": source,
                                                  "routing_key": routing_key},
                              callback, timeout, arguments=self._declare_args(arguments))

    def queue_declare(self, queue: str = "", *, durable: bool = False, exclusive: bool = False,
                      auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare a queue; returns ``{'queue', 'message_count', 'consumer_count'}``."""
        return self._topology("queue_declare", {"queue": queue}, callback, timeout, durable=durable,
                              exclusive=exclusive, auto_delete=auto_delete, passive=passive,
                              arguments=self._declare_args(arguments))

    def queue_delete(self, queue: str, *, if_unused: bool = False, if_empty: bool = False,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Delete a queue; returns ``{'message_count'}``."""
        return self._topology("queue_delete", {"queue": queue}, callback, timeout,
                              if_unused=if_unused, if_empty=if_empty)

    def queue_purge(self, queue: str, *, callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Drop a queue's ready messages; returns ``{'message_count'}``."""
        return self._topology("queue_purge", {"queue": queue}, callback, timeout)

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "", *,
                   arguments: dict[str, Any] | None = None,
                   callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Bind a queue to an exchange."""
        return self._topology("queue_bind", {"queue": queue, "exchange": exchange, "routing_key": routing_key},
                              callback, timeout, arguments=self._declare_args(arguments))

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "", *,
                     arguments: dict[str, Any] | None = None,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Remove a queue binding."""
        return self._topology("queue_unbind", {"queue": queue, "exchange": exchange, "routing_key": routing_key},
                              callback, timeout, arguments=self._declare_args(arguments))

    def _declare_args(self, arguments: dict[str, Any] | None) -> dict[str, Any]:
        return self._table(_arguments(arguments))

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

    # -- request / reply --------------------------------------------------------------------------
    def call(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
             json: Any = _NOTHING, headers: dict[str, Any] | None = None, timeout: float | None = None,
             callback: Callback | None = None, **properties: Any) -> Any:
        """Publish a request and wait for its reply, using RabbitMQ's direct reply-to.

        The reply is the first message published to the request's ``reply_to``
        with its ``correlation_id``. A reply that arrives after ``timeout`` is
        dropped. With ``callback=``, return a promise at once;
        ``callback(promise, reply)`` follows (or the exception).

        :raises Timeout: no reply within ``timeout``.
        :raises Unroutable: no queue took the request.
        """
        _check_timeout(timeout)
        limit = self.settings.operation_timeout if timeout is None else timeout
        correlation_id = f"rpc-{next(_promise_ids)}"
        props = _properties(**{**properties, "correlation_id": correlation_id, "reply_to": _REPLY_TO})
        data = encode_body(body, json, props)
        if headers:
            props["headers"] = headers
        _puka.shortstr(exchange, "exchange")
        _puka.shortstr(routing_key, "routing_key")
        if callback is None:
            return self._call(exchange, routing_key, data, props, limit)
        return self._in_background(lambda: self._call(exchange, routing_key, data, props, limit), callback, "call")

    def _call(self, exchange: str, routing_key: str, data: bytes, props: dict[str, Any], limit: float) -> Message:
        """Send one checked request and wait up to ``limit`` for its reply."""
        reply_channel = self._reply_channel(limit)
        correlation_id = props["correlation_id"]
        box: AsyncResult = AsyncResult()
        self._replies[correlation_id] = box
        try:
            span = _tracing.start_publish(self, exchange, routing_key, props, data, "call") if _tracing.ON else None
            if span is not None:  # tracing hook C1: the span lasts until the reply (or the error)
                return _tracing.traced_publish(span, self._request, reply_channel, exchange, routing_key, data,
                                               props, box, limit)
            return self._request(reply_channel, exchange, routing_key, data, props, box, limit)
        finally:
            self._replies.pop(correlation_id, None)

    def _request(self, reply_channel: int | None, exchange: str, routing_key: str, data: bytes,
                 properties: dict[str, Any], box: AsyncResult, limit: float) -> Message:
        self._send_request(reply_channel, exchange, routing_key, data, properties)
        reply = box.wait(limit)
        if reply is None and not box.ready():
            raise Timeout(f"no reply to {exchange!r}/{routing_key!r} within {limit:g}s")
        if isinstance(reply, BaseException):
            raise reply
        assert isinstance(reply, Message)
        return reply

    def _reply_channel(self, timeout: float) -> int | None:
        """Start this connection's reply-to consumer if it has none; the channel a request goes on."""
        raise NotImplementedError

    def _send_request(self, reply_channel: int | None, exchange: str, routing_key: str, data: bytes,
                      properties: dict[str, Any]) -> None:
        """Publish a request of :meth:`call` (mandatory), on the reply channel where the transport has one."""
        raise NotImplementedError

    def _on_reply(self, _promise: int, message: Message) -> None:
        box = self._replies.get(message.correlation_id or "")
        if box is None:
            self._log.debug("dropped a late or unknown reply %r", message.correlation_id)
        elif not box.ready():
            box.set(message)


def _check_timeout(timeout: Any) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError(f"timeout must be a non-negative number of seconds or None, got {timeout!r}")


def _check_prefetch(prefetch_count: Any) -> None:
    if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int) or not 0 <= prefetch_count < 65536:
        raise ValueError(f"prefetch_count must be an integer from 0 to 65535, got {prefetch_count!r}")


def _arguments(arguments: dict[str, Any] | None) -> dict[str, Any]:
    if not arguments:
        return {}
    if not isinstance(arguments, dict):
        raise TypeError(f"arguments must be a dict, got {type(arguments).__name__}")
    _puka.encode_table(arguments, "arguments")  # fail before puka allocates a channel (D8)
    return arguments


def _properties(**given: Any) -> dict[str, Any]:
    """Check and normalise message properties; errors name the property."""
    out: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        if name in ("delivery_mode", "priority"):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise ValueError(f"{name} must be an integer from 0 to 255, got {value!r}")
            if name == "delivery_mode" and value not in (1, 2):
                raise ValueError(f"delivery_mode must be 1 (transient) or 2 (persistent), got {value!r}")
        elif name == "timestamp":
            if isinstance(value, datetime.datetime):
                aware = value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
                value = int(aware.timestamp())
            elif isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"timestamp must be a datetime or a non-negative int, got {value!r}")
            if not 0 <= value < 2**64:  # AMQP timestamps are unsigned 64-bit seconds since 1970
                raise ValueError(f"timestamp must be from 1970 on and below 2**64 seconds, got {given[name]!r}")
        elif name == "expiration":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                value = str(value)
            elif not (isinstance(value, str) and value.isdigit()):
                raise ValueError(f"expiration must be milliseconds (int or digit string), got {value!r}")
        else:
            _puka.shortstr(value, name)
        out[name] = value
    return out
