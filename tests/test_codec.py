"""The codec (issue 16): every AMQP field type both ways, with pika as the other client, and every value
the broker would choke on refused at the call, before anything is sent."""

from __future__ import annotations

import datetime
import decimal
import struct
import uuid
from collections.abc import Iterator
from typing import Any, cast

import gevent
import pika.data
import pytest
from _pika_peer import Raw, pika_codec, pika_get, pika_peer, pika_publish, raw
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_nucleon_amqp import AMQP, PukaConnection, Unroutable, _codec, memory
from flask_nucleon_amqp.memory import MemoryConnection

from _proxy import Proxy
from conftest import BROKER_HOST, BROKER_PORT, Names, make_app, wait_until

UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def pika_channel() -> Iterator[Any]:
    with pika_peer() as channel:
        yield channel


def typed(value: Any) -> Any:
    """``value`` with every leaf tagged by its exact type (and floats by their bits), for strict comparison."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    if isinstance(value, float):
        return ("float", struct.pack(">d", value))
    if type(value).__module__ == "pika.compat":  # pika's ``long``, an int subclass
        return ("int", int(value))
    return (type(value).__name__, value)


def f32(bits: int) -> float:
    return float(struct.unpack(">f", struct.pack(">I", bits))[0])


# -- received: every field type another client can send ------------------------------------------

#: What pika sends (raw field bytes where pika has no encoding of its own) and what a consumer gets.
FROM_PIKA: dict[str, tuple[Any, Any]] = {
    "t-false": (Raw(b"t\x00"), False), "t-true": (Raw(b"t\x01"), True),
    "b-min": (raw("b", "b", -128), -128), "b-minus-one": (raw("b", "b", -1), -1), "b-max": (raw("b", "b", 127), 127),
    "B-zero": (raw("B", "B", 0), 0), "B-max": (raw("B", "B", 255), 255),
    "s-min": (raw("s", "h", -(2**15)), -(2**15)), "s-max": (raw("s", "h", 2**15 - 1), 2**15 - 1),
    "u-max": (raw("u", "H", 2**16 - 1), 2**16 - 1), "u-zero": (raw("u", "H", 0), 0),
    "I-min": (raw("I", "i", -(2**31)), -(2**31)), "I-max": (raw("I", "i", 2**31 - 1), 2**31 - 1),
    "i-max": (raw("i", "I", 2**32 - 1), 2**32 - 1),
    "l-min": (raw("l", "q", -(2**63)), -(2**63)), "l-max": (raw("l", "q", 2**63 - 1), 2**63 - 1),
    "L-min": (raw("L", "q", -(2**63)), -(2**63)), "L-max": (raw("L", "q", 2**63 - 1), 2**63 - 1),
    "f-half": (raw("f", "f", 1.5), 1.5), "f-minus-zero": (raw("f", "I", 0x80000000), -0.0),
    "f-subnormal": (raw("f", "I", 1), f32(1)), "f-max": (raw("f", "I", 0x7F7FFFFF), f32(0x7F7FFFFF)),
    "d-tenth": (raw("d", "d", 0.1), 0.1), "d-minus-zero": (raw("d", "d", -0.0), -0.0),
    "d-subnormal": (raw("d", "d", 5e-324), 5e-324), "d-max": (raw("d", "d", 1.7976931348623157e308),
                                                               1.7976931348623157e308),
    "D-int-max": (Raw(b"D" + struct.pack(">Bi", 0, 2**31 - 1)), decimal.Decimal("2147483647")),
    "D-min": (Raw(b"D" + struct.pack(">Bi", 2, -(2**31))), decimal.Decimal("-21474836.48")),
    "D-255-places": (Raw(b"D" + struct.pack(">Bi", 255, 1)), decimal.Decimal("1E-255")),
    "D-zero": (Raw(b"D" + struct.pack(">Bi", 3, 0)), decimal.Decimal("0.000")),
    "S-non-bmp": ("\N{GRINNING FACE}\N{MUSICAL SYMBOL G CLEF}é", "\N{GRINNING FACE}\N{MUSICAL SYMBOL G CLEF}é"),
    "S-empty": ("", ""), "S-not-utf8": (Raw(b"S\x00\x00\x00\x02\xff\xfe"), b"\xff\xfe"),
    "x-bytes": (b"\x00\xff", b"\x00\xff"), "x-empty": (b"", b""),
    "T-epoch": (raw("T", "Q", 0), datetime.datetime(1970, 1, 1)),
    "T-2038": (raw("T", "Q", 2**31), datetime.datetime(2038, 1, 19, 3, 14, 8)),
    "T-last": (raw("T", "Q", 253402300799), datetime.datetime(9999, 12, 31, 23, 59, 59)),
    "F-empty": ({}, {}), "A-empty": ([], []), "V": (None, None),
    "F-nested": ({"a": {"b": raw("b", "b", -2), "c": [raw("u", "H", 7), "x"]}}, {"a": {"b": -2, "c": [7, "x"]}}),
    "A-mixed": ([raw("B", "B", 200), raw("i", "I", 2**31), raw("f", "f", 0.5), None, [[]], {"k": True}],
                [200, 2**31, 0.5, None, [[]], {"k": True}]),
    "F-99-deep": ("deep", None),  # filled in below: the deepest table a consumer reads
}


def _deep(levels: int) -> Any:
    table: dict[str, Any] = {}
    for _ in range(levels - 1):
        table = {"a": table}
    return table


@pytest.fixture
def queue(conn: PukaConnection, names: Names) -> str:
    name = names.queue()
    conn.queue_declare(name)
    return name


def test_every_field_type_another_client_sends_arrives_with_its_type(
        conn: PukaConnection, queue: str, pika_channel: Any) -> None:
    headers = {key: sent for key, (sent, _) in FROM_PIKA.items()}
    expected = {key: wanted for key, (_, wanted) in FROM_PIKA.items()}
    # 100 levels counting the headers table itself: the limit, which still decodes.
    headers["F-99-deep"], expected["F-99-deep"] = _deep(99), _deep(99)
    pika_publish(pika_channel, queue, b"all types", headers)
    message = conn.get(queue)
    assert message is not None and message.decode_error is None
    assert typed(message.headers) == typed(expected)
    message.ack()


# -- sent: every Python type, read by another client ---------------------------------------------

#: What this client publishes, and what pika (a peer with its own decoder) reads.
TO_PIKA: dict[str, tuple[Any, Any]] = {
    "str": ("\N{GRINNING FACE}é plain", "\N{GRINNING FACE}é plain"), "str-empty": ("", ""),
    "bytes-utf8": (b"text", "text"), "bytes-binary": (b"\xff\x00", b"\xff\x00"),
    "int32-min": (-(2**31), -(2**31)), "int32-max": (2**31 - 1, 2**31 - 1),
    "int64-min": (-(2**63), -(2**63)), "int64-max": (2**63 - 1, 2**63 - 1), "int-past-32": (2**31, 2**31),
    "true": (True, True), "false": (False, False), "none": (None, None),
    "float-tenth": (0.1, 0.1), "float-minus-zero": (-0.0, -0.0), "float-subnormal": (5e-324, 5e-324),
    "float-max": (1.7976931348623157e308, 1.7976931348623157e308),
    "decimal": (decimal.Decimal("-1.250"), decimal.Decimal("-1.250")),
    "decimal-int32-edge": (decimal.Decimal("-2147483648"), decimal.Decimal("-2147483648")),
    "decimal-255-places": (decimal.Decimal("1E-255"), decimal.Decimal("1E-255")),
    "naive-datetime": (datetime.datetime(2020, 1, 2, 3, 4, 5, 678), datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)),
    "aware-datetime": (datetime.datetime(2020, 1, 2, 5, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
                       datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)),
    "epoch": (datetime.datetime(1970, 1, 1), datetime.datetime(1970, 1, 1, tzinfo=UTC)),
    "year-9999": (datetime.datetime(9999, 12, 31, 23, 59, 59), datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    "table": ({"a": {"b": [1, "x"]}, "": {}}, {"a": {"b": [1, "x"]}, "": {}}),
    "tuple": ((1, (2, 3)), [1, [2, 3]]), "list-empty": ([], []),
    "deep-100-levels": (_deep(99), _deep(99)),  # the limit, counting the headers table
}


def test_every_python_type_sent_reaches_another_client_exactly(
        conn: PukaConnection, queue: str, pika_channel: Any) -> None:
    headers = {key: sent for key, (sent, _) in TO_PIKA.items()}
    conn.publish("", queue, b"to pika", headers=headers)
    body, received = pika_get(pika_channel, queue)
    assert body == b"to pika"
    assert typed(received) == typed({key: wanted for key, (_, wanted) in TO_PIKA.items()})


def test_every_python_type_sent_comes_back_as_documented(conn: PukaConnection, queue: str) -> None:
    headers = {key: sent for key, (sent, _) in TO_PIKA.items()}
    conn.publish("", queue, b"to self", headers=headers)
    message = conn.get(queue)
    assert message is not None
    expected = {key: wanted.replace(tzinfo=None) if isinstance(wanted, datetime.datetime) else wanted
                for key, (_, wanted) in TO_PIKA.items()}
    assert typed(message.headers) == typed(expected)
    message.ack()


def test_field_types_on_the_wire() -> None:
    """The Python type -> field type table of docs/types.rst."""
    def kind(value: Any) -> bytes:
        return _codec.encode_table({"k": value})[6:7]

    assert [kind(v) for v in cast(tuple[Any, ...], ("s", b"b", bytearray(b"b"), True, None, 1, -(2**31), 2**31, 1.5,
                                                    decimal.Decimal("1.5"), datetime.datetime(2020, 1, 1),
                                                    {}, [], ()))] == \
        [b"S", b"S", b"S", b"t", b"V", b"I", b"I", b"l", b"d", b"D", b"T", b"F", b"A", b"A"]


# -- refused at the call ---------------------------------------------------------------------------

def _too_deep() -> dict[str, Any]:
    return cast(dict[str, Any], _deep(100))  # 101 levels with the headers table


def _cycle() -> dict[str, Any]:
    table: dict[str, Any] = {}
    table["again"] = table
    return table


#: id: (publish keyword arguments, exception, message pattern naming the argument or header)
BAD_VALUES: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "nan": ({"headers": {"f": float("nan")}}, ValueError, r"headers\['f'\]: nan"),
    "inf-nested": ({"headers": {"x": {"y": [1.0, float("inf")]}}}, ValueError, r"headers\['x'\]\['y'\]\[1\]: inf"),
    "minus-inf": ({"headers": {"f": float("-inf")}}, ValueError, r"headers\['f'\]"),
    "int-2**64": ({"headers": {"n": 2**64}}, ValueError, r"headers\['n'\]: integer .* 64 bits"),
    "int-below-int64": ({"headers": {"n": -(2**63) - 1}}, ValueError, r"headers\['n'\]"),
    "timestamp-2**64": ({"timestamp": 2**64}, ValueError, "timestamp"),
    "timestamp-1969": ({"timestamp": datetime.datetime(1969, 12, 31)}, ValueError, "timestamp"),
    "timestamp-negative": ({"timestamp": -1}, ValueError, "timestamp"),
    "header-1969": ({"headers": {"d": datetime.datetime(1969, 12, 31)}}, ValueError, r"headers\['d'\]: .*1970"),
    "object": ({"headers": {"o": object()}}, TypeError, r"headers\['o'\]: cannot send a value of type object"),
    "set": ({"headers": {"s": {1, 2}}}, TypeError, r"headers\['s'\]: .* set"),
    "date": ({"headers": {"day": datetime.date(2020, 1, 1)}}, TypeError, r"headers\['day'\]: .*datetime"),
    "decimal-nan": ({"headers": {"d": decimal.Decimal("NaN")}}, ValueError, r"headers\['d'\]: NaN"),
    "decimal-too-big": ({"headers": {"d": decimal.Decimal("1E+10")}}, ValueError, r"headers\['d'\]"),
    "decimal-256-places": ({"headers": {"d": decimal.Decimal("1E-256")}}, ValueError, r"headers\['d'\]: .*255"),
    "too-deep": ({"headers": {"t": _too_deep()}}, ValueError, r"headers\['t'\].*deeper than 100"),
    "cycle": ({"headers": {"c": _cycle()}}, ValueError, r"headers\['c'\]\['again'\].*deeper than 100"),
    "key-256-bytes": ({"headers": {"k" * 256: 1}}, ValueError, "headers: key .* 256 bytes long"),
    "key-not-str": ({"headers": {"t": {7: 1}}}, TypeError, r"headers\['t'\]: key 7 must be a str"),
    "over-frame-max": ({"headers": {"h": "x" * 140_000}}, ValueError, "headers: .*frame_max 131072"),
    "many-over-frame-max": ({"headers": {f"k{i}": "v" * 100 for i in range(1400)}}, ValueError, "frame_max"),
    "priority-256": ({"priority": 256}, ValueError, "priority"),
    "headers-not-dict": ({"headers": [("a", 1)]}, TypeError, "headers must be a dict"),
    "lone-surrogate": ({"headers": {"a": ["ok", "\ud800"]}}, ValueError, r"headers\['a'\]\[1\]: .*not valid Unicode"),
    "lone-surrogate-key": ({"headers": {"\udfff": 1}}, ValueError, "headers: key .* not valid Unicode"),
    "lone-surrogate-property": ({"correlation_id": "\ud800"}, ValueError, "correlation_id is not valid Unicode"),
}


@pytest.fixture(params=["rabbitmq", "memory"])
def any_conn(request: pytest.FixtureRequest) -> Iterator[PukaConnection | MemoryConnection]:
    """A connection to RabbitMQ, or to a memory broker of this test's own (the same refusals)."""
    name = f"test-codec-{uuid.uuid4().hex[:12]}"
    app: Flask = make_app(AMQP_URL=f"memory://{name}") if request.param == "memory" else make_app()
    AMQP(app)
    try:
        yield app.extensions["amqp"].connection()
    finally:
        app.extensions["amqp"].close(timeout=5)
        memory.reset(name)


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_refused_at_the_call_and_the_connection_carries_on(
        any_conn: Any, names: Names, case: str) -> None:
    kwargs, error, pattern = BAD_VALUES[case]
    queue = names.queue()
    any_conn.queue_declare(queue)
    with pytest.raises(error, match=pattern):
        any_conn.publish("", queue, b"bad", **kwargs)
    called: list[Any] = []
    with pytest.raises(error, match=pattern):
        any_conn.publish("", queue, b"bad", callback=lambda *args: called.append(args), **kwargs)
    with pytest.raises(error, match=pattern):
        any_conn.publish("", queue, b"bad", mandatory=True, **kwargs)
    any_conn.publish("", queue, b"good", headers={"ok": 1})
    message = any_conn.get(queue)
    assert message is not None and message.body == b"good" and message.headers == {"ok": 1}
    message.ack()
    assert any_conn.get(queue) is None  # nothing of the refused calls reached the queue
    gevent.sleep(0.05)
    assert called == [] and any_conn.pending == 0
    assert any_conn.stats["lost"] == 0 and any_conn.is_open


