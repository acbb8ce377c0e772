"""README.md runs as written: every fenced block is taken from the file and checked here.

The Quick start is saved to a temporary directory and served for real, with each server command of
the README, against the real broker; the README's curl lines are run against it and must print what
the README says they print. Blocks that install or serve forever are checked against what they name:
`pip install` extras against the package's metadata, `make` targets against `make help`, the example
app's URLs against its routes. A block that no test claims fails the suite, so a new one needs a check.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flask_nucleon_amqp.cli import amqp_cli

from conftest import BROKER_URL

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent
#: The URL the Quick start names; the test broker may be elsewhere (AMQP_TEST_HOST).
QUICKSTART_URL = "amqp://guest:guest@localhost:5672/%2F"


def blocks(language: str) -> list[str]:
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", README, re.M | re.S) if lang == language]


def block_with(language: str, needle: str) -> str:
    [block] = [body for body in blocks(language) if needle in body]
    return block


def commands(block: str) -> list[str]:
    """The block's command lines, without their comments."""
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


QUICKSTART = block_with("python", "quickstart.room")
SERVE = block_with("sh", "quickstart:app")
TALK = block_with("sh", "localhost:5000/send")
INSTALL = block_with("sh", "pip install")
EXAMPLE = block_with("sh", "localhost:8000/messages")
CONTRIBUTING = block_with("sh", "make bench")


def test_every_block_is_checked() -> None:
    fences = re.findall(r"^```(\w*)$", README, re.M)
    assert fences.count("") == len(fences) // 2, "every block says its language (python or sh)"
    assert sorted(blocks("python")) == sorted([QUICKSTART])
    assert sorted(blocks("sh")) == sorted([SERVE, TALK, INSTALL, EXAMPLE, CONTRIBUTING])


