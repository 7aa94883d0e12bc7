"""The xDS stream over mutual TLS, with what `controlplane certs` wrote, and a real Envoy.

It carries private keys (SDS), so an Envoy gets its own node group's secrets, proven by the
client certificate `certs` issued for that group, and no other group's; over plaintext it gets
no key at all, and what needs no key keeps working.
"""

from __future__ import annotations

import argparse
import logging
import ssl

import pytest

from controlplane import certs
from controlplane.translate import builders as b
from controlplane.translate.bootstrap import XdsClientTls
from controlplane.xds import Snapshot, SnapshotCache, XdsServer
from controlplane.xds.server_tls import ServerTls
from tests.certs import issue
from tests.harness import Envoy, eventually, free_port
from tests.test_envoy_tls import https_body, presented_certificate
from tests.test_envoy_xds import body_of

pytestmark = pytest.mark.envoy

LISTENER_CA = issue("listener CA", ca=True)


def certs_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    certs.add_parser(parser.add_subparsers(dest="command"))
    return certs.run(parser.parse_args(["certs", *argv]))


def gateway_snapshot(group: str, *, https_port: int, http_port: int, upstream) -> Snapshot:
    """An HTTPS listener (its certificate and key over SDS) and a plain HTTP one, both to `upstream`."""
    served = issue("localhost", issuer=LISTENER_CA)
    return Snapshot(
        clusters=[b.eds_cluster("api")], endpoints=[b.load_assignment("api", [upstream.address])],
        listeners=[b.http_listener("https", address="127.0.0.1", port=https_port, route_config_name="all",
                                   transport_socket=b.downstream_tls(f"{group}-cert")),
                   b.http_listener("http", address="127.0.0.1", port=http_port, route_config_name="all")],
        routes=[b.route_configuration("all", [b.virtual_host("all", [b.route("api", prefix="/")])])],
        secrets=[b.certificate_secret(f"{group}-cert", served.cert_pem, served.key_pem)])


def listener_client(tmp_path) -> ssl.SSLContext:
    (tmp_path / "listener-ca.pem").write_bytes(LISTENER_CA.cert_pem)
    return ssl.create_default_context(cafile=str(tmp_path / "listener-ca.pem"))


async def test_envoy_over_mutual_tls_with_the_certificates_certs_made_gets_its_own_group_only(backends, tmp_path,
                                                                                              caplog):
    caplog.set_level(logging.WARNING, logger="controlplane.xds.server")
    pki = tmp_path / "pki"
    assert certs_command("--output", str(pki), "--node-cluster", "edge", "--node-cluster", "other",
                         "--server-name", "127.0.0.1") == 0
    api = backends("api")
    ports = {name: free_port() for name in ("edge-https", "edge-http", "other-https", "other-http")}
    cache = SnapshotCache()
    for group in ("edge", "other"):
        cache.set_snapshot(group, gateway_snapshot(group, https_port=ports[f"{group}-https"],
                                                   http_port=ports[f"{group}-http"], upstream=api))
    server = XdsServer(cache, address="127.0.0.1:0",
                       tls=ServerTls(pki / "server/tls.crt", pki / "server/tls.key", client_ca=pki / "server/ca.crt"))
    await server.start()
    edge_identity = XdsClientTls(str(pki / "node-groups/edge/ca.crt"), str(pki / "node-groups/edge/tls.crt"),
                                 str(pki / "node-groups/edge/tls.key"))
    started = []
    try:
        envoy = Envoy(tmp_path, xds_port=server.port, node_cluster="edge", delta=False, node_id="edge-1",
                      xds_tls=edge_identity)
        started.append(envoy)
        verify = listener_client(tmp_path)
        assert await eventually(lambda: https_body(ports["edge-https"], verify), what="HTTPS through Envoy") == "api"
        assert await secret_names(envoy) == {"edge-cert"}

        # The same certificate claiming the other group: refused, so that Envoy gets nothing at all.
        claiming = Envoy(tmp_path, xds_port=server.port, node_cluster="other", delta=True, node_id="edge-claims-other",
                         xds_tls=edge_identity)
        started.append(claiming)
        await eventually(lambda: _true("refused ads-delta of Envoy 'edge-claims-other'" in caplog.text),
                         what="the server to refuse the claim")
        assert await secret_names(claiming) == set() and await claiming.dynamic_names("listeners") == set()
        assert await https_body(ports["other-https"], verify) is None
        assert [s.node_id for s in cache.status()] == ["edge-1"]

        # Run again: new server and client certificates from the same CA; new handshakes use them.
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "node-groups/edge/tls.crt"), str(pki / "node-groups/edge/tls.key"))
        context.set_alpn_protocols(["h2"])
        before = await presented_certificate(server.port, context)
        ca_before = (pki / "ca.crt").read_bytes()
        assert certs_command("--output", str(pki), "--node-cluster", "edge", "--node-cluster", "other",
                             "--server-name", "127.0.0.1") == 0
        assert (pki / "ca.crt").read_bytes() == ca_before
        renewed = (pki / "server/tls.crt").read_bytes()
        assert await eventually(lambda: _presents(server.port, context, renewed),
                                what="new connections to get the rotated server certificate")
        assert before != await presented_certificate(server.port, context)
        assert await https_body(ports["edge-https"], verify) == "api"  # the Envoy's stream was never cut
    finally:
        for envoy in started:
            await envoy.close()
        await server.stop(0)


async def test_plaintext_xds_serves_no_key_and_what_needs_none_keeps_working(backends, tmp_path):
    api = backends("api")
    https_port, http_port = free_port(), free_port()
    cache = SnapshotCache()
    cache.set_snapshot("edge", gateway_snapshot("edge", https_port=https_port, http_port=http_port, upstream=api))
    server = XdsServer(cache, address="127.0.0.1:0")
    await server.start()
    envoy = Envoy(tmp_path, xds_port=server.port, node_cluster="edge", delta=False, node_id="edge-plain")
    try:
        assert await eventually(lambda: body_of(http_port), what="plain HTTP through Envoy") == "api"
        assert await envoy.dynamic_names("listeners") == {"http"}  # the HTTPS listener left out, not half there
        assert await secret_names(envoy) == set()
        assert await https_body(https_port, listener_client(tmp_path)) is None
        assert await envoy.stat("listener_manager.lds.update_rejected") == 0  # nothing Envoy had to refuse
    finally:
        await envoy.close()
        await server.stop(0)


async def secret_names(envoy: Envoy) -> set[str]:
    dump = await envoy.config_dump()
    section = next((c for c in dump["configs"] if c["@type"].endswith("SecretsConfigDump")), {})
    return {item["name"] for item in section.get("dynamic_active_secrets", [])}


async def _true(value: bool) -> bool:
    return value


async def _presents(port: int, context: ssl.SSLContext, expected_pem: bytes) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    expected = x509.load_pem_x509_certificate(expected_pem).public_bytes(serialization.Encoding.DER)
    return await presented_certificate(port, context) == expected
