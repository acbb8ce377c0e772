"""TLS against a private node with a throw-away CA (issue 4, item 7).

The node (tests/_brokers.py) has a TLS listener on 127.0.0.1 and 127.0.0.2
with a certificate for ``DNS:localhost, IP:127.0.0.1`` from a CA made with
``openssl`` for this session, ``verify_peer`` and no required client
certificate. Verification is on by default in the package: the right CA
connects; a wrong CA, a host name the certificate does not name, and the
system CAs (the default) are refused at once, with a ConnectionError, and
not retried in a loop. Client certificates (mutual TLS) reach the broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import gevent
import pytest

from flask_nucleon_amqp import AMQPState, AuthenticationError, ConnectionError, PukaConnection

from _proxy import Proxy
from _workload import cleanup, make_state, queue_name

if TYPE_CHECKING:
    from _brokers import RabbitNode, SecretWatch

pytest_plugins = ["_brokers"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("secret_watch")]


def tls_state(node: RabbitNode, host: str = "localhost", port: int | None = None, **options: Any) -> AMQPState:
    url = node.url(scheme="amqps", host=host, port=port or node.ssl_port)
    return make_state(url, publish_size=1, connect_timeout=5, **options)


@pytest.fixture
def tls_proxy(node_up: RabbitNode) -> Iterator[Proxy]:
    """Counts connection attempts to the TLS listener (TLS passes through it untouched)."""
    proxy = Proxy(("127.0.0.1", node_up.ssl_port))
    yield proxy
    proxy.close()


def round_trip(state: AMQPState) -> None:
    queue = queue_name("tls")
    try:
        state.queue_declare(queue, arguments={"x-expires": 60000})
        state.publish("", queue, b"over TLS", persistent=True)
        message = state.connection("listen").consume(queue, timeout=10)
        assert message is not None and message.body == b"over TLS"
        message.ack()
    finally:
        cleanup(state, queue)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_right_ca_connects_and_verifies(node_up: RabbitNode, host: str, secret_watch: SecretWatch) -> None:
    tls = node_up.tls
    assert tls is not None
    state = tls_state(node_up, host, ca_file=tls.ca)
    conn = state.connection()
    round_trip(state)
    secret_watch.watch(state, conn, conn.settings)


def _refused(state: AMQPState, proxy: Proxy | None = None) -> ConnectionError:
    """The first call fails at once with a plain ConnectionError; nothing retries behind the caller's back."""
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        state.publish("", "anywhere", b"x")
    elapsed = time.monotonic() - started
    error = info.value
    print(f"\nrefused in {elapsed:.2f}s: {type(error).__name__}: {error}")
    assert elapsed < 3, f"refused only after {elapsed:.1f}s: {error}"
    assert not isinstance(error, AuthenticationError)
    if proxy is not None:
        attempts = proxy.accepted
        assert 1 <= attempts <= 2, f"{attempts} connection attempts for one call"
        gevent.sleep(2.5)
        assert proxy.accepted == attempts, f"{proxy.accepted - attempts} attempts while nobody called: a retry loop"
    state.close(timeout=2)
    return error


def test_wrong_ca_is_refused(node_up: RabbitNode, tls_proxy: Proxy, secret_watch: SecretWatch) -> None:
    assert node_up.tls is not None
    state = tls_state(node_up, port=tls_proxy.port, ca_file=node_up.tls.other_ca)
    error = _refused(state, tls_proxy)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) or "certificate verify failed" in str(error), str(error)
    assert str(tls_proxy.port) in str(error) and error.port == tls_proxy.port
    secret_watch.watch(error, state)


def test_host_name_not_in_the_certificate_is_refused(node_up: RabbitNode, secret_watch: SecretWatch) -> None:
    """127.0.0.2 reaches the same listener, but the certificate names only localhost and 127.0.0.1."""
    assert node_up.tls is not None
    state = tls_state(node_up, host="127.0.0.2", ca_file=node_up.tls.ca)
    error = _refused(state)
    assert "mismatch" in str(error) or "doesn't match" in str(error), str(error)
    secret_watch.watch(error)


def test_default_uses_system_cas_and_refuses_a_private_ca(node_up: RabbitNode, tls_proxy: Proxy,
                                                          secret_watch: SecretWatch) -> None:
    state = tls_state(node_up, port=tls_proxy.port)  # no ca_file: the system's CA bundle
    error = _refused(state, tls_proxy)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) or "certificate verify failed" in str(error), str(error)
    secret_watch.watch(error)


def test_verify_false_connects_to_an_unknown_ca(node_up: RabbitNode) -> None:
    round_trip(tls_state(node_up, verify=False))


def test_mutual_tls_presents_the_client_certificate(node_up: RabbitNode, secret_watch: SecretWatch) -> None:
    tls = node_up.tls
    assert tls is not None
    state = tls_state(node_up, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)
    conn = state.connection()
    conn.queue_declare(queue_name("mtls-probe"), exclusive=True)
    session = cast(PukaConnection, conn)._session
    assert session is not None
    local_port = session.client.sd.getsockname()[1]
    rows = node_up.connections()
    mine = [row for row in rows if row.get("peer_port") == local_port]
    assert mine, f"the broker does not list our connection from port {local_port}: {rows}"
    assert mine[0]["ssl"] is True and "nucleon-client" in str(mine[0]["peer_cert_subject"]), mine[0]
    round_trip(state)
    secret_watch.watch(state, conn)


def test_client_certificate_from_an_unknown_ca_is_refused(node_up: RabbitNode, secret_watch: SecretWatch) -> None:
    tls = node_up.tls
    assert tls is not None
    state = tls_state(node_up, ca_file=tls.ca, cert_file=tls.other_client_cert, key_file=tls.other_client_key)
    error = _refused(state)
    secret_watch.watch(error)
