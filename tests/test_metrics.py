"""Metrics a Prometheus alert can use, computed from the status view and the last translation."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString

from controlplane.runtime.metrics import ControlPlaneCollector
from controlplane.sources.store import Store
from controlplane.translate import to_ir
from controlplane.xds import CLUSTER, LISTENER, EnvoyStatus, NackRecord, TypeStatus
from tests.objects import app, backend, gateway


class FakeCache:
    def __init__(self, statuses):
        self.statuses = statuses

    def status(self):
        return self.statuses


def scrape(statuses, translation) -> str:
    registry = CollectorRegistry()
    registry.register(ControlPlaneCollector(FakeCache(statuses), lambda: translation))
    return generate_latest(registry).decode()


def test_connected_rejecting_and_not_accepted():
    nack = NackRecord(LISTENER, "v2", ("shop/edge/http",), "cannot bind", 0.0)
    statuses = [
        EnvoyStatus("e1", "edge", 0, "ads", {CLUSTER: TypeStatus("v1", "v1"), LISTENER: TypeStatus("v2", "v1", nack)}),
        EnvoyStatus("e2", "edge", 0, "ads", {CLUSTER: TypeStatus("v1", "v1"), LISTENER: TypeStatus("v3", "v3", nack)}),
    ]
    translation = to_ir.translate(Store([gateway(), *app("api"), backend("ghost")]).view())
    text = scrape(statuses, translation)
    assert 'controlplane_xds_connected_envoys{node_group="edge"} 2.0' in text
    # e2's NACK was superseded by an accepted push: only e1 is rejecting now
    assert 'controlplane_xds_rejecting_envoys{node_group="edge",type="listeners"} 1.0' in text
    assert 'controlplane_objects_not_accepted{kind="Backend",reason="ServiceNotFound"} 1.0' in text


def test_budgets_and_refused_secret_rotations_are_there_for_alerts():
    from tests.certs import ca_secret, issue, tls_secret
    authority = issue("test CA", ca=True)
    client = issue("edge", issuer=authority, client=True)
    upstream_tls = {"caSecret": "endpoints-ca", "hostname": "api.shop.svc", "clientCertificateSecret": "edge-client"}
    store = Store([gateway(), *app("api", circuitBreakers={"default": {"maxConnections": 100}},
                                   websocket={"circuitBreakers": {"maxConnections": 5000}}, tls=upstream_tls),
                   ca_secret("endpoints-ca", authority.cert_pem), tls_secret("edge-client", client.cert_pem,
                                                                               client.key_pem)])
    translator = to_ir.Translator()
    text = scrape([], translator.translate(store.view(), now=time.time()))
    for series in ('{envoy_cluster_name="shop/api",priority="default",resource="cx"} 100.0',
                   '{envoy_cluster_name="shop/api",priority="default",resource="rq"} 1024.0',  # Envoy's default
                   '{envoy_cluster_name="shop/api/websocket",priority="default",resource="cx"} 5000.0'):
        assert "controlplane_circuit_breaker_limit" + series in text
    assert 'resource="retries"' not in text  # a retry budget by default: no fixed number of retries
    assert "controlplane_objects_unresolved_refs{" not in text
    expiry = 'controlplane_certificate_expiry_timestamp_seconds{namespace="shop",secret="%s",use="%s"} %s'
    ca_expiry = expiry % ("endpoints-ca", "ca", floatToGoString(authority.certificate.not_valid_after_utc.timestamp()))
    assert ca_expiry in text
    assert expiry % ("edge-client", "certificate",
                     floatToGoString(client.certificate.not_valid_after_utc.timestamp())) in text

    store.put(ca_secret("endpoints-ca", client.cert_pem))  # a rotation to something that is not a CA: refused
    text = scrape([], translator.translate(store.view(), now=time.time()))
    assert 'controlplane_objects_unresolved_refs{kind="Backend",reason="InvalidSecret"} 1.0' in text
    assert ca_expiry in text  # the kept version's expiry: it is what Envoys still serve
