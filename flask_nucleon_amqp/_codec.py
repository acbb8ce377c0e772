"""AMQP 0-9-1 field tables and basic properties, both ways, as RabbitMQ reads and writes them.

Encoding refuses, before anything is sent, every value the broker would
choke on (NaN, out-of-range integers and timestamps, unsupported types,
nesting without end): a bad header must cost its own call a
:class:`TypeError`/:class:`ValueError` that names it, never the shared
connection. Decoding reads every field type of the 0-9-1 errata that
RabbitMQ accepts (``t b B s u I i l L f d D S x T F A V``, plus the spec's
``U``) with the right signedness, checks every length against the frame it
came in, and stops at :data:`MAX_DEPTH` levels of nesting; what it cannot
read raises :class:`DecodeError`, which costs one message, not the
connection (see :func:`decode_properties`). The type mapping is documented
in ``docs/types.rst``.

Pure functions on bytes: no I/O, no puka. :mod:`._puka` plugs them into puka.
"""

from __future__ import annotations

import calendar
import datetime
import decimal
from struct import Struct
from struct import error as StructError
from typing import Any

__all__ = ["MAX_DEPTH", "DecodeError", "shortstr", "encode_table", "encode_properties", "decode_table",
           "decode_properties", "lenient_str", "PROPERTIES", "PROPERTY_NAMES"]

#: Most levels of tables and arrays a header value may have, the headers table
#: itself counting as the first; deeper values are refused when sending and are
#: a decode error when received (a deeper table could only be a denial of service).
MAX_DEPTH = 100

_U8 = Struct(">B")
_U32 = Struct(">I")
_U64 = Struct(">Q")
_HEAD_S = Struct(">cI")  # kind, length
_INT32 = Struct(">ci")
_INT64 = Struct(">cq")
_DOUBLE = Struct(">cd")
_DECIMAL = Struct(">cBi")
_TIMESTAMP = Struct(">cQ")
_EPOCH = datetime.datetime(1970, 1, 1)
_UTC = datetime.timezone.utc
_INF = float("inf")


class DecodeError(ValueError):
    """Bytes received from the broker that are not a valid field table or property list."""


