"""The intermediate representation: what one group of Envoys should do, in our own words.

Frozen values. Translation builds them from Kubernetes objects (to_ir) and turns them into Envoy
resources (to_xds); neither side's types leak through.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple


class Endpoint(NamedTuple):
    """A NamedTuple, not a dataclass: built in C, and a full translation builds one per endpoint."""

    address: str
    port: int
    draining: bool = False  # terminating but still serving: only used when nothing else is healthy


@dataclass(frozen=True)
class RetryBudget:
    """Retries in flight at most `percent` of the requests in flight, and `min_concurrency` at any rate."""

    percent: int = 20
    min_concurrency: int = 3


@dataclass(frozen=True)
class Budget:
    """Circuit-breaker thresholds for one priority, as computed for the endpoints ready now; None
    leaves Envoy's default. A retry budget, when set, replaces max_retries (Envoy ignores it then)."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None
    retry_budget: RetryBudget | None = None
    per_host_max_connections: int | None = None  # what any one endpoint may be given
    runtime_limits: tuple[tuple[str, int], ...] = ()
    """(limit, the cluster's fixed value) for each limit that moves: computed per endpoint, or
    shared among a Gateway's Envoys. The cluster carries the fixed value, and the one Envoy runs
    reaches it as a runtime override (RTDS), so that an endpoint or an Envoy coming or going never
    changes the cluster (Envoy would count a changed cluster from zero)."""
    gateway_wide: bool = False
    """The limits are the whole Gateway's: each Envoy's runtime override is its share of them."""


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway_failures: int = 5
    interval_s: int = 10
    base_ejection_time_s: int = 30
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class HealthCheck:
    path: str
    interval_s: int = 5
    timeout_s: int = 1
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True)
class Retries:
    attempts: int
    retry_on: tuple[str, ...]
    per_try_timeout_ms: int | None = None


@dataclass(frozen=True)
class Backend:
    """An upstream cluster: one Backend object's Service port."""

    name: str
    endpoints: tuple[Endpoint, ...]
    default_budget: Budget = Budget()
    high_budget: Budget = Budget()
    connect_timeout_ms: int = 1000
    websocket: WebSocketCluster | None = None
    tls: UpstreamTls | None = None
    outlier_detection: OutlierDetection | None = OutlierDetection()
    health_check: HealthCheck | None = None
    max_requests_per_connection: int | None = None


@dataclass(frozen=True)
class WebSocketCluster:
    """A Backend's WebSocket upgrades: a second cluster over the same endpoints, with its own budget."""

    name: str
    budget: Budget = Budget()


@dataclass(frozen=True)
class WebSocketRoute:
    """Where a route's WebSocket upgrades go, and how long they may last. Apart from the cluster:
    routes follow the spec alone, while the cluster's budget follows the endpoints."""

    cluster: str
    idle_timeout_s: int | None = None  # None: Envoy's stream idle timeout
    max_duration_s: int | None = None  # None: until idle


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    value: str


@dataclass(frozen=True)
class Route:
    backend: str
    path_prefix: str | None = None
    path: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    high_priority: bool = False
    websocket: WebSocketRoute | None = None  # where this route's WebSocket upgrades go; None refuses them
    retries: Retries | None = None

    @cached_property
    def match_key(self) -> tuple:
        """Two routes with the same key match the same requests: only one can win."""
        return (self.path, self.path_prefix, tuple(sorted((h.name.lower(), h.value) for h in self.headers)))


@dataclass(frozen=True)
class Certificate:
    """A validated certificate chain and its private key (PEM), served to Envoy over SDS."""

    name: str
    certificate_chain: bytes
    private_key: bytes


@dataclass(frozen=True)
class TrustedCa:
    """Validated CA certificates (PEM) that peer certificates must chain to: a listener's clients
    (mutual TLS) or a Backend's endpoints (upstream TLS)."""

    name: str
    certificates: bytes


@dataclass(frozen=True)
class Tls:
    certificate: Certificate
    client_ca: TrustedCa | None = None


@dataclass(frozen=True)
class UpstreamTls:
    """TLS to a Backend's endpoints: SNI `hostname`, which their certificates must name and chain to `ca`."""

    hostname: str
    ca: TrustedCa
    client_certificate: Certificate | None = None


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    routes: tuple[Route, ...]
    max_connections: int | None = None
    tls: Tls | None = None


@dataclass(frozen=True)
class NodeGroup:
    """Everything the Envoys of one node group (a Gateway's nodeCluster) get."""

    name: str
    listeners: tuple[Listener, ...]
    backends: tuple[Backend, ...]
