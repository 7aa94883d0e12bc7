"""The WebSocket-surge outage replayed through a real Envoy, with its own sequence.

Agents' WebSockets fill the budget over two pods; one pod restarts (its agents are cut off and its
endpoint leaves the EndpointSlice); the agents reconnect. With a fixed budget the lone pod is
offered everything the two carried (counted at the pod); with `perEndpoint` the budget halves at
once and the pod never holds more than its own capacity. Logins (High priority, their own cluster
budget) stay 100% successful throughout, also while a shrinking budget is spent. A failing pod
(503s, or refusing connections) is ejected and traffic moves to the healthy one.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.harness import eventually, free_port, status_of, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

pytestmark = pytest.mark.envoy

CAPACITY = 3  # WebSockets one pod can hold
ROUTES = [{"path": "/login", "priority": "High"}, {"pathPrefix": "/"}]


def _slices(*pods) -> list[dict]:
    return [endpoint_slice("api", [ready("127.0.0.1")], port=pod.port, name=pod.name) for pod in pods]


async def _logins(port: int, count: int = 10) -> list[int]:
    async with httpx.AsyncClient(timeout=5) as client:
        return [(await client.get(f"http://127.0.0.1:{port}/login")).status_code for _ in range(count)]


async def _agent(port: int, *, open_timeout: float = 5) -> tuple[ClientConnection, str]:
    """An agent's WebSocket and the pod that answers it."""
    websocket = await connect(f"ws://127.0.0.1:{port}/agents", open_timeout=open_timeout, ping_interval=None)
    await websocket.send("hello")
    pod, _, _ = (await websocket.recv()).partition(":")
    return websocket, pod


async def _reconnect(port: int) -> ClientConnection | None:
    """An agent cut off by the restart tries again; None if the gateway gives it no room (it would retry)."""
    try:
        websocket, _pod = await _agent(port, open_timeout=2)
    except (TimeoutError, OSError, Exception):  # waits for a slot past its patience, or refused (503)
        return None
    return websocket


@pytest.mark.parametrize("budget", ["perEndpoint", "fixed"])
async def test_a_pod_restart_mid_surge_never_overloads_the_pod_left(budget, served, envoys, backends):
    source, _pipeline, server = served
    first, second = backends("api-1"), backends("api-2")
    port = free_port()
    websocket_budget = ({"perEndpoint": {"maxConnections": CAPACITY}} if budget == "perEndpoint"
                        else {"maxConnections": 2 * CAPACITY})  # the same budget for two pods, fixed
    api = backend("api", routes=ROUTES, websocket={"circuitBreakers": websocket_budget})
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", api, service("api"), *_slices(first, second))
    envoy = envoys(server.port, node_cluster="edge")
    cluster = f"cluster.{NS}/api/websocket"
    assert await eventually(lambda: body_of(port, "/login"), what="logins through Envoy") in ("api-1", "api-2")
    await eventually(lambda: _equals(envoy.stat(f"{cluster}.membership_healthy"), 2), what="both pods in Envoy")

    agents = [await _agent(port) for _ in range(2 * CAPACITY)]  # the surge, up to the budget
    assert sorted(pod for _, pod in agents) == ["api-1"] * CAPACITY + ["api-2"] * CAPACITY
    assert await _logins(port) == [200] * 10

    # api-2 restarts: its agents are cut off and it leaves the EndpointSlice.
    write(source.directory / "api.yaml", api, service("api"), *_slices(first))
    cut_off = [websocket for websocket, pod in agents if pod == "api-2"]
    for websocket in cut_off:
        await websocket.close()
    await eventually(lambda: _equals(envoy.stat(f"{cluster}.membership_total"), 1), what="api-2 gone from Envoy")
    await eventually(lambda: second.websockets_open == 0, what="api-2's agents gone")
    logins = asyncio.create_task(_logins(port, 20))
    reconnected = await asyncio.gather(*(_reconnect(port) for _ in cut_off))  # they all come back at once
    assert await logins == [200] * 20  # logins never notice

    for websocket in reconnected:
        if websocket is not None:
            await websocket.close()
    for websocket, pod in agents:
        if pod == "api-1":
            await websocket.close()
    served_again = sum(websocket is not None for websocket in reconnected)
    if budget == "perEndpoint":
        assert first.most_websockets_open == CAPACITY  # the pod left never held more than it can carry
        assert served_again == 0  # no room: the budget halved with the pods
    else:
        assert first.most_websockets_open == 2 * CAPACITY  # the outage: the lone pod offered both shares
        assert served_again == CAPACITY


