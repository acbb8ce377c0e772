"""The one error hierarchy of flask_nucleon_amqp.

Every error the extension raises is an :class:`AMQPError`. Leaves also
subclass the matching builtin, so ``except TimeoutError`` and
``except ConnectionError`` work as a caller expects.
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = [
    "AMQPError",
    "ConfigError",
    "ConnectionError",
    "ConnectionLost",
    "AuthenticationError",
    "VhostNotAllowed",
    "ChannelError",
    "NotFound",
    "AccessRefused",
    "ResourceLocked",
    "PreconditionFailed",
    "Unroutable",
    "PublishNacked",
    "PublishOutcomeUnknown",
    "Timeout",
    "ConnectionBlocked",
    "MessageStateError",
    "error_from_reply",
]


class AMQPError(Exception):
    """Root of every error raised by flask_nucleon_amqp."""


class ConfigError(AMQPError, ValueError):
    """A configuration value is wrong; ``key`` names the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class ConnectionError(AMQPError, builtins.ConnectionError):
    """The broker cannot be reached, or refused the connection.

    ``host`` and ``port`` say which broker; the password never appears.
    """

    def __init__(self, message: str, host: str | None = None, port: int | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.port = port


class ConnectionLost(ConnectionError):
    """The connection died while the operation was pending (or before it was sent).

    For a publish this means the outcome is unknown: the broker may or may not
    have routed the message.
    """


class PublishOutcomeUnknown(ConnectionLost):
    """A publish's channel was closed by another operation's error before its confirm arrived.

    The connection lives on, but as with :class:`ConnectionLost` the broker may
    or may not have routed the message; ``retry=`` publishes it again.
    """


class AuthenticationError(ConnectionError):
    """The broker refused the user name or password (403 ACCESS_REFUSED at login)."""


class VhostNotAllowed(ConnectionError):
    """The user may not open the virtual host (530 NOT_ALLOWED)."""


class ChannelError(AMQPError):
    """The broker refused one operation; the connection stays usable.

    ``reply_code`` and ``reply_text`` are the broker's own words.
    """

    reply_code: int = 0

    def __init__(self, reply_text: str = "", reply_code: int | None = None) -> None:
        if reply_code is not None:
            self.reply_code = reply_code
        super().__init__(f"{self.reply_code} {reply_text}".strip())
        self.reply_text = reply_text


class NotFound(ChannelError):
    """404: the exchange or queue does not exist."""

    reply_code = 404


class AccessRefused(ChannelError):
    """403: the user may not do this (or an exclusive queue is in use)."""

    reply_code = 403


class ResourceLocked(ChannelError):
    """405: the queue is exclusive to another connection."""

    reply_code = 405


class PreconditionFailed(ChannelError):
    """406: a declaration conflicts with what exists, or an ack was refused."""

    reply_code = 406


class Unroutable(ChannelError):
    """312: a mandatory message reached no queue; the broker returned it."""

    reply_code = 312

    def __init__(self, reply_text: str = "NO_ROUTE", exchange: str = "", routing_key: str = "") -> None:
        super().__init__(f"{reply_text} (exchange={exchange!r}, routing_key={routing_key!r})")
        self.exchange = exchange
        self.routing_key = routing_key


class PublishNacked(AMQPError):
    """The broker refused to take responsibility for a published message (basic.nack)."""


class Timeout(AMQPError, TimeoutError):
    """An operation did not complete within its timeout."""


class ConnectionBlocked(Timeout):
    """The broker blocked publishing (memory or disk alarm) for longer than ``blocked_timeout``."""


class MessageStateError(AMQPError):
    """A message was acked or rejected twice, or after its channel was closed."""


_CHANNEL_ERRORS: dict[int, type[ChannelError]] = {
    cls.reply_code: cls for cls in (NotFound, AccessRefused, ResourceLocked, PreconditionFailed, Unroutable)
}


def error_from_reply(reply_code: int, reply_text: str, **context: Any) -> AMQPError:
    """Map a broker close frame's code to our exception class."""
    if reply_code in _CHANNEL_ERRORS:
        cls = _CHANNEL_ERRORS[reply_code]
        if cls is Unroutable:
            return Unroutable(reply_text, context.get("exchange", ""), context.get("routing_key", ""))
        return cls(reply_text)
    if reply_code == 530:
        return VhostNotAllowed(f"{reply_code} {reply_text}", context.get("host"), context.get("port"))
    if reply_code < 400 or reply_code >= 500:
        # 320 CONNECTION_FORCED, 5xx: the connection is gone.
        return ConnectionLost(f"connection closed by broker: {reply_code} {reply_text}",
                              context.get("host"), context.get("port"))
    return ChannelError(reply_text, reply_code)
