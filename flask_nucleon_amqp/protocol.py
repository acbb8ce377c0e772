"""The connection contract: what every transport's connection offers, written down once.

Everything above the transports (pools, topology, retry, listeners, the
extension, the testing helpers) is typed against :class:`Connection`, never
against a transport class, so ``amqp://`` (:class:`~flask_nucleon_amqp.connection.PukaConnection`)
and ``memory://`` (:class:`~flask_nucleon_amqp.memory.MemoryConnection`) are
interchangeable.

Conventions shared by every method:

* **Synchronous** by default: the call blocks only the calling greenlet until
  the broker answered, then returns the result or raises an
  :class:`~flask_nucleon_amqp.exceptions.AMQPError`.
* **Asynchronous** with ``callback=``: the call returns a promise id (an
  ``int``, unique in the process) at once, and later
  ``callback(promise, result)`` runs in the connection's dispatcher greenlet,
  in order, with the exception as ``result`` when the operation failed; a
  consumer's deliveries run in order in a greenlet of that consumer's own.
* Every operation has both forms, except ``ack`` / ``reject`` / ``nack``,
  which are immediate (sent with the next write, nothing to wait for), and
  ``consume(queue, callback)``, whose callback is the message handler: it
  returns the consumer's promise once the broker confirmed it.
* Argument errors (a wrong type, a bad name) are raised at the call in both
  forms; with ``callback=``, every other error goes to the callback.
* ``timeout`` (seconds) defaults to the pool's ``operation_timeout``; when it
  passes first, :class:`~flask_nucleon_amqp.exceptions.Timeout` is raised.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from .message import _NOTHING, Message

if TYPE_CHECKING:
    from .config import PoolSettings

__all__ = ["Callback", "Connection", "MessageHandler"]

#: ``callback(promise, result)``: the operation's result, or the exception it failed with.
Callback: TypeAlias = Callable[[int, Any], Any]
#: ``callback(promise, message)``: runs for each delivery of a consumer.
MessageHandler: TypeAlias = Callable[[int, Message], Any]


class Connection(Protocol):
    """One shared broker connection; see the module docstring for the calling conventions."""

    #: The pool settings this connection was made from (URL, timeouts, prefetch...).
    settings: PoolSettings
    #: Its position in its pool.
    index: int
    #: Operations started and not yet answered.
    pending: int
    #: Counters: opened, lost, recovered, published, confirmed, failed, delivered, acked, rejected,
    #: blocked_seconds, and the greenlets waiting now: waiting_confirm, waiting_room, waiting_connection.
    stats: dict[str, Any]
    #: The latest confirm latencies in seconds (a bounded window: the percentiles of ``stats()``).
    confirm_latencies: deque[float]
    #: Called with the connection after every (re)open, before its consumers resume.
    on_open: list[Callable[[Connection], Any]]
    #: Why the broker blocks publishing, or None.
    blocked_reason: str | None

    def __enter__(self) -> Connection: ...

    def __exit__(self, *exc_info: Any) -> None:
        """Connections are shared: leaving a ``with`` block does not close it."""

    @property
    def is_open(self) -> bool:
        """True while a session to the broker is up (never opens one)."""

    @property
    def blocked(self) -> bool:
        """True while the broker blocks publishers (memory or disk alarm)."""

    @property
    def server_properties(self) -> dict[str, Any]:
        """What the broker said about itself when the connection opened (opens it if needed)."""

    def server_info(self) -> dict[str, Any]:
        """The broker's server properties when open, else ``{}``; never opens or waits."""

    def ensure_open(self) -> None:
        """Open the connection now if it is not open; raise the ConnectionError if that fails."""

    # -- publishing --------------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
                headers: dict[str, Any] | None = None, mandatory: bool = False, json: Any = _NOTHING,
                persistent: bool = False, content_type: str | None = None, content_encoding: str | None = None,
                delivery_mode: int | None = None, priority: int | None = None, correlation_id: str | None = None,
                reply_to: str | None = None, expiration: int | str | None = None, message_id: str | None = None,
                timestamp: int | datetime.datetime | None = None, type: str | None = None,
                app_id: str | None = None, user_id: str | None = None,
                callback: Callback | None = None, timeout: float | None = None, retry: int = 0) -> Any:
        """Publish a message; synchronously, return once the broker confirmed it.

        ``retry=N`` (synchronous only) publishes again, up to N times, on a new
        connection when the connection died before the confirm.
        """

    def basic_publish(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
                headers: dict[str, Any] | None = None, mandatory: bool = False, json: Any = _NOTHING,
                persistent: bool = False, content_type: str | None = None, content_encoding: str | None = None,
                delivery_mode: int | None = None, priority: int | None = None, correlation_id: str | None = None,
                reply_to: str | None = None, expiration: int | str | None = None, message_id: str | None = None,
                timestamp: int | datetime.datetime | None = None, type: str | None = None,
                app_id: str | None = None, user_id: str | None = None,
                callback: Callback | None = None, timeout: float | None = None, retry: int = 0) -> Any:
        """Nucleon's name for :meth:`publish`."""

    def call(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
             json: Any = _NOTHING, headers: dict[str, Any] | None = None, timeout: float | None = None,
             callback: Callback | None = None, **properties: Any) -> Any:
        """Publish a request and wait for its reply (RabbitMQ's direct reply-to): the reply Message."""

    # -- receiving ---------------------------------------------------------------------------
    def consume(self, queue: str, callback: MessageHandler | None = None, *,
                prefetch_count: int = 100, no_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """With a callback, register a consumer and return its promise; without, wait for one message."""

    def basic_consume(self, queue: str, callback: MessageHandler | None = None, *,
                prefetch_count: int = 100, no_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Nucleon's name for :meth:`consume`."""


    def get(self, queue: str, *, no_ack: bool = False, callback: Callback | None = None,
            timeout: float | None = None) -> Any:
        """Fetch one message with basic.get: the Message, or None when the queue is empty."""

    def basic_get(self, queue: str, *, no_ack: bool = False, callback: Callback | None = None,
                  timeout: float | None = None) -> Any:
        """Nucleon's name for :meth:`get`."""


    def cancel(self, promise: int, timeout: float | None = None, *, callback: Callback | None = None) -> Any:
        """Stop a consumer; deliveries not yet handed to its callback are requeued. Returns None."""

    def basic_cancel(self, promise: int, timeout: float | None = None, *, callback: Callback | None = None) -> Any:
        """Nucleon's name for :meth:`cancel`."""


    def qos(self, promise: int | None = None, prefetch_count: int | None = None, timeout: float | None = None, *,
            callback: Callback | None = None) -> Any:
        """Change how many unacked messages a consumer may hold: ``qos(promise, n)`` or ``qos(prefetch_count=n)``.

        Without ``promise=``, the keyword form applies to the connection's only consumer.
        """

    def has_consumer(self, promise: int) -> bool:
        """True if ``promise`` is a consumer of this connection."""

    def ack(self, message: Message) -> None:
        """Acknowledge a message."""

    def basic_ack(self, message: Message) -> None:
        """Nucleon's name for :meth:`ack`."""


    def reject(self, message: Message, requeue: bool = True) -> None:
        """Reject a message: requeue it, or drop / dead-letter it with ``requeue=False``."""

    def basic_reject(self, message: Message, requeue: bool = True) -> None:
        """Nucleon's name for :meth:`reject`."""


    def nack(self, message: Message, requeue: bool = True) -> None:
        """Negatively acknowledge a message (basic.nack)."""

    # -- topology ----------------------------------------------------------------------------
    def exchange_declare(self, exchange: str, type: str = "direct", *, durable: bool = False,
                         auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                         callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare an exchange (idempotent; PreconditionFailed if it exists with other settings).

        ``passive=True`` checks that it exists (NotFound if not) and creates nothing.
        """

    def exchange_delete(self, exchange: str, *, if_unused: bool = False,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Delete an exchange."""

    def exchange_bind(self, destination: str, source: str, routing_key: str = "", *,
                      arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Bind exchange ``destination`` to exchange ``source``."""

    def exchange_unbind(self, destination: str, source: str, routing_key: str = "", *,
                        arguments: dict[str, Any] | None = None,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Remove an exchange-to-exchange binding."""

    def queue_declare(self, queue: str = "", *, durable: bool = False, exclusive: bool = False,
                      auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare a queue; returns ``{'queue', 'message_count', 'consumer_count'}``."""

    def queue_delete(self, queue: str, *, if_unused: bool = False, if_empty: bool = False,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Delete a queue; returns ``{'message_count'}``."""

    def queue_purge(self, queue: str, *, callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Drop a queue's ready messages; returns ``{'message_count'}``."""

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "", *,
                   arguments: dict[str, Any] | None = None,
                   callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Bind a queue to an exchange."""

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "", *,
                     arguments: dict[str, Any] | None = None,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Remove a queue binding."""

    # -- closing -----------------------------------------------------------------------------
    def close(self, timeout: float = 10.0, *, callback: Callback | None = None) -> Any:
        """Wait (up to ``timeout``) for pending work and callbacks, cancel consumers, close."""

    def forget(self) -> None:
        """Drop everything without touching the socket: used in a child after fork."""
