"""An in-process broker and :class:`MemoryConnection`, so that apps can be tested without RabbitMQ.

``AMQP_URL = "memory://NAME"`` gives every pool of an app a
:class:`MemoryConnection` to the in-process broker called NAME, created on
first use and shared by every pool and app of the process that names it.
:func:`reset` empties brokers between tests.

The broker routes like RabbitMQ 3.x does, down to its error codes and
texts, because a test that passes here must pass against the real broker:
``tests/test_api.py`` runs the same API tests against both. It has the
default exchange and ``amq.*`` exchanges; direct, fanout, topic and headers
exchanges (exchange-to-exchange bindings, ``alternate-exchange``); queues
that are exclusive, auto-delete, server-named, with ``x-message-ttl``,
per-message ``expiration``, ``x-expires``, ``x-max-length[-bytes]`` with
``x-overflow``, ``x-max-priority``, ``x-single-active-consumer`` and
dead-lettering (``x-dead-letter-exchange``/``-routing-key``, ``x-death``);
prefetch, consumer priorities (``x-priority``), exclusive consumers,
redelivery, ``CC``/``BCC`` headers and direct reply-to.

Nothing here does I/O: every broker operation completes inside the call
that asks for it. Timing still resembles a network's, so that code which
only works because nothing else got to run fails here as it would in
production: every synchronous call yields to the hub once, and, as with
:class:`~flask_nucleon_amqp.connection.PukaConnection`, ``callback=``
results and deliveries run in the connection's callback greenlet, in order,
one turn of the hub's loop after they happened.
"""

from __future__ import annotations

import base64
import calendar
import datetime
import decimal
import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import gevent
from puka import table as puka_table

from . import _puka, signals
from ._base import (
    _EXCHANGE_TYPES,
    _REPLY_TO,
    BaseConnection,
    _arguments,
    _BaseConsumer,
    _check_prefetch,
    _emit,
    _promise_ids,
    _properties,
)
from .config import PoolSettings
from .connection import Callback
from .exceptions import (
    AMQPError,
    ConnectionError,
    ConnectionLost,
    MessageStateError,
    PublishNacked,
    Unroutable,
    error_from_reply,
)
from .message import _NOTHING, Message, encode_body

__all__ = ["MemoryBroker", "MemoryConnection", "broker", "find", "reset"]

log = logging.getLogger(__name__)

#: Exchanges every RabbitMQ vhost has: name -> type (all durable).
_PREDECLARED = {"": "direct", "amq.direct": "direct", "amq.fanout": "fanout", "amq.topic": "topic",
                "amq.headers": "headers", "amq.match": "headers"}
#: Queue arguments RabbitMQ compares when a queue is declared again (rabbit_amqqueue declare_args).
_EQUIVALENT_QUEUE_ARGS = ("x-expires", "x-message-ttl", "x-dead-letter-exchange", "x-dead-letter-routing-key",
                          "x-max-length", "x-max-length-bytes", "x-max-priority", "x-overflow", "x-queue-mode",
                          "x-single-active-consumer", "x-queue-type", "x-delivery-limit")
_OVERFLOW = ("drop-head", "reject-publish", "reject-publish-dlx")
_X_MATCH = ("all", "any", "all-with-x", "any-with-x")
_SERVER_PROPERTIES = {"product": "flask_nucleon_amqp memory broker", "version": "1", "platform": "Python/gevent",
                      "capabilities": {"publisher_confirms": True, "exchange_exchange_bindings": True,
                                       "basic.nack": True, "consumer_cancel_notify": True,
                                       "connection.blocked": True, "direct_reply_to": True}}


# -- the registry --------------------------------------------------------------------------------

_brokers: dict[str, MemoryBroker] = {}


def broker(name: str = "default") -> MemoryBroker:
    """The broker that ``memory://NAME`` URLs name, created on first use."""
    found = _brokers.get(name)
    if found is None:
        found = _brokers[name] = MemoryBroker(name)
    return found


def find(name: str) -> MemoryBroker | None:
    """The broker called ``name`` if it exists (unlike :func:`broker`, never creates one)."""
    return _brokers.get(name)


def reset(name: str | None = None) -> None:
    """Empty one broker (or all): queues, messages, exchanges, bindings and alarms go.

    Open connections stay usable; their consumers are cancelled as when a
    queue is deleted. Call it between tests that share a broker name.
    """
    targets = list(_brokers.values()) if name is None else [_brokers[name]] if name in _brokers else []
    for found in targets:
        found.reset()
        if not found._sessions:
            _brokers.pop(found.name, None)


# -- values ----------------------------------------------------------------------------------------

def _decode_table(raw: bytes) -> dict[str, Any]:
    """Decode a field table with the codec received messages go through, so types match the wire."""
    if not raw:
        return {}
    decoded: dict[str, Any] = puka_table.decode(raw, 0)[0]
    return decoded


