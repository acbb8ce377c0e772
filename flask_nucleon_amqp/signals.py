"""Blinker signals, in the style of Flask's own.

Each is sent with the :class:`PukaConnection` as sender. Receivers run in the
greenlet that did the work (often the connection's I/O greenlet): keep them
quick and never block in them.

====================== ===========================================================
signal                 keyword arguments
====================== ===========================================================
message_published      exchange, routing_key, body_size, body, properties (as sent, with headers)
message_confirmed      exchange, routing_key, seconds (publish to confirm)
message_returned       exchange, routing_key, error (an unroutable mandatory message)
publish_failed         exchange, routing_key, error (any publish that was not confirmed)
message_received       message
message_acked          message
message_rejected       message, requeue (reject and nack)
consumer_cancelled     promise, queue (the broker cancelled a consumer: its queue was deleted)
connection_opened      node (host:port)
connection_lost        node, reason
connection_recovered   node
connection_blocked     reason
connection_unblocked   (none)
message_handled        queue, seconds, failed (sender: the Listener; its callback ran)
====================== ===========================================================
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import Namespace

__all__ = [
    "message_published", "message_confirmed", "message_returned", "message_received", "message_acked",
    "message_rejected", "consumer_cancelled", "connection_opened", "connection_lost", "connection_recovered",
    "connection_blocked", "connection_unblocked", "publish_failed", "message_handled",
]

log = logging.getLogger(__name__)

_signals = Namespace()

message_published = _signals.signal("amqp-message-published")
message_confirmed = _signals.signal("amqp-message-confirmed")
message_returned = _signals.signal("amqp-message-returned")
message_received = _signals.signal("amqp-message-received")
message_acked = _signals.signal("amqp-message-acked")
message_rejected = _signals.signal("amqp-message-rejected")
consumer_cancelled = _signals.signal("amqp-consumer-cancelled")
connection_opened = _signals.signal("amqp-connection-opened")
connection_lost = _signals.signal("amqp-connection-lost")
connection_recovered = _signals.signal("amqp-connection-recovered")
connection_blocked = _signals.signal("amqp-connection-blocked")
connection_unblocked = _signals.signal("amqp-connection-unblocked")
publish_failed = _signals.signal("amqp-publish-failed")
message_handled = _signals.signal("amqp-message-handled")


def _emit(signal: Any, sender: Any, **kwargs: Any) -> None:
    """Send a blinker signal if anyone listens; a failing receiver never breaks the connection."""
    if signal.receivers:
        try:
            signal.send(sender, **kwargs)
        except Exception:  # noqa: BLE001
            log.exception("a receiver of %s raised", signal.name)
