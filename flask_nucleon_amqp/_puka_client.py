"""The puka client with its I/O-level defects mended: :class:`FixedClient`, and its send buffer.

:class:`FixedClient` subclasses :class:`puka.Client`: it reads and writes
frames in one pass each (queued as views, written with ``sendmsg``), fails
cleanly on any I/O or framing error, speaks TLS through an ``SSLContext``,
publishes with a channel per exchange, and gives the transport small accessors
so that no other module touches puka's internals. :mod:`._puka` (its module
patches, imported first) holds the rest of the fixes. Nothing here knows about
gevent: :mod:`._puka_session` drives a :class:`FixedClient`.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from struct import pack, unpack_from
from typing import Any

import puka
from puka import exceptions as puka_exceptions
from puka import machine as puka_machine
from puka import spec as puka_spec
from puka.client import machine_decorator

from ._codec import decode_properties, shortstr
from ._puka import ConnectionBroken, PendingPublish, _resolve, publish_frames

__all__ = ["FixedClient", "SendBuffer", "CLIENT_CAPABILITIES"]

log = logging.getLogger(__name__)
#: DEBUG: one line per frame sent and received (method, channel, sizes; never contents).
frame_log = logging.getLogger("flask_nucleon_amqp.frames")
_METHOD_NAMES = {value: name[len("METHOD_"):].lower().replace("_", ".", 1)
                 for name, value in vars(puka_spec).items() if name.startswith("METHOD_") and isinstance(value, int)}


def _log_frame(direction: str, frame_type: int, channel: int, payload: Any) -> None:
    """Log one frame's shape: the method of a method frame, the body size of a header; no contents."""
    size = len(payload)
    if frame_type == 0x01 and size >= 4:
        (method_id,) = unpack_from("!I", payload, 0)
        what = _METHOD_NAMES.get(method_id, f"method 0x{method_id:08x}")
    elif frame_type == 0x02 and size >= 12:
        what = f"content header (body {unpack_from('!Q', payload, 4)[0]} bytes)"
    elif frame_type == 0x03:
        what = "content body"
    elif frame_type == 0x08:
        what = "heartbeat"
    else:
        what = f"frame type {frame_type}"
    frame_log.debug("%s %s on channel %d, %d bytes", direction, what, channel, size)


# --- Writing -------------------------------------------------------------------------------


class SendBuffer:
    """Puka's send buffer, as a queue of chunks instead of one growing BytesIO.

    Bodies are queued as views, never copied: ``sendmsg`` hands the chunks to
    the kernel as they are. It has the methods puka calls on its buffer.
    """

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: deque[Any] = deque()
        self.size = 0

    def write(self, data: Any) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if data:
            self.chunks.append(data)
            self.size += len(data)

    def head(self, limit: int = 1024) -> list[Any]:
        """The first chunks, at most ``limit`` of them (IOV_MAX is 1024 on Linux)."""
        return list(islice(self.chunks, limit))

    def read(self, size: int = 256 * 1024) -> bytes:
        parts, total = [], 0
        for chunk in self.chunks:
            parts.append(chunk)
            total += len(chunk)
            if total >= size:
                break
        return b"".join(parts)[:size]

    def consume(self, size: int) -> None:
        self.size -= size
        chunks = self.chunks
        while size:
            first = chunks[0]
            if len(first) <= size:
                size -= len(first)
                chunks.popleft()
            else:
                chunks[0] = memoryview(first)[size:]
                size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0


# --- The client ----------------------------------------------------------------------------

#: What the client tells the broker it understands. puka replaces rather than
#: merges these (D10), so all of them are listed here.
CLIENT_CAPABILITIES = {
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "basic.nack": True,
    "publisher_confirms": True,
}


