"""Config: every key, its defaults, and a clear error naming the key for each mistake."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_nucleon_amqp import AMQP, ConfigError
from flask_nucleon_amqp.config import APP_SETTINGS, POOL_SETTINGS, Node, PoolSettings, Setting, parse_url, read_config


def test_defaults_give_publish_and_listen_pools() -> None:
    pools = read_config({})
    assert set(pools) == {"publish", "listen"}
    publish = pools["publish"]
    assert publish.nodes == (Node("localhost", 5672),)
    assert (publish.user, publish.password, publish.vhost) == ("guest", "guest", "/")
    assert (publish.size, publish.heartbeat, publish.tls) == (1, 60.0, None)


def test_amqp_url_is_the_default_for_every_pool_and_pools_override_it() -> None:
    pools = read_config({
        "AMQP_URL": "amqp://app:pw@broker.example:5673/prod",
        "AMQP_POOLS": {"publish": {"size": 4}, "listen": {"vhost": "other", "user": "reader"},
                       "audit": {"url": "amqp://auditor:x@audit.example/%2Faudit"}},
    })
    assert pools["publish"].size == 4
    assert pools["publish"].nodes == (Node("broker.example", 5673),)
    assert (pools["publish"].user, pools["publish"].password, pools["publish"].vhost) == ("app", "pw", "prod")
    assert (pools["listen"].user, pools["listen"].vhost) == ("reader", "other")
    assert pools["audit"].nodes == (Node("audit.example", 5672),)
    assert (pools["audit"].user, pools["audit"].vhost) == ("auditor", "/audit")


@pytest.mark.parametrize(("url", "expected"), [
    ("amqp://h", {"host": "h", "tls": False}),
    ("amqp://h/", {"host": "h", "tls": False}),
    ("amqp://h/%2F", {"host": "h", "vhost": "/", "tls": False}),
    ("amqp://h/%2F%2F", {"host": "h", "vhost": "//", "tls": False}),
    ("amqp://u%40x:p%3Aw@h:1234/v", {"host": "h", "port": 1234, "user": "u@x", "password": "p:w", "vhost": "v",
                                      "tls": False}),
    ("amqps://[::1]", {"host": "::1", "tls": True}),
    ("amqp://h?heartbeat=5&connect_timeout=2", {"host": "h", "tls": False, "heartbeat": 5.0,
                                                "connect_timeout": 2.0}),
])
def test_url_forms(url: str, expected: dict[str, Any]) -> None:
    assert parse_url("AMQP_URL", url) == expected


def test_amqps_defaults_to_port_5671_and_verification() -> None:
    pool = read_config({"AMQP_URL": "amqps://broker.example/"})["publish"]
    assert pool.nodes == (Node("broker.example", 5671),)
    assert pool.tls is not None and pool.tls.verify is True


def test_several_nodes_for_a_cluster() -> None:
    pools = read_config({"AMQP_POOLS": {
        "publish": {"url": ["amqp://u:p@n1:5672/v", "amqp://u:p@n2:5673/v"]},
        "listen": {"host": ["n1", "n2", "n3"], "port": 5680},
    }})
    assert pools["publish"].nodes == (Node("n1", 5672), Node("n2", 5673))
    assert pools["listen"].nodes == (Node("n1", 5680), Node("n2", 5680), Node("n3", 5680))


@pytest.mark.parametrize(("config", "key"), [
    ({"AMQP_POOLS": {"publish": {"size": 0}}}, "AMQP_POOLS['publish']['size']"),
    ({"AMQP_POOLS": {"publish": {"size": "2"}}}, "AMQP_POOLS['publish']['size']"),
    ({"AMQP_POOLS": {"listen": {"port": "abc"}}}, "AMQP_POOLS['listen']['port']"),
    ({"AMQP_POOLS": {"listen": {"port": 70000}}}, "AMQP_POOLS['listen']['port']"),
    ({"AMQP_POOLS": {"publish": {"sise": 2}}}, "AMQP_POOLS['publish']['sise']"),
    ({"AMQP_POOLS": {"publish": {"heartbeat": -1}}}, "AMQP_POOLS['publish']['heartbeat']"),
    ({"AMQP_POOLS": {"publish": {"connect_timeout": 0}}}, "AMQP_POOLS['publish']['connect_timeout']"),
    ({"AMQP_POOLS": {"publish": "amqp://x"}}, "AMQP_POOLS['publish']"),
    ({"AMQP_POOLS": ["publish"]}, "AMQP_POOLS"),
    ({"AMQP_URL": "http://broker/"}, "AMQP_URL"),
    ({"AMQP_URL": "amqp://u:pw@broker:notaport/"}, "AMQP_URL"),
    ({"AMQP_URL": "amqp://broker/?frame_max=1"}, "AMQP_URL"),
    ({"AMQP_POOLS": {"publish": {"url": "amqp://[::1/"}}}, "AMQP_POOLS['publish']['url']"),
    ({"AMQP_POOLS": {"publish": {"url": []}}}, "AMQP_POOLS['publish']['url']"),
    ({"AMQP_POOLS": {"publish": {"url": "amqps://h", "ca_file": "/no/such/ca.pem"}}},
     "AMQP_POOLS['publish']['ca_file']"),
    ({"AMQP_POOLS": {"publish": {"url": "amqps://h", "verify": "yes"}}}, "AMQP_POOLS['publish']['verify']"),
    ({"AMQP_POOLS": {"publish": {"ca_file": __file__}}}, "AMQP_POOLS['publish']['ca_file']"),
    ({"AMQP_SHUTDOWN_TIMEOUT": "soon"}, "AMQP_SHUTDOWN_TIMEOUT"),
    ({"AMQP_PUBLISH_POOL_SIZE": 3}, "AMQP_PUBLISH_POOL_SIZE"),
    ({"AMQP_URL": "amqp:/bad"}, "AMQP_URL"),  # not vhost "bad" on localhost
    ({"AMQP_POOLS": {"listen": {"url": "amqps:broker"}}}, "AMQP_POOLS['listen']['url']"),
    ({"AMQP_POOLS": {"publish": {"heartbeat": 0.5}}}, "AMQP_POOLS['publish']['heartbeat']"),
    ({"AMQP_URL": "amqp://broker/?heartbeat=0.2"}, "AMQP_URL ?heartbeat"),
    ({"AMQP_DECLARE_ON_START": "yes"}, "AMQP_DECLARE_ON_START"),
    ({"AMQP_TOPOLOGY": ["q"]}, "AMQP_TOPOLOGY"),
])
def test_bad_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        read_config(config)
    assert info.value.key == key
    assert str(info.value).startswith(key)


def test_init_app_reports_bad_config_at_start_up() -> None:
    app = Flask(__name__)
    app.config["AMQP_POOLS"] = {"publish": {"size": -3}}
    with pytest.raises(ConfigError, match=r"AMQP_POOLS\['publish'\]\['size'\]"):
        AMQP(app)


def test_password_is_masked_in_errors_and_reprs() -> None:
    with pytest.raises(ConfigError) as info:
        read_config({"AMQP_URL": "amqp://user:Sup3rSecret@broker:xx/"})
    assert "Sup3rSecret" not in str(info.value)
    pool = read_config({"AMQP_URL": "amqp://user:Sup3rSecret@broker/"})["publish"]
    assert "Sup3rSecret" not in repr(pool) + pool.safe_url()
    assert pool.safe_url() == "amqp://user:***@broker:5672/%2F"


def test_tls_files_must_exist_and_are_kept(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a CA")
    pool = read_config({"AMQP_POOLS": {"publish": {"url": "amqps://h", "ca_file": str(ca), "verify": False}}})
    assert pool["publish"].tls is not None
    assert (pool["publish"].tls.ca_file, pool["publish"].tls.verify) == (str(ca), False)


def test_broker_down_does_not_stop_the_app_from_starting() -> None:
    app = Flask(__name__)
    app.config["AMQP_URL"] = "amqp://guest:guest@127.0.0.1:1/%2F"
    started = time.monotonic()
    AMQP(app)  # nothing connects here
    assert time.monotonic() - started < 0.5
    assert app.extensions["amqp"].get_amqp_pool().connections() == []


def test_a_pool_overriding_only_the_host_keeps_the_urls_port() -> None:
    pools = read_config({"AMQP_URL": "amqp://u:p@broker:5673/v", "AMQP_POOLS": {
        "publish": {"host": "other"}, "listen": {"host": ["n1", "n2"]},
        "tls": {"url": "amqps://secure:5999/", "host": "secure2"}, "plain": {"host": "h", "port": 5680}}})
    assert pools["publish"].nodes == (Node("other", 5673),)
    assert pools["listen"].nodes == (Node("n1", 5673), Node("n2", 5673))
    assert pools["tls"].nodes == (Node("secure2", 5999),)
    assert pools["plain"].nodes == (Node("h", 5680),)
    assert read_config({"AMQP_URL": "amqps://broker/", "AMQP_POOLS": {"publish": {"host": "x"}}})[
        "publish"].nodes == (Node("x", 5671),)


def test_heartbeats_are_whole_seconds() -> None:
    """The broker is told whole seconds; the client's dead-peer check uses the same value."""
    pools = read_config({"AMQP_POOLS": {"publish": {"heartbeat": 1.6}, "listen": {"heartbeat": 0}}})
    assert (pools["publish"].heartbeat, pools["listen"].heartbeat) == (2.0, 0.0)
    assert read_config({"AMQP_URL": "amqp://h/?heartbeat=1"})["publish"].heartbeat == 1.0


