"""Envoy's Client Status Discovery Service, read with the standard stub from xds-protos: every
connected Envoy (SotW and Delta), SYNCED or ERROR with Envoy's NACK message, node matchers, keys
redacted, and only the admin identity over mutual TLS (a node group's certificate is refused)."""

from __future__ import annotations

import socket

import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2, string_pb2

from controlplane.translate import builders as b
from controlplane.translate.bootstrap import XdsClientTls
from controlplane.xds import SnapshotCache, XdsServer
from controlplane.xds.csds import CsdsService
from controlplane.xds.resources import LISTENER, SECRET
from controlplane.xds.server_tls import ServerTls
from tests.harness import Envoy, eventually, free_port
from tests.test_envoy_xds import web_snapshot
from tests.test_envoy_xds_tls import certs_command

pytestmark = pytest.mark.envoy


def _client(pki, who: str, port: int):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(), private_key=(pki / who / "tls.key").read_bytes(),
        certificate_chain=(pki / who / "tls.crt").read_bytes())
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def test_csds_shows_every_envoy_and_its_nack_to_the_admin_only(backends, tmp_path):
    pki = tmp_path / "pki"
    assert certs_command("--output", str(pki), "--node-cluster", "edge", "--node-cluster", "other", "--admin",
                         "--server-name", "127.0.0.1") == 0
    api = backends("api")
    cache = SnapshotCache()
    key_pem = (pki / "node-groups/edge/tls.key").read_bytes()  # any key will do as the listener's
    edge = web_snapshot(free_port(), {"api": [api.address]}).replace(
        secrets=[b.certificate_secret("edge-cert", (pki / "node-groups/edge/tls.crt").read_bytes(), key_pem)])
    cache.set_snapshot("edge", edge)
    server = XdsServer(cache, address="127.0.0.1:0",
                       tls=ServerTls(pki / "server/tls.crt", pki / "server/tls.key", client_ca=pki / "server/ca.crt"),
                       services=(CsdsService(cache).handler(),))
    await server.start()
    started = []
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = b.http_listener("busy", address="127.0.0.1", port=taken.getsockname()[1], route_config_name="http")
        cache.set_snapshot("other", web_snapshot(free_port(), {"api": [api.address]}, extra_listeners=[busy]))
        for group, delta, node in (("edge", False, "edge-1"), ("other", True, "other-1")):
            identity = XdsClientTls(str(pki / f"node-groups/{group}/ca.crt"), str(pki / f"node-groups/{group}/tls.crt"),
                                    str(pki / f"node-groups/{group}/tls.key"))
            started.append(Envoy(tmp_path, xds_port=server.port, node_cluster=group, delta=delta, node_id=node,
                                 xds_tls=identity))

        async with _client(pki, "admin", server.port) as channel:
            stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)

            async def nacked() -> csds_pb2.ClientStatusResponse | None:
                response = await stub.FetchClientStatus(csds_pb2.ClientStatusRequest())
                states = {(c.node.id, x.type_url, x.name): x for c in response.config for x in c.generic_xds_configs}
                busy_state = states.get(("other-1", LISTENER, "busy"))
                return response if busy_state is not None and busy_state.config_status == csds_pb2.ERROR else None
            response = await eventually(nacked, what="both Envoys, the NACK as ERROR")

            configs = {config.node.id: config for config in response.config}
            assert set(configs) == {"edge-1", "other-1"}
            assert configs["other-1"].node.cluster == "other"
            entries = {(x.type_url, x.name): x for x in configs["other-1"].generic_xds_configs}
            rejected = entries[LISTENER, "busy"]
            assert rejected.client_status == dump_pb2.NACKED
            assert "cannot bind" in rejected.error_state.details
            edge_entries = {(x.type_url, x.name): x for x in configs["edge-1"].generic_xds_configs}
            assert edge_entries[LISTENER, "http"].config_status == csds_pb2.SYNCED
            # What Envoy reports for itself is what CSDS says it was sent.
            dump = await started[0].config_dump()
            listeners = next(c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump"))
            [http] = [item for item in listeners["dynamic_listeners"] if item["name"] == "http"]
            assert http["active_state"]["version_info"] == edge_entries[LISTENER, "http"].version_info
            # Keys are redacted wherever a secret was sent.
            for (type_url, _name), entry in edge_entries.items():
                assert key_pem not in entry.xds_config.value
                if type_url == SECRET:
                    secret = secret_pb2.Secret.FromString(entry.xds_config.value)
                    assert secret.tls_certificate.private_key.inline_bytes == b"[redacted]"

            only = csds_pb2.ClientStatusRequest(node_matchers=[node_pb2.NodeMatcher(
                node_id=string_pb2.StringMatcher(prefix="edge-"))])
            assert [c.node.id for c in (await stub.FetchClientStatus(only)).config] == ["edge-1"]
            regex = csds_pb2.ClientStatusRequest(node_matchers=[node_pb2.NodeMatcher(
                node_id=string_pb2.StringMatcher(suffix="-1"))])
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.FetchClientStatus(regex)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            streamed = [r async for r in stub.StreamClientStatus(iter([only]))]
            assert [c.node.id for r in streamed for c in r.config] == ["edge-1"]

        async with _client(pki, "node-groups/edge", server.port) as channel:  # an Envoy's identity: not the admin's
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel).FetchClientStatus(
                    csds_pb2.ClientStatusRequest())
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "admin identity" in refused.value.details()
    finally:
        taken.close()
        for envoy in started:
            await envoy.close()
        await server.stop(0)


async def test_without_mutual_tls_only_this_host_is_answered():
    cache = SnapshotCache()
    service = CsdsService(cache)

    class Context:
        def __init__(self, peer):
            self._peer = peer

        def auth_context(self):
            return {}

        def peer(self):
            return self._peer

        async def abort(self, code, details):
            raise PermissionError(code, details)

    await service._authorize(Context("ipv4:127.0.0.1:5000"))  # the same host: answered
    with pytest.raises(PermissionError, match="control plane's host only"):
        await service._authorize(Context("ipv4:10.0.0.7:5000"))