class FixedClient(puka.Client):  # type: ignore[misc]
    """A puka client with the I/O-level defects mended.

    Built with host, port and credentials as attributes rather than a URL,
    so that no password has to be put into (and parsed out of) a string.
    """

    attach_methods: tuple[Any, list[Any]] = (machine_decorator, [])  # puka's metaclass wants this
    sd: Any
    send_buf: Any
    #: puka's publish channel (a promise), made once the connection is open: shared beyond the per-exchange ones.
    x_publish_promise: Any

    def __init__(self, host: str, port: int, user: str, password: str, vhost: str, *,
                 heartbeat: int = 0, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, client_properties: dict[str, Any] | None = None) -> None:
        super().__init__("amqp:///", pubacks=True, heartbeat=heartbeat,
                         client_properties={**(client_properties or {}), "capabilities": CLIENT_CAPABILITIES})
        self.host, self.port = host, port
        self.username, self.password = user, password
        self.vhost = shortstr(vhost, "vhost")  # D4
        self.ssl = ssl_context is not None
        self.x_ssl_context = ssl_context
        self.x_server_hostname = server_hostname or host
        self.x_tls_error: BaseException | None = None
        #: Called with (blocked: bool, reason) on connection.blocked / unblocked (D10).
        self.x_on_blocked: Any = None
        #: Called with the exception when a read or write error shut the client down.
        self.x_on_fail: Any = None
        #: Called when the broker has nacked every publish for a while (see note_confirms).
        self.x_on_nack_streak: Any = None
        #: The publish channel (puka promise) of each exchange published to (D23).
        self.x_exchange_channels: dict[bytes, Any] = {}

    def __repr__(self) -> str:
        return f"<FixedClient {self.username}@{self.host}:{self.port}>"

    # D15, D10, D11: TCP_NODELAY, and the handlers puka registers too late or never.
    def _connect(self) -> Any:
        t = super()._connect()
        self.sd.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t.register(puka_spec.METHOD_CONNECTION_CLOSE, puka_machine._connection_close)
        t.register(puka_spec.METHOD_CONNECTION_BLOCKED, self._on_connection_blocked)
        t.register(puka_spec.METHOD_CONNECTION_UNBLOCKED, self._on_connection_unblocked)
        return t

    # D11: puka reads why the connect failed (SO_ERROR), then drops it: "cannot connect to ...: ".
    def on_write_connect(self) -> None:
        error = self.sd.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._shutdown(puka_exceptions.mark_frame(puka_spec.Frame(), ConnectionBroken(error, os.strerror(error))))
            return
        super().on_write_connect()

    def _on_connection_blocked(self, t: Any, result: Any) -> None:
        t.register(puka_spec.METHOD_CONNECTION_BLOCKED, self._on_connection_blocked)
        if self.x_on_blocked is not None:
            self.x_on_blocked(True, result.get("reason"))

    def _on_connection_unblocked(self, t: Any, result: Any) -> None:
        t.register(puka_spec.METHOD_CONNECTION_UNBLOCKED, self._on_connection_unblocked)
        if self.x_on_blocked is not None:
            self.x_on_blocked(False, None)

    # puka 0.0.8 always sends exchange.declare with passive=False: no way to check an exchange exists.
    def exchange_declare(self, exchange: Any, type: Any = "direct", durable: bool = False,
                         auto_delete: bool = False, arguments: Any = None, *, passive: bool = False,
                         callback: Any = None) -> int:
        """puka's exchange_declare, plus ``passive=True``: check the exchange exists, create nothing."""
        if not passive:
            number: int = super().exchange_declare(exchange, type=type, durable=durable, auto_delete=auto_delete,
                                                   arguments=arguments or {}, callback=callback)
            return number
        promise = self.promises.new(puka_machine._exchange_declare)
        # RabbitMQ compares nothing but the name on a passive declare.
        promise.x_frames = puka_spec.encode_exchange_declare(exchange, b"", True, False, False, False, {})
        promise.user_callback = callback
        promise.after_machine()
        return int(promise.number)

    # D25: TLS through an SSLContext, with SNI and host name checks.
    def _wrap_socket(self, sock: socket.socket) -> ssl.SSLSocket:
        assert self.x_ssl_context is not None
        return self.x_ssl_context.wrap_socket(sock, server_hostname=self.x_server_hostname,
                                              do_handshake_on_connect=False)

    def _tls_handshake(self) -> bool:
        """One step of the TLS handshake; True when it wants to write. Errors kill the client."""
        try:
            self.sd.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:
            return True
        except (ssl.SSLError, OSError) as exc:
            self.x_tls_error = exc
            self.fail(exc)
            return False
        self.needs_write = self.needs_write_nohandshake
        self.on_write = self.on_write_nohandshake
        self.on_read = self.on_read_nohandshake
        return bool(self.send_buf)

    def needs_write_handshake(self) -> bool:
        return self._tls_handshake()

    def on_read_handshake(self) -> None:
        self._tls_handshake()

    x_nack_streak_since: float | None = None
    x_nack_streak = 0

    def note_confirms(self, count: int, acked: bool) -> None:
        """Watch for a channel the broker nacks everything on.

        RabbitMQ 3.10 can leave a channel that first published to a quorum
        queue during a leader election with stale state: every later publish
        on it is nacked, while a new connection works. After 2 s and 20
        nacks without a single ack, ``x_on_nack_streak`` is told.
        """
        if acked:
            self.x_nack_streak_since, self.x_nack_streak = None, 0
            return
        now = time.monotonic()
        if self.x_nack_streak_since is None:
            self.x_nack_streak_since = now
        self.x_nack_streak += count
        if now - self.x_nack_streak_since > 2.0 and self.x_nack_streak >= 20 and self.x_on_nack_streak:
            self.x_nack_streak_since, self.x_nack_streak = None, 0
            self.x_on_nack_streak()

    # D2: a peer that is not an AMQP broker would leave puka waiting for a
    # "frame" of gigabytes; check the first frame header instead.
    def _handle_conn_read(self, data: bytes, offset: int) -> Any:
        if len(data) - offset >= 7 and not data[offset:].startswith(b"AMQP"):
            frame_type, _, size = unpack_from("!BHI", data, offset)
            if frame_type != 0x01 or size > self.frame_max:
                raise ConnectionBroken("the peer does not speak AMQP 0-9-1")
        return super()._handle_conn_read(data, offset)

    x_pending = b""
    x_framing_checked = False
    #: Whether frames are logged (frame_log at DEBUG): None until looked up, once per batch.
    x_log_frames: bool | None = None

    def on_read_nohandshake(self) -> None:
        """Read and dispatch every complete frame in one pass.

        puka re-reads its whole receive buffer for each frame and checks
        Python 2 at every step; this loop is its fast path once the first
        frame has passed the check above.
        """
        if not self.x_framing_checked:
            super().on_read_nohandshake()
            if self._handle_read == self._handle_frame_read and self.recv_buf is not None:
                self.x_framing_checked = True
                self.x_pending = self.recv_buf.read()
            return
        try:
            received = self.sd.recv(262144)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        if not received:
            self.fail(ConnectionBroken("the broker closed the socket"))
            return
        data = self.x_pending + received if self.x_pending else received
        size, offset = len(data), 0
        debug = frame_log.isEnabledFor(logging.DEBUG)  # once per read, not per frame
        channels = self.channels.channels
        methods = puka_spec.METHODS
        largest = self.frame_max - 8
        while size - offset >= 7:
            frame_type, number, length = unpack_from("!BHI", data, offset)
            if length > largest:
                raise ConnectionBroken(f"the broker sent a frame of {length} bytes, more than frame_max allows")
            end = offset + 7 + length
            if end >= size:
                break
            if data[end] != 0xCE:
                raise ConnectionBroken("frame end marker missing: the stream is corrupt")
            channel = channels.get(number)
            if channel is None and frame_type != 0x08:
                raise ConnectionBroken(f"the broker sent a frame for channel {number}, which was never opened")
            if debug:
                _log_frame("received", frame_type, number, memoryview(data)[offset + 7:end])
            if frame_type == 0x01:
                (method_id,) = unpack_from("!I", data, offset + 7)
                decode = methods.get(method_id)
                if decode is None:
                    raise ConnectionBroken(f"the broker sent unknown method {method_id >> 16}.{method_id & 0xFFFF}")
                try:
                    frame, after = decode(data, offset + 11)
                except Exception as exc:  # noqa: BLE001 - a method frame is the connection's business
                    raise ConnectionBroken(f"malformed method frame {method_id >> 16}.{method_id & 0xFFFF}: "
                                           f"{exc}") from exc
                if after != end:
                    raise ConnectionBroken(f"malformed {frame.name} frame: {length} bytes, {after - offset - 7} "
                                           "read")
                channel.inbound_method(frame)
            elif frame_type == 0x02:
                # The content header: what cannot be decoded in it is this message's problem (issue 18).
                if length < 14:
                    raise ConnectionBroken(f"content header of {length} bytes on channel {number}")
                class_id, body_size = unpack_from("!HxxQ", data, offset + 7)
                if class_id != 60:
                    raise ConnectionBroken(f"content header of class {class_id} on channel {number}")
                channel.inbound_props(body_size, decode_properties(data, offset + 19, end))
            elif frame_type == 0x03:
                channel.inbound_body(data[offset + 7:end])
            elif frame_type == 0x08:
                self._send_frames(0, [(0x08, b"")])
            else:
                raise ConnectionBroken(f"unknown frame type {frame_type}")
            offset = end + 1
            if self.sd is None:
                return
        self.x_pending = data[offset:] if offset < size else b""

    # D12: a dead client says so instead of AttributeError.
    def fileno(self) -> int:
        if self.sd is None:
            raise ConnectionBroken("connection is closed")
        return int(self.sd.fileno())

    def _send(self, data: bytes) -> None:
        if self.send_buf is None:
            raise ConnectionBroken("connection is closed")
        self.send_buf.write(data)

    def _init_buffers(self) -> None:
        super()._init_buffers()
        self.send_buf = SendBuffer()

    def _send_frames(self, channel_number: int, frames: Any) -> None:
        """Frame and queue payloads; small frames are joined, large bodies queued as views."""
        buf = self.send_buf
        if buf is None:
            raise ConnectionBroken("connection is closed")
        parts: list[Any] = []
        debug = self.x_log_frames
        if debug is None and frames:  # the first frames of a batch (the session's flush resets it): look once
            debug = self.x_log_frames = frame_log.isEnabledFor(logging.DEBUG)
        for frame_type, payload in frames:
            if isinstance(payload, str):
                payload = payload.encode("utf-8")
            if debug:
                _log_frame("sent", frame_type, channel_number, payload)
            header = pack("!BHI", frame_type, channel_number, len(payload))
            if len(payload) < 4096:
                parts += (header, payload, b"\xce")
            else:
                parts.append(header)
                buf.write(b"".join(parts))
                buf.write(payload)
                parts = [b"\xce"]
        buf.write(b"".join(parts))

    def on_write_nohandshake(self) -> None:
        """Send as much as the socket takes, without copying (``sendmsg``; TLS sockets join)."""
        buf = self.send_buf
        if not buf:
            return
        try:
            if self.ssl:
                sent = self.sd.send(buf.read(256 * 1024))
            else:
                sent = self.sd.sendmsg(buf.head())
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        buf.consume(sent)

    # D2, D13: any error while reading or writing shuts the client down and
    # resolves every promise, rather than leaving half-parsed state behind.
    def safe_read(self) -> None:
        try:
            self.on_read()
        except Exception as exc:  # noqa: BLE001 - any failure here poisons the connection
            self.fail(exc)

    def safe_write(self) -> None:
        try:
            self.on_write()
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Shut down with ``exc`` as the reason; every pending promise gets an error."""
        if self.sd is not None:
            log.debug("puka client %r failed: %r", self, exc)
            error = exc if isinstance(exc, ConnectionBroken) else ConnectionBroken(str(exc) or type(exc).__name__)
            self._shutdown(puka_exceptions.mark_frame(puka_spec.Frame(), error))
            if self.x_on_fail is not None:
                self.x_on_fail(exc)

    def _shutdown(self, result: Any) -> None:
        """puka's shutdown, minus the errors a half-closed socket raises (D12, D13)."""
        for promise in self.promises.all():
            if promise.to_be_released is False:
                promise.done(result)
        pending = self.pending_publishes()  # our publishes are not puka promises: fail them too
        for pt in self.publish_channels():
            pt.x_async_inflight.clear()
            pt.x_async_next = []
        for item in pending:
            item.done(result)
        sd, self.sd, self.send_buf = self.sd, None, None
        if sd is not None:
            try:
                sd.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sd.close()

    # D7: encode first, then take a delivery tag. Also faster than puka's own
    # encoder. No tracking header: returns are matched in the client (issue 16).
    def publish(self, exchange: bytes, routing_key: bytes, body: bytes, properties: dict[str, Any],
                mandatory: bool, callback: Any, deadline: float = float("inf")) -> None:
        """Queue a confirmed publish; ``callback(frame)`` runs once it is settled.

        :raises ValueError: the content header would not fit a frame; nothing was queued.
        """
        if self.send_buf is None:
            raise ConnectionBroken("connection is closed")
        pt = self.x_exchange_channels.get(exchange) or self._open_publish_channel(exchange)
        frames = publish_frames(exchange, routing_key, body, properties, mandatory, self.frame_max)
        delivery_tag = pt.x_delivery_tag
        pt.x_delivery_tag += 1
        pending = PendingPublish(callback, deadline, exchange, (exchange, routing_key, body) if mandatory else None)
        pt.x_async_next.append((delivery_tag, pending, frames))
        puka_machine._pt_async_flush(pt)

    #: How many exchanges get a publish channel of their own; publishes to further ones share puka's.
    x_exchange_channel_limit = 64

    def _open_publish_channel(self, exchange: bytes) -> Any:
        """The publish channel of an exchange not published to yet: a new one, while under the limit.

        A channel error a publish provokes (404 for a missing exchange, 406,
        403) closes its whole channel: with a channel per exchange, publishes
        to other exchanges are not in flight there (D23).
        """
        channels = self.x_exchange_channels
        if len(channels) >= self.x_exchange_channel_limit:
            return self.x_publish_promise
        shared = self.x_publish_promise
        puka_machine.publish_promise(self)  # a channel in confirm mode; publishes wait in x_async_next until then
        pt, self.x_publish_promise = self.x_publish_promise, shared
        pt.after_machine()  # a recycled channel is ready at once: puka runs its handler here
        channels[exchange] = pt
        return pt

    def publish_channels(self) -> list[Any]:
        """Every publish channel's puka promise: puka's own (shared) one, then one per exchange."""
        shared = getattr(self, "x_publish_promise", None)
        return ([] if shared is None else [shared]) + list(self.x_exchange_channels.values())

    def pending_publishes(self) -> list[Any]:
        """Publishes not yet settled, oldest first on each channel."""
        return [pending for pt in self.publish_channels()
                for pending in (*pt.x_async_inflight.values(), *(item[1] for item in pt.x_async_next))]

    def fail_publishes(self, error: BaseException, now: float | None = None) -> int:
        """Fail pending publishes: all of them, or those whose deadline is before ``now``.

        A failed publish is forgotten: a confirm that still comes is ignored.
        """
        failed = 0
        for pt in self.publish_channels():
            inflight = pt.x_async_inflight
            while inflight:
                tag = next(iter(inflight))
                pending = inflight[tag]
                if now is not None and pending.deadline > now:
                    break  # deadlines grow with tags (nearly always): the rest are younger
                del inflight[tag]
                _resolve(pending, error)
                failed += 1
            if not pt.x_async_next:
                continue
            keep = []
            for item in pt.x_async_next:  # not sent yet: the publish channel is (re)opening
                if now is None or item[1].deadline <= now:
                    _resolve(item[1], error)
                    failed += 1
                else:
                    keep.append(item)
            pt.x_async_next = keep
        return failed

    # -- the accessors the connection uses: nothing outside this module touches puka's internals -----
    def send_frames(self, channel_number: int, frames: Any) -> None:
        """Queue ready-made frames (acks, rejects, heartbeats, requests) on a channel."""
        self._send_frames(channel_number, frames)

    def find_promise(self, number: int | None) -> Any:
        """The live puka promise numbered ``number``, or None once it has ended."""
        return self.promises._promises.get(number)

    def channel_alive(self, channel: Any) -> bool:
        """True while ``channel`` is open and still this client's channel of its number."""
        return bool(channel is not None and channel.alive and self.channels.channels.get(channel.number) is channel)

    def channel_number(self, number: int | None) -> int | None:
        """The channel promise ``number`` runs on, or None when it has ended or has no channel."""
        promise = self.promises._promises.get(number)
        return None if promise is None or promise.channel is None else int(promise.channel.number)

    def release_get(self, number: int) -> None:
        """A message of basic.get ``number`` was settled: let puka release the channel the get holds."""
        promise = self.promises._promises.get(number)
        if promise is not None and promise.refcnt > 0:
            promise.refcnt_dec()

    def on_deliveries(self, number: int, handler: Callable[[Any, int, Any], None]) -> None:
        """Run ``handler(channel, promise_number, frame)`` for each delivery of consumer ``number``.

        Straight from the I/O greenlet: puka's ready-set and refcount are skipped (we settle on the channel).
        """
        deliver_method = puka_spec.METHOD_BASIC_DELIVER

        def deliver(promise: Any, result: Any) -> None:
            promise.register(deliver_method, deliver)
            handler(promise.channel, promise.number, result)

        self.promises.by_number(number).register(deliver_method, deliver)

    def on_consume_ok(self, number: int, ready: Callable[[], None]) -> None:
        """Call ``ready()`` once every consume-ok of consumer ``number`` has arrived (D17)."""
        self.promises.by_number(number).x_on_consume_ok = ready

    def on_returns(self, number: int, handler: Callable[[Any], None]) -> None:
        """Run ``handler(frame)`` for each basic.return on the channel of promise ``number`` (once registered)."""
        promise = self.promises._promises.get(number)
        return_method = puka_spec.METHOD_BASIC_RETURN
        if promise is None or return_method in promise.methods:
            return

        def returned(promise: Any, result: Any) -> None:
            promise.register(return_method, returned)
            handler(result)

        promise.register(return_method, returned)
