"""Status, leader election and fleet-wide `Programmed` against a real kube-apiserver (v1.36).

Every replica is the real `controlplane serve`, a subprocess authenticated as the ServiceAccount of
k8s/controlplane/rbac.yaml, so least privilege is tested as shipped. Envoys are real; these tests
read only what Envoy reports over xDS (ACK/NACK), so no network namespace is needed: the Gateway's
listener binds 127.0.0.1 and no traffic is sent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.runtime.envoy_process import stop_process
from tests.harness import eventually, free_port
from tests.objects import backend, endpoint_slice, gateway, ready, service

pytestmark = pytest.mark.envoy

API_VERSION = "xds.controlplane.dev/v1alpha1"
LEASE_DURATION = 15  # LeaderElection's default: a peer takes over once renewTime + 15 s has passed


class Replica:
    """`controlplane serve --source kubernetes` as pod `name` of the control plane's namespace."""

    def __init__(self, real_kube, namespace: str, workdir: Path, name: str):
        self.name, self.xds_port = name, free_port()
        self.log_path = workdir / f"serve-{name}.log"
        with self.log_path.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "controlplane.cli", "serve", "--source", "kubernetes",
                 "--kubeconfig", str(real_kube.kubeconfig("controlplane")), "--namespace", namespace,
                 "--xds-address", f"127.0.0.1:{self.xds_port}", "--metrics-address", ""],
                env={**os.environ, "POD_NAME": name, "POD_NAMESPACE": real_kube.controlplane_namespace},
                stdout=output, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def replicas(real_kube, kube_namespace, tmp_path, request):
    started: list[Replica] = []

    def start(name: str) -> Replica:
        replica = Replica(real_kube, kube_namespace, tmp_path, name)
        started.append(replica)
        return replica
    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for replica in started:
        stop_process(replica.process)
        if failed:
            print(f"\n----- serve log of {replica.name} -----\n{replica.log()[-4000:]}")


def apply_app(real_kube, namespace: str, *, port: int, routes=None, listeners=None) -> None:
    for manifest in (gateway(port=port, namespace=namespace, listeners=listeners), service("api", namespace=namespace),
                     endpoint_slice("api", [ready("192.0.2.10")], namespace=namespace),
                     backend("api", namespace=namespace, routes=routes or [{"pathPrefix": "/"}])):
        manifest["metadata"].pop("generation", None)
        real_kube.apply(manifest)


def conditions(real_kube, namespace: str, kind: str, name: str) -> dict[str, dict]:
    obj = real_kube.get(API_VERSION, kind, name, namespace=namespace)
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def condition(real_kube, namespace: str, kind: str, name: str, kind_of_condition: str) -> dict:
    return conditions(real_kube, namespace, kind, name).get(kind_of_condition) or {}


def lease_holder(real_kube) -> str:
    try:
        lease = real_kube.get("coordination.k8s.io/v1", "Lease", "controlplane-status-writer",
                              namespace=real_kube.controlplane_namespace)
    except Exception:  # noqa: BLE001 -- not created yet
        return ""
    return lease["spec"].get("holderIdentity") or ""


async def test_status_is_written_with_observed_generation_and_only_when_it_changes(real_kube, kube_namespace,
                                                                                   replicas):
    replicas("cp-a")
    apply_app(real_kube, kube_namespace, port=free_port())
    accepted = await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Accepted"),
                                timeout=30, what="the Backend's status")
    assert (accepted["status"], accepted["observedGeneration"]) == ("True", 1)
    assert condition(real_kube, kube_namespace, "Backend", "api", "Programmed")["reason"] == "NoEnvoys"

    changed = backend("api", namespace=kube_namespace, routes=[{"pathPrefix": "/v2"}])
    changed["metadata"].pop("generation")
    real_kube.apply(changed)  # generation 2
    await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Accepted").get(
        "observedGeneration") == 2, timeout=30, what="observedGeneration 2")
    again = condition(real_kube, kube_namespace, "Backend", "api", "Accepted")
    assert again["lastTransitionTime"] == accepted["lastTransitionTime"]  # still True: no transition