# -- Quick start -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def quickstart_dir(tmp_path: Path) -> Iterator[Path]:
    """quickstart.py as the README writes it, with names of this run's own (the broker is shared)."""
    suffix = uuid.uuid4().hex[:8]
    assert QUICKSTART.count(QUICKSTART_URL) == 1
    source = QUICKSTART.replace("quickstart.", f"quickstart-{suffix}.").replace(QUICKSTART_URL, BROKER_URL)
    (tmp_path / "quickstart.py").write_text(source, encoding="utf-8")
    yield tmp_path
    # The README's own clean-up line; the queue must be gone afterwards.
    [teardown] = re.findall(r"`(flask --app quickstart amqp teardown)`", README)
    result = _run(f"{teardown} --yes", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"quickstart-{suffix}.inbox" in result.stdout


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(shlex.split(command), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60)


def _serve(command: str, port: int, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start the README's server command on ``port`` (the only change to it) and wait until it listens."""
    argv = shlex.split(command)
    argv += ["--port", str(port)] if argv[0] == "flask" else ["--bind", f"127.0.0.1:{port}", "--workers", "1"]
    with log.open("wb") as output:
        server = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, f"{command} exited:\n{log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.terminate()
    raise AssertionError(f"{command} did not listen on {port} within 30 s:\n{log.read_text()}")


@pytest.mark.parametrize("server", commands(SERVE), ids=lambda command: command.split()[0])
def test_quickstart_serves_what_the_readme_shows(server: str, quickstart_dir: Path) -> None:
    port = _free_port()
    default_port = "5000"
    log = quickstart_dir / "server.log"
    process = _serve(server, port, quickstart_dir, log)
    try:
        for line in TALK.strip().splitlines():
            command, expected = (part.strip() for part in line.split("  #", 1))
            result = _run(command.replace(f"localhost:{default_port}", f"127.0.0.1:{port}"), quickstart_dir)
            assert result.returncode == 0, f"{command}: {result.stderr}\n{log.read_text()}"
            assert result.stdout.strip() == expected, f"{command}\n{log.read_text()}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_ports_the_readme_names_are_the_servers_defaults() -> None:
    """`flask run` listens on 5000 and gunicorn on 8000, as the README tells the reader."""
    assert "localhost:5000" in TALK and "port 5000" in README and "port 8000" in README
    from flask.cli import run_command
    from gunicorn.config import Config
    [port_option] = [option for option in run_command.params if option.name == "port"]
    assert port_option.default == 5000
    assert Config().bind == ["127.0.0.1:8000"]


# -- Install -----------------------------------------------------------------------------------------


def test_install_lines_name_the_package_and_its_extras() -> None:
    metadata = importlib.metadata.metadata("flask-nucleon-amqp")
    extras = set(metadata.get_all("Provides-Extra") or [])
    named: set[str] = set()
    for command in commands(INSTALL):
        argv = shlex.split(command)
        assert argv[:2] == ["pip", "install"], command
        if argv[2] == ".":
            assert (ROOT / "setup.py").is_file()
            continue
        match = re.fullmatch(r"([\w.-]+)(?:\[([\w,]+)\])?", argv[2])
        assert match and match[1] == metadata["Name"], command
        named |= set((match[2] or "").split(",")) - {""}
    table = set(re.findall(r"^\| `(\w+)` \| ", README.split("## Install", 1)[1].split("## ", 1)[0], re.M))
    assert named == table, "the install line and the extras table name the same extras"
    assert table <= extras, f"extras setup.py does not have: {table - extras}"
    versions = sorted(int(minor) for minor in re.findall(r"Programming Language :: Python :: 3\.(\d+)$",
                                                           "\n".join(metadata.get_all("Classifier") or []), re.M))
    assert metadata["Requires-Python"] == f">=3.{versions[0]}"
    assert f"Requirements: Python 3.{versions[0]}–3.{versions[-1]};" in README


# -- The example app and the make targets ------------------------------------------------------------


def test_example_app_urls_are_its_routes() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from example_app.app import create_app
    finally:
        sys.path.remove(str(ROOT))
    app = create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://"})  # nothing written to the checkout
    with app.app_context():  # its in-memory database's connection, closed now (not by the GC in a later test)
        app.extensions["sqlalchemy"].engine.dispose()
    routes = app.url_map.bind("localhost")
    curls = [command for command in commands(EXAMPLE) if command.startswith("curl")]
    assert len(curls) == 3
    for command in curls:
        argv = shlex.split(command)
        method = argv[argv.index("-X") + 1] if "-X" in argv else "GET"
        [url] = [arg for arg in argv if arg.startswith("localhost:8000")]
        routes.match(url.removeprefix("localhost:8000"), method)  # raises NotFound / MethodNotAllowed
    assert "make run" in commands(EXAMPLE)
    assert "127.0.0.1:8000" in (ROOT / "example_app" / "gunicorn.conf.py").read_text()


def _make_help() -> dict[str, str]:
    result = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True)
    return dict(re.findall(r"^\s+make ([\w-]+)\s+(.*)$", result.stdout, re.M))


def test_make_targets_are_the_ones_make_help_lists() -> None:
    targets = _make_help()
    used = {argv[1] for block in blocks("sh") for argv in map(shlex.split, commands(block)) if argv[0] == "make"}
    assert used and used <= set(targets), f"not in make help: {used - set(targets)}"
    contributing = README.split("## Contributing", 1)[1]
    missing = [target for target in targets if f"make {target}" not in contributing]
    assert not missing, f"make help lists targets the README's Contributing does not: {missing}"


# -- The flask amqp commands and the links -----------------------------------------------------------


def test_the_command_table_lists_every_flask_amqp_command() -> None:
    section = README.split("## The `flask amqp` commands", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `flask amqp (\w+)", section, re.M))
    assert listed == set(amqp_cli.list_commands(None)) | {"outbox"}  # type: ignore[arg-type]
    options = {(command, option) for command, option in re.findall(r"`flask amqp (\w+) \[(--[\w-]+)", section)}
    for command, option in options:
        assert any(option in param.opts for param in amqp_cli.commands[command].params), (command, option)
    # `listen --timeout S` is the shutdown grace period, not a run time: README and --help say so.
    [timeout] = [param for param in amqp_cli.commands["listen"].params if "--timeout" in param.opts]
    assert "at shutdown" in (getattr(timeout, "help", None) or "")
    assert "`S` is how long running callbacks get to finish" in section


def test_links_and_images_exist() -> None:
    targets = re.findall(r"\]\(([^)#:]+)(#[\w-]+)?\)", README)
    assert any(path.endswith(".png") for path, _ in targets)
    for path, anchor in targets:
        assert (ROOT / path).is_file(), path
        if anchor:
            headings = re.findall(r"^(.+)\n[=~^-]{3,}$", (ROOT / path).read_text(encoding="utf-8"), re.M)
            slugs = {re.sub(r"[^\w]+", "-", heading.lower()).strip("-") for heading in headings}
            assert anchor[1:] in slugs, f"{path}{anchor}"
