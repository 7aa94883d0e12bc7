"""Rejections and changed clusters against a real Envoy, over State-of-the-World and Delta ADS.

What Envoy rejects stays rejected until its content changes (an identical republish is no new
chance, and an Envoy that connects later gets the last accepted version), a rejection never holds
another resource's good change hostage, and a changed cluster is active at once, not after
Envoy's 15 s initial fetch timeout.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from controlplane.translate import builders as b
from controlplane.xds import ENDPOINT, LISTENER, Snapshot
from tests.harness import eventually, free_port
from tests.test_envoy_xds import GROUP, body_of, delta, web_snapshot  # noqa: F401 (delta: a fixture)

pytestmark = pytest.mark.envoy


def _with_budget(snapshot: Snapshot, cluster: str, max_connections: int) -> Snapshot:
    budget = b.thresholds(0, max_connections=max_connections)
    clusters = [b.eds_cluster(name, budgets=[budget] if name == cluster else ())
                for name in snapshot.resources("type.googleapis.com/envoy.config.cluster.v3.Cluster").resources]
    return snapshot.replace(clusters=clusters)


def _port_70000(cluster: str):
    """A ClusterLoadAssignment that Envoy refuses (a port past 65535), built past our own checks."""
    assignment = b.load_assignment(cluster, [("127.0.0.1", 1)])
    assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value = 70000
    return assignment


async def _clusters_section(envoy) -> dict:
    dump = await envoy.config_dump()
    return next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))


async def test_budget_change_is_active_at_once(xds, envoys, backends, delta):
    cache, server = xds
    api = backends("api")
    port = free_port()
    base = web_snapshot(port, {"api": [api.address]})
    cache.set_snapshot(GROUP, _with_budget(base, "api", 100))
    envoy = envoys(server.port, node_cluster=GROUP, delta=delta)
    assert await eventually(lambda: body_of(port), what="first traffic") == "api"

    async def active_budget() -> int | None:
        section = await _clusters_section(envoy)
        if section.get("dynamic_warming_clusters"):
            return None
        (active,) = section["dynamic_active_clusters"]
        return active["cluster"]["circuit_breakers"]["thresholds"][0]["max_connections"]

    assert await eventually(active_budget) == 100
    loop = asyncio.get_running_loop()
    started = loop.time()
    cache.set_snapshot(GROUP, _with_budget(base, "api", 5000))
    # Envoy's initial fetch timeout is 15 s: a cluster left warming would take that long.
    assert await eventually(lambda: _equals(active_budget(), 5000), timeout=5, interval=0.02,
                            what="the raised budget active")
    print(f"budget change active after {loop.time() - started:.3f} s")
    assert await body_of(port) == "api"


async def _equals(awaitable, expected) -> bool:
    return await awaitable == expected


async def test_rejected_listener_stays_rejected_through_republishes_and_for_newcomers(xds, envoys, backends, delta):
    cache, server = xds
    api = backends("api")
    port = free_port()
    with socket.socket() as taken:  # a port someone else listens on: Envoy cannot bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = b.http_listener("busy", address="127.0.0.1", port=taken.getsockname()[1], route_config_name="http")
        # The very first response an Envoy gets holds the bad listener: it keeps the rest.
        bad = web_snapshot(port, {"api": [api.address]}, extra_listeners=[busy])
        cache.set_snapshot(GROUP, bad)
        first = envoys(server.port, node_cluster=GROUP, delta=delta, node_id="first")
        assert await eventually(lambda: body_of(port), what="traffic despite the rejected listener") == "api"
        nack = await eventually(lambda: cache.status()[0].types[LISTENER].last_nack, what="the NACK")
        assert nack.resource_names == ("busy",)

        for _ in range(3):  # what `serve` does every minute: the same content again
            cache.set_snapshot(GROUP, web_snapshot(port, {"api": [api.address]}, extra_listeners=[busy]))
        second = envoys(server.port, node_cluster=GROUP, delta=delta, node_id="second")
        await eventually(lambda: _equals(second.dynamic_names("listeners"), {"http"}), what="the newcomer's listener")
        await asyncio.sleep(1)  # time for a wrong push to show
        assert (await second.stats())["listener_manager.lds.update_rejected"] == 0
        assert await first.dynamic_names("listeners") == {"http"}
        assert await second.dynamic_names("listeners") == {"http"}


async def test_rejected_endpoints_hold_no_later_endpoint_change_hostage(xds, envoys, backends, delta):
    cache, server = xds
    old, new, other = backends("old"), backends("new"), backends("other")
    port = free_port()
    routes = {"/other": "other", "/": "api"}
    cache.set_snapshot(GROUP, web_snapshot(port, {"api": [old.address], "other": [other.address]}, routes))
    envoy = envoys(server.port, node_cluster=GROUP, delta=delta)
    assert await eventually(lambda: body_of(port), what="first traffic") == "old"

    good = web_snapshot(port, {"api": [old.address], "other": [other.address]}, routes)
    cache.set_snapshot(GROUP, good.replace(endpoints=[b.load_assignment("api", [old.address]), _port_70000("other")]))
    await eventually(lambda: cache.status()[0].types[ENDPOINT].last_nack, what="the endpoints' NACK")
    assert await body_of(port, "/other") == "other"  # Envoy keeps the last accepted endpoints

    # Later good changes of that node group apply, though the bad endpoint set is still published.
    for _ in range(2):
        cache.set_snapshot(GROUP, good.replace(endpoints=[b.load_assignment("api", [new.address]),
                                                          _port_70000("other")]))
    assert await eventually(lambda: _equals(body_of(port), "new"), timeout=5, what="the good endpoint change")
    assert await body_of(port, "/other") == "other"