def test_one_table_holds_every_key_with_its_default_parser_and_doc() -> None:
    for name, setting in [*APP_SETTINGS.items(), *POOL_SETTINGS.items()]:
        assert isinstance(setting, Setting) and callable(setting.parse), name
        assert setting.doc and "\n" not in setting.doc, f"{name}: a one-line doc"
    defaults = read_config({})["publish"]
    for field in ("size", "user", "password", "vhost", "heartbeat", "connect_timeout", "operation_timeout",
                  "blocked_timeout", "max_buffer"):
        assert getattr(defaults, field) == POOL_SETTINGS[field].default == getattr(PoolSettings("x"), field)
    app = Flask(__name__)
    AMQP(app)
    assert {key: app.config[key] for key in APP_SETTINGS} == {k: s.default for k, s in APP_SETTINGS.items()}
    app.extensions["amqp"].close()


def _example_comment_above(lines: list[str], index: int) -> str:
    """The comment lines right above line ``index``, joined, without their ``#:`` / ``#`` markers."""
    found: list[str] = []
    while index > 0 and lines[index - 1].strip().startswith("#"):
        index -= 1
        found.insert(0, lines[index].strip().lstrip("#:").strip())
    return " ".join(found)


def test_app_cfg_example_agrees_with_the_config_table() -> None:
    """Every key is in app.cfg.example, with its default (app keys) and its doc as the comment above it."""
    path = Path(__file__).parent.parent / "app.cfg.example"
    lines = path.read_text().splitlines()
    values: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), {}, values)  # our own example file
    assert set(values) == set(APP_SETTINGS), "app.cfg.example sets exactly the AMQP_* keys"
    index: int | None
    for key, setting in APP_SETTINGS.items():
        assert values[key] == setting.default, f"app.cfg.example: {key} is not its default"
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        assert _example_comment_above(lines, index).startswith(setting.doc), f"app.cfg.example: {key}'s comment"
    for key, setting in POOL_SETTINGS.items():
        index = next((i for i, line in enumerate(lines) if re.match(rf'\s*#\s+"{key}": ', line)), None)
        assert index is not None, f"app.cfg.example does not show the pool key {key!r}"
        assert re.sub(r"^[#\s]+", "", lines[index - 1]) == f"{setting.doc} (default {setting.default_text})", \
            f"app.cfg.example: the comment above pool key {key!r}"
