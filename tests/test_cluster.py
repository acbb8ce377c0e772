"""Failover across a 3-node RabbitMQ cluster with a quorum queue (issue 4).

The cluster is private to the test session (tests/_brokers.py); the pools
list its three nodes (``url`` is a list), so connection ``i`` starts on node
``i % 3``. Faults: ``kill -9`` of the node that leads the quorum queue, and
``stop_app`` of the node the consumer is connected to, while 100 greenlets
publish and a consumer consumes. Every confirmed message must be consumed
(tests/_workload.py), and the client must move to a live node by itself.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, cast

import pytest

from flask_nucleon_amqp import PukaConnection
from flask_nucleon_amqp.topology import Queue

from _workload import make_state, run_fault

if TYPE_CHECKING:
    from _brokers import Cluster, RabbitNode, SecretWatch

pytest_plugins = ["_brokers"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("secret_watch")]

#: The queue arguments of the package's first-class quorum declaration.
QUORUM = Queue("cluster-test", quorum=True).arguments


def _node_ports(state: object) -> list[int]:
    pools = state.pools.values()  # type: ignore[attr-defined]
    return [conn._session.node.port for pool in pools for conn in pool.connections() if conn.is_open]


def test_kill_9_of_the_quorum_leader_loses_no_confirmed_message(cluster_up: Cluster,
                                                                secret_watch: SecretWatch) -> None:
    state = make_state(cluster_up.urls(), publish_size=3)
    queue = f"cluster-kill9-{uuid.uuid4().hex[:8]}"
    state.queue_declare(queue, durable=True, arguments=QUORUM)
    leader = cluster_up.node_named(cluster_up[1].quorum_leader(queue))
    listen = cast(PukaConnection, state.connection("listen"))  # the cluster tests run puka connections
    victim: list[RabbitNode] = []
    fault_at: list[float] = []

    def inject() -> float | None:
        fault_at.append(time.monotonic())
        assert listen.is_open
        spread = sorted(_node_ports(state))
        assert len(set(spread)) == 3, f"the 4 connections are not spread over the 3 nodes: {spread}"
        victim.append(leader)
        leader.kill9()
        return None  # the cluster stays available: recovery counts from the detection

    try:
        workload, figures = run_fault(
            state, queue, f"cluster: kill -9 of the quorum leader's node ({leader.short})", inject,
            secret_watch=secret_watch, after=5.0, queue_arguments=QUORUM,
            broker=lambda: next(n for n in cluster_up.nodes if n is not leader))
        ports = _node_ports(state)
        assert ports and leader.port not in ports, f"connections still on the killed node: {ports}"
        # A new leader is elected within about a second: after that every connection publishes again
        # (a nack is reported to its caller, but a connection nacked for good cannot publish at all).
        nacked = sorted(a.ended - fault_at[0] for a in workload.attempts.values()
                        if type(a.error).__name__ == "PublishNacked" and a.ended is not None)
        assert not nacked or nacked[-1] <= 3.0, (
            f"publishes were still nacked {nacked[-1]:.1f}s after the leader was killed ({len(nacked)} nacks; "
            f"{figures.notes})")
        assert listen.is_open and listen._session is not None and listen._session.node.port != leader.port
        new_leader = cluster_up.node_named(
            cluster_up.nodes[(cluster_up.nodes.index(leader) + 1) % 3].quorum_leader(queue))
        assert new_leader is not leader
    finally:
        if victim:
            leader.restart()
        try:
            state.queue_delete(queue, timeout=10)
        finally:
            state.close(timeout=5)


def test_stop_app_of_the_consumers_node_fails_over_by_itself(cluster_up: Cluster,
                                                             secret_watch: SecretWatch) -> None:
    state = make_state(cluster_up.urls(), publish_size=3)
    queue = f"cluster-stop-app-{uuid.uuid4().hex[:8]}"
    state.queue_declare(queue, durable=True, arguments=QUORUM)
    listen = cast(PukaConnection, state.connection("listen"))  # the cluster tests run puka connections
    stopped: list[RabbitNode] = []

    def inject() -> float | None:
        assert listen._session is not None
        node = cluster_up.node_on_port(listen._session.node.port)
        stopped.append(node)
        node.stop_app()
        return None

    try:
        run_fault(state, queue, "cluster: stop_app of the consumer's node", inject, secret_watch=secret_watch,
                  after=5.0, queue_arguments=QUORUM,
                  broker=lambda: next(n for n in cluster_up.nodes if n is not stopped[0]))
        node = stopped[0]
        ports = _node_ports(state)
        assert ports and node.port not in ports, f"connections still on the stopped node: {ports}"
        assert listen.is_open and listen._session is not None and listen._session.node.port != node.port
    finally:
        if stopped:
            stopped[0].start_app()
        try:
            state.queue_delete(queue, timeout=10)
        finally:
            state.close(timeout=5)