async def test_an_object_deleted_and_created_again_under_the_same_name_gets_its_status(real_kube, kube_namespace,
                                                                                       replicas):
    replicas("cp-a")
    apply_app(real_kube, kube_namespace, port=free_port())
    await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Accepted").get("status") == "True",
                     timeout=30, what="the first Backend's status")
    first_uid = real_kube.get(API_VERSION, "Backend", "api", namespace=kube_namespace)["metadata"]["uid"]
    real_kube.delete(API_VERSION, "Backend", "api", namespace=kube_namespace)
    again = backend("api", namespace=kube_namespace, routes=[{"pathPrefix": "/"}])
    again["metadata"].pop("generation")
    real_kube.create(again)
    recreated = real_kube.get(API_VERSION, "Backend", "api", namespace=kube_namespace)
    assert recreated["metadata"]["uid"] != first_uid and not recreated.get("status")
    accepted = await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Accepted"),
                                timeout=30, what="the recreated Backend's status")
    assert (accepted["status"], accepted["observedGeneration"]) == ("True", 1)


async def test_a_follower_takes_over_after_the_leader_is_killed_and_keeps_every_transition_time(
        real_kube, kube_namespace, replicas):
    leader = replicas("cp-a")
    await eventually(lambda: lease_holder(real_kube) == "cp-a", timeout=30, what="cp-a leads")
    follower = replicas("cp-b")
    apply_app(real_kube, kube_namespace, port=free_port())
    await eventually(lambda: len(conditions(real_kube, kube_namespace, "Backend", "api")) == 3, timeout=30,
                     what="the Backend's status from cp-a")
    await eventually(lambda: "controlplane-envoys-cp-b" in {
        lease["metadata"]["name"] for lease in real_kube.list("coordination.k8s.io/v1", "Lease",
                                                               namespace=real_kube.controlplane_namespace)},
        timeout=30, what="cp-b's Envoy record")
    await eventually(lambda: len(conditions(real_kube, kube_namespace, "Gateway", "edge")) == 3, timeout=30,
                     what="the Gateway's status from cp-a")
    before = conditions(real_kube, kube_namespace, "Backend", "api")
    gateway_before = real_kube.get(API_VERSION, "Gateway", "edge", namespace=kube_namespace)

    leader.process.send_signal(signal.SIGKILL)  # no release: cp-b waits for the Lease to expire
    await eventually(lambda: lease_holder(real_kube) == "cp-b", timeout=LEASE_DURATION + 5,
                     what="cp-b takes over within the Lease duration (and a renewal period)")
    await eventually(lambda: "now the status writer" in follower.log(), timeout=10, what="cp-b says it leads")

    # A change only the new leader can report: it has made its passes by the time this shows.
    changed = backend("api", namespace=kube_namespace, routes=[{"pathPrefix": "/v2"}])
    changed["metadata"].pop("generation")
    real_kube.apply(changed)
    await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Accepted").get(
        "observedGeneration") == 2, timeout=30, what="cp-b writes generation 2")
    after = conditions(real_kube, kube_namespace, "Backend", "api")
    for kind_of_condition, was in before.items():
        assert after[kind_of_condition]["status"] == was["status"]
        assert after[kind_of_condition]["lastTransitionTime"] == was["lastTransitionTime"], kind_of_condition
    # The Gateway did not change, nor did what its status says: the new leader did not write it at all.
    gateway_after = real_kube.get(API_VERSION, "Gateway", "edge", namespace=kube_namespace)
    assert gateway_after["metadata"]["resourceVersion"] == gateway_before["metadata"]["resourceVersion"]


