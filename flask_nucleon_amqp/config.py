"""Reading and checking the ``AMQP_*`` configuration keys.

The configuration is read once, at ``init_app``; every mistake is reported
there, naming the offending key, so that a bad deploy fails at start-up
rather than at the first request. Nothing here opens a socket.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .exceptions import ConfigError
from .runtime import check_mode

__all__ = ["Setting", "APP_SETTINGS", "POOL_SETTINGS", "AppSettings", "Node", "TLSSettings", "PoolSettings",
           "read_settings", "read_config", "parse_bool", "DEFAULT_URL"]

#: The broker every pool uses unless it says otherwise.
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be an integer >= 1, got {value!r}")
    return value


def _port(key: str, value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(key, f"must be a port number (1-65535), got {value!r}")
    return value


def _seconds(key: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        limit = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, f"must be a number of seconds {limit}, got {value!r}")
    return float(value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {type(value).__name__}")
    return value


def parse_bool(key: str, value: Any) -> bool:
    """A flag: True or False, nothing truthy ("yes", 1) that a typo could produce."""
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be True or False, got {value!r}")
    return value


def _heartbeat(key: str, value: Any) -> float:
    """AMQP negotiates heartbeats in whole seconds: 0 (off) or at least 1; fractions are rounded.

    Below 1 s the broker would be told 0 (off) while this client still
    declared the connection dead after two silent intervals, so it is refused.
    """
    seconds = _seconds(key, value, allow_zero=True)
    if 0 < seconds < 1:
        raise ConfigError(key, f"must be 0 (heartbeats off) or at least 1 second (AMQP heartbeats are whole "
                               f"seconds), got {value!r}")
    return float(round(seconds))


def _pools(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a dict from pool name to settings, got {type(value).__name__}")
    return value


def _topology(key: str, value: Any) -> Mapping[str, Any]:
    """The dict form of AMQP_TOPOLOGY; its entries are checked by :func:`topology.topology_from_config`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a dict with exchanges, queues and bindings, got {type(value).__name__}")
    return value


def _existing_file(key: str, value: Any) -> str:
    path = _text(key, value)
    if not os.path.isfile(path):
        raise ConfigError(key, f"file not found: {path}")
    return path


def parse_url(key: str, url: Any) -> dict[str, Any]:
    """Split an ``amqp://`` / ``amqps://`` URL into pool keys.

    The vhost is the URL-decoded path (``%2F`` is ``/``); an empty path means ``/``.
    ``?heartbeat=`` and ``?connect_timeout=`` are understood.
    """
    url = _text(key, url)
    if url.startswith("memory://"):
        # In-process broker for tests: memory://NAME shares state between pools naming the same NAME.
        return {"transport": "memory", "host": url[len("memory://"):].strip("/") or "default", "port": 1}
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"malformed URL: {_mask(url)} ({exc})") from None
    if parts.scheme not in ("amqp", "amqps") or not url[len(parts.scheme) + 1:].startswith("//"):
        # "amqp:/bad" would otherwise be read as host localhost, vhost "bad".
        raise ConfigError(key, f"URL must start with amqp://, amqps:// or memory://, got {_mask(url)}")
    if "@" in parts.netloc and not parts.hostname:
        raise ConfigError(key, f"malformed URL (no host): {_mask(url)}")
    out: dict[str, Any] = {"tls": parts.scheme == "amqps"}
    if parts.hostname:
        out["host"] = unquote(parts.hostname)
    if port is not None:
        out["port"] = port
    if parts.username is not None:
        out["user"] = unquote(parts.username)
    if parts.password is not None:
        out["password"] = unquote(parts.password)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if path:
        out["vhost"] = unquote(path)
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("heartbeat", "connect_timeout"):
            raise ConfigError(key, f"unknown URL option {name!r} (known: heartbeat, connect_timeout)")
        out[name] = POOL_SETTINGS[name].parse(f"{key} ?{name}", value)
    return out


