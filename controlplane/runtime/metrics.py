"""Prometheus metrics, computed when scraped from the cache's status view and the last translation.

Nothing is counted on the push path. What an alert needs: Envoys connected per node group, Envoys
whose last response of a type was rejected (a NACK not yet followed by an accepted version), and
objects that are not accepted, per kind and reason.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

from controlplane.translate.to_ir import Translation
from controlplane.xds import SnapshotCache
from controlplane.xds.resources import SHORT_NAMES


class ControlPlaneCollector:
    def __init__(self, cache: SnapshotCache, last_translation: Callable[[], Translation | None]):
        self._cache = cache
        self._last_translation = last_translation

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
        yield from (connected, rejecting, rejected)


def serve_metrics(address: str, collector: ControlPlaneCollector, *, ready: Callable[[], bool]) -> None:
    """/metrics, and the probes: /healthz (the process answers) and /readyz (`ready()`: the first
    configuration has been published, so a new replica takes no Envoy before it has something to serve)."""
    registry = CollectorRegistry()
    registry.register(collector)
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok = path == "/healthz" or ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready: no configuration published yet\n"]
        return metrics(environ, start_response)

    host, _, port = address.rpartition(":")
    server = make_server(host or "0.0.0.0", int(port), app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass
