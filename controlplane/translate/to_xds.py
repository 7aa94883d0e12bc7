"""IR -> Envoy resources: one consistent `Snapshot` per node group. Pure and deterministic.

Each Backend is an EDS cluster with two circuit-breaker budgets: DEFAULT for ordinary routes,
HIGH for routes marked `priority: High`, so a flood of ordinary traffic cannot exhaust the budget
that critical paths (login) draw on. Each Gateway listener is an HTTP listener with its route
configuration over RDS; its routes are already ordered most specific first.

A Backend with a `websocket` block gets a second cluster over the same endpoints, with a budget of
its own, and each of its routes a twin just before it that matches WebSocket upgrades and sends
them there: a surge of WebSockets exhausts the WebSocket budget, never the one logins draw on.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from controlplane.ir import types as ir
from controlplane.translate import builders as b
from controlplane.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, RUNTIME, SECRET, Resource, Snapshot


def snapshot(group: ir.NodeGroup) -> Snapshot:
    """Build from scratch (see `SnapshotBuilder` for a stream of node groups)."""
    return SnapshotBuilder().snapshot(group)


class SnapshotBuilder:
    """Builds one node group's snapshots, re-serializing only what changed since the last one.

    IR values that did not change are the very same objects (see `to_ir.Translator`), so their
    serialized resources are reused by identity; a type whose resources are all reused keeps its
    ResourceSet (and the memoised responses of the xDS streams) through `Snapshot.replace`.
    """

    def __init__(self):
        self._resources: dict[int, tuple[object, tuple[Resource, ...]]] = {}
        self._last = Snapshot()  # so the first snapshot, like every other, is a replace of what changed
        self._last_lists: dict[str, list[Resource]] = {}
        self._by_name: dict[tuple[str, str], Resource] = {}
        self._runtime: tuple[tuple[tuple[str, int], ...], Resource] | None = None

    def _built(self, value, build, fresh: dict) -> tuple[Resource, ...]:
        entry = self._resources.get(id(value))
        if entry is None or entry[0] is not value:
            # A rebuilt value often serializes some resources to the same bytes (a Backend whose
            # endpoints moved keeps its cluster): keep those Resource objects, so their type is reused.
            entry = (value, tuple(self._same_as_before(resource) for resource in build(value)))
        fresh[id(value)] = entry
        return entry[1]

    def _same_as_before(self, resource: Resource) -> Resource:
        before = self._by_name.get((resource.type_url, resource.name))
        return before if before is not None and before.version == resource.version else resource

    def _runtime_resource(self, group: ir.NodeGroup) -> Resource:
        """The group's runtime layer: the limits computed per endpoint, by runtime key. The same
        values keep the same Resource."""
        values = tuple(sorted(override for backend in group.backends for override in budget_overrides(backend)))
        if self._runtime is None or self._runtime[0] != values:
            self._runtime = (values, Resource.from_message(RUNTIME, b.runtime_layer(dict(values))))
        return self._runtime[1]

    def snapshot(self, group: ir.NodeGroup) -> Snapshot:
        fresh: dict[int, tuple[object, tuple[Resource, ...]]] = {}
        per_backend = [self._built(backend, _backend_resources, fresh) for backend in group.backends]
        per_listener = [self._built(listener, _listener_resources, fresh) for listener in group.listeners]
        used_secrets = {secret.name: secret for listener in group.listeners if listener.tls is not None
                        for secret in (listener.tls.certificate, listener.tls.client_ca) if secret is not None}
        used_secrets.update((secret.name, secret) for backend in group.backends if backend.tls is not None
                            for secret in (backend.tls.ca, backend.tls.client_certificate) if secret is not None)
        per_secret = [self._built(secret, _secret_resources, fresh) for _name, secret in sorted(used_secrets.items())]
        runtime = self._runtime_resource(group)
        self._resources = fresh
        self._by_name = {(r.type_url, r.name): r for _value, built in fresh.values() for r in built}
        lists = {CLUSTER: [r for built in per_backend for r in built[1:]], ENDPOINT: [r[0] for r in per_backend],
                 LISTENER: [r[0] for r in per_listener], ROUTE: [r[1] for r in per_listener],
                 SECRET: [r[0] for r in per_secret], RUNTIME: [runtime]}
        changed = {_ARGUMENT[type_url]: items for type_url, items in lists.items()
                   if not _same(items, self._last_lists.get(type_url))}
        built = self._last.replace(**changed)
        self._last, self._last_lists = built, lists
        return built


_ARGUMENT = {CLUSTER: "clusters", ENDPOINT: "endpoints", LISTENER: "listeners", ROUTE: "routes",
             SECRET: "secrets", RUNTIME: "runtimes"}


def budget_overrides(backend: ir.Backend) -> list[tuple[str, int]]:
    """(runtime key, value) of each of the Backend's limits that follow its endpoints."""
    budgets = [(backend.name, base_pb2.DEFAULT, backend.default_budget), (backend.name, base_pb2.HIGH,
                                                                          backend.high_budget)]
    if backend.websocket is not None:
        budgets.append((backend.websocket.name, base_pb2.DEFAULT, backend.websocket.budget))
    return [(b.budget_runtime_key(cluster_name, priority, limit), getattr(budget, limit))
            for cluster_name, priority, budget in budgets for limit, _fixed in budget.follows_endpoints]


