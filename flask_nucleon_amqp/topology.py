"""Declarative topology: Exchange, Queue and Binding values, declared later.

Declarations are plain values made at import time or read from
``AMQP_TOPOLOGY``; a :class:`Topology` collects them and declares them on a
connection in dependency order (exchanges, queues, bindings). Declaring is
idempotent; a declaration that conflicts with what the broker already has
raises :class:`~flask_nucleon_amqp.exceptions.PreconditionFailed` naming the
object. The extension declares the topology at start and again after every
reconnect (through :attr:`PukaConnection.on_open`), so a queue lost with a
broker restart comes back before its consumers resume.

Unlike ``queue_declare``, whose AMQP defaults are transient, these values are
**durable by default**: infrastructure that is written down is meant to last.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .exceptions import ChannelError, ConfigError, NotFound, PreconditionFailed, ResourceLocked

if TYPE_CHECKING:
    from .protocol import Connection

__all__ = ["Exchange", "Queue", "Binding", "Topology", "Declaration", "CheckResult", "CHECK_STATUSES",
           "topology_from_config"]

log = logging.getLogger(__name__)

_EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")

#: Queue keyword -> the x-argument it stands for.
_QUEUE_SHORTCUTS = {
    "dead_letter_exchange": "x-dead-letter-exchange",
    "dead_letter_routing_key": "x-dead-letter-routing-key",
    "message_ttl": "x-message-ttl",
    "max_length": "x-max-length",
    "expires": "x-expires",
}


def _name(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} name must be a non-empty string, got {value!r}")
    if len(value.encode("utf-8")) > 255:
        raise ValueError(f"{kind} name {value[:40]!r}... is longer than 255 bytes")
    return value


def _arguments(owner: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{owner}: arguments must be a dict, got {type(value).__name__}")
    return dict(value)


@dataclass(frozen=True)
class Exchange:
    """An exchange to declare: ``Exchange("unit_test_room", "topic")``.

    :param name: the exchange name; ``amq.*`` names are the broker's own and
        cannot be declared (bind to them instead).
    :param type: direct, fanout, topic, headers, or an ``x-`` plugin type.
    :param arguments: e.g. ``{"alternate-exchange": "unrouted"}``.
    """

    name: str
    type: str = "direct"
    durable: bool = True
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _name("exchange", self.name)
        if self.name.startswith("amq."):
            raise ValueError(f"exchange {self.name!r}: names starting with 'amq.' belong to the broker; "
                             "bind to it without declaring it")
        if self.type not in _EXCHANGE_TYPES and not (isinstance(self.type, str) and self.type.startswith("x-")):
            raise ValueError(f"exchange {self.name!r}: type must be one of {', '.join(_EXCHANGE_TYPES)} "
                             f"or an x- plugin type, got {self.type!r}")
        object.__setattr__(self, "arguments", _arguments(f"exchange {self.name!r}", self.arguments))

    @property
    def key(self) -> tuple[str, str]:
        return ("exchange", self.name)

    def __str__(self) -> str:
        return f"exchange {self.name!r}"

    def describe(self) -> str:
        """One line for humans: name and what is not default."""
        flags = [self.type, "durable" if self.durable else "transient"]
        if self.auto_delete:
            flags.append("auto-delete")
        flags += [f"{k}={v!r}" for k, v in sorted(self.arguments.items())]
        return f"{self} ({', '.join(flags)})"

    def declare(self, conn: Connection) -> None:
        conn.exchange_declare(self.name, self.type, durable=self.durable, auto_delete=self.auto_delete,
                              arguments=self.arguments)

    def delete(self, conn: Connection) -> None:
        conn.exchange_delete(self.name)


@dataclass(frozen=True, init=False)
class Queue:
    """A queue to declare: ``Queue("orders", quorum=True, dead_letter_exchange="dead")``.

    The keyword shortcuts (``quorum``, ``dead_letter_exchange``,
    ``dead_letter_routing_key``, ``message_ttl`` and ``expires`` in
    milliseconds, ``max_length``) become the matching ``x-`` arguments;
    ``arguments`` takes any other. Exclusive queues are not accepted: they
    belong to one connection, so they cannot be declared on every connection
    of a pool; declare those where they are consumed.
    """

    name: str
    durable: bool
    auto_delete: bool
    arguments: dict[str, Any] = field(hash=False)

    def __init__(self, name: str, *, durable: bool = True, auto_delete: bool = False, quorum: bool = False,
                 dead_letter_exchange: str | None = None, dead_letter_routing_key: str | None = None,
                 message_ttl: int | None = None, max_length: int | None = None, expires: int | None = None,
                 arguments: Mapping[str, Any] | None = None) -> None:
        _name("queue", name)
        where = f"queue {name!r}"
        args = _arguments(where, arguments)
        shortcuts = {"dead_letter_exchange": dead_letter_exchange, "dead_letter_routing_key": dead_letter_routing_key,
                     "message_ttl": message_ttl, "max_length": max_length, "expires": expires}
        for option, value in shortcuts.items():
            if value is None:
                continue
            x_key = _QUEUE_SHORTCUTS[option]
            if option.startswith("dead_letter"):
                if not isinstance(value, str):
                    raise ValueError(f"{where}: {option} must be a string, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < (1 if option == "expires" else 0):
                raise ValueError(f"{where}: {option} must be a whole number >= {1 if option == 'expires' else 0}, "
                                 f"got {value!r}")
            if x_key in args and args[x_key] != value:
                raise ValueError(f"{where}: {option}={value!r} contradicts arguments[{x_key!r}]={args[x_key]!r}")
            args[x_key] = value
        if quorum:
            if args.get("x-queue-type", "quorum") != "quorum":
                raise ValueError(f"{where}: quorum=True contradicts arguments['x-queue-type']={args['x-queue-type']!r}")
            args["x-queue-type"] = "quorum"
        if args.get("x-queue-type") == "quorum" and (not durable or auto_delete):
            raise ValueError(f"{where}: a quorum queue must be durable and not auto_delete")
        if "x-dead-letter-routing-key" in args and "x-dead-letter-exchange" not in args:
            raise ValueError(f"{where}: dead_letter_routing_key needs dead_letter_exchange")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "durable", bool(durable))
        object.__setattr__(self, "auto_delete", bool(auto_delete))
        object.__setattr__(self, "arguments", args)

    @property
    def key(self) -> tuple[str, str]:
        return ("queue", self.name)

    @property
    def quorum(self) -> bool:
        return self.arguments.get("x-queue-type") == "quorum"

    @property
    def dead_letter_exchange(self) -> str | None:
        return self.arguments.get("x-dead-letter-exchange")

    def __str__(self) -> str:
        return f"queue {self.name!r}"

    def __repr__(self) -> str:
        return (f"Queue({self.name!r}, durable={self.durable}, auto_delete={self.auto_delete}, "
                f"arguments={self.arguments!r})")

    def describe(self) -> str:
        flags = ["quorum" if self.quorum else "durable" if self.durable else "transient"]
        if self.auto_delete:
            flags.append("auto-delete")
        flags += [f"{k}={v!r}" for k, v in sorted(self.arguments.items()) if k != "x-queue-type"]
        return f"{self} ({', '.join(flags)})"

    def declare(self, conn: Connection) -> None:
        conn.queue_declare(self.name, durable=self.durable, auto_delete=self.auto_delete, arguments=self.arguments)

    def delete(self, conn: Connection) -> None:
        conn.queue_delete(self.name)


@dataclass(frozen=True)
class Binding:
    """Route messages from ``exchange`` to ``queue`` (or to ``to_exchange``) by ``routing_key``.

    The exchange may be one of the broker's own (``amq.topic``) or one
    declared in the same topology.
    """

    exchange: str
    queue: str | None = None
    routing_key: str = ""
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    to_exchange: str | None = None

    def __post_init__(self) -> None:
        _name("binding exchange", self.exchange)
        if (self.queue is None) == (self.to_exchange is None):
            raise ValueError(f"binding from exchange {self.exchange!r}: give exactly one of queue= or to_exchange=")
        _name("binding destination", self.queue if self.queue is not None else self.to_exchange)
        if not isinstance(self.routing_key, str):
            raise ValueError(f"{self}: routing_key must be a string, got {self.routing_key!r}")
        object.__setattr__(self, "arguments", _arguments(str(self), self.arguments))

    @property
    def destination(self) -> str:
        return self.queue if self.queue is not None else self.to_exchange  # type: ignore[return-value]

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        kind = "queue" if self.queue is not None else "exchange"
        return ("binding", self.exchange, kind, self.destination, self.routing_key)

    def __str__(self) -> str:
        kind = "queue" if self.queue is not None else "exchange"
        return f"binding {self.exchange!r} -> {kind} {self.destination!r} (routing key {self.routing_key!r})"

    def describe(self) -> str:
        extra = f" arguments={self.arguments!r}" if self.arguments else ""
        return f"{self}{extra}"

    def declare(self, conn: Connection) -> None:
        if self.queue is not None:
            conn.queue_bind(self.queue, self.exchange, self.routing_key, arguments=self.arguments)
        else:
            conn.exchange_bind(self.destination, self.exchange, self.routing_key, arguments=self.arguments)

    def delete(self, conn: Connection) -> None:
        if self.queue is not None:
            conn.queue_unbind(self.queue, self.exchange, self.routing_key, arguments=self.arguments)
        else:
            conn.exchange_unbind(self.destination, self.exchange, self.routing_key, arguments=self.arguments)


Declaration = Exchange | Queue | Binding
_ORDER = {Exchange: 0, Queue: 1, Binding: 2}


class Topology:
    """An ordered registry of declarations; may include another (an extension's) by reference.

    Adding the same declaration twice is harmless; adding a different one
    under a name already taken is a ValueError, naming both.
    """

    def __init__(self, *declarations: Declaration) -> None:
        self._own: dict[tuple[str, ...], Declaration] = {}
        self._included: list[Topology] = []
        #: Per broker: (pid, everything) last declared there in full by that process.
        self._declared: dict[tuple[Any, ...], tuple[int, tuple[Declaration, ...]]] = {}
        self.add(*declarations)

    def add(self, *declarations: Declaration) -> Topology:
        """Register declarations (declared at start, by ``flask amqp declare`` and after reconnects)."""
        for declaration in declarations:
            if not isinstance(declaration, (Exchange, Queue, Binding)):
                raise TypeError(f"expected Exchange, Queue or Binding, got {declaration!r}")
            self._check(declaration)
            self._own[declaration.key] = declaration
        return self

    def ensure_compatible(self, *declarations: Declaration) -> None:
        """Raise the ValueError :meth:`add` would, without adding anything."""
        for declaration in declarations:
            self._check(declaration)

    def include(self, other: Topology) -> Topology:
        """Also yield ``other``'s declarations, after this one's (read at each use, so later additions count)."""
        self._included.append(other)
        return self

    def _check(self, declaration: Declaration) -> None:
        existing = self.get(declaration.key)
        if existing is not None and existing != declaration:
            raise ValueError(f"{declaration} is registered twice with different settings: "
                             f"{existing.describe()} and {declaration.describe()}")

    def get(self, key: tuple[str, ...]) -> Declaration | None:
        found = self._own.get(key)
        for other in self._included:
            if found is not None:
                break
            found = other.get(key)
        return found

    def queue(self, name: str) -> Queue | None:
        """The registered queue of that name, if any."""
        found = self.get(("queue", name))
        return found if isinstance(found, Queue) else None

    def __iter__(self) -> Iterator[Declaration]:
        """Exchanges, then queues, then bindings, each in registration order."""
        seen: dict[tuple[str, ...], Declaration] = {}
        for declaration in self._all():
            previous = seen.setdefault(declaration.key, declaration)
            if previous != declaration:
                raise ValueError(f"{declaration} is registered twice with different settings: "
                                 f"{previous.describe()} and {declaration.describe()}")
        return iter(sorted(seen.values(), key=lambda d: _ORDER[type(d)]))

    def _all(self) -> Iterator[Declaration]:
        yield from self._own.values()
        for other in self._included:
            yield from other._all()

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return any(True for _ in self._all())

    def queues(self) -> list[Queue]:
        return [d for d in self if isinstance(d, Queue)]

    def declare(self, conn: Connection, only: Iterable[Declaration] | None = None) -> list[Declaration]:
        """Declare everything (or ``only`` those) on ``conn``, in dependency order.

        :raises PreconditionFailed: a declaration conflicts with what exists; the message names it.
        :raises NotFound: a binding names an exchange or queue that does not exist.
        """
        declared = []
        for declaration in (sorted(only, key=lambda d: _ORDER[type(d)]) if only is not None else self):
            try:
                declaration.declare(conn)
            except ChannelError as exc:
                raise _naming(exc, f"cannot declare {declaration.describe()}") from exc
            declared.append(declaration)
        if only is None:
            self._declared[_broker(conn)] = (os.getpid(), tuple(declared))
        return declared

    def delete(self, conn: Connection) -> list[Declaration]:
        """Delete everything: bindings first, then queues (with their messages), then exchanges.

        Already-absent objects are not an error (deleting is idempotent too).
        """
        deleted = []
        for declaration in reversed(list(self)):
            try:
                declaration.delete(conn)
            except ChannelError as exc:
                if exc.reply_code == 404:  # unbinding from an exchange that is gone
                    continue
                raise _naming(exc, f"cannot delete {declaration}") from exc
            deleted.append(declaration)
        return deleted

    def check(self, conn: Connection) -> list[CheckResult]:
        """Compare the broker's exchanges, queues and bindings with these declarations; change nothing.

        Used by ``flask amqp declare --check``. One :class:`CheckResult` per
        declaration, in declaring order. How each kind is looked at, with the
        AMQP API only (RabbitMQ 3.10 and later):

        * **Queues**: a passive ``queue.declare`` says whether the queue exists.
          If it does, it is declared again with our settings: that creates
          nothing, and the broker compares durable, auto-delete and the
          arguments it knows, refusing with PRECONDITION_FAILED and the first
          difference ("differs").
        * **Exchanges**: puka 0.0.8 sends no passive ``exchange.declare``, and
          RabbitMQ accepts unbinding from a missing exchange, so existence is
          probed by binding the exchange *as destination* to ``amq.direct``
          with a routing key made for the probe, unbound at once: a missing
          exchange fails with NOT_FOUND. The probe leaves the exchange as it
          was (auto-delete only follows bindings where an exchange is the
          source) and routes nothing (no one publishes that key). An existing
          exchange is then declared again with our settings, compared by the
          broker as for queues (type, durable, auto-delete, arguments).
        * **Bindings**: AMQP can neither list nor test a binding without
          creating it, so only their two ends are checked; a binding whose ends
          exist is "unverifiable", not "ok".

        Redeclaring counts as use for ``x-expires``. An object deleted between
        the probe and the redeclare would be created by it; check when nobody
        is deleting topology.

        :raises ConnectionError: the broker cannot be reached (errors naming an
            object become that object's result instead).
        """
        checker = _Checker(conn)
        return [checker.check(declaration) for declaration in self]

    def redeclare_hook(self, conn: Connection) -> None:
        """An ``on_open`` hook: declare again after a reconnect, before consumers resume.

        A conflict is logged, not raised: raising here would fail whatever
        operation happened to open the connection. Connection errors propagate,
        so the reconnect is retried. A connection opening for the first time
        skips it when this process declared the same topology on that broker
        already: a worker opens several connections as it boots, and a storm of
        restarting workers should not declare everything once per connection.
        """
        if conn.stats["lost"] == 0 and self._declared.get(_broker(conn)) == (os.getpid(), tuple(self)):
            return
        try:
            self.declare(conn)
        except ChannelError:
            log.exception("re-declaring the AMQP topology after (re)connecting failed")


def _broker(conn: Connection) -> tuple[Any, ...]:
    settings = conn.settings
    return (settings.transport, settings.nodes, settings.vhost)


# -- checking -----------------------------------------------------------------------------------
#: What :meth:`Topology.check` can find for one declaration.
CHECK_STATUSES = ("ok", "missing", "differs", "unverifiable", "error")

#: RabbitMQ's words for a difference: "inequivalent arg 'durable' for queue 'q' in vhost '/':
#: received 'true' but current is 'false'" (received = ours, current = the broker's).
_INEQUIVALENT = re.compile(r"inequivalent arg '(?P<arg>[^']*)' for .*?: received (?P<ours>.*) but current is "
                           r"(?P<theirs>.*)$")


@dataclass(frozen=True)
class CheckResult:
    """What :meth:`Topology.check` found for one declaration.

    ``status`` is one of :data:`CHECK_STATUSES`: ``ok``; ``missing``;
    ``differs`` (``detail`` says how); ``unverifiable`` (a binding whose two
    ends exist: AMQP cannot see the binding itself); ``error`` (the broker
    would not let us look, e.g. access refused).
    """

    declaration: Declaration
    status: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in CHECK_STATUSES:
            raise ValueError(f"status must be one of {', '.join(CHECK_STATUSES)}, got {self.status!r}")

    @property
    def matches(self) -> bool:
        """True unless the broker's object is missing, differs, or could not be looked at."""
        return self.status in ("ok", "unverifiable")

    def __str__(self) -> str:
        text = f"{self.status.upper() if not self.matches else self.status}: {self.declaration.describe()}"
        return f"{text}: {self.detail}" if self.detail else text


def _difference(exc: ChannelError) -> str:
    """The broker's PRECONDITION_FAILED text, said as "arg: declared X, the broker has Y"."""
    text = exc.reply_text.split(" - ", 1)[-1]
    found = _INEQUIVALENT.search(text)
    if found is None:
        return text
    return f"{found['arg']}: declared {found['ours']}, the broker has {found['theirs']}"


class _Checker:
    """One run of :meth:`Topology.check`: remembers what exists, so bindings need no second look."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.exists: dict[tuple[str, str], bool] = {}

    def exchange_exists(self, name: str) -> bool:
        """Probe an exchange without passive declare (see :meth:`Topology.check`)."""
        if name.startswith("amq."):
            return True  # the broker's own; every vhost has them
        key = ("exchange", name)
        if key not in self.exists:
            probe = f"flask_nucleon_amqp.check.{uuid.uuid4().hex}"
            try:
                self.conn.exchange_bind(name, "amq.direct", probe)
            except NotFound:
                self.exists[key] = False
            else:
                self.conn.exchange_unbind(name, "amq.direct", probe)
                self.exists[key] = True
        return self.exists[key]

    def queue_exists(self, name: str) -> bool:
        key = ("queue", name)
        if key not in self.exists:
            try:
                self.conn.queue_declare(name, passive=True)
            except NotFound:
                self.exists[key] = False
            else:
                self.exists[key] = True
        return self.exists[key]

    def check(self, declaration: Declaration) -> CheckResult:
        try:
            if isinstance(declaration, Binding):
                return self._binding(declaration)
            kind = "exchange" if isinstance(declaration, Exchange) else "queue"
            present = self.exchange_exists(declaration.name) if kind == "exchange" else \
                self.queue_exists(declaration.name)
            if not present:
                return CheckResult(declaration, "missing", f"the broker has no {kind} of that name")
            # It exists, so declaring it again creates nothing: the broker only compares the settings.
            declaration.declare(self.conn)
        except PreconditionFailed as exc:
            return CheckResult(declaration, "differs", _difference(exc))
        except ResourceLocked as exc:
            return CheckResult(declaration, "differs", f"exclusive to another connection ({exc.reply_text})")
        except ChannelError as exc:
            return CheckResult(declaration, "error", f"cannot check it: {exc}")
        return CheckResult(declaration, "ok")

    def _binding(self, binding: Binding) -> CheckResult:
        ends = [("exchange", binding.exchange),
                ("queue", binding.destination) if binding.queue is not None else ("exchange", binding.destination)]
        missing = [f"{kind} {name!r}" for kind, name in ends
                   if not (self.exchange_exists(name) if kind == "exchange" else self.queue_exists(name))]
        if missing:
            return CheckResult(binding, "missing", f"{' and '.join(missing)} missing")
        return CheckResult(binding, "unverifiable", "both ends exist; AMQP cannot see the binding itself "
                                                    "(`rabbitmqctl list_bindings` can)")


def _naming(exc: ChannelError, text: str) -> ChannelError:
    """The same kind of error, with a message that names the declaration."""
    message = f"{text}: {exc.reply_text}"
    if type(exc) is ChannelError:
        return ChannelError(message, exc.reply_code)
    return type(exc)(message)


# -- AMQP_TOPOLOGY -----------------------------------------------------------------------------
_EXCHANGE_OPTIONS = {"type", "durable", "auto_delete", "arguments"}
_QUEUE_OPTIONS = {"durable", "auto_delete", "quorum", "arguments", *_QUEUE_SHORTCUTS}
_BINDING_OPTIONS = {"exchange", "queue", "to_exchange", "routing_key", "arguments"}
_SECTIONS = {"exchanges", "queues", "bindings"}


def _options(key: str, raw: Any, known: set[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a dict of options, got {type(raw).__name__}")
    for option in raw:
        if option not in known:
            raise ConfigError(f"{key}[{option!r}]", f"unknown option (known: {', '.join(sorted(known))})")
    return dict(raw)


def topology_from_config(value: Any, key: str = "AMQP_TOPOLOGY") -> Topology:
    """Build a :class:`Topology` from the dict form of ``AMQP_TOPOLOGY``::

        AMQP_TOPOLOGY = {
            "exchanges": {"unit_test_room": {"type": "direct"}},
            "queues": {"listener1": {"quorum": True, "dead_letter_exchange": "dead"}},
            "bindings": [{"exchange": "unit_test_room", "queue": "listener1", "routing_key": "user1"}],
        }

    :raises ConfigError: naming the offending key, e.g. ``AMQP_TOPOLOGY['queues']['q']['durabel']``.
    """
    topology = Topology()
    if value is None:
        return topology
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a dict with exchanges, queues and bindings, got {type(value).__name__}")
    for section in value:
        if section not in _SECTIONS:
            raise ConfigError(f"{key}[{section!r}]", "unknown section (known: bindings, exchanges, queues)")
    for section, builder, known in (("exchanges", Exchange, _EXCHANGE_OPTIONS), ("queues", Queue, _QUEUE_OPTIONS)):
        entries = value.get(section) or {}
        if not isinstance(entries, Mapping):
            raise ConfigError(f"{key}[{section!r}]",
                              f"must be a dict from name to options, got {type(entries).__name__}")
        for name, raw in entries.items():
            where = f"{key}[{section!r}][{name!r}]"
            try:
                topology.add(builder(name, **_options(where, raw, known)))
            except (TypeError, ValueError) as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(where, str(exc)) from None
    bindings = value.get("bindings") or []
    if not isinstance(bindings, (list, tuple)):
        raise ConfigError(f"{key}['bindings']", f"must be a list of dicts, got {type(bindings).__name__}")
    for index, raw in enumerate(bindings):
        where = f"{key}['bindings'][{index}]"
        options = _options(where, raw, _BINDING_OPTIONS)
        if "exchange" not in options:
            raise ConfigError(where, "needs 'exchange'")
        try:
            topology.add(Binding(**options))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(where, str(exc)) from None
    return topology