def lenient_str(raw: bytes) -> str | bytes:
    """A received string: str when it is UTF-8, else the bytes as they came."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def shortstr(value: Any, name: str) -> bytes:
    """Encode an AMQP short string (names, routing keys, string properties) as UTF-8, at most 255 bytes."""
    if isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name} is not valid Unicode ({exc.reason})") from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if len(data) > 255:
        raise ValueError(f"{name} is {len(data)} bytes long; AMQP allows at most 255")
    return data


# --- Encoding ------------------------------------------------------------------------------


class _Refused(Exception):
    """A value that cannot be sent; ``path`` collects the keys/indexes on the way out."""

    def __init__(self, kind: type[Exception], text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text
        self.path: list[Any] = []


def encode_table(table: dict[Any, Any] | None, where: str = "table") -> bytes:
    """Encode a field table; a value that cannot be sent raises TypeError/ValueError naming it.

    ``where`` names the table in the message: ``headers['a'][2]: ...``.
    """
    if not table:
        if table is None or isinstance(table, dict):
            return b"\x00\x00\x00\x00"
    if not isinstance(table, dict):
        raise TypeError(f"{where} must be a dict, got {type(table).__name__}")
    try:
        return _table(table, 1)
    except _Refused as exc:
        steps = [f"[{step!r}]" for step in reversed(exc.path)]
        path = "".join(steps) if len(steps) <= 8 else "".join(steps[:8]) + f"...({len(steps)} levels)"
        raise exc.kind(f"{where}{path}: {exc.text}") from None
    except RecursionError:  # deeper than MAX_DEPTH is refused first; a tiny recursion limit remains
        raise ValueError(f"{where}: nested too deep") from None


def _table(table: dict[Any, Any], depth: int) -> bytes:
    if depth > MAX_DEPTH:
        raise _Refused(ValueError, f"nested deeper than {MAX_DEPTH} levels of tables and arrays")
    parts: list[bytes] = []
    append = parts.append
    for key, value in table.items():
        try:
            if type(key) is str:
                name = key.encode("utf-8")
            elif isinstance(key, (str, bytes, bytearray)):
                name = key.encode("utf-8") if isinstance(key, str) else bytes(key)
            else:
                raise _Refused(TypeError, f"key {key!r} must be a str, got {type(key).__name__}")
        except UnicodeEncodeError as exc:
            raise _Refused(ValueError, f"key {key!r} is not valid Unicode ({exc.reason})") from None
        if len(name) > 255:
            raise _Refused(ValueError, f"key {name[:40]!r}... is {len(name)} bytes long; AMQP allows at most 255")
        append(_U8.pack(len(name)))
        append(name)
        _value_at(parts, value, depth, key)
    data = b"".join(parts)
    return _U32.pack(len(data)) + data


def _value_at(parts: list[bytes], value: Any, depth: int, step: str | int) -> None:
    """Append a table's value or an array's item; a refusal names where it stands (the key or index)."""
    try:
        _value(parts, value, depth)
    except _Refused as exc:
        exc.path.append(step)
        raise
    except UnicodeEncodeError as exc:
        raise _unencodable(exc, step) from None


def _unencodable(exc: UnicodeEncodeError, step: Any) -> _Refused:
    refused = _Refused(ValueError, f"a string that is not valid Unicode ({exc.reason}) cannot be sent")
    refused.path.append(step)
    return refused


def _value(parts: list[bytes], value: Any, depth: int) -> None:
    """Append one value; the common exact types first (the publish hot path)."""
    kind = type(value)
    if kind is str:
        data = value.encode("utf-8")
        parts.append(_HEAD_S.pack(b"S", len(data)))
        parts.append(data)
    elif kind is int:
        if -0x80000000 <= value <= 0x7FFFFFFF:
            parts.append(_INT32.pack(b"I", value))
        else:
            _long(parts, value)
    elif kind is bytes:
        parts.append(_HEAD_S.pack(b"S", len(value)))
        parts.append(value)
    elif kind is bool:
        parts.append(b"t\x01" if value else b"t\x00")
    elif value is None:
        parts.append(b"V")
    else:
        _other(parts, value, depth)


def _long(parts: list[bytes], value: int) -> None:
    if -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
        parts.append(_INT64.pack(b"l", value))
    else:
        raise _Refused(ValueError, f"integer {value} does not fit in 64 bits (signed); send it as a str")


def _other(parts: list[bytes], value: Any, depth: int) -> None:
    if isinstance(value, float):
        if value != value or value in (_INF, -_INF):
            raise _Refused(ValueError, f"{value!r} cannot be sent: RabbitMQ closes the connection on NaN "
                                       "and infinite floats")
        parts.append(_DOUBLE.pack(b"d", value))
    elif isinstance(value, dict):
        parts.append(b"F")
        parts.append(_table(value, depth + 1))
    elif isinstance(value, (list, tuple)):
        parts.append(_array(value, depth + 1))
    elif isinstance(value, int):
        if -0x80000000 <= value <= 0x7FFFFFFF:
            parts.append(_INT32.pack(b"I", value))
        else:
            _long(parts, value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        parts.append(_HEAD_S.pack(b"S", len(data)))
        parts.append(data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        parts.append(_HEAD_S.pack(b"S", len(data)))
        parts.append(data)
    elif isinstance(value, decimal.Decimal):
        parts.append(_decimal(value))
    elif isinstance(value, datetime.datetime):
        try:
            seconds = calendar.timegm(value.utctimetuple())
        except OverflowError:
            seconds = -1
        if seconds < 0:
            raise _Refused(ValueError, f"{value!r} is before 1970: AMQP timestamps are unsigned seconds "
                                       "since the epoch")
        parts.append(_TIMESTAMP.pack(b"T", seconds))
    elif isinstance(value, datetime.date):
        raise _Refused(TypeError, f"cannot send a {type(value).__name__} ({value!r}) in an AMQP table; "
                                  "send a datetime (or an ISO string)")
    else:
        raise _Refused(TypeError, f"cannot send a value of type {type(value).__name__} in an AMQP table")


def _array(items: list[Any] | tuple[Any, ...], depth: int) -> bytes:
    if depth > MAX_DEPTH:
        raise _Refused(ValueError, f"nested deeper than {MAX_DEPTH} levels of tables and arrays")
    parts: list[bytes] = []
    for index, item in enumerate(items):
        _value_at(parts, item, depth, index)
    data = b"".join(parts)
    return _HEAD_S.pack(b"A", len(data)) + data


def _decimal(value: decimal.Decimal) -> bytes:
    """AMQP decimals: a scale (0-255 decimal places) and a signed 32-bit integer; exact or refused."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise _Refused(ValueError, f"{value} is not a finite decimal")
    if value and value.adjusted() > 9:  # checked before building a huge int out of 1E+999999
        raise _Refused(ValueError, f"decimal {value} does not fit AMQP's decimal (32-bit signed digits)")
    if exponent >= 0:
        places, raw = 0, int(value)
    else:
        places = -exponent
        if places > 255:
            raise _Refused(ValueError, f"decimal {value} has {places} decimal places; AMQP allows at most 255")
        raw = int("".join(map(str, digits)) or "0")
        if sign:
            raw = -raw
    if not -0x80000000 <= raw <= 0x7FFFFFFF:
        raise _Refused(ValueError, f"decimal {value} does not fit AMQP's decimal (32-bit signed digits)")
    return _DECIMAL.pack(b"D", places, raw)


