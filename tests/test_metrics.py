"""Metrics a Prometheus alert can use, computed from the status view and the last translation."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

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