async def _status_within(port: int, path: str, seconds: float) -> int | None:
    """The status of a GET through Envoy, or None when it is still waiting after `seconds`."""
    try:
        async with httpx.AsyncClient(timeout=seconds) as http:
            return (await http.get(f"http://127.0.0.1:{port}{path}")).status_code
    except httpx.TimeoutException:
        return None


async def test_high_priority_logins_keep_working_while_a_shrinking_budget_is_spent(served, envoys, backends):
    source, _pipeline, server = served
    first, second = backends("api-1"), backends("api-2")
    port = free_port()
    budgets = {"default": {"perEndpoint": {"maxConnections": 2, "maxPendingRequests": 1}},
               "high": {"maxRequests": 10}}
    api = backend("api", routes=ROUTES, circuitBreakers=budgets)
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", api, service("api"), *_slices(first, second))
    envoy = envoys(server.port, node_cluster="edge")
    cluster = f"cluster.{NS}/api"
    await eventually(lambda: _equals(envoy.stat(f"{cluster}.membership_healthy"), 2), what="both pods in Envoy")

    assert await _logins(port) == [200] * 10
    write(source.directory / "api.yaml", api, service("api"), *_slices(first))  # a pod leaves: 2 connections, 1 pending
    await eventually(lambda: _equals(envoy.stat(f"{cluster}.membership_total"), 1), what="api-2 gone from Envoy")
    # Slow requests, one at a time, until the next one is refused: the shrunk default budget is spent.
    # How many fit depends on the connections the cluster still counts (it is not rebuilt when a pod
    # leaves, so connections it had stay counted until they close): at most 2 connections + 1 pending.
    reports, refused = [], False
    for _ in range(6):
        if await _status_within(port, "/orders", 0.5) == 503:
            refused = True
            break
        reports.append(asyncio.create_task(_status_within(port, "/reports?delay=3", 20)))
        await asyncio.sleep(0.3)
    assert refused and len(reports) <= 3
    assert await _logins(port) == [200] * 10  # High priority: untouched
    assert await asyncio.gather(*reports) == [200] * len(reports)
    assert (await envoy.stats())[f"{cluster}.upstream_rq_pending_overflow"] >= 1


@pytest.mark.parametrize("failure", ["503s", "refused connections"])
async def test_a_failing_pod_is_ejected_and_traffic_moves_to_the_healthy_one(failure, served, envoys, backends):
    source, _pipeline, server = served
    healthy, broken = backends("api-1"), backends("api-2")
    port = free_port()
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", backend("api", routes=ROUTES), service("api"), *_slices(healthy, broken))
    envoy = envoys(server.port, node_cluster="edge")
    cluster = f"cluster.{NS}/api"
    await eventually(lambda: _equals(envoy.stat(f"{cluster}.membership_healthy"), 2), what="both pods in Envoy")
    assert {await body_of(port, "/orders") for _ in range(4)} == {"api-1", "api-2"}

    if failure == "503s":
        broken.failing = True
    else:  # the pod's port stops listening (its open connections to Envoy closed, as a crash closes them)
        write(source.directory / "api.yaml", backend("api", routes=ROUTES), service("api"),
              *_slices(healthy), endpoint_slice("api", [ready("127.0.0.1")], port=free_port(), name="api-2"))
        await eventually(lambda: _equals(envoy.stat(f"{cluster}.membership_healthy"), 2), what="the dead pod in Envoy")
    async with httpx.AsyncClient(timeout=5) as client:
        # 5 failures in a row (the defaults) eject it; Envoy applies the ejection a moment later. How
        # many requests that takes depends on how Envoy's balancer spreads them: bounded at 60.
        answers: list[int] = []
        while len(answers) < 60 and answers.count(503) < 5:
            answers.append((await client.get(f"http://127.0.0.1:{port}/orders")).status_code)
        assert answers.count(503) >= 5, answers
        await eventually(lambda: envoy.stat(f"{cluster}.outlier_detection.ejections_active"), what="an ejection")
        await eventually(lambda: _both_from(port, "api-1"), what="the ejection reaching Envoy's worker")
        after = [(await client.get(f"http://127.0.0.1:{port}/orders")).text.strip() for _ in range(20)]
    assert after == ["api-1"] * 20
    stats = await envoy.stats()
    assert stats[f"{cluster}.outlier_detection.ejections_active"] == 1
    assert stats[f"{cluster}.membership_total"] == 2  # still in the EndpointSlice: ejected, not removed


async def _both_from(port: int, pod: str) -> bool:
    """Two requests in a row answered by `pod` (round robin would give one to each of two pods)."""
    return [await body_of(port, "/orders"), await body_of(port, "/orders")] == [pod, pod]


async def _equals(awaitable, expected) -> bool:
    return await awaitable == expected
