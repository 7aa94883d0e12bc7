"""`/debug/envoys` and `/debug/config?node=ID` on the metrics port: what `controlplane status` reads
from a running `serve`.

Why on the metrics port, and only for loopback peers: the metrics port is reachable by anything in
the cluster that scrapes it, and a node group's configuration (certificates, routes, every
backend's address) is the admin's to see, not every pod's. `kubectl port-forward` arrives at the pod
as a loopback connection, so who may port-forward to the control plane (the admin identity, by
RBAC) sees these views, and a scraper gets 403 with a sentence saying why. Private keys never
appear: the configuration is rendered as Envoy's own /config_dump shows it, keys redacted.

The WSGI server runs these in its own threads: they read the cache's status (as the metrics do)
and its immutable snapshots, nothing they could see half-changed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import time
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs

from controlplane.runtime import envoy_rows
from controlplane.translate import render
from controlplane.xds import SnapshotCache

PREFIX = "/debug/"


def is_loopback(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return parsed.is_loopback


class DebugViews:
    def __init__(self, cache: SnapshotCache, replica: str, budgets: Callable[[], list] | None = None):
        self._cache = cache
        self._replica = replica
        self._budgets = budgets  # envoy_stats.budget_use of what the Envoys pushed, when they push stats

    def __call__(self, environ, start_response) -> Iterable[bytes]:
        if not is_loopback(environ.get("REMOTE_ADDR", "")):
            return _answer(start_response, "403 Forbidden", {
                "error": f"{environ.get('PATH_INFO')} answers only connections from this host (127.0.0.1 or ::1): it "
                         "shows every Envoy's configuration. Use `kubectl port-forward` to the control plane's "
                         "pod, or run `controlplane status` there."})
        path = environ.get("PATH_INFO", "")
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if path == "/debug/envoys":
            return _answer(start_response, "200 OK", self.envoys())
        if path == "/debug/config":
            node = (query.get("node") or [""])[0]
            if not node:
                return _answer(start_response, "400 Bad Request", {"error": "give ?node=ID (an Envoy's node id)"})
            found = self.config(node)
            if found is None:
                return _answer(start_response, "404 Not Found", {
                    "error": f"no Envoy with node id {node!r} is connected to this replica ({self._replica}); "
                             "`controlplane status` lists the connected ones"})
            return _answer(start_response, "200 OK", found)
        return _answer(start_response, "404 Not Found", {"error": f"{path}: the debug views are /debug/envoys "
                                                                  "and /debug/config?node=ID"})

    def envoys(self) -> dict:
        statuses = self._cache.status()
        snapshots = {}
        for group in sorted({envoy.node_group for envoy in statuses}):
            snapshot = self._cache.snapshot(group)
            snapshots[group] = snapshot.version if snapshot is not None else ""
        budgets = [dataclasses.asdict(use) for use in self._budgets()] if self._budgets is not None else []
        return {"replica": self._replica, "at": time.time(), "rows": envoy_rows.rows(statuses, self._replica),
                "left_out": 0, "snapshots": snapshots, "budgets": budgets}

    def config(self, node: str) -> dict | None:
        """What the Envoy `node` is being sent: its node group's snapshot, as /config_dump keys it."""
        envoy = next((envoy for envoy in self._cache.status() if envoy.node_id == node), None)
        if envoy is None:
            return None
        snapshot = self._cache.snapshot(envoy.node_group)
        dump = render.config_dump(snapshot) if snapshot is not None else {"configs": []}
        return {"node": node, "group": envoy.node_group, "replica": self._replica,
                "snapshot": snapshot.version if snapshot is not None else "",
                "row": envoy_rows.row(envoy, self._replica), "config_dump": dump}


def _answer(start_response: Callable, status: str, body: dict) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"]
