"""IR -> Envoy resources: one consistent `Snapshot` per node group. Pure and deterministic.

Each Backend is an EDS cluster with two circuit-breaker budgets: DEFAULT for ordinary routes,
HIGH for routes marked `priority: High`, so a flood of ordinary traffic cannot exhaust the budget
that critical paths (login) draw on. Each Gateway listener is an HTTP listener with its route
configuration over RDS; its routes are already ordered most specific first.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from controlplane.ir import types as ir
from controlplane.translate import builders as b
from controlplane.xds import Snapshot


def snapshot(group: ir.NodeGroup) -> Snapshot:
    return Snapshot(
        clusters=[cluster(backend) for backend in group.backends],
        endpoints=[endpoints(backend) for backend in group.backends],
        listeners=[b.http_listener(listener.name, address=listener.address, port=listener.port,
                                   route_config_name=listener.name, max_connections=listener.max_connections)
                   for listener in group.listeners],
        routes=[route_configuration(listener) for listener in group.listeners],
    )


def cluster(backend: ir.Backend):
    return b.eds_cluster(backend.name, connect_timeout_ms=backend.connect_timeout_ms, budgets=[
        _thresholds(base_pb2.DEFAULT, backend.default_budget), _thresholds(base_pb2.HIGH, backend.high_budget)])


def endpoints(backend: ir.Backend):
    return b.load_assignment(backend.name, [(e.address, e.port) for e in backend.endpoints],
                             draining={(e.address, e.port) for e in backend.endpoints if e.draining})


def route_configuration(listener: ir.Listener):
    routes = [b.route(route.backend, prefix=route.path_prefix, path=route.path,
                      headers=[(h.name, h.value) for h in route.headers], high_priority=route.high_priority)
              for route in listener.routes]
    return b.route_configuration(listener.name, [b.virtual_host("all", routes)])


def _thresholds(priority: int, budget: ir.Budget):
    return b.thresholds(priority, max_connections=budget.max_connections,
                        max_pending_requests=budget.max_pending_requests, max_requests=budget.max_requests,
                        max_retries=budget.max_retries)
