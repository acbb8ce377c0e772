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

__all__ = ["Node", "TLSSettings", "PoolSettings", "read_config", "DEFAULT_URL", "POOL_KEYS", "APP_KEYS"]

#: The broker every pool uses unless it says otherwise.
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"


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
    size: int = 1
    nodes: tuple[Node, ...] = (Node("localhost", 5672),)
    user: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    heartbeat: float = 60.0
    connect_timeout: float = 10.0
    operation_timeout: float = 30.0
    blocked_timeout: float = 10.0
    max_buffer: int = 4 * 1024 * 1024
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


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be True or False, got {value!r}")
    return value


def _existing_file(key: str, value: Any) -> str:
    path = _text(key, value)
    if not os.path.isfile(path):
        raise ConfigError(key, f"file not found: {path}")
    return path


#: Keys of one pool's dict in AMQP_POOLS: parser and one-line doc. ``url``,
#: ``host`` and TLS keys are handled specially below.
POOL_KEYS: dict[str, tuple[Callable[[str, Any], Any], str]] = {
    "size": (_positive_int, "number of connections the pool shares between greenlets (default 1)"),
    "url": (_text, "amqp:// or amqps:// URL, or a list of them (cluster nodes); overrides AMQP_URL"),
    "host": (_text, "broker host name, or a list of them (cluster nodes)"),
    "port": (_port, "broker port (default 5672, 5671 for amqps)"),
    "user": (_text, "user name (default guest)"),
    "password": (_text, "password (default guest); never logged"),
    "vhost": (_text, "virtual host, not URL-encoded (default /)"),
    "heartbeat": (lambda k, v: _seconds(k, v, allow_zero=True),
                  "seconds between heartbeats; a peer silent for 2 intervals is dead; 0 turns them off (default 60)"),
    "connect_timeout": (_seconds, "seconds to open a connection before giving up (default 10)"),
    "operation_timeout": (_seconds, "seconds a blocking call (publish confirm, declare...) waits (default 30)"),
    "blocked_timeout": (_seconds, "seconds a publish waits while the broker blocks publishers (default 10)"),
    "max_buffer": (_positive_int, "bytes a connection buffers for writing before publishers wait (default 4 MiB)"),
    "tls": (_bool, "use TLS (implied by an amqps:// URL)"),
    "ca_file": (_existing_file, "CA bundle to verify the broker's certificate (default: system CAs)"),
    "cert_file": (_existing_file, "client certificate, for mutual TLS"),
    "key_file": (_existing_file, "client private key, for mutual TLS"),
    "verify": (_bool, "verify the broker's certificate and host name (default True)"),
}

#: Application-level keys, with their defaults.
APP_KEYS: dict[str, Any] = {
    "AMQP_URL": DEFAULT_URL,
    "AMQP_POOLS": {"publish": {}, "listen": {}},
    "AMQP_SHUTDOWN_TIMEOUT": 10.0,
}


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
    if parts.scheme not in ("amqp", "amqps"):
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
        out[name] = POOL_KEYS[name][0](f"{key} ?{name}", value)
    return out


def _mask(url: str) -> str:
    """Hide the password of a URL that could not be parsed further."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, tail = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}"


def _pool_settings(name: str, base: Mapping[str, Any], raw: Any, key: str) -> PoolSettings:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a dict of pool settings, got {type(raw).__name__}")
    for option in raw:
        if option not in POOL_KEYS:
            known = ", ".join(sorted(POOL_KEYS))
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
        hosts = [(_text(f"{key}['host']", h), None) for h in host_list]
    for option, value in raw.items():
        if option in ("url", "host"):
            continue
        values[option] = POOL_KEYS[option][0](f"{key}[{option!r}]", value)
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


def read_config(config: Mapping[str, Any]) -> dict[str, PoolSettings]:
    """Check the ``AMQP_*`` keys of a Flask config and return each pool's settings.

    :raises ConfigError: naming the first offending key.
    """
    for name in config:
        if name.startswith("AMQP_") and name not in APP_KEYS and name not in EXTRA_APP_KEYS:
            known = ", ".join(sorted([*APP_KEYS, *EXTRA_APP_KEYS]))
            raise ConfigError(name, f"unknown configuration key (known: {known})")
    base = parse_url("AMQP_URL", config.get("AMQP_URL", DEFAULT_URL))
    pools = config.get("AMQP_POOLS", APP_KEYS["AMQP_POOLS"])
    if not isinstance(pools, Mapping):
        raise ConfigError("AMQP_POOLS", f"must be a dict from pool name to settings, got {type(pools).__name__}")
    merged = {"publish": {}, "listen": {}, **pools}
    _seconds("AMQP_SHUTDOWN_TIMEOUT", config.get("AMQP_SHUTDOWN_TIMEOUT", 10.0), allow_zero=True)
    return {
        name: _pool_settings(_text("AMQP_POOLS", name), base, raw, f"AMQP_POOLS[{name!r}]")
        for name, raw in merged.items()
    }


#: Keys read by other modules (topology, listeners); registered here so that
#: the unknown-key check accepts them.
EXTRA_APP_KEYS: dict[str, Any] = {
    #: Exchanges, queues and bindings to declare (dict form: see topology.topology_from_config).
    "AMQP_TOPOLOGY": {},
    #: Declare the topology when a process initialises and after every reconnect.
    "AMQP_DECLARE_ON_START": True,
    #: Start listeners when a web process initialises; False leaves them to `flask amqp listen`.
    "AMQP_START_LISTENERS": True,
    #: Where connections, listeners and callbacks run: "auto", "gevent" (the main thread's gevent hub) or
    #: "thread" (a hub thread of the extension's own); see the Servers section of the docs.
    "AMQP_RUNTIME": "auto",
}
