"""The Sphinx docs build with warnings as errors, and every code sample in them comes from a tested file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flask_nucleon_amqp.config import APP_SETTINGS, POOL_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: Directories whose files the test suite runs or loads; samples may only come from there.
TESTED = ("tests/", "example_app/")


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """`make docs`, into a temporary directory: any warning (a broken reference, a sample marker that
    is gone, a malformed docstring) fails."""
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, (f"sphinx-build failed (sphinx comes with the test extra: pip install -e "
                                    f"'.[test]'):\n{result.stdout}\n{result.stderr}")
    configuration = (tmp_path / "html" / "configuration.html").read_text(encoding="utf-8")
    for key in [*APP_SETTINGS, *POOL_SETTINGS]:
        literal = f'<code class="docutils literal notranslate"><span class="pre">{key}</span></code>'
        assert literal in configuration, f"the configuration reference lacks {key}"
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in ("extension.AMQP.init_app", "extension.current_amqp", "extension.AMQPState.publish",
                 "connection.PukaConnection.publish", "message.Message.ack",
                 "pool.Pool.connection", "topology.Topology.declare", "testing.record_messages"):
        assert f'id="flask_nucleon_amqp.{name}"' in api, f"the API reference lacks {name}"


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.rst"))


@pytest.mark.parametrize("page", _pages(), ids=lambda page: page.name)
def test_every_code_sample_is_included_from_a_tested_file(page: Path) -> None:
    """No literal blocks written into the pages: samples are literalincludes of tests/ or example_app/."""
    text = page.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        assert not re.match(r"\.\.\s+(code-block|code|sourcecode)::", stripped), \
            f"{page.name}:{number}: write the sample in a tested file and literalinclude it"
        if stripped.endswith("::") and not stripped.startswith(".."):
            raise AssertionError(f"{page.name}:{number}: a literal block; literalinclude a tested file instead")
        include = re.match(r"\.\.\s+literalinclude::\s+(\S+)", stripped)
        if include:
            target = (DOCS / include[1]).resolve()
            relative = target.relative_to(ROOT).as_posix()
            assert relative.startswith(TESTED), f"{page.name}:{number}: {relative} is not a tested file"
            assert target.is_file(), f"{page.name}:{number}: {relative} does not exist"
