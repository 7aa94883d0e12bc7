"""Status: Programmed from the Envoys' ACKs and NACKs, and one writer among replicas."""

from __future__ import annotations

from controlplane.runtime.leader import LeaderElection
from controlplane.runtime.status import with_programmed
from controlplane.sources.kube_api import KubeApi
from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import to_ir
from controlplane.xds import CLUSTER, LISTENER, EnvoyStatus, NackRecord, TypeStatus
from tests.kube_api_server import KubeAPIServer
from tests.objects import NS, app, gateway

API, WEB, EDGE = ObjectKey("Backend", NS, "api"), ObjectKey("Backend", NS, "web"), ObjectKey("Gateway", NS, "edge")


def translation():
    return to_ir.translate(Store([gateway(), *app("api"), *app("web", "10.0.0.2")]).view())


def envoy(node_id="e1", group="edge", **types: TypeStatus) -> EnvoyStatus:
    return EnvoyStatus(node_id=node_id, node_group=group, connected_since=0, transport="ads",
                       types={CLUSTER: types.get("clusters", TypeStatus("v1", "v1")),
                              LISTENER: types.get("listeners", TypeStatus("v1", "v1"))})


def programmed(envoys, key):
    condition = with_programmed(translation(), envoys)[key][2]
    return condition.status, condition.reason, condition.message


def test_no_envoy_connected_is_unknown():
    assert programmed([envoy(group="elsewhere")], API)[:2] == ("Unknown", "NoEnvoys")


def test_every_envoy_accepted_is_true():
    assert programmed([envoy("e1"), envoy("e2")], API) == (
        "True", "Programmed", "Accepted by 2 Envoy(s) of node cluster 'edge'.")


def test_a_push_in_flight_is_pending():
    assert programmed([envoy(clusters=TypeStatus("v2", "v1"))], API)[:2] == ("Unknown", "Pending")


def test_a_nack_marks_the_object_that_produced_the_rejected_resource_only():
    nack = NackRecord(CLUSTER, "v2", ("shop/api",), "cluster shop/api: bad circuit breaker", 0.0)
    envoys = [envoy(clusters=TypeStatus("v2", "v1", nack))]
    status, reason, message = programmed(envoys, API)
    assert (status, reason) == ("False", "Rejected")
    assert message.startswith("Envoy e1 rejected shop/api: cluster shop/api: bad circuit breaker.")
    assert programmed(envoys, WEB)[0] != "False"


def test_a_nack_superseded_by_a_newer_push_no_longer_counts():
    nack = NackRecord(LISTENER, "v2", ("shop/edge/http",), "port in use", 0.0)
    assert programmed([envoy(listeners=TypeStatus("v3", "v3", nack))], EDGE)[0] == "True"


def elector(api: KubeAPIServer, identity: str, clock) -> LeaderElection:
    return LeaderElection(KubeApi(api.client()), namespace="controlplane", identity=identity, lease_duration=15,
                          clock=clock)


def test_one_leader_takeover_on_expiry_and_release(api):
    now = [1000.0]
    a, b = elector(api, "a", lambda: now[0]), elector(api, "b", lambda: now[0])
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    assert a.is_leader and not b.is_leader
    now[0] += 5
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()  # renewed: still a's
    now[0] += 16  # a stopped renewing: the Lease expires, and a no longer acts as leader
    assert not a.is_leader
    assert b.try_acquire_or_renew() and not a.try_acquire_or_renew()
    lease = api.get("Lease", "controlplane", "controlplane-status-writer")
    assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("b", 1)
    b.release()
    assert a.try_acquire_or_renew()  # released: no waiting for expiry
