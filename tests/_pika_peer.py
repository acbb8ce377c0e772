"""pika as the other client of the broker, for the codec and hostile-delivery tests.

pika 1.4 emits only some field types (``S x t I l D T F A V``) and decodes
floats as ints; the tests need every type both ways, so :func:`pika_codec`
extends its encoder (``Raw`` values are sent as the given bytes, floats as
``d``) and mends its float decoding, while :func:`pika_codec` is entered.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any

import pika
import pika.data
import pytest

from conftest import BROKER_HOST, BROKER_PORT


class Raw(bytes):
    """A field value pika sends as exactly these bytes: the field-type octet, then the value."""


class RawTable(dict[str, Any]):
    """A headers table pika sends as exactly ``raw`` (its 4-byte size first), valid or not."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw


def raw(kind: str, fmt: str, value: Any) -> Raw:
    return Raw(kind.encode() + struct.pack(">" + fmt, value))


def nested_tables(depth: int) -> bytes:
    """A table ``{"a": {"a": ... {}}}`` with ``depth`` levels of tables, built without recursion."""
    inner = b"\x00\x00\x00\x00"
    for _ in range(depth - 1):
        entry = b"\x01aF" + inner
        inner = struct.pack(">I", len(entry)) + entry
    return inner


@contextlib.contextmanager
def pika_codec() -> Iterator[None]:
    original_encode_value, original_encode_table = pika.data.encode_value, pika.data.encode_table
    original_decode_value = pika.data.decode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, Raw):
            pieces.append(bytes(value))
            return len(value)
        if isinstance(value, float):
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        return int(original_encode_value(pieces, value))

    def encode_table(pieces: list[bytes], table: Any) -> int:
        if isinstance(table, RawTable):
            pieces.append(table.raw)
            return len(table.raw)
        return int(original_encode_table(pieces, table))

    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        kind = encoded[offset:offset + 1]
        if kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        return original_decode_value(encoded, offset)  # type: ignore[no-any-return]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pika.data, "encode_value", encode_value)
        patch.setattr(pika.data, "encode_table", encode_table)
        patch.setattr(pika.data, "decode_value", decode_value)
        yield


@contextlib.contextmanager
def pika_peer() -> Iterator[Any]:
    """A pika channel to the test broker, with the extended codec, in confirm mode."""
    with pika_codec():
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            BROKER_HOST, BROKER_PORT, credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0))
        try:
            channel = connection.channel()
            channel.confirm_delivery()  # a publish returns once the broker has routed it
            yield channel
        finally:
            if connection.is_open:
                connection.close()


def pika_publish(channel: Any, queue: str, body: bytes, headers: Any) -> None:
    channel.basic_publish("", queue, body, pika.BasicProperties(headers=headers))


def pika_get(channel: Any, queue: str) -> tuple[bytes, dict[str, Any]]:
    """One message from ``queue`` (acked): body and headers as pika decodes them."""
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    assert method is not None, f"no message in {queue}"
    return body, properties.headers or {}
