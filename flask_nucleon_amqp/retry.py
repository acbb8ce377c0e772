"""Retries with delay for listeners, built on a TTL queue that dead-letters back to the work queue.

For a listener on queue ``Q`` with ``retry=dict(max_attempts=3, delay=5)``
the extension declares two durable queues next to ``Q`` (see
:func:`retry_declarations`):

* ``Q.retry`` with ``x-message-ttl`` = the delay and ``x-dead-letter-exchange``
  = the default exchange, ``x-dead-letter-routing-key`` = ``Q``: a message put
  there waits ``delay`` seconds in the broker, then the broker dead-letters it
  back to ``Q``;
* ``Q.dead``: where a message goes after its last failed attempt, with the
  reason in its ``x-failure-reason`` header, for a human (or a tool) to look at.

A failed message is **republished** to ``Q.retry`` (or ``Q.dead``) and then
acked; rejecting it instead would need ``Q`` declared with a dead-letter
exchange of ours (its arguments are the application's) and cannot add a
header. Republishing waits for the broker's confirm and is ``mandatory``, so
the ack only follows a copy the broker has taken: a crash in between delivers
the message once more, never zero times. The default exchange routes by queue
name, so no exchange or binding of ours can be missing or out of date.

No delay is held in the process: a worker that stops loses no pending retry,
and retries survive restarts of the app (and, for persistent messages, of the
broker). The delay is one per queue (it is the queue's TTL); changing it means
deleting ``Q.retry`` first, as the broker refuses to redeclare a queue with
other arguments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .topology import Queue

if TYPE_CHECKING:
    from .message import Message
    from .protocol import Connection

__all__ = [
    "RetryPolicy",
    "retry_queue_name",
    "dead_queue_name",
    "retry_declarations",
    "attempt_of",
    "failure_reason",
    "republish",
    "restore_route",
    "RETRY_COUNT_HEADER",
    "FAILURE_REASON_HEADER",
    "ORIGINAL_EXCHANGE_HEADER",
    "ORIGINAL_ROUTING_KEY_HEADER",
]

#: How many times the message was sent back for another attempt (0 or absent on the first).
RETRY_COUNT_HEADER = "x-retry-count"
#: On a message in the dead-letter queue: ``ExceptionType: message`` of the last attempt, truncated.
FAILURE_REASON_HEADER = "x-failure-reason"
#: Where the message was first published: the way back from ``Q.retry`` is the default exchange,
#: so these let the listener show the callback the message as it first arrived.
ORIGINAL_EXCHANGE_HEADER = "x-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-original-routing-key"
#: Longest failure reason kept in the header, in characters (tracebacks stay in the log).
MAX_REASON_LENGTH = 500

#: Properties carried over to the copy. ``expiration`` is left out: a per-message TTL would cut the
#: delay short in ``Q.retry`` and delete the message from ``Q.dead``. ``user_id`` is kept only when
#: it is the publishing user's, as the broker refuses any other.
_COPIED_PROPERTIES = ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
                      "reply_to", "message_id", "timestamp", "type", "app_id")
_RETRY_KEYS = ("max_attempts", "delay")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a listener's failed messages are tried again.

    :param max_attempts: deliveries to the callback in all, the first one
        included; 1 sends a message to the dead-letter queue at its first failure.
    :param delay: seconds between a failure and the next attempt (the TTL of
        the retry queue, kept to the millisecond).
    """

    max_attempts: int
    delay: float

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"retry: max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if (isinstance(self.delay, bool) or not isinstance(self.delay, (int, float)) or not math.isfinite(self.delay)
                or self.delay < 0):
            raise ValueError(f"retry: delay must be a number of seconds >= 0, got {self.delay!r}")
        if self.delay_ms > 2**32 - 1:
            raise ValueError(f"retry: delay {self.delay!r}s is longer than the broker's longest TTL (about 49 days)")

    @classmethod
    def parse(cls, value: RetryPolicy | Mapping[str, Any] | None) -> RetryPolicy | None:
        """Accept ``dict(max_attempts=..., delay=...)`` (or a policy, or None); name what is wrong."""
        if value is None or isinstance(value, RetryPolicy):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"retry must be a dict like dict(max_attempts=3, delay=5), got {value!r}")
        unknown = sorted(set(value) - set(_RETRY_KEYS), key=str)
        if unknown:
            raise ValueError(f"retry: unknown option(s) {', '.join(map(repr, unknown))} "
                             "(known: max_attempts, delay)")
        missing = [key for key in _RETRY_KEYS if key not in value]
        if missing:
            raise ValueError(f"retry needs {' and '.join(missing)}, e.g. retry=dict(max_attempts=3, delay=5)")
        return cls(max_attempts=value["max_attempts"], delay=value["delay"])

    @property
    def delay_ms(self) -> int:
        return round(self.delay * 1000)

    def describe(self) -> str:
        return f"{self.max_attempts} attempts, {self.delay:g}s apart"


