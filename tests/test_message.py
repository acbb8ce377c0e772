"""Message: the Nucleon result dict and its attributes, without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from flask_nucleon_amqp import Message, MessageStateError
from flask_nucleon_amqp.message import _NOTHING, encode_body

FRAME = {
    "body": b'{"a": 1}', "headers": {"h": "v", "x-puka-delivery-tag": 7}, "exchange": "ex", "routing_key": "rk",
    "redelivered": True, "delivery_tag": 42, "consumer_tag": "1.0.",
    "properties": {"content_type": "application/json", "type_": "event", "priority": 2},
}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def _settle(self, message: Message, action: str, requeue: bool) -> None:
        self.calls.append((message.delivery_tag, action, requeue))


def test_reads_like_the_nucleon_result_dict_and_has_attributes() -> None:
    message = Message.from_frame(FRAME, Recorder())
    assert message["body"] == message.body == b'{"a": 1}'
    assert message["headers"] == message.headers == {"h": "v"}  # puka's bookkeeping header is gone
    assert (message.exchange, message.routing_key, message.redelivered) == ("ex", "rk", True)
    assert (message.delivery_tag, message.consumer_tag) == (42, "1.0.")
    assert (message.content_type, message.type, message.priority) == ("application/json", "event", 2)
    assert message.correlation_id is None and message["type"] == "event"
    assert message.json() == {"a": 1} and message.text == '{"a": 1}'
    assert "42" in repr(message)
    with pytest.raises(AttributeError):
        message.no_such_field  # noqa: B018


def test_settling_once_and_only_once() -> None:
    owner = Recorder()
    message = Message.from_frame(FRAME, owner)
    message.reject(requeue=False)
    assert owner.calls == [(42, "reject", False)] and message.settled
    with pytest.raises(MessageStateError, match="already"):
        message.ack()
    unowned = Message.from_frame(FRAME)
    with pytest.raises(MessageStateError, match="no_ack"):
        unowned.nack()


@pytest.mark.parametrize(("body", "expected"), [
    (b"raw", b"raw"), ("é", "é".encode()), (bytearray(b"ba"), b"ba"), (memoryview(b"mv"), b"mv"), (None, b""),
])
def test_body_encoding(body: object, expected: bytes) -> None:
    assert encode_body(body, _NOTHING, {}) == expected


def test_json_body_sets_content_type_and_keeps_one_given() -> None:
    properties: dict[str, Any] = {}
    assert encode_body(None, {"k": [1, None]}, properties) == b'{"k":[1,null]}'
    assert properties == {"content_type": "application/json"}
    properties = {"content_type": "application/vnd.x+json"}
    encode_body(None, None, properties)  # json=None is the JSON value null
    assert properties["content_type"] == "application/vnd.x+json"


@pytest.mark.parametrize("body", [1, 2.0, {"a": 1}, ["x"], object()])
def test_other_body_types_are_type_errors(body: object) -> None:
    with pytest.raises(TypeError, match="bytes or str"):
        encode_body(body, _NOTHING, {})
