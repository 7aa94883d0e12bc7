"""TLS and mutual TLS through a real Envoy, with certificates over SDS, and rotations, good and bad."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest

from controlplane.sources.store import ObjectKey
from tests.certs import ca_secret, issue, tls_secret
from tests.harness import eventually, free_port, status_of, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

pytestmark = pytest.mark.envoy

CA = issue("test CA", ca=True)


def client_context(tmp_path, client=None) -> ssl.SSLContext:
    (tmp_path / "ca.pem").write_bytes(CA.cert_pem)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    if client is not None:
        (tmp_path / "client.pem").write_bytes(client.cert_pem + client.key_pem)
        context.load_cert_chain(str(tmp_path / "client.pem"))
    return context


async def https_body(port: int, context: ssl.SSLContext) -> str | None:
    try:
        async with httpx.AsyncClient(verify=context, timeout=2) as http:
            response = await http.get(f"https://127.0.0.1:{port}/")
        return response.text.strip() if response.status_code == 200 else f"HTTP {response.status_code}"
    except (httpx.HTTPError, ssl.SSLError, OSError):
        # TLS 1.3 reports "certificate required" after the handshake, on first read, as ssl.SSLError
        return None


async def presented_certificate(port: int, context: ssl.SSLContext) -> bytes | None:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    except (OSError, ssl.SSLError):
        return None
    certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return certificate


def der(issued) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return issued.certificate.public_bytes(serialization.Encoding.DER)


async def test_https_mutual_tls_and_rotations(served, envoys, backends, tmp_path):
    source, pipeline, server = served
    api = backends("api")
    https, mtls = free_port(), free_port()
    first = issue("localhost", issuer=CA)
    write(source.directory / "gateway.yaml", gateway(listeners=[
        {"name": "https", "port": https, "address": "127.0.0.1", "protocol": "HTTPS",
         "tls": {"certificateSecret": "edge-cert"}},
        {"name": "mtls", "port": mtls, "address": "127.0.0.1", "protocol": "HTTPS",
         "tls": {"certificateSecret": "edge-cert", "clientCaSecret": "agents"}}]))
    write(source.directory / "api.yaml", backend("api", routes=[{"pathPrefix": "/"}]), service("api"),
          endpoint_slice("api", [ready("127.0.0.1")], port=api.port))
    write(source.directory / "secrets.yaml", tls_secret("edge-cert", first.cert_pem, first.key_pem),
          ca_secret("agents", CA.cert_pem))
    envoys(server.port, node_cluster="edge")
    verify_only = client_context(tmp_path)
    assert await eventually(lambda: https_body(https, verify_only), what="HTTPS through Envoy") == "api"

    agent = issue("agent-7", issuer=CA, client=True)
    (tmp_path / "agent").mkdir()
    with_client_certificate = client_context(tmp_path / "agent", agent)
    assert await eventually(lambda: https_body(mtls, with_client_certificate),
                            what="mutual TLS with a client certificate") == "api"
    assert await https_body(mtls, verify_only) is None  # no client certificate: refused

    # A rotation to a wrong key: refused before Envoy; Envoy keeps presenting the valid certificate.
    write(source.directory / "secrets.yaml", tls_secret("edge-cert", first.cert_pem, issue("x").key_pem),
          ca_secret("agents", CA.cert_pem))
    await eventually(lambda: _resolved(pipeline) == "False", what="the Gateway to report the bad Secret")
    await asyncio.sleep(0.5)
    assert await https_body(https, verify_only) == "api"
    assert await presented_certificate(https, verify_only) == der(first)

    # A good rotation: Envoy presents the new certificate, without touching the listener.
    renewed = issue("localhost", issuer=CA)
    write(source.directory / "secrets.yaml", tls_secret("edge-cert", renewed.cert_pem, renewed.key_pem),
          ca_secret("agents", CA.cert_pem))
    assert await eventually(lambda: _presents(https, verify_only, der(renewed)), what="the renewed certificate")
    assert _resolved(pipeline) == "True"
    assert await https_body(mtls, with_client_certificate) == "api"


def _condition(pipeline, kind: str, name: str, condition: str):
    return next(c for c in pipeline.last.conditions[ObjectKey(kind, NS, name)] if c.type == condition)


def _resolved(pipeline, kind: str = "Gateway", name: str = "edge") -> str:
    return _condition(pipeline, kind, name, "ResolvedRefs").status


async def _presents(port: int, context: ssl.SSLContext, expected: bytes) -> bool:
    return await presented_certificate(port, context) == expected


async def test_upstream_tls_checks_the_endpoints_certificate_and_presents_ours(served, envoys, backends, tmp_path):
    source, pipeline, server = served
    endpoint_ca = issue("endpoints CA", ca=True)
    endpoint = issue("api.shop.svc", issuer=endpoint_ca, dns_names=("api.shop.svc",))
    (tmp_path / "endpoint.pem").write_bytes(endpoint.cert_pem + endpoint.key_pem)
    requires_our_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    requires_our_certificate.load_cert_chain(str(tmp_path / "endpoint.pem"))
    requires_our_certificate.load_verify_locations(cadata=CA.cert_pem.decode())
    requires_our_certificate.verify_mode = ssl.CERT_REQUIRED
    api = backends("api-over-tls", tls=requires_our_certificate)
    gateway_client = issue("edge gateway", issuer=CA, client=True)

    port = free_port()
    checked = {"caSecret": "endpoints-ca", "hostname": "api.shop.svc", "clientCertificateSecret": "edge-client"}
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", service("api"), endpoint_slice("api", [ready("127.0.0.1")], port=api.port),
          backend("api", routes=[{"pathPrefix": "/"}], tls=checked),
          backend("impostor", service="api", routes=[{"pathPrefix": "/impostor"}],
                  tls={**checked, "hostname": "payments.shop.svc"}),
          backend("anonymous", service="api", routes=[{"pathPrefix": "/anonymous"}],
                  tls={"caSecret": "endpoints-ca", "hostname": "api.shop.svc"}))
    write(source.directory / "secrets.yaml", ca_secret("endpoints-ca", endpoint_ca.cert_pem),
          tls_secret("edge-client", gateway_client.cert_pem, gateway_client.key_pem))
    envoy = envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port, "/"), what="traffic over upstream mutual TLS") == "api-over-tls"

    assert await status_of(port, "/impostor") == 503  # the endpoint's certificate does not name payments.shop.svc
    assert await status_of(port, "/anonymous") == 503  # no client certificate: the endpoint refuses Envoy
    stats = await envoy.stats()
    assert stats[f"cluster.{NS}/impostor.ssl.fail_verify_san"] >= 1
    assert stats[f"cluster.{NS}/api.ssl.handshake"] >= 1

    # A rotation of the endpoints' CA to something that is not a CA: refused, the last valid one is kept.
    write(source.directory / "secrets.yaml", ca_secret("endpoints-ca", endpoint.cert_pem),
          tls_secret("edge-client", gateway_client.cert_pem, gateway_client.key_pem))
    await eventually(lambda: _resolved(pipeline, "Backend", "api") == "False", what="the Backend to report the CA")
    assert "not a CA certificate" in _condition(pipeline, "Backend", "api", "ResolvedRefs").message
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient(timeout=2) as fresh:  # a new connection: a new handshake, with the kept CA
        assert (await fresh.get(f"http://127.0.0.1:{port}/", headers={"connection": "close"})).text.strip() \
            == "api-over-tls"
