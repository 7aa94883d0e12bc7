"""The xDS stream over mutual TLS: it carries private keys (SDS), so it must not be plaintext."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from controlplane.translate.bootstrap import XdsClientTls
from controlplane.xds import SnapshotCache, XdsServer
from controlplane.xds.server_tls import ServerTls
from tests.certs import issue
from tests.harness import Envoy, eventually, free_port
from tests.test_envoy_tls import der, presented_certificate
from tests.test_envoy_xds import GROUP, body_of, web_snapshot

pytestmark = pytest.mark.envoy


def files(directory, **pems: bytes) -> dict:
    directory.mkdir(exist_ok=True)
    for name, pem in pems.items():
        (directory / f"{name}.pem").write_bytes(pem)
    return {name: directory / f"{name}.pem" for name in pems}


async def test_envoy_gets_its_configuration_over_mutual_tls_and_the_server_certificate_rotates(
        backends, tmp_path):
    authority = issue("xDS CA", ca=True)
    server_cert = issue("localhost", issuer=authority)
    envoy_cert = issue("gateway-envoy", issuer=authority, client=True)
    paths = files(tmp_path / "pki", ca=authority.cert_pem, cert=server_cert.cert_pem, key=server_cert.key_pem,
                  envoy_cert=envoy_cert.cert_pem, envoy_key=envoy_cert.key_pem)
    api = backends("api")
    port, xds_port = free_port(), free_port()
    cache = SnapshotCache()
    server = XdsServer(cache, address=f"127.0.0.1:{xds_port}",
                       tls=ServerTls(paths["cert"], paths["key"], client_ca=paths["ca"]))
    await server.start()
    started = []
    try:
        cache.set_snapshot(GROUP, web_snapshot(port, {"api": [api.address]}))
        with_certificate = XdsClientTls(str(paths["ca"]), str(paths["envoy_cert"]), str(paths["envoy_key"]))
        started.append(Envoy(tmp_path, xds_port=xds_port, node_cluster=GROUP, delta=False, node_id="envoy-tls",
                             xds_tls=with_certificate))
        assert await eventually(lambda: body_of(port), what="traffic configured over mutual TLS") == "api"

        without = Envoy(tmp_path, xds_port=xds_port, node_cluster=GROUP, delta=False, node_id="envoy-anonymous",
                        xds_tls=XdsClientTls(str(paths["ca"])))
        started.append(without)
        await asyncio.sleep(2)
        assert [s.node_id for s in cache.status()] == ["envoy-tls"]  # no client certificate: no configuration

        context = ssl.create_default_context(cafile=str(paths["ca"]))
        context.load_cert_chain(str(paths["envoy_cert"]), str(paths["envoy_key"]))
        context.set_alpn_protocols(["h2"])
        assert await presented_certificate(xds_port, context) == der(server_cert)
        renewed = issue("localhost", issuer=authority)
        paths["key"].write_bytes(renewed.key_pem)
        paths["cert"].write_bytes(renewed.cert_pem)
        assert await eventually(lambda: _presents(xds_port, context, der(renewed)),
                                what="new connections to get the rotated certificate")
        assert await body_of(port) == "api"
    finally:
        for envoy in started:
            await envoy.close()
        await server.stop(0)


async def _presents(port: int, context: ssl.SSLContext, expected: bytes) -> bool:
    return await presented_certificate(port, context) == expected
