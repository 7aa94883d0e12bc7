"""End to end: `controlplane serve --source kubernetes` against the API test server, and a real Envoy."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import yaml

from tests.harness import eventually, free_port
from tests.kube_api_server import KubeAPIServer
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

pytestmark = pytest.mark.envoy


@pytest.fixture
def serve(api, tmp_path):
    """The real command, with a kubeconfig that points at the API test server."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": api.url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
    ports = {"xds": free_port(), "metrics": free_port()}
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "serve", "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
         "--xds-address", f"127.0.0.1:{ports['xds']}", "--metrics-address", f"127.0.0.1:{ports['metrics']}",
         "--lease-namespace", "default"],
        stdout=log, stderr=subprocess.STDOUT)
    yield process, ports
    if process.poll() is None:
        process.kill()
    process.wait()
    log.close()
    print((tmp_path / "serve.log").read_text()[-3000:])


async def test_kubernetes_objects_become_traffic_with_status_and_survive_the_api_server_going_away(
        api, serve, envoys, backends):
    process, ports = serve
    one, two = backends("one"), backends("two")
    port = free_port()
    api.create(gateway(port=port))
    api.create(service("api"))
    api.create(endpoint_slice("api", [ready("127.0.0.1")], port=one.port))
    api.create(backend("api", routes=[{"pathPrefix": "/"}]))
    envoy = envoys(ports["xds"], node_cluster="edge")
    assert await eventually(lambda: body_of(port), timeout=30, what="a Backend becoming traffic") == "one"

    api.update({**api.get("EndpointSlice", NS, "api-1"), "ports": [{"name": "http", "port": two.port}]})
    assert await eventually(lambda: _answers(port, "two"), what="traffic following the EndpointSlice")

    await eventually(lambda: condition(api, "Backend", "api", "Programmed")[0] == "True", timeout=20,
                     what="Programmed=True once Envoy accepted the Backend")
    assert condition(api, "Backend", "api", "Accepted")[0] == "True"

    api.create(backend("ghost", routes=[{"pathPrefix": "/ghost"}]))
    await eventually(lambda: condition(api, "Backend", "ghost", "Accepted")[0] == "False", what="a refused Backend")
    assert "Service shop/ghost does not exist" in condition(api, "Backend", "ghost", "Accepted")[1]

    with socket.socket() as taken:  # a listener Envoy cannot bind: Envoy NACKs, the Gateway says why
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        edge = api.get("Gateway", NS, "edge")
        edge["spec"]["listeners"].append({"name": "busy", "port": busy, "address": "127.0.0.1"})
        api.update(edge)
        await eventually(lambda: condition(api, "Gateway", "edge", "Programmed")[0] == "False", timeout=20,
                         what="the Gateway's Programmed=False after Envoy's NACK")
        message = condition(api, "Gateway", "edge", "Programmed")[1]
        assert message.startswith("Envoy envoy-1 rejected shop/edge/busy") and str(busy) in message
        assert await body_of(port) == "two"  # the rest keeps working

    api.stop()
    for _ in range(10):  # the API server is away: every request still succeeds, no endpoint is withdrawn
        assert await body_of(port) == "two"
        assert (await envoy.stats())["cluster.shop/api.membership_healthy"] == 1
        await asyncio.sleep(0.2)
    api.start()
    api.update({**api.get("EndpointSlice", NS, "api-1"), "ports": [{"name": "http", "port": one.port}]})
    assert await eventually(lambda: _answers(port, "one"), timeout=30, what="catching up after the API server")

    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://127.0.0.1:{ports['metrics']}/metrics")).text
        readiness = await http.get(f"http://127.0.0.1:{ports['metrics']}/readyz")
    assert 'controlplane_xds_connected_envoys{node_group="edge"} 1.0' in metrics
    assert 'controlplane_objects_not_accepted{kind="Backend",reason="ServiceNotFound"} 1.0' in metrics
    assert readiness.status_code == 200

    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 15) == 0
    assert await body_of(port) == "one"  # Envoy keeps serving after the control plane is gone


def condition(api: KubeAPIServer, kind: str, name: str, kind_of_condition: str) -> tuple[str, str]:
    found = next((c for c in ((api.get(kind, NS, name) or {}).get("status") or {}).get("conditions", [])
                  if c["type"] == kind_of_condition), None)
    return (found["status"], found["message"]) if found else ("", "")


async def _answers(port: int, expected: str) -> bool:
    return await body_of(port) == expected
