"""The xDS gRPC server (grpc.aio): a thin adapter between gRPC streams and `StreamProtocol`.

It serves the Aggregated Discovery Service (State-of-the-World and Delta) and the standalone
cluster, endpoint, listener, route and secret services. Responses leave as the bytes the
protocol assembled from shared, pre-serialized fragments: nothing is re-encoded per stream.

One task per stream reads and handles its requests; a new snapshot is handled by a callback on
the event loop (coalesced: a burst of snapshots is one refresh). Both run the protocol without
waiting and queue what it produces; a short-lived task writes it, in order. A second long-lived
task per stream, or a queue between two, cost ~10% more CPU per push and ~3 KB per stream
(bench/xds_fanout.py at 1,000 streams).

A stream ends with a status only once nothing is being written to it: grpc.aio sends the status
in a batch that collides with a write still in flight (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS, a
logged traceback, and a client left waiting). So a client's half-close and `stop()` both let the
queued responses be written first. `stop()` ends the streams itself rather than leaving them to
gRPC's cancellation at the end of its grace period, which grpc.aio logs as a CancelledError
traceback when a call is cancelled as it finishes.

Identity, not claims (xds/identity.py): over mutual TLS, a stream or fetch whose `node.cluster`
names a group the client certificate does not is refused with PERMISSION_DENIED, logged once per
identity and group. A connection that proves no identity (plaintext, or TLS without client
certificates) is served each snapshot's `keyless` form: no private key travels where anyone
could have asked for it, unless the server was told otherwise, loudly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from controlplane.xds import resources as xr
from controlplane.xds import identity
from controlplane.xds.cache import ConfigWatcher, EnvoyStatus, GroupState, KeylessGroup
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

# How long a stream that is ending may take to write what was queued for it; past that, its
# client is not reading, and the call is dropped without a status (gRPC resets the HTTP/2 stream).
FLUSH_TIMEOUT = 5.0
STOPPING = "the control plane is stopping: reconnect (to another replica); Envoy keeps its configuration meanwhile"
# Refusals are logged once per (identity, claimed group); a client repeating itself is not a log flood,
# and past this many pairs (certificates come from our own CA: few) further ones go to DEBUG.
LOGGED_REFUSALS = 1024


class _Stream:
    """One connected Envoy: its protocol, what it has to write, and what `status()` reports."""

    __slots__ = ("node_id", "group", "transport", "protocol", "connected_since", "_group_state", "_context",
                 "_loop", "_loop_thread", "_unwritten", "_writer", "_refresh_scheduled", "_closed", "_describe")

    def __init__(self, node, group: GroupState | KeylessGroup, transport: str, protocol: StreamProtocol, context,
                 describe: Callable[[str], str | None] | None = None):
        self.node_id = node.id
        self._describe = describe
        self.group = group.name
        self.transport = transport
        self.protocol = protocol
        self.connected_since = time.time()
        self._group_state = group
        self._context = context
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._unwritten: list[bytes] = []
        self._writer: asyncio.Task | None = None
        self._refresh_scheduled = False
        self._closed = False

    def status(self) -> EnvoyStatus:
        return EnvoyStatus(node_id=self.node_id, node_group=self.group, connected_since=self.connected_since,
                           transport=self.transport, types=dict(self.protocol.type_status()))

    def handle(self, step: Step) -> None:
        """Record what Envoy accepted and rejected, and queue the responses for writing."""
        for ack in step.acks:
            self._group_state.record_ack(ack.selection)
        for nack in step.nacks:
            record = nack.record
            origins = [self._describe(name) for name in record.resource_names] if self._describe is not None else []
            came_from = "; ".join(sorted({origin for origin in origins if origin}))
            log.warning("Envoy %s (node group %r) rejected %s version %s (%s): %s.%s It keeps its last accepted "
                        "configuration; fix the resource and publish a new snapshot.",
                        self.node_id, self.group, xr.SHORT_NAMES[record.type_url], record.version,
                        ", ".join(record.resource_names) or "no names", record.message.strip(),
                        f" It came from {came_from}." if came_from else "",
                        extra={"node": self.node_id, "group": self.group, "type": xr.SHORT_NAMES[record.type_url],
                               "version": record.version})
        if step.responses:
            self._unwritten += [response.payload for response in step.responses]
            if self._writer is None:
                self._writer = self._loop.create_task(self._write_unwritten())
        # A step that responds leaves its response in flight: not settled, whatever else is.
        self._group_state.telemetry.handled(self.group, self.snapshot_changed, step, settled=not step.responses and
                                            not self._refresh_scheduled and self.protocol.settled())

    def snapshot_changed(self) -> None:
        """The cache's watcher, from any thread: one refresh per burst of snapshots."""
        if threading.get_ident() == self._loop_thread:
            self._schedule_refresh()
        else:
            self._loop.call_soon_threadsafe(self._schedule_refresh)

    async def flush(self, timeout: float) -> bool:
        """Take no more work. True once what was queued is written (or failed to be), False when
        that takes longer than `timeout` seconds."""
        self._closed = True
        if self._writer is None:
            return True
        done, _ = await asyncio.wait([self._writer], timeout=timeout)
        return bool(done)

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()

    def _schedule_refresh(self) -> None:
        if not self._refresh_scheduled and not self._closed:
            self._refresh_scheduled = True
            self._loop.call_soon(self._refresh)

    def _refresh(self) -> None:
        self._refresh_scheduled = False
        if not self._closed:
            self.handle(self.protocol.refresh())

    async def _write_unwritten(self) -> None:
        try:
            while self._unwritten:
                await self._context.write(self._unwritten.pop(0))
        except Exception as error:  # the stream is ending: its reading side sees that too and cleans up
            log.debug("Envoy %s: stopped writing to its stream (%r)", self.node_id, error)
        finally:
            self._writer = None


