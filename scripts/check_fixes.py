"""Revert each puka fix in turn and check that its tests fail (``make check-fixes``).

A fix is proven only by a test that fails when that fix alone is reverted.
For each fix below, this script copies the package and the tests into a
temporary directory, reverts that one fix in the copy (an exact text
replacement: the script stops when the text is no longer there, so the table
follows the code), runs the fix's tests against the copy, and expects them to
fail. It never touches the working tree. Exit status 0 when every revert was
caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUKA = "flask_nucleon_amqp/_puka.py"  # the module patches
PUKA_CLIENT = "flask_nucleon_amqp/_puka_client.py"  # the fixed client
FIXES_TESTS = "tests/test_puka_fixes.py"


@dataclass(frozen=True)
class Fix:
    name: str
    path: str
    fixed: str  # text present with the fix
    reverted: str  # what puka (or the code before the fix) did
    tests: tuple[str, ...]


def _unpatch(line: str) -> str:
    """Reverting a module patch: the assignment in _apply_patches becomes a no-op."""
    return f"    pass  # reverted: {line.strip()}"


def _patched(line: str) -> tuple[str, str]:
    return f"    {line}\n", _unpatch(line) + "\n"


FIXES: list[Fix] = [
    Fix("D1/D24 bodies stay bytes, properties apart from headers", PUKA,
        *_patched("puka_channel.Channel.inbound_body = _inbound_body"),
        (f"{FIXES_TESTS}::test_binary_bodies_round_trip_byte_exact",
         f"{FIXES_TESTS}::test_property_names_in_headers_stay_headers")),
    Fix("D3 tables with byte lengths (queue and exchange arguments)", PUKA,
        *_patched("puka_table.encode = encode_table"),
        (f"{FIXES_TESTS}::test_non_ascii_queue_arguments_and_client_properties",)),
    Fix("D4 credentials as bytes", PUKA,
        *_patched("puka_spec.encode_connection_start_ok = _encode_connection_start_ok"),
        (f"{FIXES_TESTS}::test_non_ascii_credentials_and_vhost",)),
    Fix("D4 vhost as bytes", PUKA_CLIENT,
        '        self.vhost = shortstr(vhost, "vhost")  # D4\n',
        "        self.vhost = vhost  # reverted\n",
        (f"{FIXES_TESTS}::test_non_ascii_credentials_and_vhost",)),
    Fix("D5 non-UTF-8 strings stay bytes (the codec's lenient strings)", "flask_nucleon_amqp/_codec.py",
        "    try:\n        return raw.decode(\"utf-8\")\n    except UnicodeDecodeError:\n        return raw\n",
        "    return raw.decode(\"utf-8\")\n",
        (f"{FIXES_TESTS}::test_non_utf8_header_bytes_come_back_as_bytes",)),
    Fix("D6 basic.nack fails the publish", PUKA,
        *_patched("puka_machine._pt_channel_open_ok_puback = _pt_channel_open_ok_puback"),
        (f"{FIXES_TESTS}::test_broker_nack_fails_the_publish_and_keeps_the_connection",)),
    Fix("D9 a frame for a released channel is dropped", PUKA,
        *_patched("puka_channel.Channel._handle_inbound = _handle_inbound"),
        (f"{FIXES_TESTS}::test_methods_nobody_asked_for_are_dropped",)),
    Fix("D9 an unexpected method is dropped", PUKA,
        *_patched("puka_promise.Promise.recv_method = _recv_method"),
        (f"{FIXES_TESTS}::test_methods_nobody_asked_for_are_dropped",)),
    Fix("D15 TCP_NODELAY", PUKA_CLIENT,
        "        self.sd.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n", "",
        (f"{FIXES_TESTS}::test_tcp_nodelay_is_set",)),
    Fix("D17 qos/cancel wait for consume-ok", PUKA,
        *_patched("puka_machine._bcm_basic_consume_ok = _bcm_basic_consume_ok"),
        (f"{FIXES_TESTS}::test_cancel_right_after_consume_and_qos",)),
    Fix("D27 timestamps without utcfromtimestamp (our codec decodes them)", "flask_nucleon_amqp/_codec.py",
        "                return _EPOCH + datetime.timedelta(seconds=value), end\n",
        "                return datetime.datetime.utcfromtimestamp(value), end\n",
        (f"{FIXES_TESTS}::test_timestamp_header_decodes_without_deprecated_calls",)),
    Fix("D23 a channel error fails its own publish; the others' outcome is unknown", PUKA,
        *_patched("puka_machine._pt_channel_close = _pt_channel_close"),
        (f"{FIXES_TESTS}::test_a_shared_publish_channel_fails_the_others_as_outcome_unknown",)),
    Fix("D23 a publish channel per exchange", PUKA_CLIENT,
        "        pt = self.x_exchange_channels.get(exchange) or self._open_publish_channel(exchange)\n",
        "        pt = self.x_publish_promise  # reverted\n",
        ("tests/test_api.py::test_one_bad_publish_in_a_batch_fails_alone[rabbitmq]",)),
    Fix("D2 a peer that is not a broker fails fast", PUKA_CLIENT,
        "    def _handle_conn_read(self, data: bytes, offset: int) -> Any:\n",
        "    def _x_reverted_handle_conn_read(self, data: bytes, offset: int) -> Any:\n",
        (f"{FIXES_TESTS}::test_garbage_from_the_peer_fails_fast_instead_of_poisoning",)),
    Fix("D12 a dead client raises ConnectionBroken", PUKA_CLIENT,
        "    def fileno(self) -> int:\n        if self.sd is None:\n"
        '            raise ConnectionBroken("connection is closed")\n',
        "    def fileno(self) -> int:\n",
        (f"{FIXES_TESTS}::test_dead_client_raises_connection_broken_not_attribute_error",)),
    Fix("D19 a consumer the broker cancelled is unregistered", "flask_nucleon_amqp/connection.py",
        '            if "body" not in result:  # the broker cancelled it: queue deleted (D19)\n'
        "                self._cancelled_by_broker(consumer)\n",
        "            pass  # reverted\n",
        (f"{FIXES_TESTS}::test_unexpected_frames_are_dropped_not_fatal",)),
    Fix("D26 a connect deadline per resolved address", "flask_nucleon_amqp/connection.py",
        "        for address in addresses:\n            session = _PukaSession(self, node, address)\n"
        "            try:\n                session.start(self.settings.connect_timeout)",
        "        deadline = time.monotonic() + self.settings.connect_timeout\n"
        "        for address in addresses:\n            session = _PukaSession(self, node, address)\n"
        "            try:\n                session.start(max(0.001, deadline - time.monotonic()))",
        ("tests/test_connection.py::test_each_resolved_address_has_a_connect_timeout_of_its_own",)),
]


def _copy(into: Path) -> None:
    for name in ("flask_nucleon_amqp", "tests"):
        shutil.copytree(ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", into / "pyproject.toml")


def check(fix: Fix, python: str) -> tuple[bool, str]:
    """Revert ``fix`` in a copy and run its tests there; True when they failed as they must."""
    with tempfile.TemporaryDirectory(prefix="check-fixes-") as tmp:
        work = Path(tmp)
        _copy(work)
        source = work / fix.path
        text = source.read_text(encoding="utf-8")
        if text.count(fix.fixed) != 1:
            return False, f"the fixed text is not (exactly once) in {fix.path}: update scripts/check_fixes.py"
        source.write_text(text.replace(fix.fixed, fix.reverted), encoding="utf-8")
        # `python -m pytest` puts the working directory first on sys.path: the copy is what gets imported.
        run = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *fix.tests],
                             cwd=work, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        where = subprocess.run([python, "-c", "import flask_nucleon_amqp; print(flask_nucleon_amqp.__file__)"],
                               cwd=work, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(work)):
            return False, f"the tests imported {where}, not the reverted copy"
        summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
        if run.returncode == 1:  # tests failed: the revert was caught
            reasons = [line for line in run.stdout.splitlines() if line.startswith("E ")]
            return True, f"{summary}; {reasons[0][1:].strip()[:150] if reasons else ''}"
        if run.returncode == 0:
            return False, f"still green with the fix reverted: {summary}"
        return False, f"pytest exit {run.returncode}: {summary}\n{run.stderr[-2000:]}"


def main() -> int:
    python = sys.executable
    wanted = sys.argv[1:]
    failures = 0
    for fix in FIXES:
        if wanted and not any(w in fix.name for w in wanted):
            continue
        started = time.monotonic()
        caught, detail = check(fix, python)
        failures += not caught
        print(f"{'caught ' if caught else 'MISSED '} {fix.name} ({time.monotonic() - started:.0f}s): {detail}",
              flush=True)
    print("every reverted fix made its tests fail" if not failures else f"{failures} fix(es) not proven")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