def test_largest_header_that_fits_is_sent(conn: PukaConnection, queue: str) -> None:
    # 131072 frame_max - 8 frame overhead - 14 content header - 4 table size - 1+1 key - 1+4 string header
    value = "x" * (131072 - 8 - 14 - 4 - 2 - 5)
    conn.publish("", queue, b"big", headers={"h": value})
    with pytest.raises(ValueError, match="frame_max"):
        conn.publish("", queue, b"big", headers={"h": value + "x"})
    message = conn.get(queue)
    assert message is not None and message.headers == {"h": value}
    message.ack()
    assert conn.stats["lost"] == 0


def test_a_smaller_negotiated_frame_max_is_enforced_at_the_call(conn: PukaConnection, queue: str) -> None:
    """A broker may tune frame_max below 131072: the check uses the connection's own value."""
    conn.publish("", queue, b"open")  # the session exists
    session = conn._session
    assert session is not None
    session.client.frame_max = 8192  # as if the broker had said so at the handshake
    called: list[Any] = []
    for callback in (None, lambda *args: called.append(args)):
        with pytest.raises(ValueError, match="frame_max 8192"):
            conn.publish("", queue, b"x", headers={"h": "x" * 9000}, callback=callback)
    assert conn.pending == 0 and called == []
    conn.publish("", queue, b"fits", headers={"h": "x" * 8000})
    assert [conn.get(queue, no_ack=True).body for _ in range(2)] == [b"open", b"fits"]


