"""Private RabbitMQ nodes for the fault-injection tests (a pytest plugin).

The fault tests stop, kill and alarm brokers, so they never touch the shared
node on 5672: this plugin starts nodes of its own, beside it, from the
RabbitMQ installation on the machine, and stops them again by pid.

* ``rabbit_node``: one node with an AMQP listener and a TLS listener (a
  throw-away CA made with ``openssl``), for tests/test_reliability.py and
  tests/test_tls.py, and the management plugin (HTTP API on
  ``node.management_port``), for ``flask amqp status`` in tests/test_cli.py.
* ``rabbit_cluster``: three nodes clustered at boot (classic peer discovery),
  for tests/test_cluster.py.

Each set of nodes lives in one temporary directory (data, logs, config, its
own Erlang cookie) and has an epmd of its own on a free port; node names,
ports and the password are random, so two test runs on one machine do not
collide. Nodes run in the foreground as children of the test process (no
``-detached``), so their pids are known; at the end of the session (also
after a failure) they get SIGTERM, then SIGKILL, and any process still
running with the directory in its environment is killed too; the
directory is removed. A node that cannot be started fails the tests that
need it, with its log, and never skips them.

Nothing here imports flask_nucleon_amqp: a broken package cannot break the
fixtures. Waits are cooperative (gevent), so a broker can be restarted in
the middle of a test while its publishers and consumers keep running.

Use it with ``pytest_plugins = ["_brokers"]`` in a test module, and reach
its objects through the fixtures (importing this module from a test module
as well would keep pytest from rewriting its asserts).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.socket
import pytest

#: Where the RabbitMQ scripts are; the ones in /usr/sbin switch to the rabbitmq user (and its cookie).
SBIN = os.environ.get("NUCLEON_RABBITMQ_SBIN") or next(
    iter(sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"), reverse=True)), "")
EPMD = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
OPENSSL = shutil.which("openssl") or "openssl"
#: Runs a command with a parent-death signal: if the test process dies (even by SIGKILL), the node's
#: start script gets SIGTERM and stops the node; epmd gets SIGKILL. util-linux has it everywhere.
_SETPRIV = shutil.which("setpriv")


def _orphan_proof(argv: list[str], sig: str = "TERM") -> list[str]:
    return [_SETPRIV, f"--pdeathsig={sig}", "--", *argv] if _SETPRIV else argv

#: Seconds a node (or the whole cluster) may take to boot on a slow, shared CI machine; below
#: pytest-timeout's 120 s so that our message, with the node's log, is the one reported.
BOOT_TIMEOUT = float(os.environ.get("NUCLEON_BROKER_BOOT_TIMEOUT", "90"))

#: The admin user every private node creates at its first boot (RabbitMQ's ``default_user``).
USER = "nucleon-admin"
#: A distinctive, per-session password: tests assert it never shows up in a log line, repr or error.
PASSWORD = f"Nucleon-{secrets.token_hex(5)}-Secret"

_ENV_PREFIXES = ("RABBITMQ_", "ERL_", "ERLANG_")


class BrokerError(Exception):
    """A private node could not be started, stopped or commanded."""


# -- small cooperative helpers ---------------------------------------------------------------


def _port_free(port: int, hosts: tuple[str, ...] = ("127.0.0.1",)) -> bool:
    for host in hosts:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return False
    return True


def free_ports(count: int, hosts: tuple[str, ...] = ("127.0.0.1",)) -> list[int]:
    """``count`` distinct free ports below the ephemeral range (outgoing connections cannot take them)."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(20000, 32000)
        if port not in chosen and _port_free(port, hosts):
            chosen.append(port)
    return chosen


def _free_port_range(width: int) -> tuple[int, int]:
    while True:
        low = random.randrange(12000, 19000)
        if all(_port_free(port) for port in range(low, low + width)):
            return low, low + width - 1


