"""Request / reply over RabbitMQ's direct reply-to: :meth:`RequestReply.call`.

:class:`RequestReply` is the part of :class:`~flask_nucleon_amqp._base.BaseConnection`
that publishes a request with a fresh ``correlation_id`` and ``reply_to`` set to
``amq.rabbitmq.reply-to``, and waits for the reply the transport's reply-to
consumer hands to :meth:`RequestReply._on_reply`. A transport supplies
``_reply_channel`` and ``_send_request``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gevent.event import AsyncResult

from . import _puka
from . import tracing as _tracing
from ._argument_checks import _check_timeout, _properties
from ._connection_records import ConnectionState, _ConsumerT, _promise_ids, _SessionT
from .exceptions import Timeout
from .message import _NOTHING, Message, encode_body
from .protocol import Callback

__all__ = ["RequestReply"]

_REPLY_TO = "amq.rabbitmq.reply-to"


class RequestReply(ConnectionState[_ConsumerT, _SessionT]):
    """``call()``: a request published, its reply awaited (or handed to ``callback=``)."""

    #: The box each request in flight waits on, by correlation id.
    _replies: dict[str, AsyncResult]

    def _in_background(self, work: Callable[[], Any], callback: Callback, what: str) -> int:
        """Run ``work()`` in a greenlet; its outcome goes to ``callback`` (BaseConnection implements it)."""
        raise NotImplementedError

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
