"""The command line: `bootstrap` output accepted by the real `envoy --mode validate`, the demo,
and `serve`: refused addresses, taken ports, failing tasks and signals, each one clear line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as d

from controlplane import cli
from controlplane.runtime import serve as serving
from controlplane.sources.store import Store
from controlplane.xds import CLUSTER
from tests.harness import assert_envoy_accepts, eventually, free_port
from tests.objects import app, endpoint_slice, gateway, ready

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_ARGS = ["bootstrap", "--xds-address", "controlplane.controlplane-system.svc:18000",
                "--node-cluster", "gateway", "--node-id", "gateway", "--stats-port", "9902"]


@pytest.mark.parametrize("extra", [[], ["--delta"], ["--stats-flush-interval", "299"]])
def test_bootstrap_is_valid_for_envoy(tmp_path, capsys, extra):
    assert cli.main(EXAMPLE_ARGS + extra) == 0
    out = capsys.readouterr().out
    assert_envoy_accepts(out, tmp_path)
    assert f"stats_flush_interval: {extra[-1] if extra[1:] else 5}s" in out


@pytest.mark.parametrize("value", ["300", "0", "5s"])
def test_a_flush_interval_envoy_would_refuse_is_refused_first(capsys, value):
    with pytest.raises(SystemExit):
        cli.main(EXAMPLE_ARGS + ["--stats-flush-interval", value])
    assert "--stats-flush-interval" in capsys.readouterr().err


def test_example_bootstrap_in_the_repo_is_current(capsys):
    cli.main(EXAMPLE_ARGS)
    assert (REPO / "envoy" / "bootstrap-ads.yaml").read_text() == capsys.readouterr().out, (
        "envoy/bootstrap-ads.yaml drifted: regenerate it with "
        f"`controlplane {' '.join(EXAMPLE_ARGS)} > envoy/bootstrap-ads.yaml`")


def test_bad_xds_address_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bootstrap", "--xds-address", "nocolon", "--node-cluster", "g"])
    assert "is not HOST:PORT" in capsys.readouterr().err


def _demo_manifests(directory: Path) -> int:
    """The demo's own manifests in `directory`, moved to free ports so the test runs beside anything;
    returns the listener's port."""
    text = "".join(path.read_text() + "\n---\n" for path in sorted((REPO / "examples" / "demo").glob("*.yaml")))
    listener = free_port()
    text = text.replace("port: 10000", f"port: {listener}")
    for port in ("18081", "18082"):
        text = text.replace(f"port: {port}", f"port: {free_port()}")
    (directory / "demo.yaml").write_text(text)
    return listener


def _demo_ports() -> list[str]:
    return ["--xds-port", str(free_port()), "--admin-port", str(free_port()), "--metrics-port", str(free_port())]


@pytest.mark.envoy
def test_demo_serves_its_manifests_through_a_real_envoy(tmp_path):
    _demo_manifests(tmp_path)
    demo = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "demo", "--check", "--source", str(tmp_path), *_demo_ports()],
        capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "'api-1'" in demo.stdout and "'api-2'" in demo.stdout
    assert "/agents answered 'api-" in demo.stdout  # a WebSocket echo, on the Backend's WebSocket cluster