class XdsServer:
    """Serves a `ConfigWatcher` (usually a `SnapshotCache`) to Envoys over gRPC."""

    def __init__(self, cache: ConfigWatcher, *, address: str = "127.0.0.1:18000",
                 options: tuple[tuple[str, int], ...] = SERVER_OPTIONS, tls: ServerTls | None = None,
                 services: tuple[grpc.GenericRpcHandler, ...] = (),
                 insecure_private_keys_over_plaintext: bool = False,
                 describe: Callable[[str], str | None] | None = None):
        """`services`: more gRPC services on the same port (the metrics service Envoys push stats to).
        `describe(resource name)`: where a resource came from (an object, its file), for NACK log lines.
        Without mutual TLS (`tls` with a client CA), no secret with a private key is served, nor
        what needs one; `insecure_private_keys_over_plaintext` serves them anyway (a lab)."""
        self._cache = cache
        self._verifies_identity = tls is not None and tls.client_ca is not None
        self._trust_domain = tls.trust_domain if tls is not None else identity.DEFAULT_TRUST_DOMAIN
        self._keyless = not self._verifies_identity and not insecure_private_keys_over_plaintext
        self._describe = describe
        self._refusals_logged: set[tuple[str, str]] = set()
        self._left_out_logged: dict[str, object] = {}
        self._undecodable_logged: set[str] = set()
        self._services = services
        self._address = address
        self._options = options
        self._tls = tls
        self._server: grpc.aio.Server | None = None
        self._reading: set[asyncio.Task] = set()  # streams waiting for their next request
        self._open: set[asyncio.Task] = set()  # every stream, reading or writing what is left (half-closed)
        self._stopping = False
        self._flush_timeout = FLUSH_TIMEOUT
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0). Raises OSError,
        naming the address, when it cannot be bound."""
        _check_bindable(self._address)
        server = grpc.aio.server(options=self._options)
        server.add_generic_rpc_handlers([*self._handlers(), *self._services])
        try:
            if self._tls is not None:
                self.port = server.add_secure_port(self._address, self._tls.credentials())
            else:
                self.port = server.add_insecure_port(self._address)
        except RuntimeError:  # taken between the check and now: gRPC's message names no cause
            raise OSError(f"cannot listen for xDS on {self._address}: gRPC could not bind it (taken a moment ago?); "
                          "stop what holds it or choose another address") from None
        await server.start()
        self._server = server
        self._stopping, self._flush_timeout = False, FLUSH_TIMEOUT
        host = self._address.rpartition(":")[0]
        log.info("xDS server listening on %s:%d (%s)", host, self.port,
                 "plaintext" if self._tls is None else "mutual TLS" if self._tls.client_ca else "TLS")
        if self._keyless:
            log.info("xDS without mutual TLS: Envoys prove no identity, so no private key is served (listeners "
                     "and clusters whose TLS needs one are left out, everything else is served). Serve xDS over "
                     "mutual TLS (--xds-tls-cert, --xds-tls-key, --xds-client-ca; `controlplane certs` makes them)")
        elif not self._verifies_identity:
            log.warning("INSECURE: private keys are served over xDS without mutual TLS: any client that can reach "
                        "%s:%d and claims a node group gets its keys. For a lab only", host, self.port)
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        """Stop taking streams and end the open ones with UNAVAILABLE once what was queued for them
        is written (`grace` seconds at most). Their Envoys keep their configuration and reconnect:
        to another replica behind the same Service, or to this one when it is back."""
        if self._server is None:
            return
        started = time.monotonic()
        self._stopping = True
        self._flush_timeout = grace
        reading = list(self._reading)
        log.info("stopping: %d Envoy%s connected; ending their streams (they keep their configuration and "
                 "reconnect)", len(self._open), "" if len(self._open) == 1 else "s")
        for task in reading:
            task.cancel()
        if reading:
            await asyncio.wait(reading)
        # What is left of `grace`: a stream whose client reads nothing took all of it to flush, and
        # gRPC would wait as long again for that stuck call.
        await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        sotw, delta = _SOTW_REQUEST, _DELTA_REQUEST

        def stream(types: tuple[str, ...], is_delta: bool, transport: str):
            async def handle(_requests, context):  # read with context.read() (see _serve)
                await self._serve(context, delta if is_delta else sotw, types=types, delta=is_delta,
                                  transport=transport)
            return grpc.stream_stream_rpc_method_handler(handle)  # requests come as bytes: _serve parses them

        handlers = [grpc.method_handlers_generic_handler(ADS_SERVICE, {
            "StreamAggregatedResources": stream(xr.PUSH_ORDER, False, "ads"),
            "DeltaAggregatedResources": stream(xr.PUSH_ORDER, True, "ads-delta"),
        })]
        for service in _STANDALONE:
            handlers.append(grpc.method_handlers_generic_handler(service.name, {
                f"Stream{service.suffix}": stream((service.type_url,), False, service.suffix.lower()),
                f"Delta{service.suffix}": stream((service.type_url,), True, service.suffix.lower() + "-delta"),
                f"Fetch{service.suffix}": grpc.unary_unary_rpc_method_handler(
                    self._fetch_handler(service.type_url, sotw)),  # bytes: the handler parses them
            }))
        return handlers

    def _fetch_handler(self, type_url: str, parse: Callable[[bytes], discovery_pb2.DiscoveryRequest]):
        async def fetch(wire: bytes, context) -> bytes:
            try:
                request = parse(wire)
            except DecodeError as error:
                self._log_undecodable(context.peer(), f"it fetched with a request that is not a DiscoveryRequest "
                                                      f"({error})")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a DiscoveryRequest: {error}")
            try:
                group = await self._authorized_group(request.node, context, "fetch")
                resource_set = group.resources(type_url)
                if resource_set is None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"no snapshot yet for node group {group.name!r}")
                names = frozenset(request.resource_names) - {"*"}
                return resource_set.select(names or None).sotw_body
            finally:  # a fetch for a made-up node group leaves nothing behind
                self._cache.forget_if_unused(self._cache.node_group(request.node))
        return fetch

    async def _authorized_group(self, node, context, what: str) -> GroupState | KeylessGroup:
        """The node group `node` claims, as this connection may see it; PERMISSION_DENIED (the call
        ends) when the client certificate does not name it."""
        claimed = self._cache.node_group(node)
        if not self._verifies_identity:
            group = self._cache.group(claimed)
            if not self._keyless:
                return group
            view = KeylessGroup(group)
            self._log_left_out(view)
            return view
        peer = identity.peer_of(context.auth_context(), self._trust_domain)
        if peer.may_see(claimed):
            return self._cache.group(claimed)
        named = ", ".join(sorted(peer.groups)) if peer.groups else "none"
        message = (f"node group {claimed!r} is not this client's: its {peer.description} names node groups: {named} "
                   f"(URI SANs {identity.node_group_uri('<group>', self._trust_domain)}). Set node.cluster to one "
                   f"of them, or use a certificate issued for {claimed!r} (`controlplane certs`)")
        key = (peer.description, claimed)
        if key not in self._refusals_logged and len(self._refusals_logged) < LOGGED_REFUSALS:
            self._refusals_logged.add(key)
            log.warning("refused %s of Envoy %r from %s: %s", what, node.id, context.peer(), message)
        else:
            log.debug("refused %s of Envoy %r from %s: %s", what, node.id, context.peer(), message)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)  # raises: the call ends here

    def _log_undecodable(self, peer: str, why: str) -> None:
        """Once per client address (its port varies per connection), as refusals are: a client that
        repeats itself is not a log flood."""
        host = peer.rpartition(":")[0] or peer
        if host not in self._undecodable_logged and len(self._undecodable_logged) < LOGGED_REFUSALS:
            self._undecodable_logged.add(host)
            log.warning("a client at %s was refused before it named its node: %s", peer, why)
        else:
            log.debug("a client at %s was refused before it named its node: %s", peer, why)

    def _log_left_out(self, view: KeylessGroup) -> None:
        """Say once per node group and content what its Envoys do not get, and why."""
        keyless = view.keyless()
        if keyless is None or self._left_out_logged.get(view.name) == keyless.left_out:
            return
        self._left_out_logged[view.name] = keyless.left_out
        if keyless.left_out:
            parts = "; ".join(f"{xr.SHORT_NAMES[type_url]} {', '.join(names)}"
                              for type_url, names in sorted(keyless.left_out.items()))
            log.warning("node group %r: not served over xDS without mutual TLS, because their private keys would "
                        "travel to whoever asks: %s. Serve xDS over mutual TLS to serve them", view.name, parts)

    async def _serve(self, context, parse: Callable[[bytes], object], *, types: tuple[str, ...], delta: bool,
                     transport: str) -> None:
        if self._stopping:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(STOPPING)
            return
        stream: _Stream | None = None
        stop_watching = disconnect = None
        why, level = "it went away", logging.INFO
        task = asyncio.current_task()
        self._open.add(task)
        try:
            # Invariant: a task in _reading is suspended in `context.read()` (nothing else in the loop
            # awaits), so stop()'s cancellation lands there and nowhere else.
            self._reading.add(task)
            try:
                # context.read(), not `async for request in requests`: grpc.aio's request iterator is an
                # async generator whose frame holds the last request while it waits for the next, and
                # a State-of-the-World ACK repeats every subscribed name (100 names: ~9 KiB of upb
                # arena per stream, docs/benchmarks.md). Read this way, nothing holds it between requests.
                while (wire := await context.read()) is not grpc.aio.EOF:
                    request = parse(wire)  # here, not by gRPC: the protocol reads SotW names from the bytes
                    if stream is None:
                        group = await self._authorized_group(request.node, context, transport)
                        stream = _Stream(request.node, group, transport,
                                         StreamProtocol(group, delta=delta, types=types), context, self._describe)
                        disconnect = self._cache.connect(stream)
                        stop_watching = self._cache.watch(group.name, stream.snapshot_changed)
                        log.info("Envoy %s (node group %r) connected over %s", stream.node_id, group.name, transport,
                                 extra={"node": stream.node_id, "group": group.name})
                    stream.handle(stream.protocol.receive(request, now=time.time(), wire=wire))
                    # Not held while waiting for the next one: Envoy's first request carries its node, whose
                    # list of extensions makes it ~60 KB; kept, it would be most of a stream's memory.
                    request = wire = None
                # gRPC reads a client that stopped (killed, or its connection lost) as one that closed its
                # side: Envoy itself never closes its side of a stream it keeps.
                why = "its stream ended (the Envoy stopped, or closed its side of the stream)"
            except asyncio.CancelledError:
                if not self._stopping:
                    raise  # the client went away: gRPC cancels the call
                why = "the control plane is stopping"
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(STOPPING)
            except DecodeError as error:
                expected = "DeltaDiscoveryRequest" if delta else "DiscoveryRequest"
                why = f"it sent a request that is not a {expected} ({error}); its stream was ended"
                level = logging.WARNING
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(f"not a {expected}: {error}")
                if stream is None:
                    self._log_undecodable(context.peer(), why)
            finally:
                self._reading.discard(task)
            if stream is not None and not await stream.flush(self._flush_timeout):
                why = f"it read nothing for {self._flush_timeout:g}s while its stream was ending; dropped it"
                raise asyncio.CancelledError  # no status: it would collide with the stuck write
        except grpc.aio.AioRpcError:
            pass  # the connection broke: Envoy reconnects, and this stream ends like a closed one
        finally:
            self._open.discard(task)
            if stop_watching is not None:
                stop_watching()
            if disconnect is not None:
                disconnect()
            if stream is not None:
                stream.close()
                log.log(logging.DEBUG if self._stopping else level, "Envoy %s (node group %r) disconnected: %s",
                        stream.node_id, stream.group, why, extra={"node": stream.node_id, "group": stream.group})


_SOTW_REQUEST = discovery_pb2.DiscoveryRequest.FromString
_DELTA_REQUEST = discovery_pb2.DeltaDiscoveryRequest.FromString


def _check_bindable(address: str) -> None:
    """Raise OSError naming `address` when it cannot be bound, before gRPC tries: gRPC's own error
    says only "Failed to bind", and its C core logs a line of its own. Binds as gRPC does
    (SO_REUSEADDR), so a port left in TIME_WAIT by a previous run counts as free."""
    host, _, port = address.rpartition(":")
    try:
        candidates = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)
    except (socket.gaierror, ValueError) as error:
        raise OSError(f"cannot listen for xDS on {address}: {error}; give HOST:PORT with a host of this machine "
                      "(0.0.0.0 for all)") from None
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                raise OSError(f"cannot listen for xDS on {address}: {error.strerror}; "
                              f"{_BIND_HINTS.get(error.errno, 'choose another address')}") from None


_BIND_HINTS = {
    errno.EADDRINUSE: "another process listens there (another controlplane serve?): stop it or choose another port",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address: use one it has, or 0.0.0.0",
    errno.EACCES: "ports below 1024 need privileges: choose a port above 1024",
}