def amqp_ready(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when ``host:port`` answers the AMQP 0-9-1 protocol header with connection.start."""
    try:
        sock = gevent.socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return False
    try:
        sock.settimeout(timeout)
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        data = b""
        while len(data) < 7:
            chunk = sock.recv(4096)
            if not chunk:
                return False
            data += chunk
        return data[0] == 1  # a method frame: connection.start
    except OSError:
        return False
    finally:
        sock.close()


def run_command(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0,
                check: bool = True) -> tuple[int, str]:
    """Run a command without blocking the gevent hub; return (exit status, output).

    Polls the child instead of using gevent.subprocess: gevent's SIGCHLD
    watcher would reap children that other tests wait for with os.waitpid.
    """
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        delay = 0.005
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                out.seek(0)
                raise BrokerError(f"{' '.join(argv)} did not finish within {timeout:g}s: "
                                  f"{out.read().decode(errors='replace')[-2000:]}")
            gevent.sleep(delay)
            delay = min(delay * 2, 0.05)
        out.seek(0)
        output = out.read().decode(errors="replace")
    if check and proc.returncode != 0:
        raise BrokerError(f"{' '.join(argv)} exited with {proc.returncode}: {output[-2000:]}")
    return proc.returncode, output


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie left to an init that does not reap counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _pids_marked(marker: str) -> list[int]:
    """Processes whose command line or environment mentions ``marker`` (our unique directory)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{part}", "rb") as source:
                    if needle in source.read():
                        found.append(int(entry))
                        break
            except OSError:
                break
    return [pid for pid in found if _alive(pid)]


# -- TLS material ----------------------------------------------------------------------------


class TLSFiles:
    """A throw-away CA, a broker certificate for localhost / 127.0.0.1, client certificates.

    ``other_ca`` and ``other_client_*`` come from a second, unrelated CA (the "wrong CA").
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.ca, self.ca_key = self._ca("ca", "nucleon test CA")
        self.other_ca, self.other_ca_key = self._ca("other-ca", "nucleon unrelated CA")
        self.server_cert, self.server_key = self._leaf("server", "localhost", self.ca, self.ca_key,
                                                       "serverAuth", "DNS:localhost,IP:127.0.0.1")
        self.client_cert, self.client_key = self._leaf("client", "nucleon-client", self.ca, self.ca_key,
                                                       "clientAuth", None)
        self.other_client_cert, self.other_client_key = self._leaf(
            "other-client", "nucleon-stranger", self.other_ca, self.other_ca_key, "clientAuth", None)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _openssl(self, *args: str) -> None:
        try:
            subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            output = getattr(exc, "stderr", b"") or b""
            raise BrokerError(f"openssl {' '.join(args[:2])} failed: {exc} {output.decode(errors='replace')}") from None

    def _ca(self, name: str, subject: str) -> tuple[str, str]:
        cert, key = self._path(f"{name}.pem"), self._path(f"{name}.key")
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", key, "-out", cert, "-days", "3", "-subj", f"/CN={subject}",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                      "-addext", "subjectKeyIdentifier=hash")
        return cert, key

    def _leaf(self, name: str, common_name: str, ca: str, ca_key: str, usage: str,
              san: str | None) -> tuple[str, str]:
        cert, key, csr, ext = (self._path(f"{name}.pem"), self._path(f"{name}.key"), self._path(f"{name}.csr"),
                               self._path(f"{name}.ext"))
        self._openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", key, "-out", csr, "-subj", f"/CN={common_name}")
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
                 f"extendedKeyUsage={usage}", "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"]
        if san:
            lines.append(f"subjectAltName={san}")
        with open(ext, "w") as out:
            out.write("\n".join(lines) + "\n")
        self._openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                      "-days", "3", "-extfile", ext)
        return cert, key


# -- nodes -----------------------------------------------------------------------------------


def _sweep_stale_sites(age: float = 900.0) -> None:
    """Remove the directories of runs that died without cleaning up (no process uses them any more)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "nucleon-rabbit-*")):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(path) > age and not _pids_marked(path):
                shutil.rmtree(path, ignore_errors=True)


