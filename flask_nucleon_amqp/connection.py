"""PukaConnection: one broker connection shared by many greenlets.

Each connection owns at most one live ``_PukaSession`` (``_puka_session.py``:
a puka client and the greenlets that drive it). Callers hand puka a callback
and wait on a gevent primitive; writes are flushed by one hub callback per
batch. User callbacks
run outside the I/O greenlet (operation callbacks in a dispatcher greenlet,
each consumer's in one of its own: see ``_base.py``), so a callback may itself
wait for anything on the same connection.

When a session dies, every waiting greenlet gets :class:`ConnectionLost`.
The next operation opens a new session (trying each configured node in
turn); consumers registered with a callback are resumed on it by a
background recovery greenlet.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import gevent
import gevent.select
import gevent.socket
from gevent.event import AsyncResult
from gevent.hub import Waiter
from greenlet import greenlet
from puka import spec as puka_spec

from . import _puka
from ._base import BaseConnection
from ._connection_records import _BaseConsumer, _promise_ids
from ._publishing import _Publish
from ._puka_session import _PukaSession
from ._request_reply import _REPLY_TO
from .config import Node, PoolSettings
from .exceptions import (
    AMQPError,
    AuthenticationError,
    ConnectionBlocked,
    ConnectionError,
    ConnectionLost,
    MessageStateError,
    Timeout,
    Unroutable,
    VhostNotAllowed,
    error_from_reply,
)
from .message import Message
from .protocol import Callback, Connection, MessageHandler

__all__ = ["PukaConnection", "Callback"]

log = logging.getLogger(__name__)

class _PukaConsumer(_BaseConsumer):
    """A registered consumer; survives reconnects (it is started again on each new session)."""

    def __init__(self, promise: int, queue: str, callback: MessageHandler | None,
                 prefetch_count: int, no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> None:
        super().__init__(promise, queue, callback, prefetch_count, no_ack, exclusive, arguments)
        self.session: _PukaSession | None = None
        self.puka_number: int | None = None
        self.started: AsyncResult = AsyncResult()


def _settable(result_box: AsyncResult) -> Callable[[int, Any], None]:
    return lambda _number, result: result_box.set(result)


class PukaConnection(BaseConnection[_PukaConsumer, _PukaSession]):
    """A connection shared by every greenlet of the process, to RabbitMQ through puka.

    It implements :class:`~flask_nucleon_amqp.protocol.Connection`: every
    method is synchronous (blocks only the calling greenlet until the broker
    answered; returns the result or raises) unless given ``callback=``: then it
    returns a promise id at once and later calls ``callback(promise, result)``
    in the connection's callback greenlet, with the exception as ``result``
    when the operation failed.

    ``timeout`` defaults to the pool's ``operation_timeout``.
    """

    _log = log

    def __init__(self, settings: PoolSettings, index: int = 0) -> None:
        super().__init__(settings, index)
        self._opening: AsyncResult | None = None
        self._node_offset = index
        self._last_nack_reopen = float("-inf")

    # -- sessions -----------------------------------------------------------------------------
    def _open(self) -> _PukaSession:
        if self._closed:
            raise ConnectionError(f"{self!r} was closed", self.settings.nodes[0].host, self.settings.nodes[0].port)
        stats = self.stats
        if self._opening is not None:
            stats["waiting_connection"] += 1
            try:
                result = self._opening.get()
            finally:
                stats["waiting_connection"] -= 1
            assert isinstance(result, _PukaSession)
            return result
        opening = self._opening = AsyncResult()
        stats["waiting_connection"] += 1
        try:
            session = self._connect_any()
            self._session = session
            self._after_open(session)
        except BaseException as exc:
            opening.set_exception(exc)
            self._opening = None
            raise
        finally:
            stats["waiting_connection"] -= 1
        opening.set(session)
        self._opening = None
        return session

    def _connect_any(self) -> _PukaSession:
        nodes = self.settings.nodes
        errors: list[str] = []
        last: ConnectionError | None = None
        for step in range(len(nodes)):
            node = nodes[(self._node_offset + step) % len(nodes)]
            try:
                session = self._connect_node(node)
            except (AuthenticationError, VhostNotAllowed):
                raise
            except ConnectionError as exc:
                last = exc
                errors.append(str(exc))
                continue
            self._node_offset = (self._node_offset + step) % len(nodes)
            return session
        assert last is not None
        if len(nodes) == 1:
            raise last
        raise ConnectionError("no broker node reachable: " + "; ".join(errors), nodes[0].host, nodes[0].port)

    def _connect_node(self, node: Node) -> _PukaSession:
        timeout = self.settings.connect_timeout
        if _is_ip_address(node.host):
            return self._connect_addresses(node, [node.host])
        infos = None
        try:
            with gevent.Timeout(timeout, False):
                infos = _resolve(node.host, node.port)
        except OSError as exc:
            raise ConnectionError(f"cannot resolve {node.host}: {exc}", node.host, node.port) from None
        if infos is None:
            raise ConnectionError(f"cannot resolve {node.host} within {timeout:g}s", node.host, node.port)
        return self._connect_addresses(node, list(dict.fromkeys(info[4][0] for info in infos)))

    def _connect_addresses(self, node: Node, addresses: list[str]) -> _PukaSession:
        last: ConnectionError | None = None
        # Every address of the name in turn, not only the first, each with a connect_timeout of its
        # own: one silent address must not use up the time of the next (D26).
        for address in addresses:
            session = _PukaSession(self, node, address)
            try:
                session.start(self.settings.connect_timeout)
            except (AuthenticationError, VhostNotAllowed):
                raise
            except ConnectionError as exc:
                last = exc
                continue
            self._opened(session)
            return session
        assert last is not None
        raise last

    def _resume_consumer(self, consumer: _PukaConsumer, session: _PukaSession) -> None:
        self._start_consumer(consumer, session)

    def _session_ended(self, session: _PukaSession) -> None:
        """The session's I/O greenlet ended (lost, or closed by us)."""
        if not session.opened:
            return  # a failed attempt; the caller has its error
        if self._session_lost(session, session.death_reason or "closed by the broker"):
            if len(self.settings.nodes) > 1:
                self._node_offset += 1  # try the next node first
            self._start_recovery()

    def _on_blocked(self, blocked: bool, reason: Any) -> None:
        if blocked:
            self._set_blocked(reason)
            gevent.spawn_later(self.settings.blocked_timeout, self._fail_blocked_publishes, self._blocked_since)
        else:
            self._set_unblocked()

    def _fail_blocked_publishes(self, since: float) -> None:
        """A publish sent just before an alarm fails after blocked_timeout too, not operation_timeout."""
        if self.blocked_reason is None or self._blocked_since != since:
            return  # unblocked meanwhile (perhaps blocked again since: that alarm has its own timer)
        error = ConnectionBlocked(f"broker blocked publishing ({self.blocked_reason}) for more than "
                                  f"{self.settings.blocked_timeout:g}s (blocked_timeout); the message may "
                                  "still be routed once the alarm clears")
        session = self._session
        if session is not None and session.usable:
            session.client.fail_publishes(error)

    # -- calling puka ---------------------------------------------------------------------------
    def _error(self, result: Any, session: _PukaSession, **context: Any) -> AMQPError:
        """Translate a failed puka result into our exception."""
        exc = result.exception
        if isinstance(exc, AMQPError):
            return exc
        code = result.get("reply_code") if hasattr(result, "get") else None
        if code and session.usable:
            return error_from_reply(code, str(result.get("reply_text", "")),
                                    host=session.node.host, port=session.node.port, **context)
        reason = session.death_reason or (f"{code} {result.get('reply_text', '')}" if code else "connection closed")
        return ConnectionLost(f"connection to {self.settings.safe_url(session.node)} lost: {reason}",
                              session.node.host, session.node.port)

    def _outcome(self, session: _PukaSession, done: Callable[[Any], None]) -> Callable[[int, Any], None]:
        """A puka callback that hands ``done`` the result as a dict, or our exception."""
        return lambda _number, result: done(self._error(result, session) if result.is_error else dict(result))

    def _send_topology(self, method: str, names: dict[str, str], options: dict[str, Any],
                       done: Callable[[Any], None]) -> None:
        session = self._live_session()
        args = [_puka.shortstr(value, name) for name, value in names.items()]
        getattr(session.client, method)(*args, callback=self._outcome(session, done), **options)
        session.schedule_flush()

    def _wait(self, box: AsyncResult, session: _PukaSession, what: str, timeout: float | None,
              **context: Any) -> Any:
        """Wait for a puka result: the result as a dict, or the error raised; Timeout when none comes."""
        limit = self._limit(timeout)
        result = box.wait(limit)
        if result is None and not box.ready():
            raise Timeout(f"{what} on {self.settings.safe_url(session.node)} got no answer within {limit:g}s")
        if result.is_error:
            raise self._error(result, session, **context)
        return dict(result)

    # -- publishing -----------------------------------------------------------------------------
    def _send_publish(self, message: _Publish, callback: Callback, timeout: float | None) -> int:
        session = self._live_session()
        self._wait_for_room(session, len(message.data), timeout)
        promise = next(_promise_ids)
        self._begin()
        started = time.monotonic()
        context = message.context

        def confirmed(result: Any) -> None:
            self._end()
            value: Any = self._publish_outcome(self._publish_error(result, session, context), context, started)
            self._dispatch(callback, promise, value)

        try:
            session.client.publish(message.exchange, message.routing_key, message.data, message.properties,
                                   message.mandatory, confirmed,
                                   started + (self.settings.operation_timeout if timeout is None else timeout))
        except BaseException:  # refused before anything was queued (a broker with a smaller frame_max)
            self._end()
            raise
        session.queued()
        self._published(context, message.data, message.properties)
        return promise

    def _publish_and_wait(self, message: _Publish, timeout: float | None) -> None:
        session = self._live_session()
        self._wait_for_room(session, len(message.data), timeout)
        self._begin()
        started = time.monotonic()
        client = session.client
        stats = self.stats
        stats["waiting_confirm"] += 1
        try:
            if timeout is None:
                # The session's expiry timer fails it at the deadline: no timer per publish, and
                # the lightest wait gevent has (the confirm arrives in the I/O greenlet).
                waiter = Waiter(session.hub)
                client.publish(message.exchange, message.routing_key, message.data, message.properties,
                               message.mandatory, partial(session.hub.loop.run_callback, waiter.switch),
                               started + self.settings.operation_timeout)
                session.queued()
                self._published(message.context, message.data, message.properties)
                result = waiter.get()
            else:
                box = AsyncResult()
                client.publish(message.exchange, message.routing_key, message.data, message.properties,
                               message.mandatory, box.set, started + timeout)
                session.queued()
                self._published(message.context, message.data, message.properties)
                result = box.wait(timeout)
        finally:
            stats["waiting_confirm"] -= 1
            self._end()
        outcome = self._publish_outcome(self._publish_error(result, session, message.context), message.context,
                                        started)
        if isinstance(outcome, BaseException):
            raise outcome

    def _publish_error(self, result: Any, session: _PukaSession, context: dict[str, str]) -> AMQPError | None:
        """What a publish failed with (None when confirmed): puka's result, or None when it timed out."""
        if result is None:  # timed out
            return Timeout(f"publish on {self.settings.safe_url(session.node)} was not confirmed within "
                           "the timeout; the message may still be routed")
        if result.is_error:
            return self._error(result, session, **context)
        return None

    def _wait_for_room(self, session: _PukaSession, size: int, timeout: float | None) -> None:
        """Backpressure: wait while the broker blocks us, or while ``size`` more bytes would overfill the buffer.

        The buffer then holds at most ``max_buffer`` bytes, however many greenlets publish
        (a single larger message goes out alone). Nothing is queued before there is room,
        so a publisher that times out here has sent nothing.
        """
        if self.blocked_reason is not None:
            self._wait_unblocked()
        buffered = session.client.send_buf
        if buffered is None or not buffered or len(buffered) + size <= self.settings.max_buffer:
            return
        limit = self._limit(timeout)
        deadline = time.monotonic() + limit
        self.stats["waiting_room"] += 1
        try:
            while True:
                session.drained.clear()
                if not session.drained.wait(max(0.0, deadline - time.monotonic())):
                    raise Timeout(f"write buffer of {self!r} stayed full for {limit:g}s; the message was not sent")
                buffered = session.client.send_buf
                if buffered is None or not buffered or len(buffered) + size <= self.settings.max_buffer:
                    return
        finally:
            self.stats["waiting_room"] -= 1

    # -- receiving ------------------------------------------------------------------------------
    def _new_consumer(self, promise: int, queue: str, callback: MessageHandler | None, prefetch_count: int,
                      no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> _PukaConsumer:
        return _PukaConsumer(promise, queue, callback, prefetch_count, no_ack, exclusive, arguments)

    def _subscribe(self, consumer: _PukaConsumer, limit: float) -> None:
        self._start_consumer(consumer, self._live_session())
        started = consumer.started.wait(limit)
        if not consumer.started.ready():
            raise Timeout(f"consume from {consumer.queue!r} not confirmed within {limit:g}s")
        if isinstance(started, BaseException):
            raise started

    def _start_consumer(self, consumer: _PukaConsumer, session: _PukaSession) -> None:
        """Subscribe ``consumer`` on ``session`` (again, after a reconnect or a qos change)."""
        client = session.client
        if consumer.started.ready():
            consumer.started = AsyncResult()
        item = {"queue": _puka.shortstr(consumer.queue, "queue"), "exclusive": consumer.exclusive,
                "arguments": consumer.arguments}
        # A one-shot consumer (consume without callback) acks itself when no_ack, so
        # prefetch=1 still holds back every message but the first.
        broker_no_ack = consumer.no_ack and consumer.callback is not None
        started = consumer.started
        number = client.basic_consume_multi(
            [item], prefetch_count=consumer.prefetch_count, no_ack=broker_no_ack,
            callback=lambda number, result: self._on_consumer_event(consumer, session, number, started, result))
        consumer.session, consumer.puka_number = session, number
        client.on_deliveries(number, partial(self._on_delivery, consumer, session))

        def consume_ok() -> None:
            if not started.ready():
                started.set(None)

        client.on_consume_ok(number, consume_ok)
        session.schedule_flush()

    def _on_consumer_event(self, consumer: _PukaConsumer, session: _PukaSession, number: int, started: AsyncResult,
                           result: Any) -> None:
        """The consumer's puka promise ended: refused, cancelled (by us or the broker), or connection lost."""
        if session is not consumer.session or number != consumer.puka_number:
            return  # a subscription the consumer has left (qos change, reconnect)
        if not result.is_error:
            if "body" not in result:  # the broker cancelled it: queue deleted (D19)
                self._cancelled_by_broker(consumer)
            return
        error = self._error(result, session, queue=consumer.queue)
        if consumer is self._reply_consumer:  # the request on this channel failed: so do all calls
            for box in self._replies.values():
                if not box.ready():
                    box.set(error)
        if not started.ready():
            started.set(error)
        if consumer.callback is None:
            if not consumer.box.ready():
                consumer.box.set(error)
        elif session.usable and not consumer.cancelled:
            # Refused (also when resuming after a reconnect: the queue is gone) or stopped by a
            # channel error while the connection lives: it consumes no more, so it is unregistered.
            # (When the connection is lost instead, recovery subscribes it again.)
            if self._consumers.pop(consumer.promise, None) is not None:
                log.error("consumer on %r stopped: %s", consumer.queue, error)

    def _on_delivery(self, consumer: _PukaConsumer, session: _PukaSession, channel: Any, number: int,
                     frame: Any) -> None:
        """Runs in the I/O greenlet for each delivery of a consumer."""
        no_ack = consumer.no_ack and consumer.callback is not None
        message = Message.from_frame(frame, self, (session, channel, number, no_ack), queue=consumer.queue)
        if not no_ack:
            session.delivered(channel, frame["delivery_tag"])
        if consumer.callback is None:  # the one-shot consumer of a synchronous consume
            if consumer.box.ready() or consumer.cancelled:
                self._settle(message, "reject", True, quiet=True)  # never given to anyone
                return
            self._cancel_one_shot(consumer, session)  # before any ack opens the prefetch window
        self._hand_over(consumer, message)

    def _start_worker(self, worker: greenlet, consumer: _PukaConsumer) -> None:
        session = consumer.session
        if session is not None and session.next_worker is None and gevent.getcurrent() is session.io:
            session.next_worker = (worker, consumer)  # the I/O greenlet switches to it when it next waits
        else:
            super()._start_worker(worker, consumer)

    def _cancel_one_shot(self, consumer: _PukaConsumer, session: _PukaSession) -> None:
        if not consumer.cancelled:
            consumer.cancelled = True
            if session.usable and session.client.find_promise(consumer.puka_number) is not None:
                session.client.basic_cancel(consumer.puka_number, callback=lambda _n, _r: None)
                session.schedule_flush()

    def _consume_one(self, queue: str, no_ack: bool, exclusive: bool, arguments: dict[str, Any],
                     timeout: float | None) -> Message | None:
        consumer = _PukaConsumer(next(_promise_ids), queue, None, 1, no_ack, exclusive, arguments)
        session = self._live_session()
        self._start_consumer(consumer, session)
        try:
            started = consumer.started.wait(self.settings.operation_timeout)
            if isinstance(started, BaseException):
                raise started
            return self._one_shot_result(consumer, session, timeout)
        finally:
            if consumer.started.ready() and consumer.started.get() is None:
                self._cancel_one_shot(consumer, session)
            consumer.cancelled = True

    def _send_get(self, queue: str, no_ack: bool, done: Callable[[Any], None]) -> None:
        queue_b = _puka.shortstr(queue, "queue")
        session = self._live_session()

        def got(number: int, frame: Any) -> None:
            if frame.is_error:
                done(self._error(frame, session, queue=queue))
                return
            if frame.get("empty"):
                done(None)
                return
            puka_promise = session.client.find_promise(number)
            channel = puka_promise.channel if puka_promise is not None else None
            message = Message.from_frame(frame, self, (session, channel, number, no_ack), queue=queue)
            if not no_ack:
                session.delivered(channel, frame["delivery_tag"])
            self._received(message)
            done(message)

        session.client.basic_get(queue_b, no_ack=no_ack, callback=got)
        session.schedule_flush()

    def _send_settle(self, message: Message, action: str, requeue: bool) -> None:
        """Send ack / reject / nack for a message, on the channel it arrived on."""
        session, channel, number, no_ack = message._context
        if no_ack:
            raise MessageStateError("this message was consumed with no_ack=True; there is nothing to settle")
        client = session.client
        if not session.usable or not client.channel_alive(channel):
            raise self._settle_refused(message, action)
        tag = message.delivery_tag
        if action == "ack":
            session.ack_later(channel, tag)  # coalesced at the flush
        else:
            if action == "reject":
                frames = puka_spec.encode_basic_reject(tag, requeue)
            else:
                frames = puka_spec.encode_basic_nack(tag, False, requeue)
            client.send_frames(channel.number, frames)
            session.settled_now(channel, tag)
            session.schedule_flush()
        client.release_get(number)

    def _stop_consumer(self, consumer: _PukaConsumer, timeout: float | None) -> None:
        session = consumer.session
        if session is None or not session.usable or consumer.puka_number is None:
            return
        limit = self._limit(timeout)
        started = consumer.started.wait(limit)  # basic.cancel before consume-ok confuses puka (D17)
        if not consumer.started.ready():
            # Cancel it once the broker confirms it: else its deliveries would be requeued for ever.
            consumer.started.rawlink(lambda _started: self._cancel_subscription(consumer))
            return
        if (not session.usable or isinstance(started, BaseException)
                or session.client.find_promise(consumer.puka_number) is None):
            return
        box = AsyncResult()
        session.client.basic_cancel(consumer.puka_number, callback=_settable(box))
        session.schedule_flush()
        self._wait(box, session, "cancel", timeout)

    def _cancel_subscription(self, consumer: _PukaConsumer) -> None:
        """Send basic.cancel for a consumer's subscription, without waiting (it was confirmed late)."""
        session = consumer.session
        if (session is not None and session.usable and consumer.started.get() is None
                and session.client.find_promise(consumer.puka_number) is not None):
            session.client.basic_cancel(consumer.puka_number, callback=lambda _number, _result: None)
            session.schedule_flush()

    def _set_prefetch(self, consumer: _PukaConsumer, prefetch_count: int, timeout: float | None) -> None:
        if consumer.session is None:
            raise ValueError(f"no consumer with promise {consumer.promise!r} on {self!r}")
        limit = self._limit(timeout)
        consumer.started.wait(limit)  # basic.cancel before consume-ok confuses puka (D17)
        session = consumer.session
        old = (consumer.puka_number, consumer.started, consumer.prefetch_count)
        # Subscribe anew before cancelling: cancelling the only consumer of an auto-delete
        # queue would delete the queue.
        consumer.prefetch_count = prefetch_count
        self._start_consumer(consumer, session)
        started = consumer.started.wait(limit)
        if started is not None or not consumer.started.ready():
            consumer.puka_number, consumer.started, consumer.prefetch_count = old
            self._consumers[consumer.promise] = consumer
            raise started if isinstance(started, BaseException) else Timeout(
                f"qos on {consumer.queue!r} got no answer within {limit:g}s")
        if session.usable and session.client.find_promise(old[0]) is not None:
            box = AsyncResult()
            session.client.basic_cancel(old[0], callback=_settable(box))
            session.schedule_flush()
            self._wait(box, session, "qos", timeout)

    # -- request / reply --------------------------------------------------------------------------
    def _send_request(self, reply_channel: int | None, exchange: str, routing_key: str, data: bytes,
                      properties: dict[str, Any]) -> None:
        """Send a request on the reply channel: direct reply-to wants it on the channel that consumes replies."""
        assert reply_channel is not None
        session = self._live_session()
        # That channel is not in confirm mode, so the frames are sent as they are.
        frames = _puka.publish_frames(_puka.shortstr(exchange, "exchange"),
                                      _puka.shortstr(routing_key, "routing_key"), data, properties, True,
                                      session.client.frame_max)
        session.client.send_frames(reply_channel, frames)
        session.schedule_flush()

    def _reply_channel(self, timeout: float) -> int:
        """The channel number of this connection's reply-to consumer, started on first use."""
        consumer = self._reply_consumer
        if consumer is None or consumer.promise not in self._consumers:
            promise = self.consume(_REPLY_TO, self._on_reply, no_ack=True, timeout=timeout)
            consumer = self._reply_consumer = self._consumers[promise]
        else:
            consumer.started.wait(timeout)
        session = consumer.session
        assert session is not None
        number = session.client.channel_number(consumer.puka_number)
        if number is None or consumer.puka_number is None:
            raise ConnectionLost("the reply consumer is gone", session.node.host, session.node.port)
        session.client.on_returns(consumer.puka_number, self._on_request_returned)
        return number

    def _on_request_returned(self, result: Any) -> None:
        """A request no queue took comes back on the reply channel: fail its call at once."""
        box = self._replies.get((result.get("properties") or {}).get("correlation_id", ""))
        if box is not None and not box.ready():
            box.set(Unroutable(str(result.get("reply_text", "NO_ROUTE")), str(result.get("exchange", "")),
                               str(result.get("routing_key", ""))))

    # -- closing --------------------------------------------------------------------------------
    def _close(self, timeout: float) -> None:
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self._idle.wait(timeout)
        session = self._session
        for promise in list(self._consumers):
            try:
                self.cancel(promise, timeout=max(0.001, deadline - time.monotonic()))
            except AMQPError as exc:
                log.debug("cancel while closing failed: %s", exc)
        self._idle.wait(max(0.0, deadline - time.monotonic()))
        self._closed = True
        if self._recovery is not None:
            self._recovery.kill(block=False)
        if session is not None and session.usable:
            box = AsyncResult()
            try:
                session.flush_acks()  # acks asked for just now go out before connection.close
                session.client.close(callback=_settable(box))
                session.schedule_flush()
                box.wait(max(0.001, deadline - time.monotonic()))
            except _puka.ConnectionBroken:
                pass
            session.kill("closed by the application")
        if self._dispatcher is not None:
            self._dispatcher.kill(block=False)
            self._dispatcher = None

    def forget(self) -> None:
        """Drop everything without touching the socket: used in a child after fork."""
        self._closed = True
        self._session = None
        self._consumers.clear()
        self._dispatch_queue.clear()
        self._arrived = 0


def _resolve(host: str, port: int) -> list[Any]:
    """The addresses a broker's host name resolves to (getaddrinfo, cooperative)."""
    return list(gevent.socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


if TYPE_CHECKING:
    def _keeps_the_contract(conn: PukaConnection) -> Connection:
        return conn  # mypy checks here that PukaConnection implements the Connection protocol
