"""The deployment in k8s/: least-privilege RBAC for what the source really watches, probes the
binary really serves, and an Envoy bootstrap that is the generated one."""

from __future__ import annotations

from pathlib import Path

import yaml

from controlplane.sources.kubernetes import WATCHED

K8S = Path(__file__).resolve().parent.parent / "k8s"


def objects(relative: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / relative).read_text()) if doc]


def find(relative: str, kind: str, name: str | None = None) -> dict:
    return next(o for o in objects(relative) if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_rbac_allows_exactly_what_the_control_plane_does():
    cluster_rules = granted(find("controlplane/rbac.yaml", "ClusterRole")["rules"])
    watched = {(kind.group, kind.plural, verb) for kind in WATCHED for verb in ("list", "watch")}
    status = {("xds.controlplane.dev", f"{plural}/status", "patch") for plural in ("gateways", "backends")}
    events = {("", "events", "create")}  # runtime/events.py: refused Secret rotations, on their Gateway or Backend
    assert cluster_rules == watched | status | events
    lease_rules = granted(find("controlplane/rbac.yaml", "Role")["rules"])
    assert lease_rules == {("coordination.k8s.io", "leases", verb) for verb in ("get", "list", "create", "update", "delete")}
    assert not any("*" in part for rule in cluster_rules | lease_rules for part in rule)


def test_control_plane_deployment_is_highly_available_and_probed():
    deployment = find("controlplane/deployment.yaml", "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["serve", "--source", "kubernetes"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {e["name"] for e in container["env"]} == {"POD_NAME", "POD_NAMESPACE"}
    assert "limits" in container["resources"] and "requests" in container["resources"]
    assert find("controlplane/deployment.yaml", "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_gateway_bootstrap_is_the_generated_one():
    configmap = find("gateway/envoy.yaml", "ConfigMap", "envoy-bootstrap")
    generated = (K8S.parent / "envoy" / "bootstrap-ads.yaml").read_text()
    assert configmap["data"]["bootstrap.yaml"] == generated  # and that file passes `envoy --mode validate`
    node = yaml.safe_load(generated)["node"]
    assert node["cluster"] == find("examples/echo.yaml", "Gateway")["spec"]["nodeCluster"]


def test_example_objects_are_accepted_by_translation():
    from controlplane.sources.store import Store
    from controlplane.translate import to_ir
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "shop"},
               "spec": {"ports": [{"name": "http", "port": 80}]}}
    example = [o for o in objects("examples/echo.yaml") if o["kind"] in ("Gateway", "Backend")] + [service]
    translation = to_ir.translate(Store(example).view())
    assert {str(k): c[0].status for k, c in translation.conditions.items()} == {
        "Gateway shop/edge": "True", "Backend shop/echo": "True"}
