"""What a connection keeps, as the modules that make up :class:`~flask_nucleon_amqp._base.BaseConnection` see it.

:class:`~flask_nucleon_amqp._base.BaseConnection` is assembled from parts, a
module each: :mod:`._session_life` (opening, losing, recovering, the blocked
state), :mod:`._publishing`, :mod:`._topology_methods`, :mod:`._request_reply`.
They share what is here: the consumer and session records each transport
extends, the process-wide promise counter, and :class:`ConnectionState`, the
attributes ``BaseConnection.__init__`` sets up that the parts use.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Any, Generic, TypeVar

from gevent.event import AsyncResult
from greenlet import greenlet

from .config import Node, PoolSettings
from .message import Message
from .protocol import MessageHandler

__all__ = ["ConnectionState"]

#: Promise ids are unique in the process, so a promise names its connection too.
_promise_ids = itertools.count(1)


class _BaseConsumer:
    """What every consumer records, whatever its transport."""

    def __init__(self, promise: int, queue: str, callback: MessageHandler | None,
                 prefetch_count: int, no_ack: bool, exclusive: bool, arguments: dict[str, Any]) -> None:
        self.promise = promise
        self.queue = queue
        self.callback = callback
        self.prefetch_count = prefetch_count
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.arguments = arguments
        self.cancelled = False
        #: Where the one-shot consumer of a synchronous consume puts its message.
        self.box: AsyncResult = AsyncResult()
        #: Deliveries waiting for the callback, and the greenlet running it (only while there are some).
        self.inbox: deque[Message] = deque()
        self.worker: greenlet | None = None
        #: True while the worker waits for deliveries (see ``WORKER_LINGER``); ``linger`` ends that wait.
        self.parked = False
        self.linger: Any = None


class _BaseSession:
    """What every session (one opened connection to the broker) records, whatever its transport."""

    node: Node
    #: What the broker said about itself when this session opened.
    server_properties: dict[str, Any]

    @property
    def usable(self) -> bool:
        """True while operations can be sent on this session."""
        raise NotImplementedError


_ConsumerT = TypeVar("_ConsumerT", bound=_BaseConsumer)
_SessionT = TypeVar("_SessionT", bound=_BaseSession)


class ConnectionState(Generic[_ConsumerT, _SessionT]):
    """The attributes of a connection its parts share (``BaseConnection.__init__`` sets them up)."""

    settings: PoolSettings
    #: Counters and gauges: see ``BaseConnection.__init__`` for the keys.
    stats: dict[str, Any]
    _log: logging.Logger
    _closed: bool
    _session: _SessionT | None
    _consumers: dict[int, _ConsumerT]
