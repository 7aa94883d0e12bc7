"""The deployment in k8s/: least-privilege RBAC for what the source really watches, probes the
binary really serves, and an Envoy bootstrap that is the generated one."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from controlplane.sources.kubernetes import WATCHED
from tests.harness import assert_envoy_accepts

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


GATEWAY_BOOTSTRAP = ["bootstrap", "--xds-address", "controlplane.controlplane-system.svc:18000", "--node-cluster",
                     "gateway", "--node-id", "gateway", "--stats-port", "9902", "--xds-ca", "/etc/xds/ca.crt",
                     "--xds-client-cert", "/etc/xds/tls.crt", "--xds-client-key", "/etc/xds/tls.key"]


def test_gateway_bootstrap_is_the_generated_one(capsys):
    from controlplane import cli
    configmap = find("gateway/envoy.yaml", "ConfigMap", "envoy-bootstrap")
    assert cli.main(GATEWAY_BOOTSTRAP) == 0
    generated = capsys.readouterr().out
    assert configmap["data"]["bootstrap.yaml"] == generated, (
        f"k8s/gateway/envoy.yaml's bootstrap drifted: regenerate it with `controlplane {' '.join(GATEWAY_BOOTSTRAP)}`")
    node = yaml.safe_load(generated)["node"]
    assert node["cluster"] == find("examples/echo.yaml", "Gateway")["spec"]["nodeCluster"]


def certs_job_args() -> argparse.Namespace:
    from controlplane import certs
    job = find("controlplane/certs-job.yaml", "Job")
    parser = argparse.ArgumentParser()
    certs.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])


def test_xds_runs_over_mutual_tls_with_the_secrets_the_certs_job_writes():
    """The control plane requires client certificates; the gateway's Envoys present the one issued for
    their node group, and trust a server certificate that names the host their bootstrap dials."""
    from controlplane import certs
    args = certs_job_args()
    assert args.command == "certs" and args.kubernetes
    server = find("controlplane/deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    served = _mounted_secret(server, server["containers"][0]["args"][server["containers"][0]["args"].index(
        "--xds-client-ca") + 1])
    assert served == certs.SERVER_SECRET
    assert "--xds-tls-cert" in server["containers"][0]["args"] and "--xds-tls-key" in server["containers"][0]["args"]

    gateway = find("gateway/envoy.yaml", "Deployment")["spec"]["template"]["spec"]
    node_cluster = find("examples/echo.yaml", "Gateway")["spec"]["nodeCluster"]
    assert _mounted_secret(gateway, "/etc/xds/tls.crt") == certs.CLIENT_SECRET_PREFIX + node_cluster
    assert node_cluster in args.node_cluster and args.gateway_namespace == "controlplane-system"
    dialed = GATEWAY_BOOTSTRAP[GATEWAY_BOOTSTRAP.index("--xds-address") + 1].rpartition(":")[0]
    assert dialed in certs.service_names(args)

    written = {certs.CA_SECRET, certs.SERVER_SECRET, *(certs.CLIENT_SECRET_PREFIX + g for g in args.node_cluster)}
    rules = find("controlplane/certs-job.yaml", "Role")["rules"]
    assert {name for rule in rules if "update" in rule["verbs"] for name in rule["resourceNames"]} == written
    assert all(rule["resources"] == ["secrets"] for rule in rules)


def _mounted_secret(pod: dict, path: str) -> str:
    """The Secret whose volume is mounted where `path` lies."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in pod["containers"][0].get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return volumes[mount["name"]]["secret"]["secretName"]
    raise AssertionError(f"nothing is mounted where {path} lies")


@pytest.mark.envoy
def test_gateway_bootstrap_with_the_certs_jobs_files_is_valid_for_envoy(tmp_path):
    from controlplane.runtime import xds_certificates as pki
    ca = pki.new_ca()
    client = pki.client_certificate(ca, "gateway")
    for name, pem in {"ca.crt": ca.cert, "tls.crt": client.cert, "tls.key": client.key}.items():
        (tmp_path / name).write_bytes(pem)
    bootstrap = find("gateway/envoy.yaml", "ConfigMap", "envoy-bootstrap")["data"]["bootstrap.yaml"]
    assert_envoy_accepts(bootstrap.replace("/etc/xds/", f"{tmp_path}/"), tmp_path)


def test_example_objects_are_accepted_by_translation():
    from controlplane.sources.store import Store
    from controlplane.translate import to_ir
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "shop"},
               "spec": {"ports": [{"name": "http", "port": 80}]}}
    example = [o for o in objects("examples/echo.yaml") if o["kind"] in ("Gateway", "Backend")] + [service]
    translation = to_ir.translate(Store(example).view())
    assert {str(k): c[0].status for k, c in translation.conditions.items()} == {
        "Gateway shop/edge": "True", "Backend shop/echo": "True"}