# --- Basic properties ----------------------------------------------------------------------

#: Basic properties in wire order, with their flag bit and kind (``s`` short
#: string, ``F`` table, ``B`` octet, ``Q`` 64-bit timestamp).
PROPERTIES: tuple[tuple[str, int, str], ...] = (
    ("content_type", 0x8000, "s"),
    ("content_encoding", 0x4000, "s"),
    ("headers", 0x2000, "F"),
    ("delivery_mode", 0x1000, "B"),
    ("priority", 0x0800, "B"),
    ("correlation_id", 0x0400, "s"),
    ("reply_to", 0x0200, "s"),
    ("expiration", 0x0100, "s"),
    ("message_id", 0x0080, "s"),
    ("timestamp", 0x0040, "Q"),
    ("type", 0x0020, "s"),
    ("user_id", 0x0010, "s"),
    ("app_id", 0x0008, "s"),
    ("cluster_id", 0x0004, "s"),
)
PROPERTY_NAMES = frozenset(name for name, _, _ in PROPERTIES)
_CONTENT_HEADER = Struct("!HHQH")


def encode_properties(properties: dict[str, Any], body_size: int) -> bytes:
    """Encode a content header frame payload (class, weight, body size, flags, properties)."""
    if not properties:
        return _CONTENT_HEADER.pack(60, 0, body_size, 0)
    flags = 0
    parts: list[bytes] = []
    for name, flag, kind in PROPERTIES:
        value = properties.get(name)
        if value is None:
            continue
        flags |= flag
        if kind == "s":
            data = shortstr(value, name)
            parts.append(_U8.pack(len(data)))
            parts.append(data)
        elif kind == "F":
            parts.append(encode_table(value, "headers"))
        else:
            try:
                parts.append((_U8 if kind == "B" else _U64).pack(value))
            except StructError:
                raise ValueError(f"{name} {value!r} is out of range") from None
    return _CONTENT_HEADER.pack(60, 0, body_size, flags) + b"".join(parts)


# --- Decoding ------------------------------------------------------------------------------

#: Fixed-size field types: struct, and a conversion (None: as unpacked).
_FIXED: dict[int, Struct] = {
    ord("t"): Struct(">B"),
    ord("b"): Struct(">b"),
    ord("B"): Struct(">B"),
    ord("s"): Struct(">h"),  # RabbitMQ's 16-bit signed (the spec's "s" is a short string)
    ord("U"): Struct(">h"),  # the spec's 16-bit signed (RabbitMQ refuses it)
    ord("u"): Struct(">H"),
    ord("I"): Struct(">i"),
    ord("i"): Struct(">I"),
    ord("l"): Struct(">q"),  # RabbitMQ's 64-bit signed (the spec's "l" is unsigned)
    ord("L"): Struct(">q"),  # signed too, as RabbitMQ and the 0-9-1 errata read it
    ord("f"): Struct(">f"),
    ord("d"): Struct(">d"),
    ord("T"): Struct(">Q"),
    ord("D"): Struct(">Bi"),
}
_BOOL, _TIME, _DEC = ord("t"), ord("T"), ord("D")
_LONGSTR, _BYTES, _TABLE, _ARRAY, _VOID = ord("S"), ord("x"), ord("F"), ord("A"), ord("V")


def decode_table(data: bytes, offset: int = 0, end: int | None = None) -> tuple[dict[Any, Any], int]:
    """Decode a field table at ``offset`` (its 4-byte size first), within ``end``.

    :returns: the table and the offset after it.
    :raises DecodeError: anything that is not a valid table, with the reason.
    """
    try:
        return _decode_table(data, offset, len(data) if end is None else end, 1)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoder bug raises, it is this table's problem
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc


def _decode_table(data: bytes, offset: int, end: int, depth: int) -> tuple[dict[Any, Any], int]:
    if offset + 4 > end:
        raise DecodeError("a table's size runs past the end of its frame")
    (size,) = _U32.unpack_from(data, offset)
    offset += 4
    limit = offset + size
    if limit > end:
        raise DecodeError(f"a table of {size} bytes is longer than the {end - offset} bytes around it")
    table: dict[Any, Any] = {}
    while offset < limit:
        length = data[offset]
        key = data[offset + 1:offset + 1 + length]
        offset += 1 + length
        if offset >= limit:
            raise DecodeError(f"table key {lenient_str(key)!r} has no value inside its table")
        try:
            name: Any = key.decode("utf-8")
        except UnicodeDecodeError:
            name = key
        table[name], offset = _decode_value(data, offset, limit, depth)
    return table, offset