async def test_programmed_counts_the_envoy_of_the_follower_and_reports_its_nack(
        real_kube, kube_namespace, replicas, envoys):
    replicas("cp-a")
    await eventually(lambda: lease_holder(real_kube) == "cp-a", timeout=30, what="cp-a leads")
    follower = replicas("cp-b")
    port = free_port()
    apply_app(real_kube, kube_namespace, port=port)
    await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Programmed").get(
        "reason") == "NoEnvoys", timeout=30, what="no Envoy anywhere yet")

    envoys(follower.xds_port, node_cluster="edge")  # the leader has no Envoy at all
    programmed = await eventually(lambda: (found := condition(real_kube, kube_namespace, "Backend", "api",
                                                              "Programmed")).get("status") == "True" and found,
                                  timeout=30, what="Programmed from the follower's Envoy")
    assert programmed["message"] == "Accepted by 1 Envoy(s) of node cluster 'edge'."

    # A second listener on a port something else holds: Envoy (on the follower) cannot bind it and NACKs.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        listeners = [{"name": "http", "port": port, "address": "127.0.0.1"},
                     {"name": "busy", "port": busy, "address": "127.0.0.1"}]
        changed = gateway(namespace=kube_namespace, listeners=listeners)
        changed["metadata"].pop("generation")
        real_kube.apply(changed)
        rejected = await eventually(lambda: (found := condition(real_kube, kube_namespace, "Gateway", "edge",
                                                                "Programmed")).get("status") == "False" and found,
                                    timeout=30, what="the follower's NACK on the Gateway")
    assert rejected["reason"] == "Rejected"
    assert "Envoy envoy-1, connected to replica cp-b, rejected" in rejected["message"], rejected["message"]
    assert rejected["observedGeneration"] == 2
    # The rejected listener is the Gateway's: the Backend is not blamed (Unknown while its Envoy rejects a push).
    assert condition(real_kube, kube_namespace, "Backend", "api", "Programmed")["status"] != "False"


async def test_sigterm_with_an_envoy_connected_exits_cleanly_without_a_traceback(real_kube, kube_namespace,
                                                                               replicas, envoys):
    replica = replicas("cp-a")
    apply_app(real_kube, kube_namespace, port=free_port())
    envoys(replica.xds_port, node_cluster="edge")
    await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Programmed").get(
        "status") == "True", timeout=30, what="the Envoy connected and programmed")
    replica.process.send_signal(signal.SIGTERM)
    assert replica.process.wait(timeout=30) == 0
    assert "Traceback" not in replica.log()
    assert not any(lease["metadata"]["name"] == "controlplane-envoys-cp-a" for lease in real_kube.list(
        "coordination.k8s.io/v1", "Lease", namespace=real_kube.controlplane_namespace))  # its record went with it
    holder = real_kube.get("coordination.k8s.io/v1", "Lease", "controlplane-status-writer",
                           namespace=real_kube.controlplane_namespace)["spec"].get("holderIdentity")
    assert not holder  # released: a peer takes over at once


async def test_the_api_servers_rbac_warm_up_after_a_restart_is_no_warning(real_kube, kube_namespace, replicas):
    replica = replicas("cp-a")
    apply_app(real_kube, kube_namespace, port=free_port())
    await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Accepted").get("status") == "True",
                     timeout=30, what="the first status")
    real_kube.restart_apiserver()  # it answers 403 to everyone for a moment while its RBAC cache loads
    changed = backend("api", namespace=kube_namespace, routes=[{"pathPrefix": "/v2"}])
    changed["metadata"].pop("generation")
    real_kube.apply(changed)
    await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Accepted").get(
        "observedGeneration") == 2, timeout=30, what="status written after the restart")
    assert "rbac.yaml" not in replica.log()


