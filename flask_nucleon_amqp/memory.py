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

A test can also do what a network or an operator does, through
:func:`broker` (``broker("NAME")`` is the broker ``memory://NAME`` names):
:meth:`MemoryBroker.disconnect` (a broker restart, or one connection cut),
:meth:`MemoryBroker.block` and ``unblock()`` (a resource alarm), and
:meth:`MemoryBroker.message_count`.

What it does not do: one vhost per name (the configured vhost is ignored); no
users or permissions (logins always succeed), no TLS, and no heartbeats or
timeouts other than ``call()``'s and ``blocked_timeout``; no persistence
(``durable`` and ``persistent`` are only compared or kept) and no clustering;
no plugins (an ``x-...`` exchange type closes the connection with 503, as on a
RabbitMQ without that plugin); classic queue semantics only
(``x-queue-type: quorum`` behaves as a classic queue, without
``x-delivery-limit``; streams are refused; tuning arguments such as
``x-queue-mode`` are accepted and ignored); no ``x-last-death-*`` headers
(RabbitMQ 3.13); no internal exchanges and no exchange arguments other than
``alternate-exchange``; flow control only through :meth:`MemoryBroker.block`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import gevent

from . import _puka
from ._base import BaseConnection
from ._connection_records import _promise_ids
from ._memory_broker import MemoryBroker, broker, find, reset
from ._memory_queue import _Delivery, _MemoryConsumer, _MemorySession, _Queue
from ._memory_routing import _ConnectionFatal, _Envelope, _wire
from ._publishing import _Publish
from ._request_reply import _REPLY_TO
from .config import PoolSettings
from .exceptions import AMQPError, ConnectionError, ConnectionLost, MessageStateError
from .message import Message
from .protocol import Callback, Connection, MessageHandler

__all__ = ["MemoryBroker", "MemoryConnection", "broker", "find", "reset"]

log = logging.getLogger(__name__)


# -- the connection --------------------------------------------------------------------------------

class MemoryConnection(BaseConnection[_MemoryConsumer, _MemorySession]):
    """What a pool hands out for ``memory://`` URLs: the :class:`~flask_nucleon_amqp.protocol.Connection`
    contract on an in-process broker.

    Every method takes the same arguments, checks them the same way (the
    shared :class:`~flask_nucleon_amqp._base.BaseConnection` does), and
    returns or raises what :class:`~flask_nucleon_amqp.connection.PukaConnection`
    would against RabbitMQ; ``stats``, signals, ``on_open`` hooks, ``retry=``
    and recovery (with the same back-off) behave the same too. Broker
    operations complete inside the call, so a ``timeout`` is checked but can
    never pass.
    """

    _log = log

    def __init__(self, settings: PoolSettings, index: int = 0) -> None:
        super().__init__(settings, index)
        self._node = settings.nodes[0]
        self._arrival: Any = None
        self._delivery_tags = itertools.count(1)

    @property
    def broker(self) -> MemoryBroker:
        """The broker this connection talks to (the one ``memory://NAME`` names)."""
        return self._session.broker if self._session is not None else broker(self._node.host)

    # -- sessions -------------------------------------------------------------------------------
    def _open(self) -> _MemorySession:
        if self._closed:
            raise ConnectionError(f"{self!r} was closed", self._node.host, self._node.port)
        session = self._session = _MemorySession(self, broker(self._node.host), self._node)
        session.broker.attach(session)
        self._opened(session)
        self._after_open(session)
        return session

    def _resume_consumer(self, consumer: _MemoryConsumer, session: _MemorySession) -> None:
        try:
            self._start_consumer(consumer, session)
        except AMQPError as exc:
            log.error("consumer on %r stopped: %s", consumer.queue, exc)
            self._consumers.pop(consumer.promise, None)

    def _closed_by_broker(self, session: _MemorySession, reason: str) -> None:
        """The broker closed the connection: fail waiters, requeue, then recover in the background."""
        if not session.alive:
            return
        waiting = [c for c in session.consumers if c.callback is None]
        session.broker.detach(session)
        recover = self._session_lost(session, reason)
        error = ConnectionLost(f"connection to {self.settings.safe_url()} lost: {reason}", self._node.host,
                               self._node.port)
        for consumer in waiting:
            if not consumer.box.ready():
                consumer.box.set(error)
        if recover:
            self._start_recovery()

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

    def _on_broker(self, session: _MemorySession, operation: Callable[[], Any]) -> Any:
        """Run a broker operation; an error that closes connections closes this one."""
        try:
            return operation()
        except _ConnectionFatal as exc:
            self._closed_by_broker(session, str(exc))
            raise ConnectionLost(f"connection to {self.settings.safe_url()} lost: {exc}", self._node.host,
                                 self._node.port) from None

    def _table(self, table: dict[str, Any]) -> dict[str, Any]:
        return _wire(table, "arguments")  # what RabbitMQ would see of it: encoded and decoded

    def _topology(self, method: str, names: dict[str, str], callback: Callback | None, timeout: float | None,
                  **options: Any) -> Any:
        result = super()._topology(method, names, callback, timeout, **options)
        if callback is None:
            self._round_trip()
        return result

    def _send_topology(self, method: str, names: dict[str, str], options: dict[str, Any],
                       done: Callable[[Any], None]) -> None:
        session = self._live_session()
        target = session.broker
        if method.endswith("bind"):  # exchange_bind, queue_unbind...: one broker method for both kinds
            to_queue = method.startswith("queue")
            destination, source = (names["queue"], names["exchange"]) if to_queue else (
                names["destination"], names["source"])
            operate = target.unbind if method.endswith("unbind") else target.bind
            operation = partial(operate, session, destination, to_queue, source, names["routing_key"],
                                options["arguments"])
        else:
            operation = partial(getattr(target, method), session, *names.values(), **options)
        try:
            value = self._on_broker(session, operation)
        except AMQPError as exc:
            value = exc
        done(value)

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
        """Runs in the hub: what was queued so far may now run (what callbacks queue meanwhile waits)."""
        self._arrived = len(self._dispatch_queue)
        self._wake_dispatcher()

    def _deliver_later(self, consumer: _MemoryConsumer, message: Message) -> None:
        """A delivery arrives a turn later, as from a real broker, in order with the callbacks."""
        self._dispatch(self._to_consumer, consumer, message)

    def _wait_idle(self, deadline: float) -> None:
        if self._in_callback():
            return
        while not self._idle.is_set() and self._idle.wait(max(0.0, deadline - time.monotonic())):
            pass

    # -- publishing ---------------------------------------------------------------------------------
    def _publish_and_wait(self, message: _Publish, timeout: float | None) -> None:
        outcome = self._publish_now(message)
        self._round_trip()
        if isinstance(outcome, BaseException):
            raise outcome

    def _send_publish(self, message: _Publish, callback: Callback, timeout: float | None) -> int:
        outcome = self._publish_now(message)
        promise = next(_promise_ids)
        self._dispatch(callback, promise, outcome)
        return promise

    def _publish_now(self, message: _Publish) -> Any:
        """Route one publish through the broker; its outcome (see _publish_outcome)."""
        wire = self._wire_properties(message.properties)
        exchange, routing_key = message.context["exchange"], message.context["routing_key"]
        session = self._live_session()
        if self.blocked_reason is not None:
            self._wait_unblocked()
            if not session.alive:  # lost while blocked: the message never left (retry= publishes it again)
                raise ConnectionLost(f"connection to {self.settings.safe_url()} lost before the publish was sent",
                                     self._node.host, self._node.port)
        started = time.monotonic()
        self._published(message.context, message.data, message.properties)
        error = self._on_broker(session, lambda: session.broker.publish(
            session, exchange, routing_key, message.data, wire, message.mandatory))
        return self._publish_outcome(error, message.context, started)

    @staticmethod
    def _wire_properties(properties: dict[str, Any]) -> dict[str, Any]:
        """Properties as a consumer receives them from RabbitMQ (strings decoded, headers encoded)."""
        wire: dict[str, Any] = {}
        for name, value in properties.items():
            if name == "headers":
                wire[name] = _puka.encode_table(value, "headers")  # raises naming the header (as D7, D8)
            elif isinstance(value, (str, bytes)):
                wire[name] = _puka.as_str(_puka.shortstr(value, name))
            else:
                wire[name] = value
        return wire

    # -- receiving ----------------------------------------------------------------------------------
    def _new_consumer(self, promise: int, queue: str, callback: MessageHandler | None, prefetch_count: int,
                      no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> _MemoryConsumer:
        return _MemoryConsumer(promise, queue, callback, prefetch_count, no_ack, exclusive, arguments)

    def _subscribe(self, consumer: _MemoryConsumer, limit: float) -> None:
        session = self._live_session()
        self._on_broker(session, lambda: self._start_consumer(consumer, session))
        self._round_trip()

    def _start_consumer(self, consumer: _MemoryConsumer, session: _MemorySession) -> None:
        consumer.session = session
        consumer.tag = f"{next(_promise_ids)}.0."
        consumer.window += 1
        consumer.unacked = 0
        session.broker.consume(session, consumer)

    def _deliver_from_broker(self, consumer: _MemoryConsumer, queue: _Queue | None, envelope: _Envelope) -> None:
        """Called by the broker for each message it hands to a consumer of this connection."""
        session = consumer.session
        delivery = None
        if queue is not None and not consumer.broker_no_ack:
            delivery = session.broker.track(session, queue, consumer, envelope)
        message = self._message(envelope, consumer.tag, (session, None, delivery, consumer.broker_no_ack))
        if consumer.callback is None:  # the one-shot consumer of a synchronous consume takes one message
            consumer.cancelled = True
            session.broker.cancel(consumer)
        self._hand_over(consumer, message)

    def _cancelled_by_broker(self, consumer: _MemoryConsumer) -> None:
        super()._cancelled_by_broker(consumer)
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
        consumer = _MemoryConsumer(next(_promise_ids), queue, None, 1, no_ack, exclusive, arguments)
        session = self._live_session()
        self._on_broker(session, lambda: self._start_consumer(consumer, session))
        try:
            self._round_trip()
            return self._one_shot_result(consumer, session, timeout)
        finally:
            if not consumer.cancelled:
                consumer.cancelled = True
                if session.alive:
                    session.broker.cancel(consumer)

    def get(self, queue: str, *, no_ack: bool = False, callback: Callback | None = None,
            timeout: float | None = None) -> Any:
        result = super().get(queue, no_ack=no_ack, callback=callback, timeout=timeout)
        if callback is None:
            self._round_trip()
        return result

    basic_get = get

    def _send_get(self, queue: str, no_ack: bool, done: Callable[[Any], None]) -> None:
        session = self._live_session()
        try:
            got = self._on_broker(session, lambda: session.broker.get(session, queue, no_ack))
        except AMQPError as exc:
            done(exc)
            return
        if got is None:
            done(None)
            return
        envelope, delivery, remaining = got
        message = self._message(envelope, None, (session, None, delivery, no_ack), remaining)
        self._received(message)
        done(message)

    def _send_settle(self, message: Message, action: str, requeue: bool) -> None:
        """Settle a message with the broker it came from (for a message consumed with no_ack, refuse)."""
        session: _MemorySession = message._context[0]
        delivery: _Delivery | None = message._context[2]
        if message._context[3]:
            raise MessageStateError("this message was consumed with no_ack=True; there is nothing to settle")
        if not session.alive or self._session is not session:
            raise self._settle_refused(message, action)
        if delivery is not None:
            session.broker.settle(delivery, action, requeue)

    def _stop_consumer(self, consumer: _MemoryConsumer, timeout: float | None) -> None:
        session = consumer.session
        if session.alive and session is self._session:
            session.broker.cancel(consumer)
            self._round_trip()

    def _set_prefetch(self, consumer: _MemoryConsumer, prefetch_count: int, timeout: float | None) -> None:
        """As PukaConnection does on RabbitMQ, subscribe again with the new limit.

        The new subscription starts before the old one ends, so an auto-delete
        queue stays: messages the consumer holds stay valid, and the new window
        starts empty.
        """
        session = self._live_session()
        consumer.prefetch_count = prefetch_count
        if consumer.session is session:
            session.broker.resubscribe(consumer)
            consumer.tag = f"{next(_promise_ids)}.0."
        else:
            self._on_broker(session, lambda: self._start_consumer(consumer, session))
        self._round_trip()

    # -- request / reply --------------------------------------------------------------------------
    def _send_request(self, reply_channel: int | None, exchange: str, routing_key: str, data: bytes,
                      properties: dict[str, Any]) -> None:
        """Publish a request as if on the reply channel; the broker's error (Unroutable...) is raised."""
        _puka.shortstr(exchange, "exchange")
        _puka.shortstr(routing_key, "routing_key")
        wire = self._wire_properties(properties)
        session = self._live_session()
        error = self._on_broker(session, lambda: session.broker.publish(session, exchange, routing_key, data, wire,
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
    def _close(self, timeout: float) -> None:
        """Unacked messages go back to their queues and exclusive queues are deleted, as on a real close."""
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
        self._arrived = 0
        if self._arrival is not None:
            self._arrival.stop()


if TYPE_CHECKING:
    def _keeps_the_contract(conn: MemoryConnection) -> Connection:
        return conn  # mypy checks here that MemoryConnection implements the Connection protocol