class Site:
    """One temporary directory, one epmd and one Erlang cookie, shared by the nodes of a set."""

    def __init__(self, label: str, plugins: tuple[str, ...] = ()) -> None:
        self.label = label
        self.plugins = plugins
        _sweep_stale_sites()
        self.dir = tempfile.mkdtemp(prefix=f"nucleon-rabbit-{label}-")
        self.tag = secrets.token_hex(3)
        cookie = os.path.join(self.dir, ".erlang.cookie")
        with open(cookie, "w") as out:
            out.write("".join(random.choice(string.ascii_uppercase) for _ in range(20)))
        os.chmod(cookie, 0o400)
        with open(os.path.join(self.dir, "rabbitmq-env.conf"), "w"):
            pass  # an empty env file keeps /etc/rabbitmq out
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as out:
            out.write(f"[{','.join(plugins)}].")  # by default none: no management port, faster boot
        self.epmd_port = free_ports(1)[0]
        self.ctl_ports = _free_port_range(10)
        self.epmd: subprocess.Popen[bytes] | None = None
        self.nodes: list[RabbitNode] = []

    def start_epmd(self) -> None:
        log = open(os.path.join(self.dir, "epmd.log"), "wb")
        self.epmd = subprocess.Popen(_orphan_proof([EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                                   "KILL"),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.base_env())
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.epmd.poll() is not None:
                raise BrokerError(f"epmd on port {self.epmd_port} exited with {self.epmd.returncode}")
            with contextlib.suppress(OSError):
                gevent.socket.create_connection(("127.0.0.1", self.epmd_port), timeout=1).close()
                return
            gevent.sleep(0.02)
        raise BrokerError(f"epmd did not listen on port {self.epmd_port} within 10s")

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
        env.update({
            "HOME": self.dir,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_ports[0]),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_ports[1]),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.dir, "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
            "LANG": env.get("LANG", "C.UTF-8"),
        })
        return env

    def shutdown(self) -> list[str]:
        """Stop every node (SIGTERM, then SIGKILL), epmd and stragglers; remove the directory."""
        problems: list[str] = []
        for node in self.nodes:
            node.terminate()
        deadline = time.monotonic() + 20
        for node in self.nodes:
            problems.extend(node.reap(deadline))
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(10)
        stragglers = _pids_marked(self.dir)
        for pid in stragglers:
            _signal(pid, signal.SIGKILL)
        if stragglers:
            problems.append(f"killed stray processes {stragglers}")
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems


