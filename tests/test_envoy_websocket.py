"""The WebSocket surge of the postmortem, replayed through a real Envoy.

Agents' WebSockets fill their own budget: the next one waits for room, the one after is refused,
and logins on the same Backend keep working, because they draw on a different budget (both at
DEFAULT priority: the split alone protects them). A Backend without a `websocket` block refuses
upgrades outright, so WebSockets can never eat into its budget.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import eventually, free_port, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

pytestmark = pytest.mark.envoy

BUDGET = {"maxConnections": 2, "maxPendingRequests": 1, "maxRequests": 2}


async def open_websocket(port: int, path: str) -> ClientConnection:
    return await connect(f"ws://127.0.0.1:{port}{path}", open_timeout=5, ping_interval=None)


async def refused_with(port: int, path: str) -> int | None:
    """The HTTP status Envoy refused a WebSocket upgrade with; None if it was accepted."""
    try:
        websocket = await open_websocket(port, path)
    except InvalidStatus as refused:
        return refused.response.status_code
    await websocket.close()
    return None


async def test_a_websocket_surge_exhausts_only_the_websocket_budget(served, envoys, backends):
    source, _pipeline, server = served
    api, legacy = backends("api"), backends("legacy")
    port = free_port()
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml",
          backend("api", routes=[{"path": "/login"}, {"pathPrefix": "/"}],
                  circuitBreakers={"default": BUDGET}, websocket={"circuitBreakers": BUDGET}),
          service("api"), endpoint_slice("api", [ready("127.0.0.1")], port=api.port))
    write(source.directory / "legacy.yaml", backend("legacy", routes=[{"pathPrefix": "/legacy"}]),
          service("legacy"), endpoint_slice("legacy", [ready("127.0.0.1")], port=legacy.port))
    envoy = envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port, "/login"), what="logins through Envoy") == "api"

    agents = [await open_websocket(port, "/agents") for _ in range(2)]
    for number, agent in enumerate(agents):
        await agent.send(f"hello {number}")
        assert await agent.recv() == f"api: hello {number}"
    websocket_cluster, api_cluster = f"cluster.{NS}/api/websocket", f"cluster.{NS}/api"
    waiting = asyncio.create_task(open_websocket(port, "/agents"))  # no connection left: it waits its turn
    await eventually(lambda: envoy.stat(f"{websocket_cluster}.upstream_rq_pending_active"),
                     what="the third WebSocket to wait for the budget")
    assert await refused_with(port, "/agents") == 503  # the queue is full too: refused at once

    for _ in range(5):  # ...and logins, on the same Backend and endpoints, are untouched
        assert await body_of(port, "/login") == "api"
    stats = await envoy.stats()
    assert stats[f"{websocket_cluster}.upstream_rq_pending_overflow"] == 1
    assert stats[f"{websocket_cluster}.circuit_breakers.default.remaining_cx"] == 0  # visible before it trips
    assert stats[f"{api_cluster}.upstream_rq_pending_overflow"] == 0
    assert stats[f"{api_cluster}.upstream_rq_total"] >= 6

    await agents.pop().close()  # a budget, not a ban: a closed WebSocket lets the waiting one in
    agents.append(await asyncio.wait_for(waiting, timeout=10))
    await agents[-1].send("late")
    assert await agents[-1].recv() == "api: late"
    for agent in agents:
        await agent.close()

    hits = legacy.hits
    assert await refused_with(port, "/legacy") == 403  # no websocket block: upgrades never reach the backend
    assert legacy.hits == hits
    assert await body_of(port, "/legacy") == "legacy"


async def test_a_quiet_websocket_is_closed_after_the_backend_idle_timeout_only(served, envoys, backends):
    source, _pipeline, server = served
    api = backends("api")
    port = free_port()
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", service("api"), endpoint_slice("api", [ready("127.0.0.1")], port=api.port),
          backend("api", routes=[{"pathPrefix": "/quick"}], websocket={"idleTimeoutSeconds": 1}),
          backend("agents", service="api", routes=[{"pathPrefix": "/agents"}], websocket={}))
    envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port, "/quick"), what="traffic through Envoy") == "api"

    quick, agent = await open_websocket(port, "/quick"), await open_websocket(port, "/agents")
    await asyncio.sleep(2.5)  # quiet: longer than the 1 s idle timeout, far shorter than Envoy's 5 minutes
    with pytest.raises(ConnectionClosed):
        await quick.send("still there?")
        await asyncio.wait_for(quick.recv(), timeout=5)
    await agent.send("still there?")
    assert await agent.recv() == "api: still there?"
    await agent.close()
