"""What Envoys report about the traffic, read against what we configured: each Backend's budgets
and how much of them its Envoys use, API and WebSocket clusters side by side.

The first outage was a WebSocket surge spending the budget that logins needed, seen by users
first. Envoy's `remaining_<resource>` gauges (pushed to us by its stats sink,
controlplane/xds/metrics_service.py) say what is left of a budget; each Envoy has a budget of its
own, so what counts is the busiest one: in use = limit - the least remaining of any Envoy of the
node group. `budget_use()` is the Python view (for `controlplane status`); `EnvoyStatsCollector`
puts the same on the metrics endpoint, with overflows, active connections and TLS failures
summed over each node group's Envoys.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from controlplane.runtime.metrics import backend_limits
from controlplane.translate.to_ir import Translation
from controlplane.xds.metrics_service import EnvoyStats, StatsStore


@dataclass(frozen=True)
class BudgetUse:
    node_group: str
    backend: str  # the Backend's own cluster name (namespace/name)
    cluster: str  # the Envoy cluster: the Backend's, or its WebSocket cluster
    traffic: str  # "api" or "websocket"
    priority: str  # "default" or "high"
    resource: str  # "cx", "pending", "rq", "retries"
    limit: int
    in_use: int | None  # limit - the least remaining of any Envoy; None: no Envoy reported it yet
    envoys: int  # Envoys of the node group that reported it


def budget_use(translation: Translation | None, envoys: Iterable[EnvoyStats],
               shared_among: Mapping[str, int] | None = None) -> list[BudgetUse]:
    """Every budget of every Backend of the last translation, with its use, by node group and Backend
    (`shared_among`: per node group, the Envoys Gateway-wide budgets are shared among; the limit is
    one Envoy's)."""
    if translation is None:
        return []
    remaining: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for stats in envoys:
        for (name, labels), value in stats.values.items():
            _, _, rest = name.partition("cluster.circuit_breakers.")
            if rest:
                priority, _, resource = rest.partition(".remaining_")
                remaining[stats.node_group, dict(labels).get("envoy_cluster_name", ""), priority, resource].append(value)
    uses = []
    for group_name, group in sorted(translation.groups.items()):
        for backend in group.backends:
            for cluster, traffic, priority, resource, limit in backend_limits(
                    backend, (shared_among or {}).get(group_name, 1)):
                reported = remaining.get((group_name, cluster, priority, resource), [])
                in_use = max(0, int(limit - min(reported))) if reported else None
                uses.append(BudgetUse(group_name, backend.name, cluster, traffic, priority, resource, limit, in_use,
                                      len(reported)))
    return uses


_OVERFLOWS = {"cluster.upstream_cx_overflow": "cx", "cluster.upstream_rq_pending_overflow": "pending"}


class EnvoyStatsCollector:
    """The metrics endpoint's view of the stats Envoys push: aggregated per node group, so that
    1,000 Envoys are not 1,000 times the series."""

    def __init__(self, store: StatsStore, last_translation: Callable[[], Translation | None],
                 shared_among: Callable[[], Mapping[str, int]] = dict):
        self._store = store
        self._last_translation = last_translation
        self._shared_among = shared_among

    def collect(self):
        envoys = self._store.envoys()
        reporting = GaugeMetricFamily("controlplane_envoy_stats_envoys", "Envoys whose stats the control plane holds "
                                      "(pushed by their metrics-service sink), per node group.", labels=["node_group"])
        for group in sorted({s.node_group for s in envoys}):
            reporting.add_metric([group], sum(1 for s in envoys if s.node_group == group))
        in_use = GaugeMetricFamily(
            "controlplane_budget_in_use", "Each Backend's circuit-breaker budget in use on the busiest Envoy of the "
            "node group (limit - its remaining_<resource>), API and WebSocket clusters side by side; the limit is "
            "controlplane_circuit_breaker_limit.",
            labels=["node_group", "backend", "envoy_cluster_name", "traffic", "priority", "resource"])
        for use in budget_use(self._last_translation(), envoys, self._shared_among()):
            if use.in_use is not None:
                in_use.add_metric([use.node_group, use.backend, use.cluster, use.traffic, use.priority, use.resource],
                                  use.in_use)
        overflows = CounterMetricFamily(
            "controlplane_envoy_cluster_overflows", "Requests and connections refused by a spent circuit breaker "
            "(Envoy's upstream_cx_overflow and upstream_rq_pending_overflow), summed over the node group's Envoys.",
            labels=["node_group", "envoy_cluster_name", "overflow"])
        active = GaugeMetricFamily("controlplane_envoy_cluster_cx_active", "Open upstream connections per cluster, "
                                   "summed over the node group's Envoys.", labels=["node_group", "envoy_cluster_name"])
        listener_tls = CounterMetricFamily(
            "controlplane_envoy_listener_ssl", "TLS handshakes on each listener, and failures by kind (Envoy's "
            "listener ssl.* counters), summed over the node group's Envoys.",
            labels=["node_group", "envoy_listener_address", "stat"])
        cluster_tls = CounterMetricFamily(
            "controlplane_envoy_cluster_ssl", "TLS handshakes with each cluster's endpoints, and failures by kind "
            "(Envoy's cluster ssl.* counters), summed over the node group's Envoys.",
            labels=["node_group", "envoy_cluster_name", "stat"])
        families = {"overflows": overflows, "active": active, "listener_tls": listener_tls, "cluster_tls": cluster_tls}
        sums: dict[tuple, float] = defaultdict(float)
        for stats in envoys:
            for (name, labels), value in stats.values.items():
                label = dict(labels)
                cluster, listener = label.get("envoy_cluster_name", ""), label.get("envoy_listener_address", "")
                if name in _OVERFLOWS:
                    sums["overflows", stats.node_group, cluster, _OVERFLOWS[name]] += value
                elif name == "cluster.upstream_cx_active":
                    sums["active", stats.node_group, cluster] += value
                elif name.startswith("listener.ssl."):
                    sums["listener_tls", stats.node_group, listener, name.removeprefix("listener.ssl.")] += value
                elif name.startswith("cluster.ssl."):
                    sums["cluster_tls", stats.node_group, cluster, name.removeprefix("cluster.ssl.")] += value
        for (family, *labels), value in sorted(sums.items()):
            families[family].add_metric(labels, value)
        yield from (reporting, in_use, overflows, active, listener_tls, cluster_tls)
