"""The one place that fixes puka 0.0.8 on Python 3: its module patches, and the frames we encode ourselves.

puka is pinned at 0.0.8 and is not forked: its defects are mended by a
subclass of :class:`puka.Client` (:mod:`._puka_client`) plus the
single-function patches of puka's module globals here, applied once on import.
Each fix names the defect it mends (numbering of the project's puka notes:
D1 ... D27) and has a test in ``tests/test_puka_fixes.py``.

Field tables and properties are encoded and decoded by :mod:`._codec`
(installed here in place of puka's ``table``/``spec`` functions): a delivery
whose properties cannot be decoded costs that message only, while frames that
break the protocol end the connection with a reason.

Here too: the frames of a publish (:func:`publish_frames`,
:func:`content_header`), and how confirms, nacks, returns and channel errors
settle the publishes in flight (:class:`PendingPublish`). Nothing here does
I/O of its own or knows about gevent.
"""

from __future__ import annotations

import logging
import re
from struct import pack, unpack_from
from typing import Any

import puka
from puka import channel as puka_channel
from puka import compat as puka_compat
from puka import exceptions as puka_exceptions
from puka import machine as puka_machine
from puka import promise as puka_promise
from puka import spec as puka_spec
from puka import table as puka_table

from ._codec import (
    PROPERTY_NAMES,
    DecodeError,
    decode_table,
    encode_properties,
    encode_table,
    lenient_str,
    shortstr,
)
from .exceptions import PublishNacked, PublishOutcomeUnknown

log = logging.getLogger(__name__)

__all__ = ["ConnectionBroken", "PendingPublish", "encode_table", "shortstr", "encode_properties",
           "content_header", "publish_frames", "PROPERTY_NAMES", "DecodeError", "FRAME_MAX"]

ConnectionBroken = puka_exceptions.ConnectionBroken


# --- Strings and tables --------------------------------------------------------------------

#: The largest frame puka asks for; the broker may tune it lower (see ``client.frame_max``).
FRAME_MAX = puka.connection.Connection.frame_max


def _lenient_as_str(obj: Any) -> Any:
    """Decode received bytes as UTF-8, keeping them as bytes when they are not (D5)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return lenient_str(bytes(obj))
    return obj


def _decode_table(encoded: bytes, offset: int) -> tuple[dict[Any, Any], int]:
    """puka's ``table.decode``, replaced: every field type, bounded nesting, clear errors (issue 16)."""
    return decode_table(encoded, offset)


def _encode_connection_start_ok(client_properties: Any, mechanism: Any, response: Any, locale: Any) -> Any:
    """puka's version packs character counts of the credentials (D4); send bytes."""
    response = response.encode("utf-8") if isinstance(response, str) else response
    mechanism = shortstr(mechanism, "mechanism")
    locale = shortstr(locale, "locale")
    payload = b"".join((
        pack("!I", puka_spec.METHOD_CONNECTION_START_OK), encode_table(client_properties, "client_properties"),
        pack("!B", len(mechanism)), mechanism, pack("!I", len(response)), response, pack("!B", len(locale)), locale,
    ))
    return ((0x01, payload),)


# --- Publishing ----------------------------------------------------------------------------

_METHOD_BASIC_PUBLISH = pack("!IH", puka_spec.METHOD_BASIC_PUBLISH, 0)


def content_header(properties: dict[str, Any], body_size: int, frame_max: int = FRAME_MAX) -> bytes:
    """Encode a content header and check that it fits one frame, before anything is queued.

    The broker closes the whole connection (501 FRAME_ERROR) on a content
    header larger than its frame_max; refusing the one publish is better.
    """
    header = encode_properties(properties, body_size)
    if len(header) + 8 > frame_max:
        raise ValueError(f"headers: the message's properties and headers take {len(header) - 14} bytes encoded; "
                         f"with frame_max {frame_max} at most {frame_max - 22} fit (send large values in the body)")
    return header


