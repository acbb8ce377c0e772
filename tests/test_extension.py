"""The Flask wiring: AMQP(app), init_app, current_app.amqp, app.extensions["amqp"]."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, current_app
from flask.testing import FlaskClient

from flask_nucleon_amqp import AMQP, AMQPState, current_amqp

from conftest import Names, make_app


def test_amqp_app_registers_extension_and_attribute() -> None:
    app = make_app()
    amqp = AMQP(app)
    assert isinstance(app.extensions["amqp"], AMQPState)
    assert app.amqp is app.extensions["amqp"]  # type: ignore[attr-defined]
    with app.app_context():
        assert current_app.amqp is app.extensions["amqp"]  # type: ignore[attr-defined]  # Nucleon's name for the state
        assert amqp.get_amqp_pool() is current_app.amqp.get_amqp_pool(type="publish")  # type: ignore[attr-defined]  # Nucleon's name for the state
    assert set(app.extensions["amqp"].pools) == {"publish", "listen"}


def test_application_factory_pattern(names: Names) -> None:
    amqp = AMQP()

    def create_app() -> Flask:
        app = make_app()
        amqp.init_app(app)
        return app

    first, second = create_app(), create_app()
    assert first.extensions["amqp"] is not second.extensions["amqp"]
    queue = names.queue()
    with second.app_context():
        amqp.state.queue_declare(queue)  # the current app's pools
        amqp.state.publish("", queue, b"x")
        assert current_app.amqp.get_amqp_pool().connections()[0].is_open  # type: ignore[attr-defined]  # Nucleon's name for the state
    assert first.extensions["amqp"].get_amqp_pool().connections() == []
    with pytest.raises(RuntimeError, match="application context"):
        amqp.get_amqp_pool()  # two apps and no context: which one?
    for app in (first, second):
        app.extensions["amqp"].close()


def test_current_amqp_is_the_typed_accessor_and_the_extension_forwards_nothing() -> None:
    app = make_app()
    amqp = AMQP(app)
    with app.app_context():
        assert current_amqp() is app.extensions["amqp"] is amqp.state
        assert current_amqp().get_amqp_pool(type="listen") is current_amqp().pool("listen")
    with pytest.raises(RuntimeError, match="application context"):
        current_amqp()
    with Flask("no_amqp").app_context(), pytest.raises(RuntimeError, match="AMQP\\(app\\)"):
        current_amqp()
    # The shortcuts are AMQPState's (typed); the extension object does not forward unknown names to it.
    assert not hasattr(amqp, "publish") and not hasattr(amqp, "queue_declare")
    assert AMQPState.basic_publish is AMQPState.publish
    app.extensions["amqp"].close()


def test_second_init_app_on_the_same_app_is_refused() -> None:
    app = make_app()
    amqp = AMQP(app)
    with pytest.raises(RuntimeError, match="already"):
        amqp.init_app(app)


def test_unknown_pool_type_names_the_configured_ones(app: Flask) -> None:
    with pytest.raises(KeyError, match="configured pools"):
        app.extensions["amqp"].get_amqp_pool(type="nope")


def test_extra_pools_and_config_defaults(names: Names) -> None:
    app = make_app(AMQP_POOLS={"reports": {"size": 2}})
    AMQP(app)
    state = app.extensions["amqp"]
    assert set(state.pools) == {"publish", "listen", "reports"}
    assert app.config["AMQP_SHUTDOWN_TIMEOUT"] == 10.0
    queue = names.queue()
    state.get_amqp_pool("reports").connection().queue_declare(queue)
    stats = state.stats()
    assert stats["reports"]["open"] == 1 and stats["publish"]["open"] == 0
    state.close()


def test_request_handlers_use_current_app_amqp(app: Flask, client: FlaskClient, names: Names) -> None:
    queue = names.queue()
    app.extensions["amqp"].queue_declare(queue)

    @app.post("/send/<text>")
    def send(text: str) -> dict[str, Any]:
        current_app.amqp.publish("", queue, text)  # type: ignore[attr-defined]  # Nucleon's name for the state
        return {"sent": text}

    @app.get("/receive")
    def receive() -> dict[str, Any]:
        message = current_app.amqp.consume(queue, timeout=5)  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.ack(message)  # type: ignore[attr-defined]  # Nucleon's name for the state
        return {"body": message.text}

    assert client.post("/send/hello").json == {"sent": "hello"}
    assert client.get("/receive").json == {"body": "hello"}


def test_close_is_idempotent_and_never_raises(app: Flask) -> None:
    state = app.extensions["amqp"]
    state.queue_declare("", exclusive=True)
    state.close()
    state.close()
    assert state.closed


def test_health_report_for_a_healthz_route(app: Flask, client: FlaskClient) -> None:
    from conftest import wait_until

    @app.get("/healthz")
    def healthz() -> tuple[dict[str, Any], int]:
        report = current_app.amqp.health()  # type: ignore[attr-defined]  # Nucleon's name for the state
        return report, 200 if report["ok"] else 503

    assert wait_until(lambda: client.get("/healthz").status_code == 200, timeout=10)
    report = client.get("/healthz").json
    assert report is not None
    assert set(report["pools"]) == {"publish", "listen"} and report["ok"] is True
    assert all(pool["ok"] and pool["server"].startswith("RabbitMQ") for pool in report["pools"].values())
