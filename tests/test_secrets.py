"""TLS Secrets are validated before any Envoy sees them; a bad rotation keeps the last valid one."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from controlplane.runtime.envoy_process import envoy_binary
from controlplane.runtime.fleet import summarize
from controlplane.runtime.status import with_programmed
from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import builders as b
from controlplane.translate import render, secrets, to_ir, to_xds
from controlplane.xds import (
    CLUSTER,
    SECRET,
    EnvoyStatus,
    NackRecord,
    Snapshot,
    TypeStatus,
)
from tests.certs import ca_secret, issue, tls_secret
from tests.harness import free_port
from tests.objects import NS, app, gateway

CA = issue("test CA", ca=True)
SERVER = issue("localhost", issuer=CA)
HTTPS = [{"name": "https", "port": 8443, "protocol": "HTTPS", "tls": {"certificateSecret": "edge-cert"}}]
MTLS = [{"name": "https", "port": 8443, "protocol": "HTTPS",
         "tls": {"certificateSecret": "edge-cert", "clientCaSecret": "clients"}}]


def conditions(translation, name="edge"):
    found = translation.conditions[ObjectKey("Gateway", NS, name)]
    return {c.type: (c.status, c.reason, c.message) for c in found}


def translate(*objects, now=None):
    return to_ir.translate(Store(list(objects)).view(), now=now or time.time())


def test_an_https_listener_gets_its_certificate_over_sds():
    result = translate(gateway(listeners=HTTPS), *app("api"), tls_secret("edge-cert", SERVER.cert_pem, SERVER.key_pem))
    assert conditions(result)["Accepted"][0] == "True"
    snapshot = to_xds.snapshot(result.groups["edge"])
    assert list(snapshot.resources(SECRET).resources) == ["shop/edge-cert/certificate"]


def test_mutual_tls_adds_the_client_ca():
    result = translate(gateway(listeners=MTLS), *app("api"), tls_secret("edge-cert", SERVER.cert_pem, SERVER.key_pem),
                       ca_secret("clients", CA.cert_pem))
    snapshot = to_xds.snapshot(result.groups["edge"])
    assert sorted(snapshot.resources(SECRET).resources) == ["shop/clients/ca", "shop/edge-cert/certificate"]


OTHER = issue("other")
EXPIRED = issue("localhost", issuer=CA, valid_days=1, starts_days_ago=3)
FUTURE = issue("localhost", issuer=CA, starts_days_ago=-2)
BAD_SECRETS = [
    ("missing", [], "Secret shop/edge-cert does not exist"),
    ("not a TLS secret", [tls_secret("edge-cert", SERVER.cert_pem, SERVER.key_pem, secret_type="Opaque")],
     "is of type 'Opaque': a certificate needs a kubernetes.io/tls Secret"),
    ("key of another certificate", [tls_secret("edge-cert", SERVER.cert_pem, OTHER.key_pem)],
     "tls.key does not match the certificate in tls.crt (subject CN=localhost)"),
    ("expired", [tls_secret("edge-cert", EXPIRED.cert_pem, EXPIRED.key_pem)], "the certificate in tls.crt expired on"),
    ("not yet valid", [tls_secret("edge-cert", FUTURE.cert_pem, FUTURE.key_pem)], "is not valid before"),
    ("not PEM", [tls_secret("edge-cert", b"hello", SERVER.key_pem)], "tls.crt holds no PEM certificate"),
    ("garbage key", [tls_secret("edge-cert", SERVER.cert_pem, b"-----BEGIN PRIVATE KEY-----\nx\n")],
     "tls.key is not a PEM private key"),
]


@pytest.mark.parametrize("secrets, message", [case[1:] for case in BAD_SECRETS], ids=[c[0] for c in BAD_SECRETS])
def test_a_bad_certificate_secret_refuses_its_gateway_only(secrets, message):
    other = gateway("plain", node_cluster="other", listeners=[{"name": "http", "port": 8080}])
    result = translate(gateway(listeners=HTTPS), other, *app("api"), *secrets)
    accepted, resolved = conditions(result)["Accepted"], conditions(result)["ResolvedRefs"]
    assert (accepted[0], accepted[1], resolved[0]) == ("False", "InvalidSecret", "False")
    assert message in accepted[2]
    assert "edge" not in result.groups and conditions(result, "plain")["Accepted"][0] == "True"


@pytest.mark.parametrize("ca_pem, message", [(SERVER.cert_pem, "which is not a CA certificate"),
                                             (b"", "has no ca.crt")])
def test_a_bad_client_ca_refuses_its_gateway(ca_pem, message):
    result = translate(gateway(listeners=MTLS), *app("api"), tls_secret("edge-cert", SERVER.cert_pem, SERVER.key_pem),
                       ca_secret("clients", ca_pem))
    assert message in conditions(result)["Accepted"][2]


def test_a_bad_rotation_keeps_the_last_valid_certificate_and_says_so():
    store = Store([gateway(listeners=HTTPS), *app("api"), tls_secret("edge-cert", SERVER.cert_pem, SERVER.key_pem)])
    translator = to_ir.Translator()
    first = to_xds.snapshot(translator.translate(store.view(), now=time.time()).groups["edge"])

    store.put(tls_secret("edge-cert", SERVER.cert_pem, OTHER.key_pem))  # rotated to a wrong key
    rotated = translator.translate(store.view(), now=time.time())
    assert conditions(rotated)["Accepted"][0] == "True"
    status, reason, message = conditions(rotated)["ResolvedRefs"]
    assert (status, reason) == ("False", "InvalidSecret")
    assert "tls.key does not match" in message and "Envoys keep the last valid version" in message
    kept = to_xds.snapshot(rotated.groups["edge"])
    assert kept.resources(SECRET).resources["shop/edge-cert/certificate"].version == \
        first.resources(SECRET).resources["shop/edge-cert/certificate"].version

    renewed = issue("localhost", issuer=CA)
    store.put(tls_secret("edge-cert", renewed.cert_pem, renewed.key_pem))  # fixed: the new one goes out
    fixed = translator.translate(store.view(), now=time.time())
    assert conditions(fixed)["ResolvedRefs"][0] == "True"
    assert to_xds.snapshot(fixed.groups["edge"]).resources(SECRET).resources[
        "shop/edge-cert/certificate"].version != first.resources(SECRET).resources["shop/edge-cert/certificate"].version


def test_expiry_is_checked_at_every_translation_not_only_when_the_secret_changes():
    short = issue("localhost", issuer=CA, valid_days=3, starts_days_ago=1)  # expires in two days
    store = Store([gateway(listeners=HTTPS), *app("api"), tls_secret("edge-cert", short.cert_pem, short.key_pem)])
    translator = to_ir.Translator()
    assert conditions(translator.translate(store.view(), now=time.time()))["Accepted"][0] == "True"
    later = translator.translate(store.view(), now=time.time() + 3 * 86400)
    assert conditions(later)["Accepted"][:2] == ("False", "InvalidSecret")  # no valid version left to keep
    assert "expired on" in conditions(later)["Accepted"][2]


UPSTREAM = {"caSecret": "endpoints-ca", "hostname": "api.shop.svc", "clientCertificateSecret": "edge-client"}
CLIENT = issue("edge gateway", issuer=CA, client=True)


def backend_conditions(translation, name="api"):
    return {c.type: (c.status, c.reason, c.message) for c in translation.conditions[ObjectKey("Backend", NS, name)]}


def test_upstream_tls_sends_the_endpoints_ca_and_our_client_certificate_over_sds():
    result = translate(gateway(), *app("api", tls=UPSTREAM, websocket={}), ca_secret("endpoints-ca", CA.cert_pem),
                       tls_secret("edge-client", CLIENT.cert_pem, CLIENT.key_pem))
    snapshot = to_xds.snapshot(result.groups["edge"])
    assert sorted(snapshot.resources(SECRET).resources) == ["shop/edge-client/certificate", "shop/endpoints-ca/ca"]
    for cluster in ("shop/api", "shop/api/websocket"):  # WebSockets reach the same endpoints over the same TLS
        assert sorted(snapshot.resources(CLUSTER).resources[cluster].referenced(SECRET)) == [
            "shop/edge-client/certificate", "shop/endpoints-ca/ca"]


@pytest.mark.parametrize("secrets, message", [
    ([tls_secret("edge-client", CLIENT.cert_pem, CLIENT.key_pem)], "Secret shop/endpoints-ca does not exist"),
    ([ca_secret("endpoints-ca", SERVER.cert_pem), tls_secret("edge-client", CLIENT.cert_pem, CLIENT.key_pem)],
     "which is not a CA certificate"),
    ([ca_secret("endpoints-ca", CA.cert_pem), tls_secret("edge-client", CLIENT.cert_pem, OTHER.key_pem)],
     "tls.key does not match the certificate"),
], ids=["missing CA", "CA that is not a CA", "client key of another certificate"])
def test_a_bad_upstream_tls_secret_refuses_its_backend_only(secrets, message):
    result = translate(gateway(), *app("api", tls=UPSTREAM), *app("plain", "10.0.0.2"), *secrets)
    accepted = backend_conditions(result)["Accepted"]
    assert accepted[:2] == ("False", "InvalidSecret") and message in accepted[2]
    assert backend_conditions(result, "plain")["Accepted"][0] == "True"
    assert [b.name for b in result.groups["edge"].backends] == ["shop/plain"]


ENVOY_KEY_KINDS = {
    "RSA 1024": lambda: rsa.generate_private_key(65537, 1024),
    "RSA 2048": lambda: rsa.generate_private_key(65537, 2048),
    "ECDSA P-256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ECDSA P-384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ECDSA P-521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ECDSA secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "Ed25519": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.envoy
@pytest.mark.parametrize("kind", list(ENVOY_KEY_KINDS))
def test_the_certificate_check_refuses_exactly_the_keys_envoy_cannot_load(kind, tmp_path):
    issued = issue("localhost", issuer=CA, key=ENVOY_KEY_KINDS[kind]())
    try:
        secrets.certificate(tls_secret("edge-cert", issued.cert_pem, issued.key_pem), where="shop/edge-cert",
                            name="edge-cert")
        we_serve_it = True
    except secrets.SecretProblem as problem:
        assert "which Envoy cannot load; issue one with an RSA key of 2048 bits or more" in str(problem)
        we_serve_it = False
    listener = b.http_listener("https", address="127.0.0.1", port=8443, route_config_name="https",
                               transport_socket=b.downstream_tls("edge-cert"))
    snapshot = Snapshot(listeners=[listener], routes=[b.route_configuration("https", [])],
                        secrets=[b.certificate_secret("edge-cert", issued.cert_pem, issued.key_pem)])
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(yaml.safe_dump(render.static_bootstrap(snapshot, admin_port=free_port())))
    validated = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(bootstrap)], capture_output=True,
                               text=True, timeout=60)
    assert we_serve_it == (validated.returncode == 0), validated.stdout[-500:]


def test_an_envoy_nack_of_a_secret_marks_the_object_that_uses_it():
    result = translate(gateway(listeners=HTTPS), *app("api", tls=UPSTREAM),
                       tls_secret("edge-cert", SERVER.cert_pem, SERVER.key_pem), ca_secret("endpoints-ca", CA.cert_pem),
                       tls_secret("edge-client", CLIENT.cert_pem, CLIENT.key_pem))
    assert result.origins["shop/edge-cert/certificate"] == ObjectKey("Gateway", NS, "edge")
    assert result.origins["shop/endpoints-ca/ca"] == ObjectKey("Backend", NS, "api")
    nack = NackRecord(SECRET, "v2", ("shop/endpoints-ca/ca",), "Failed to load trusted CA certificates", 0.0)
    rejecting = EnvoyStatus(node_id="e1", node_group="edge", connected_since=0, transport="ads",
                            types={SECRET: TypeStatus("v2", "v1", nack)})
    conditions = with_programmed(result, summarize([rejecting]))
    programmed = {key.kind: next(c for c in found if c.type == "Programmed") for key, found in conditions.items()}
    assert programmed["Backend"].status == "False"
    assert "rejected shop/endpoints-ca/ca: Failed to load trusted CA certificates" in programmed["Backend"].message
    assert programmed["Gateway"].status != "False"
