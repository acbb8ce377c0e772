"""PukaConnection: one broker connection shared by many greenlets.

Each connection owns at most one live :class:`_Session` (a puka client and
the greenlets that drive it). The session's I/O greenlet is the only code that
reads the socket; it sleeps on socket readiness through gevent's hub, never on
a polling interval. Callers hand puka a callback and wait on a gevent
primitive; writes are flushed by one hub callback per batch. User callbacks
run in a separate dispatcher greenlet, so a callback may itself make a
blocking call on the same connection.

When a session dies, every waiting greenlet gets :class:`ConnectionLost`.
The next operation opens a new session (trying each configured node in
turn); consumers registered with a callback are resumed on it by a
background recovery greenlet.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import gevent
import gevent.select
import gevent.socket
from gevent.event import AsyncResult, Event
from gevent.hub import Waiter
from puka import spec as puka_spec

from . import _puka, signals
from ._base import (
    _EXCHANGE_TYPES,
    _REPLY_TO,
    BaseConnection,
    _arguments,
    _BaseConsumer,
    _check_prefetch,
    _emit,
    _promise_ids,
    _properties,
)
from .config import Node, PoolSettings
from .exceptions import (
    AMQPError,
    AuthenticationError,
    ConnectionBlocked,
    ConnectionError,
    ConnectionLost,
    MessageStateError,
    Timeout,
    Unroutable,
    VhostNotAllowed,
    error_from_reply,
)
from .message import _NOTHING, Message, encode_body

__all__ = ["PukaConnection", "BaseConnection", "Callback"]

log = logging.getLogger(__name__)

#: callback(promise, result): result is the operation's result, or the exception it failed with.
Callback = Callable[[int, Any], Any]

_READ, _WRITE = 1, 2
_CLIENT_PROPERTIES = {"product": "flask_nucleon_amqp", "platform": "Python/gevent"}


class _Session:
    """One puka client on one socket, with its I/O greenlet; never reused once dead."""

    def __init__(self, owner: PukaConnection, node: Node, address: str) -> None:
        settings = owner.settings
        self.owner = owner
        self.node = node
        self.hub = gevent.get_hub()
        self.client = _puka.FixedClient(
            address, node.port, settings.user, settings.password, settings.vhost,
            heartbeat=int(settings.heartbeat),
            ssl_context=settings.tls.context() if settings.tls else None,
            server_hostname=node.host, client_properties=_CLIENT_PROPERTIES)
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

    def __repr__(self) -> str:
        return f"<_Session {self.owner.settings.safe_url(self.node)} alive={self.alive}>"

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
        self.io = gevent.spawn(self._run)
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
            reason = self.client.x_tls_error or result.exception
            exc = ConnectionError(f"cannot connect to {where}: {reason}", self.node.host, self.node.port)
        if not self.ready.ready():
            self.ready.set(exc)

    # -- the I/O greenlet ---------------------------------------------------------------------
    def _run(self) -> None:
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
                hub_wait(watcher)
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

    def _die(self) -> None:
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
        self.owner._session_died(self)

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
            self.client._send_frames(channel.number, puka_spec.encode_basic_ack(tag, False))
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
            if not channel.alive or client.channels.channels.get(channel.number) is not channel:
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
                client._send_frames(channel.number, frames)
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
            self.client._send_frames(0, [(0x08, b"")])
            self.schedule_flush()


class _Consumer(_BaseConsumer):
    """A registered consumer; survives reconnects (it is started again on each new session)."""

    def __init__(self, promise: int, queue: str, callback: Callable[[int, Message], Any] | None,
                 prefetch_count: int, no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> None:
        super().__init__(promise, queue, callback, prefetch_count, no_ack, exclusive, arguments)
        self.session: _Session | None = None
        self.puka_number: int | None = None
        self.started: AsyncResult = AsyncResult()


def _settable(result_box: AsyncResult) -> Callable[[int, Any], None]:
    return lambda _number, result: result_box.set(result)


class PukaConnection(BaseConnection[_Consumer]):
    """A connection shared by every greenlet of the process.

    Every method is synchronous (blocks only the calling greenlet until the
    broker answered; returns the result or raises) unless given
    ``callback=``: then it returns a promise id at once and later calls
    ``callback(promise, result)`` in the connection's callback greenlet, with
    the exception as ``result`` when the operation failed.

    ``timeout`` defaults to the pool's ``operation_timeout``.
    """

    _log = log

    def __init__(self, settings: PoolSettings, index: int = 0) -> None:
        super().__init__(settings, index)
        self._session: _Session | None = None
        self._opening: AsyncResult | None = None
        self._node_offset = index
        self._last_nack_reopen = float("-inf")
        #: Called with this connection after every (re)open, before consumers resume.
        self.on_open: list[Callable[[PukaConnection], Any]] = []

    @property
    def is_open(self) -> bool:
        return self._session is not None and self._session.usable

    @property
    def server_properties(self) -> dict[str, Any]:
        session = self._live_session()
        return session.server_properties

    # -- sessions -----------------------------------------------------------------------------
    def _live_session(self) -> _Session:
        session = self._session
        if session is not None and session.usable:
            return session
        return self._open()

    def _open(self) -> _Session:
        if self._closed:
            raise ConnectionError(f"{self!r} was closed", self.settings.nodes[0].host, self.settings.nodes[0].port)
        if self._opening is not None:
            result = self._opening.get()
            assert isinstance(result, _Session)
            return result
        opening = self._opening = AsyncResult()
        try:
            session = self._connect_any()
            self._session = session
            self._after_open(session)
        except BaseException as exc:
            opening.set_exception(exc)
            self._opening = None
            raise
        opening.set(session)
        self._opening = None
        return session

    def _connect_any(self) -> _Session:
        nodes = self.settings.nodes
        errors: list[str] = []
        last: ConnectionError | None = None
        for step in range(len(nodes)):
            node = nodes[(self._node_offset + step) % len(nodes)]
            try:
                session = self._connect_node(node)
            except (AuthenticationError, VhostNotAllowed):
                raise
            except ConnectionError as exc:
                last = exc
                errors.append(str(exc))
                continue
            self._node_offset = (self._node_offset + step) % len(nodes)
            return session
        assert last is not None
        if len(nodes) == 1:
            raise last
        raise ConnectionError("no broker node reachable: " + "; ".join(errors), nodes[0].host, nodes[0].port)

    def _connect_node(self, node: Node) -> _Session:
        timeout = self.settings.connect_timeout
        deadline = time.monotonic() + timeout
        if _is_ip_address(node.host):
            return self._connect_addresses(node, [node.host], deadline)
        infos = None
        try:
            with gevent.Timeout(timeout, False):
                infos = gevent.socket.getaddrinfo(node.host, node.port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionError(f"cannot resolve {node.host}: {exc}", node.host, node.port) from None
        if infos is None:
            raise ConnectionError(f"cannot resolve {node.host} within {timeout:g}s", node.host, node.port)
        return self._connect_addresses(node, list(dict.fromkeys(info[4][0] for info in infos)), deadline)

    def _connect_addresses(self, node: Node, addresses: list[str], deadline: float) -> _Session:
        last: ConnectionError | None = None
        for address in addresses:  # every address of the name in turn, not only the first (D26)
            session = _Session(self, node, address)
            try:
                session.start(max(0.001, deadline - time.monotonic()))
            except (AuthenticationError, VhostNotAllowed):
                raise
            except ConnectionError as exc:
                last = exc
                continue
            log.info("connected to %s (%s pool)", self.settings.safe_url(node), self.settings.name)
            self.stats["opened"] += 1
            _emit(signals.connection_opened, self, node=str(node))
            return session
        assert last is not None
        raise last

    def _after_open(self, session: _Session) -> None:
        for hook in list(self.on_open):
            try:
                hook(self)
            except Exception:  # noqa: BLE001
                # Consumers still resume; a missing queue then shows as their own error.
                log.exception("on_open hook %r failed on %r", hook, self)
        for consumer in list(self._consumers.values()):
            if consumer.callback is not None and not consumer.cancelled:
                self._start_consumer(consumer, session)

    def _session_died(self, session: _Session) -> None:
        if not session.opened:
            return  # a failed attempt; the caller has its error
        if self._session is session:
            self._session = None
        if self.blocked_reason is not None:  # an alarm belongs to the connection that got it
            self._on_blocked(False, None)
        self.stats["lost"] += 1
        if self._closed:
            log.info("closed connection to %s", self.settings.safe_url(session.node))
            return
        reason = session.death_reason or "closed by the broker"
        log.warning("connection to %s lost: %s", self.settings.safe_url(session.node), reason)
        _emit(signals.connection_lost, self, node=str(session.node), reason=reason)
        if len(self.settings.nodes) > 1:
            self._node_offset += 1  # try the next node first
        self._start_recovery()

    def _start_recovery(self) -> None:
        if self._recovery is None or self._recovery.dead:
            self._recovery = gevent.spawn(self._recover)

    def _recover(self) -> None:
        """Reopen in the background, with capped, jittered back-off, so consumers resume."""
        delay = 0.1
        while not self._closed and not self.is_open:
            try:
                self._open()
                self.stats["recovered"] += 1
                log.info("recovered connection to %s", self.settings.safe_url())
                node = self._session.node if self._session is not None else self.settings.nodes[0]
                _emit(signals.connection_recovered, self, node=str(node))
                return
            except (AuthenticationError, VhostNotAllowed) as exc:
                log.error("not reconnecting to %s: %s", self.settings.safe_url(), exc)
                return
            except AMQPError as exc:
                log.warning("reconnect failed, retrying in %.1fs: %s", delay, exc)
            gevent.sleep(delay * (0.5 + random.random()))
            # Capped so the longest sleep (1.5 x 3 s) plus one attempt stays under 5 s: a broker
            # that comes back is found within 5 s, however long it was away.
            delay = min(delay * 2, 3.0)

    def _on_blocked(self, blocked: bool, reason: Any) -> None:
        if blocked:
            self._set_blocked(reason)
            gevent.spawn_later(self.settings.blocked_timeout, self._fail_blocked_publishes, self._blocked_since)
        else:
            self._set_unblocked()

    def _fail_blocked_publishes(self, since: float) -> None:
        """A publish sent just before an alarm fails after blocked_timeout too, not operation_timeout."""
        if self.blocked_reason is None or self._blocked_since != since:
            return  # unblocked meanwhile (perhaps blocked again since: that alarm has its own timer)
        error = ConnectionBlocked(f"broker blocked publishing ({self.blocked_reason}) for more than "
                                  f"{self.settings.blocked_timeout:g}s (blocked_timeout); the message may "
                                  "still be routed once the alarm clears")
        session = self._session
        if session is not None and session.usable:
            session.client.fail_publishes(error)

    # -- calling puka ---------------------------------------------------------------------------
    def _error(self, result: Any, session: _Session, **context: Any) -> AMQPError:
        """Translate a failed puka result into our exception."""
        exc = result.exception
        if isinstance(exc, AMQPError):
            return exc
        code = result.get("reply_code") if hasattr(result, "get") else None
        if code and session.usable:
            return error_from_reply(code, str(result.get("reply_text", "")),
                                    host=session.node.host, port=session.node.port, **context)
        reason = session.death_reason or (f"{code} {result.get('reply_text', '')}" if code else "connection closed")
        return ConnectionLost(f"connection to {self.settings.safe_url(session.node)} lost: {reason}",
                              session.node.host, session.node.port)

    def _call(self, name: str, args: tuple[Any, ...], callback: Callback | None,
              timeout: float | None, **kwargs: Any) -> Any:
        session = self._live_session()
        method = getattr(session.client, name)
        if callback is None:
            box = AsyncResult()
            self._begin()
            try:
                method(*args, callback=_settable(box), **kwargs)
                session.schedule_flush()
                return self._wait(box, session, name, timeout)
            finally:
                self._end()
        promise = next(_promise_ids)
        self._begin()

        def done(_number: int, result: Any) -> None:
            self._end()
            value = self._error(result, session) if result.is_error else dict(result)
            self._dispatch(callback, promise, value)

        method(*args, callback=done, **kwargs)
        session.schedule_flush()
        return promise

    def _wait(self, box: AsyncResult, session: _Session, what: str, timeout: float | None, **context: Any) -> Any:
        """Wait for a puka result: the result as a dict, or the error raised; Timeout when none comes."""
        limit = self.settings.operation_timeout if timeout is None else timeout
        result = box.wait(limit)
        if result is None and not box.ready():
            raise Timeout(f"{what} on {self.settings.safe_url(session.node)} got no answer within {limit:g}s")
        if result.is_error:
            raise self._error(result, session, **context)
        return dict(result)

    def _begin(self) -> None:
        self.pending += 1
        self._idle.clear()

    def _end(self) -> None:
        self.pending -= 1
        if not self.pending and not self._dispatch_queue and not self._callback_running:
            self._idle.set()

    # -- callbacks ------------------------------------------------------------------------------
    def _dispatch(self, function: Callable[..., Any], *args: Any) -> None:
        """Run a user callback in this connection's callback greenlet, in order."""
        self._dispatch_queue.append((function, args))
        self._idle.clear()
        if self._dispatcher is None:
            self._dispatcher = gevent.spawn(self._dispatch_loop)
        elif not self._dispatch_wake.is_set():
            self._dispatch_wake.set()

    def _dispatch_loop(self) -> None:
        queue, wake = self._dispatch_queue, self._dispatch_wake
        while True:
            while queue:
                function, args = queue.popleft()
                self._callback_running = True
                try:
                    function(*args)
                except Exception:  # noqa: BLE001 - a failing callback must not stop the others
                    log.exception("AMQP callback %r raised", function)
                finally:
                    self._callback_running = False
            wake.clear()
            if not self.pending:
                self._idle.set()
            if not queue:
                wake.wait()

    # -- publishing -----------------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
                headers: dict[str, Any] | None = None, mandatory: bool = False, json: Any = _NOTHING,
                persistent: bool = False, content_type: str | None = None, content_encoding: str | None = None,
                delivery_mode: int | None = None, priority: int | None = None, correlation_id: str | None = None,
                reply_to: str | None = None, expiration: int | str | None = None, message_id: str | None = None,
                timestamp: int | datetime.datetime | None = None, type: str | None = None,
                app_id: str | None = None, user_id: str | None = None,
                callback: Callback | None = None, timeout: float | None = None, retry: int = 0) -> Any:
        """Publish a message; synchronously, return once the broker confirmed it.

        ``body`` is bytes (sent as is) or str (sent as UTF-8); ``json=`` sends
        an object as JSON. ``persistent=True`` is ``delivery_mode=2``.

        :raises Unroutable: ``mandatory`` and no queue took the message.
        :raises NotFound: the exchange does not exist.
        :raises ConnectionLost: the connection died before the confirm: the
            message may or may not have been routed.
        :raises ConnectionBlocked: the broker blocked publishing for longer than ``blocked_timeout``.

        ``retry=N`` (synchronous only) publishes again, up to N times, on a
        new connection when the connection died before the confirm; the
        broker may then hold the message twice.
        """
        properties: dict[str, Any] = {}
        data = encode_body(body, json, properties)
        if headers:
            if not isinstance(headers, dict):
                raise TypeError(f"headers must be a dict, got {headers.__class__.__name__}")
            properties["headers"] = headers
        if persistent:
            delivery_mode = 2
        if not (content_type is None and content_encoding is None and delivery_mode is None and priority is None
                and correlation_id is None and reply_to is None and expiration is None and message_id is None
                and timestamp is None and type is None and app_id is None and user_id is None):
            properties.update(_properties(
                content_type=content_type, content_encoding=content_encoding, delivery_mode=delivery_mode,
                priority=priority, correlation_id=correlation_id, reply_to=reply_to, expiration=expiration,
                message_id=message_id, timestamp=timestamp, type=type, app_id=app_id, user_id=user_id))
        exchange_b = _puka.shortstr(exchange, "exchange")
        routing_key_b = _puka.shortstr(routing_key, "routing_key")
        if "headers" in properties:  # raise here, naming the header, before anything is sent (D7, D8, issue 16)
            _puka.content_header(properties, len(data))
        context = {"exchange": exchange, "routing_key": routing_key}
        if callback is None:
            for attempt in range(retry):
                try:
                    return self._publish_and_wait(exchange_b, routing_key_b, data, properties, mandatory,
                                                  timeout, context)
                except ConnectionLost as exc:
                    log.warning("publish to %r failed (%s); retrying on a new connection (%d of %d)",
                                exchange, exc, attempt + 1, retry)
            return self._publish_and_wait(exchange_b, routing_key_b, data, properties, mandatory, timeout, context)
        session = self._live_session()
        self._wait_for_room(session)
        user_callback = callback
        promise = next(_promise_ids)
        self._begin()
        started = time.monotonic()

        def confirmed(result: Any) -> None:
            self._end()
            value: Any = self._publish_outcome(result, session, context, started)
            self._dispatch(user_callback, promise, value)

        limit = self.settings.operation_timeout if timeout is None else timeout
        try:
            session.client.publish(exchange_b, routing_key_b, data, properties, mandatory, confirmed, started + limit)
        except BaseException:  # refused before anything was queued (a broker with a smaller frame_max)
            self._end()
            raise
        session.schedule_flush()
        self._published(context, data, properties)
        return promise

    basic_publish = publish

    def _publish_and_wait(self, exchange: bytes, routing_key: bytes, data: bytes, properties: dict[str, Any],
                          mandatory: bool, timeout: float | None, context: dict[str, str]) -> None:
        session = self._live_session()
        self._wait_for_room(session)
        self._begin()
        started = time.monotonic()
        try:
            if timeout is None:
                # The session's expiry timer fails it at the deadline: no timer per publish, and
                # the lightest wait gevent has (the confirm arrives in the I/O greenlet).
                waiter = Waiter(session.hub)
                session.client.publish(exchange, routing_key, data, properties, mandatory,
                                       partial(session.hub.loop.run_callback, waiter.switch),
                                       started + self.settings.operation_timeout)
                session.schedule_flush()
                self._published(context, data, properties)
                result = waiter.get()
            else:
                box = AsyncResult()
                session.client.publish(exchange, routing_key, data, properties, mandatory, box.set,
                                       started + timeout)
                session.schedule_flush()
                self._published(context, data, properties)
                result = box.wait(timeout)
        finally:
            self._end()
        outcome = self._publish_outcome(result, session, context, started)
        if isinstance(outcome, BaseException):
            raise outcome

    def _publish_outcome(self, result: Any, session: _Session, context: dict[str, str], started: float) -> Any:
        """Count and signal one publish's outcome: ``{}`` when confirmed, else the exception."""
        if result is None:  # timed out
            self.stats["failed"] += 1
            return Timeout(f"publish on {self.settings.safe_url(session.node)} was not confirmed within "
                           "the timeout; the message may still be routed")
        if result.is_error:
            self.stats["failed"] += 1
            error = self._error(result, session, **context)
            if isinstance(error, Unroutable):
                _emit(signals.message_returned, self, error=error, **context)
            return error
        self.stats["confirmed"] += 1
        if signals.message_confirmed.receivers:
            _emit(signals.message_confirmed, self, seconds=time.monotonic() - started, **context)
        return {}

    def _wait_for_room(self, session: _Session) -> None:
        """Backpressure: wait while the broker blocks us or our write buffer is full."""
        if self.blocked_reason is not None:
            self._wait_unblocked()
        if not session.drained.is_set():
            limit = self.settings.operation_timeout
            if not session.drained.wait(limit):
                raise Timeout(f"write buffer of {self!r} stayed full for {limit:g}s")

    # -- receiving ------------------------------------------------------------------------------
    def consume(self, queue: str, callback: Callable[[int, Message], Any] | None = None, *,
                prefetch_count: int = 100, no_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Consume from ``queue``.

        Without a callback, wait for the first message and return it (None
        when ``timeout`` passes first); ack it when done. With a callback,
        register a consumer (once the broker has confirmed it) and return its
        promise; ``callback(promise, message)`` then runs for each delivery.
        Every consumer needs a :meth:`cancel` when it is no longer wanted.
        It is resumed by itself after the connection is lost and reopened.
        """
        _puka.shortstr(queue, "queue")
        _check_prefetch(prefetch_count)
        arguments = dict(arguments or {})
        _puka.encode_table(arguments, "arguments")
        if callback is None:
            return self._consume_one(queue, no_ack, exclusive, arguments, timeout)
        consumer = _Consumer(next(_promise_ids), queue, callback, prefetch_count, no_ack, exclusive, arguments)
        session = self._live_session()
        self._consumers[consumer.promise] = consumer
        self._start_consumer(consumer, session)
        limit = self.settings.operation_timeout if timeout is None else timeout
        started = consumer.started.wait(limit)
        if not consumer.started.ready():
            self._consumers.pop(consumer.promise, None)
            raise Timeout(f"consume from {queue!r} not confirmed within {limit:g}s")
        if isinstance(started, BaseException):
            self._consumers.pop(consumer.promise, None)
            raise started
        return consumer.promise

    basic_consume = consume

    def _start_consumer(self, consumer: _Consumer, session: _Session) -> None:
        """Subscribe ``consumer`` on ``session`` (again, after a reconnect or a qos change)."""
        client = session.client
        if consumer.started.ready():
            consumer.started = AsyncResult()
        item = {"queue": _puka.shortstr(consumer.queue, "queue"), "exclusive": consumer.exclusive,
                "arguments": consumer.arguments}
        # A one-shot consumer (consume without callback) acks itself when no_ack, so
        # prefetch=1 still holds back every message but the first.
        broker_no_ack = consumer.no_ack and consumer.callback is not None
        started = consumer.started
        number = client.basic_consume_multi(
            [item], prefetch_count=consumer.prefetch_count, no_ack=broker_no_ack,
            callback=lambda number, result: self._on_consumer_event(consumer, session, number, started, result))
        consumer.session, consumer.puka_number = session, number
        promise = client.promises.by_number(number)

        def deliver(puka_promise: Any, result: Any) -> None:
            # Straight to us, skipping puka's ready-set and refcount (we settle on the channel).
            puka_promise.register(puka_spec.METHOD_BASIC_DELIVER, deliver)
            self._on_delivery(consumer, session, puka_promise, result)

        promise.register(puka_spec.METHOD_BASIC_DELIVER, deliver)

        def consume_ok() -> None:
            if not started.ready():
                started.set(None)

        promise.x_on_consume_ok = consume_ok
        session.schedule_flush()

    def _on_consumer_event(self, consumer: _Consumer, session: _Session, number: int, started: AsyncResult,
                           result: Any) -> None:
        """The consumer's puka promise ended: refused, cancelled (by us or the broker), or connection lost."""
        if session is not consumer.session or number != consumer.puka_number:
            return  # a subscription the consumer has left (qos change, reconnect)
        if not result.is_error:
            if "body" not in result and not consumer.cancelled:  # the broker cancelled it: queue deleted (D19)
                log.warning("broker cancelled the consumer on queue %r (deleted?)", consumer.queue)
                consumer.cancelled = True
                self._consumers.pop(consumer.promise, None)
                _emit(signals.consumer_cancelled, self, promise=consumer.promise, queue=consumer.queue)
            return
        error = self._error(result, session, queue=consumer.queue)
        if consumer is self._reply_consumer:  # the request on this channel failed: so do all calls
            for box in self._replies.values():
                if not box.ready():
                    box.set(error)
        if not started.ready():
            started.set(error)
        if consumer.callback is None:
            if not consumer.box.ready():
                consumer.box.set(error)
        elif session.usable and not consumer.cancelled:
            # Refused (also when resuming after a reconnect: the queue is gone) or stopped by a
            # channel error while the connection lives: it consumes no more, so it is unregistered.
            # (When the connection is lost instead, recovery subscribes it again.)
            if self._consumers.pop(consumer.promise, None) is not None:
                log.error("consumer on %r stopped: %s", consumer.queue, error)

    def _on_delivery(self, consumer: _Consumer, session: _Session, puka_promise: Any, result: Any) -> None:
        """Runs in the I/O greenlet for each delivery of a consumer."""
        no_ack = consumer.no_ack and consumer.callback is not None
        message = Message.from_frame(result, self, (session, puka_promise.channel, puka_promise.number, no_ack),
                                     queue=consumer.queue)
        if not no_ack:
            session.delivered(puka_promise.channel, result["delivery_tag"])
        if consumer.callback is None:  # the one-shot consumer of a synchronous consume
            box = consumer.box
            if box.ready() or consumer.cancelled:
                self._settle(message, "reject", True, quiet=True)  # never given to anyone
                return
            self._cancel_one_shot(consumer, session)  # before any ack opens the prefetch window
            if consumer.no_ack:
                self._settle(message, "ack", False, quiet=True)
                message.settled = True
            self._received(message)
            box.set(message)
            return
        self._received(message)
        self._dispatch(self._deliver, consumer, message)

    def _cancel_one_shot(self, consumer: _Consumer, session: _Session) -> None:
        if not consumer.cancelled:
            consumer.cancelled = True
            if session.usable and consumer.puka_number in session.client.promises._promises:
                session.client.basic_cancel(consumer.puka_number, callback=lambda _n, _r: None)
                session.schedule_flush()

    def _consume_one(self, queue: str, no_ack: bool, exclusive: bool, arguments: dict[str, Any],
                     timeout: float | None) -> Message | None:
        consumer = _Consumer(next(_promise_ids), queue, None, 1, no_ack, exclusive, arguments)
        session = self._live_session()
        self._start_consumer(consumer, session)
        try:
            started = consumer.started.wait(self.settings.operation_timeout)
            if isinstance(started, BaseException):
                raise started
            message = consumer.box.wait(timeout)
            if isinstance(message, BaseException):
                raise message
            if isinstance(message, Message):
                return message
            if not session.usable:
                raise ConnectionLost(f"connection lost while consuming from {queue!r}",
                                     session.node.host, session.node.port)
            return None
        finally:
            if consumer.started.ready() and consumer.started.get() is None:
                self._cancel_one_shot(consumer, session)
            consumer.cancelled = True

    def get(self, queue: str, *, no_ack: bool = False, timeout: float | None = None) -> Message | None:
        """Fetch one message with basic.get; None when the queue is empty."""
        queue_b = _puka.shortstr(queue, "queue")
        session = self._live_session()
        box = AsyncResult()
        session.client.basic_get(queue_b, no_ack=no_ack, callback=_settable(box))
        session.schedule_flush()
        frame = box.wait(self.settings.operation_timeout if timeout is None else timeout)
        if frame is None and not box.ready():
            raise Timeout(f"get from {queue!r} got no answer")
        if frame.is_error:
            raise self._error(frame, session, queue=queue)
        if frame.get("empty"):
            return None
        number = frame["promise_number"]
        puka_promise = session.client.promises._promises.get(number)
        channel = puka_promise.channel if puka_promise is not None else None
        message = Message.from_frame(frame, self, (session, channel, number, no_ack), queue=queue)
        if not no_ack:
            session.delivered(channel, frame["delivery_tag"])
        self._received(message)
        return message

    basic_get = get

    def _send_settle(self, message: Message, action: str, requeue: bool) -> None:
        """Send ack / reject / nack for a message, on the channel it arrived on."""
        session, channel, number, no_ack = message._context
        if no_ack:
            raise MessageStateError("this message was consumed with no_ack=True; there is nothing to settle")
        client = session.client
        if (not session.usable or channel is None or client.channels.channels.get(channel.number) is not channel
                or not channel.alive):
            raise self._settle_refused(message, action)
        tag = message.delivery_tag
        if action == "ack":
            session.ack_later(channel, tag)  # coalesced at the flush
        else:
            if action == "reject":
                frames = puka_spec.encode_basic_reject(tag, requeue)
            else:
                frames = puka_spec.encode_basic_nack(tag, False, requeue)
            client._send_frames(channel.number, frames)
            session.settled_now(channel, tag)
            session.schedule_flush()
        puka_promise = client.promises._promises.get(number)
        if puka_promise is not None and puka_promise.refcnt > 0:
            puka_promise.refcnt_dec()  # lets puka release a get's channel

    def cancel(self, promise: int, timeout: float | None = None) -> None:
        """Stop a consumer started with ``consume(queue, callback)``.

        Deliveries that arrived but were not yet handed to the callback are
        requeued; messages the callback already has can still be acked.
        """
        consumer = self._consumers.pop(promise, None)
        if consumer is None:
            raise ValueError(f"no consumer with promise {promise!r} on {self!r}")
        consumer.cancelled = True
        session = consumer.session
        if session is None or not session.usable or consumer.puka_number is None:
            return
        limit = self.settings.operation_timeout if timeout is None else timeout
        started = consumer.started.wait(limit)  # basic.cancel before consume-ok confuses puka (D17)
        if (not session.usable or isinstance(started, BaseException) or not consumer.started.ready()
                or consumer.puka_number not in session.client.promises._promises):
            return
        box = AsyncResult()
        session.client.basic_cancel(consumer.puka_number, callback=_settable(box))
        session.schedule_flush()
        self._wait(box, session, "cancel", timeout)

    basic_cancel = cancel

    def qos(self, promise: int, prefetch_count: int, timeout: float | None = None) -> None:
        """Change how many unacked messages a consumer may hold.

        RabbitMQ applies a per-consumer prefetch only when a consumer starts,
        so the consumer is re-subscribed with the new limit; messages it
        already delivered stay valid and can be acked.
        """
        _check_prefetch(prefetch_count)
        consumer = self._consumers.get(promise)
        if consumer is None or consumer.session is None:
            raise ValueError(f"no consumer with promise {promise!r} on {self!r}")
        limit = self.settings.operation_timeout if timeout is None else timeout
        consumer.started.wait(limit)  # basic.cancel before consume-ok confuses puka (D17)
        session = consumer.session
        old = (consumer.puka_number, consumer.started, consumer.prefetch_count)
        # Subscribe anew before cancelling: cancelling the only consumer of an auto-delete
        # queue would delete the queue.
        consumer.prefetch_count = prefetch_count
        self._start_consumer(consumer, session)
        started = consumer.started.wait(limit)
        if started is not None or not consumer.started.ready():
            consumer.puka_number, consumer.started, consumer.prefetch_count = old
            self._consumers[promise] = consumer
            raise started if isinstance(started, BaseException) else Timeout(
                f"qos on {consumer.queue!r} got no answer within {limit:g}s")
        if session.usable and old[0] in session.client.promises._promises:
            box = AsyncResult()
            session.client.basic_cancel(old[0], callback=_settable(box))
            session.schedule_flush()
            self._wait(box, session, "qos", timeout)

    # -- topology -------------------------------------------------------------------------------
    def exchange_declare(self, exchange: str, type: str = "direct", *, durable: bool = False,
                         auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                         callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare an exchange (idempotent; PreconditionFailed if it exists with other settings)."""
        if type not in _EXCHANGE_TYPES and not (isinstance(type, str) and type.startswith("x-")):
            raise ValueError(f"type must be one of direct, fanout, topic, headers or an x- plugin type, got {type!r}")
        return self._call("exchange_declare", (_puka.shortstr(exchange, "exchange"),), callback, timeout,
                          type=type, durable=durable, auto_delete=auto_delete, arguments=_arguments(arguments))

    def exchange_delete(self, exchange: str, *, if_unused: bool = False,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        return self._call("exchange_delete", (_puka.shortstr(exchange, "exchange"),), callback, timeout,
                          if_unused=if_unused)

    def exchange_bind(self, destination: str, source: str, routing_key: str = "", *,
                      arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        return self._call("exchange_bind", (_puka.shortstr(destination, "destination"),
                                            _puka.shortstr(source, "source"),
                                            _puka.shortstr(routing_key, "routing_key")),
                          callback, timeout, arguments=_arguments(arguments))

    def exchange_unbind(self, destination: str, source: str, routing_key: str = "", *,
                        arguments: dict[str, Any] | None = None,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        return self._call("exchange_unbind", (_puka.shortstr(destination, "destination"),
                                              _puka.shortstr(source, "source"),
                                              _puka.shortstr(routing_key, "routing_key")),
                          callback, timeout, arguments=_arguments(arguments))

    def queue_declare(self, queue: str = "", *, durable: bool = False, exclusive: bool = False,
                      auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare a queue; returns ``{'queue', 'message_count', 'consumer_count'}``."""
        return self._call("queue_declare", (_puka.shortstr(queue, "queue"),), callback, timeout,
                          durable=durable, exclusive=exclusive, auto_delete=auto_delete, passive=passive,
                          arguments=_arguments(arguments))

    def queue_delete(self, queue: str, *, if_unused: bool = False, if_empty: bool = False,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        return self._call("queue_delete", (_puka.shortstr(queue, "queue"),), callback, timeout,
                          if_unused=if_unused, if_empty=if_empty)

    def queue_purge(self, queue: str, *, callback: Callback | None = None, timeout: float | None = None) -> Any:
        return self._call("queue_purge", (_puka.shortstr(queue, "queue"),), callback, timeout)

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "", *,
                   arguments: dict[str, Any] | None = None,
                   callback: Callback | None = None, timeout: float | None = None) -> Any:
        return self._call("queue_bind", (_puka.shortstr(queue, "queue"), _puka.shortstr(exchange, "exchange"),
                                         _puka.shortstr(routing_key, "routing_key")),
                          callback, timeout, arguments=_arguments(arguments))

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "", *,
                     arguments: dict[str, Any] | None = None,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        return self._call("queue_unbind", (_puka.shortstr(queue, "queue"), _puka.shortstr(exchange, "exchange"),
                                           _puka.shortstr(routing_key, "routing_key")),
                          callback, timeout, arguments=_arguments(arguments))

    # -- request / reply --------------------------------------------------------------------------
    def _send_request(self, reply_channel: int | None, exchange: str, routing_key: str, data: bytes,
                      properties: dict[str, Any]) -> None:
        """Send a request on the reply channel: direct reply-to wants it on the channel that consumes replies."""
        assert reply_channel is not None
        session = self._live_session()
        # That channel is not in confirm mode, so the frames are sent as they are.
        frames = _puka.publish_frames(_puka.shortstr(exchange, "exchange"),
                                      _puka.shortstr(routing_key, "routing_key"), data, properties, True,
                                      session.client.frame_max)
        session.client._send_frames(reply_channel, frames)
        session.schedule_flush()

    def _reply_channel(self, timeout: float) -> int:
        """The channel number of this connection's reply-to consumer, started on first use."""
        consumer = self._reply_consumer
        if consumer is None or consumer.promise not in self._consumers:
            promise = self.consume(_REPLY_TO, self._on_reply, no_ack=True, timeout=timeout)
            consumer = self._reply_consumer = self._consumers[promise]
        else:
            consumer.started.wait(timeout)
        session = consumer.session
        assert session is not None
        puka_promise = session.client.promises._promises.get(consumer.puka_number)
        if puka_promise is None or puka_promise.channel is None:
            raise ConnectionLost("the reply consumer is gone", session.node.host, session.node.port)
        if puka_spec.METHOD_BASIC_RETURN not in puka_promise.methods:
            puka_promise.register(puka_spec.METHOD_BASIC_RETURN, self._on_request_returned)
        return int(puka_promise.channel.number)

    def _on_request_returned(self, puka_promise: Any, result: Any) -> None:
        """A request no queue took comes back on the reply channel: fail its call at once."""
        puka_promise.register(puka_spec.METHOD_BASIC_RETURN, self._on_request_returned)
        box = self._replies.get((result.get("properties") or {}).get("correlation_id", ""))
        if box is not None and not box.ready():
            box.set(Unroutable(str(result.get("reply_text", "NO_ROUTE")), str(result.get("exchange", "")),
                               str(result.get("routing_key", ""))))

    # -- closing --------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) for pending operations and callbacks, cancel consumers, close."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self._idle.wait(timeout)
        session = self._session
        for promise in list(self._consumers):
            try:
                self.cancel(promise, timeout=max(0.001, deadline - time.monotonic()))
            except AMQPError as exc:
                log.debug("cancel while closing failed: %s", exc)
        self._idle.wait(max(0.0, deadline - time.monotonic()))
        self._closed = True
        if self._recovery is not None:
            self._recovery.kill(block=False)
        if session is not None and session.usable:
            box = AsyncResult()
            try:
                session.flush_acks()  # acks asked for just now go out before connection.close
                session.client.close(callback=_settable(box))
                session.schedule_flush()
                box.wait(max(0.001, deadline - time.monotonic()))
            except _puka.ConnectionBroken:
                pass
            session.kill("closed by the application")
        if self._dispatcher is not None:
            self._dispatcher.kill(block=False)
            self._dispatcher = None

    def forget(self) -> None:
        """Drop everything without touching the socket: used in a child after fork."""
        self._closed = True
        self._session = None
        self._consumers.clear()
        self._dispatch_queue.clear()


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
