"""The gRPC server with a plain gRPC client: standalone services, Fetch, and the status view."""

from __future__ import annotations

import asyncio
import gc
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3 import base_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as d
from envoy.service.endpoint.v3 import eds_pb2_grpc

from controlplane.translate import builders as b
from controlplane.xds import CLUSTER, ENDPOINT, Snapshot
from tests.harness import eventually

NODE = base_pb2.Node(id="client-1", cluster="gateway")


def two_services() -> Snapshot:
    return Snapshot(clusters=[b.eds_cluster("api"), b.eds_cluster("web")],
                    endpoints=[b.load_assignment("api", [("10.0.0.1", 80)]),
                               b.load_assignment("web", [("10.0.0.2", 80)])])


async def test_standalone_cluster_service_streams_and_tracks_acks(xds):
    cache, server = xds
    cache.set_snapshot("gateway", two_services())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel).StreamClusters()
        await call.write(d.DiscoveryRequest(node=NODE, type_url=CLUSTER))
        response = await call.read()
        assert [r.type_url for r in response.resources] == [CLUSTER, CLUSTER]
        await call.write(d.DiscoveryRequest(type_url=CLUSTER, response_nonce=response.nonce,
                                            version_info=response.version_info))
        status = await eventually(lambda: [s for s in cache.status() if s.types[CLUSTER].version_acked],
                                  what="the ACK in the status view")
        assert (status[0].node_id, status[0].transport) == ("client-1", "clusters")
        assert status[0].types[CLUSTER].version_acked == response.version_info
        call.cancel()
    await eventually(lambda: cache.status() == [], what="the stream to leave the status view")


async def test_fetch_returns_the_named_resources_and_refuses_unknown_groups(xds):
    cache, server = xds
    cache.set_snapshot("gateway", two_services())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
        fetched = await stub.FetchEndpoints(d.DiscoveryRequest(node=NODE, resource_names=["web"]))
        assert len(fetched.resources) == 1 and fetched.resources[0].type_url == ENDPOINT
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.FetchEndpoints(d.DiscoveryRequest(node=base_pb2.Node(id="x", cluster="nobody")))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no snapshot yet for node group 'nobody'" in refused.value.details()


async def test_wait_for_termination_returns_when_the_server_stops():
    from controlplane.xds import SnapshotCache, XdsServer
    server = XdsServer(SnapshotCache(), address="127.0.0.1:0")
    await server.start()
    waiting = asyncio.create_task(server.wait_for_termination())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await server.stop(0)
    await asyncio.wait_for(waiting, timeout=5)


@dataclass
class _Request:
    """A DiscoveryRequest's fields in an object a weak reference can watch (protobuf's cannot)."""

    type_url: str
    node: base_pb2.Node = field(default_factory=lambda: NODE)
    resource_names: tuple[str, ...] = ()
    response_nonce: str = ""
    version_info: str = ""
    error_detail: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(code=0, message=""))


class _FakeStream:
    """`XdsServer._serve` driven directly: requests in through a queue, written payloads out."""

    def __init__(self, server, type_url: str):
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.written: list[d.DiscoveryResponse] = []

        async def requests():
            while True:
                yield await self.incoming.get()

        async def write(payload: bytes) -> None:
            self.written.append(d.DiscoveryResponse.FromString(payload))

        self.task = asyncio.create_task(server._serve(requests(), SimpleNamespace(write=write), types=(type_url,),
                                                      delta=False, transport="clusters"))

    async def responses(self, count: int) -> list[d.DiscoveryResponse]:
        await eventually(lambda: len(self.written) >= count, what=f"{count} responses")
        return self.written


async def test_a_stream_does_not_hold_on_to_envoys_requests(xds):
    """Envoy's first request carries its node, ~60 KB with its extensions: kept, it would be most of
    a stream's memory (bench/xds_fanout.py)."""
    cache, server = xds
    cache.set_snapshot("gateway", two_services())
    stream = _FakeStream(server, CLUSTER)
    first = _Request(CLUSTER)
    first_alive = weakref.ref(first)
    stream.incoming.put_nowait(first)
    del first
    await stream.responses(1)
    gc.collect()
    assert first_alive() is None
    assert [s.node_id for s in cache.status()] == ["client-1"]  # what the status view needs is kept
    stream.task.cancel()


async def test_a_burst_of_snapshots_is_one_push_and_snapshots_may_come_from_any_thread(xds):
    cache, server = xds
    cache.set_snapshot("gateway", two_services())
    stream = _FakeStream(server, CLUSTER)
    stream.incoming.put_nowait(_Request(CLUSTER))
    first = (await stream.responses(1))[0]
    stream.incoming.put_nowait(_Request(CLUSTER, response_nonce=first.nonce, version_info=first.version_info))
    await eventually(lambda: cache.status()[0].types[CLUSTER].version_acked, what="the ACK")

    for timeout_ms in (2000, 3000, 4000):
        cache.set_snapshot("gateway", Snapshot(clusters=[b.eds_cluster("api", connect_timeout_ms=timeout_ms)],
                                               endpoints=[b.load_assignment("api", [("10.0.0.1", 80)])]))
    pushed = (await stream.responses(2))[1]
    await asyncio.sleep(0.2)
    assert len(stream.written) == 2  # one push, with the last snapshot
    assert [Cluster.FromString(r.value).connect_timeout.seconds for r in pushed.resources] == [4]

    stream.incoming.put_nowait(_Request(CLUSTER, response_nonce=pushed.nonce, version_info=pushed.version_info))
    await asyncio.to_thread(cache.set_snapshot, "gateway", two_services())
    from_thread = (await stream.responses(3))[2]
    assert sorted(Cluster.FromString(r.value).name for r in from_thread.resources) == ["api", "web"]
    stream.task.cancel()
