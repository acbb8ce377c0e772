"""Helpers for testing apps that use flask_nucleon_amqp; also a pytest plugin.

Installing the package registers this module with pytest (``pytest11`` entry
point), so every test of an app can ask for these fixtures:

===================== ================================================================
``amqp_names``        unique queue and exchange names, deleted after the test
``amqp_recorder``     ``with amqp_recorder() as published: client.post(...)``
``wait_for_messages`` ``wait_for_messages(queue, count=1, timeout=5.0)`` -> messages
``amqp_memory_url``   a fresh ``memory://`` URL whose broker is emptied afterwards
===================== ================================================================

They work alongside pytest-flask: the app is its ``app`` fixture (or the app
of the current app context). :func:`record_messages`, :func:`wait_for_messages`
and :class:`AMQPNames` can be used without pytest too, as with flask-mail's
``record_messages``; importing this module does not need pytest (only the
fixtures do). No fixture here runs unless a test asks for it.
"""

from __future__ import annotations

import json as _json
import logging
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from flask import Flask, current_app, has_app_context
from gevent.event import Event

from . import memory, signals
from .exceptions import AMQPError, ConnectionError
from .message import Message
from .pool import Pool
from .protocol import Connection

if TYPE_CHECKING:
    from .extension import AMQPState

__all__ = ["AMQPNames", "PublishedMessage", "record_messages", "wait_for_messages"]

log = logging.getLogger(__name__)


# -- unique names ------------------------------------------------------------------------------

class AMQPNames:
    """Unique queue and exchange names for one test, and the means to delete them.

    Names look like ``test-orders-1a2b3c4d5e-0``: the label, a per-test run
    id and a counter, so tests never see each other's messages, even when
    they run against one shared broker at the same time.
    """

    def __init__(self, prefix: str = "test") -> None:
        self.prefix = prefix
        self.run = uuid.uuid4().hex[:10]
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.app: Flask | None = None

    def __repr__(self) -> str:
        return f"<AMQPNames {self.run} queues={self.queues} exchanges={self.exchanges}>"

    def queue(self, label: str = "q") -> str:
        """A new queue name, deleted by :meth:`cleanup`."""
        name = f"{self.prefix}-{label}-{self.run}-{len(self.queues)}"
        self.queues.append(name)
        return name

    def exchange(self, label: str = "x") -> str:
        """A new exchange name, deleted by :meth:`cleanup`."""
        name = f"{self.prefix}-{label}-{self.run}-{len(self.exchanges)}"
        self.exchanges.append(name)
        return name

    def use(self, app: Flask) -> AMQPNames:
        """Delete through this app's broker (needed only when the test has no ``app`` fixture)."""
        self.app = app
        return self

    def cleanup(self, connection: Connection) -> list[str]:
        """Delete every queue, then every exchange named so far, newest first.

        Deleting what does not exist is fine (as in RabbitMQ); other failures
        are returned as text rather than raised, so one leftover cannot hide
        the test's own outcome.
        """
        problems = []
        for kind, names, delete in (("queue", self.queues, connection.queue_delete),
                                    ("exchange", self.exchanges, connection.exchange_delete)):
            for name in reversed(names):
                try:
                    delete(name)
                except ConnectionError as exc:  # the broker is gone: do not wait connect_timeout per name
                    problems.append(f"cannot delete {self.queues + self.exchanges}: {exc}")
                    self.queues.clear()
                    self.exchanges.clear()
                    return problems
                except AMQPError as exc:
                    problems.append(f"{kind} {name!r}: {exc}")
            names.clear()
        return problems


def _cleanup_through(app: Flask, names: AMQPNames) -> list[str]:
    """Delete ``names`` on ``app``'s broker, on a connection of its own if the app is closed."""
    state: AMQPState = app.extensions["amqp"]
    pool = state.get_amqp_pool("publish")
    if not state.closed and not pool.closed:
        return names.cleanup(pool.connection())
    if pool.settings.transport == "memory" and memory.find(pool.settings.nodes[0].host) is None:
        return []  # already reset (amqp_memory_url): nothing left, and no empty broker to leave behind
    spare = Pool(pool.settings)
    try:
        return names.cleanup(spare.connection())
    finally:
        spare.close(timeout=5)


# -- recording what the app published ----------------------------------------------------------

@dataclass(frozen=True)
class PublishedMessage:
    """One publish recorded by :func:`record_messages`.

    What the ``message_published`` signal reports: the exchange, routing
    key, body and properties (which hold ``headers``) as sent;
    ``connection`` is its sender.
    """

    exchange: str
    routing_key: str
    body_size: int
    body: bytes | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    connection: Connection | None = None

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.get("headers") or {})

    @property
    def text(self) -> str:
        return self._body().decode(self.properties.get("content_encoding") or "utf-8")

    def json(self) -> Any:
        return _json.loads(self._body())

    def _body(self) -> bytes:
        if self.body is None:
            raise ValueError("the message_published signal did not report the body of this message")
        return self.body


def _belongs_to(state: AMQPState, connection: Any) -> bool:
    return any(connection is conn for pool in state.pools.values() for conn in pool.connections())