def _same(new: list, old: list | None) -> bool:
    return old is not None and len(new) == len(old) and all(a is b for a, b in zip(new, old))


def _backend_resources(backend: ir.Backend) -> tuple[Resource, ...]:
    """The Backend's endpoints, then its clusters: its own and, if it has one, its WebSocket cluster."""
    built = [Resource.from_message(ENDPOINT, endpoints(backend)), Resource.from_message(CLUSTER, cluster(backend))]
    if backend.websocket is not None:
        built.append(Resource.from_message(CLUSTER, websocket_cluster(backend)))
    return tuple(built)


def _secret_resources(secret: ir.Certificate | ir.TrustedCa) -> tuple[Resource, ...]:
    if isinstance(secret, ir.Certificate):
        return (Resource.from_message(SECRET, b.certificate_secret(secret.name, secret.certificate_chain,
                                                                   secret.private_key)),)
    return (Resource.from_message(SECRET, b.trusted_ca_secret(secret.name, secret.certificates)),)


def _listener_resources(listener: ir.Listener) -> tuple[Resource, ...]:
    tls = None
    if listener.tls is not None:
        client_ca = listener.tls.client_ca
        tls = b.downstream_tls(listener.tls.certificate.name, client_ca.name if client_ca is not None else None)
    built = b.http_listener(listener.name, address=listener.address, port=listener.port,
                            route_config_name=listener.name, max_connections=listener.max_connections,
                            transport_socket=tls)
    return (Resource.from_message(LISTENER, built), Resource.from_message(ROUTE, route_configuration(listener)))


def cluster(backend: ir.Backend):
    budgets = {base_pb2.DEFAULT: backend.default_budget, base_pb2.HIGH: backend.high_budget}
    return b.eds_cluster(backend.name, **_cluster_options(backend, budgets))


def websocket_cluster(backend: ir.Backend):
    """Over the Backend's endpoints (its ClusterLoadAssignment), with the WebSocket budget only."""
    websocket = backend.websocket
    return b.eds_cluster(websocket.name, endpoints_name=backend.name,
                         **_cluster_options(backend, {base_pb2.DEFAULT: websocket.budget}))


def _cluster_options(backend: ir.Backend, budgets: dict[int, ir.Budget]) -> dict:
    """What a Backend's clusters share, but their budgets: endpoints' TLS, ejection, health checks."""
    outlier, check = backend.outlier_detection, backend.health_check
    return {
        "connect_timeout_ms": backend.connect_timeout_ms,
        "budgets": [_thresholds(priority, budget) for priority, budget in budgets.items()],
        "per_host_budgets": [b.per_host_thresholds(priority, budget.per_host_max_connections)
                             for priority, budget in budgets.items() if budget.per_host_max_connections is not None],
        "transport_socket": _upstream_tls(backend),
        "outlier": None if outlier is None else b.outlier_detection(
            consecutive_5xx=outlier.consecutive_5xx, consecutive_gateway_failures=outlier.consecutive_gateway_failures,
            interval_s=outlier.interval_s, base_ejection_time_s=outlier.base_ejection_time_s,
            max_ejection_percent=outlier.max_ejection_percent),
        "health_checks": [] if check is None else [b.http_health_check(
            check.path, interval_s=check.interval_s, timeout_s=check.timeout_s,
            unhealthy_threshold=check.unhealthy_threshold, healthy_threshold=check.healthy_threshold)],
        "max_requests_per_connection": backend.max_requests_per_connection,
    }


def _upstream_tls(backend: ir.Backend):
    tls = backend.tls
    if tls is None:
        return None
    client_certificate = tls.client_certificate.name if tls.client_certificate is not None else None
    return b.upstream_tls(tls.hostname, tls.ca.name, client_certificate)


def endpoints(backend: ir.Backend):
    return b.load_assignment(backend.name, [(e.address, e.port) for e in backend.endpoints],
                             draining={(e.address, e.port) for e in backend.endpoints if e.draining})


def route_configuration(listener: ir.Listener):
    routes = []
    for route in listener.routes:
        headers = [(h.name, h.value) for h in route.headers]
        if route.websocket is not None:  # its upgrades first: the same match, plus `upgrade: websocket`
            routes.append(b.websocket_route(route.websocket.cluster, prefix=route.path_prefix, path=route.path,
                                            headers=headers, idle_timeout_s=route.websocket.idle_timeout_s,
                                            max_duration_s=route.websocket.max_duration_s))
        retries = route.retries
        policy = None if retries is None else b.retry_policy(retries.attempts, retries.retry_on,
                                                             per_try_timeout_ms=retries.per_try_timeout_ms)
        routes.append(b.route(route.backend, prefix=route.path_prefix, path=route.path, headers=headers,
                              high_priority=route.high_priority, retry_policy=policy))
    return b.route_configuration(listener.name, [b.virtual_host("all", routes)])


def _thresholds(priority: int, budget: ir.Budget):
    fixed = dict(budget.follows_endpoints)  # the computed value comes over RTDS (budget_overrides)
    return b.thresholds(priority, max_connections=fixed.get("max_connections", budget.max_connections),
                        max_pending_requests=fixed.get("max_pending_requests", budget.max_pending_requests),
                        max_requests=fixed.get("max_requests", budget.max_requests),
                        max_retries=budget.max_retries, retry_budget=None if budget.retry_budget is None else (
                            budget.retry_budget.percent, budget.retry_budget.min_concurrency))
