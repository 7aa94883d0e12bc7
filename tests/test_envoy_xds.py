"""The xDS server against a real Envoy: config_dump, stats and real HTTP traffic through it.

Every test runs over State-of-the-World and Delta ADS.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from controlplane.translate import builders as b
from controlplane.xds import CLUSTER, LISTENER, Snapshot
from tests.harness import eventually, free_port

pytestmark = pytest.mark.envoy

GROUP = "gateway"


def web_snapshot(listener_port: int, endpoints: dict[str, list[tuple[str, int]]],
                 routes: dict[str, str] | None = None, *, extra_listeners=()) -> Snapshot:
    """One HTTP listener on `listener_port`, routes by prefix (default: '/' to the first cluster)."""
    routes = routes or {"/": next(iter(endpoints))}
    return Snapshot(
        clusters=[b.eds_cluster(name) for name in endpoints],
        endpoints=[b.load_assignment(name, hosts) for name, hosts in endpoints.items()],
        listeners=[b.http_listener("http", address="127.0.0.1", port=listener_port, route_config_name="http"),
                   *extra_listeners],
        routes=[b.route_configuration("http", [b.virtual_host("all", [
            b.route(cluster, prefix=prefix) for prefix, cluster in routes.items()])])],
    )


async def body_of(port: int, path: str = "/") -> str | None:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            response = await client.get(f"http://127.0.0.1:{port}{path}")
        return response.text.strip() if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


@pytest.fixture(params=["sotw", "delta"])
def delta(request) -> bool:
    return request.param == "delta"


async def test_request_through_envoy(xds, envoys, backends, delta):
    cache, server = xds
    api = backends("api")
    port = free_port()
    cache.set_snapshot(GROUP, web_snapshot(port, {"api": [api.address]}))
    envoy = envoys(server.port, node_cluster=GROUP, delta=delta)

    assert await eventually(lambda: body_of(port), what="a request through Envoy") == "api"
    assert await envoy.dynamic_names("clusters") == {"api"}
    status = cache.status()
    assert [(s.node_id, s.node_group) for s in status] == [("envoy-1", GROUP)]
    assert status[0].types[CLUSTER].version_acked == status[0].types[CLUSTER].version_sent != ""


async def test_endpoint_change_moves_traffic_and_cluster_removal(xds, envoys, backends, delta):
    cache, server = xds
    old, new, admin = backends("old"), backends("new"), backends("admin")
    port = free_port()
    cache.set_snapshot(GROUP, web_snapshot(port, {"api": [old.address], "admin": [admin.address]},
                                           {"/admin": "admin", "/": "api"}))
    envoy = envoys(server.port, node_cluster=GROUP, delta=delta)
    assert await eventually(lambda: body_of(port), what="traffic to the old backend") == "old"
    assert await eventually(lambda: body_of(port, "/admin"), what="traffic to admin") == "admin"

    cache.set_snapshot(GROUP, web_snapshot(port, {"api": [new.address], "admin": [admin.address]},
                                           {"/admin": "admin", "/": "api"}))
    assert await eventually(lambda: _resolves_to(body_of(port), "new"), what="traffic moved to the new backend")
    assert await body_of(port, "/admin") == "admin"  # SotW sent api's endpoints alone: Envoy kept admin's

    cache.set_snapshot(GROUP, web_snapshot(port, {"api": [new.address]}))
    assert await eventually(lambda: _resolves_to(envoy.dynamic_names("clusters"), {"api"}),
                            what="admin cluster removed")
    assert await body_of(port) == "new"
    assert await body_of(port, "/admin") == "new"  # the route is gone too: '/' catches it


async def test_rejected_listener_keeps_old_config_and_does_not_loop(xds, envoys, backends, delta):
    cache, server = xds
    api = backends("api")
    port = free_port()
    cache.set_snapshot(GROUP, web_snapshot(port, {"api": [api.address]}))
    envoy = envoys(server.port, node_cluster=GROUP, delta=delta)
    assert await eventually(lambda: body_of(port), what="first traffic") == "api"

    with socket.socket() as taken:  # a port someone else already listens on: Envoy cannot bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        bad = b.http_listener("busy", address="127.0.0.1", port=busy_port, route_config_name="http")
        cache.set_snapshot(GROUP, web_snapshot(port, {"api": [api.address]}, extra_listeners=[bad]))

        nack = await eventually(lambda: cache.status()[0].types[LISTENER].last_nack, what="the NACK in status")
        assert nack.resource_names == ("busy",)
        assert "busy" in nack.message and str(busy_port) in nack.message
        assert await body_of(port) == "api"  # traffic keeps flowing on the old configuration

        rejected = (await envoy.stats())["listener_manager.lds.update_rejected"]
        sent = cache.status()[0].types[LISTENER].version_sent
        await asyncio.sleep(2)  # a push loop would show up as more rejections in this time
        assert (await envoy.stats())["listener_manager.lds.update_rejected"] == rejected
        assert cache.status()[0].types[LISTENER].version_sent == sent
        assert await envoy.dynamic_names("listeners") == {"http"}


async def _resolves_to(awaitable, expected) -> bool:
    return await awaitable == expected


async def test_control_plane_restart_under_traffic(envoys, backends, delta):
    """Envoy keeps serving while the control plane is down, reconnects, and converges."""
    from controlplane.xds import SnapshotCache, XdsServer

    first, second = backends("first"), backends("second")
    port, xds_port = free_port(), free_port()
    cache = SnapshotCache()
    server = XdsServer(cache, address=f"127.0.0.1:{xds_port}")
    await server.start()
    cache.set_snapshot(GROUP, web_snapshot(port, {"api": [first.address]}))
    envoys(xds_port, node_cluster=GROUP, delta=delta)
    assert await eventually(lambda: body_of(port), what="first traffic") == "first"

    outcomes: list[str | None] = []
    done = asyncio.Event()

    async def client() -> None:  # bounded: at most 3,000 requests or until told to stop
        async with httpx.AsyncClient(timeout=2) as http:
            for _ in range(3000):
                if done.is_set():
                    return
                try:
                    response = await http.get(f"http://127.0.0.1:{port}/")
                    status = response.status_code
                    outcomes.append(response.text.strip() if status == 200 else f"HTTP {status}")
                except httpx.HTTPError as error:
                    outcomes.append(f"error {error!r}")
                await asyncio.sleep(0.01)

    traffic = asyncio.create_task(client())
    try:
        await asyncio.sleep(0.5)
        await server.stop(0)
        await asyncio.sleep(1.5)  # down: Envoy serves on its last configuration
        cache = SnapshotCache()
        server = XdsServer(cache, address=f"127.0.0.1:{xds_port}")
        await server.start()
        cache.set_snapshot(GROUP, web_snapshot(port, {"api": [second.address]}))
        await eventually(lambda: outcomes and outcomes[-1] == "second", timeout=30, what="convergence after restart")
        assert [s.node_id for s in cache.status()] == ["envoy-1"]
    finally:
        done.set()
        await traffic
        await server.stop(0)
    failures = [o for o in outcomes if o not in ("first", "second")]
    assert failures == [], f"{len(failures)} failed requests of {len(outcomes)}: {failures[:5]}"
    assert outcomes.count("first") > 10 and outcomes[-1] == "second"


async def test_a_cluster_removed_before_envoy_asked_for_its_endpoints_holds_nothing_back(xds, envoys, delta):
    """A cluster added, then removed a millisecond later (two publishes): Envoy asks for endpoints the
    snapshot no longer has, and held its ACK of the clusters, so every later change, for 15 s (its
    initial fetch timeout), until it got an empty endpoint set for it (found by an outside test)."""
    cache, server = xds

    def clusters(*names: str) -> Snapshot:
        return Snapshot(clusters=[b.eds_cluster(name) for name in names],
                        endpoints=[b.load_assignment(name, [("127.0.0.1", 9)]) for name in names])

    cache.set_snapshot(GROUP, clusters("a"))
    envoy = envoys(server.port, node_cluster=GROUP, delta=delta)
    await eventually(lambda: _clusters_are(envoy, {"a"}), what="the first clusters")
    for attempt, pause in enumerate((0.0005, 0.001, 0.002)):
        cache.set_snapshot(GROUP, clusters("a", f"added-{attempt}"))
        await asyncio.sleep(pause)
        cache.set_snapshot(GROUP, clusters("a", f"next-{attempt}"))
        await eventually(lambda: _clusters_are(envoy, {"a", f"next-{attempt}"}), timeout=5,
                         what=f"the clusters published {pause * 1000:g} ms after one that came and went")


async def _clusters_are(envoy, names: set[str]) -> bool:
    return await envoy.dynamic_names("clusters") == names