async def test_a_refused_secret_rotation_is_an_event_on_the_gateway(real_kube, kube_namespace, replicas):
    """As the shipped ServiceAccount: the leader posts a Warning Event on the Gateway whose Secret
    rotation was refused, naming the check; the good certificate keeps being served meanwhile."""
    from tests.certs import issue, tls_secret
    good = issue("edge.example")
    secret = tls_secret("edge-cert", good.cert_pem, good.key_pem, namespace=kube_namespace)
    real_kube.apply(secret)
    apply_app(real_kube, kube_namespace, port=free_port(), listeners=[
        {"name": "https", "port": free_port(), "address": "127.0.0.1", "protocol": "HTTPS",
         "tls": {"certificateSecret": "edge-cert"}}])
    replicas("replica-a")
    await eventually(lambda: condition(real_kube, kube_namespace, "Gateway", "edge", "Accepted").get("status") == "True",
                     timeout=30, what="the Gateway accepted")
    secret["data"]["tls.key"] = tls_secret("x", good.cert_pem, issue("other").key_pem)["data"]["tls.key"]
    real_kube.apply(secret)

    def refusal_events() -> list[dict]:
        return [event for event in real_kube.list("v1", "Event", namespace=kube_namespace)
                if event.get("reason") == "SecretRotationRefused"]
    events = await eventually(refusal_events, timeout=30, what="an Event for the refused rotation")
    event = events[0]
    assert event["type"] == "Warning" and event["involvedObject"]["kind"] == "Gateway"
    assert event["involvedObject"]["name"] == "edge" and event["involvedObject"]["uid"]
    assert f"Secret {kube_namespace}/edge-cert: rotation refused for Gateway {kube_namespace}/edge" in event["message"]
    assert "KeyMismatch" in event["message"] or "does not match" in event["message"]
    assert condition(real_kube, kube_namespace, "Gateway", "edge", "Accepted").get("status") == "True"


async def test_a_newer_backend_never_takes_the_routes_of_the_one_that_holds_them(real_kube, kube_namespace, replicas):
    """Issue #8 item 2 on a real API server: `aaa` sorts first but comes later; `api` keeps `/` and
    stays accepted, `aaa` is told who holds it and keeps its free route."""
    apply_app(real_kube, kube_namespace, port=free_port())
    replicas("replica-a")
    await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "api", "Accepted").get("status") == "True",
                     timeout=30, what="api accepted")
    for manifest in (service("aaa", namespace=kube_namespace),
                     backend("aaa", service="aaa", namespace=kube_namespace,
                             routes=[{"pathPrefix": "/"}, {"pathPrefix": "/aaa"}])):
        manifest["metadata"].pop("generation", None)
        real_kube.apply(manifest)
    newcomer = await eventually(lambda: condition(real_kube, kube_namespace, "Backend", "aaa", "Accepted") or None,
                                timeout=30, what="aaa's status")
    assert (newcomer["status"], newcomer["reason"]) == ("False", "RouteConflict")
    assert f"Backend {kube_namespace}/api already serves it" in newcomer["message"]
    assert "other routes are served" in newcomer["message"]
    assert condition(real_kube, kube_namespace, "Backend", "api", "Accepted")["status"] == "True"


