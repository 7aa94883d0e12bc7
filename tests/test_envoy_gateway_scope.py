"""`scope: Gateway` budgets through real Envoys: the fleet shares the total, whatever its size.

The outage was resolved by scaling the gateway from 2 to 4 Envoys; with per-Envoy budgets that
doubles what the backend can be offered. With `scope: Gateway` each Envoy runs its share (total ÷
Envoys, over RTDS), so the sum over the Envoys stays the total as Envoys come and go, and the
cluster itself never changes (Envoy would count a changed cluster's connections from zero).
"""

from __future__ import annotations

import asyncio

import pytest

from controlplane.runtime.envoy_count import keep_counted
from tests.harness import eventually, free_port, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service

pytestmark = pytest.mark.envoy

TOTAL = 100


async def _limits(envoy, cluster: str) -> tuple[int, int] | None:
    """(max_connections, max_requests) Envoy runs for `cluster`'s default priority: the runtime
    override where there is one, else the cluster's own threshold."""
    entries = (await envoy.admin.get("/runtime")).json()["entries"]
    dump = await envoy.config_dump()
    section = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
    active = {c["cluster"]["name"]: c["cluster"] for c in section.get("dynamic_active_clusters", [])}
    if cluster not in active:
        return None
    [thresholds] = [t for t in active[cluster]["circuit_breakers"]["thresholds"] if t.get("priority", "DEFAULT") == "DEFAULT"]
    found = []
    for limit in ("max_connections", "max_requests"):
        override = entries.get(f"circuit_breakers.{cluster}.default.{limit}", {}).get("final_value")
        found.append(int(override) if override not in (None, "") else int(thresholds[limit]))
    return found[0], found[1]


async def _sums(fleet, cluster: str) -> tuple[int, int] | None:
    limits = [await _limits(envoy, cluster) for envoy in fleet]
    if None in limits:
        return None
    return sum(c for c, _ in limits), sum(r for _, r in limits)


async def _each(fleet, cluster: str) -> list | None:
    return [await _limits(envoy, cluster) for envoy in fleet]


async def _is(awaitable, expected) -> bool:
    return await awaitable == expected


async def test_a_gateway_wide_budget_is_shared_by_the_envoys_as_they_come_and_go(xds, served, envoys, backends):
    cache, _server = xds
    source, pipeline, server = served
    counting = asyncio.create_task(keep_counted(cache, pipeline.share_among, interval=0.1, settle=1.0))
    pod = backends("api-1")
    port = free_port()
    budget = {"maxConnections": TOTAL, "maxRequests": TOTAL}
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", service("shared"), service("each"),
          endpoint_slice("shared", [ready("127.0.0.1")], port=pod.port),
          endpoint_slice("each", [ready("127.0.0.1")], port=pod.port),
          backend("shared", circuitBreakers={"default": {"scope": "Gateway", **budget}}),
          backend("each", circuitBreakers={"default": budget}))  # scope Envoy, the default
    shared, each = f"{NS}/shared", f"{NS}/each"
    try:
        fleet = [envoys(server.port, node_cluster="edge", node_id=f"envoy-{n}") for n in (1, 2)]
        assert await eventually(lambda: _is(_each(fleet, shared), [(50, 50)] * 2),
                                what="two Envoys sharing the budget")
        modified = [await envoy.stat("cluster_manager.cluster_modified") for envoy in fleet]

        fleet += [envoys(server.port, node_cluster="edge", node_id=f"envoy-{n}") for n in (3, 4)]  # scaled out
        assert await eventually(lambda: _is(_each(fleet, shared), [(25, 25)] * 4),
                                what="four Envoys sharing the budget")
        assert await _sums(fleet, shared) == (TOTAL, TOTAL)  # the backend is offered the total, not twice it
        assert await _sums(fleet, each) == (4 * TOTAL, 4 * TOTAL)  # per Envoy: four times the budget
        # The shares moved over RTDS: the first two Envoys' clusters never changed.
        assert [await envoy.stat("cluster_manager.cluster_modified") for envoy in fleet[:2]] == modified

        await fleet.pop().close()  # one Envoy stops: the others get its share
        assert await eventually(lambda: _is(_each(fleet, shared), [(33, 33)] * 3),
                                what="three Envoys sharing the budget")
        assert await _sums(fleet, shared) == (99, 99)  # rounded down: never more than the total
    finally:
        counting.cancel()
