"""Message: what ``consume``/``get`` return and consumer callbacks receive.

A message is data plus the means to settle it (ack, reject, nack). It reads
like the result dict of the original Nucleon layer (``message["body"]``,
``message["headers"]``) and has attributes for the same fields. It knows
nothing about sockets: settling is delegated to the connection it came from.
"""

from __future__ import annotations

import json as _json
import logging
from typing import Any, Protocol

from . import runtime as _runtime
from .exceptions import MessageStateError

__all__ = ["Message", "encode_body"]

log = logging.getLogger(__name__)

#: Header puka adds to mandatory messages for its own bookkeeping; never shown to users.
_PUKA_HEADER = "x-puka-delivery-tag"


class _Settler(Protocol):
    def _settle(self, message: Message, action: str, requeue: bool) -> None: ...


class Message(dict[str, Any]):
    """A received message.

    ``body`` is the exact bytes that were published. Properties that were not
    set are None. Call exactly one of :meth:`ack`, :meth:`reject` or
    :meth:`nack` unless it was consumed with ``no_ack=True``.
    """

    __slots__ = ("_owner", "_context", "settled")

    def __init__(self, fields: dict[str, Any], owner: _Settler | None = None, context: Any = None) -> None:
        super().__init__(fields)
        self._owner = owner
        self._context = context
        self.settled = owner is None

    @classmethod
    def from_frame(cls, frame: dict[str, Any], owner: _Settler | None = None, context: Any = None,
                   queue: str | None = None) -> Message:
        """Build a message from a (fixed) puka delivery or get-ok frame from ``queue``.

        A message whose properties could not be decoded is built all the same
        (see :attr:`decode_error`), with one warning in the log.
        """
        headers = frame.get("headers") or {}
        if _PUKA_HEADER in headers:
            headers = {k: v for k, v in headers.items() if k != _PUKA_HEADER}
        fields = {
            "body": frame["body"],
            "headers": headers,
            "exchange": frame.get("exchange", ""),
            "routing_key": frame.get("routing_key", ""),
            "redelivered": frame.get("redelivered", False),
            "delivery_tag": frame.get("delivery_tag"),
            "consumer_tag": frame.get("consumer_tag"),
        }
        if "message_count" in frame:
            fields["message_count"] = frame["message_count"]
        for name, value in (frame.get("properties") or {}).items():
            fields["type" if name == "type_" else name] = value
        if "decode_error" in fields:
            log.warning("delivery %s from queue %r has undecodable properties (%s); passed on with empty "
                        "headers and message.decode_error set", fields["delivery_tag"], queue, fields["decode_error"])
        return cls(fields, owner, context)

    # -- data -----------------------------------------------------------------------------
    @property
    def body(self) -> bytes:
        return self["body"]  # type: ignore[no-any-return]

    @property
    def text(self) -> str:
        """The body decoded with its ``content_encoding`` (UTF-8 when unset)."""
        return self.body.decode(self.get("content_encoding") or "utf-8")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return _json.loads(self.body)

    @property
    def headers(self) -> dict[str, Any]:
        return self["headers"]  # type: ignore[no-any-return]

    @property
    def exchange(self) -> str:
        return self["exchange"]  # type: ignore[no-any-return]

    @property
    def routing_key(self) -> str:
        return self["routing_key"]  # type: ignore[no-any-return]

    @property
    def redelivered(self) -> bool:
        return self["redelivered"]  # type: ignore[no-any-return]

    @property
    def delivery_tag(self) -> int | None:
        return self["delivery_tag"]  # type: ignore[no-any-return]

    @property
    def consumer_tag(self) -> str | None:
        return self["consumer_tag"]  # type: ignore[no-any-return]

    @property
    def decode_error(self) -> str | None:
        """Why the properties of this message could not be decoded; None when they were.

        Set when a publisher sent headers this client cannot read (a field
        type that is not AMQP, nesting deeper than the limit, lengths that do
        not add up). The message is still delivered, so that it can be acked,
        rejected or dead-lettered rather than kill the connection or come back
        forever: ``headers`` is then empty (other properties that could be read
        are set) and :attr:`raw_properties` holds the bytes as received.
        """
        return self.get("decode_error")

    @property
    def raw_properties(self) -> bytes | None:
        """The content header's property flags and list exactly as received, when :attr:`decode_error` is set."""
        return self.get("raw_properties")

    def __getattr__(self, name: str) -> Any:
        # Properties (content_type, correlation_id, ...) read as attributes, None when unset.
        if name in _PROPERTY_ATTRS:
            return self.get(name)
        raise AttributeError(name)

    # -- settling -------------------------------------------------------------------------
    def ack(self) -> None:
        """Tell the broker the message was processed; it will not be delivered again."""
        self._settle("ack", False)

    def reject(self, requeue: bool = True) -> None:
        """Give the message back: requeued, or dropped / dead-lettered when ``requeue`` is False."""
        self._settle("reject", requeue)

    def nack(self, requeue: bool = True) -> None:
        """Like :meth:`reject` (RabbitMQ's basic.nack, for one message)."""
        self._settle("nack", requeue)

    def _settle(self, action: str, requeue: bool) -> None:
        home = _runtime.of(self._owner)
        if home is not None and not home.is_home():  # another OS thread: settle in the connection's hub
            home.call(self._settle, action, requeue)
            return
        if self._owner is None:
            raise MessageStateError("this message was consumed with no_ack=True; there is nothing to settle")
        if self.settled:
            raise MessageStateError(f"message {self.delivery_tag} was already acked or rejected")
        self._owner._settle(self, action, requeue)
        self.settled = True

    def __repr__(self) -> str:
        body = self.body
        shown = body[:40] + (b"..." if len(body) > 40 else b"")
        return (f"<Message exchange={self.exchange!r} routing_key={self.routing_key!r} "
                f"delivery_tag={self.delivery_tag} body={shown!r}>")


_PROPERTY_ATTRS = frozenset({
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to",
    "expiration", "message_id", "timestamp", "type", "user_id", "app_id", "cluster_id", "message_count",
})


def encode_body(body: Any, json: Any, properties: dict[str, Any]) -> bytes:
    """Turn the ``body``/``json=`` arguments of publish into bytes.

    bytes are sent as they are, str as UTF-8, ``json=`` serialised (setting
    the content type); anything else is a TypeError before anything is sent.
    """
    if json is not _NOTHING:
        if body is not None:
            raise TypeError("publish takes body or json=, not both")
        properties.setdefault("content_type", "application/json")
        return _json.dumps(json, separators=(",", ":")).encode("utf-8")
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if body is None:
        return b""
    raise TypeError(f"body must be bytes or str (or use json=), got {type(body).__name__}")


class _Nothing:
    def __repr__(self) -> str:
        return "<nothing>"


#: Marks "json= not given" (None is a valid JSON value).
_NOTHING: Any = _Nothing()
