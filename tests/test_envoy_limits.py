"""Limits enforced by a real Envoy: a Gateway's downstream connections, a Backend's budgets."""

from __future__ import annotations

import asyncio

import pytest

from tests.harness import eventually, free_port, status_of, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

pytestmark = pytest.mark.envoy


async def answers_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """One keep-alive request on an open connection; False when Envoy closed the connection instead."""
    writer.write(b"GET / HTTP/1.1\r\nhost: edge\r\n\r\n")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), timeout=5)
    if not status:
        return False
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers["content-length"]))
    return status.startswith(b"HTTP/1.1 200")


async def refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Envoy closed the connection: a reset, or an orderly close that reads as end of stream."""
    try:
        return not await answers_over(reader, writer)
    except (ConnectionError, asyncio.IncompleteReadError):
        return True


async def test_connections_beyond_the_gateway_limit_are_closed(served, envoys, backends):
    source, _pipeline, server = served
    api = backends("api")
    port = free_port()
    write(source.directory / "gateway.yaml", gateway(port=port, limits={"maxConnections": 2}))
    write(source.directory / "api.yaml", backend("api", routes=[{"pathPrefix": "/"}]), service("api"),
          endpoint_slice("api", [ready("127.0.0.1")], port=api.port))
    envoy = envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port), what="traffic through Envoy") == "api"

    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for connection in held:
        assert await answers_over(*connection)
    one_too_many = await asyncio.open_connection("127.0.0.1", port)
    assert await refused(*one_too_many)
    for connection in held:  # the two within the limit are untouched
        assert await answers_over(*connection)
    stats = await envoy.stats()
    assert stats[f"connection_limit.{NS}/edge/http.limited_connections"] >= 1

    for _reader, writer in [*held, one_too_many]:
        writer.close()
    assert await eventually(lambda: body_of(port), what="room again once connections close") == "api"


async def test_a_surge_on_the_default_budget_leaves_high_priority_routes_working(served, envoys, backends):
    source, _pipeline, server = served
    api = backends("api")
    port = free_port()
    write(source.directory / "gateway.yaml", gateway(port=port))
    one = {"maxConnections": 1, "maxPendingRequests": 1, "maxRequests": 1}
    write(source.directory / "api.yaml",
          backend("api", routes=[{"path": "/login", "priority": "High"}, {"pathPrefix": "/"}],
                  circuitBreakers={"default": one, "high": one}),
          service("api"), endpoint_slice("api", [ready("127.0.0.1")], port=api.port))
    envoy = envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port, "/login"), what="traffic through Envoy") == "api"

    cluster = f"cluster.{NS}/api"
    in_flight = asyncio.create_task(status_of(port, "/reports?delay=3"))  # holds the one default connection
    await eventually(lambda: envoy.stat(f"{cluster}.upstream_rq_active"), what="a slow request in flight")
    queued = asyncio.create_task(status_of(port, "/reports?delay=0"))  # waits for it
    await eventually(lambda: envoy.stat(f"{cluster}.upstream_rq_pending_active"), what="a queued request")
    assert await status_of(port, "/orders") == 503  # the default budget is spent: refused at once
    assert await body_of(port, "/login") == "api"  # High priority: its own budget and connections
    assert await asyncio.gather(in_flight, queued) == [200, 200]
    stats = await envoy.stats()
    assert stats[f"{cluster}.upstream_rq_pending_overflow"] == 1
    assert stats[f"{cluster}.circuit_breakers.high.rq_pending_open"] == 0