# -- the poison of issue 16 ------------------------------------------------------------------------

def test_an_unsigned_byte_header_no_longer_wedges_the_queue(
        conn: PukaConnection, queue: str, pika_channel: Any) -> None:
    pika_publish(pika_channel, queue, b"java-ish", {"retries": raw("B", "B", 5), "count": raw("u", "H", 9)})
    pika_publish(pika_channel, queue, b"behind it", {"n": 1})
    first = conn.get(queue)
    assert first is not None and first.headers == {"retries": 5, "count": 9}
    first.ack()
    second = conn.get(queue)
    assert second is not None and second.body == b"behind it"
    second.ack()
    assert conn.stats["lost"] == 0


# -- mandatory publishes carry no private header ---------------------------------------------------

def test_mandatory_publishes_carry_no_private_header(conn: PukaConnection, queue: str, pika_channel: Any) -> None:
    conn.publish("", queue, b"m", headers={"a": 1}, mandatory=True)
    conn.publish("", queue, b"n", mandatory=True)
    assert pika_get(pika_channel, queue) == (b"m", {"a": 1})
    assert pika_get(pika_channel, queue) == (b"n", {})


def test_many_concurrent_mandatory_publishes_each_get_their_own_outcome(
        conn: PukaConnection, names: Names, pika_channel: Any) -> None:
    """Returns are matched in the client: unroutable ones fail, routed ones (slowly confirmed) succeed.

    Routed messages are persistent, to a durable queue: their confirms wait
    for the disk, so returns of later publishes arrive while they are in flight.
    """
    exchange, queue = names.exchange(), names.queue()
    conn.exchange_declare(exchange, "direct")
    conn.queue_declare(queue, durable=True)
    conn.queue_bind(queue, exchange, "routed")
    outcomes: dict[int, Any] = {}

    def publish(i: int) -> None:
        key = "routed" if i % 3 else f"nowhere-{i % 2}"
        body = b"same" if i % 5 == 0 else f"m{i}".encode()
        try:
            if i % 4 == 0:
                done = gevent.event.AsyncResult()
                conn.publish(exchange, key, body, mandatory=True, persistent=True,
                             callback=lambda _promise, result: done.set(result))
                result = done.get(timeout=30)
                outcomes[i] = result if isinstance(result, Exception) else "ok"
            else:
                conn.publish(exchange, key, body, mandatory=True, persistent=True)
                outcomes[i] = "ok"
        except Exception as exc:  # noqa: BLE001
            outcomes[i] = exc

    gevent.joinall([gevent.spawn(publish, i) for i in range(300)], timeout=60, raise_error=True)
    assert len(outcomes) == 300
    for i, result in outcomes.items():
        if i % 3:
            assert result == "ok", (i, result)
        else:
            assert isinstance(result, Unroutable), (i, result)
    routed = sum(1 for i in range(300) if i % 3)
    assert wait_until(lambda: conn.queue_declare(queue, passive=True)["message_count"] == routed)
    for _ in range(routed):
        _, headers = pika_get(pika_channel, queue)
        assert headers == {}
    assert conn.stats["lost"] == 0