class RabbitNode:
    """A RabbitMQ node run by the tests: start, restart, kill -9, rabbitmqctl."""

    def __init__(self, site: Site, short: str, *, tls: TLSFiles | None = None,
                 cluster_with: list[str] | None = None) -> None:
        self.site = site
        self.short = short
        self.name = f"nucleon{site.tag}-{short}@localhost"
        hosts = ("127.0.0.1", "127.0.0.2") if tls else ("127.0.0.1",)
        self.port, self.dist_port, self.ssl_port, self.management_port = free_ports(4, hosts)
        self.tls = tls
        self.cluster_with = cluster_with
        self.proc: subprocess.Popen[bytes] | None = None
        self.beam_pid: int | None = None
        self.starts = 0
        #: When the node last answered AMQP after a (re)start: "the broker is back".
        self.ready_at = 0.0
        self.host = "127.0.0.1"
        self.user, self.password = USER, PASSWORD
        site.nodes.append(self)
        self._write_config()

    def __repr__(self) -> str:
        return f"<RabbitNode {self.name} amqp={self.port} tls={self.ssl_port if self.tls else None}>"

    def path(self, suffix: str) -> str:
        return os.path.join(self.site.dir, f"{self.short}{suffix}")

    def _write_config(self) -> None:
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            f"default_user = {USER}",
            f"default_pass = {PASSWORD}",
            "default_user_tags.administrator = true",
            "log.console = false",
            "log.file.level = info",
        ]
        if "rabbitmq_management" in self.site.plugins:
            lines += [
                f"management.tcp.port = {self.management_port}",
                "management.tcp.ip = 127.0.0.1",
                "collect_statistics_interval = 500",  # counts in the HTTP API within half a second
            ]
        if self.tls:
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.ssl_port}",
                # A second address the certificate does not name: the wrong-host-name test connects there.
                f"listeners.ssl.2 = 127.0.0.2:{self.ssl_port}",
                f"ssl_options.cacertfile = {self.tls.ca}",
                f"ssl_options.certfile = {self.tls.server_cert}",
                f"ssl_options.keyfile = {self.tls.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "ssl_options.versions.1 = tlsv1.3",
                "ssl_options.versions.2 = tlsv1.2",
            ]
        if self.cluster_with:
            lines.append("cluster_formation.peer_discovery_backend = classic_config")
            lines += [f"cluster_formation.classic_config.nodes.{i} = {name}"
                      for i, name in enumerate(self.cluster_with, 1)]
        with open(self.path(".conf"), "w") as out:
            out.write("\n".join(lines) + "\n")

    def env(self) -> dict[str, str]:
        env = self.site.base_env()
        env.update({
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_LOG_BASE": self.path("-log"),
            "RABBITMQ_PID_FILE": self.path(".pid"),
            "RABBITMQ_CONFIG_FILE": self.path(".conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": self.path("-advanced.config"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the node (does not wait; see :meth:`wait_ready`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise BrokerError(f"{self.name} is already running")
        self._kill_leftovers()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(".pid"))
        self.beam_pid = None
        out = open(self.path(".out"), "ab")
        out.write(f"--- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
        out.flush()
        try:
            self.proc = subprocess.Popen(_orphan_proof([os.path.join(SBIN, "rabbitmq-server")]), env=self.env(),
                                         cwd=self.site.dir,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as exc:
            raise BrokerError(f"cannot run {SBIN}/rabbitmq-server: {exc}") from None
        finally:
            out.close()
        self.starts += 1

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until the node answers AMQP; return the seconds waited. BrokerError with its log otherwise."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if amqp_ready(self.host, self.port, timeout=2):
                self.ready_at = time.monotonic()
                self._read_beam_pid()
                return self.ready_at - started
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise BrokerError(f"{self.name} exited (status {code}) before it answered AMQP on port "
                                  f"{self.port}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"{self.name} did not answer AMQP on port {self.port} within {timeout:g}s"
                                  f"\n{self.log_tail()}")
            gevent.sleep(0.02)

    def _read_beam_pid(self) -> int:
        if self.beam_pid is not None and _alive(self.beam_pid):
            return self.beam_pid
        with contextlib.suppress(OSError, ValueError):
            with open(self.path(".pid")) as source:
                pid = int(source.read().strip())
            if _alive(pid) and pid in _pids_marked(self.site.dir):  # not a stale file naming another process
                self.beam_pid = pid
                return pid
        raise BrokerError(f"cannot find the beam.smp pid of {self.name}")

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.path(".out"), os.path.join(self.path("-log"), f"{self.name}.log")):
            with contextlib.suppress(OSError):
                with open(path, errors="replace") as source:
                    parts.append(f"== {path} ==\n" + "".join(source.readlines()[-lines:]))
        return "\n".join(parts) or "(no log)"

    def kill9(self) -> None:
        """``kill -9`` the node's Erlang VM, as a crash or the OOM killer would."""
        pid = self._read_beam_pid()
        os.kill(pid, signal.SIGKILL)

    def wait_dead(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise BrokerError(f"{self.name} still runs {timeout:g}s after kill -9")
            gevent.sleep(0.01)

    def restart(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Start a stopped or killed node again (same data); return the seconds it took."""
        started = time.monotonic()
        self.wait_dead()
        self.start()
        self.wait_ready(timeout)
        return time.monotonic() - started

    def terminate(self) -> None:
        """Ask the node to stop (SIGTERM to its VM: a clean shutdown)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            _signal(self._read_beam_pid(), signal.SIGTERM)
        except BrokerError:
            _signal(self.proc.pid, signal.SIGTERM)

    def reap(self, deadline: float) -> list[str]:
        """Wait for the node to end; SIGKILL it (and its process group) when the deadline passes."""
        if self.proc is None:
            return []
        problems = []
        while self.proc.poll() is None and time.monotonic() < deadline:
            gevent.sleep(0.05)
        if self.proc.poll() is None:
            problems.append(f"{self.name} ignored SIGTERM; killed")
            if self.beam_pid:
                _signal(self.beam_pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._kill_leftovers()
        return problems

    def _kill_leftovers(self) -> None:
        """Kill what is left of the last start: its process group while it runs, then stray helpers."""
        if self.proc is not None and self.proc.poll() is None:  # a reaped pid may belong to someone else
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    # -- rabbitmqctl ----------------------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS...`` against this node (never the shared one)."""
        _, output = run_command([os.path.join(SBIN, "rabbitmqctl"), "-q", "-n", self.name, *args],
                                env=self.env(), timeout=timeout)
        return output

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> float:
        """``rabbitmqctl start_app``; return when the node answered AMQP again (time.monotonic())."""
        def poll() -> BaseException | None:
            try:
                self.wait_ready(60)
            except BrokerError as exc:
                return exc
            return None

        poller = gevent.spawn(poll)  # notes the first moment clients can connect
        try:
            self.ctl("start_app")
            poller.join(60)
            if not poller.ready() or poller.value is not None:
                raise BrokerError(f"{self.name} did not answer AMQP after start_app: {poller.value}")
        finally:
            poller.kill()
        return self.ready_at

    def close_all_connections(self, why: str = "fault injected by the tests") -> None:
        self.ctl("close_all_connections", why)

    def set_memory_watermark(self, fraction: float) -> None:
        self.ctl("set_vm_memory_high_watermark", repr(fraction))

    def connections(self) -> list[dict[str, Any]]:
        output = self.ctl("list_connections", "user", "peer_host", "peer_port", "ssl", "peer_cert_subject",
                          "--formatter", "json")
        return json.loads(output or "[]")  # type: ignore[no-any-return]

    def consumers(self, queue: str, vhost: str = "/") -> list[dict[str, Any]]:
        """The broker's own list of the consumers of ``queue`` (with their prefetch_count)."""
        rows = json.loads(self.ctl("list_consumers", "-p", vhost, "queue_name", "channel_pid", "consumer_tag",
                                   "prefetch_count", "active", "activity_status", "--formatter", "json") or "[]")
        return [row for row in rows if row.get("queue_name") == queue]

    def live_consumers(self, queue: str, vhost: str = "/") -> list[dict[str, Any]]:
        """Consumers of ``queue`` except those a quorum queue keeps for a node that is down."""
        return [row for row in self.consumers(queue, vhost) if row.get("activity_status") != "suspected_down"]

    def quorum_leader(self, queue: str, vhost: str = "/") -> str:
        rows = json.loads(self.ctl("list_queues", "-p", vhost, "name", "leader", "--formatter", "json") or "[]")
        for row in rows:
            if row.get("name") == queue:
                return str(row.get("leader"))
        raise BrokerError(f"{self.name} does not list queue {queue!r}: {rows}")

    def url(self, user: str = USER, password: str = PASSWORD, vhost: str = "%2F", port: int | None = None,
            host: str = "127.0.0.1", scheme: str = "amqp") -> str:
        return f"{scheme}://{user}:{password}@{host}:{port or self.port}/{vhost}"


class Cluster:
    """Three clustered nodes (joined at first boot by classic peer discovery)."""

    def __init__(self, site: Site, size: int = 3) -> None:
        self.site = site
        names = [f"nucleon{site.tag}-c{i}@localhost" for i in range(1, size + 1)]
        self.nodes = [RabbitNode(site, f"c{i}", cluster_with=names) for i in range(1, size + 1)]

    def __getitem__(self, index: int) -> RabbitNode:
        return self.nodes[index]

    def urls(self, **kwargs: Any) -> list[str]:
        return [node.url(**kwargs) for node in self.nodes]

    def node_named(self, name: str) -> RabbitNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def node_on_port(self, port: int) -> RabbitNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def running_nodes(self, via: RabbitNode | None = None) -> list[str]:
        via = via or next(node for node in self.nodes if node.proc is not None and node.proc.poll() is None)
        status = json.loads(via.ctl("cluster_status", "--formatter", "json"))
        return sorted(status.get("running_nodes", []))

    def wait_whole(self, timeout: float = 60) -> float:
        """Wait until every node answers and the cluster lists all of them as running."""
        started = time.monotonic()
        deadline = started + timeout
        for node in self.nodes:
            node.wait_ready(max(1.0, deadline - time.monotonic()))
        expected = sorted(node.name for node in self.nodes)
        while True:
            running = self.running_nodes()
            if running == expected:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise BrokerError(f"cluster incomplete after {timeout:g}s: running {running}, expected {expected}")
            gevent.sleep(0.25)


# -- booting, once per session, in the background ---------------------------------------------


class _Boot:
    """Starts a set of nodes in a greenlet; the fixtures wait for it."""

    #: RabbitMQ plugins the set's nodes run.
    plugins: tuple[str, ...] = ()

    def __init__(self, label: str) -> None:
        self.label = label
        self.site: Site | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        started = time.monotonic()
        try:
            if not SBIN or not os.path.exists(os.path.join(SBIN, "rabbitmq-server")):
                raise BrokerError("RabbitMQ's scripts are not installed (looked for "
                                  "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin; set NUCLEON_RABBITMQ_SBIN); "
                                  "install the rabbitmq-server package (make broker does)")
            self.site = Site(self.label, self.plugins)
            self.site.start_epmd()
            self.result = self._boot(self.site)
        except BaseException as exc:  # noqa: BLE001 - reported by the fixture, never to the hub
            self.error = exc
        self.seconds = time.monotonic() - started

    def _boot(self, site: Site) -> Any:
        raise NotImplementedError

    def wait(self) -> Any:
        self.start()
        assert self.greenlet is not None
        self.greenlet.join()
        if self.error is not None:
            pytest.fail(f"could not start the private RabbitMQ {self.label} the fault tests need "
                        f"(these tests never use the shared node on 5672): {self.error}", pytrace=False)
        return self.result

    def stop(self) -> list[str]:
        if self.greenlet is not None:
            self.greenlet.join()
        return self.site.shutdown() if self.site is not None else []


class _NodeBoot(_Boot):
    plugins = ("rabbitmq_management",)

    def _boot(self, site: Site) -> RabbitNode:
        node = RabbitNode(site, "n1", tls=TLSFiles(os.path.join(site.dir, "tls")))
        node.start()
        node.wait_ready()
        return node


class _ClusterBoot(_Boot):
    def _boot(self, site: Site) -> Cluster:
        cluster = Cluster(site)
        deadline = time.monotonic() + BOOT_TIMEOUT
        # The first node boots alone; the others find it running and join it at their first boot
        # (classic peer discovery), in parallel: no stop_app / join_cluster / start_app round.
        cluster[0].start()
        cluster[0].wait_ready(BOOT_TIMEOUT)
        for node in cluster.nodes[1:]:
            node.start()
        cluster.wait_whole(max(5.0, deadline - time.monotonic()))
        return cluster


_BOOTS: dict[str, _Boot] = {}


def _boot(kind: str) -> _Boot:
    if kind not in _BOOTS:
        _BOOTS[kind] = _NodeBoot("node") if kind == "rabbit_node" else _ClusterBoot("cluster")
    return _BOOTS[kind]


def _start_all_needed(session: pytest.Session) -> None:
    """Boot every broker set the selected tests need at once: the nodes boot in parallel."""
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for kind in ("rabbit_cluster", "rabbit_node"):
        if kind in needed:
            _boot(kind).start()


@pytest.fixture(scope="session")
def rabbit_node(request: pytest.FixtureRequest) -> Iterator[RabbitNode]:
    """One private node (AMQP + TLS listeners), started once per session and stopped by pid."""
    _start_all_needed(request.session)
    boot = _boot("rabbit_node")
    request.addfinalizer(lambda: _report_stop(boot))
    node: RabbitNode = boot.wait()
    _record_boot("booting the node", boot.seconds)
    yield node


@pytest.fixture(scope="session")
def rabbit_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three clustered private nodes, started once per session and stopped by pid."""
    _start_all_needed(request.session)
    boot = _boot("rabbit_cluster")
    request.addfinalizer(lambda: _report_stop(boot))
    cluster: Cluster = boot.wait()
    _record_boot("booting the 3-node cluster", boot.seconds)
    yield cluster


@pytest.fixture
def node_up(rabbit_node: RabbitNode) -> RabbitNode:
    """The private node, running (a previous test may have left it stopped or killed)."""
    _ensure_running(rabbit_node)
    return rabbit_node


@pytest.fixture
def cluster_up(rabbit_cluster: Cluster) -> Cluster:
    """The cluster with all three nodes running (a previous test may have left one down)."""
    for node in rabbit_cluster.nodes:
        _ensure_running(node)
    rabbit_cluster.wait_whole(90)
    return rabbit_cluster


def _ensure_running(node: RabbitNode) -> None:
    try:
        if node.proc is None or node.proc.poll() is not None:
            node.restart()
        elif not amqp_ready(node.host, node.port):
            node.ctl("start_app")
            node.wait_ready(60)
    except BrokerError as exc:
        pytest.fail(f"the private RabbitMQ node {node.name} could not be brought back: {exc}", pytrace=False)


BOOT_TIMES: dict[str, float] = {}


def _record_boot(what: str, seconds: float) -> None:
    BOOT_TIMES.setdefault(what, seconds)


def _report_stop(boot: _Boot) -> None:
    started = time.monotonic()
    problems = boot.stop()
    BOOT_TIMES[f"stopping the {boot.label}"] = time.monotonic() - started
    _BOOTS.pop("rabbit_node" if isinstance(boot, _NodeBoot) else "rabbit_cluster", None)
    assert not problems, f"stopping the private RabbitMQ {boot.label}: {problems}"


# -- secrets ---------------------------------------------------------------------------------


class SecretWatch:
    """Collects what a test must never show a password in: log lines, reprs, exception texts."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.secrets = [PASSWORD]
        self.objects: list[Any] = []

    def add_secret(self, secret: str) -> None:
        self.secrets.append(secret)

    def watch(self, *objects: Any) -> None:
        """Check the repr and str of these (connections, pools, exceptions callers saw) at the end."""
        self.objects.extend(objects)

    def records(self) -> list[logging.LogRecord]:
        """Every record of the test so far: setup and call phases, and the teardown until now."""
        records = [*self.caplog.get_records("setup"), *self.caplog.get_records("call")]
        return records + [r for r in self.caplog.records if r not in records]

    def texts(self) -> list[tuple[str, str]]:
        formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
        texts = []
        for record in self.records():
            texts.append((f"log line of {record.name}", formatter.format(record)))  # with any traceback
        for obj in self.objects:
            texts.append((f"repr of {type(obj).__name__}", repr(obj)))
            texts.append((f"str of {type(obj).__name__}", str(obj)))
            if isinstance(obj, BaseException):
                texts.append((f"args of {type(obj).__name__}", repr(obj.args)))
        return texts

    def check(self) -> None:
        for where, text in self.texts():
            for secret in self.secrets:
                assert secret not in text, f"the password appears in the {where}: {text[:2000]}"

    @property
    def lines(self) -> int:
        return len(self.records())


@pytest.fixture
def secret_watch(caplog: pytest.LogCaptureFixture) -> Iterator[SecretWatch]:
    """DEBUG logs of flask_nucleon_amqp and puka are captured; no password may appear in them."""
    caplog.set_level(logging.DEBUG, logger="flask_nucleon_amqp")
    caplog.set_level(logging.DEBUG, logger="puka")
    watch = SecretWatch(caplog)
    yield watch
    assert watch.lines > 0, "no log line was captured: the check would prove nothing"
    watch.check()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line on what the private brokers cost this run."""
    if BOOT_TIMES:
        parts = ", ".join(f"{what} {seconds:.1f}s" for what, seconds in BOOT_TIMES.items())
        terminalreporter.write_line(f"private RabbitMQ nodes (boot / stop): {parts}")
