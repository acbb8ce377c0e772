"""A queue of the in-process broker, and what the broker keeps per connection.

:class:`_Queue` holds ready messages in RabbitMQ's order (priority, then
publish order; a requeued message goes back in place), expires them (per
message or ``x-message-ttl``, only at the head, as RabbitMQ does), applies
``x-max-length``/``x-overflow``, deletes itself after ``x-expires`` idle, and
hands messages round-robin to the consumers with room in their prefetch
window. What it drops goes to the broker's dead-lettering
(``MemoryBroker._dead_letter``), which routes through exchanges.

A ``_MemorySession`` is one "open connection": its unsettled deliveries
(``_Delivery``), consumers and exclusive queues. The broker calls back into
the connection only through the small :class:`_Peer` protocol (deliveries,
broker cancels, forced closes, alarms).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import gevent

from ._connection_records import _BaseConsumer, _BaseSession
from ._memory_routing import _Envelope
from .config import Node, PoolSettings
from .message import Message

if TYPE_CHECKING:
    from ._memory_broker import MemoryBroker

#: What the broker says about itself when a connection opens.
_SERVER_PROPERTIES = {"product": "flask_nucleon_amqp memory broker", "version": "1", "platform": "Python/gevent",
                      "capabilities": {"publisher_confirms": True, "exchange_exchange_bindings": True,
                                       "basic.nack": True, "consumer_cancel_notify": True,
                                       "connection.blocked": True, "direct_reply_to": True}}


class _Peer(Protocol):
    """What the broker calls on the connection a session belongs to."""

    settings: PoolSettings

    def _deliver_from_broker(self, consumer: _MemoryConsumer, queue: _Queue | None, envelope: _Envelope) -> None:
        """Hand a routed message to one of the connection's consumers."""

    def _cancelled_by_broker(self, consumer: _MemoryConsumer) -> None:
        """The consumer's queue was deleted."""

    def _closed_by_broker(self, session: _MemorySession, reason: str) -> None:
        """The broker closed the connection (320 CONNECTION_FORCED and the like)."""

    def _on_blocked(self, blocked: bool, reason: Any) -> None:
        """A resource alarm was raised (True) or cleared."""


class _Delivery:
    """A message handed out in ack mode and not yet settled."""

    __slots__ = ("envelope", "queue", "consumer", "window", "session")

    def __init__(self, envelope: _Envelope, queue: _Queue, consumer: _MemoryConsumer | None,
                 session: _MemorySession) -> None:
        self.envelope = envelope
        self.queue = queue
        self.consumer = consumer
        #: The consumer's prefetch window it counts against (a qos starts a new one, as RabbitMQ does).
        self.window = consumer.window if consumer is not None else 0
        self.session = session


class _Queue:
    def __init__(self, broker: MemoryBroker, name: str, durable: bool, auto_delete: bool,
                 owner: _MemorySession | None, arguments: dict[str, Any]) -> None:
        self.broker = broker
        self.name = name
        self.durable = durable
        self.auto_delete = auto_delete
        self.owner = owner
        self.arguments = arguments
        #: Ready messages: a heap of (-priority, publish order, envelope); requeued ones go back in place.
        self.ready: list[tuple[int, int, _Envelope]] = []
        self.ready_bytes = 0
        self.consumers: list[_MemoryConsumer] = []
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
    def pick_consumer(self) -> _MemoryConsumer | None:
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


class _MemorySession(_BaseSession):
    """One "open connection" of a MemoryConnection; dead after a close or a simulated loss."""

    def __init__(self, conn: _Peer, broker: MemoryBroker, node: Node) -> None:
        self.conn = conn
        self.node = node
        self.broker = broker
        self.alive = True
        self.unacked: dict[int, _Delivery] = {}
        self.consumers: list[_MemoryConsumer] = []
        self.exclusive_queues: list[str] = []
        self.reply_token: str | None = None
        #: What the broker said about itself when this connection opened (Pool.health reads it).
        self.server_properties = dict(_SERVER_PROPERTIES)

    @property
    def usable(self) -> bool:
        return self.alive


class _MemoryConsumer(_BaseConsumer):
    """A consumer registered by a MemoryConnection; started again on each new session."""

    def __init__(self, promise: int, queue: str, callback: Callable[[int, Message], Any] | None,
                 prefetch_count: int, no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> None:
        super().__init__(promise, queue, callback, prefetch_count, no_ack, exclusive, arguments)
        priority = arguments.get("x-priority", 0)
        self.priority = priority if isinstance(priority, int) and not isinstance(priority, bool) else 0
        self.session: _MemorySession
        self.tag = ""
        self.window = 0
        self.unacked = 0

    @property
    def broker_no_ack(self) -> bool:
        # A one-shot consumer acks itself when no_ack, so prefetch=1 holds back all but one message.
        return self.no_ack and self.callback is not None

    def has_room(self) -> bool:
        return self.broker_no_ack or self.prefetch_count == 0 or self.unacked < self.prefetch_count


