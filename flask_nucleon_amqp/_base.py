"""What PukaConnection and MemoryConnection share: the transport-independent half of a connection.

:class:`BaseConnection` holds the state and the behaviour that do not depend
on how messages reach the broker: settling and its accounting, the counters
and signals of publishes and deliveries, the blocked state, request / reply
over direct reply-to, and the argument checks. Each transport subclass
supplies sessions, I/O and the small hooks named ``_send_*`` and
``_reply_channel``.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import gevent
from gevent.event import AsyncResult, Event

from . import _puka, signals
from .config import PoolSettings
from .exceptions import ConnectionBlocked, MessageStateError, Timeout
from .message import _NOTHING, Message, encode_body

__all__ = ["BaseConnection"]

log = logging.getLogger(__name__)

_EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic", "headers"})
#: Promise ids are unique in the process, so a promise names its connection too.
_promise_ids = itertools.count(1)
_REPLY_TO = "amq.rabbitmq.reply-to"


def _emit(signal: Any, sender: Any, **kwargs: Any) -> None:
    """Send a blinker signal if anyone listens; a failing receiver never breaks the connection."""
    if signal.receivers:
        try:
            signal.send(sender, **kwargs)
        except Exception:  # noqa: BLE001
            log.exception("a receiver of %s raised", signal.name)


class _BaseConsumer:
    """What every consumer records, whatever its transport."""

    def __init__(self, promise: int, queue: str, callback: Callable[[int, Message], Any] | None,
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


_ConsumerT = TypeVar("_ConsumerT", bound=_BaseConsumer)
_Self = TypeVar("_Self", bound="BaseConnection[Any]")


class BaseConnection(Generic[_ConsumerT]):
    """The part of a connection's API that is the same on every transport.

    See :class:`~flask_nucleon_amqp.connection.PukaConnection` for the
    conventions (synchronous calls, ``callback=``, ``timeout``).
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
        self._callback_running = False
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
                                      "blocked_seconds": 0.0}

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed" if self._closed else "idle"
        return f"<{type(self).__name__} {self.settings.name}#{self.index} {self.settings.safe_url()} {state}>"

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Connections are shared: leaving a ``with`` block does not close it."""

    @property
    def is_open(self) -> bool:
        raise NotImplementedError

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
        if not self._unblocked.wait(limit):
            raise ConnectionBlocked(f"broker blocked publishing ({self.blocked_reason}) for more than "
                                    f"{limit:g}s (blocked_timeout)")

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
        consumer.callback(consumer.promise, message)

    # -- settling -------------------------------------------------------------------------------------
    def _settle(self, message: Message, action: str, requeue: bool, quiet: bool = False) -> None:
        """Ack / reject / nack a message this connection received (Message calls it).

        ``quiet`` settles a message the application never saw: not counted, not signalled.
        """
        self._send_settle(message, action, requeue)
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

    # -- request / reply --------------------------------------------------------------------------
    def call(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
             json: Any = _NOTHING, headers: dict[str, Any] | None = None, timeout: float | None = None,
             **properties: Any) -> Message:
        """Publish a request and wait for its reply, using RabbitMQ's direct reply-to.

        The reply is the first message published to the request's ``reply_to``
        with its ``correlation_id``. A reply that arrives after ``timeout`` is
        dropped.

        :raises Timeout: no reply within ``timeout``.
        :raises Unroutable: no queue took the request.
        """
        limit = self.settings.operation_timeout if timeout is None else timeout
        reply_channel = self._reply_channel(limit)
        correlation_id = f"rpc-{next(_promise_ids)}"
        box: AsyncResult = AsyncResult()
        self._replies[correlation_id] = box
        try:
            props = _properties(**{**properties, "correlation_id": correlation_id, "reply_to": _REPLY_TO})
            data = encode_body(body, json, props)
            if headers:
                props["headers"] = headers
            self._send_request(reply_channel, exchange, routing_key, data, props)
            reply = box.wait(limit)
            if reply is None and not box.ready():
                raise Timeout(f"no reply to {exchange!r}/{routing_key!r} within {limit:g}s")
            if isinstance(reply, BaseException):
                raise reply
            assert isinstance(reply, Message)
            return reply
        finally:
            self._replies.pop(correlation_id, None)

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