@contextmanager
def record_messages(app: Flask | None = None) -> Iterator[list[PublishedMessage]]:
    """Record every message published while the block runs, in publish order.

    With ``app``, only that app's publishes are recorded; without, every
    publish of the process (from any greenlet). A message is recorded when
    it is sent, whether or not the broker then confirms it::

        with record_messages(app) as published:
            client.post("/orders", json={"id": 1})
        assert [m.routing_key for m in published] == ["order.created"]
    """
    published: list[PublishedMessage] = []
    state: AMQPState | None = app.extensions["amqp"] if app is not None else None

    def receiver(sender: Any, **kwargs: Any) -> None:
        if state is not None and not _belongs_to(state, sender):
            return
        published.append(PublishedMessage(
            exchange=kwargs["exchange"], routing_key=kwargs["routing_key"], body_size=kwargs["body_size"],
            body=kwargs.get("body"), properties=dict(kwargs.get("properties") or {}), connection=sender))

    signals.message_published.connect(receiver, weak=False)
    try:
        yield published
    finally:
        signals.message_published.disconnect(receiver)


# -- waiting for messages ----------------------------------------------------------------------

def wait_for_messages(queue: str, count: int = 1, timeout: float = 5.0, *, connection: Any = None,
                      ack: bool = True) -> list[Message]:
    """Wait until ``count`` messages can be taken from ``queue``; return them, oldest first.

    It consumes with a prefetch of ``count``, so no more than ``count`` leave
    the queue. They are acked unless ``ack=False`` (then settling them is
    the caller's duty). ``connection`` defaults to the current app's
    ``listen`` pool.

    :raises AssertionError: fewer arrived within ``timeout``; those that did are requeued.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 65535:
        raise ValueError(f"count must be an integer from 1 to 65535, got {count!r}")
    conn = connection if connection is not None else current_app.extensions["amqp"].connection("listen")
    got: list[Message] = []
    done = Event()

    def take(_promise: int, message: Message) -> None:
        got.append(message)
        if len(got) >= count:
            done.set()

    promise = conn.consume(queue, take, prefetch_count=count)
    try:
        arrived = done.wait(timeout)
    finally:
        conn.cancel(promise)
    if not arrived:
        for message in got:
            message.reject(requeue=True)
        raise AssertionError(f"expected {count} message(s) on queue {queue!r} within {timeout:g}s, "
                             f"got {len(got)}")
    if ack:
        for message in got:
            message.ack()
    return got


# -- the pytest plugin -------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the helpers above work without pytest; the fixtures below are then plain functions
    pytest = None  # type: ignore[assignment]


_F = TypeVar("_F", bound=Callable[..., Any])


@overload
def _fixture(function: _F) -> _F: ...
@overload
def _fixture(*, name: str) -> Callable[[_F], _F]: ...
def _fixture(function: _F | None = None, *, name: str | None = None) -> Any:
    """``pytest.fixture`` when pytest is installed; without it, the function is left as it is."""
    if pytest is None:
        return function if function is not None else (lambda undecorated: undecorated)
    return pytest.fixture(function) if function is not None else pytest.fixture(name=name)


def _test_app(request: pytest.FixtureRequest) -> Flask | None:
    """The test's app: its ``app`` fixture (pytest-flask's convention), else the current app."""
    try:
        app = request.getfixturevalue("app")
    except pytest.FixtureLookupError:
        app = None
    if isinstance(app, Flask) and "amqp" in app.extensions:
        return app
    if has_app_context() and "amqp" in current_app.extensions:
        return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
    return None


def _require_app(request: pytest.FixtureRequest, what: str) -> Flask:
    app = _test_app(request)
    if app is None:
        raise RuntimeError(f"{what} needs the app: define an `app` fixture (as pytest-flask does) returning a "
                           "Flask app set up with flask_nucleon_amqp, or push an app context")
    return app


@_fixture
def amqp_names(request: pytest.FixtureRequest) -> Iterator[AMQPNames]:
    """Unique queue and exchange names for this test; what they name is deleted afterwards.

    Deleted through the ``app`` fixture's broker (or ``amqp_names.use(app)``);
    an app fixture may itself use ``amqp_names`` to build its configuration.
    """
    names = AMQPNames()
    yield names
    if not (names.queues or names.exchanges):
        return
    app = names.app
    if app is None:
        # At teardown the app fixture may already be finished (when it used amqp_names), but its
        # value is still the test's: read it rather than asking pytest to set it up again.
        candidate = (getattr(request.node, "funcargs", None) or {}).get("app")
        app = candidate if isinstance(candidate, Flask) and "amqp" in candidate.extensions else None
    if app is None:
        warnings.warn(f"amqp_names could not delete {names.queues + names.exchanges}: the test has no `app` "
                      "fixture; call amqp_names.use(app)", pytest.PytestWarning, stacklevel=1)
        return
    for problem in _cleanup_through(app, names):
        log.warning("amqp_names cleanup: %s", problem)


@_fixture
def amqp_recorder(request: pytest.FixtureRequest) -> Callable[..., AbstractContextManager[list[PublishedMessage]]]:
    """``with amqp_recorder() as published: ...`` records what the test's app published in the block."""

    def recorder(app: Flask | None = None) -> AbstractContextManager[list[PublishedMessage]]:
        return record_messages(app if app is not None else _test_app(request))

    return recorder


@_fixture(name="wait_for_messages")
def _wait_for_messages_fixture(request: pytest.FixtureRequest) -> Callable[..., list[Message]]:
    """``wait_for_messages(queue, count=1, timeout=5.0, ack=True)`` through the test's app."""

    def wait(queue: str, count: int = 1, timeout: float = 5.0, *, ack: bool = True) -> list[Message]:
        app = _require_app(request, "wait_for_messages")
        return wait_for_messages(queue, count, timeout, connection=app.extensions["amqp"].connection("listen"),
                                 ack=ack)

    return wait


@_fixture
def amqp_memory_url() -> Iterator[str]:
    """A ``memory://`` URL of a broker of this test's own, emptied and forgotten after it."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}"
    memory.reset(name)