@pytest.mark.envoy
def test_the_demo_follows_an_added_endpoint_shows_its_status_and_leaves_nothing_behind(tmp_path):
    listener = _demo_manifests(tmp_path)
    ports = _demo_ports()
    metrics = ports[5]
    demo = subprocess.Popen([sys.executable, "-m", "controlplane.cli", "demo", "--source", str(tmp_path), *ports],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in demo.stdout:  # bounded: the demo prints its banner within seconds, or exits
            lines.append(line)
            if "Press Ctrl-C to stop" in line:
                break
        banner = "".join(lines)
        assert f"controlplane status --server http://127.0.0.1:{metrics}" in banner, banner
        assert "/clusters" in banner and "circuit_breakers" in banner and "/config_dump" not in banner
        workdir = Path(banner.split("Envoy's log: ")[1].split()[0].rstrip(".")).parent
        assert workdir.is_dir()

        added = free_port()  # a third pod, added to the manifests while the demo runs
        (tmp_path / "more.yaml").write_text(yaml.safe_dump(endpoint_slice("api", [ready("127.0.0.1")], port=added,
                                                                          name="api-3", namespace="demo")))

        def every_pod_answers() -> bool:
            answers = set()
            for _ in range(30):
                try:
                    answers.add(httpx.get(f"http://127.0.0.1:{listener}/", timeout=2).raise_for_status().text.strip())
                except httpx.HTTPError:
                    return False
            return len(answers) == 3
        deadline = time.monotonic() + 20
        while not every_pod_answers():
            assert time.monotonic() < deadline, "the added endpoint never answered through Envoy"
            time.sleep(0.3)

        status = subprocess.run([sys.executable, "-m", "controlplane.cli", "status", "--server",
                                 f"http://127.0.0.1:{metrics}"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "demo-envoy" in status.stdout, status.stdout + status.stderr

        second = subprocess.run([sys.executable, "-m", "controlplane.cli", "demo", "--source", str(tmp_path), *ports],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "is in use on 127.0.0.1: is another demo" in second.stderr and "Traceback" not in second.stderr
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0
    assert not workdir.exists()  # its keys and Envoy's files are gone


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
    from cryptography.x509.oid import ExtendedKeyUsageOID
    authority = issue("test CA", ca=True)
    # presented to clients and, upstream, to the endpoints: both extended key usages
    server = issue("localhost", issuer=authority,
                   extended_usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH))
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


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--source", "m", "--xds-address", "127.0.0.1:99999"], "'127.0.0.1:99999': port 99999 is out of range"),
    (["serve", "--source", "m", "--xds-address", "127.0.0.1:0"], "'127.0.0.1:0': port 0 is out of range"),
    (["serve", "--source", "m", "--xds-address", ":18000"], "':18000' is not HOST:PORT"),
    (["serve", "--source", "m", "--metrics-address", "0.0.0.0:70000"], "port 70000 is out of range"),
    (["bootstrap", "--node-cluster", "g", "--xds-address", "cp:65536"], "port 65536 is out of range"),
    (["bootstrap", "--node-cluster", "g", "--admin-port", "0"], "'0' is not a port; give a number from 1 to 65535"),
    (["bootstrap", "--node-cluster", "g", "--stats-port", "99999"], "'99999' is not a port"),
    (["demo", "--xds-port", "-1"], "'-1' is not a port"),
])
def test_ports_out_of_range_are_refused_when_parsing(argv, message, capsys):
    """`--xds-address 127.0.0.1:99999` used to bind a random port without a word."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_empty_metrics_address_turns_metrics_off():
    args = cli.build_parser().parse_args(["serve", "--source", "m", "--metrics-address", ""])
    assert (args.metrics_address, args.xds_address) == ("", "0.0.0.0:18000")


@pytest.mark.parametrize("taken", ["--xds-address", "--metrics-address"])
def test_serve_on_a_taken_port_is_one_line_naming_the_address(tmp_path, taken):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        addresses = {"--xds-address": f"127.0.0.1:{free_port()}", "--metrics-address": f"127.0.0.1:{free_port()}",
                     taken: address}
        served = subprocess.run([sys.executable, "-m", "controlplane.cli", "serve", "--source", str(tmp_path),
                                 "--state-file", "none", *[part for pair in addresses.items() for part in pair]],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
    assert served.returncode == 1
    what = "listen for xDS" if taken == "--xds-address" else "serve metrics"
    assert served.stderr.splitlines()[-1].startswith(f"controlplane serve: cannot {what} on {address}: Address "
                                                     "already in use;"), served.stderr
    assert "Traceback" not in served.stderr and "Exception ignored" not in served.stderr, served.stderr


@pytest.fixture
def fast_restarts(monkeypatch):
    monkeypatch.setattr(serving, "RESTART_BACKOFF", (0.01, 0.05))


async def test_a_failing_task_is_logged_once_and_restarted(fast_restarts, caplog):
    runs = []

    async def watch():
        runs.append(len(runs))
        if len(runs) <= 3:
            raise ValueError("the same input trips it")
        if len(runs) == 4:
            raise KeyError("something else")
        if len(runs) == 5:
            return
        await asyncio.Event().wait()

    supervisor = asyncio.create_task(serving.supervise("the watch", watch))
    await eventually(lambda: len(runs) == 6, what="the sixth run")
    supervisor.cancel()
    messages = [(r.getMessage(), r.exc_info is not None) for r in caplog.records if r.name == serving.log.name]
    assert messages == [
        ("the watch failed; restarting it in 0s. Envoys keep the configuration published last.", True),
        ("the watch failed again (ValueError: the same input trips it); restarting it in 0s", False),
        ("the watch failed again (ValueError: the same input trips it); restarting it in 0s", False),
        ("the watch failed; restarting it in 0s. Envoys keep the configuration published last.", True),
        ("the watch ended, which it should not; restarting it in 0s", False),
    ]


class FlakySource:
    """Its watch raises the first time (input nobody foresaw), then serves a Gateway and a Backend."""

    def __init__(self):
        self.watches = 0

    async def watch(self, on_change) -> None:
        self.watches += 1
        if self.watches == 1:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        on_change(Store([gateway(), *app("api")]))
        await asyncio.Event().wait()


async def test_serve_restarts_a_failed_watch_and_stops_quietly_on_sigterm(fast_restarts, caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="grpc")
    port = free_port()
    source = FlakySource()
    serving_task = asyncio.create_task(serving.serve(source, xds_address=f"127.0.0.1:{port}", grace=2))
    node = base_pb2.Node(id="envoy-1", cluster="edge")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        fetch = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel).FetchClusters
        clusters = await eventually(lambda: _fetched(fetch, node), what="clusters published after the restart")
        assert len(clusters.resources) == 1 and source.watches == 2
        stream = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await stream.write(d.DiscoveryRequest(node=node, type_url=CLUSTER))
        await stream.read()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving_task, timeout=10)
        assert await stream.code() == grpc.StatusCode.UNAVAILABLE
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert tracebacks == ["the source's watch failed; restarting it in 0s. Envoys keep the configuration published "
                          "last."]
    assert "stopping: 1 Envoy connected; ending their streams" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and not r.exc_info]


async def test_serve_exits_with_one_error_when_publishing_stops(fast_restarts, monkeypatch, caplog):
    async def broken_publisher():
        raise RuntimeError("a bug in the publisher")

    def feed(source, pipeline):
        return SimpleNamespace(poke=lambda: None), [asyncio.create_task(broken_publisher())]

    monkeypatch.setattr(serving, "feed", feed)
    with pytest.raises(serving.ServeError, match="publishing stopped"):
        await serving.serve(FlakySource(), xds_address=f"127.0.0.1:{free_port()}", grace=1)
    assert [r.getMessage() for r in caplog.records if r.exc_info] == [
        "publishing stopped; exiting, so that the process is restarted"]


async def _fetched(fetch, node):
    try:
        return await fetch(d.DiscoveryRequest(node=node))
    except grpc.aio.AioRpcError:
        return None


def test_check_secret_is_a_command_of_controlplane(tmp_path):
    """`controlplane check-secret` as a pipeline runs it: the verdict on stdout, no log lines, exit 1."""
    import yaml

    from tests.test_check_secret import WORLD
    secret = WORLD.certificate_secret(WORLD.server(dns_names=("other.example.test",)))
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(secret))
    done = subprocess.run([str(Path(sys.executable).parent / "controlplane"), "check-secret", "--secret",
                           str(tmp_path / "secret.yaml"), "--hostname", WORLD.hostname],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout.startswith("FAIL Hostname: "), done.stdout + done.stderr
    assert done.stderr == ""


def test_json_logs_are_one_object_per_line_with_the_object_and_file(tmp_path):
    """`serve --log-format json` with a refused Backend: every line of its log parses as JSON, and
    the refusal carries the object and the file as fields a log pipeline can filter on."""
    import json

    import yaml

    from tests.objects import NS, backend, gateway
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump_all([gateway(), backend("api", service="missing")]))
    serving = subprocess.Popen([sys.executable, "-m", "controlplane.cli", "--log-format", "json", "--log-level",
                                "info", "serve", "--source", str(tmp_path), "--state-file", "none",
                                "--xds-address", f"127.0.0.1:{free_port()}", "--metrics-address", ""],
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines: list[dict] = []
    try:
        for line in serving.stderr:  # bounded: serve logs the refusal within a second of starting
            lines.append(json.loads(line))
            if "not accepted" in lines[-1]["message"] or len(lines) > 50:
                break
    finally:
        serving.send_signal(signal.SIGTERM)
        rest = serving.communicate(timeout=30)[1]
    lines += [json.loads(line) for line in rest.splitlines()]
    refusal = next(entry for entry in lines if "not accepted" in entry["message"])
    assert refusal["level"] == "WARNING" and refusal["object"] == f"Backend {NS}/api"
    assert refusal["file"] == str(tmp_path / "edge.yaml")
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in lines)


def test_version_is_the_installed_package_version(capsys):
    import importlib.metadata
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"controlplane {importlib.metadata.version('controlplane')}"


def test_surge_is_a_command_of_controlplane():
    """`controlplane surge` (tests/test_surge.py runs it through a real Envoy): a gateway that is not
    there is one line naming the URL, exit 1."""
    port = free_port()
    done = subprocess.run([str(Path(sys.executable).parent / "controlplane"), "surge", "--websocket-url",
                           f"ws://127.0.0.1:{port}/ws", "--connections", "2", "--probe-url",
                           f"http://127.0.0.1:{port}/login"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"http://127.0.0.1:{port}/login: connection refused" in done.stderr and "Traceback" not in done.stderr


def test_certs_and_the_xds_identity_flags_are_commands_and_options_of_controlplane(tmp_path, monkeypatch):
    """`controlplane certs` writes what `serve --xds-tls-* --xds-trust-domain` loads; the insecure flag
    reaches the server (tests/test_envoy_xds_tls.py and test_xds_identity.py test what they do)."""
    done = subprocess.run([str(Path(sys.executable).parent / "controlplane"), "certs", "--output", str(tmp_path / "pki"),
                           "--node-cluster", "edge"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "pki").rglob("*.crt"))  # a CA, the server's and edge's certificates
    seen = {}

    async def fake_serve(source, **options):
        seen.update(options)
    monkeypatch.setattr(serving, "serve", fake_serve)
    server_dir = next(p.parent for p in (tmp_path / "pki").rglob("tls.key") if "server" in str(p))
    assert cli.main(["serve", "--source", str(tmp_path), "--state-file", "none", "--xds-tls-cert",
                     str(server_dir / "tls.crt"), "--xds-tls-key", str(server_dir / "tls.key"), "--xds-client-ca",
                     str(server_dir / "ca.crt"), "--xds-trust-domain", "example.org",
                     "--insecure-serve-private-keys-over-plaintext"]) == 0
    assert seen["xds_tls"].trust_domain == "example.org" and seen["insecure_private_keys_over_plaintext"] is True
