"""The pytest plugin (flask_nucleon_amqp.testing), used from a small app's test suite through pytester.

The inner suite runs in-process (so the outer test can look into the memory
broker afterwards), with pytest-flask loaded as users have it, against the
real broker and against the memory transport.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

import pytest
from flask import Flask

from flask_nucleon_amqp import AMQP, AMQPState, NotFound, memory
from flask_nucleon_amqp.testing import AMQPNames, record_messages, wait_for_messages

from conftest import BROKER_URL, make_app

pytest_plugins = ["pytester"]

#: Installed packages register the plugin themselves; a source checkout needs -p.
_AUTOLOADED = any(ep.value == "flask_nucleon_amqp.testing" for ep in entry_points(group="pytest11"))
PLUGIN_ARGS = [] if _AUTOLOADED else ["-p", "flask_nucleon_amqp.testing"]
#: importlib mode: the inner conftest must not collide with this suite's own `conftest` module. This
#: process imported the plugin before the inner run registers it, hence the (harmless) rewrite warning.
RUN_ARGS = [*PLUGIN_ARGS, "--import-mode=importlib", "-p", "no:cacheprovider",
            "-W", "ignore::pytest.PytestAssertRewriteWarning"]

APP_CONFTEST = '''
import pytest
from flask import Flask, current_app, request

from flask_nucleon_amqp import AMQP

URL = {url!r}


def create_app():
    app = Flask("orders")
    app.config.update(TESTING=True, AMQP_URL=URL, AMQP_POOLS={{"publish": {{"size": 1}}, "listen": {{"size": 1}}}})
    AMQP(app)

    @app.post("/orders")
    def create_order():
        current_app.amqp.publish(current_app.config["ORDERS"], "order.created", json=request.get_json(),
                                 headers={{"source": "web"}})
        return {{"ok": True}}, 201

    return app


def remember(names):
    """Tell the outer test what to check for deletion."""
    with open("declared.txt", "a") as out:
        for kind, values in (("queue", names.queues), ("exchange", names.exchanges)):
            for value in values:
                out.write(f"{{kind}} {{value}}\\n")


@pytest.fixture
def app(amqp_names):
    app = create_app()
    app.config["ORDERS"] = amqp_names.exchange("orders")
    app.amqp.exchange_declare(app.config["ORDERS"], "topic")
    yield app
    app.extensions["amqp"].close(timeout=5)  # amqp_names then deletes through a connection of its own
'''

APP_TESTS = '''
import pytest
from flask import Flask

from flask_nucleon_amqp import AMQP

from conftest import URL, remember


def test_post_publishes_an_order(app, client, amqp_names, amqp_recorder, wait_for_messages):
    queue = amqp_names.queue("orders")
    app.amqp.queue_declare(queue)
    app.amqp.queue_bind(queue, app.config["ORDERS"], "order.*")
    remember(amqp_names)
    other = Flask("other")
    other.config.update(AMQP_URL=URL)
    AMQP(other)
    with amqp_recorder() as published:
        assert client.post("/orders", json={{"id": 7}}).status_code == 201
        other.amqp.publish("", queue, b"another app: not recorded")
    other.amqp.close(timeout=5)
    assert [(m.exchange, m.routing_key, m.body_size) for m in published] == [
        (app.config["ORDERS"], "order.created", 8)]
    [message] = wait_for_messages(queue, 1, timeout=5)
    assert message.json() == {{"id": 7}} and message.headers == {{"source": "web"}}
    [extra] = wait_for_messages(queue)
    assert extra.body == b"another app: not recorded"


def test_wait_for_messages_waits_and_times_out(app, amqp_names, wait_for_messages):
    queue = amqp_names.queue()
    app.amqp.queue_declare(queue)
    remember(amqp_names)
    app.amqp.publish("", queue, b"one")
    with pytest.raises(AssertionError, match="expected 2 message.*got 1"):
        wait_for_messages(queue, 2, timeout=0.2)
    import gevent

    gevent.spawn_later(0.1, app.amqp.publish, "", queue, b"two")
    first, second = wait_for_messages(queue, 2, timeout=5)
    assert (first.body, first.redelivered, second.body) == (b"one", True, b"two")
    assert app.amqp.connection().queue_declare(queue, passive=True)["message_count"] == 0


def test_names_are_unique(amqp_names, app):
    assert amqp_names.queue("a") != amqp_names.queue("a")
    assert amqp_names.run in amqp_names.exchange()
    remember(amqp_names)


def test_memory_url_fixture(amqp_memory_url):
    assert amqp_memory_url.startswith("memory://test-")
'''


def _cleanup_checker(url: str) -> Any:
    """How the outer test sees whether a queue or exchange still exists."""
    app = make_app(AMQP_URL=url, AMQP_POOLS={"publish": {"size": 1}})
    AMQP(app)
    return app


@pytest.fixture(params=["rabbitmq", "memory"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"pytester-{uuid.uuid4().hex[:10]}"
    yield BROKER_URL if request.param == "rabbitmq" else f"memory://{name}"
    memory.reset(name)


def test_plugin_fixtures_in_an_app_suite(pytester: pytest.Pytester, url: str) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makeconftest(APP_CONFTEST.format(url=url))
    pytester.makepyfile(test_orders=APP_TESTS.format())
    result = pytester.runpytest_inprocess(*RUN_ARGS)
    result.assert_outcomes(passed=4)
    declared = [line.split() for line in (pytester.path / "declared.txt").read_text().splitlines()]
    assert {kind for kind, _ in declared} == {"queue", "exchange"} and len(declared) >= 6
    checker = _cleanup_checker(url)
    try:
        conn = checker.extensions["amqp"].connection()
        for kind, name in declared:  # everything the tests named is gone
            with pytest.raises(NotFound):
                if kind == "queue":
                    conn.queue_declare(name, passive=True)
                else:
                    conn.publish(name, "", b"probe")
    finally:
        checker.extensions["amqp"].close(timeout=5)


def test_fixtures_are_listed_and_leave_project_names_alone(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess(*RUN_ARGS, "--fixtures")
    section = result.stdout.str().split("fixtures defined from flask_nucleon_amqp.testing", 1)[1]
    section = section.split("fixtures defined from", 1)[0]
    defined = {line.split(" -- ")[0] for line in section.splitlines() if " -- " in line and not line[0].isspace()}
    # Exactly these: never `app`, `amqp`, `conn` or `names`, which apps (and this project) define themselves.
    assert defined == {"amqp_names", "amqp_recorder", "wait_for_messages", "amqp_memory_url"}


def test_names_without_an_app_warn_instead_of_leaking_silently(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n    default::pytest.PytestWarning\n")
    pytester.makepyfile(test_lonely="def test_x(amqp_names):\n    amqp_names.queue()\n")
    result = pytester.runpytest_inprocess(*RUN_ARGS)
    result.assert_outcomes(passed=1, warnings=1)
    assert "amqp_names.use(app)" in result.stdout.str()


def test_names_use_an_app_created_in_the_test(pytester: pytest.Pytester, url: str) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(test_own_app=textwrap.dedent(f"""
        from flask import Flask
        from flask_nucleon_amqp import AMQP

        def test_x(amqp_names):
            app = Flask("mine")
            app.config["AMQP_URL"] = {url!r}
            AMQP(app)
            queue = amqp_names.use(app).queue()
            app.amqp.queue_declare(queue)
            with open("declared.txt", "w") as out:
                out.write(queue)
    """))
    result = pytester.runpytest_inprocess(*RUN_ARGS)
    result.assert_outcomes(passed=1)
    checker = _cleanup_checker(url)
    try:
        with pytest.raises(NotFound):
            checker.extensions["amqp"].queue_declare((pytester.path / "declared.txt").read_text(), passive=True)
    finally:
        checker.extensions["amqp"].close(timeout=5)


# -- the helpers without pytest's fixtures -------------------------------------------------------------

@pytest.fixture
def state(url: str) -> Iterator[AMQPState]:
    app: Flask = make_app(AMQP_URL=url)
    AMQP(app)
    yield app.extensions["amqp"]
    app.extensions["amqp"].close(timeout=5)


def test_record_messages_and_wait_for_messages(state: AMQPState) -> None:
    names = AMQPNames(prefix="helpers")
    queue = names.queue()
    try:
        state.queue_declare(queue)
        with record_messages() as everything:
            state.publish("", queue, b"12345", headers={"h": 1}, content_type="text/plain")
            state.publish("", queue, json={"a": 1})
        assert [(m.exchange, m.routing_key, m.body_size) for m in everything] == [
            ("", queue, 5), ("", queue, 7)]
        assert everything[0].body == b"12345" and everything[0].headers == {"h": 1}
        assert everything[0].properties["content_type"] == "text/plain"
        assert everything[1].json() == {"a": 1} and everything[1].properties["content_type"] == "application/json"
        assert all(m.connection is state.connection() or m.connection in state.get_amqp_pool().connections()
                   for m in everything)
        first, second = wait_for_messages(queue, 2, connection=state.connection("listen"), ack=False)
        assert first.body == b"12345" and second.json() == {"a": 1} and not first.settled
        first.ack()
        second.reject(requeue=True)
        [again] = wait_for_messages(queue, connection=state.connection("listen"))
        assert again.redelivered and again.settled
        with pytest.raises(ValueError, match="count"):
            wait_for_messages(queue, 0, connection=state.connection("listen"))
    finally:
        assert names.cleanup(state.connection()) == []


def test_memory_url_with_names_leaves_nothing_behind(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makeconftest(textwrap.dedent("""
        import pytest
        from flask import Flask
        from flask_nucleon_amqp import AMQP

        @pytest.fixture
        def app(amqp_names, amqp_memory_url):
            app = Flask("unit")
            app.config.update(AMQP_URL=amqp_memory_url, QUEUE=amqp_names.queue("jobs"))
            AMQP(app)
            yield app
            app.amqp.close()
    """))
    pytester.makepyfile(test_unit=textwrap.dedent("""
        def test_job_is_queued(app, wait_for_messages):
            app.amqp.queue_declare(app.config["QUEUE"])
            app.amqp.publish("", app.config["QUEUE"], json={"job": 1})
            assert wait_for_messages(app.config["QUEUE"])[0].json() == {"job": 1}
            with open("url.txt", "w") as out:
                out.write(app.config["AMQP_URL"])
    """))
    result = pytester.runpytest_inprocess(*RUN_ARGS)
    result.assert_outcomes(passed=1)
    name = (pytester.path / "url.txt").read_text().removeprefix("memory://")
    assert memory.find(name) is None  # reset by amqp_memory_url, and not brought back by amqp_names


WITHOUT_PYTEST = '''
import sys

sys.modules["pytest"] = None  # `import pytest` now raises ImportError, as where pytest is not installed
sys.modules["_pytest"] = None
try:
    import pytest  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("pytest is still importable")

from flask import Flask

from flask_nucleon_amqp import AMQP
from flask_nucleon_amqp.testing import AMQPNames, record_messages, wait_for_messages

app = Flask("without_pytest")
app.config.update(AMQP_URL=sys.argv[1], AMQP_POOLS={"publish": {"size": 1}, "listen": {"size": 1}})
AMQP(app)
names = AMQPNames().use(app)
queue = names.queue("no-pytest")
app.amqp.queue_declare(queue)
with record_messages(app) as published:
    app.amqp.publish("", queue, b"hello")
[message] = wait_for_messages(queue, 1, timeout=5, connection=app.amqp.connection("listen"))
print(len(published), published[0].routing_key == queue, message.body.decode())
names.cleanup(app.amqp.connection())
app.amqp.close(timeout=5)
print("pytest" in sys.modules and sys.modules["pytest"] is not None)
'''


def test_helpers_import_and_work_without_pytest(tmp_path: Any) -> None:
    """README: the helpers work without pytest; only the fixtures need it."""
    script = tmp_path / "without_pytest.py"
    script.write_text(WITHOUT_PYTEST)
    result = subprocess.run([sys.executable, str(script), BROKER_URL], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1 True hello", "False"]
