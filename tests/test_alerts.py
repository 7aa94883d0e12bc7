"""The alert rules in monitoring/alerts.yaml: their promtool tests, and the series they read.

promtool comes from Debian's `prometheus` package; `.ci/run` installs it and sets
REQUIRE_PROMTOOL=1, so CI can never skip these. The promtool tests feed synthetic series; the
Envoy test below checks that every series name and label the rules read is one a real Envoy 1.40
and the control plane expose, so the rules cannot drift from what is scraped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.runtime.activity_metrics import ActivityCollector
from controlplane.runtime.metrics import ControlPlaneCollector
from tests.certs import ca_secret, issue, tls_secret
from tests.harness import eventually, free_port, write
from tests.objects import backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "monitoring" / "alerts.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required here (REQUIRE_PROMTOOL is set): apt-get install prometheus")
        pytest.skip("promtool is not installed: apt-get install prometheus (Debian), as .ci/run does")
    return found


@pytest.mark.parametrize("command", [["check", "rules", str(RULES)],
                                     ["test", "rules", str(REPO / "tests" / "alerts" / "alerts_test.yaml")]],
                         ids=["check", "test"])
def test_alert_rules_with_promtool(command):
    checked = subprocess.run([promtool(), *command], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def series_the_rules_read() -> set[str]:
    """Metric names in the rules' expressions, the one name regex among them spelled out."""
    names = set()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expression = rule["expr"]
            for pattern in re.findall(r'__name__=~"([^"]+)"', expression):
                head, priorities, middle, resources = re.fullmatch(r"(\w+?)\((.+?)\)(\w+?)\((.+?)\)", pattern).groups()
                names |= {f"{head}{p}{middle}{r}" for p in priorities.split("|") for r in resources.split("|")}
            names |= metric_names(expression)
    return names


def metric_names(expression: str) -> set[str]:
    """The envoy_* and controlplane_* metric names a PromQL expression reads (strings, label matchers
    and the label lists of by/on/without/group_left left out)."""
    without_strings_and_labels = re.sub(r'"[^"]*"|\b(?:by|on|without|group_left)\s*\([^)]*\)|\{[^}]*\}', "",
                                        expression)
    return set(re.findall(r"\b((?:envoy|controlplane)_[a-z_]+)\b", without_strings_and_labels))


def write_monitored_gateway(directory, api_port: int, websocket_budget: dict) -> tuple[int, int]:
    """A Gateway with an HTTP and a mutual-TLS listener, a Backend with a WebSocket budget and one
    over upstream TLS: every kind of series the alerts and the dashboard read. Returns the ports."""
    port, tls_port = free_port(), free_port()
    authority = issue("test CA", ca=True)
    certificate = issue("localhost", issuer=authority)
    write(directory / "all.yaml",
          gateway(listeners=[{"name": "http", "port": port, "address": "127.0.0.1"},
                             {"name": "agents", "port": tls_port, "address": "127.0.0.1", "protocol": "HTTPS",
                              "tls": {"certificateSecret": "edge-cert", "clientCaSecret": "agents"}}]),
          backend("api", routes=[{"pathPrefix": "/"}], websocket={"circuitBreakers": websocket_budget}),
          backend("secure", service="api", routes=[{"pathPrefix": "/secure"}],
                  tls={"caSecret": "agents", "hostname": "api.shop.svc"}),
          service("api"), endpoint_slice("api", [ready("127.0.0.1")], port=api_port),
          tls_secret("edge-cert", certificate.cert_pem, certificate.key_pem), ca_secret("agents", authority.cert_pem))
    return port, tls_port


@pytest.mark.envoy
async def test_the_series_the_alerts_read_are_exposed_by_envoy_and_the_control_plane(xds, served, envoys, backends):
    """Envoy's series read from its stats listener (`bootstrap --stats-port`), as Prometheus reads them."""
    cache, _server = xds
    source, pipeline, server = served
    api = backends("api")
    port, tls_port = write_monitored_gateway(source.directory, api.port, {"maxConnections": 5})
    stats_port = free_port()
    envoys(server.port, node_cluster="edge", stats_port=stats_port)  # scraped as Prometheus does, not via admin
    assert await eventually(lambda: body_of(port), what="traffic through Envoy") == "api"

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stats_port}", timeout=5) as scrape:
        exposed_by_envoy = (await scrape.get("/stats/prometheus")).text
        assert (await scrape.get("/ready")).text.strip() == "LIVE"  # the readiness probe of k8s/gateway
        for refused in (scrape.get("/config_dump"), scrape.post("/quitquitquit"), scrape.post("/stats/prometheus")):
            assert (await refused).status_code == 404  # nothing else of the admin is reachable
    registry = CollectorRegistry()
    registry.register(ControlPlaneCollector(cache, lambda: pipeline.last))
    registry.register(ActivityCollector(cache))
    exposed_by_us = generate_latest(registry).decode()
    read = series_the_rules_read()
    assert len(read) >= 10
    for name in sorted(read):
        if name.startswith("controlplane_"):
            assert f"# TYPE {name} gauge" in exposed_by_us, name
        elif name.startswith("envoy_cluster_"):  # a Backend's cluster, its WebSocket cluster, or one over TLS
            assert re.search(rf'^{name}{{envoy_cluster_name="shop/[^"]+"}}', exposed_by_envoy, re.M), name
        else:
            assert f'{name}{{envoy_listener_address="127.0.0.1_{tls_port}"}}' in exposed_by_envoy, name
    assert ('controlplane_circuit_breaker_limit{envoy_cluster_name="shop/api/websocket",priority="default",'
            'resource="cx"} 5.0') in exposed_by_us