_BASIC_ACK = struct.pack(">HH", 60, 80)


def test_a_return_waits_for_its_own_confirm_when_an_earlier_one_comes_between(names: Names) -> None:
    """return(2), ack(1), ack(2): a broker may confirm a routed publish between another's return and its ack.

    (RabbitMQ confirms in any order, individually when a lower tag is still unconfirmed.) The proxy holds
    the broker's acks and sends them in exactly that order; the return must still reach publish 2.
    """
    acks: list[tuple[int, bytes]] = []

    def hold_acks(frame_type: int, channel: int, payload: bytes) -> bytes | None:
        if frame_type == 1 and channel and payload[:4] == _BASIC_ACK:
            acks.append((channel, payload))
            return None
        return payload

    proxy = Proxy((BROKER_HOST, BROKER_PORT), rewrite=hold_acks)
    app = make_app(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
    AMQP(app)
    state = app.extensions["amqp"]
    exchange, queue = names.exchange(), names.queue()
    try:
        state.exchange_declare(exchange, "direct")
        state.queue_declare(queue)
        state.queue_bind(queue, exchange, "routed")
        conn = state.connection()
        outcomes: dict[str, gevent.event.AsyncResult] = {key: gevent.event.AsyncResult() for key in ("routed", "lost")}
        for key in outcomes:  # tags 1 and 2 of the exchange's publish channel
            conn.publish(exchange, key, b"m", mandatory=True,
                         callback=lambda _promise, result, key=key: outcomes[key].set(result))
        # Both confirmed by the broker (held here); the return of 2 went through.
        def tags() -> set[int]:  # a multiple ack covers the tags below it
            found = {struct.unpack_from(">Q", payload, 4)[0] for _channel, payload in acks}
            if not found:
                return found
            return set(range(1, max(found) + 1)) if any(payload[12] & 1 for _c, payload in acks) else found
        assert wait_until(lambda: tags() == {1, 2}, timeout=5), acks
        gevent.sleep(0.2)
        assert not any(result.ready() for result in outcomes.values())
        channel = acks[-1][0]
        for tag in (1, 2):
            payload = _BASIC_ACK + struct.pack(">QB", tag, 0)
            proxy.inject(struct.pack("!BHI", 1, channel, len(payload)) + payload + b"\xce")
        assert outcomes["routed"].get(timeout=5) == {}
        assert isinstance(outcomes["lost"].get(timeout=5), Unroutable)
        assert state.queue_declare(queue, passive=True)["message_count"] == 1
    finally:
        state.queue_delete(queue)
        state.exchange_delete(exchange)
        state.close(timeout=5)
        proxy.close()


# -- generated tables, both directions -------------------------------------------------------------

_KEYS = st.text(max_size=8)
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), st.binary(max_size=12),
    st.builds(lambda raw, places: decimal.Decimal(f"{raw}E-{places}"), st.integers(-(2**31), 2**31 - 1),
              st.integers(0, 255)),
    st.datetimes(min_value=datetime.datetime(1970, 1, 1), max_value=datetime.datetime(9999, 12, 31, 23, 59, 59))
    .map(lambda moment: moment.replace(microsecond=0)),
)
_VALUES = st.recursive(_SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(
    _KEYS, children, max_size=4), max_leaves=12)
_TABLES = st.dictionaries(_KEYS, _VALUES, max_size=6)


def _as_received(value: Any) -> Any:
    """What a table value becomes on the way: bytes that are UTF-8 arrive as str, tuples as lists."""
    if isinstance(value, dict):
        return {key: _as_received(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_received(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _naive(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _naive(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_naive(item) for item in value]
    if isinstance(value, datetime.datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


@settings(derandomize=True, max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(table=_TABLES)
def test_generated_tables_round_trip_both_ways_with_pika(table: dict[str, Any]) -> None:
    with pika_codec():
        _round_trip_with_pika(table)


def _round_trip_with_pika(table: dict[str, Any]) -> None:
    ours = _codec.encode_table(table)
    assert typed(_codec.decode_table(ours)[0]) == typed(_as_received(table))
    theirs, _ = pika.data.decode_table(ours, 0)
    assert typed(_naive(theirs)) == typed(_as_received(table))
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, table)
    encoded = b"".join(pieces)
    decoded, end = _codec.decode_table(encoded)
    assert end == len(encoded)
    assert typed(decoded) == typed(_bytes_kept(table))  # pika sends bytes as 'x': they stay bytes


def _bytes_kept(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _bytes_kept(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bytes_kept(item) for item in value]
    return value
