"""`controlplane certs`: what it writes, what a re-run keeps and rotates, and its refusals.

A real Envoy using what it writes is in tests/test_envoy_xds_tls.py."""

from __future__ import annotations

import argparse
import base64

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane import certs
from tests.harness import write
from tests.objects import gateway


def certs_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    certs.add_parser(parser.add_subparsers(dest="command"))
    return certs.run(parser.parse_args(["certs", *argv]))


def load(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def signed_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def test_files_name_the_service_and_each_node_group_and_a_rerun_keeps_the_ca(tmp_path, capsys):
    out = tmp_path / "pki"
    assert certs_command("--output", str(out), "--node-cluster", "edge", "--namespace", "cp") == 0
    assert "a new CA; client certificates for node groups: edge" in capsys.readouterr().out
    ca = load((out / "ca.crt").read_bytes())[0]
    server = load((out / "server/tls.crt").read_bytes())[0]
    client = load((out / "node-groups/edge/tls.crt").read_bytes())[0]
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "controlplane.cp.svc", "controlplane", "controlplane.cp", "controlplane.cp.svc.cluster.local"]
    uris = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://controlplane/node-group/edge"]
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])  # it cannot serve xDS
    assert signed_by(server, ca) and signed_by(client, ca) and not signed_by(client, server)
    assert (out / "node-groups/edge/tls.key").stat().st_mode & 0o077 == 0

    assert certs_command("--output", str(out), "--node-cluster", "edge", "--namespace", "cp") == 0
    assert "kept the CA" in capsys.readouterr().out
    assert load((out / "ca.crt").read_bytes())[0] == ca
    renewed = load((out / "node-groups/edge/tls.crt").read_bytes())[0]
    assert renewed != client and signed_by(renewed, ca)


def test_a_new_ca_keeps_the_previous_one_in_the_bundles(tmp_path, capsys):
    out = tmp_path / "pki"
    assert certs_command("--output", str(out), "--node-cluster", "edge") == 0
    old_ca = load((out / "ca.crt").read_bytes())[0]
    old_client = load((out / "node-groups/edge/tls.crt").read_bytes())[0]
    assert certs_command("--output", str(out), "--node-cluster", "edge", "--new-ca") == 0
    bundle = load((out / "server/ca.crt").read_bytes())
    assert len(bundle) == 2 and bundle[1] == old_ca and bundle[0] != old_ca
    assert signed_by(old_client, bundle[1])  # Envoys not restarted yet are still accepted
    assert signed_by(load((out / "server/tls.crt").read_bytes())[0], bundle[0])
    assert certs_command("--output", str(out), "--node-cluster", "edge", "--new-ca") == 0
    assert len(load((out / "ca.crt").read_bytes())) == 2  # never more than the current CA and the one before


def test_secret_manifests_from_the_gateways_of_a_manifests_directory(tmp_path, capsys):
    manifests, out = tmp_path / "manifests", tmp_path / "secrets"
    manifests.mkdir()
    write(manifests / "gateways.yaml", gateway("a", node_cluster="team-a"), gateway("b", node_cluster="team-b"))
    arguments = ("--output", str(out), "--output-format", "secrets", "--manifests", str(manifests),
                 "--gateway-namespace", "gateways")
    assert certs_command(*arguments) == 0
    found = {path.stem: yaml.safe_load(path.read_text()) for path in out.glob("*.yaml")}
    assert set(found) == {"controlplane-xds-ca", "controlplane-xds-server", "controlplane-xds-client-team-a",
                          "controlplane-xds-client-team-b"}
    client = found["controlplane-xds-client-team-b"]
    assert (client["type"], client["metadata"]["namespace"], sorted(client["data"])) == (
        "kubernetes.io/tls", "gateways", ["ca.crt", "tls.crt", "tls.key"])
    assert found["controlplane-xds-server"]["metadata"]["namespace"] == "controlplane-system"
    ca = found["controlplane-xds-ca"]["data"]["ca.crt"]
    assert certs_command(*arguments) == 0
    assert yaml.safe_load((out / "controlplane-xds-ca.yaml").read_text())["data"]["ca.crt"] == ca
    renewed = yaml.safe_load((out / "controlplane-xds-client-team-b.yaml").read_text())["data"]["tls.crt"]
    assert renewed != client["data"]["tls.crt"]
    assert signed_by(load(base64.b64decode(renewed))[0], load(base64.b64decode(ca))[0])


