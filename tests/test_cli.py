"""The command line: `bootstrap` output accepted by the real `envoy --mode validate`, and the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controlplane import cli
from tests.harness import assert_envoy_accepts, free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_ARGS = ["bootstrap", "--xds-address", "controlplane.controlplane-system.svc:18000",
                "--node-cluster", "gateway", "--node-id", "gateway", "--stats-port", "9902"]


@pytest.mark.parametrize("extra", [[], ["--delta"]])
def test_bootstrap_is_valid_for_envoy(tmp_path, capsys, extra):
    assert cli.main(EXAMPLE_ARGS + extra) == 0
    assert_envoy_accepts(capsys.readouterr().out, tmp_path)


def test_example_bootstrap_in_the_repo_is_current(capsys):
    cli.main(EXAMPLE_ARGS)
    assert (REPO / "envoy" / "bootstrap-ads.yaml").read_text() == capsys.readouterr().out, (
        "envoy/bootstrap-ads.yaml drifted: regenerate it with "
        f"`controlplane {' '.join(EXAMPLE_ARGS)} > envoy/bootstrap-ads.yaml`")


def test_bad_xds_address_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bootstrap", "--xds-address", "nocolon", "--node-cluster", "g"])
    assert "is not HOST:PORT" in capsys.readouterr().err


@pytest.mark.envoy
def test_demo_serves_its_manifests_through_a_real_envoy(tmp_path):
    """The demo's own manifests, moved to free ports so the test runs beside anything."""
    text = "".join(path.read_text() + "\n---\n" for path in sorted((REPO / "examples" / "demo").glob("*.yaml")))
    for port in ("10000", "18081", "18082"):
        text = text.replace(f"port: {port}", f"port: {free_port()}")
    (tmp_path / "demo.yaml").write_text(text)
    demo = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "demo", "--check", "--source", str(tmp_path),
         "--xds-port", str(free_port()), "--admin-port", str(free_port())],
        capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "'api-1'" in demo.stdout and "'api-2'" in demo.stdout
    assert "/agents answered 'api-" in demo.stdout  # a WebSocket echo, on the Backend's WebSocket cluster


def test_render_prints_what_a_node_group_gets_and_envoy_accepts_it(tmp_path, capsys):
    assert cli.main(["render", "--source", str(REPO / "tests" / "golden" / "basic"), "--node-cluster", "edge",
                     "--format", "bootstrap"]) == 0
    assert_envoy_accepts(capsys.readouterr().out, tmp_path)


def test_render_reports_rejected_objects_and_exits_non_zero(capsys):
    code = cli.main(["render", "--source", str(REPO / "tests" / "golden" / "rejections"), "--node-cluster", "edge"])
    output = capsys.readouterr()
    assert code == 1
    assert "Backend shop/typo not accepted: spec.routes[0].pathPrefx: unknown field" in output.err
    assert "shop/good" in output.out


def test_render_of_an_unknown_node_cluster_names_the_known_ones(capsys):
    assert cli.main(["render", "--source", str(REPO / "tests" / "golden" / "basic"), "--node-cluster", "x"]) == 1
    assert "no accepted Gateway has nodeCluster 'x' (node clusters: edge)" in capsys.readouterr().err


def test_a_missing_source_directory_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["render", "--source", str(tmp_path / "nope"), "--node-cluster", "x"]) == 2
    assert "is not a directory of manifests" in capsys.readouterr().err


def test_render_bootstrap_inlines_listener_and_upstream_tls_secrets_and_envoy_accepts_it(tmp_path, capsys):
    from tests.certs import ca_secret, issue, tls_secret
    from tests.harness import write
    from tests.objects import app, gateway
    authority = issue("test CA", ca=True)
    server = issue("localhost", issuer=authority)
    write(tmp_path / "all.yaml", gateway(listeners=[
        {"name": "https", "port": 8443, "protocol": "HTTPS",
         "tls": {"certificateSecret": "edge-cert", "clientCaSecret": "agents"}}]),
        *app("api", tls={"caSecret": "agents", "hostname": "api.shop.svc", "clientCertificateSecret": "edge-cert"}),
        tls_secret("edge-cert", server.cert_pem, server.key_pem), ca_secret("agents", authority.cert_pem))
    assert cli.main(["render", "--source", str(tmp_path), "--node-cluster", "edge", "--format", "bootstrap"]) == 0
    bootstrap = capsys.readouterr().out
    assert "sds" not in bootstrap.lower() and "tlsCertificates" in bootstrap
    assert "UpstreamTlsContext" in bootstrap and "matchTypedSubjectAltNames" in bootstrap
    (tmp_path / "out").mkdir()
    assert_envoy_accepts(bootstrap, tmp_path / "out")


def test_bootstrap_for_mutual_tls_to_the_control_plane_is_valid_for_envoy(tmp_path, capsys):
    from tests.certs import issue
    authority = issue("xDS CA", ca=True)
    envoy_cert = issue("gateway", issuer=authority, client=True)
    for name, pem in {"ca": authority.cert_pem, "cert": envoy_cert.cert_pem, "key": envoy_cert.key_pem}.items():
        (tmp_path / f"{name}.pem").write_bytes(pem)
    assert cli.main([*EXAMPLE_ARGS, "--xds-ca", str(tmp_path / "ca.pem"), "--xds-client-cert",
                     str(tmp_path / "cert.pem"), "--xds-client-key", str(tmp_path / "key.pem")]) == 0
    bootstrap = capsys.readouterr().out
    assert "UpstreamTlsContext" in bootstrap and "controlplane.controlplane-system.svc" in bootstrap
    (tmp_path / "out").mkdir()
    assert_envoy_accepts(bootstrap, tmp_path / "out")


def test_client_certificate_without_a_ca_is_refused(capsys):
    assert cli.main([*EXAMPLE_ARGS, "--xds-client-cert", "c.pem", "--xds-client-key", "k.pem"]) == 2
    assert "need --xds-ca" in capsys.readouterr().err
