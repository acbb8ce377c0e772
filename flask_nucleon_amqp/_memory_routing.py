"""Values and routing of the in-process broker: messages, exchanges, bindings, RabbitMQ's matching rules.

Pure functions and small records, no broker state: how a topic pattern or a
headers binding matches (as RabbitMQ's Erlang code does), what a table looks
like after the wire, and the error texts RabbitMQ sends.
"""

from __future__ import annotations

import calendar
import datetime
import decimal
import time
from typing import Any

from puka import table as puka_table

from . import _puka
from .exceptions import AMQPError, error_from_reply

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


# -- records --------------------------------------------------------------------------------

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


class _Missing:
    def __repr__(self) -> str:
        return "none"


_MISSING: Any = _Missing()


class _ConnectionFatal(Exception):
    """A broker error that closes the whole connection (503 and the like), not just one channel."""


