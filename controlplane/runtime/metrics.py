"""Prometheus metrics, computed when scraped from the cache's status view and the last translation.

Nothing is counted on the push path. What the alerts in monitoring/alerts.yaml need: Envoys
connected per node group; Envoys whose last response of a type was rejected (a NACK not yet
followed by an accepted version); objects that are not accepted, and accepted objects whose
references are not as they should be (a refused Secret rotation), per kind and reason; when each
TLS certificate served expires; and every cluster's circuit-breaker limits, so that Envoy's
`remaining_*` gauges can be read as a fraction of the budget and an alert fires before a budget
is spent, not when it trips.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.registry import Collector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from controlplane.ir import types as ir
from controlplane.translate import capacity
from controlplane.translate.to_ir import Translation
from controlplane.xds import SnapshotCache
from controlplane.xds.resources import SHORT_NAMES


class ControlPlaneCollector:
    def __init__(self, cache: SnapshotCache, last_translation: Callable[[], Translation | None],
                 envoys: Callable[[], Mapping[str, int]] = dict):
        self._cache = cache
        self._last_translation = last_translation
        self._envoys = envoys  # per node group: the Envoys Gateway-wide budgets are shared among

    def collect(self):
        connected = GaugeMetricFamily("controlplane_xds_connected_envoys", "Envoys with an open xDS stream.",
                                      labels=["node_group"])
        rejecting = GaugeMetricFamily("controlplane_xds_rejecting_envoys",
                                      "Envoys whose latest response of a type was NACKed and not superseded.",
                                      labels=["node_group", "type"])
        statuses = self._cache.status()
        for group, count in sorted(Counter(s.node_group for s in statuses).items()):
            connected.add_metric([group], count)
        nacked = Counter((s.node_group, SHORT_NAMES[type_url]) for s in statuses
                         for type_url, t in s.types.items()
                         if t.rejected is not None)
        for (group, kind), count in sorted(nacked.items()):
            rejecting.add_metric([group, kind], count)
        rejected = GaugeMetricFamily("controlplane_objects_not_accepted",
                                     "Gateways and Backends refused by translation.", labels=["kind", "reason"])
        translation = self._last_translation()
        if translation is not None:
            reasons = Counter((key.kind, conditions[0].reason) for key, conditions in translation.conditions.items()
                              if conditions[0].status == "False")
            for (kind, reason), count in sorted(reasons.items()):
                rejected.add_metric([kind, reason], count)
        last_accepted = GaugeMetricFamily("controlplane_objects_serving_last_accepted",
                                          "Gateways and Backends whose current version is refused, still served "
                                          "from their last accepted version.", labels=["kind"])
        if translation is not None:
            for kind, count in sorted(Counter(key.kind for key in translation.serving_last_accepted).items()):
                last_accepted.add_metric([kind], count)
        unresolved = GaugeMetricFamily("controlplane_objects_unresolved_refs",
                                       "Accepted Gateways and Backends with a reference that is not as it should be "
                                       "(reason InvalidSecret: a refused Secret; Envoys keep its last valid version).",
                                       labels=["kind", "reason"])
        limits = GaugeMetricFamily("controlplane_circuit_breaker_limit",
                                   "Each cluster's circuit-breaker limits as each Envoy runs them (computed for the "
                                   "ready endpoints, and a Gateway-wide budget's share), Envoy's defaults included; "
                                   "resource names match Envoy's circuit_breakers.<priority>.remaining_<resource> "
                                   "gauges.",
                                   labels=["envoy_cluster_name", "priority", "resource"])
        ready = GaugeMetricFamily("controlplane_backend_ready_endpoints",
                                  "Each cluster's ready endpoints (terminating ones not counted): what per-endpoint "
                                  "budgets are computed for.", labels=["envoy_cluster_name"])
        expiry = GaugeMetricFamily("controlplane_certificate_expiry_timestamp_seconds",
                                   "When the certificate Envoys are given from each TLS Secret expires (for a "
                                   "chain or a CA bundle, its first certificate to expire).",
                                   labels=["namespace", "secret", "use"])
        if translation is not None:
            for (namespace, secret, use), not_after in sorted(translation.certificate_expiry.items()):
                expiry.add_metric([namespace, secret, use], not_after)
            reasons = Counter((key.kind, conditions[1].reason) for key, conditions in translation.conditions.items()
                              if conditions[0].status == "True" and conditions[1].status == "False")
            for (kind, reason), count in sorted(reasons.items()):
                unresolved.add_metric([kind, reason], count)
            envoys = self._envoys()
            for group, cluster, priority, budget in _budgets(translation):
                for resource, limit in _effective_limits(budget, envoys.get(group, 1)):
                    limits.add_metric([cluster, priority, resource], limit)
            for group in translation.groups.values():
                for backend in group.backends:
                    count = capacity.ready_endpoints(backend.endpoints)
                    for cluster in (backend.name, *((backend.websocket.name,) if backend.websocket else ())):
                        ready.add_metric([cluster], count)
        rotations = CounterMetricFamily("controlplane_secret_rotations", "New versions of a TLS Secret replacing a "
                                        "last valid one, per object using it: accepted, or refused by the named "
                                        "check (Envoys keep the last valid version).", labels=["result", "reason"])
        if translation is not None:
            for (result, reason), count in sorted(translation.secret_rotations_total.items()):
                rotations.add_metric([result, reason], count)
        yield from (connected, rejecting, rejected, last_accepted, unresolved, limits, ready, expiry, rotations)


# Envoy's limits where a budget leaves one unset (config.cluster.v3.CircuitBreakers.Thresholds).
_ENVOY_DEFAULT_LIMITS = {"cx": 1024, "pending": 1024, "rq": 1024, "retries": 3}


def _budgets(translation: Translation):
    for name, group in translation.groups.items():
        for backend in group.backends:
            yield name, backend.name, "default", backend.default_budget
            yield name, backend.name, "high", backend.high_budget
            if backend.websocket is not None:
                yield name, backend.websocket.name, "default", backend.websocket.budget


def _effective_limits(budget: ir.Budget, envoys: int = 1):
    """The limits each Envoy enforces, as computed for the endpoints ready now and, for a
    Gateway-wide budget, shared among `envoys`. Under a retry budget the retries limit moves with
    the requests in flight: no fixed number to report."""
    configured = {"cx": budget.max_connections, "pending": budget.max_pending_requests, "rq": budget.max_requests}
    if budget.gateway_wide:
        configured = {resource: None if limit is None else capacity.share(limit, envoys)
                      for resource, limit in configured.items()}
    if budget.retry_budget is None:
        configured["retries"] = budget.max_retries
    for resource, limit in configured.items():
        yield resource, limit if limit is not None else _ENVOY_DEFAULT_LIMITS[resource]


def backend_limits(backend: ir.Backend, envoys: int = 1):
    """(Envoy cluster, "api" or "websocket", priority, resource, limit) of each budget of a Backend:
    its own cluster's and its WebSocket cluster's, side by side, as each of `envoys` runs them."""
    budgets = [(backend.name, "api", "default", backend.default_budget), (backend.name, "api", "high", backend.high_budget)]
    if backend.websocket is not None:
        budgets.append((backend.websocket.name, "websocket", "default", backend.websocket.budget))
    for cluster, traffic, priority, budget in budgets:
        for resource, limit in _effective_limits(budget, envoys):
            yield cluster, traffic, priority, resource, limit


def serve_metrics(address: str, collector: ControlPlaneCollector, *, ready: Callable[[], bool],
                  more: tuple[Collector, ...] = (), debug: Callable | None = None) -> None:
    """/metrics (`collector` and `more`), and the probes: /healthz (the process answers) and /readyz (`ready()`:
    the first configuration has been published, so a new replica takes no Envoy before it has something to serve);
    /debug/* to `debug` (runtime/debug_views.py)."""
    registry = CollectorRegistry()
    for each in (collector, *more):
        registry.register(each)
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok = path == "/healthz" or ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready: no configuration published yet\n"]
        if debug is not None and path.startswith("/debug/"):
            return debug(environ, start_response)  # runtime/debug_views.py
        return metrics(environ, start_response)

    host, _, port = address.rpartition(":")
    server = make_server(host or "0.0.0.0", int(port), app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass
