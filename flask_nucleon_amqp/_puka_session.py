"""``_PukaSession``: one puka client on one socket, driven by its own I/O greenlet.

The I/O greenlet is the only code that reads the socket; it sleeps on socket
readiness through gevent's hub, never on a polling interval (or, when it has
just woken a consumer's greenlet, in that greenlet). Writes are flushed by
one hub callback per batch (a publish on a quiet connection goes out at once;
a writer greenlet waits for room when the kernel buffer is full); acks are
coalesced into ``basic.ack(multiple)``; heartbeats and publish deadlines run
on two hub timers. When the session ends, every waiter of the client gets an
error and the owning
:class:`~flask_nucleon_amqp.connection.PukaConnection` is told.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import gevent
import gevent.select
from gevent.event import AsyncResult, Event
from greenlet import greenlet
from puka import spec as puka_spec

from . import _puka
from ._connection_records import _BaseSession
from ._puka_client import FixedClient
from .config import Node
from .exceptions import AMQPError, AuthenticationError, ConnectionError, Timeout, VhostNotAllowed

if TYPE_CHECKING:
    from .connection import PukaConnection

__all__: list[str] = []

log = logging.getLogger("flask_nucleon_amqp.connection")

_READ, _WRITE = 1, 2
_CLIENT_PROPERTIES = {"product": "flask_nucleon_amqp", "platform": "Python/gevent"}


def _tls_failure(exc: BaseException) -> str:
    """Why the TLS handshake failed, without OpenSSL's source location (``(_ssl.c:1006)``)."""
    return "TLS handshake failed: " + re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))


def _callbacks_pending(loop: Any) -> bool:
    """True when the gevent loop has callbacks queued (``run_callback``); when it cannot tell, True."""
    callbacks = getattr(loop, "_callbacks", None)  # gevent's queue, on the libev and libuv loops alike
    return callbacks is None or len(callbacks) > 0


class _PukaSession(_BaseSession):
    """One puka client on one socket, with its I/O greenlet; never reused once dead."""

    def __init__(self, owner: PukaConnection, node: Node, address: str) -> None:
        settings = owner.settings
        self.owner = owner
        self.node = node
        self.hub = gevent.get_hub()
        self.client = FixedClient(
            address, node.port, settings.user, settings.password, settings.vhost,
            heartbeat=int(settings.heartbeat),
            ssl_context=settings.tls.context() if settings.tls else None,
            server_hostname=node.host, client_properties={
                # Shown by the broker (management UI, list_connections): which process holds it.
                **_CLIENT_PROPERTIES, "connection_name": f"{settings.name}[{owner.index}] pid {os.getpid()}"})
        self.client.x_on_blocked = owner._on_blocked
        self.client.x_on_fail = self._client_failed
        self.client.x_on_nack_streak = self._nacked_throughout
        self.opened = False
        self.alive = True
        self.ready = AsyncResult()
        self.death_reason: str | None = None
        self.server_properties: dict[str, Any] = {}
        self.flush_scheduled = False
        self.writer: gevent.Greenlet | None = None
        self.drained = Event()
        self.drained.set()
        self.last_recv = self.last_send = time.monotonic()
        self.heartbeat_timer: Any = None
        self.expiry_timer: Any = None
        #: Per channel: delivery tags not yet settled, in delivery order, and acks asked for but
        #: not yet sent. Acks go out at the next flush, as one basic.ack(multiple) for the run
        #: of settled tags at the front (the broker then handles one frame, not one per message).
        self.unsettled: dict[Any, deque[int]] = {}
        self.acks: dict[Any, set[int]] = {}
        self.settled: dict[Any, set[int]] = {}
        #: Channels whose oldest delivery stays unsettled for thousands of others: acked one by one.
        self.uncoalesced: set[Any] = set()
        self.io: gevent.Greenlet | None = None
        #: A consumer greenlet the I/O greenlet made and switches to when it next waits, with its consumer.
        self.next_worker: tuple[greenlet, Any] | None = None

    def __repr__(self) -> str:
        return f"<_PukaSession {self.owner.settings.safe_url(self.node)} alive={self.alive}>"

    @property
    def usable(self) -> bool:
        """False as soon as the socket is gone, even before the I/O greenlet has wound up."""
        return self.alive and self.client.sd is not None

    # -- opening ------------------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        """Connect and complete the AMQP handshake, or raise a ConnectionError."""
        settings = self.owner.settings
        where = settings.safe_url(self.node)
        try:
            self.client.connect(callback=self._on_connection_event)
        except OSError as exc:
            self.alive = False
            if self.client.sd is not None:  # puka made the socket before connect() failed
                self.client.sd.close()
            raise ConnectionError(f"cannot connect to {where}: {exc}", self.node.host, self.node.port) from None
        self.io = gevent.spawn(self._io_loop)
        if not self.ready.wait(timeout) and not self.ready.ready():
            self.kill(f"no answer within connect_timeout={timeout:g}s")
            raise ConnectionError(f"cannot connect to {where}: no answer within {timeout:g}s "
                                  "(connect_timeout)", self.node.host, self.node.port)
        result = self.ready.get()
        if result is not None:
            raise result

    def _on_connection_event(self, _number: int, result: Any) -> None:
        if self.opened:
            # The broker closed the connection (or we did); the I/O greenlet ends next.
            if result.is_error and result.get("reply_code") and self.death_reason is None:
                self.death_reason = f"{result['reply_code']} {result.get('reply_text', '')}".strip()
            return
        if not result.is_error:
            self.opened = True
            self.server_properties = dict(result.get("server_properties") or {})
            self.ready.set(None)
            return
        where = self.owner.settings.safe_url(self.node)
        code = result.get("reply_code")
        exc: AMQPError
        if code == 403:
            exc = AuthenticationError(f"broker at {where} refused the login: {result.get('reply_text', '')}",
                                      self.node.host, self.node.port)
        elif code == 530:
            exc = VhostNotAllowed(f"broker at {where} refused the vhost: {result.get('reply_text', '')}",
                                  self.node.host, self.node.port)
        else:
            tls_error = self.client.x_tls_error
            reason = _tls_failure(tls_error) if tls_error is not None else result.exception
            exc = ConnectionError(f"cannot connect to {where}: {reason}", self.node.host, self.node.port)
        if not self.ready.ready():
            self.ready.set(exc)

    # -- the I/O greenlet ---------------------------------------------------------------------
    def _io_loop(self) -> None:
        client = self.client
        try:
            fd = client.fileno()
            while not self.opened:  # connect, TLS and AMQP handshakes: read and write both matter
                want_write = client.needs_write()
                if client.sd is None:
                    return
                readable, writable, _ = gevent.select.select([fd], [fd] if want_write else [], [])
                if writable:
                    client.safe_write()
                if readable and client.sd is not None:
                    client.safe_read()
                client.run_any_callbacks()
                if client.sd is None:
                    return
            self._start_timers()
            self._write_some()
            watcher = self.hub.loop.io(fd, _READ)
            read, hub_wait, monotonic = client.safe_read, self.hub.wait, time.monotonic
            while client.sd is not None:
                handed = self.next_worker
                if handed is None:
                    hub_wait(watcher)
                else:
                    self.next_worker = None
                    self._wait_in_worker(watcher, *handed)
                self.last_recv = monotonic()
                read()
                if client.promises.ready:
                    client.run_any_callbacks()
                if client.send_buf and self.writer is None:
                    self._write_some()
        except gevent.GreenletExit:
            pass
        except Exception as exc:  # noqa: BLE001 - a bug here must still fail every waiter
            log.exception("I/O loop of %r failed", self)
            self.death_reason = self.death_reason or f"internal error: {exc!r}"
        finally:
            self._die()

    def _wait_in_worker(self, watcher: Any, worker: greenlet, consumer: Any) -> None:
        """Wait for the socket by switching to the consumer greenlet just made, not to the hub.

        Its callback then runs at once, not after a turn of the hub's loop; the
        greenlet still ends (or blocks) into the hub, which switches back here
        when the socket is readable. When the hub has callbacks to run (a
        ``consume()`` or a publisher this read woke up), they run first, as
        they would have if the consumer greenlet were started through the hub.
        """
        if _callbacks_pending(self.hub.loop):
            self.hub.loop.run_callback(worker.switch, consumer)
            self.hub.wait(watcher)
            return
        watcher.start(gevent.getcurrent().switch)
        try:
            worker.switch(consumer)
        finally:
            watcher.stop()

    def _die(self) -> None:
        handed, self.next_worker = self.next_worker, None
        if handed is not None:  # never switched to: it still has deliveries to run
            self.hub.loop.run_callback(handed[0].switch, handed[1])
        client = self.client
        if client.sd is not None:
            client.fail(_puka.ConnectionBroken(self.death_reason or "connection closed"))
        try:
            client.run_any_callbacks()
        except Exception:  # noqa: BLE001
            log.exception("callbacks of %r failed while it closed", self)
        self.alive = False
        for timer in (self.heartbeat_timer, self.expiry_timer):
            if timer is not None:
                timer.stop()
        self.drained.set()
        if not self.ready.ready():
            self.ready.set(ConnectionError(
                f"cannot connect to {self.owner.settings.safe_url(self.node)}: {self.death_reason or 'closed'}",
                self.node.host, self.node.port))
        self.owner._session_ended(self)

    def _nacked_throughout(self) -> None:
        """Every publish nacked for 2 s: start a new session (at most once every 30 s per connection).

        Seen on RabbitMQ 3.10 after a quorum queue's leader changed: the channel keeps stale state
        and only a new one publishes again. A queue refusing publishes (x-overflow) nacks only what
        goes to it, so other publishes' acks keep this from firing; a connection that publishes
        only to such a queue reconnects at most every 30 s.
        """
        now = time.monotonic()
        if now - self.owner._last_nack_reopen < 30.0:
            return
        self.owner._last_nack_reopen = now
        log.warning("the broker nacked every publish on %r for 2 s: opening a new connection", self)
        self.hub.loop.run_callback(self.kill, "every publish nacked for 2 s (stale channel state)")

    def _client_failed(self, exc: BaseException) -> None:
        """A read or write error shut the client down, wherever it happened: end the session."""
        if self.death_reason is None:
            self.death_reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if gevent.getcurrent() is not self.io:  # the I/O greenlet ends by itself
            self.kill(self.death_reason)

    def kill(self, reason: str) -> None:
        """End the session from any greenlet or hub callback; waiters get ConnectionLost."""
        if self.death_reason is None:
            self.death_reason = reason
        if self.io is not None and not self.io.dead:
            self.io.kill(block=False)
        elif self.alive:
            self._die()

    # -- writing ------------------------------------------------------------------------------
    def schedule_flush(self) -> None:
        """Send what is queued once the current greenlet yields: one send per batch."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.hub.loop.run_callback(self._flush)

    def queued(self) -> None:
        """A publish was queued: note the buffer's high-water mark, and send it.

        On a quiet connection (this publish, and at most one other awaiting its
        confirm) it goes out at once, not when the hub next runs callbacks:
        latency. Otherwise, and for every later publish of the same turn, it
        goes in one flush once the greenlet yields: one send per batch.
        """
        size = len(self.client.send_buf)
        stats = self.owner.stats
        if size > stats["buffer_peak"]:
            stats["buffer_peak"] = size
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.hub.loop.run_callback(self._flush)
            if self.writer is None and self.owner.pending <= 2:
                self._write_some()

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.acks:
            self.flush_acks()
        if self.writer is None and self.opened:
            self._write_some()

    def delivered(self, channel: Any, tag: int) -> None:
        """Note a delivery that needs settling (not a no_ack one)."""
        tags = self.unsettled.get(channel)
        if tags is None:
            if channel in self.uncoalesced:
                return
            tags = self.unsettled[channel] = deque()
        tags.append(tag)

    def ack_later(self, channel: Any, tag: int) -> None:
        if channel in self.uncoalesced:
            self.client.send_frames(channel.number, puka_spec.encode_basic_ack(tag, False))
            self.schedule_flush()
            return
        acks = self.acks.get(channel)
        if acks is None:
            acks = self.acks[channel] = set()
        acks.add(tag)
        self.schedule_flush()

    def settled_now(self, channel: Any, tag: int) -> None:
        """A reject or nack went out for ``tag``: it no longer holds back a multiple ack."""
        self.settled.setdefault(channel, set()).add(tag)

    def flush_acks(self) -> None:
        """Queue the acks asked for since the last flush, as few frames as the order allows.

        ``basic.ack(multiple=True)`` settles every outstanding delivery up to its tag on that
        channel, so it covers only a front run of tags that are all settled; an ack beyond a
        gap (a message still being processed) goes out on its own.
        """
        acks, self.acks = self.acks, {}
        client = self.client
        if client.send_buf is None:
            return
        for channel, tags in acks.items():
            if not client.channel_alive(channel):
                self.unsettled.pop(channel, None)  # the channel closed: the broker has requeued these
                self.settled.pop(channel, None)
                continue
            unsettled = self.unsettled.get(channel) or deque()
            settled = self.settled.get(channel) or set()
            last = None
            while unsettled and (unsettled[0] in tags or unsettled[0] in settled):
                tag = unsettled.popleft()
                if tag in tags:
                    tags.discard(tag)
                    last = tag
                else:
                    settled.discard(tag)
            frames = [] if last is None else list(puka_spec.encode_basic_ack(last, True))
            for tag in tags:  # beyond a gap: one by one, and remembered as settled
                frames.extend(puka_spec.encode_basic_ack(tag, False))
                settled.add(tag)
            if frames:
                client.send_frames(channel.number, frames)
            if len(unsettled) + len(settled) > 4096:
                # A message held for long keeps the run from ever reaching the others: stop
                # tracking (bounded memory) and ack this channel's messages one by one.
                self.uncoalesced.add(channel)
                self.unsettled.pop(channel, None)
                self.settled.pop(channel, None)
            elif settled:
                self.settled[channel] = settled

    def _write_some(self) -> None:
        """Write until the kernel buffer is full; then a writer greenlet waits for room."""
        client = self.client
        client.x_log_frames = None  # frames queued from now on are a new batch: it looks up the log level
        buf = client.send_buf
        while buf:
            before = len(buf)
            client.safe_write()
            buf = client.send_buf
            if buf is None:
                return
            if len(buf) == before:
                break
            self.last_send = time.monotonic()
        if buf:
            if len(buf) > self.owner.settings.max_buffer:
                self.drained.clear()
            if self.writer is None:
                self.writer = gevent.spawn(self._write_when_ready)
        else:
            self.drained.set()

    def _write_when_ready(self) -> None:
        client = self.client
        try:
            watcher = self.hub.loop.io(client.fileno(), _WRITE)
            while client.send_buf:
                self.hub.wait(watcher)
                before = len(client.send_buf)
                client.safe_write()
                if client.send_buf is not None and len(client.send_buf) != before:
                    self.last_send = time.monotonic()
                if client.send_buf is not None and len(client.send_buf) <= self.owner.settings.max_buffer // 2:
                    self.drained.set()
        except (_puka.ConnectionBroken, gevent.GreenletExit):
            pass
        finally:
            self.writer = None
            self.drained.set()

    # -- heartbeats ---------------------------------------------------------------------------
    def _start_timers(self) -> None:
        interval = self.owner.settings.heartbeat
        if interval > 0:
            self.heartbeat_timer = self.hub.loop.timer(interval / 2, interval / 2)
            self.heartbeat_timer.start(self._heartbeat_tick)
        every = min(1.0, max(0.01, self.owner.settings.operation_timeout / 10))
        self.expiry_timer = self.hub.loop.timer(every, every)
        self.expiry_timer.start(self._expire_publishes)

    def _expire_publishes(self) -> None:
        """Runs in the hub: fail publishes whose confirm is overdue (one timer, not one per publish)."""
        if self.client.send_buf is not None:
            self.client.fail_publishes(Timeout(
                f"publish on {self.owner.settings.safe_url(self.node)} was not confirmed in time; "
                "the message may still be routed"), now=time.monotonic())

    def _heartbeat_tick(self) -> None:
        """Runs in the hub: declare the peer dead after two silent intervals; keep ours alive."""
        interval = self.owner.settings.heartbeat
        now = time.monotonic()
        silent = now - self.last_recv
        if silent > 2 * interval:
            self.kill(f"missed heartbeats: nothing received for {silent:.1f}s (heartbeat={interval:g}s)")
        elif now - self.last_send >= interval / 2 and self.client.send_buf is not None:
            self.client.send_frames(0, [(0x08, b"")])
            self.schedule_flush()