@pytest.mark.parametrize("argv, message", [
    (["--node-cluster", "Team_A"], "node cluster 'Team_A' is not a DNS label"),
    (["--node-cluster", "a", "--trust-domain", "Bad/Domain"], "--trust-domain 'Bad/Domain'"),
    (["--node-cluster", "a", "--admin", "--output-format", "secrets"], "--admin writes files only"),
    ([], "give --output DIR (files or Secret manifests) or --kubernetes"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    arguments = [*argv] if not argv else ["--output", str(tmp_path / "out"), *argv]
    assert certs_command(*arguments) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_damaged_ca_is_never_replaced_silently(tmp_path, capsys):
    out = tmp_path / "pki"
    assert certs_command("--output", str(out), "--node-cluster", "edge") == 0
    (out / "ca.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    before = (out / "node-groups/edge/tls.crt").read_bytes()
    assert certs_command("--output", str(out), "--node-cluster", "edge") == 2
    assert "the CA is unreadable" in capsys.readouterr().err
    assert (out / "node-groups/edge/tls.crt").read_bytes() == before


def test_a_manifests_directory_without_gateways_is_refused(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    write(tmp_path / "m" / "other.yaml", {"kind": "Service", "metadata": {"name": "x"}})
    assert certs_command("--output", str(tmp_path / "out"), "--manifests", str(tmp_path / "m")) == 2
    assert "no Gateway found" in capsys.readouterr().err


def test_the_job_s_command_writes_the_secrets_on_a_real_api_server_with_its_own_rbac(real_kube, kube_namespace):
    """What k8s/controlplane/certs-job.yaml runs, as its ServiceAccount with its Role as shipped: the
    Secrets are created, and a second run (a rotation) updates them and keeps the CA."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    job_manifests = list(yaml.safe_load_all((Path(__file__).parents[1] / "k8s/controlplane/certs-job.yaml").read_text()))
    for manifest in job_manifests:
        if manifest["kind"] != "Job":
            real_kube.apply(manifest)
    job = next(m for m in job_manifests if m["kind"] == "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]

    def run_job() -> dict[str, dict]:
        done = subprocess.run([sys.executable, "-m", "controlplane.cli", *args, "--kubeconfig",
                               str(real_kube.kubeconfig("certs"))], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return {s["metadata"]["name"]: s for s in real_kube.list("v1", "Secret", namespace="controlplane-system")
                if s["metadata"]["name"].startswith("controlplane-xds")}

    first = run_job()
    assert {"controlplane-xds-server", "controlplane-xds-client-gateway"} <= first.keys()
    second = run_job()
    for name in ("controlplane-xds-server", "controlplane-xds-client-gateway"):
        assert second[name]["data"]["ca.crt"] == first[name]["data"]["ca.crt"]  # the CA is kept
        assert second[name]["data"]["tls.crt"] != first[name]["data"]["tls.crt"]  # the rest renewed


def test_the_admin_certificate_names_the_admin_identity_and_is_for_clients(tmp_path, capsys):
    assert certs_command("--output", str(tmp_path), "--node-cluster", "edge", "--admin") == 0
    [admin] = load((tmp_path / "admin/tls.crt").read_bytes())
    uris = admin.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == ["spiffe://controlplane/admin"]
    assert list(admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert signed_by(admin, load((tmp_path / "ca.crt").read_bytes())[0])
    assert (tmp_path / "admin/tls.key").exists() and (tmp_path / "admin/ca.crt").exists()