def _mask(url: str) -> str:
    """Hide the password of a URL that could not be parsed further."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, tail = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}"


# -- the configuration keys ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One configuration key: its default, the parser that checks it, and what it means (one line)."""

    default: Any
    #: ``parse(key, value)`` returns the checked value or raises :class:`ConfigError` naming ``key``.
    parse: Callable[[str, Any], Any]
    doc: str
    #: How the docs show the default when ``repr(default)`` would not say it.
    shown_default: str | None = None

    @property
    def default_text(self) -> str:
        return self.shown_default if self.shown_default is not None else repr(self.default)


#: Every application-level key (``app.config["AMQP_..."]``). Any other ``AMQP_*`` key is refused.
APP_SETTINGS: dict[str, Setting] = {
    "AMQP_URL": Setting(DEFAULT_URL, parse_url,
                        "the broker of every pool unless a pool names its own url; amqp://, amqps:// (TLS) or "
                        "memory://; the vhost is URL-encoded (%2F is /)"),
    "AMQP_POOLS": Setting({"publish": {}, "listen": {}}, _pools,
                          "pool name -> that pool's settings (the pool keys); publish and listen always exist"),
    "AMQP_SHUTDOWN_TIMEOUT": Setting(10.0, lambda k, v: _seconds(k, v, allow_zero=True),
                                     "seconds close() waits for pending confirms and running callbacks"),
    "AMQP_TOPOLOGY": Setting({}, _topology, "exchanges, queues and bindings to declare (dict form)"),
    "AMQP_DECLARE_ON_START": Setting(True, parse_bool,
                                     "declare the topology when a process initialises and after every reconnect"),
    "AMQP_START_LISTENERS": Setting(True, parse_bool,
                                    "start listeners when a web process initialises; False leaves them to "
                                    "`flask amqp listen`"),
    "AMQP_RUNTIME": Setting("auto", lambda k, v: check_mode(v, k),
                            "where connections, listeners and callbacks run: auto, gevent (the main thread's "
                            "gevent hub) or thread (a hub thread of the extension's own)"),
}

#: The ``AMQP_OUTBOX_*`` keys, read by :mod:`flask_nucleon_amqp.outbox` (only apps with an outbox use them).
OUTBOX_SETTINGS: dict[str, Setting] = {
    "AMQP_OUTBOX_POOL": Setting("publish", _text, "the pool the outbox publishes through"),
    "AMQP_OUTBOX_RELAY": Setting(True, parse_bool, "run a relay in each process that starts its listeners"),
    "AMQP_OUTBOX_RELAY_INTERVAL": Setting(1.0, _seconds,
                                          "seconds between two looks at the table when there was nothing to do"),
    "AMQP_OUTBOX_RELAY_DELAY": Setting(5.0, lambda k, v: _seconds(k, v, allow_zero=True),
                                       "age (seconds) of a row before the relay takes it over"),
    "AMQP_OUTBOX_BATCH": Setting(500, _positive_int, "rows per relay batch (and per after-commit publish batch)"),
    "AMQP_OUTBOX_MAX_ATTEMPTS": Setting(5, _positive_int, "failed attempts of one row before it is parked"),
    "AMQP_OUTBOX_BACKOFF": Setting(1.0, _seconds, "first retry delay (seconds); doubled at each failure in a row"),
    "AMQP_OUTBOX_BACKOFF_MAX": Setting(60.0, _seconds, "the longest retry delay, in seconds"),
    "AMQP_OUTBOX_TIMEOUT": Setting(30.0, _seconds, "seconds a publish waits for the broker's confirm"),
}

