"""A connection's sessions: opened on demand, lost, reopened with back-off; and the broker's blocked state.

:class:`SessionLife` is the part of
:class:`~flask_nucleon_amqp._base.BaseConnection` that keeps its session: the
open one (opening it when there is none), what follows an open (counting,
signals, the ``on_open`` hooks, the consumers resumed), a loss, recovery in
the background with capped, jittered back-off, and the connection.blocked
alarm publishers wait on. A transport supplies ``_open`` and ``_resume_consumer``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, cast

import gevent
from gevent.event import Event

from . import signals
from ._connection_records import ConnectionState, _ConsumerT, _SessionT
from .exceptions import AMQPError, AuthenticationError, ConnectionBlocked, VhostNotAllowed
from .protocol import Connection
from .signals import _emit

__all__ = ["SessionLife"]


class SessionLife(ConnectionState[_ConsumerT, _SessionT]):
    """Opening, losing and recovering a connection's session; the blocked state."""

    #: Called with this connection after every (re)open, before consumers resume.
    on_open: list[Callable[[Connection], Any]]
    _recovery: gevent.Greenlet | None
    _lost_at: float
    #: Why the broker blocks publishers (None while it does not), since when, and the event publishers wait on.
    blocked_reason: str | None
    _blocked_since: float
    _unblocked: Event

    # -- the session ------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """True while a session to the broker is up (never opens one)."""
        return self._session is not None and self._session.usable

    @property
    def server_properties(self) -> dict[str, Any]:
        """What the broker said about itself when the connection opened (opens it if needed)."""
        return self._live_session().server_properties

    def server_info(self) -> dict[str, Any]:
        """The broker's server properties when open, else ``{}``; never opens or waits."""
        session = self._session
        return dict(session.server_properties) if session is not None and session.usable else {}

    def ensure_open(self) -> None:
        """Open the connection now if it is not open; raise the ConnectionError if that fails."""
        self._live_session()

    def _live_session(self) -> _SessionT:
        """The open session, opening one if there is none (raises ConnectionError)."""
        session = self._session
        if session is not None and session.usable:
            return session
        return self._open()

    def _open(self) -> _SessionT:
        """Open a new session (the transport's hook); raise ConnectionError when that fails."""
        raise NotImplementedError

    # -- opening, losing, recovering ------------------------------------------------------------
    def _opened(self, session: _SessionT) -> None:
        """A session is up: count and signal it, run the on_open hooks, resume the consumers."""
        self._log.info("connected to %s (%s pool)", self.settings.safe_url(session.node), self.settings.name)
        self.stats["opened"] += 1
        _emit(signals.connection_opened, self, node=str(session.node))

    def _after_open(self, session: _SessionT) -> None:
        for hook in list(self.on_open):
            try:
                hook(cast(Connection, self))  # every transport subclass keeps the contract (mypy checks it there)
            except Exception:  # noqa: BLE001
                # Consumers still resume; a missing queue then shows as their own error.
                self._log.exception("on_open hook %r failed on %r", hook, self)
        for consumer in list(self._consumers.values()):
            if consumer.callback is not None and not consumer.cancelled and session.usable:
                self._resume_consumer(consumer, session)

    def _resume_consumer(self, consumer: _ConsumerT, session: _SessionT) -> None:
        """Subscribe a registered consumer again on a new session."""
        raise NotImplementedError

    def _session_lost(self, session: _SessionT, reason: str) -> bool:
        """The session ``session`` ended; True when the connection should recover (it was not closed)."""
        if self._session is session:
            self._session = None
        if self.blocked_reason is not None:  # an alarm belongs to the connection that got it
            self._set_unblocked()
        self.stats["lost"] += 1
        self._lost_at = time.monotonic()
        if self._closed:
            self._log.info("closed connection to %s", self.settings.safe_url(session.node))
            return False
        self._log.warning("connection to %s lost: %s", self.settings.safe_url(session.node), reason)
        _emit(signals.connection_lost, self, node=str(session.node), reason=reason)
        return True

    def _start_recovery(self) -> None:
        if self._recovery is None or self._recovery.dead:
            self._recovery = gevent.spawn(self._recover)

    def _recover(self) -> None:
        """Reopen in the background, with capped, jittered back-off, so consumers resume."""
        delay = 0.1
        while not self._closed and not self.is_open:
            try:
                session = self._open()
                self.stats["recovered"] += 1
                self._log.info("recovered connection to %s after %.3fs", self.settings.safe_url(session.node),
                               time.monotonic() - self._lost_at)
                _emit(signals.connection_recovered, self, node=str(session.node))
                return
            except (AuthenticationError, VhostNotAllowed) as exc:
                self._log.error("not reconnecting to %s: %s", self.settings.safe_url(), exc)
                return
            except AMQPError as exc:
                self._log.warning("reconnect failed, retrying in %.1fs: %s", delay, exc)
            gevent.sleep(delay * (0.5 + random.random()))
            # Capped so the longest sleep (1.5 x 3 s) plus one attempt stays under 5 s: a broker
            # that comes back is found within 5 s, however long it was away.
            delay = min(delay * 2, 3.0)

    @property
    def blocked(self) -> bool:
        """True while the broker blocks publishers (memory or disk alarm)."""
        return self.blocked_reason is not None

    # -- the blocked state --------------------------------------------------------------------------
    def _set_blocked(self, reason: Any) -> None:
        self.blocked_reason = str(reason or "blocked")
        self._unblocked.clear()
        self._blocked_since = time.monotonic()
        self._log.warning("broker blocked publishing on %r: %s", self, self.blocked_reason)
        _emit(signals.connection_blocked, self, reason=self.blocked_reason)

    def _set_unblocked(self) -> None:
        self.blocked_reason = None
        self.stats["blocked_seconds"] += time.monotonic() - self._blocked_since
        self._unblocked.set()
        self._log.info("broker unblocked publishing on %r", self)
        _emit(signals.connection_unblocked, self)

    def _wait_unblocked(self) -> None:
        """Backpressure: wait while the broker blocks publishers."""
        limit = self.settings.blocked_timeout
        self.stats["waiting_room"] += 1
        try:
            unblocked = self._unblocked.wait(limit)
        finally:
            self.stats["waiting_room"] -= 1
        if not unblocked:
            raise ConnectionBlocked(f"broker blocked publishing ({self.blocked_reason}) for more than "
                                    f"{limit:g}s (blocked_timeout)")
