"""From manifests to traffic: the file source, the pipeline and a real Envoy."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.sources.store import ObjectKey
from tests.harness import eventually, free_port, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

pytestmark = pytest.mark.envoy


async def test_manifests_become_traffic_and_follow_changes(served, envoys, backends):
    source, pipeline, server = served
    one, two = backends("one"), backends("two")
    port = free_port()
    manifests = source.directory
    write(manifests / "gateway.yaml", gateway(port=port))
    write(manifests / "api.yaml", backend("api", routes=[{"pathPrefix": "/"}]), service("api"))
    write(manifests / "slices.yaml", endpoint_slice("api", [ready("127.0.0.1")], port=one.port))
    envoy = envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port), what="traffic from manifests") == "one"

    write(manifests / "slices.yaml", endpoint_slice("api", [ready("127.0.0.1")], port=two.port))
    assert await eventually(lambda: _answers(port, "two"), what="traffic to follow the EndpointSlice")

    (manifests / "slices.yaml").write_text("kind: EndpointSlice\n  bad: [indent\n")
    await eventually(lambda: source.errors, what="the YAML error to be reported")
    assert "line 2" in str(next(iter(source.errors.values())))
    await asyncio.sleep(0.3)
    assert await body_of(port) == "two"  # the broken file kept its last good objects

    broken = endpoint_slice("api", [ready("127.0.0.1")], port=one.port)
    broken["ports"][0]["port"] = "eighty"  # valid YAML, a wrong shape: refused by the source, not translation
    write(manifests / "slices.yaml", broken)
    await eventually(lambda: "ports[0].port" in str(source.errors.get(manifests / "slices.yaml")),
                     what="the wrong shape to be reported with its field")
    assert await body_of(port) == "two"
    write(manifests / "slices.yaml", endpoint_slice("api", [ready("127.0.0.1")], port=one.port))
    assert await eventually(lambda: _answers(port, "one"), what="the next good change to be published")
    write(manifests / "slices.yaml", endpoint_slice("api", [ready("127.0.0.1")], port=two.port))
    assert await eventually(lambda: _answers(port, "two"), what="traffic back on two")

    write(manifests / "ghost.yaml", backend("ghost", routes=[{"pathPrefix": "/ghost"}]))
    await eventually(lambda: ObjectKey("Backend", NS, "ghost") in pipeline.last.conditions, what="the bad Backend")
    assert pipeline.last.conditions[ObjectKey("Backend", NS, "ghost")][0].reason == "ServiceNotFound"
    assert await body_of(port, "/ghost") == "two"  # still served by '/', the rest unaffected
    stats = await envoy.stats()  # bad input is refused before Envoy: Envoy never had to reject anything
    assert [stats[f"{kind}.update_rejected"] for kind in ("cluster_manager.cds", "listener_manager.lds")] == [0, 0]


async def test_deleting_the_gateway_removes_its_listener(served, envoys, backends):
    source, pipeline, server = served
    one = backends("one")
    port = free_port()
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", backend("api", routes=[{"pathPrefix": "/"}]), service("api"),
          endpoint_slice("api", [ready("127.0.0.1")], port=one.port))
    envoy = envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port), what="traffic") == "one"
    (source.directory / "gateway.yaml").unlink()
    assert await eventually(lambda: _empty(envoy.dynamic_names("listeners")), what="the listener to be removed")


async def _answers(port: int, expected: str) -> bool:
    return await body_of(port) == expected


async def _empty(awaitable) -> bool:
    return not await awaitable