#: Every key of one pool's dict in ``AMQP_POOLS``.
POOL_SETTINGS: dict[str, Setting] = {
    "size": Setting(1, _positive_int, "number of connections the pool shares between greenlets"),
    "url": Setting(None, _text, "amqp:// or amqps:// URL, or a list of them (cluster nodes); replaces AMQP_URL",
                   shown_default="AMQP_URL"),
    "host": Setting("localhost", _text, "broker host name, or a list of them (cluster nodes); the URL's port stays",
                    shown_default="the URL's host"),
    "port": Setting(None, _port, "broker port", shown_default="the URL's, else 5672, or 5671 for amqps"),
    "user": Setting("guest", _text, "user name", shown_default="the URL's, else 'guest'"),
    "password": Setting("guest", _text, "password; never logged", shown_default="the URL's, else 'guest'"),
    "vhost": Setting("/", _text, "virtual host, not URL-encoded", shown_default="the URL's, else '/'"),
    "heartbeat": Setting(60.0, _heartbeat, "seconds between heartbeats (whole seconds, at least 1); a peer silent "
                                           "for 2 intervals is dead; 0 turns them off"),
    "connect_timeout": Setting(10.0, _seconds, "seconds to open a connection before giving up"),
    "operation_timeout": Setting(30.0, _seconds, "seconds a blocking call (publish confirm, declare...) waits"),
    "blocked_timeout": Setting(10.0, _seconds, "seconds a publish waits while the broker blocks publishers"),
    "max_buffer": Setting(4 * 1024 * 1024, _positive_int, "bytes a connection buffers for writing before "
                                                          "publishers wait", shown_default="4 MiB"),
    "tls": Setting(False, parse_bool, "use TLS", shown_default="True for amqps://"),
    "ca_file": Setting(None, _existing_file, "CA bundle to verify the broker's certificate",
                       shown_default="system CAs"),
    "cert_file": Setting(None, _existing_file, "client certificate, for mutual TLS"),
    "key_file": Setting(None, _existing_file, "client private key, for mutual TLS"),
    "verify": Setting(True, parse_bool, "verify the broker's certificate and host name"),
}


# -- the values ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One broker address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSSettings:
    """TLS options; certificate and hostname verification are on by default."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        """Build the client SSLContext these settings describe."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


@dataclass(frozen=True)
class PoolSettings:
    """Everything one pool needs to open its connections. The password is never shown."""

    name: str
    size: int = POOL_SETTINGS["size"].default
    nodes: tuple[Node, ...] = (Node("localhost", 5672),)
    user: str = POOL_SETTINGS["user"].default
    password: str = field(default=POOL_SETTINGS["password"].default, repr=False)
    vhost: str = POOL_SETTINGS["vhost"].default
    heartbeat: float = POOL_SETTINGS["heartbeat"].default
    connect_timeout: float = POOL_SETTINGS["connect_timeout"].default
    operation_timeout: float = POOL_SETTINGS["operation_timeout"].default
    blocked_timeout: float = POOL_SETTINGS["blocked_timeout"].default
    max_buffer: int = POOL_SETTINGS["max_buffer"].default
    tls: TLSSettings | None = None
    #: "amqp" (a real broker) or "memory" (the in-process broker of flask_nucleon_amqp.memory, for tests).
    transport: str = "amqp"

    def safe_url(self, node: Node | None = None) -> str:
        """The broker URL with the password masked, for logs and status output."""
        node = node or self.nodes[0]
        if self.transport == "memory":
            return f"memory://{node.host}"
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{quote(self.user, safe='')}:***@{node}/{quote(self.vhost, safe='')}"


@dataclass(frozen=True)
class AppSettings:
    """Every ``AMQP_*`` key of one app, checked."""

    pools: dict[str, PoolSettings]
    shutdown_timeout: float
    #: AMQP_TOPOLOGY in its dict form (its declarations are built by ``topology.topology_from_config``).
    topology: Mapping[str, Any]
    declare_on_start: bool
    start_listeners: bool
    #: AMQP_RUNTIME: "auto", "gevent" or "thread" (see runtime.py).
    runtime: str