def publish_frames(exchange: bytes, routing_key: bytes, body: bytes, properties: dict[str, Any],
                   mandatory: bool, frame_max: int) -> list[tuple[int, Any]]:
    """The frames of one basic.publish: method, content header, body."""
    frames: list[tuple[int, Any]] = [
        (0x01, b"".join((_METHOD_BASIC_PUBLISH, pack("B", len(exchange)), exchange,
                         pack("B", len(routing_key)), routing_key, b"\x01" if mandatory else b"\x00"))),
        (0x02, content_header(properties, len(body), frame_max)),
    ]
    frames.extend(_body_frames(body, frame_max))
    return frames


def _body_frames(body: bytes, frame_max: int) -> list[tuple[int, Any]]:
    """Split a body into frames without re-slicing the rest each time (D16)."""
    limit = frame_max - 8
    if len(body) <= limit:
        return [(0x03, body)] if body else []
    view = memoryview(body)
    return [(0x03, view[i:i + limit]) for i in range(0, len(body), limit)]


# --- Inbound fixes -------------------------------------------------------------------------


def _inbound_body(self: Any, body_chunk: bytes) -> Any:
    """Keep bodies as bytes (D1) and properties apart from application headers (D24)."""
    self.body_chunks.append(body_chunk)
    self.body_len += len(body_chunk)
    if self.body_len == self.body_size:
        result = self.method_frame
        if result is None:
            raise ConnectionBroken(f"content without a method frame on channel {self.number}")
        props = self.props
        chunks = self.body_chunks
        result["body"] = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        result["headers"] = props.pop("headers", None) or {}
        result["properties"] = props
        self._clear_inbound_state()
        return self._handle_inbound(result)
    if self.body_len > self.body_size:
        raise ConnectionBroken(f"body frames on channel {self.number} are longer than their content header said")
    return None


def _handle_inbound(self: Any, result: Any) -> None:
    """Drop a frame for a channel nobody owns any more instead of crashing (D9)."""
    if self.promise is None:
        log.debug("dropped %s on a released channel %s", getattr(result, "name", result), self.number)
        return
    self.promise.recv_method(result)


def _recv_method(self: Any, result: Any) -> None:
    """Drop a method the promise did not ask for instead of raising KeyError (D9)."""
    callback = self.methods.pop(result.method_id, None)
    if callback is None:
        log.debug("dropped unexpected %s on promise %s", getattr(result, "name", result), self.number)
        return
    callback(self, result)


class _FrameBasicNack(puka_spec.Frame):  # type: ignore[misc]
    name = "basic.nack"
    method_id = puka_spec.METHOD_BASIC_NACK


def _decode_basic_nack(data: bytes, offset: int) -> tuple[Any, int]:
    frame = _FrameBasicNack()
    frame["delivery_tag"], bits = unpack_from("!QB", data, offset)
    frame["multiple"] = bool(bits & 1)
    frame["requeue"] = bool(bits & 2)
    return frame, offset + 9


_original_open_ok_puback = puka_machine._pt_channel_open_ok_puback


def _pt_channel_open_ok_puback(pt: Any, _result: Any = None) -> None:
    """Also listen for basic.nack on the publish channel (D6); returns held for the old channel are void."""
    _original_open_ok_puback(pt, _result)
    pt.register(puka_spec.METHOD_BASIC_NACK, _pt_basic_nack)
    pt.x_returns = []


def _settle_publishes(pt: Any, result: Any, failure: BaseException | None) -> None:
    """Resolve the publishes a basic.ack / basic.nack covers, oldest first.

    puka walks its in-flight map for every ack; confirms come in tag order,
    so popping from the front is enough (and O(1) per message).
    """
    tag = result["delivery_tag"] + pt.x_delivery_tag_shift
    inflight = pt.x_async_inflight
    if pt.x_returns:
        _settle_with_returns(pt, tag, result["multiple"], failure)
        return
    settled = 0
    if result["multiple"]:
        while inflight and next(iter(inflight)) <= tag:
            _resolve(inflight.popitem(last=False)[1], failure)
            settled += 1
    elif tag in inflight:
        _resolve(inflight.pop(tag), failure)
        settled = 1
    pt.conn.note_confirms(settled, failure is None)


