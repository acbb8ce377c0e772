"""The example app's chat page in a real headless browser (Debian's chromium, driven by selenium).

gunicorn serves example_app with its gevent workers, as ``make run`` does; two browser sessions
chat, each sees the other's messages arrive live (Server-Sent Events from the user's inbox queue),
and the page shows the room's health. ``make browser`` installs chromium and chromium-driver.
Set NUCLEON_CHAT_SCREENSHOT=docs/_static/chat.png to keep the screenshot.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from flask_nucleon_amqp import AMQPState

from conftest import BROKER_URL, Names, wait_until

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "example_app"
#: The flags that work on this kind of machine (no GPU, no sandbox, no network besides localhost).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,860"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


@contextmanager
def _gunicorn(env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """gunicorn -c example_app/gunicorn.conf.py wsgi:app on a free port, as `make run`; stopped by its pid."""
    port = _free_port()
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"),
                                   "-b", f"127.0.0.1:{port}", "--control-socket", str(log.with_suffix(".ctl")),
                                   "wsgi:app"], cwd=EXAMPLE, env=env, stdout=out, stderr=out)
    try:
        yield server, port
    except BaseException:
        print(f"gunicorn's log ({'running' if server.poll() is None else f'exited {server.returncode}'}):\n"
              f"{log.read_text(errors='replace')[-6000:]}")  # shown with the failure
        raise
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=40)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _browser(profile: Path) -> webdriver.Chrome:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("chromium and chromedriver are not installed: run `make browser` (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    profile.mkdir()
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _until(browser: webdriver.Chrome, condition: Callable[[], Any], what: str, timeout: float = 20) -> None:
    WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda _: condition(), message=what)


def _messages(browser: webdriver.Chrome) -> list[str]:
    """Each message shown, as "<who> <text>" (without its time); read in one go, as the page changes."""
    return list(browser.execute_script(
        "return [...document.querySelectorAll('#messages li')].map("
        "li => li.querySelector('.who').textContent + ' ' + li.querySelector('.text').textContent)"))


def _send(browser: webdriver.Chrome, to: str, text: str) -> None:
    Select(browser.find_element(By.ID, "to")).select_by_value(to)
    browser.find_element(By.ID, "text").send_keys(text)
    browser.find_element(By.ID, "send-button").click()


def _table(browser: webdriver.Chrome, table: str) -> list[list[str]]:
    """The rows of a health table, read in one go (the page rebuilds them every 2 s)."""
    return list(browser.execute_script(
        f"return [...document.querySelectorAll('#{table} tbody tr')]"
        ".map(row => [...row.cells].map(cell => cell.textContent))"))


def _consumers(state: AMQPState, queue: str) -> int:
    return int(state.queue_declare(queue, passive=True)["consumer_count"])


def test_two_browsers_chat_live(names: Names, app: Flask, tmp_path: Path) -> None:
    state: AMQPState = app.extensions["amqp"]
    prefix, room, dead, dead_queue = f"test-page-{names.run}", names.exchange("room"), names.exchange("dead"), \
        names.queue("dead")
    users = ["alice", "bob"]
    inboxes = {user: f"{prefix}.inbox.{user}" for user in users}
    for user in users:
        names.queues += [f"{prefix}.listener.{user}", inboxes[user]]
    settings = tmp_path / "chat.cfg"
    settings.write_text(
        f"AMQP_URL = {BROKER_URL!r}\nCHAT_ROOM = {room!r}\nCHAT_USERS = {users!r}\nCHAT_PREFIX = {prefix!r}\n"
        f"CHAT_DEAD_LETTER_EXCHANGE = {dead!r}\nCHAT_STREAM_KEEPALIVE = 0.5\n"
        f"AMQP_TOPOLOGY = {{'exchanges': {{{dead!r}: {{'type': 'fanout'}}}}, 'queues': {{{dead_queue!r}: {{}}}},"
        f" 'bindings': [{{'exchange': {dead!r}, 'queue': {dead_queue!r}}}]}}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHAT_SETTINGS": str(settings)}
    log = tmp_path / "gunicorn.log"
    with _gunicorn(env, log) as (server, port):
        assert wait_until(lambda: _status(port, "/healthz") == 200, timeout=30, interval=0.2), log.read_text()
        browsers = {}
        try:
            for user in users:
                browsers[user] = _browser(tmp_path / f"profile-{user}")
                browsers[user].get(f"http://127.0.0.1:{port}/?user={user}")
            alice, bob = browsers["alice"], browsers["bob"]
            for user, browser in browsers.items():
                _until(browser, lambda b=browser, u=user: b.find_element(By.ID, "stream-status").text  # type: ignore
                       == f"live: {u}'s inbox", f"{user}'s page never went live")
            # Each open page is one consumer (one greenlet in a gevent worker) on its user's inbox.
            assert wait_until(lambda: all(_consumers(state, queue) == 1 for queue in inboxes.values()), timeout=10)

            _send(alice, "bob", "Hello Bob, from Alice")
            _until(bob, lambda: _messages(bob) == ["alice Hello Bob, from Alice"], "bob never got alice's message")
            assert _messages(alice) == ["you → bob Hello Bob, from Alice"]
            _send(bob, "all", "Hi everyone!")
            _until(alice, lambda: _messages(alice)[1:] == ["bob → everyone Hi everyone!"],
                   "alice never got bob's message to all")
            _until(bob, lambda: _messages(bob)[1:] == ["you → everyone Hi everyone!"],
                   "bob's message to all never came back to him")
            _send(alice, "bob", "Nice: it streams.")
            _until(bob, lambda: _messages(bob)[2:] == ["alice Nice: it streams."], "bob missed the third message")

            # The room's health, as the page shows it.
            _until(alice, lambda: [row[:2] for row in _table(alice, "pools")] == [["listen", "up"], ["publish", "up"]],
                   f"the pools are not shown up: {_table(alice, 'pools')}")
            _until(alice, lambda: sorted(row[:2] for row in _table(alice, "listeners")) == sorted(
                [f"{prefix}.listener.{user}", "consuming"] for user in users), "the listeners are not shown")
            assert alice.find_element(By.ID, "health-ok").text == "ok"
            assert alice.find_element(By.ID, "send-error").is_displayed() is False
            screenshot = tmp_path / "chat.png"
            assert alice.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
            if os.environ.get("NUCLEON_CHAT_SCREENSHOT"):
                shutil.copyfile(screenshot, os.environ["NUCLEON_CHAT_SCREENSHOT"])
        finally:
            for browser in browsers.values():
                browser.quit()
        # A closed page cancels its consumer (noticed at the next keep-alive), leaving nothing behind.
        assert wait_until(lambda: all(_consumers(state, queue) == 0 for queue in inboxes.values()), timeout=10)
        assert all(state.queue_declare(queue, passive=True)["message_count"] == 0 for queue in inboxes.values())
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    text = log.read_text()
    assert "Traceback" not in text and "guest:guest" not in text