async def test_a_gateway_wide_budget_is_shared_by_the_envoys_of_every_replica(real_kube, kube_namespace, replicas,
                                                                               envoys):
    first, second = replicas("cp-a"), replicas("cp-b")
    shared = backend("api", namespace=kube_namespace, routes=[{"pathPrefix": "/"}],
                     circuitBreakers={"default": {"scope": "Gateway", "maxConnections": 100}})
    for manifest in (gateway(port=free_port(), namespace=kube_namespace), service("api", namespace=kube_namespace),
                     endpoint_slice("api", [ready("192.0.2.10")], namespace=kube_namespace), shared):
        manifest["metadata"].pop("generation", None)
        real_kube.apply(manifest)
    key = f"circuit_breakers.{kube_namespace}/api.default.max_connections"

    async def limits(*fleet) -> list:
        return [(await envoy.admin.get("/runtime")).json()["entries"].get(key, {}).get("final_value")
                for envoy in fleet]

    one = envoys(first.xds_port, node_cluster="edge", node_id="envoy-a")
    assert await eventually(lambda: _is(limits(one), ["100"]), timeout=30, what="one Envoy: the whole budget")
    other = envoys(second.xds_port, node_cluster="edge", node_id="envoy-b")  # on the other replica
    # Each replica counts its own Envoy and the other's (from its Lease record): 50 each, not 100 each.
    assert await eventually(lambda: _is(limits(one, other), ["50", "50"]), timeout=30,
                            what="the two replicas' Envoys sharing the budget")

    def budgets() -> list:
        obj = real_kube.get(API_VERSION, "Backend", "api", namespace=kube_namespace)
        return (obj.get("status") or {}).get("budgets") or []
    default = {"cluster": f"{kube_namespace}/api", "priority": "Default", "scope": "Gateway", "readyEndpoints": 1,
               "envoys": 2, "maxConnections": 50}
    assert await eventually(lambda: default in budgets(), timeout=30, what="the computed budget in the status")


async def _is(awaitable, expected) -> bool:
    return await awaitable == expected


async def test_status_shows_the_envoys_of_every_replica_from_their_records(real_kube, kube_namespace, replicas,
                                                                           envoys, capsys):
    import json

    from controlplane import cli
    first, second = replicas("cp-a"), replicas("cp-b")
    apply_app(real_kube, kube_namespace, port=free_port())
    envoys(first.xds_port, node_cluster="edge", node_id="envoy-a")
    envoys(second.xds_port, node_cluster="edge", node_id="envoy-b")
    argv = ["status", "--kubeconfig", str(real_kube.kubeconfig("admin")), "--namespace",
            real_kube.controlplane_namespace]

    def rows() -> dict | None:
        code = cli.main([*argv, "--output", "json"])
        out, _err = capsys.readouterr()
        found = {row["node"]: row for replica in json.loads(out)["replicas"] for row in replica["rows"]}
        synced = all(entry["state"] == "SYNCED" for row in found.values() for short, entry in row["types"].items()
                     if short in ("CDS", "EDS", "LDS", "RDS"))
        return found if code == 0 and set(found) == {"envoy-a", "envoy-b"} and synced else None

    found = await eventually(rows, timeout=30, what="both replicas' Envoys in their records")

    def budgets_recorded() -> bool:  # each replica's Envoy pushes its stats (every 5 s): their budget use
        cli.main([*argv, "--output", "json"])
        replicas_seen = json.loads(capsys.readouterr()[0])["replicas"]
        return all(any(use["cluster"] == f"{kube_namespace}/api" and use["resource"] == "cx" and use["in_use"] == 0
                       for use in replica["budgets"]) for replica in replicas_seen) and len(replicas_seen) == 2
    await eventually(budgets_recorded, timeout=30, interval=1, what="both replicas' budget use in their records")
    assert (found["envoy-a"]["replica"], found["envoy-b"]["replica"]) == ("cp-a", "cp-b")
    assert cli.main(argv) == 0
    out, _err = capsys.readouterr()
    assert "2 Envoy(s) on 2 replica(s): 2 in sync, 0 not" in out, out
    api = f"{kube_namespace}/api"
    [api_row] = [fields for fields in map(str.split, out.splitlines())
                 if fields[:5] == ["edge", api, api, "api", "default"]]
    assert api_row[5] == "0/1024" and api_row[-1] == "2"  # Envoy's default limit; both replicas' Envoys
    # --node: what the live objects translate to for its group, keys redacted.
    assert cli.main([*argv, "--node", "envoy-b", "--output", "json"]) == 0
    shown = json.loads(capsys.readouterr()[0])
    assert shown["config"]["group"] == "edge" and "ListenersConfigDump" in json.dumps(shown["config"])