def _decode_value(data: bytes, offset: int, limit: int, depth: int) -> tuple[Any, int]:
    kind = data[offset]
    offset += 1
    if kind == _LONGSTR or kind == _BYTES:
        if offset + 4 > limit:
            raise DecodeError("a string's length runs past the end of its table")
        end = offset + 4 + _U32.unpack_from(data, offset)[0]
        if end > limit:
            raise DecodeError("a string runs past the end of its table")
        raw = data[offset + 4:end]
        return (lenient_str(raw) if kind == _LONGSTR else bytes(raw)), end
    fixed = _FIXED.get(kind)
    if fixed is not None:
        end = offset + fixed.size
        if end > limit:
            raise DecodeError(f"a {chr(kind)!r} value runs past the end of its table")
        if kind == _DEC:
            scale, raw = fixed.unpack_from(data, offset)
            return decimal.Decimal(f"{raw}E-{scale}"), end
        (value,) = fixed.unpack_from(data, offset)
        if kind == _BOOL:
            return value != 0, end
        if kind == _TIME:
            try:
                return _EPOCH + datetime.timedelta(seconds=value), end
            except OverflowError:
                raise DecodeError(f"timestamp {value} is beyond the year 9999") from None
        return value, end
    if kind == _TABLE or kind == _ARRAY:
        if depth >= MAX_DEPTH:
            raise DecodeError(f"nested deeper than {MAX_DEPTH} levels of tables and arrays")
        if kind == _TABLE:
            return _decode_table(data, offset, limit, depth + 1)
        if offset + 4 > limit:
            raise DecodeError("an array's size runs past the end of its table")
        end = offset + 4 + _U32.unpack_from(data, offset)[0]
        if end > limit:
            raise DecodeError("an array runs past the end of its table")
        offset += 4
        items = []
        while offset < end:
            item, offset = _decode_value(data, offset, end, depth + 1)
            items.append(item)
        return items, end
    if kind == _VOID:
        return None, offset
    raise DecodeError(f"unknown field type {chr(kind)!r} (0x{kind:02x})")


def decode_properties(data: bytes, offset: int, end: int) -> dict[str, Any]:
    """Decode the property list of a content header (flags first) found between ``offset`` and ``end``.

    Never raises: the delivery is what counts. When the headers table cannot
    be read (unknown field type, deeper than :data:`MAX_DEPTH`, bad lengths,
    any decoder error) the other properties are still read, ``headers`` is
    empty, and the result has ``decode_error`` (the reason) and
    ``raw_properties`` (the property bytes exactly as received). When the
    property list itself is malformed, only those two are set.
    """
    if end - offset == 2 and data[offset] == 0 and data[offset + 1] == 0:
        return {}
    try:
        return _decode_properties(data, offset, end)
    except Exception as exc:  # noqa: BLE001 - one message's problem, never the connection's
        reason = str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
        return {"decode_error": f"unreadable properties: {reason}", "raw_properties": bytes(data[offset:end])}


def _decode_properties(data: bytes, start: int, end: int) -> dict[str, Any]:
    if start + 2 > end:
        raise DecodeError("no property flags")
    flags = data[start] << 8 | data[start + 1]
    if flags & 0x0003:
        raise DecodeError(f"property flags 0x{flags:04x} set bits that basic has no property for")
    offset = start + 2
    props: dict[str, Any] = {}
    error = None
    for name, flag, kind in PROPERTIES:
        if not flags & flag:
            continue
        if kind == "s":
            length = data[offset]
            value_end = offset + 1 + length
            if value_end > end:
                raise DecodeError(f"{name} runs past the end of the frame")
            props[name] = lenient_str(data[offset + 1:value_end])
            offset = value_end
        elif kind == "F":
            if offset + 4 > end:
                raise DecodeError("the headers' size runs past the end of the frame")
            table_end = offset + 4 + _U32.unpack_from(data, offset)[0]
            if table_end > end:
                raise DecodeError(f"the headers table is {table_end - end} bytes longer than its frame")
            try:
                props[name] = _decode_table(data, offset, table_end, 1)[0]
            except Exception as exc:  # noqa: BLE001
                props[name] = {}
                error = str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
            offset = table_end
        elif kind == "B":
            if offset >= end:
                raise DecodeError(f"{name} runs past the end of the frame")
            props[name] = data[offset]
            offset += 1
        else:
            if offset + 8 > end:
                raise DecodeError(f"{name} runs past the end of the frame")
            props[name] = _U64.unpack_from(data, offset)[0]
            offset += 8
    if offset != end:
        raise DecodeError(f"{end - offset} bytes left over after the properties")
    if error is not None:
        props["decode_error"] = f"unreadable headers: {error}"
        props["raw_properties"] = bytes(data[start:end])
    return props