def retry_queue_name(queue: str) -> str:
    """The queue where a failed message of ``queue`` waits out its delay."""
    return f"{queue}.retry"


def dead_queue_name(queue: str) -> str:
    """The queue where a message of ``queue`` goes after its last failed attempt."""
    return f"{queue}.dead"


def retry_declarations(queue: str, policy: RetryPolicy) -> tuple[Queue, Queue]:
    """The retry and dead-letter queues of ``queue``: the same values for the same arguments.

    :raises ValueError: a derived name would be longer than AMQP's 255 bytes.
    """
    for name in (retry_queue_name(queue), dead_queue_name(queue)):
        if len(name.encode("utf-8")) > 255:
            raise ValueError(f"retry on queue {queue[:40]!r}...: the retry queue name {name[:40]!r}... would be "
                             "longer than 255 bytes; use a shorter queue name")
    return (Queue(retry_queue_name(queue), message_ttl=policy.delay_ms, dead_letter_exchange="",
                  dead_letter_routing_key=queue),
            Queue(dead_queue_name(queue)))


def attempt_of(message: Message) -> int:
    """Which attempt this delivery is: 1 the first time, then 1 + the retry count header."""
    count = message.headers.get(RETRY_COUNT_HEADER, 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return 1  # a header we did not write: count from here
    return count + 1


def failure_reason(exc: BaseException) -> str:
    """``ExceptionType: message``, module-qualified unless builtin, at most MAX_REASON_LENGTH characters."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = f"{name}: {exc}" if str(exc) else name
    if len(text) > MAX_REASON_LENGTH:
        text = text[:MAX_REASON_LENGTH - 3] + "..."
    return text


def restore_route(message: Message) -> None:
    """Show a retried message with the exchange and routing key it was first published with.

    It comes back from the retry queue through the default exchange; a
    callback that dispatches on ``message.routing_key`` must see the same on
    every attempt.
    """
    headers = message.headers
    exchange, routing_key = headers.get(ORIGINAL_EXCHANGE_HEADER), headers.get(ORIGINAL_ROUTING_KEY_HEADER)
    if isinstance(exchange, str) and isinstance(routing_key, str):
        message["exchange"], message["routing_key"] = exchange, routing_key


def republish(conn: Connection, message: Message, queue: str, retry_count: int,
              reason: str | None = None) -> None:
    """Publish a copy of ``message`` to ``queue`` (through the default exchange) and wait for the confirm.

    The copy keeps the body, headers and properties (see ``_COPIED_PROPERTIES``),
    records ``retry_count`` and where the message was first published, and,
    when given, the failure ``reason``.

    :raises Unroutable: ``queue`` does not exist (the copy is not dropped silently).
    """
    headers = dict(message.headers)
    headers[RETRY_COUNT_HEADER] = retry_count
    headers.setdefault(ORIGINAL_EXCHANGE_HEADER, message.exchange)
    headers.setdefault(ORIGINAL_ROUTING_KEY_HEADER, message.routing_key)
    if reason is not None:
        headers[FAILURE_REASON_HEADER] = reason
    properties: dict[str, Any] = {name: message.get(name) for name in _COPIED_PROPERTIES
                                  if message.get(name) is not None}
    if message.get("user_id") is not None and message.get("user_id") == conn.settings.user:
        properties["user_id"] = message["user_id"]
    conn.publish("", queue, message.body, headers=headers, mandatory=True, **properties)
