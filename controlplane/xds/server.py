"""The xDS gRPC server (grpc.aio): a thin adapter between gRPC streams and `StreamProtocol`.

It serves the Aggregated Discovery Service (State-of-the-World and Delta) and the standalone
cluster, endpoint, listener, route and secret services. Responses leave as the bytes the
protocol assembled from shared, pre-serialized fragments: nothing is re-encoded per stream.
Requests are read by one task per stream into a queue that also carries "the snapshot changed"
(coalesced: a burst of snapshots is one wake-up), so a stream does one thing at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds import resources as xr
from controlplane.xds.cache import ConfigWatcher, EnvoyStatus, GroupState
from controlplane.xds.protocol import Step, StreamProtocol
from controlplane.xds.server_tls import ServerTls

log = logging.getLogger(__name__)

# Fit for thousands of long-lived streams: Envoy may ping every 10 s without being cut off,
# dead peers are found within 40 s, and a slow network never drops a healthy stream.
SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
)


@dataclass(frozen=True)
class _Service:
    """A standalone xDS service: its gRPC name, the method suffix, and the one type it serves."""

    name: str
    suffix: str
    type_url: str


_STANDALONE = (
    _Service("envoy.service.cluster.v3.ClusterDiscoveryService", "Clusters", xr.CLUSTER),
    _Service("envoy.service.endpoint.v3.EndpointDiscoveryService", "Endpoints", xr.ENDPOINT),
    _Service("envoy.service.listener.v3.ListenerDiscoveryService", "Listeners", xr.LISTENER),
    _Service("envoy.service.route.v3.RouteDiscoveryService", "Routes", xr.ROUTE),
    _Service("envoy.service.secret.v3.SecretDiscoveryService", "Secrets", xr.SECRET),
)
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

_END = object()
_REFRESH = object()


class _LiveStream:
    """One connected Envoy: what `SnapshotCache.status()` reports about it."""

    def __init__(self, node, group: str, transport: str, protocol: StreamProtocol):
        self.node_id = node.id
        self.group = group
        self.transport = transport
        self.protocol = protocol
        self.connected_since = time.time()

    def status(self) -> EnvoyStatus:
        return EnvoyStatus(node_id=self.node_id, node_group=self.group, connected_since=self.connected_since,
                           transport=self.transport, types=dict(self.protocol.type_status()))


class XdsServer:
    """Serves a `ConfigWatcher` (usually a `SnapshotCache`) to Envoys over gRPC."""

    def __init__(self, cache: ConfigWatcher, *, address: str = "127.0.0.1:18000",
                 options: tuple[tuple[str, int], ...] = SERVER_OPTIONS, tls: ServerTls | None = None):
        self._cache = cache
        self._address = address
        self._options = options
        self._tls = tls
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        server = grpc.aio.server(options=self._options)
        server.add_generic_rpc_handlers(self._handlers())
        if self._tls is not None:
            self.port = server.add_secure_port(self._address, self._tls.credentials())
        else:
            self.port = server.add_insecure_port(self._address)
        if not self.port:
            raise OSError(f"cannot bind the xDS server to {self._address}: is the port in use?")
        await server.start()
        self._server = server
        log.info("xDS server listening on %s (port %d, %s)", self._address, self.port,
                 "plaintext" if self._tls is None else "mutual TLS" if self._tls.client_ca else "TLS")
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        """Stop taking streams, give open ones `grace` seconds, then close them."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        sotw = discovery_pb2.DiscoveryRequest.FromString
        delta = discovery_pb2.DeltaDiscoveryRequest.FromString

        def stream(types: tuple[str, ...], is_delta: bool, transport: str):
            async def handle(requests, context):
                await self._serve(requests, context, types=types, delta=is_delta, transport=transport)
            return grpc.stream_stream_rpc_method_handler(handle, request_deserializer=delta if is_delta else sotw)

        handlers = [grpc.method_handlers_generic_handler(ADS_SERVICE, {
            "StreamAggregatedResources": stream(xr.PUSH_ORDER, False, "ads"),
            "DeltaAggregatedResources": stream(xr.PUSH_ORDER, True, "ads-delta"),
        })]
        for service in _STANDALONE:
            handlers.append(grpc.method_handlers_generic_handler(service.name, {
                f"Stream{service.suffix}": stream((service.type_url,), False, service.suffix.lower()),
                f"Delta{service.suffix}": stream((service.type_url,), True, service.suffix.lower() + "-delta"),
                f"Fetch{service.suffix}": grpc.unary_unary_rpc_method_handler(
                    self._fetch_handler(service.type_url), request_deserializer=sotw),
            }))
        return handlers

    def _fetch_handler(self, type_url: str):
        async def fetch(request: discovery_pb2.DiscoveryRequest, context) -> bytes:
            resource_set = self._cache.group(self._cache.node_group(request.node)).resources(type_url)
            if resource_set is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"no snapshot yet for node group {self._cache.node_group(request.node)!r}")
            names = frozenset(request.resource_names) - {"*"}
            return resource_set.select(names or None).sotw_body
        return fetch

    async def _serve(self, requests: AsyncIterator, context, *, types: tuple[str, ...], delta: bool,
                     transport: str) -> None:
        queue = _RequestQueue()
        reader = asyncio.create_task(_read_into(requests, queue))
        stop_watching = disconnect = None
        try:
            item = await queue.get()
            if item is _END:
                return
            group_name = self._cache.node_group(item.node)
            group = self._cache.group(group_name)
            protocol = StreamProtocol(group, delta=delta, types=types)
            live = _LiveStream(item.node, group_name, transport, protocol)
            disconnect = self._cache.connect(live)
            stop_watching = self._cache.watch(group_name, _refresher(queue))
            log.info("Envoy %s (node group %r) connected over %s", live.node_id, group_name, transport)
            while item is not _END:
                if item is _REFRESH:
                    queue.refresh_pending = False
                    step = protocol.refresh()
                else:
                    step = protocol.receive(item, now=time.time())
                item = None  # no request outlives its step (see _read_into)
                await self._apply(step, group, live, context)
                item = await queue.get()
            log.info("Envoy %s (node group %r) disconnected", live.node_id, group_name)
        finally:
            reader.cancel()
            if stop_watching is not None:
                stop_watching()
            if disconnect is not None:
                disconnect()

    @staticmethod
    async def _apply(step: Step, group: GroupState, live: _LiveStream, context) -> None:
        for ack in step.acks:
            group.record_ack(ack.selection)
        for nack in step.nacks:
            group.record_nack(nack.record.type_url, nack.rejected)
            log.warning("Envoy %s (node group %r) rejected %s version %s (%s): %s. It keeps its last accepted "
                        "configuration; fix the resource and publish a new snapshot.",
                        live.node_id, live.group, xr.SHORT_NAMES[nack.record.type_url], nack.record.version,
                        ", ".join(nack.record.resource_names) or "no names", nack.record.message)
        for response in step.responses:
            await context.write(response.payload)


class _RequestQueue:
    """A stream's inbox: its requests, and "the snapshot changed", for its one consumer task.

    An `asyncio.Queue` would do, at ~3 KB per stream for its three deques and event; this is the
    little of it one consumer needs.
    """

    __slots__ = ("_items", "_waiter", "refresh_pending")

    def __init__(self):
        self._items: list = []
        self._waiter: asyncio.Future | None = None
        self.refresh_pending = False

    def put_nowait(self, item) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self):
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


def _refresher(queue: _RequestQueue):
    """A cache watcher that wakes the stream once per burst of snapshots, from any thread."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()

    def wake() -> None:
        if queue.refresh_pending:
            return
        queue.refresh_pending = True
        queue.put_nowait(_REFRESH)

    def on_change() -> None:
        if threading.get_ident() == loop_thread:
            wake()
        else:
            loop.call_soon_threadsafe(wake)
    return on_change


async def _read_into(requests: AsyncIterator, queue: _RequestQueue) -> None:
    try:
        async for request in requests:
            queue.put_nowait(request)
            # Not held while waiting for the next one: Envoy's first request carries its node, whose
            # list of extensions makes it ~60 KB; kept, it would be most of a stream's memory.
            request = None
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass
    finally:
        queue.put_nowait(_END)
