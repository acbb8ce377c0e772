"""The checks of a connection's arguments, done before anything is sent; each error names the argument.

Shared by :mod:`._base` and its parts, and by :mod:`.outbox` (message
properties are checked when a row is written, not when it is published).
"""

from __future__ import annotations

import datetime
from typing import Any

from . import _puka

#: The exchange types RabbitMQ has built in (an ``x-`` plugin type is accepted too).
_EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic", "headers"})


def _check_timeout(timeout: Any) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError(f"timeout must be a non-negative number of seconds or None, got {timeout!r}")


def _check_prefetch(prefetch_count: Any) -> None:
    if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int) or not 0 <= prefetch_count < 65536:
        raise ValueError(f"prefetch_count must be an integer from 0 to 65535, got {prefetch_count!r}")


def _arguments(arguments: dict[str, Any] | None) -> dict[str, Any]:
    if not arguments:
        return {}
    if not isinstance(arguments, dict):
        raise TypeError(f"arguments must be a dict, got {type(arguments).__name__}")
    _puka.encode_table(arguments, "arguments")  # fail before puka allocates a channel (D8)
    return arguments


def _properties(**given: Any) -> dict[str, Any]:
    """Check and normalise message properties; errors name the property."""
    out: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        if name in ("delivery_mode", "priority"):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise ValueError(f"{name} must be an integer from 0 to 255, got {value!r}")
            if name == "delivery_mode" and value not in (1, 2):
                raise ValueError(f"delivery_mode must be 1 (transient) or 2 (persistent), got {value!r}")
        elif name == "timestamp":
            if isinstance(value, datetime.datetime):
                aware = value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
                value = int(aware.timestamp())
            elif isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"timestamp must be a datetime or a non-negative int, got {value!r}")
            if not 0 <= value < 2**64:  # AMQP timestamps are unsigned 64-bit seconds since 1970
                raise ValueError(f"timestamp must be from 1970 on and below 2**64 seconds, got {given[name]!r}")
        elif name == "expiration":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                value = str(value)
            elif not (isinstance(value, str) and value.isdigit()):
                raise ValueError(f"expiration must be milliseconds (int or digit string), got {value!r}")
        else:
            _puka.shortstr(value, name)
        out[name] = value
    return out
