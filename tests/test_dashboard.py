"""monitoring/dashboard.json: a Grafana dashboard that loads, whose queries parse as PromQL, and
that reads only series the control plane exposes.

The queries go through `promtool check rules` as recording rules (Grafana's variables replaced by
what they stand for); the series they read are checked against what `serve`'s collectors expose
while a real Envoy, bootstrapped with the stats sink, pushes its stats (a WebSocket Backend, a
mutual-TLS listener with a refused handshake, so the TLS and overflow series exist).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.runtime.activity_metrics import ActivityCollector
from controlplane.runtime.envoy_stats import EnvoyStatsCollector
from controlplane.runtime.metrics import ControlPlaneCollector
from tests.harness import eventually
from tests.test_alerts import metric_names, promtool, write_monitored_gateway
from tests.test_envoy_websocket import open_websocket, refused_with
from tests.test_envoy_xds import body_of
from tests.test_stats_sink import sinked  # noqa: F401 (a fixture)

DASHBOARD = Path(__file__).resolve().parent.parent / "monitoring" / "dashboard.json"
# Grafana's variables, as a query sees them with "All" selected.
VARIABLES = {"$node_group": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[str]:
    expressions = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", ()):
            expression = target["expr"]
            for variable, value in VARIABLES.items():
                expression = expression.replace(variable, value)
            expressions.append(expression)
    return expressions


def test_the_dashboard_has_grafanas_shape():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["node_group"]["includeAll"] and variables["node_group"]["allValue"] == ".*"
    assert "label_values(controlplane_xds_connected_envoys, node_group)" in variables["node_group"]["definition"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"] and panel["targets"], panel["title"]
        assert {target["refId"] for target in panel["targets"]} == {chr(65 + i) for i in range(len(panel["targets"]))}
        for target in panel["targets"]:
            assert set(VARIABLES) & set(re.findall(r"\$\w+", target["expr"])) == set(re.findall(r"\$\w+",
                                                                                                 target["expr"]))
    titles = " ".join(panel["title"] for panel in board["panels"]).lower()
    for topic in ("budget", "overflow", "sync", "push-to-ack", "nack", "certificate", "rotations refused"):
        assert topic in titles, topic


def test_every_query_parses_as_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{number}", "expr": expression}
                                                          for number, expression in enumerate(queries())]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries())} rules found" in checked.stdout


def series_read() -> set[str]:
    return {name for expression in queries() for name in metric_names(expression)}


@pytest.mark.envoy
async def test_every_series_the_dashboard_reads_is_exposed(sinked, envoys, backends):  # noqa: F811
    source, pipeline, server, store = sinked
    api = backends("api")
    port, tls_port = write_monitored_gateway(source.directory, api.port, {"maxConnections": 1, "maxPendingRequests": 1})
    envoy = envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port), what="traffic through Envoy") == "api"
    agent = await open_websocket(port, "/agents")  # the WebSocket budget spent: one waits, the next overflows
    waiting = asyncio.create_task(open_websocket(port, "/agents"))
    await eventually(lambda: envoy.stat("cluster.shop/api/websocket.upstream_rq_pending_active"), what="a wait")
    assert await refused_with(port, "/agents") == 503
    with pytest.raises(httpx.HTTPError):  # no client certificate: a failed handshake on the listener
        async with httpx.AsyncClient(verify=False, timeout=2) as client:
            await client.get(f"https://127.0.0.1:{tls_port}/")
    async with httpx.AsyncClient(timeout=5) as client:  # the secure Backend's endpoint speaks no TLS: it fails
        await client.get(f"http://127.0.0.1:{port}/secure")

    registry = CollectorRegistry()
    for collector in (ControlPlaneCollector(server._cache, lambda: pipeline.last),
                      ActivityCollector(server._cache, publish_seconds=pipeline.publish_seconds,
                                        is_leader=lambda: True),
                      EnvoyStatsCollector(store, lambda: pipeline.last)):
        registry.register(collector)

    def exposed() -> set[str] | None:
        """The series names declared, once the TLS failures and the overflow have been pushed."""
        text = generate_latest(registry).decode()
        declared = set()
        for name, kind in re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M):
            declared |= {f"{name}{suffix}" for suffix in _SUFFIXES[kind]}
        return declared if all(f"\n{name}{{" in text for name in (
            "controlplane_envoy_listener_ssl_total", "controlplane_envoy_cluster_ssl_total",
            "controlplane_envoy_cluster_overflows_total", "controlplane_budget_in_use", "controlplane_xds_envoys",
            "controlplane_envoy_cluster_cx_active")) else None

    samples = await eventually(exposed, timeout=20, interval=0.5, what="Envoy's TLS and overflow stats pushed")
    await agent.close()
    waiting.cancel()
    read = series_read()
    assert len(read) >= 15
    kubernetes_only = {"controlplane_kubernetes_watch_events_total", "controlplane_kubernetes_relists_total"}
    for name in sorted(read - kubernetes_only):
        assert name in samples, f"{name}: the dashboard reads it, the control plane does not expose it"
    # With a Kubernetes source (not this test's files), serve exposes those too.
    from kubernetes import client as k8s

    from controlplane.sources.kubernetes import KubernetesSource
    kube = KubernetesSource(k8s.ApiClient())
    kube.watch_events["Backend", "ADDED"] += 1
    kube.relists["Backend"] += 1
    text = generate_latest(_registry(ActivityCollector(server._cache, source=kube))).decode()
    for name in kubernetes_only:
        assert f"\n{name}{{" in text, name


_SUFFIXES = {"gauge": ("",), "counter": ("", "_total"), "histogram": ("_bucket", "_sum", "_count")}


def _registry(collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry
