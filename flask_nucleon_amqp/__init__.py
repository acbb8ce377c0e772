"""flask_nucleon_amqp: pooled, gevent-native AMQP (RabbitMQ) connections for Flask, built on puka."""

from __future__ import annotations

# cli: loads the `flask amqp` commands into the group init_app adds to every app.
from . import cli, signals
from .config import PoolSettings
from .connection import PukaConnection
from .exceptions import (
    AccessRefused,
    AMQPError,
    AuthenticationError,
    ChannelError,
    ConfigError,
    ConnectionBlocked,
    ConnectionError,
    ConnectionLost,
    MessageStateError,
    NotFound,
    PreconditionFailed,
    PublishNacked,
    PublishOutcomeUnknown,
    ResourceLocked,
    Timeout,
    Unroutable,
    VhostNotAllowed,
)
from .extension import AMQP, AMQPState, current_amqp
from .lifecycle import InitialisationError, on_initialise
from .listener import Listener
from .message import Message
from .pool import Pool
from .protocol import Connection
from .retry import RetryPolicy
from .topology import Binding, CheckResult, Exchange, Queue, Topology

__version__ = "0.1.0"

__all__ = [
    "cli",
    "signals",
    "AMQP",
    "AMQPState",
    "current_amqp",
    "Pool",
    "PoolSettings",
    "RetryPolicy",
    "CheckResult",
    "Connection",
    "PukaConnection",
    "Message",
    "on_initialise",
    "Listener",
    "Exchange",
    "Queue",
    "Binding",
    "Topology",
    "InitialisationError",
    "AMQPError",
    "ConfigError",
    "ConnectionError",
    "ConnectionLost",
    "AuthenticationError",
    "VhostNotAllowed",
    "ChannelError",
    "NotFound",
    "AccessRefused",
    "ResourceLocked",
    "PreconditionFailed",
    "Unroutable",
    "PublishNacked",
    "PublishOutcomeUnknown",
    "Timeout",
    "ConnectionBlocked",
    "MessageStateError",
]
