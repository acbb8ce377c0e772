"""Publishing: the arguments checked and the message built once, ``retry=``, and each outcome counted.

:class:`Publishing` is the part of :class:`~flask_nucleon_amqp._base.BaseConnection`
that publishes: :meth:`Publishing.publish` checks every argument (naming the
bad one) before anything is sent and builds a :class:`_Publish`; the transport
sends it (``_send_publish``, ``_publish_and_wait``) and reports the outcome to
:meth:`Publishing._publish_outcome`, which counts and signals it.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from typing import Any

from . import _puka, signals
from . import tracing as _tracing
from ._argument_checks import _properties
from ._connection_records import ConnectionState, _ConsumerT, _SessionT
from .exceptions import ConnectionLost, Unroutable
from .message import _NOTHING, encode_body
from .protocol import Callback
from .signals import _emit

__all__ = ["Publishing", "CONFIRM_WINDOW"]

#: How many of the latest confirm latencies each connection keeps for the percentiles of stats().
CONFIRM_WINDOW = 1024


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


class Publishing(ConnectionState[_ConsumerT, _SessionT]):
    """``publish`` and the counting of its outcomes; a transport sends (``_send_publish``, ``_publish_and_wait``)."""

    #: The latest confirm latencies (seconds): a bounded window for stats()' percentiles.
    confirm_latencies: deque[float]

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
