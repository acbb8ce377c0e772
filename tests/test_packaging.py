"""`python -m build` makes an sdist (with the tests) and a wheel (with py.typed) that installs in a fresh venv."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

import flask_nucleon_amqp

ROOT = Path(__file__).resolve().parent.parent
VERSION = flask_nucleon_amqp.__version__
#: Not part of a source tree: what `make`, pytest, mypy, ruff and builds leave behind.
LEFT_BEHIND = shutil.ignore_patterns(".git", ".venv", ".venv-*", "venv", "build", "dist", "*.egg-info", "_build",
                                     "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache")


def _run(*command: str | Path, cwd: Path, timeout: float = 120) -> str:
    # The child must see neither this checkout nor this venv's packages.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The sdist and the wheel, built from a copy of the checkout (the build writes an egg-info into
    its source tree; in the checkout, pytest would find the plugin entry point there)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=LEFT_BEHIND)
    _run(sys.executable, "-m", "build", "--outdir", tmp / "dist", source, cwd=tmp)  # sdist, then the wheel from it
    [sdist] = (tmp / "dist").glob("*.tar.gz")
    [wheel] = (tmp / "dist").glob("*.whl")
    yield sdist, wheel


@pytest.mark.slow
def test_sdist_holds_the_tests_docs_and_example(dists: tuple[Path, Path]) -> None:
    sdist, _ = dists
    assert sdist.name == f"flask_nucleon_amqp-{VERSION}.tar.gz"
    top = f"flask_nucleon_amqp-{VERSION}"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(f"{top}/") for name in archive.getnames()}
    for expected in ("README.md", "LICENSE", "app.cfg.example", "setup.py", "pyproject.toml", "MANIFEST.in",
                     "flask_nucleon_amqp/py.typed", "tests/conftest.py", "tests/test_docs_samples.py",
                     "example_app/app.py", "example_app/app.cfg", "example_app/gunicorn.conf.py",
                     "example_app/page.py", "example_app/templates/chat.html", "example_app/static/chat.js",
                     "example_app/static/chat.css", "example_app/.flaskenv", ".flaskenv", "docs/_static/chat.png",
                     "scripts/test-all.sh", "scripts/ensure-browser.sh",
                     "docs/conf.py", "docs/index.rst", "docs/_ext/amqp_config.py"):
        assert expected in names, f"the sdist lacks {expected}"
    assert not [name for name in names if "__pycache__" in name or name.startswith("docs/_build")]


@pytest.mark.slow
def test_wheel_is_typed_and_has_its_metadata(dists: tuple[Path, Path]) -> None:
    _, wheel = dists
    assert wheel.name == f"flask_nucleon_amqp-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"flask_nucleon_amqp-{VERSION}.dist-info"
        metadata = email.message_from_string(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert "flask_nucleon_amqp/py.typed" in names
    assert {name.split("/")[0] for name in names} == {"flask_nucleon_amqp", info}, "only the package is installed"
    assert any(name.startswith(f"{info}/licenses/LICENSE") for name in names)
    assert metadata["Name"] == "flask-nucleon-amqp" and metadata["Version"] == VERSION
    assert metadata["License-Expression"] == "MIT"
    assert "Typing :: Typed" in cast(list[str], metadata.get_all("Classifier"))
    assert {"test", "prometheus"} <= set(cast(list[str], metadata.get_all("Provides-Extra")))
    assert "puka==0.0.8" in cast(list[str], metadata.get_all("Requires-Dist"))
    assert "flask_nucleon_amqp = flask_nucleon_amqp.testing" in entry_points  # pytest11
    assert "amqp = flask_nucleon_amqp.cli:amqp_cli" in entry_points  # flask.commands


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv(dists: tuple[Path, Path], tmp_path: Path) -> None:
    _, wheel = dists
    _run(sys.executable, "-m", "venv", tmp_path / "venv", cwd=tmp_path)
    python = tmp_path / "venv" / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    _run(python, "-m", "pip", "install", "-q", wheel, cwd=tmp_path)  # its dependencies, from the configured index
    printed = _run(python, "-c", "import flask_nucleon_amqp, sys; print(flask_nucleon_amqp.__version__); "
                   "print(flask_nucleon_amqp.__file__)", cwd=tmp_path)
    version, location = printed.split()
    assert version == VERSION
    assert Path(location).is_relative_to(tmp_path / "venv"), f"imported {location}, not the installed wheel"
    assert "amqp" in _run(tmp_path / "venv" / "bin" / "flask", "--help", cwd=tmp_path)  # the flask.commands entry point
