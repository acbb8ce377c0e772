"""The in-process broker behind ``memory://`` URLs: the vhost's exchanges and queues, routing, dead-lettering.

:class:`MemoryBroker` routes like RabbitMQ 3.x does, down to its error codes
and texts, because a test that passes here must pass against the real broker
(``tests/test_api.py`` runs the same API tests against both). Nothing here
does I/O: every operation completes inside the call that asks for it.

A :class:`~flask_nucleon_amqp.memory.MemoryConnection` attaches a
``_MemorySession`` per "open connection"; a queue's messages, consumers and
deliveries live in ``_memory_queue``, which calls back into the connection
only through its small ``_Peer`` protocol (deliveries, broker cancels, forced
closes, alarms).
"""
from __future__ import annotations

import base64
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

from . import _puka
from ._argument_checks import _EXCHANGE_TYPES
from ._memory_queue import _Delivery, _MemoryConsumer, _MemorySession, _Peer, _Queue
from ._memory_routing import (
    _MISSING,
    _amqp_type,
    _Binding,
    _ConnectionFatal,
    _decode_table,
    _default_exchange_refused,
    _Envelope,
    _error,
    _Exchange,
    _not_found,
    _now_timestamp,
    _vhost_text,
)
from ._request_reply import _REPLY_TO
from .exceptions import AMQPError, PublishNacked, Unroutable

__all__ = ["MemoryBroker", "broker", "find", "reset"]

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
        self._sessions: list[_MemorySession] = []
        self._reply_consumers: dict[str, _MemoryConsumer] = {}
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
                   connection: _Peer | None = None) -> None:
        """Close every connection (or one) as a broker restart would (320 CONNECTION_FORCED).

        Waiters get ConnectionLost, unacked messages are requeued, exclusive
        queues go; connections then recover by themselves and resume their
        consumers, as PukaConnection does. ``connection`` closes only that
        one, as ``rabbitmqctl close_connection`` does.
        """
        for session in list(self._sessions):
            if connection is None or session.conn is connection:
                session.conn._closed_by_broker(session, f"320 CONNECTION_FORCED - {reason}")

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
    def attach(self, session: _MemorySession) -> None:
        self._sessions.append(session)
        if self.blocked_reason is not None:
            session.conn._on_blocked(True, self.blocked_reason)

    def detach(self, session: _MemorySession) -> None:
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
    def _vhost(self, session: _MemorySession) -> str:
        return session.conn.settings.vhost

    def _exchange(self, session: _MemorySession, name: str) -> _Exchange:
        found = self.exchanges.get(name)
        if found is None:
            raise _not_found("exchange", name, self._vhost(session))
        return found

    def _queue(self, session: _MemorySession, name: str) -> _Queue:
        """The queue called ``name``, if it exists and is not exclusive to another connection."""
        found = self.queues.get(name)
        if found is None:
            raise _not_found("queue", name, self._vhost(session))
        if found.owner is not None and found.owner is not session:
            raise self._locked(session, name)
        return found

    def _locked(self, session: _MemorySession, name: str) -> AMQPError:
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
    def exchange_declare(self, session: _MemorySession, name: str, type: str, durable: bool, auto_delete: bool,
                         arguments: dict[str, Any], passive: bool = False) -> dict[str, Any]:
        vhost = self._vhost(session)
        if name == "":
            raise _default_exchange_refused()
        found = self.exchanges.get(name)
        if passive:
            if found is None:
                raise _not_found("exchange", name, vhost)
            return {}
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

    def exchange_delete(self, session: _MemorySession, name: str, if_unused: bool) -> dict[str, Any]:
        if name == "":
            raise _default_exchange_refused()
        found = self.exchanges.get(name)
        if found is None:
            return {}
        if name.startswith("amq."):
            raise _error(403, f"ACCESS_REFUSED - deletion of system exchange '{name}' in vhost "
                              f"'{self._vhost(session)}' not allowed")
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

    def bind(self, session: _MemorySession, destination: str, to_queue: bool, source: str, routing_key: str,
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

    def unbind(self, session: _MemorySession, destination: str, to_queue: bool, source: str, routing_key: str,
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
    def queue_declare(self, session: _MemorySession, name: str, durable: bool, exclusive: bool, auto_delete: bool,
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

    def queue_delete(self, session: _MemorySession, name: str, if_unused: bool, if_empty: bool) -> dict[str, Any]:
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

    def queue_purge(self, session: _MemorySession, name: str) -> dict[str, Any]:
        return {"message_count": self._queue(session, name).purge()}

    # -- consuming --------------------------------------------------------------------------------
    def consume(self, session: _MemorySession, consumer: _MemoryConsumer) -> None:
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

    def cancel(self, consumer: _MemoryConsumer) -> None:
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

    def resubscribe(self, consumer: _MemoryConsumer) -> None:
        """The consumer subscribes again (qos): a new, empty prefetch window, at the end of the line."""
        consumer.window += 1
        consumer.unacked = 0
        queue = self.queues.get(consumer.queue)
        if queue is not None and consumer in queue.consumers:
            self._detach_consumer(consumer, queue)
            queue.consumers.append(consumer)
            queue.drain()

    @staticmethod
    def _detach_consumer(consumer: _MemoryConsumer, queue: _Queue) -> None:
        index = queue.consumers.index(consumer)
        del queue.consumers[index]
        if index < queue._next_consumer:
            queue._next_consumer -= 1

    def get(self, session: _MemorySession, name: str, no_ack: bool) -> tuple[_Envelope, _Delivery | None, int] | None:
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

    def track(self, session: _MemorySession, queue: _Queue, consumer: _MemoryConsumer,
              envelope: _Envelope) -> _Delivery:
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
    def publish(self, session: _MemorySession, exchange: str, routing_key: str, body: bytes, properties: dict[str, Any],
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
