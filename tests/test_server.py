"""The gRPC server with a plain gRPC client: standalone services, Fetch, the status view, and
what a hostile or unusual client can do (half-close, stop with streams open, a taken port): one
clear log line each, never a traceback."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3 import base_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as d
from envoy.service.endpoint.v3 import eds_pb2_grpc

from controlplane.translate import builders as b
from controlplane.xds import CLUSTER, ENDPOINT, Snapshot, SnapshotCache, XdsServer
from controlplane.xds import server as xds_server
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
        for number in range(50):  # made-up node groups: each fetch leaves nothing behind in the cache
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.FetchEndpoints(d.DiscoveryRequest(node=base_pb2.Node(id="x", cluster=f"made-up-{number}")))
    # the server forgets each one as its call ends, which may be just after the client has its answer
    await eventually(lambda: set(cache._groups) == {"gateway"}, timeout=5, what="the made-up groups forgotten")


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


def _as_read(request: _Request) -> _Request:
    """What `_serve` parses, for requests that come to it already made (not as bytes)."""
    return request


class _FakeStream:
    """`XdsServer._serve` driven directly: requests in through a queue, written payloads out."""

    def __init__(self, server, type_url: str):
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.written: list[d.DiscoveryResponse] = []

        async def write(payload: bytes) -> None:
            self.written.append(d.DiscoveryResponse.FromString(payload))

        self.task = asyncio.create_task(server._serve(SimpleNamespace(read=self.incoming.get, write=write), _as_read,
                                                      types=(type_url,), delta=False, transport="clusters"))

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


class _Watched:
    """A parsed request a weak reference can watch (protobuf's cannot); reads go to the message."""

    def __init__(self, message):
        self._message = message

    def __getattr__(self, name: str):
        return getattr(self._message, name)


async def test_grpc_holds_no_request_while_a_stream_waits_for_the_next(monkeypatch):
    """grpc.aio's request iterator is an async generator that holds the last request while it waits
    for the next one, and a State-of-the-World ACK repeats every subscribed name: held, it was
    ~9 KiB of upb arena per stream with 100 names (bench/xds_fanout.py). Through real gRPC: the
    holding was gRPC's."""
    parsed: list[weakref.ref] = []

    def watched(raw: bytes) -> _Watched:
        request = _Watched(d.DiscoveryRequest.FromString(raw))
        parsed.append(weakref.ref(request))
        return request

    monkeypatch.setattr(xds_server, "_SOTW_REQUEST", watched)
    cache = SnapshotCache()
    cache.set_snapshot("gateway", two_services())
    server = XdsServer(cache, address="127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(d.DiscoveryRequest(node=NODE, type_url=CLUSTER))
            clusters = await call.read()
            await call.write(d.DiscoveryRequest(type_url=CLUSTER, response_nonce=clusters.nonce,
                                                version_info=clusters.version_info))
            await call.write(d.DiscoveryRequest(type_url=ENDPOINT, resource_names=["api", "web"]))
            endpoints = await call.read()  # all three handled
            assert endpoints.type_url == ENDPOINT and len(parsed) == 3
            await eventually(lambda: gc.collect() >= 0 and all(ref() is None for ref in parsed),
                             what="no request alive while the stream waits")
            call.cancel()
    finally:
        await server.stop(0)


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


def _quiet(caplog) -> None:
    """Nothing at WARNING or above, and no traceback, from us or from grpc.aio."""
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    assert "Traceback" not in caplog.text


def _ads(channel) -> grpc.aio.StreamStreamCall:
    return ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()


async def test_a_client_that_half_closes_gets_its_response_and_an_ok_status(xds, caplog):
    """grpc.aio used to send the status while the first response was still being written:
    GRPC_CALL_ERROR_TOO_MANY_OPERATIONS, a traceback per client, and a client left hanging."""
    caplog.set_level(logging.DEBUG, logger="grpc")
    caplog.set_level(logging.INFO, logger="controlplane")
    cache, server = xds
    cache.set_snapshot("gateway", two_services())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for _ in range(3):
            call = _ads(channel)
            await call.write(d.DiscoveryRequest(node=NODE, type_url=CLUSTER))
            await call.done_writing()
            responses = await asyncio.wait_for(_all(call), timeout=5)
            assert [len(r.resources) for r in responses] == [2]
            assert await call.code() == grpc.StatusCode.OK
    await eventually(lambda: cache.status() == [], what="the streams to leave the status view")
    _quiet(caplog)
    assert caplog.text.count("its stream ended (the Envoy stopped, or closed its side of the stream)") == 3


async def test_stop_ends_open_streams_with_unavailable_in_one_log_line(caplog):
    """Stopping used to leave streams to gRPC's cancellation at the end of the grace period, which
    logged a CancelledError traceback per stream in StreamAggregatedResources."""
    caplog.set_level(logging.DEBUG, logger="grpc")
    caplog.set_level(logging.INFO, logger="controlplane")
    cache = SnapshotCache()
    cache.set_snapshot("gateway", two_services())
    server = XdsServer(cache, address="127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        calls = [_ads(channel) for _ in range(3)]
        for number, call in enumerate(calls):
            await call.write(d.DiscoveryRequest(node=base_pb2.Node(id=f"client-{number}", cluster="gateway"),
                                                type_url=CLUSTER))
            await call.read()
        started = time.monotonic()
        await server.stop(5)
        assert time.monotonic() - started < 2  # nothing waits for the grace period
        for call in calls:
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
            assert "the control plane is stopping" in await call.details()
    _quiet(caplog)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("controlplane") and r.levelno >= logging.INFO]
    assert [line for line in lines if "disconnected" in line or "stopping" in line] == [
        "stopping: 3 Envoys connected; ending their streams (they keep their configuration and reconnect)"]


@pytest.mark.parametrize("half_closed", [False, True])
async def test_stop_takes_at_most_its_grace_period_when_a_client_reads_nothing(caplog, half_closed):
    """The stuck stream's flush took all of `grace`, then gRPC's own stop waited `grace` again. A
    half-closed one is still connected while it flushes: the stop line counted only readers, 0."""
    caplog.set_level(logging.INFO, logger="controlplane")
    cache = SnapshotCache()
    big = [b.eds_cluster(f"cluster-{number}-" + "x" * 100) for number in range(3000)]  # ~400 KB a response
    cache.set_snapshot("gateway", Snapshot(clusters=big))
    server = XdsServer(cache, address="127.0.0.1:0")
    await server.start()
    # No flow-control window growth: the responses fill the 16 KB this client takes, then writes block.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        call = _ads(channel)
        await call.write(d.DiscoveryRequest(node=NODE, type_url=CLUSTER))  # and never reads
        await eventually(lambda: cache.status() != [], what="the stream to connect")
        cache.set_snapshot("gateway", Snapshot(clusters=big[::-1][:2000]))  # a second response, queued
        if half_closed:
            await call.done_writing()
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await server.stop(1.0)
        assert time.monotonic() - started < 1.5
        call.cancel()
    assert "stopping: 1 Envoy connected; ending their streams" in caplog.text


async def test_a_half_closed_stream_whose_client_reads_nothing_is_dropped_after_the_flush_timeout(xds, caplog):
    """Its status cannot be sent while a write is stuck (it would collide with it): the call ends
    without one, and gRPC resets the stream. Driven directly: a real client's buffers take megabytes
    before a write blocks."""
    caplog.set_level(logging.INFO, logger="controlplane")
    cache, server = xds
    server._flush_timeout = 0.2
    cache.set_snapshot("gateway", two_services())

    requests = iter([_Request(CLUSTER), grpc.aio.EOF])

    async def one_request():
        return next(requests)

    async def write_nothing(payload: bytes) -> None:
        await asyncio.Event().wait()

    handler = asyncio.create_task(server._serve(SimpleNamespace(read=one_request, write=write_nothing), _as_read,
                                                types=(CLUSTER,), delta=False, transport="clusters"))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(handler, timeout=5)
    assert cache.status() == []
    assert "disconnected: it read nothing for 0.2s while its stream was ending; dropped it" in caplog.text


@pytest.mark.parametrize("method, expected", [("StreamAggregatedResources", "DiscoveryRequest"),
                                              ("DeltaAggregatedResources", "DeltaDiscoveryRequest")])
async def test_a_request_that_is_not_a_discovery_request_ends_its_stream_with_one_line(xds, caplog, method, expected):
    """gRPC's parsing error used to escape the handler: its traceback in the log, UNKNOWN to the client."""
    caplog.set_level(logging.INFO, logger="controlplane")
    cache, server = xds
    cache.set_snapshot("gateway", two_services())
    garbage = b"\xff\xff\xff\x0f not protobuf"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.stream_stream(f"/{xds_server.ADS_SERVICE}/{method}")
        for first in (garbage, garbage):  # the second from the same address is logged at DEBUG
            call = raw()
            await call.write(first)
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (await call.details()).startswith(f"not a {expected}: Error parsing message")
        connected = _ads(channel) if method.startswith("Stream") else \
            ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
        request = d.DiscoveryRequest if method.startswith("Stream") else d.DeltaDiscoveryRequest
        await connected.write(request(node=NODE, type_url=CLUSTER))
        assert len((await connected.read()).resources) == 2  # the others are served as before
        after = raw()
        await after.write(request(node=NODE, type_url=CLUSTER).SerializeToString())
        await after.read()
        await after.write(garbage)  # a connected Envoy sending garbage: its disconnect line says why
        assert await after.code() == grpc.StatusCode.INVALID_ARGUMENT
        connected.cancel()
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("a client at ipv4:127.0.0.1:") and \
        f"was refused before it named its node: it sent a request that is not a {expected} (" in warnings[0]
    assert warnings[1].startswith("Envoy client-1 (node group 'gateway') disconnected: it sent a request that is not "
                                  f"a {expected} (")


async def test_a_fetch_that_is_not_a_discovery_request_is_refused_with_one_line(xds, caplog):
    """gRPC parsed Fetch requests itself: a traceback and UNKNOWN on every call (found by an outside test)."""
    caplog.set_level(logging.INFO, logger="controlplane")
    cache, server = xds
    cache.set_snapshot("gateway", two_services())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        fetch = channel.unary_unary("/envoy.service.endpoint.v3.EndpointDiscoveryService/FetchEndpoints")
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await fetch(b"\xff")
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith("not a DiscoveryRequest: Error parsing message")
        fetched = d.DiscoveryResponse.FromString(await fetch(d.DiscoveryRequest(node=NODE).SerializeToString()))
        assert len(fetched.resources) == 2  # a good one is answered as before
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "it fetched with a request that is not a DiscoveryRequest (" in warnings[0]


async def test_a_taken_port_is_one_error_naming_the_address(capfd):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(OSError) as refused:
            await XdsServer(SnapshotCache(), address=address).start()
    assert str(refused.value) == (f"cannot listen for xDS on {address}: Address already in use; another process "
                                  "listens there (another controlplane serve?): stop it or choose another port")
    assert "Failed to add port" not in capfd.readouterr().err  # gRPC never tried: its C core logs nothing


async def test_port_zero_logs_the_port_bound(caplog):
    caplog.set_level(logging.INFO, logger="controlplane")
    server = XdsServer(SnapshotCache(), address="127.0.0.1:0")
    port = await server.start()
    await server.stop(0)
    assert f"xDS server listening on 127.0.0.1:{port} (plaintext)" in caplog.text


async def _all(call) -> list[d.DiscoveryResponse]:
    return [response async for response in call]
