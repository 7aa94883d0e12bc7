"""Circuit-breaker budgets that follow the ready endpoints (Backend `perEndpoint`), and the rest of
a Backend's protection from the spec: retry budgets, ejection, health checks, route retries.

Why: in the WebSocket-surge outage, one pod of two restarted and the cluster's budget stayed the
same, so the lone pod was offered twice its share and the circuit breaker opened on logins. A
per-endpoint budget makes the cluster's limits per-endpoint capacity × ready endpoints, clamped
to `min`/`max`, and gives Envoy the per-host connection limit, so no endpoint is ever given more
than its own capacity. Pure: translation recomputes it on every EndpointSlice change.

A budget of `scope: Gateway` is the whole fleet's: each Envoy of the Gateway runs its `share`, the
total divided by the Envoys counted (runtime/, from every replica's Envoy records), so scaling the
gateway from 2 to 4 Envoys never doubles what the backend is offered.
"""

from __future__ import annotations

import functools

from controlplane.ir import types as ir
from controlplane.model import crds

CEILING = 10_000_000
"""A computed limit never exceeds what the model accepts as a fixed one (Envoy's UInt32 holds it)."""

DEFAULT_RETRY_BUDGET = ir.RetryBudget()
"""Where neither maxRetries nor retryBudget is set: Envoy's own retry-budget defaults, 20% and 3."""


def ready_endpoints(endpoints: tuple[ir.Endpoint, ...]) -> int:
    return sum(1 for endpoint in endpoints if not endpoint.draining)


def counted_endpoints(endpoints: tuple[ir.Endpoint, ...]) -> int:
    """The endpoints a budget is computed for: the ready ones, and 1 when none is ready.

    With no ready endpoint, Envoy sends to draining (terminating but serving) ones, and a pod that
    becomes ready gets traffic before the next EndpointSlice event: one endpoint's worth never
    overloads any endpoint (the per-host limit holds it) and never shuts the cluster (0 would)."""
    return max(1, ready_endpoints(endpoints))


def budget(thresholds: crds.Thresholds, endpoints: tuple[ir.Endpoint, ...]) -> ir.Budget:
    """One priority's budget for these endpoints: fixed limits as written, per-endpoint ones computed."""
    per_endpoint = thresholds.per_endpoint
    return _budget(thresholds.max_connections, thresholds.max_pending_requests, thresholds.max_requests,
                   thresholds.max_retries, thresholds.retry_budget, thresholds.scope is crds.Scope.GATEWAY,
                   per_endpoint, counted_endpoints(endpoints) if per_endpoint is not None else 0)


@functools.lru_cache(maxsize=4096)
def _budget(max_connections: int | None, max_pending_requests: int | None, max_requests: int | None,
            max_retries: int | None, retry_budget: crds.RetryBudget | None, gateway_wide: bool,
            per_endpoint: crds.PerEndpoint | None, count: int) -> ir.Budget:
    """One object for every equal budget: thousands of Backends share a few (their thresholds as
    written, and for a per-endpoint one the number of endpoints counted), and making each again was
    a twentieth of a full translation at 10,000 Backends."""
    limits = {"max_connections": max_connections, "max_pending_requests": max_pending_requests,
              "max_requests": max_requests}
    per_host = None
    follows: list[tuple[str, int]] = []
    if per_endpoint is not None:
        for field in limits:
            each = getattr(per_endpoint, field)
            if each is None:
                continue
            computed = each * count
            low, high = getattr(per_endpoint.min, field), getattr(per_endpoint.max, field)
            if low is not None:
                computed = max(computed, low)
            if high is not None:
                computed = min(computed, high)
            limits[field] = min(computed, CEILING)
            # The cluster's own value, constant while endpoints come and go: the runtime override sets
            # the computed one. An Envoy without our runtime layer falls back to it: the maximum.
            follows.append((field, min(high if high is not None else CEILING, CEILING)))
        per_host = per_endpoint.max_connections
    if gateway_wide:  # a fixed limit moves too: with the number of Envoys sharing it
        computed = {field for field, _fixed in follows}
        follows.extend((field, value) for field, value in limits.items() if value is not None and field not in computed)
    if retry_budget is not None:
        retry_budget = ir.RetryBudget(retry_budget.percent, retry_budget.min_concurrency)
    elif max_retries is None:
        retry_budget = DEFAULT_RETRY_BUDGET
    return ir.Budget(**limits, max_retries=max_retries, retry_budget=retry_budget,
                     per_host_max_connections=per_host, runtime_limits=tuple(follows),
                     gateway_wide=gateway_wide)


def share(total: int, envoys: int) -> int:
    """One Envoy's share of a Gateway-wide limit: rounded down, so the fleet never offers more than
    the total (with more Envoys than the total, each gets 1: a limit of 0 would shut the cluster)."""
    return max(1, total // max(1, envoys))


def backend_fields(spec: crds.BackendSpec, endpoints: tuple[ir.Endpoint, ...], *, websocket_name: str) -> dict:
    """The ir.Backend fields that come from the spec's capacity settings, for these endpoints."""
    breakers = spec.circuit_breakers
    websocket = None
    if spec.websocket is not None:
        websocket = ir.WebSocketCluster(websocket_name, budget(spec.websocket.circuit_breakers, endpoints))
    outlier = spec.outlier_detection
    check = spec.health_check
    return {
        "default_budget": budget(breakers.default, endpoints), "high_budget": budget(breakers.high, endpoints),
        "websocket": websocket,
        "outlier_detection": _outlier_detection(outlier.consecutive_5xx, outlier.consecutive_gateway_failures,
                                                outlier.interval_seconds, outlier.base_ejection_time_seconds,
                                                outlier.max_ejection_percent),
        "health_check": None if check is None else _health_check(check.path, check.interval_seconds,
                                                                 check.timeout_seconds, check.unhealthy_threshold,
                                                                 check.healthy_threshold),
        "max_requests_per_connection": spec.max_requests_per_connection,
    }


_outlier_detection = functools.lru_cache(maxsize=1024)(ir.OutlierDetection)  # one object for equal values, as budgets
_health_check = functools.lru_cache(maxsize=1024)(ir.HealthCheck)


def retries(spec: crds.Retries | None) -> ir.Retries | None:
    if spec is None:
        return None
    return ir.Retries(spec.attempts, tuple(condition.value for condition in spec.retry_on), spec.per_try_timeout_ms)