def _wire(table: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """What the broker sees of a table the client sends: encoded and decoded."""
    return _decode_table(_puka.encode_table(table, where)) if table else {}


def _amqp_type(value: Any) -> str:
    """RabbitMQ's name for the field type of a value (for its error texts)."""
    if value is None:
        return "void"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "signedint" if -(2**31) <= value < 2**31 else "long"
    for kind, name in ((float, "double"), ((str, bytes), "longstr"), (dict, "table"), (list, "array"),
                       (decimal.Decimal, "decimal"), (datetime.datetime, "timestamp")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _erlang_equal(pattern: Any, value: Any) -> bool:
    """Header equality as RabbitMQ's headers exchange sees it (Erlang ``==``).

    1 equals 1.0, str equals its UTF-8 bytes, but booleans are never numbers.
    """
    if isinstance(pattern, bool) or isinstance(value, bool):
        return type(pattern) is type(value) and pattern == value
    if isinstance(pattern, str):
        pattern = pattern.encode("utf-8")
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(pattern, datetime.datetime):
        pattern = calendar.timegm(pattern.utctimetuple())
    if isinstance(value, datetime.datetime):
        value = calendar.timegm(value.utctimetuple())
    if isinstance(pattern, decimal.Decimal) or isinstance(value, decimal.Decimal):
        # Erlang keeps AMQP decimals as {places, digits}: 1.0 and 1.00 differ, and neither is a number.
        return (isinstance(pattern, decimal.Decimal) and isinstance(value, decimal.Decimal)
                and pattern.as_tuple() == value.as_tuple())
    try:
        return bool(pattern == value)
    except TypeError:
        return False


def _words(key: str) -> list[str]:
    """Split a topic key as RabbitMQ does: "" is no words, "a." is ["a", ""]."""
    return key.split(".") if key else []


def _topic_match(pattern: list[str], words: list[str]) -> bool:
    """``*`` is exactly one word, ``#`` zero or more (RabbitMQ's topic trie semantics)."""
    memo: dict[tuple[int, int], bool] = {}

    def match(p: int, w: int) -> bool:
        key = (p, w)
        if key not in memo:
            if p == len(pattern):
                result = w == len(words)
            elif pattern[p] == "#":
                result = match(p + 1, w) or (w < len(words) and match(p, w + 1))
            else:
                result = w < len(words) and pattern[p] in ("*", words[w]) and match(p + 1, w + 1)
            memo[key] = result
        return memo[key]

    return match(0, 0)


def _headers_match(arguments: dict[str, Any], headers: dict[str, Any]) -> bool:
    kind = arguments.get("x-match", "all")
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    with_x = kind.endswith("-with-x")
    results = []
    for key, pattern in arguments.items():
        if key == "x-match" or (key.startswith("x-") and not with_x):
            continue
        if key not in headers:
            results.append(False)
        else:
            results.append(pattern is None or _erlang_equal(pattern, headers[key]))
    return any(results) if kind.startswith("any") else all(results)


def _vhost_text(kind: str, name: str, vhost: str) -> str:
    return f"{kind} '{name}' in vhost '{vhost}'"


def _error(code: int, text: str) -> AMQPError:
    return error_from_reply(code, text)


def _not_found(kind: str, name: str, vhost: str) -> AMQPError:
    return _error(404, f"NOT_FOUND - no {_vhost_text(kind, name, vhost)}")


def _default_exchange_refused() -> AMQPError:
    return _error(403, "ACCESS_REFUSED - operation not permitted on the default exchange")


def _now_timestamp() -> datetime.datetime:
    """Now as an AMQP timestamp decodes: whole seconds, naive UTC."""
    return datetime.datetime.fromtimestamp(int(time.time()), datetime.timezone.utc).replace(tzinfo=None)


# -- broker state --------------------------------------------------------------------------------

class _Envelope:
    """One queue's copy of a message (each queue a message reaches holds its own)."""

    __slots__ = ("body", "properties", "headers_raw", "exchange", "routing_key", "routing_keys",
                 "redelivered", "seq", "expires_at")

    def __init__(self, body: bytes, properties: dict[str, Any], headers_raw: bytes, exchange: str,
                 routing_key: str, routing_keys: list[str]) -> None:
        self.body = body
        self.properties = properties
        self.headers_raw = headers_raw
        self.exchange = exchange
        self.routing_key = routing_key
        #: The routing key and CC keys: where dead-lettering routes it by default.
        self.routing_keys = routing_keys
        self.redelivered = False
        self.seq = 0
        self.expires_at: float | None = None

    def copy(self) -> _Envelope:
        return _Envelope(self.body, self.properties, self.headers_raw, self.exchange, self.routing_key,
                         self.routing_keys)

    @property
    def headers(self) -> dict[str, Any]:
        return _decode_table(self.headers_raw)


class _Binding:
    __slots__ = ("destination", "to_queue", "routing_key", "arguments", "pattern")

    def __init__(self, destination: str, to_queue: bool, routing_key: str, arguments: dict[str, Any]) -> None:
        self.destination = destination
        self.to_queue = to_queue
        self.routing_key = routing_key
        self.arguments = arguments
        self.pattern = _words(routing_key)

    def same(self, other: _Binding) -> bool:
        return (self.destination, self.to_queue, self.routing_key, self.arguments) == (
            other.destination, other.to_queue, other.routing_key, other.arguments)


class _Exchange:
    def __init__(self, name: str, type: str, durable: bool, auto_delete: bool, arguments: dict[str, Any]) -> None:
        self.name = name
        self.type = type
        self.durable = durable
        self.auto_delete = auto_delete
        self.arguments = arguments
        self.bindings: list[_Binding] = []

    def matches(self, binding: _Binding, keys: list[str], headers: dict[str, Any]) -> bool:
        if self.type == "fanout":
            return True
        if self.type == "direct":
            return binding.routing_key in keys
        if self.type == "topic":
            return any(_topic_match(binding.pattern, _words(key)) for key in keys)
        return _headers_match(binding.arguments, headers)


class _Delivery:
    """A message handed out in ack mode and not yet settled."""

    __slots__ = ("envelope", "queue", "consumer", "window", "session")

    def __init__(self, envelope: _Envelope, queue: _Queue, consumer: _Consumer | None, session: _Session) -> None:
        self.envelope = envelope
        self.queue = queue
        self.consumer = consumer
        #: The consumer's prefetch window it counts against (a qos starts a new one, as RabbitMQ does).
        self.window = consumer.window if consumer is not None else 0
        self.session = session


class _Queue:
    def __init__(self, broker: MemoryBroker, name: str, durable: bool, auto_delete: bool,
                 owner: _Session | None, arguments: dict[str, Any]) -> None:
        self.broker = broker
        self.name = name
        self.durable = durable
        self.auto_delete = auto_delete
        self.owner = owner
        self.arguments = arguments
        #: Ready messages: a heap of (-priority, publish order, envelope); requeued ones go back in place.
        self.ready: list[tuple[int, int, _Envelope]] = []
        self.ready_bytes = 0
        self.consumers: list[_Consumer] = []
        self.deleted = False
        self._next_consumer = 0
        self._draining = False
        self._expiry_due: float | None = None
        self._expiry_timer: gevent.Greenlet | None = None
        self._idle_timer: gevent.Greenlet | None = None
        self.max_priority = int(arguments.get("x-max-priority", 0))
        self.single_active = arguments.get("x-single-active-consumer") is True
        self.touch()

    def __len__(self) -> int:
        return len(self.ready)

    # -- ready messages ---------------------------------------------------------------------------
    def _push(self, envelope: _Envelope) -> None:
        priority = min(int(envelope.properties.get("priority") or 0), self.max_priority)
        heapq.heappush(self.ready, (-priority, envelope.seq, envelope))
        self.ready_bytes += len(envelope.body)

    def _pop_head(self) -> _Envelope:
        envelope = heapq.heappop(self.ready)[2]
        self.ready_bytes -= len(envelope.body)
        return envelope

    def enqueue(self, envelope: _Envelope) -> bool:
        """Take a routed message; False when ``x-overflow`` refuses it (the publisher gets a nack)."""
        limit = self.arguments.get("x-max-length")
        limit_bytes = self.arguments.get("x-max-length-bytes")
        overflow = self.arguments.get("x-overflow", "drop-head")
        if overflow != "drop-head" and (
                (limit is not None and len(self.ready) >= limit)
                or (limit_bytes is not None and self.ready_bytes + len(envelope.body) > limit_bytes)):
            if overflow == "reject-publish-dlx":
                self.broker._dead_letter(self, envelope, "maxlen")
            return False
        envelope.seq = next(self.broker._seq)
        ttls = [int(ttl) for ttl in (envelope.properties.get("expiration"), self.arguments.get("x-message-ttl"))
                if ttl is not None]
        envelope.expires_at = time.monotonic() + min(ttls) / 1000 if ttls else None
        self._push(envelope)
        while (limit is not None and len(self.ready) > limit) or (
                limit_bytes is not None and self.ready_bytes > limit_bytes and self.ready):
            self.broker._dead_letter(self, self._pop_head(), "maxlen")
        self.drain(fresh=envelope)
        return True

    def requeue(self, envelope: _Envelope) -> None:
        """Put a message back where it was (RabbitMQ keeps the original order), marked redelivered."""
        envelope.redelivered = True
        self._push(envelope)
        self.drain()

    def take(self, fresh: _Envelope | None = None) -> _Envelope | None:
        """The head message, dropping (dead-lettering) expired ones on the way.

        ``fresh`` is being enqueued right now: like RabbitMQ, hand it to a
        waiting consumer even when its TTL is 0.
        """
        now = time.monotonic()
        while self.ready:
            envelope = self._pop_head()
            if envelope.expires_at is not None and envelope.expires_at <= now and envelope is not fresh:
                self.broker._dead_letter(self, envelope, "expired")
                continue
            self._schedule_expiry()
            return envelope
        self._schedule_expiry()
        return None

    def purge(self) -> int:
        count = len(self.ready)
        self.ready.clear()
        self.ready_bytes = 0
        self._schedule_expiry()
        return count

    # -- expiry -----------------------------------------------------------------------------------
    def _schedule_expiry(self) -> None:
        """Time the head message's expiry; like RabbitMQ, only the head of the queue expires.

        A timer due no later than the head is kept (it finds nothing, or
        schedules the next): heads change with every delivery.
        """
        due = self.ready[0][2].expires_at if self.ready and not self.deleted else None
        if due is None or (self._expiry_timer is not None and self._expiry_due is not None
                           and self._expiry_due <= due):
            return
        if self._expiry_timer is not None:
            self._expiry_timer.kill(block=False)
        self._expiry_due = due
        self._expiry_timer = gevent.spawn_later(max(0.0, due - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._expiry_timer = None
        self._expiry_due = None
        now = time.monotonic()
        while self.ready and not self.deleted:
            expires_at = self.ready[0][2].expires_at
            if expires_at is None or expires_at > now:
                break
            self.broker._dead_letter(self, self._pop_head(), "expired")
        self._schedule_expiry()

    def touch(self) -> None:
        """The queue was used: restart its ``x-expires`` clock (which runs only without consumers)."""
        if self._idle_timer is not None:
            self._idle_timer.kill(block=False)
            self._idle_timer = None
        expires = self.arguments.get("x-expires")
        if expires is not None and not self.consumers and not self.deleted:
            self._idle_timer = gevent.spawn_later(expires / 1000, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None  # so that deleting the queue does not kill the greenlet running this
        self.broker._delete_queue(self)

    def stop_timers(self) -> None:
        for timer in (self._expiry_timer, self._idle_timer):
            if timer is not None:
                timer.kill(block=False)
        self._expiry_timer = self._idle_timer = None
        self._expiry_due = None

    # -- consumers --------------------------------------------------------------------------------
    def pick_consumer(self) -> _Consumer | None:
        """Round-robin among the highest-priority consumers with room in their prefetch window."""
        consumers = self.consumers[:1] if self.single_active else self.consumers
        ready = [c for c in consumers if c.has_room()]
        if not ready:
            return None
        best = max(c.priority for c in ready)
        count = len(consumers)
        for step in range(count):
            index = (self._next_consumer + step) % count
            candidate = consumers[index]
            if candidate.priority == best and candidate.has_room():
                self._next_consumer = index + 1
                return candidate
        return None

    def drain(self, fresh: _Envelope | None = None) -> None:
        """Deliver ready messages while a consumer has room (re-entrant calls fold into the running one)."""
        if self._draining:
            return
        self._draining = True
        try:
            while self.ready and not self.deleted:
                consumer = self.pick_consumer()
                if consumer is None:
                    break
                envelope = self.take(fresh)
                if envelope is None:
                    break
                consumer.session.conn._deliver_from_broker(consumer, self, envelope)
        finally:
            self._draining = False
        self._schedule_expiry()


class _Session:
    """One "open connection" of a MemoryConnection; dead after a close or a simulated loss."""

    def __init__(self, conn: MemoryConnection, broker: MemoryBroker) -> None:
        self.conn = conn
        self.broker = broker
        self.alive = True
        self.unacked: dict[int, _Delivery] = {}
        self.consumers: list[_Consumer] = []
        self.exclusive_queues: list[str] = []
        self.reply_token: str | None = None
        #: What the broker said about itself when this connection opened (Pool.health reads it).
        self.server_properties = dict(_SERVER_PROPERTIES)


class _Consumer(_BaseConsumer):
    """A consumer registered by a MemoryConnection; started again on each new session."""

    def __init__(self, promise: int, queue: str, callback: Callable[[int, Message], Any] | None,
                 prefetch_count: int, no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> None:
        super().__init__(promise, queue, callback, prefetch_count, no_ack, exclusive, arguments)
        priority = arguments.get("x-priority", 0)
        self.priority = priority if isinstance(priority, int) and not isinstance(priority, bool) else 0
        self.session: _Session
        self.tag = ""
        self.window = 0
        self.unacked = 0

    @property
    def broker_no_ack(self) -> bool:
        # A one-shot consumer acks itself when no_ack, so prefetch=1 holds back all but one message.
        return self.no_ack and self.callback is not None

    def has_room(self) -> bool:
        return self.broker_no_ack or self.prefetch_count == 0 or self.unacked < self.prefetch_count


class MemoryBroker:
    """One in-process "vhost": exchanges, queues, bindings and the sessions attached to it.

    Besides what connections do to it, tests can simulate what an operator
    or the network does: :meth:`disconnect` (connections are lost and
    recover), :meth:`block` / :meth:`unblock` (a resource alarm).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}
        self._sessions: list[_Session] = []
        self._reply_consumers: dict[str, _Consumer] = {}
        self._seq = itertools.count(1)
        self.blocked_reason: str | None = None
        self._predeclare()

    def __repr__(self) -> str:
        return f"<MemoryBroker {self.name!r} queues={len(self.queues)} exchanges={len(self.exchanges)}>"

    def _predeclare(self) -> None:
        for name, type in _PREDECLARED.items():
            self.exchanges[name] = _Exchange(name, type, True, False, {})

    # -- for tests ------------------------------------------------------------------------------
    def message_count(self, queue: str) -> int:
        """Ready messages in ``queue`` (0 when it does not exist)."""
        found = self.queues.get(queue)
        return len(found) if found is not None else 0

    def reset(self) -> None:
        """Delete every queue and exchange (consumers are cancelled) and lift any alarm."""
        for queue in list(self.queues.values()):
            self._delete_queue(queue)
        self.exchanges.clear()
        self._predeclare()
        self.unblock()

    def disconnect(self, reason: str = "closed by the memory broker",
                   connection: MemoryConnection | None = None) -> None:
        """Close every connection (or one) as a broker restart would (320 CONNECTION_FORCED).

        Waiters get ConnectionLost, unacked messages are requeued, exclusive
        queues go; connections then recover by themselves and resume their
        consumers, as PukaConnection does. ``connection`` closes only that
        one, as ``rabbitmqctl close_connection`` does.
        """
        for session in list(self._sessions):
            if connection is None or session.conn is connection:
                session.conn._session_lost(session, f"320 CONNECTION_FORCED - {reason}")

    def block(self, reason: str = "low on memory") -> None:
        """Raise a resource alarm: publishers wait (up to ``blocked_timeout``) until :meth:`unblock`."""
        self.blocked_reason = reason
        for session in list(self._sessions):
            session.conn._on_blocked(True, reason)

    def unblock(self) -> None:
        if self.blocked_reason is None:
            return
        self.blocked_reason = None
        for session in list(self._sessions):
            session.conn._on_blocked(False, None)

    # -- sessions ---------------------------------------------------------------------------------
    def attach(self, session: _Session) -> None:
        self._sessions.append(session)
        if self.blocked_reason is not None:
            session.conn._on_blocked(True, self.blocked_reason)

    def detach(self, session: _Session) -> None:
        """A connection closed: requeue what it had not settled, then drop its consumers and exclusive queues."""
        session.alive = False
        if session in self._sessions:
            self._sessions.remove(session)
        for consumer in list(session.consumers):
            self.cancel(consumer)
        deliveries = sorted(session.unacked.values(), key=lambda d: d.envelope.seq)
        session.unacked.clear()
        for delivery in deliveries:
            if not delivery.queue.deleted:
                delivery.queue.requeue(delivery.envelope)
        for name in list(session.exclusive_queues):
            queue = self.queues.get(name)
            if queue is not None and queue.owner is session:
                self._delete_queue(queue)

    # -- lookups ----------------------------------------------------------------------------------
    def _vhost(self, session: _Session) -> str:
        return session.conn.settings.vhost

    def _exchange(self, session: _Session, name: str) -> _Exchange:
        found = self.exchanges.get(name)
        if found is None:
            raise _not_found("exchange", name, self._vhost(session))
        return found

    def _queue(self, session: _Session, name: str) -> _Queue:
        """The queue called ``name``, if it exists and is not exclusive to another connection."""
        found = self.queues.get(name)
        if found is None:
            raise _not_found("queue", name, self._vhost(session))
        if found.owner is not None and found.owner is not session:
            raise self._locked(session, name)
        return found

    def _locked(self, session: _Session, name: str) -> AMQPError:
        return _error(405, f"RESOURCE_LOCKED - cannot obtain exclusive access to locked "
                           f"{_vhost_text('queue', name, self._vhost(session))}. It could be originally declared "
                           "on another connection or the exclusive property value does not match that of the "
                           "original declaration.")

    @staticmethod
    def _inequivalent(field: str, kind: str, name: str, vhost: str, received: Any, current: Any) -> AMQPError:
        def show(value: Any) -> str:
            if value is _MISSING:
                return "none"
            shown = str(value).lower() if isinstance(value, bool) else value
            return f"the value '{shown}' of type '{_amqp_type(value)}'"

        if field in ("type", "durable", "auto_delete"):
            received, current = (str(v).lower() if isinstance(v, bool) else v for v in (received, current))
            detail = f"received '{received}' but current is '{current}'"
        else:
            detail = f"received {show(received)} but current is {show(current)}"
        return _error(406, f"PRECONDITION_FAILED - inequivalent arg '{field}' for "
                           f"{_vhost_text(kind, name, vhost)}: {detail}")

    # -- exchanges --------------------------------------------------------------------------------
    def exchange_declare(self, session: _Session, name: str, type: str, durable: bool, auto_delete: bool,
                         arguments: dict[str, Any]) -> dict[str, Any]:
        vhost = self._vhost(session)
        if name == "":
            raise _default_exchange_refused()
        found = self.exchanges.get(name)
        if found is None:
            if name.startswith("amq."):
                raise _error(403, f"ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'")
            if type not in _EXCHANGE_TYPES:
                # RabbitMQ closes the whole connection for this (503 COMMAND_INVALID).
                raise _ConnectionFatal(f"503 COMMAND_INVALID - unknown exchange type '{type}'")
            self.exchanges[name] = _Exchange(name, type, durable, auto_delete, arguments)
            return {}
        for field, received, current in (("type", type, found.type), ("durable", durable, found.durable),
                                         ("auto_delete", auto_delete, found.auto_delete),
                                         ("alternate-exchange", arguments.get("alternate-exchange", _MISSING),
                                          found.arguments.get("alternate-exchange", _MISSING))):
            if received != current:
                raise self._inequivalent(field, "exchange", name, vhost, received, current)
        return {}

    def exchange_delete(self, session: _Session, name: str, if_unused: bool) -> dict[str, Any]:
        if name == "":
            raise _default_exchange_refused()
        found = self.exchanges.get(name)
        if found is None:
            return {}
        if if_unused and found.bindings:
            raise _error(406, f"PRECONDITION_FAILED - {_vhost_text('exchange', name, self._vhost(session))} in use")
        self._delete_exchange(found)
        return {}

    def _delete_exchange(self, exchange: _Exchange) -> None:
        self.exchanges.pop(exchange.name, None)
        exchange.bindings.clear()
        for source in list(self.exchanges.values()):
            self._remove_bindings(source, lambda b: not b.to_queue and b.destination == exchange.name)

    def _remove_bindings(self, source: _Exchange, predicate: Callable[[_Binding], bool]) -> None:
        before = len(source.bindings)
        source.bindings[:] = [b for b in source.bindings if not predicate(b)]
        if source.auto_delete and before and not source.bindings and source.name in self.exchanges:
            self._delete_exchange(source)

    def bind(self, session: _Session, destination: str, to_queue: bool, source: str, routing_key: str,
             arguments: dict[str, Any]) -> dict[str, Any]:
        if source == "" or (destination == "" and not to_queue):
            raise _default_exchange_refused()
        if to_queue:
            self._queue(session, destination)
        else:
            self._exchange(session, destination)
        exchange = self._exchange(session, source)
        if exchange.type == "headers" and "x-match" in arguments and arguments["x-match"] not in _X_MATCH:
            value = arguments["x-match"]
            raise _error(406, f"PRECONDITION_FAILED - Invalid x-match field value <<\"{value}\">>; "
                              "expected all, any, all-with-x, or any-with-x")
        binding = _Binding(destination, to_queue, routing_key, arguments)
        if not any(binding.same(b) for b in exchange.bindings):
            exchange.bindings.append(binding)
        return {}

    def unbind(self, session: _Session, destination: str, to_queue: bool, source: str, routing_key: str,
               arguments: dict[str, Any]) -> dict[str, Any]:
        if source == "" or (destination == "" and not to_queue):
            raise _default_exchange_refused()
        if to_queue and destination in self.queues:
            self._queue(session, destination)  # exclusive check
        exchange = self.exchanges.get(source)
        if exchange is not None:
            binding = _Binding(destination, to_queue, routing_key, arguments)
            self._remove_bindings(exchange, binding.same)
        return {}

    # -- queues -----------------------------------------------------------------------------------
    def queue_declare(self, session: _Session, name: str, durable: bool, exclusive: bool, auto_delete: bool,
                      passive: bool, arguments: dict[str, Any]) -> dict[str, Any]:
        vhost = self._vhost(session)
        if passive:
            queue = self._queue(session, name)
            queue.touch()
            return {"queue": name, "message_count": len(queue), "consumer_count": len(queue.consumers)}
        if name == "":
            name = "amq.gen-" + base64.urlsafe_b64encode(os.urandom(16)).decode("ascii").rstrip("=")
        elif name.startswith("amq."):
            raise _error(403, f"ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'")
        found = self.queues.get(name)
        if found is not None:
            if found.owner is not (session if exclusive else None):
                raise self._locked(session, name)
            for field, received, current in (("durable", durable, found.durable),
                                             ("auto_delete", auto_delete, found.auto_delete)):
                if received != current:
                    raise self._inequivalent(field, "queue", name, vhost, received, current)
            for key in _EQUIVALENT_QUEUE_ARGS:
                received, current = arguments.get(key, _MISSING), found.arguments.get(key, _MISSING)
                if received != current and not (key == "x-queue-type" and {received, current} <= {_MISSING,
                                                                                                  "classic"}):
                    raise self._inequivalent(key, "queue", name, vhost, received, current)
            found.touch()
            return {"queue": name, "message_count": len(found), "consumer_count": len(found.consumers)}
        self._check_queue_arguments(name, vhost, arguments)
        queue = self.queues[name] = _Queue(self, name, durable, auto_delete, session if exclusive else None,
                                           arguments)
        if exclusive:
            session.exclusive_queues.append(name)
        return {"queue": name, "message_count": 0, "consumer_count": 0}

    @staticmethod
    def _check_queue_arguments(name: str, vhost: str, arguments: dict[str, Any]) -> None:
        def invalid(key: str, why: str) -> AMQPError:
            return _error(406, f"PRECONDITION_FAILED - invalid arg '{key}' for "
                               f"{_vhost_text('queue', name, vhost)}: {why}")

        for key, low in (("x-expires", 1), ("x-message-ttl", 0), ("x-max-length", 0),
                         ("x-max-length-bytes", 0), ("x-max-priority", 0)):
            if key in arguments:
                value = arguments[key]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise invalid(key, f"{{unacceptable_type,{_amqp_type(value)}}}")
                if value < low:
                    raise invalid(key, f"{{value_{'zero' if value == 0 else 'negative'},{value}}}")
                if key == "x-max-priority" and value > 255:
                    raise invalid(key, f"{{value_too_large,{value},255}}")
        for key in ("x-dead-letter-exchange", "x-dead-letter-routing-key"):
            if key in arguments and not isinstance(arguments[key], str):
                raise invalid(key, f"{{unacceptable_type,{_amqp_type(arguments[key])}}}")
        if "x-dead-letter-routing-key" in arguments and "x-dead-letter-exchange" not in arguments:
            raise invalid("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined")
        if arguments.get("x-overflow", "drop-head") not in _OVERFLOW:
            raise invalid("x-overflow", f"{{unacceptable_value,{arguments['x-overflow']}}}")
        if arguments.get("x-queue-type", "classic") not in ("classic", "quorum"):
            # Streams consume nothing like queues do; better to fail than to pretend.
            raise invalid("x-queue-type", "the memory transport has classic and quorum queues only")

    def queue_delete(self, session: _Session, name: str, if_unused: bool, if_empty: bool) -> dict[str, Any]:
        found = self.queues.get(name)
        if found is None:
            return {"message_count": 0}
        if found.owner is not None and found.owner is not session:
            raise self._locked(session, name)
        where = _vhost_text("queue", name, self._vhost(session))
        if if_unused and found.consumers:
            raise _error(406, f"PRECONDITION_FAILED - {where} in use")
        if if_empty and len(found):
            raise _error(406, f"PRECONDITION_FAILED - {where} not empty")
        return {"message_count": self._delete_queue(found)}

    def _delete_queue(self, queue: _Queue) -> int:
        """Delete a queue: its messages are dropped (not dead-lettered) and its consumers cancelled."""
        if queue.deleted:
            return 0
        queue.deleted = True
        queue.stop_timers()
        self.queues.pop(queue.name, None)
        count = len(queue)
        queue.ready.clear()
        for exchange in list(self.exchanges.values()):
            self._remove_bindings(exchange, lambda b: b.to_queue and b.destination == queue.name)
        if queue.owner is not None and queue.name in queue.owner.exclusive_queues:
            queue.owner.exclusive_queues.remove(queue.name)
        for consumer in list(queue.consumers):
            self._detach_consumer(consumer, queue)
            consumer.session.conn._cancelled_by_broker(consumer)
        return count

    def queue_purge(self, session: _Session, name: str) -> dict[str, Any]:
        return {"message_count": self._queue(session, name).purge()}

    # -- consuming --------------------------------------------------------------------------------
    def consume(self, session: _Session, consumer: _Consumer) -> None:
        if consumer.queue == _REPLY_TO:
            if not consumer.broker_no_ack:
                raise _error(406, "PRECONDITION_FAILED - reply consumer cannot acknowledge")
            token = base64.urlsafe_b64encode(os.urandom(12)).decode("ascii")
            session.reply_token = token
            self._reply_consumers[token] = consumer
            session.consumers.append(consumer)
            return
        queue = self._queue(session, consumer.queue)
        if queue.consumers and (consumer.exclusive or any(c.exclusive for c in queue.consumers)):
            raise _error(403, f"ACCESS_REFUSED - {_vhost_text('queue', queue.name, self._vhost(session))} "
                              "in exclusive use")
        queue.consumers.append(consumer)
        session.consumers.append(consumer)
        queue.touch()
        queue.drain()

    def cancel(self, consumer: _Consumer) -> None:
        session = consumer.session
        if consumer in session.consumers:
            session.consumers.remove(consumer)
        if consumer.queue == _REPLY_TO:
            for token, found in list(self._reply_consumers.items()):
                if found is consumer:
                    del self._reply_consumers[token]
                    if session.reply_token == token:
                        session.reply_token = None
            return
        queue = self.queues.get(consumer.queue)
        if queue is not None and consumer in queue.consumers:
            self._detach_consumer(consumer, queue)
            if queue.auto_delete and not queue.consumers:
                self._delete_queue(queue)
            else:
                queue.touch()

    def resubscribe(self, consumer: _Consumer) -> None:
        """The consumer subscribes again (qos): a new, empty prefetch window, at the end of the line."""
        consumer.window += 1
        consumer.unacked = 0
        queue = self.queues.get(consumer.queue)
        if queue is not None and consumer in queue.consumers:
            self._detach_consumer(consumer, queue)
            queue.consumers.append(consumer)
            queue.drain()

    @staticmethod
    def _detach_consumer(consumer: _Consumer, queue: _Queue) -> None:
        index = queue.consumers.index(consumer)
        del queue.consumers[index]
        if index < queue._next_consumer:
            queue._next_consumer -= 1

    def get(self, session: _Session, name: str, no_ack: bool) -> tuple[_Envelope, _Delivery | None, int] | None:
        queue = self._queue(session, name)
        queue.touch()
        envelope = queue.take()
        if envelope is None:
            return None
        delivery = None
        if not no_ack:
            delivery = _Delivery(envelope, queue, None, session)
            session.unacked[id(delivery)] = delivery
        return envelope, delivery, len(queue)

    def track(self, session: _Session, queue: _Queue, consumer: _Consumer, envelope: _Envelope) -> _Delivery:
        """Record a delivery to a consumer in ack mode, against its prefetch window."""
        delivery = _Delivery(envelope, queue, consumer, session)
        session.unacked[id(delivery)] = delivery
        consumer.unacked += 1
        return delivery

    def settle(self, delivery: _Delivery, action: str, requeue: bool) -> None:
        delivery.session.unacked.pop(id(delivery), None)
        consumer = delivery.consumer
        if consumer is not None and delivery.window == consumer.window:
            consumer.unacked -= 1
        queue = delivery.queue
        if not queue.deleted:
            if action != "ack":
                if requeue:
                    queue.requeue(delivery.envelope)
                else:
                    self._dead_letter(queue, delivery.envelope, "rejected")
            queue.drain()

    # -- publishing -------------------------------------------------------------------------------
    def publish(self, session: _Session, exchange: str, routing_key: str, body: bytes, properties: dict[str, Any],
                mandatory: bool, on_reply_channel: bool = False) -> AMQPError | None:
        """Route one message; the error its publisher gets (NotFound, Unroutable, PublishNacked...) or None.

        ``on_reply_channel``: published where the connection consumes direct
        replies (only ``call`` does that), so ``reply_to`` may be
        ``amq.rabbitmq.reply-to``; PukaConnection publishes everything else on
        another channel, where RabbitMQ refuses it.
        """
        properties = dict(properties)
        source = self.exchanges.get(exchange)
        if source is None:
            return _not_found("exchange", exchange, self._vhost(session))
        user_id = properties.get("user_id")
        if user_id is not None and user_id != session.conn.settings.user:
            return _error(406, f"PRECONDITION_FAILED - user_id property set to '{user_id}' but authenticated "
                               f"user was '{session.conn.settings.user}'")
        if properties.get("reply_to") == _REPLY_TO:
            if session.reply_token is None or not on_reply_channel:
                return _error(406, "PRECONDITION_FAILED - fast reply consumer does not exist")
            properties = {**properties, "reply_to": f"{_REPLY_TO}.{session.reply_token}"}
        headers_raw = properties.pop("headers", b"")
        headers = _decode_table(headers_raw) if headers_raw else {}
        # Sender-selected distribution: CC and BCC headers add routing keys; BCC is removed from the message.
        cc, bcc = ([key for key in extra if isinstance(key, str)] if isinstance(extra, list) else []
                   for extra in (headers.get("CC"), headers.get("BCC")))
        if "BCC" in headers:
            del headers["BCC"]
            headers_raw = _puka.encode_table(headers, "headers")
        keys = [routing_key, *cc, *bcc]
        envelope = _Envelope(body, properties, headers_raw, exchange, routing_key, [routing_key, *cc])
        if exchange == "" and routing_key.startswith(_REPLY_TO + "."):
            consumer = self._reply_consumers.get(routing_key[len(_REPLY_TO) + 1:])
            if consumer is not None:
                consumer.session.conn._deliver_from_broker(consumer, None, envelope)
                return None
            return Unroutable("NO_ROUTE", exchange, routing_key) if mandatory else None
        queues = self._route(source, keys, headers)
        if not queues:
            return Unroutable("NO_ROUTE", exchange, routing_key) if mandatory else None
        refused = False
        for queue in queues:
            refused = not queue.enqueue(envelope.copy()) or refused
        return PublishNacked("the broker nacked the message (basic.nack)") if refused else None

    def _route(self, source: _Exchange, keys: list[str], headers: dict[str, Any]) -> list[_Queue]:
        """The queues a message reaches: bindings, exchange-to-exchange bindings, alternate exchanges."""
        found: dict[str, _Queue] = {}
        seen: set[str] = set()

        def visit(exchange: _Exchange) -> None:
            if exchange.name in seen:
                return
            seen.add(exchange.name)
            if exchange.name == "":
                for key in keys:
                    queue = self.queues.get(key)
                    if queue is not None:
                        found.setdefault(key, queue)
                return
            matched = [b for b in exchange.bindings if exchange.matches(b, keys, headers)]
            alternate = exchange.arguments.get("alternate-exchange")
            if not matched and isinstance(alternate, str) and alternate in self.exchanges:
                visit(self.exchanges[alternate])
            for binding in matched:
                if binding.to_queue:
                    queue = self.queues.get(binding.destination)
                    if queue is not None:
                        found.setdefault(queue.name, queue)
                elif binding.destination in self.exchanges:
                    visit(self.exchanges[binding.destination])

        visit(source)
        return list(found.values())

    def _dead_letter(self, queue: _Queue, envelope: _Envelope, reason: str) -> None:
        """Republish a rejected, expired or overflowing message to the queue's dead-letter exchange.

        As RabbitMQ 3.10: an ``x-death`` entry per (queue, reason) with a
        count, ``x-first-death-*`` headers, the expiration property moved to
        ``original-expiration``; a message that would die in a cycle of
        queues without any rejection on the way is dropped.
        """
        target = queue.arguments.get("x-dead-letter-exchange")
        exchange = self.exchanges.get(target) if isinstance(target, str) else None
        if exchange is None:
            return
        routing_key = queue.arguments.get("x-dead-letter-routing-key")
        keys = [routing_key] if isinstance(routing_key, str) else list(envelope.routing_keys)
        properties = dict(envelope.properties)
        expiration = properties.pop("expiration", None)
        headers = envelope.headers
        info: dict[str, Any] = {"reason": reason, "queue": queue.name, "time": _now_timestamp(),
                                "exchange": envelope.exchange, "routing-keys": list(envelope.routing_keys)}
        if expiration is not None:
            info["original-expiration"] = expiration
        deaths = headers.get("x-death")
        if not isinstance(deaths, list):
            headers["x-death"] = [{"count": 1, **info}]
            headers["x-first-death-exchange"] = envelope.exchange
            headers["x-first-death-queue"] = queue.name
            headers["x-first-death-reason"] = reason
        else:
            same = [d for d in deaths if isinstance(d, dict) and d.get("queue") == queue.name
                    and d.get("reason") == reason]
            others = [d for d in deaths if not any(d is s for s in same)]
            entry = {**same[0], "count": int(same[0].get("count", 0)) + 1} if same else {"count": 1, **info}
            headers["x-death"] = [dict(sorted(entry.items())), *others]
        dead = _Envelope(envelope.body, properties, _puka.encode_table(headers, "headers"), exchange.name,
                         keys[0], keys)
        for destination in self._route(exchange, keys, headers):
            if reason != "rejected" and self._is_cycle(destination.name, headers["x-death"]):
                log.debug("dropped a message dead-lettered in a cycle back to %r", destination.name)
                continue
            destination.enqueue(dead.copy())

    @staticmethod
    def _is_cycle(queue: str, deaths: list[Any]) -> bool:
        for index, death in enumerate(deaths):
            if isinstance(death, dict) and death.get("queue") == queue:
                return all(isinstance(d, dict) and d.get("reason") != "rejected" for d in deaths[:index + 1])
        return False


class _Missing:
    def __repr__(self) -> str:
        return "none"


_MISSING: Any = _Missing()


class _ConnectionFatal(Exception):
    """A broker error that closes the whole connection (503 and the like), not just one channel."""


# -- the connection --------------------------------------------------------------------------------

class MemoryConnection(BaseConnection[_Consumer]):
    """What a pool hands out for ``memory://`` URLs: PukaConnection's API on an in-process broker.

    Every method takes the same arguments, checks them the same way, and
    returns or raises what :class:`~flask_nucleon_amqp.connection.PukaConnection`
    would against RabbitMQ; ``stats``, signals and ``on_open`` hooks behave
    the same too.
    """

    _log = log

    def __init__(self, settings: PoolSettings, index: int = 0) -> None:
        super().__init__(settings, index)
        self._node = settings.nodes[0]
        self._session: _Session | None = None
        #: How many queued callbacks have "arrived" (see _dispatch) and may run.
        self._arrived = 0
        self._arrival: Any = None
        self._delivery_tags = itertools.count(1)
        #: Called with this connection after every (re)open, before consumers resume.
        self.on_open: list[Callable[[MemoryConnection], Any]] = []

    @property
    def broker(self) -> MemoryBroker:
        """The broker this connection talks to (the one ``memory://NAME`` names)."""
        return self._session.broker if self._session is not None else broker(self._node.host)

    @property
    def is_open(self) -> bool:
        return self._session is not None and self._session.alive

    @property
    def server_properties(self) -> dict[str, Any]:
        return self._live_session().server_properties

    # -- sessions -------------------------------------------------------------------------------
    def _live_session(self) -> _Session:
        session = self._session
        if session is not None and session.alive:
            return session
        return self._open()

    def _open(self) -> _Session:
        if self._closed:
            raise ConnectionError(f"{self!r} was closed", self._node.host, self._node.port)
        session = self._session = _Session(self, broker(self._node.host))
        session.broker.attach(session)
        log.info("connected to %s (%s pool)", self.settings.safe_url(), self.settings.name)
        self.stats["opened"] += 1
        _emit(signals.connection_opened, self, node=str(self._node))
        for hook in list(self.on_open):
            try:
                hook(self)
            except Exception:  # noqa: BLE001 - consumers still resume; a missing queue shows as their error
                log.exception("on_open hook %r failed on %r", hook, self)
        for consumer in list(self._consumers.values()):
            if consumer.callback is not None and not consumer.cancelled and session.alive:
                try:
                    self._start_consumer(consumer, session)
                except AMQPError as exc:
                    log.error("consumer on %r stopped: %s", consumer.queue, exc)
                    self._consumers.pop(consumer.promise, None)
        return session

    def _session_lost(self, session: _Session, reason: str) -> None:
        """The broker closed the connection: fail waiters, requeue, then recover in the background."""
        if not session.alive:
            return
        waiting = [c for c in session.consumers if c.callback is None]
        session.broker.detach(session)
        if self._session is session:
            self._session = None
        if self.blocked_reason is not None:  # an alarm belongs to the connection that got it
            self._on_blocked(False, None)
        self.stats["lost"] += 1
        error = ConnectionLost(f"connection to {self.settings.safe_url()} lost: {reason}", self._node.host,
                               self._node.port)
        for consumer in waiting:
            if not consumer.box.ready():
                consumer.box.set(error)
        if self._closed:
            return
        log.warning("connection to %s lost: %s", self.settings.safe_url(), reason)
        _emit(signals.connection_lost, self, node=str(self._node), reason=reason)
        if self._recovery is None or self._recovery.dead:
            self._recovery = gevent.spawn(self._recover)

    def _recover(self) -> None:
        if self._closed or self.is_open:
            return
        self._open()
        self.stats["recovered"] += 1
        log.info("recovered connection to %s", self.settings.safe_url())
        _emit(signals.connection_recovered, self, node=str(self._node))

    def _on_blocked(self, blocked: bool, reason: Any) -> None:
        if blocked:
            self._set_blocked(reason)
        elif self.blocked_reason is not None:
            self._set_unblocked()

    # -- calling the broker ---------------------------------------------------------------------------
    @staticmethod
    def _round_trip() -> None:
        """Yield once, as waiting for a real broker's answer would."""
        gevent.sleep(0)

    def _run(self, session: _Session, operation: Callable[[], Any]) -> Any:
        """Run a broker operation; an error that closes connections closes this one."""
        try:
            return operation()
        except _ConnectionFatal as exc:
            self._session_lost(session, str(exc))
            raise ConnectionLost(f"connection to {self.settings.safe_url()} lost: {exc}", self._node.host,
                                 self._node.port) from None

    def _call(self, operation: Callable[[_Session], Any], callback: Callback | None) -> Any:
        session = self._live_session()
        if callback is None:
            result = self._run(session, lambda: operation(session))
            self._round_trip()
            return result
        promise = next(_promise_ids)
        try:
            value = self._run(session, lambda: operation(session))
        except AMQPError as exc:
            value = exc
        self._dispatch(callback, promise, value)
        return promise

    # -- callbacks ----------------------------------------------------------------------------------
    def _dispatch(self, function: Callable[..., Any], *args: Any) -> None:
        """Run a user callback in this connection's callback greenlet, in order.

        Like a frame from a real broker, it arrives one turn of the hub's loop
        later, not in the greenlet that caused it: a message requeued by one
        greenlet is redelivered after that greenlet went on (and, if it ends,
        after gevent has noticed). Without this, races that the network
        hides in production would strike every time here.
        """
        self._dispatch_queue.append((function, args))
        self._idle.clear()
        if self._arrival is None:
            self._arrival = gevent.get_hub().loop.timer(0.0)
        if not self._arrival.active:
            self._arrival.start(self._arrive)

    def _arrive(self) -> None:
        """Runs in the hub: what was queued so far may now run."""
        self._arrived = len(self._dispatch_queue)
        if self._dispatcher is None:
            self._dispatcher = gevent.spawn(self._dispatch_loop)
        else:
            self._dispatch_wake.set()

    def _dispatch_loop(self) -> None:
        queue, wake = self._dispatch_queue, self._dispatch_wake
        while True:
            # One batch per arrival: what callbacks queue meanwhile waits for the next turn of the loop.
            while self._arrived > 0 and queue:
                self._arrived -= 1
                function, args = queue.popleft()
                self._callback_running = True
                try:
                    function(*args)
                except Exception:  # noqa: BLE001 - a failing callback must not stop the others
                    log.exception("AMQP callback %r raised", function)
                finally:
                    self._callback_running = False
            wake.clear()
            if not queue:
                self._idle.set()
            wake.wait()

    def _wait_idle(self, deadline: float) -> None:
        if gevent.getcurrent() is self._dispatcher:
            return
        while not self._idle.is_set() and self._idle.wait(max(0.0, deadline - time.monotonic())):
            pass

    # -- publishing ---------------------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
                headers: dict[str, Any] | None = None, mandatory: bool = False, json: Any = _NOTHING,
                persistent: bool = False, content_type: str | None = None, content_encoding: str | None = None,
                delivery_mode: int | None = None, priority: int | None = None, correlation_id: str | None = None,
                reply_to: str | None = None, expiration: int | str | None = None, message_id: str | None = None,
                timestamp: int | datetime.datetime | None = None, type: str | None = None,
                app_id: str | None = None, user_id: str | None = None,
                callback: Callback | None = None, timeout: float | None = None, retry: int = 0) -> Any:
        """Publish a message; synchronously, return once the broker took it (see PukaConnection.publish).

        :raises Unroutable: ``mandatory`` and no queue took the message.
        :raises NotFound: the exchange does not exist.
        :raises PublishNacked: a queue with ``x-overflow: reject-publish`` is full.
        :raises ConnectionBlocked: the broker blocked publishing for longer than ``blocked_timeout``.
        """
        properties: dict[str, Any] = {}
        data = encode_body(body, json, properties)
        if headers:
            if not isinstance(headers, dict):
                raise TypeError(f"headers must be a dict, got {headers.__class__.__name__}")
            properties["headers"] = headers
        if persistent:
            delivery_mode = 2
        properties.update(_properties(
            content_type=content_type, content_encoding=content_encoding, delivery_mode=delivery_mode,
            priority=priority, correlation_id=correlation_id, reply_to=reply_to, expiration=expiration,
            message_id=message_id, timestamp=timestamp, type=type, app_id=app_id, user_id=user_id))
        _puka.shortstr(exchange, "exchange")
        _puka.shortstr(routing_key, "routing_key")
        if "headers" in properties:  # what RabbitMQ's frame_max refuses (issue 16)
            _puka.content_header(properties, len(data))
        wire = self._wire_properties(properties)
        context = {"exchange": exchange, "routing_key": routing_key}
        session = self._live_session()
        if self.blocked_reason is not None:
            self._wait_unblocked()
        started = time.monotonic()
        self._published(context, data, properties)
        error = self._run(session, lambda: session.broker.publish(session, exchange, routing_key, data, wire,
                                                                  mandatory))
        outcome = self._publish_outcome(error, context, started)
        if callback is not None:
            promise = next(_promise_ids)
            self._dispatch(callback, promise, outcome)
            return promise
        self._round_trip()
        if isinstance(outcome, BaseException):
            raise outcome
        return None

    basic_publish = publish

    @staticmethod
    def _wire_properties(properties: dict[str, Any]) -> dict[str, Any]:
        """Properties as a consumer receives them from RabbitMQ (strings decoded, headers encoded)."""
        wire: dict[str, Any] = {}
        for name, value in properties.items():
            if name == "headers":
                wire[name] = _puka.encode_table(value, "headers")  # raises naming the header (as D7, D8)
            elif isinstance(value, (str, bytes)):
                wire[name] = _puka._lenient_as_str(_puka.shortstr(value, name))
            else:
                wire[name] = value
        return wire

    def _publish_outcome(self, error: AMQPError | None, context: dict[str, str], started: float) -> Any:
        """Count and signal one publish's outcome: ``{}`` when confirmed, else the exception."""
        if error is not None:
            self.stats["failed"] += 1
            if isinstance(error, Unroutable):
                _emit(signals.message_returned, self, error=error, **context)
            return error
        self.stats["confirmed"] += 1
        if signals.message_confirmed.receivers:
            _emit(signals.message_confirmed, self, seconds=max(time.monotonic() - started, 1e-9), **context)
        return {}

    # -- receiving ----------------------------------------------------------------------------------
    def consume(self, queue: str, callback: Callable[[int, Message], Any] | None = None, *,
                prefetch_count: int = 100, no_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Consume from ``queue`` (see PukaConnection.consume).

        Without a callback, wait for the first message and return it (None
        when ``timeout`` passes first). With a callback, register a consumer
        and return its promise. Every consumer needs a :meth:`cancel`.
        """
        _puka.shortstr(queue, "queue")
        _check_prefetch(prefetch_count)
        arguments = _wire(dict(arguments or {}), "arguments")
        if callback is None:
            return self._consume_one(queue, no_ack, exclusive, arguments, timeout)
        consumer = _Consumer(next(_promise_ids), queue, callback, prefetch_count, no_ack, exclusive, arguments)
        session = self._live_session()
        self._consumers[consumer.promise] = consumer
        try:
            self._run(session, lambda: self._start_consumer(consumer, session))
        except BaseException:
            self._consumers.pop(consumer.promise, None)
            raise
        self._round_trip()
        return consumer.promise

    basic_consume = consume

    def _start_consumer(self, consumer: _Consumer, session: _Session) -> None:
        consumer.session = session
        consumer.tag = f"{next(_promise_ids)}.0."
        consumer.window += 1
        consumer.unacked = 0
        session.broker.consume(session, consumer)

    def _deliver_from_broker(self, consumer: _Consumer, queue: _Queue | None, envelope: _Envelope) -> None:
        """Called by the broker for each message it hands to a consumer of this connection."""
        session = consumer.session
        delivery = None
        if queue is not None and not consumer.broker_no_ack:
            delivery = session.broker.track(session, queue, consumer, envelope)
        message = self._message(envelope, consumer.tag, (session, delivery, consumer.broker_no_ack))
        if consumer.callback is None:  # the one-shot consumer of a synchronous consume
            # It takes one message: cancelled before any ack opens its prefetch window.
            consumer.cancelled = True
            session.broker.cancel(consumer)
            if consumer.no_ack:
                self._settle(message, "ack", False, quiet=True)
                message.settled = True
            self._received(message)
            consumer.box.set(message)
            return
        self._received(message)
        self._dispatch(self._deliver, consumer, message)

    def _cancelled_by_broker(self, consumer: _Consumer) -> None:
        """The queue was deleted: the broker cancelled the consumer (basic.cancel)."""
        if not consumer.cancelled:
            log.warning("broker cancelled the consumer on queue %r (deleted?)", consumer.queue)
            consumer.cancelled = True
            self._consumers.pop(consumer.promise, None)
            _emit(signals.consumer_cancelled, self, promise=consumer.promise, queue=consumer.queue)
        if consumer in consumer.session.consumers:
            consumer.session.consumers.remove(consumer)

    def _message(self, envelope: _Envelope, consumer_tag: str | None, context: Any,
                 message_count: int | None = None) -> Message:
        fields: dict[str, Any] = {
            "body": envelope.body,
            "headers": envelope.headers,
            "exchange": envelope.exchange,
            "routing_key": envelope.routing_key,
            "redelivered": envelope.redelivered,
            "delivery_tag": next(self._delivery_tags),
            "consumer_tag": consumer_tag,
        }
        if message_count is not None:
            fields["message_count"] = message_count
        fields.update(envelope.properties)
        return Message(fields, self, context)

    def _consume_one(self, queue: str, no_ack: bool, exclusive: bool, arguments: dict[str, Any],
                     timeout: float | None) -> Message | None:
        consumer = _Consumer(next(_promise_ids), queue, None, 1, no_ack, exclusive, arguments)
        session = self._live_session()
        self._run(session, lambda: self._start_consumer(consumer, session))
        try:
            self._round_trip()
            message = consumer.box.wait(timeout)
            if isinstance(message, BaseException):
                raise message
            if isinstance(message, Message):
                return message
            if not session.alive:
                raise ConnectionLost(f"connection lost while consuming from {queue!r}", self._node.host,
                                     self._node.port)
            return None
        finally:
            if not consumer.cancelled:
                consumer.cancelled = True
                if session.alive:
                    session.broker.cancel(consumer)

    def get(self, queue: str, *, no_ack: bool = False, timeout: float | None = None) -> Message | None:
        """Fetch one message (basic.get); None when the queue is empty."""
        _puka.shortstr(queue, "queue")
        session = self._live_session()
        got = self._run(session, lambda: session.broker.get(session, queue, no_ack))
        self._round_trip()
        if got is None:
            return None
        envelope, delivery, remaining = got
        message = self._message(envelope, None, (session, delivery, no_ack), remaining)
        self._received(message)
        return message

    basic_get = get

    def _send_settle(self, message: Message, action: str, requeue: bool) -> None:
        """Settle a message with the broker it came from (for a message consumed with no_ack, refuse)."""
        session: _Session = message._context[0]
        delivery: _Delivery | None = message._context[1]
        if message._context[2]:
            raise MessageStateError("this message was consumed with no_ack=True; there is nothing to settle")
        if not session.alive or self._session is not session:
            raise self._settle_refused(message, action)
        if delivery is not None:
            session.broker.settle(delivery, action, requeue)

    def cancel(self, promise: int, timeout: float | None = None) -> None:
        """Stop a consumer started with ``consume(queue, callback)``.

        Deliveries not yet handed to the callback are requeued; messages the
        callback already has can still be acked.
        """
        consumer = self._consumers.pop(promise, None)
        if consumer is None:
            raise ValueError(f"no consumer with promise {promise!r} on {self!r}")
        consumer.cancelled = True
        session = consumer.session
        if session.alive and session is self._session:
            session.broker.cancel(consumer)
            self._round_trip()

    basic_cancel = cancel

    def qos(self, promise: int, prefetch_count: int, timeout: float | None = None) -> None:
        """Change how many unacked messages a consumer may hold.

        As PukaConnection does on RabbitMQ, the consumer is subscribed again
        with the new limit (before the old subscription ends, so an
        auto-delete queue stays): messages it holds stay valid, and the new
        window starts empty.
        """
        _check_prefetch(prefetch_count)
        consumer = self._consumers.get(promise)
        if consumer is None:
            raise ValueError(f"no consumer with promise {promise!r} on {self!r}")
        session = self._live_session()
        consumer.prefetch_count = prefetch_count
        if consumer.session is session:
            session.broker.resubscribe(consumer)
            consumer.tag = f"{next(_promise_ids)}.0."
        else:
            self._run(session, lambda: self._start_consumer(consumer, session))
        self._round_trip()

    # -- topology -------------------------------------------------------------------------------
    def exchange_declare(self, exchange: str, type: str = "direct", *, durable: bool = False,
                         auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                         callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare an exchange (idempotent; PreconditionFailed if it exists with other settings)."""
        if type not in _EXCHANGE_TYPES and not (isinstance(type, str) and type.startswith("x-")):
            raise ValueError(f"type must be one of direct, fanout, topic, headers or an x- plugin type, got {type!r}")
        _puka.shortstr(exchange, "exchange")
        args = _wire(_arguments(arguments), "arguments")
        return self._call(lambda s: s.broker.exchange_declare(s, exchange, type, durable, auto_delete, args),
                          callback)

    def exchange_delete(self, exchange: str, *, if_unused: bool = False,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        _puka.shortstr(exchange, "exchange")
        return self._call(lambda s: s.broker.exchange_delete(s, exchange, if_unused), callback)

    def exchange_bind(self, destination: str, source: str, routing_key: str = "", *,
                      arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        self._check_names(destination=destination, source=source, routing_key=routing_key)
        args = _wire(_arguments(arguments), "arguments")
        return self._call(lambda s: s.broker.bind(s, destination, False, source, routing_key, args), callback)

    def exchange_unbind(self, destination: str, source: str, routing_key: str = "", *,
                        arguments: dict[str, Any] | None = None,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        self._check_names(destination=destination, source=source, routing_key=routing_key)
        args = _wire(_arguments(arguments), "arguments")
        return self._call(lambda s: s.broker.unbind(s, destination, False, source, routing_key, args), callback)

    def queue_declare(self, queue: str = "", *, durable: bool = False, exclusive: bool = False,
                      auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare a queue; returns ``{'queue', 'message_count', 'consumer_count'}``."""
        _puka.shortstr(queue, "queue")
        args = _wire(_arguments(arguments), "arguments")
        return self._call(lambda s: s.broker.queue_declare(s, queue, durable, exclusive, auto_delete, passive,
                                                           args), callback)

    def queue_delete(self, queue: str, *, if_unused: bool = False, if_empty: bool = False,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        _puka.shortstr(queue, "queue")
        return self._call(lambda s: s.broker.queue_delete(s, queue, if_unused, if_empty), callback)

    def queue_purge(self, queue: str, *, callback: Callback | None = None, timeout: float | None = None) -> Any:
        _puka.shortstr(queue, "queue")
        return self._call(lambda s: s.broker.queue_purge(s, queue), callback)

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "", *,
                   arguments: dict[str, Any] | None = None,
                   callback: Callback | None = None, timeout: float | None = None) -> Any:
        self._check_names(queue=queue, exchange=exchange, routing_key=routing_key)
        args = _wire(_arguments(arguments), "arguments")
        return self._call(lambda s: s.broker.bind(s, queue, True, exchange, routing_key, args), callback)

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "", *,
                     arguments: dict[str, Any] | None = None,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        self._check_names(queue=queue, exchange=exchange, routing_key=routing_key)
        args = _wire(_arguments(arguments), "arguments")
        return self._call(lambda s: s.broker.unbind(s, queue, True, exchange, routing_key, args), callback)

    @staticmethod
    def _check_names(**names: str) -> None:
        for name, value in names.items():
            _puka.shortstr(value, name)

    # -- request / reply --------------------------------------------------------------------------
    def _send_request(self, reply_channel: int | None, exchange: str, routing_key: str, data: bytes,
                      properties: dict[str, Any]) -> None:
        """Publish a request as if on the reply channel; the broker's error (Unroutable...) is raised."""
        _puka.shortstr(exchange, "exchange")
        _puka.shortstr(routing_key, "routing_key")
        wire = self._wire_properties(properties)
        session = self._live_session()
        error = self._run(session, lambda: session.broker.publish(session, exchange, routing_key, data, wire,
                                                                  True, on_reply_channel=True))
        if error is not None:
            raise error

    def _reply_channel(self, timeout: float) -> None:
        """Start this connection's reply-to consumer on first use (and after a reconnect)."""
        consumer = self._reply_consumer
        session = self._live_session()
        if consumer is None or consumer.promise not in self._consumers or consumer.session is not session:
            promise = self.consume(_REPLY_TO, self._on_reply, no_ack=True, timeout=timeout)
            self._reply_consumer = self._consumers[promise]

    # -- closing --------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) for pending callbacks, cancel consumers, close.

        Unacked messages go back to their queues and exclusive queues are
        deleted, as when a real connection closes.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self._wait_idle(deadline)
        for promise in list(self._consumers):
            try:
                self.cancel(promise)
            except (AMQPError, ValueError) as exc:
                log.debug("cancel while closing failed: %s", exc)
        self._wait_idle(deadline)
        self._closed = True
        if self._recovery is not None:
            self._recovery.kill(block=False)
        session = self._session
        if session is not None and session.alive:
            session.broker.detach(session)
            self.stats["lost"] += 1
            log.info("closed connection to %s", self.settings.safe_url())
        self._session = None
        if self._arrival is not None:
            self._arrival.stop()
        if self._dispatcher is not None and self._dispatcher is not gevent.getcurrent():
            self._dispatcher.kill(block=False)
            self._dispatcher = None

    def forget(self) -> None:
        """Drop everything without signals or waiting: used in a child after fork (on its copy of the broker)."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            session.broker.detach(session)
        self._consumers.clear()
        self._dispatch_queue.clear()
        if self._arrival is not None:
            self._arrival.stop()

