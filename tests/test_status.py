"""Status: Programmed from the Envoys' ACKs and NACKs (on every replica), and one writer among replicas."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from controlplane.runtime.fleet import MAX_REJECTIONS, fleet, from_json, record_name, summarize, to_json
from controlplane.runtime.leader import LeaderElection, NamespaceUnknown, RbacWarmUp, own_namespace
from controlplane.runtime.status import with_programmed
from controlplane.runtime.pipeline import cancel
from controlplane.sources.kube_api import ApiError, KubeApi, timestamp
from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import to_ir
from controlplane.xds import CLUSTER, LISTENER, EnvoyStatus, NackRecord, TypeStatus
from tests.harness import eventually
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
    condition = with_programmed(translation(), summarize(envoys))[key][2]
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


def fleet_programmed(local, peers, key=API, serving="s1"):
    condition = with_programmed(translation(), fleet(local, peers, {"edge": serving}))[key][2]
    return condition.status, condition.reason, condition.message


def test_an_envoy_on_another_replica_counts_when_it_serves_the_same_snapshot():
    follower = summarize([envoy("e9")], {"edge": "s1"})
    assert fleet_programmed({}, [("replica-b", follower)]) == (
        "True", "Programmed", "Accepted by 1 Envoy(s) of node cluster 'edge'.")
    leader = summarize([envoy("e1")], {"edge": "s1"})
    assert fleet_programmed(leader, [("replica-b", follower)])[2] == "Accepted by 2 Envoy(s) of node cluster 'edge'."


def test_a_replica_serving_an_older_snapshot_keeps_the_object_pending():
    leader = summarize([envoy("e1")], {"edge": "s2"})
    behind = summarize([envoy("e9")], {"edge": "s1"})
    status, reason, message = fleet_programmed(leader, [("replica-b", behind)], serving="s2")
    assert (status, reason) == ("Unknown", "Pending")
    assert "replica-b" in message


def test_a_nack_on_another_replica_is_reported_with_the_replica_and_how_many_envoys():
    nack = NackRecord(CLUSTER, "v2", ("shop/api",), "cluster shop/api: bad circuit breaker", 0.0)
    rejecting = [envoy(f"e{n}", clusters=TypeStatus("v2", "v1", nack)) for n in range(3)]
    record = from_json(to_json(summarize(rejecting, {"edge": "s1"})))  # as the leader reads it back
    status, reason, message = fleet_programmed({}, [("replica-b", record)])
    assert (status, reason) == ("False", "Rejected")
    assert message.startswith("Envoy e0 (and 2 more), connected to replica replica-b, rejected shop/api: "
                              "cluster shop/api: bad circuit breaker.")
    assert fleet_programmed({}, [("replica-b", record)], WEB)[0] != "False"


def test_a_record_stays_small_whatever_its_envoys_reject():
    rejecting = [envoy(f"e{n}", clusters=TypeStatus("v2", "v1", NackRecord(CLUSTER, "v2", (f"shop/r{n}",), "x" * 5000,
                                                                           0.0))) for n in range(500)]
    record = to_json(summarize(rejecting, {"edge": "s1"}))
    assert len(record) < 20_000
    assert len(from_json(record)["edge"].rejections) == MAX_REJECTIONS
    assert from_json(record)["edge"].envoys == 500


def test_record_names_are_valid_lease_names():
    assert record_name("controlplane-7d9f-abcde") == "controlplane-envoys-controlplane-7d9f-abcde"
    assert record_name("My_Laptop.local-123") == "controlplane-envoys-my-laptop.local-123"


def test_the_lease_namespace_comes_from_the_flag_then_pod_namespace_then_the_service_account(tmp_path):
    account = tmp_path / "namespace"
    account.write_text("from-account\n")
    assert own_namespace("from-flag", {"POD_NAMESPACE": "from-env"}, account) == "from-flag"
    assert own_namespace(None, {"POD_NAMESPACE": "from-env"}, account) == "from-env"
    assert own_namespace(None, {}, account) == "from-account"
    with pytest.raises(NamespaceUnknown, match="pass --lease-namespace.*or set POD_NAMESPACE"):
        own_namespace(None, {}, tmp_path / "missing")


async def test_losing_leadership_is_one_log_line_saying_why(api, caplog):
    caplog.set_level(logging.INFO, logger="controlplane.runtime.leader")
    elector_a = LeaderElection(KubeApi(api.client()), namespace="controlplane", identity="a", lease_duration=15,
                               retry_period=0.05)
    running = asyncio.create_task(elector_a.run())
    try:
        await eventually(lambda: elector_a.is_leader, what="a leads")
        lease = api.get("Lease", "controlplane", "controlplane-status-writer")
        lease["spec"] = {**lease["spec"], "holderIdentity": "b", "renewTime": timestamp(time.time() + 60)}
        api.update(lease)  # b took it (as after a long pause of a)
        await eventually(lambda: not elector_a.is_leader, what="a steps down")
        await asyncio.sleep(0.2)  # a few more renewal attempts: still one line
    finally:
        await cancel([running])
    lines = [r.getMessage() for r in caplog.records if "status writer" in r.getMessage()]
    assert lines[0].startswith("now the status writer")
    assert lines[1:] == ["no longer the status writer: the Lease controlplane/controlplane-status-writer is held "
                         "by another replica; another replica writes status"]


def test_a_403_is_quiet_only_in_the_first_seconds_the_api_server_answers():
    now = [0.0]
    warm_up = RbacWarmUp(clock=lambda: now[0])
    forbidden = ApiError(403, "leases is forbidden")
    assert warm_up.quiet(forbidden)  # the first answer: RBAC may still be loading
    now[0] += 10
    assert not warm_up.quiet(forbidden)  # still forbidden: worth a warning (and the rbac.yaml hint)
    warm_up.quiet(ConnectionRefusedError())  # the API server goes away, then answers again
    now[0] += 1
    assert warm_up.quiet(forbidden)


def test_a_backends_status_shows_each_budget_as_each_envoy_runs_it():
    from controlplane.runtime.status import computed_budgets
    from tests.objects import backend, endpoint_slice, ready, service
    store = Store([gateway(), service("api"), endpoint_slice("api", [ready("10.0.0.1"), ready("10.0.0.2")]),
                   backend("api", circuitBreakers={"default": {"scope": "Gateway", "maxConnections": 100},
                                                   "high": {"perEndpoint": {"maxRequests": 30}}},
                           websocket={"circuitBreakers": {"maxConnections": 500}})])
    found = computed_budgets(to_ir.translate(store.view()), {"edge": 4})
    assert found[ObjectKey("Backend", NS, "api")] == [
        {"cluster": f"{NS}/api", "priority": "Default", "scope": "Gateway", "readyEndpoints": 2, "envoys": 4,
         "maxConnections": 25},
        {"cluster": f"{NS}/api", "priority": "High", "scope": "Envoy", "readyEndpoints": 2, "envoys": 1,
         "maxRequests": 60},
        {"cluster": f"{NS}/api/websocket", "priority": "Default", "scope": "Envoy", "readyEndpoints": 2, "envoys": 1,
         "maxConnections": 500}]