def _pool_settings(name: str, base: Mapping[str, Any], raw: Any, key: str) -> PoolSettings:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a dict of pool settings, got {type(raw).__name__}")
    for option in raw:
        if option not in POOL_SETTINGS:
            known = ", ".join(sorted(POOL_SETTINGS))
            raise ConfigError(f"{key}[{option!r}]", f"unknown pool setting (known: {known})")
    # A pool's own url replaces AMQP_URL as a whole; single keys override either.
    source: dict[str, Any] = dict(base)
    if "url" in raw:
        urls = raw["url"] if isinstance(raw["url"], (list, tuple)) else [raw["url"]]
        if not urls:
            raise ConfigError(f"{key}['url']", "must name at least one URL")
        parsed = [parse_url(f"{key}['url']", url) for url in urls]
        source = parsed[0]
        hosts = [(p.get("host", "localhost"), p.get("port")) for p in parsed]
    else:
        hosts = [(source.get("host", "localhost"), source.get("port"))]
    values = {k: v for k, v in source.items() if k not in ("host", "port")}
    if "host" in raw:
        host_list = raw["host"] if isinstance(raw["host"], (list, tuple)) else [raw["host"]]
        if not host_list:
            raise ConfigError(f"{key}['host']", "must name at least one host")
        url_port = hosts[0][1]  # a host given alone keeps the URL's port (AMQP_URL's or the pool's own url)
        hosts = [(_text(f"{key}['host']", h), url_port) for h in host_list]
    for option, value in raw.items():
        if option in ("url", "host"):
            continue
        values[option] = POOL_SETTINGS[option].parse(f"{key}[{option!r}]", value)
    tls_enabled = values.pop("tls", False)
    tls_keys = {k: values.pop(k) for k in ("ca_file", "cert_file", "key_file", "verify") if k in values}
    if tls_keys and not tls_enabled:
        raise ConfigError(f"{key}[{next(iter(tls_keys))!r}]", "TLS options need an amqps:// URL or tls=True")
    if "key_file" in tls_keys and "cert_file" not in tls_keys:
        raise ConfigError(f"{key}['key_file']", "needs cert_file too")
    default_port = 5671 if tls_enabled else 5672
    explicit_port = values.pop("port", None)
    nodes = tuple(Node(h, explicit_port or p or default_port) for h, p in hosts)
    return PoolSettings(name=name, nodes=nodes, tls=TLSSettings(**tls_keys) if tls_enabled else None, **values)


def read_settings(config: Mapping[str, Any]) -> AppSettings:
    """Check every ``AMQP_*`` key of a Flask config (absent keys take their defaults).

    :raises ConfigError: naming the first offending key.
    """
    for name in config:
        if name.startswith("AMQP_") and name not in APP_SETTINGS and name not in OUTBOX_SETTINGS:
            known = ", ".join(sorted([*APP_SETTINGS, *OUTBOX_SETTINGS]))
            raise ConfigError(name, f"unknown configuration key (known: {known})")
    values = {name: setting.parse(name, config.get(name, setting.default)) for name, setting in APP_SETTINGS.items()}
    merged = {"publish": {}, "listen": {}, **values["AMQP_POOLS"]}
    pools = {name: _pool_settings(_text("AMQP_POOLS", name), values["AMQP_URL"], raw, f"AMQP_POOLS[{name!r}]")
             for name, raw in merged.items()}
    return AppSettings(pools=pools, shutdown_timeout=values["AMQP_SHUTDOWN_TIMEOUT"],
                       topology=values["AMQP_TOPOLOGY"], declare_on_start=values["AMQP_DECLARE_ON_START"],
                       start_listeners=values["AMQP_START_LISTENERS"], runtime=values["AMQP_RUNTIME"])


def read_config(config: Mapping[str, Any]) -> dict[str, PoolSettings]:
    """Check the ``AMQP_*`` keys of a Flask config and return each pool's settings (see :func:`read_settings`).

    :raises ConfigError: naming the first offending key.
    """
    return read_settings(config).pools