def _pt_basic_return(pt: Any, result: Any) -> None:
    """Hold a basic.return until the confirm of its message, where it is matched (issue 16).

    puka matched returns to publishes with an ``x-puka-delivery-tag`` header
    that every consumer then saw. RabbitMQ sends a message's basic.return
    before the basic.ack that covers it, but confirms in any order; so a held
    return belongs to a mandatory publish still in flight: when an ack settles
    a publish, it takes the first held return with the same exchange, routing
    key and body (a routed twin of a returned message cannot exist: the same
    routing routes both alike).
    """
    pt.register(puka_spec.METHOD_BASIC_RETURN, _pt_basic_return)
    pt.x_returns.append(result)


def _settle_with_returns(pt: Any, tag: int, multiple: bool, failure: BaseException | None) -> None:
    inflight = pt.x_async_inflight
    returns = pt.x_returns
    if multiple:
        tags = []
        for key in inflight:
            if key > tag:
                break
            tags.append(key)
    else:
        tags = [tag] if tag in inflight else []
    for key in tags:
        pending = inflight.pop(key)
        returned = _take_return_of(returns, pending.returnable)
        if returned is not None:
            puka_exceptions.mark_frame(returned)
            pending.done(returned)
        else:
            _resolve(pending, failure)
    # A return stays held while its publish is in flight: confirms come in any order, so an earlier publish's
    # ack may come between a return and the ack of its own publish. The rest are of publishes that timed out.
    waited_for = [r for r in returns if any(_is_return_of(r, p.returnable) for p in inflight.values()
                                            if p.returnable is not None)]
    if len(waited_for) < len(returns):
        log.debug("dropped %d basic.return(s) of publishes nobody waits for", len(returns) - len(waited_for))
        returns[:] = waited_for
    pt.conn.note_confirms(len(tags), failure is None)


def _take_return_of(returns: list[Any], sent: tuple[bytes, bytes, bytes] | None) -> Any:
    """The first held return of a message like ``sent`` (removed from ``returns``), or None."""
    if sent is not None:
        for index, returned in enumerate(returns):
            if _is_return_of(returned, sent):
                return returns.pop(index)
    return None


def _is_return_of(returned: Any, sent: tuple[bytes, bytes, bytes]) -> bool:
    exchange, routing_key, body = sent
    return bool(returned.get("body") == body and _wire_str(returned.get("exchange")) == exchange
                and _wire_str(returned.get("routing_key")) == routing_key)


def _wire_str(value: Any) -> Any:
    return value.encode("utf-8") if isinstance(value, str) else value


def _resolve(pending: Any, failure: BaseException | None) -> None:
    frame = puka_spec.Frame()
    if failure is not None:
        puka_exceptions.mark_frame(frame, failure)
    pending.done(frame)


def _pt_basic_ack(pt: Any, result: Any) -> None:
    pt.register(puka_spec.METHOD_BASIC_ACK, _pt_basic_ack)
    _settle_publishes(pt, result, None)


def _pt_basic_nack(pt: Any, result: Any) -> None:
    pt.register(puka_spec.METHOD_BASIC_NACK, _pt_basic_nack)
    _settle_publishes(pt, result, PublishNacked("the broker nacked the message (basic.nack)"))


