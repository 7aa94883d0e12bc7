"""Envoy's Client Status Discovery Service (`envoy.service.status.v3`): what each connected Envoy
was sent and whether it accepted it, for standard xDS tools (istioctl-like clients, grpcurl).

Who may ask: the answer holds every Envoy's configuration. Over mutual TLS only the admin
identity, a client certificate with the URI SAN `spiffe://<trust domain>/admin` (`controlplane
certs` issues one), gets it; an Envoy's node-group certificate is refused. Without mutual TLS
(a lab, the demo) only a client on the same host (a loopback peer) is answered. Private keys are
redacted as Envoy's own /config_dump redacts them.

Per Envoy, one `GenericXdsConfig` per resource of each type it was sent: the version it was sent,
the resource (unless `exclude_resource_contents`), `config_status` SYNCED (ACKed), STALE (sent,
not ACKed yet), ERROR (the version sent was NACKed: `error_state` holds Envoy's message), and
`client_status` ACKED / NACKED / REQUESTED. A resource the Envoy rejected stays ERROR after
a later version is ACKed: the control plane holds it back (sends its last accepted version, or
none), so the Envoy does not run it. `node_matchers` select Envoys by node id (exact or
prefix; other matchers are refused with INVALID_ARGUMENT).
"""

from __future__ import annotations

import logging

import grpc
from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2, timestamp_pb2

from controlplane.xds import identity
from controlplane.xds.cache import EnvoyStatus, SnapshotCache
from controlplane.xds.resources import SECRET, parse, redacted

log = logging.getLogger(__name__)

SERVICE = "envoy.service.status.v3.ClientStatusDiscoveryService"


class CsdsService:
    """Register `handler()` on the xDS server (XdsServer(services=...))."""

    def __init__(self, cache: SnapshotCache, *, trust_domain: str = identity.DEFAULT_TRUST_DOMAIN):
        self._cache = cache
        self._trust_domain = trust_domain

    def handler(self) -> grpc.GenericRpcHandler:
        fetch = grpc.unary_unary_rpc_method_handler(
            self._fetch, request_deserializer=csds_pb2.ClientStatusRequest.FromString,
            response_serializer=csds_pb2.ClientStatusResponse.SerializeToString)
        stream = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=csds_pb2.ClientStatusRequest.FromString,
            response_serializer=csds_pb2.ClientStatusResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, {"FetchClientStatus": fetch,
                                                              "StreamClientStatus": stream})

    async def _fetch(self, request, context):
        await self._authorize(context)
        return await self._answer(request, context)

    async def _stream(self, requests, context):
        await self._authorize(context)
        async for request in requests:
            yield await self._answer(request, context)

    async def _authorize(self, context) -> None:
        peer = identity.peer_of(context.auth_context(), self._trust_domain)
        if peer is identity.ANONYMOUS:
            if not _loopback(context.peer()):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    "client status shows every Envoy's configuration: without mutual TLS it is "
                                    "answered to clients on the control plane's host only")
        elif not peer.admin:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"client status is for the admin identity "
                                f"({identity.admin_uri(self._trust_domain)}), not {peer.description}")

    async def _answer(self, request, context) -> csds_pb2.ClientStatusResponse:
        matches = []
        for matcher in request.node_matchers:
            if matcher.node_metadatas or matcher.node_id.WhichOneof("match_pattern") not in ("exact", "prefix", None):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "node_matchers: only node_id with exact or prefix is supported")
            matches.append(matcher.node_id)
        response = csds_pb2.ClientStatusResponse()
        for envoy in sorted(self._cache.status(), key=lambda e: (e.node_group, e.node_id)):
            if matches and not any(_matches(m, envoy.node_id) for m in matches):
                continue
            response.config.append(self._client_config(envoy, request.exclude_resource_contents))
        return response

    def _client_config(self, envoy: EnvoyStatus, exclude_contents: bool) -> csds_pb2.ClientConfig:
        config = csds_pb2.ClientConfig(node=base_pb2.Node(id=envoy.node_id, cluster=envoy.node_group))
        snapshot = self._cache.snapshot(envoy.node_group)
        for type_url, state in sorted(envoy.types.items()):
            if not state.version_sent or snapshot is None:
                continue
            nack = state.last_nack
            current = nack is not None and nack.version == state.version_sent
            held_back = self._cache.group(envoy.node_group).rejected(type_url)  # the group's Envoys rejected these
            for name, resource in snapshot.resources(type_url).resources.items():
                entry = config.generic_xds_configs.add(type_url=type_url, name=name, version_info=state.version_sent)
                named = nack is not None and name in nack.resource_names
                rejected = (current and (named or not nack.resource_names)) or (named and resource.version in held_back)
                if rejected:
                    entry.config_status = csds_pb2.ERROR
                    entry.client_status = dump_pb2.NACKED
                    entry.error_state.details = nack.message.strip()
                    entry.error_state.version_info = nack.version
                    entry.error_state.last_update_attempt.CopyFrom(timestamp_pb2.Timestamp(
                        seconds=int(nack.at), nanos=int((nack.at % 1) * 1e9)))
                elif state.version_acked == state.version_sent:
                    entry.config_status = csds_pb2.SYNCED
                    entry.client_status = dump_pb2.ACKED
                else:
                    entry.config_status = csds_pb2.STALE
                    entry.client_status = dump_pb2.REQUESTED
                if not exclude_contents:
                    message = resource.body if type_url != SECRET else \
                        redacted(parse(SECRET, resource.body)).SerializeToString()
                    entry.xds_config.CopyFrom(any_pb2.Any(type_url=type_url, value=message))
        return config


def _matches(matcher, node_id: str) -> bool:
    pattern = matcher.WhichOneof("match_pattern")
    if pattern == "exact":
        return node_id == matcher.exact
    if pattern == "prefix":
        return node_id.startswith(matcher.prefix)
    return True  # no node_id matcher given: every node


def _loopback(peer: str) -> bool:
    """gRPC's peer string: "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:..."."""
    return peer.startswith(("ipv4:127.", "ipv6:[::1]", "ipv6:%5B::1%5D", "unix:"))
