"""The nine topology methods of a connection: declare, delete, bind and unbind exchanges and queues, purge.

:class:`TopologyMethods` is the part of
:class:`~flask_nucleon_amqp._base.BaseConnection` that checks each method's own
arguments (exchange types, argument tables) and hands it on to ``_topology``,
which checks the names and timeout, sends it, and waits for it or dispatches
its outcome to ``callback=``.
"""

from __future__ import annotations

from typing import Any

from ._argument_checks import _EXCHANGE_TYPES, _arguments
from .protocol import Callback

__all__ = ["TopologyMethods"]


class TopologyMethods:
    """``exchange_declare`` ... ``queue_unbind``; what they need is :meth:`_topology` and :meth:`_table`."""

    def exchange_declare(self, exchange: str, type: str = "direct", *, durable: bool = False,
                         auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                         callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare an exchange (idempotent; PreconditionFailed if it exists with other settings).

        ``passive=True`` only checks that it exists (NotFound if not) and creates
        nothing; the other settings are then ignored, as RabbitMQ ignores them.
        """
        if type not in _EXCHANGE_TYPES and not (isinstance(type, str) and type.startswith("x-")):
            raise ValueError(f"type must be one of direct, fanout, topic, headers or an x- plugin type, got {type!r}")
        if passive:
            return self._topology("exchange_declare", {"exchange": exchange}, callback, timeout, type=type,
                                  durable=False, auto_delete=False, arguments={}, passive=True)
        return self._topology("exchange_declare", {"exchange": exchange}, callback, timeout, type=type,
                              durable=durable, auto_delete=auto_delete, arguments=self._declare_args(arguments))

    def exchange_delete(self, exchange: str, *, if_unused: bool = False,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Delete an exchange."""
        return self._topology("exchange_delete", {"exchange": exchange}, callback, timeout, if_unused=if_unused)

    def exchange_bind(self, destination: str, source: str, routing_key: str = "", *,
                      arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Bind exchange ``destination`` to exchange ``source``."""
        return self._topology("exchange_bind", {"destination": destination, "source": source,
                                                "routing_key": routing_key},
                              callback, timeout, arguments=self._declare_args(arguments))

    def exchange_unbind(self, destination: str, source: str, routing_key: str = "", *,
                        arguments: dict[str, Any] | None = None,
                        callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Remove an exchange-to-exchange binding."""
        return self._topology("exchange_unbind", {"destination": destination, "source": source,
                                                  "routing_key": routing_key},
                              callback, timeout, arguments=self._declare_args(arguments))

    def queue_declare(self, queue: str = "", *, durable: bool = False, exclusive: bool = False,
                      auto_delete: bool = False, passive: bool = False, arguments: dict[str, Any] | None = None,
                      callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Declare a queue; returns ``{'queue', 'message_count', 'consumer_count'}``."""
        return self._topology("queue_declare", {"queue": queue}, callback, timeout, durable=durable,
                              exclusive=exclusive, auto_delete=auto_delete, passive=passive,
                              arguments=self._declare_args(arguments))

    def queue_delete(self, queue: str, *, if_unused: bool = False, if_empty: bool = False,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Delete a queue; returns ``{'message_count'}``."""
        return self._topology("queue_delete", {"queue": queue}, callback, timeout,
                              if_unused=if_unused, if_empty=if_empty)

    def queue_purge(self, queue: str, *, callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Drop a queue's ready messages; returns ``{'message_count'}``."""
        return self._topology("queue_purge", {"queue": queue}, callback, timeout)

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "", *,
                   arguments: dict[str, Any] | None = None,
                   callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Bind a queue to an exchange."""
        return self._topology("queue_bind", {"queue": queue, "exchange": exchange, "routing_key": routing_key},
                              callback, timeout, arguments=self._declare_args(arguments))

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "", *,
                     arguments: dict[str, Any] | None = None,
                     callback: Callback | None = None, timeout: float | None = None) -> Any:
        """Remove a queue binding."""
        return self._topology("queue_unbind", {"queue": queue, "exchange": exchange, "routing_key": routing_key},
                              callback, timeout, arguments=self._declare_args(arguments))

    def _declare_args(self, arguments: dict[str, Any] | None) -> dict[str, Any]:
        return self._table(_arguments(arguments))

    def _topology(self, method: str, names: dict[str, str], callback: Callback | None, timeout: float | None,
                  **options: Any) -> Any:
        """Send topology ``method`` with ``names`` and ``options`` (BaseConnection implements it)."""
        raise NotImplementedError

    def _table(self, table: dict[str, Any]) -> dict[str, Any]:
        """Check an argument table; what the broker will see of it (BaseConnection implements it)."""
        raise NotImplementedError