class PendingPublish:
    """What puka's publish map holds for one of our messages, instead of a puka promise.

    puka's handlers call ``done(frame)`` on it (ack, nack, return, channel
    close); we call the callback at once, in the I/O greenlet, without
    puka's promise bookkeeping.
    """

    __slots__ = ("callback", "deadline", "exchange", "returnable")

    def __init__(self, callback: Any, deadline: float, exchange: bytes,
                 returnable: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.callback = callback
        self.deadline = deadline
        self.exchange = exchange
        #: For a mandatory publish: exchange, routing key and body, to match a basic.return with.
        self.returnable = returnable

    def done(self, result: Any, **_: Any) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback(result)


_original_pt_channel_close = puka_machine._pt_channel_close
_NO_EXCHANGE = re.compile(r"no exchange '(.*)' in vhost '")


def _pt_channel_close(pt: Any, result: Any) -> None:
    """A channel error fails the publish that caused it, not the others in flight on its channel (D23).

    puka fails every in-flight publish of the channel with the broker's error,
    including publishes already routed. Here a publish gets the broker's error
    only when it is certainly the cause: it went to the exchange a 404 names,
    or it was the only one in flight. Every other one gets
    :class:`PublishOutcomeUnknown` (it may or may not have been routed).
    puka still reopens the channel.
    """
    inflight = list(pt.x_async_inflight.values())
    pt.x_async_inflight.clear()
    _original_pt_channel_close(pt, result)
    missing = _NO_EXCHANGE.search(str(result.get("reply_text", ""))) if result.get("reply_code") == 404 else None
    culprit = missing.group(1).encode("utf-8") if missing else None
    unknown: PublishOutcomeUnknown | None = None
    for pending in inflight:
        if pending.exchange == culprit or (culprit is None and len(inflight) == 1):
            pending.done(result)
            continue
        if unknown is None:
            unknown = PublishOutcomeUnknown(
                f"publish outcome unknown: another publish on its channel closed it "
                f"({result.get('reply_code')} {result.get('reply_text', '')}); the message may or may not "
                "have been routed", pt.conn.x_server_hostname, pt.conn.port)
        _resolve(pending, unknown)


_original_consume_ok = puka_machine._bcm_basic_consume_ok


def _bcm_basic_consume_ok(t: Any, result: Any) -> None:
    """Tell the consumer when every consume-ok has arrived, so qos/cancel can't race it (D17)."""
    _original_consume_ok(t, result)
    if not t.x_consumes:
        ready = getattr(t, "x_on_consume_ok", None)
        if ready is not None:
            ready()


_original_basic_cancel_one = puka_machine._basic_cancel_one


def _basic_cancel_one(ct: Any) -> None:
    """A consumer with no tag left is already being cancelled: its cancel-ok will finish (D17, D19)."""
    if ct.x_consumer_tag:
        _original_basic_cancel_one(ct)


def _bcm_basic_cancel(ct: Any, result: Any) -> None:
    """The broker cancelled the consumer (its queue was deleted).

    puka answers with a basic.cancel of its own; when ours is already under
    way, that one's cancel-ok ends the consumer, so nothing more is sent.
    """
    ct.register(puka_spec.METHOD_BASIC_CANCEL, puka_machine._generic_callback_nop)
    if getattr(ct, "x_mt", None) is None:
        ct.x_ct = ct
        puka_machine._basic_cancel(ct)


def _connection_close(t: Any, result: Any) -> None:
    """The broker closed the connection: puka's handler without its raw "Connection killed with {...}" ERROR (D11).

    The reason reaches the caller as the error of its operation (a refused login or vhost), or the
    log as the connection's own "connection to ... lost: <reason>" WARNING; puka's line repeated it
    on stderr.
    """
    puka_exceptions.mark_frame(result)
    t.ping(result)
    log.debug("the broker closed the connection: %r", result)
    t.conn._shutdown(result)


def _apply_patches() -> None:
    puka_compat.as_str = _lenient_as_str
    puka_spec.as_str = _lenient_as_str
    puka_table.encode = encode_table
    puka_table.decode = _decode_table
    puka_spec.encode_connection_start_ok = _encode_connection_start_ok
    puka_spec.METHODS[puka_spec.METHOD_BASIC_NACK] = _decode_basic_nack
    puka_channel.Channel.inbound_body = _inbound_body
    puka_channel.Channel._handle_inbound = _handle_inbound
    puka_promise.Promise.recv_method = _recv_method
    puka_machine._pt_channel_open_ok_puback = _pt_channel_open_ok_puback
    puka_machine._pt_basic_ack = _pt_basic_ack
    puka_machine._pt_channel_close = _pt_channel_close
    puka_machine._pt_basic_return = _pt_basic_return
    puka_machine._basic_cancel_one = _basic_cancel_one
    puka_machine._bcm_basic_cancel = _bcm_basic_cancel
    puka_machine._bcm_basic_consume_ok = _bcm_basic_consume_ok
    puka_machine._connection_close = _connection_close


_apply_patches()

#: How received short strings are decoded (UTF-8, or bytes when they are not UTF-8: D5).
as_str = _lenient_as_str
