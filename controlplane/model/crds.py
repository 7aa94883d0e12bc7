"""The `xds.controlplane.dev/v1alpha1` CRDs, Gateway and Backend, as pydantic models.

These models are the single source of truth: `k8s/crds/*.yaml` are generated from them
(`make crds`), and a test fails when the two drift. Unknown fields are errors, not silently
dropped: a typo in a circuit-breaker budget must not leave the budget at its default.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from controlplane.model import problems

GROUP = "xds.controlplane.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Every string that reaches Envoy has a pattern or a check, and every number a range, within what
# Envoy accepts (tests/test_envoy_refuses.py holds them to the real Envoy). Numbers are strict:
# `true` or "80" is not a port, as the API server's schema (type: integer) would say too.
DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=problems.DNS_LABEL)]
DnsName = Annotated[str, Field(min_length=1, max_length=253, pattern=problems.DNS_NAME)]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Budget = Annotated[int, Field(strict=True, ge=1, le=10_000_000)]
"""Circuit-breaker thresholds (UInt32Value in Envoy) and connection limits (UInt64Value, at least 1)."""

_WHY_IP = " (Envoy binds an IP literal, such as 0.0.0.0 or ::)"
IpAddress = Annotated[str, Field(max_length=45, json_schema_extra={"x-kubernetes-validations": [
    {"rule": "isIP(self)", "message": "must be an IP address (Envoy binds an IP literal, such as 0.0.0.0 or ::)"}]}),
    AfterValidator(lambda value: problems.ip_literal(value, why=_WHY_IP))]
"""An IP literal Envoy can bind: IPv4 or IPv6, with no zone; CEL `isIP()` (Kubernetes 1.31+) says the same."""

PortOrName = Annotated[int | str, PlainValidator(problems.port_or_name), WithJsonSchema({
    "x-kubernetes-int-or-string": True,
    "x-kubernetes-validations": [{
        "rule": f"type(self) == int ? self >= 1 && self <= 65535 : self.matches('{problems.DNS_LABEL}') "
                "&& size(self) <= 63",
        "message": "must be a port number (1-65535) or a port name (a DNS label, such as http)"}]})]


class Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Protocol(str, Enum):
    HTTP = "HTTP"
    HTTPS = "HTTPS"


class ListenerTls(Spec):
    certificate_secret: DnsLabel = Field(description="A kubernetes.io/tls Secret (tls.crt, tls.key) in the "
                                         "Gateway's namespace: the certificate Envoy presents.")
    client_ca_secret: DnsLabel | None = Field(None, description="A Secret with ca.crt: when set, clients must "
                                              "present a certificate signed by it (mutual TLS). A new ca.crt that "
                                              "drops a CA is refused unless the Secret's annotation "
                                              "xds.controlplane.dev/drop-cas lists its SHA-256 fingerprint.")
    clients_trust_secret: DnsLabel | None = Field(None, description="A Secret with ca.crt: what this listener's "
                                                  "clients trust. A certificate that does not chain to it is refused. "
                                                  "Unset: a rotation must chain to the ca.crt of the certificate "
                                                  "Secret's last valid version.")


class Listener(Spec):
    """A port Envoy listens on: plain HTTP, or HTTPS with certificates served over SDS."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "(self.protocol == 'HTTPS') == has(self.tls)",
         "message": "tls is required for HTTPS, and only for it"}]})

    name: DnsLabel
    port: Port
    protocol: Protocol = Protocol.HTTP
    address: IpAddress = Field("0.0.0.0", description="The IP address Envoy binds, 0.0.0.0 by default "
                               "(:: for IPv6).")
    hostname: Annotated[str, Field(max_length=253, pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                                   r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")] | None = Field(
        None, description="The name clients reach this listener by, as in Gateway API (a wildcard such as "
        "*.example.com allowed): its certificate must cover it, or a rotation to it is refused.")
    tls: ListenerTls | None = None

    @model_validator(mode="after")
    def _tls_for_https(self) -> Listener:
        if (self.protocol == Protocol.HTTPS) != (self.tls is not None):
            raise ValueError("tls is required for protocol HTTPS, and only for it")
        return self


class GatewayLimits(Spec):
    max_connections: Budget | None = Field(None, description="Downstream connections per listener.")


class GatewaySpec(Spec):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.listeners.all(a, self.listeners.exists_one(b, b.port == a.port))",
         "message": "listener ports must be unique"},
        {"rule": "self.listeners.all(a, self.listeners.exists_one(b, b.name == a.name))",
         "message": "listener names must be unique"},
    ]})

    node_cluster: DnsLabel = Field(description="Envoys whose node.cluster equals this get this Gateway.")
    listeners: list[Listener] = Field(min_length=1, max_length=64)
    limits: GatewayLimits = GatewayLimits()
    min_certificate_lifetime: Annotated[str, Field(min_length=2, max_length=24, pattern=r"^(?:(\d{1,6})h)?"
                                                   r"(?:(\d{1,6})m)?(?:(\d{1,6})s)?$")] | None = Field(
        None, description="The remaining lifetime a new certificate of this Gateway must have, such as 24h or "
        "90m (the default: the serve flag, 24h): a rotation to one that expires sooner is refused.")

    @model_validator(mode="after")
    def _unique_listeners(self) -> GatewaySpec:
        for what in ("name", "port"):
            values = [getattr(listener, what) for listener in self.listeners]
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise problems.problem("unique", f"listener {what}s must be unique; repeated: {', '.join(repeated)}",
                                       at=".listeners")
        return self


class Priority(str, Enum):
    DEFAULT = "Default"
    HIGH = "High"


class HeaderMatch(Spec):
    name: Annotated[str, Field(min_length=1, max_length=256, pattern=problems.HEADER_NAME)]
    value: Annotated[str, Field(max_length=4096, pattern=problems.HEADER_VALUE)]


class RetryOn(str, Enum):
    """The conditions a route may retry on (Envoy's x-envoy-retry-on values for HTTP)."""

    SERVER_ERROR = "5xx"
    GATEWAY_ERROR = "gateway-error"
    RESET = "reset"
    RESET_BEFORE_REQUEST = "reset-before-request"
    CONNECT_FAILURE = "connect-failure"
    RETRIABLE_4XX = "retriable-4xx"
    REFUSED_STREAM = "refused-stream"


class Retries(Spec):
    """Retries of a route's requests, drawn from its cluster's retry budget (so they cannot multiply a surge)."""

    attempts: Annotated[int, Field(strict=True, ge=1, le=10)] = Field(1, description="Retries after the first try.")
    retry_on: list[RetryOn] = Field(default_factory=lambda: [RetryOn.CONNECT_FAILURE, RetryOn.REFUSED_STREAM,
                                                             RetryOn.GATEWAY_ERROR],
                                    min_length=1, max_length=7, json_schema_extra={"x-kubernetes-list-type": "set"},
                                    description="When to retry: 5xx, gateway-error (502, 503, 504), reset, "
                                    "reset-before-request, connect-failure, retriable-4xx (409), refused-stream. "
                                    "Default: connect-failure, refused-stream, gateway-error.")
    per_try_timeout_ms: Annotated[int, Field(strict=True, ge=1, le=3_600_000)] | None = Field(
        None, description="Each try's timeout. Unset: the route's (15 s) covers all tries.")

    @model_validator(mode="after")
    def _each_condition_once(self) -> Retries:
        if len(set(self.retry_on)) != len(self.retry_on):
            raise problems.problem("unique", "retryOn lists a condition twice: list each once", at=".retryOn")
        return self


class Route(Spec):
    """One route to the Backend: a path prefix or an exact path, optionally with headers."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.pathPrefix) != has(self.path)", "message": "set exactly one of pathPrefix and path"}]})

    path_prefix: Annotated[str, Field(pattern=problems.PATH, max_length=1024)] | None = None
    path: Annotated[str, Field(pattern=problems.PATH, max_length=1024)] | None = None
    headers: list[HeaderMatch] = Field(default_factory=list, max_length=16)
    priority: Priority = Field(Priority.DEFAULT, description="High: served from the cluster's high-priority "
                               "circuit-breaker budget (use it for critical paths such as login).")
    retries: Retries | None = Field(None, description="Retry failed requests (never WebSocket upgrades). Unset: "
                                    "no retries.")

    @model_validator(mode="after")
    def _one_path(self) -> Route:
        if (self.path_prefix is None) == (self.path is None):
            raise ValueError("set exactly one of pathPrefix and path")
        return self


_CAPACITY = ("maxConnections", "maxPendingRequests", "maxRequests")
_FIELD = {"maxConnections": "max_connections", "maxPendingRequests": "max_pending_requests",
          "maxRequests": "max_requests"}
"""Each limit's field name, looked up: pydantic's to_snake (regular expressions) on every Backend's
thresholds was 17% of a full translation at 10,000 Backends."""
Seconds = Annotated[int, Field(strict=True, ge=1, le=86_400)]


class RetryBudget(Spec):
    """Envoy's retry budget: retries in flight never exceed a share of the requests in flight."""

    percent: Annotated[int, Field(strict=True, ge=1, le=100)] = Field(20, description="Retries in flight, as a "
                                                                      "percentage of the requests in flight.")
    min_concurrency: Budget = Field(3, description="Retries allowed at once however few requests are in flight.")


class CapacityBounds(Spec):
    """A floor or a ceiling for a budget computed from ready endpoints: limits of the whole cluster."""

    max_connections: Budget | None = None
    max_pending_requests: Budget | None = None
    max_requests: Budget | None = None


class PerEndpoint(Spec):
    """What one endpoint can carry: the cluster's limits are these × its ready endpoints."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *({"rule": f"!has(self.{bound}) || !has(self.{bound}.{limit}) || has(self.{limit})",
           "message": f"{bound}.{limit} needs perEndpoint.{limit}: it bounds the budget computed from it"}
          for bound in ("min", "max") for limit in _CAPACITY),
        *({"rule": f"!has(self.min) || !has(self.max) || !has(self.min.{limit}) || !has(self.max.{limit}) "
                   f"|| self.min.{limit} <= self.max.{limit}",
           "message": f"min.{limit} must not exceed max.{limit}"} for limit in _CAPACITY)]})

    max_connections: Budget | None = Field(None, description="Connections one endpoint can hold. Envoy gets it as "
                                           "the per-host limit, and the cluster limit as this × ready endpoints, "
                                           "as a runtime override (RTDS) that counts the connections open already.")
    max_pending_requests: Budget | None = Field(None, description="Requests waiting for a connection, per ready "
                                                "endpoint (the cluster limit: this × ready endpoints).")
    max_requests: Budget | None = Field(None, description="Requests in flight, per ready endpoint (the cluster "
                                        "limit: this × ready endpoints).")
    min: CapacityBounds = Field(CapacityBounds(), description="Cluster limits never computed lower than these.")
    max: CapacityBounds = Field(CapacityBounds(), description="Cluster limits never computed higher than these.")

    @model_validator(mode="after")
    def _bounds_of_what_is_set(self) -> PerEndpoint:
        for limit in _CAPACITY:
            field = _FIELD[limit]
            low, high = getattr(self.min, field), getattr(self.max, field)
            for bound, value in (("min", low), ("max", high)):
                if value is not None and getattr(self, field) is None:
                    raise problems.problem("bound", f"{bound}.{limit} needs perEndpoint.{limit}: it bounds the "
                                           f"budget computed from it; set perEndpoint.{limit} or remove "
                                           f"{bound}.{limit}", at=f".{bound}.{limit}")
            if low is not None and high is not None and low > high:
                raise problems.problem("bound", f"min.{limit} ({low}) exceeds max.{limit} ({high}): lower min or "
                                       "raise max", at=f".min.{limit}")
        return self


class Scope(str, Enum):
    """Whom a budget's numbers are for: each Envoy (as Envoy counts), or a Gateway's whole fleet."""

    ENVOY = "Envoy"
    GATEWAY = "Gateway"


class Thresholds(Spec):
    """Envoy circuit-breaker thresholds: the budget of one priority on one cluster."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": f"!has(self.perEndpoint) || !has(self.perEndpoint.{limit}) || !has(self.{limit})",
         "message": f"set {limit} or perEndpoint.{limit}, not both"} for limit in _CAPACITY]})

    max_connections: Budget | None = Field(None, description="A fixed limit, whatever the number of endpoints.")
    max_pending_requests: Budget | None = None
    max_requests: Budget | None = None
    max_retries: Annotated[int, Field(strict=True, ge=0, le=10_000_000)] | None = Field(
        None, description="Retries in flight at once, fixed. Unset: a retry budget (retryBudget, by default 20% "
        "of the requests in flight, at least 3), so retries never multiply a surge.")
    retry_budget: RetryBudget | None = Field(None, description="Retries in flight as a share of the requests in "
                                             "flight. Unset and maxRetries unset: 20%, at least 3.")
    scope: Scope | None = Field(None, description="Envoy (or unset): the limits are each Envoy's, as Envoy "
                         "counts (a Gateway of 4 Envoys may offer the backend 4 times maxConnections). Gateway: the "
                         "limits are for all the Envoys of the Gateway together; each Envoy gets its share, the limit "
                         "divided by the Gateway's connected Envoys (rounded down, at least 1), recomputed as "
                         "Envoys come and go (counted across every control-plane replica, from the replicas' "
                         "Envoy records; an Envoy gone is counted out after 5 s, a new one at once). Applies to "
                         "maxConnections, maxPendingRequests and maxRequests, fixed or perEndpoint; the "
                         "per-endpoint connection limit of each Envoy stays perEndpoint.maxConnections.")
    per_endpoint: PerEndpoint | None = Field(None, description="Limits that follow the ready endpoints: recomputed "
                                             "whenever an EndpointSlice changes (one pod of two gone halves them). "
                                             "With no ready endpoint (only terminating ones, or none), one "
                                             "endpoint's worth: what a lone draining endpoint may carry.")

    @model_validator(mode="after")
    def _one_way_per_limit(self) -> Thresholds:
        for limit in _CAPACITY if self.per_endpoint is not None else ():
            field = _FIELD[limit]
            if getattr(self.per_endpoint, field) is not None and getattr(self, field) is not None:
                raise problems.problem("exclusive", f"set {limit} or perEndpoint.{limit}, not both: a fixed "
                                       f"limit, or one that follows the ready endpoints (bound it with "
                                       f"perEndpoint.min/max)", at=f".{limit}")
        if self.max_retries is not None and self.retry_budget is not None:
            raise problems.problem("exclusive", "set maxRetries or retryBudget, not both (Envoy ignores maxRetries "
                                   "under a retry budget)", at=".maxRetries")
        return self


class CircuitBreakers(Spec):
    default: Thresholds = Thresholds()
    high: Thresholds = Field(Thresholds(), description="The separate budget of High-priority routes.")


class WebSocket(Spec):
    """WebSocket upgrades on a Backend's routes, proxied on a cluster of their own.

    The split exists because of an outage: agents' WebSocket connections grew past the backend's
    connection budget, the circuit breaker opened, and logins failed with them. WebSockets drawing
    on their own budget can exhaust only that budget."""

    circuit_breakers: Thresholds = Field(Thresholds(), description="The WebSocket cluster's own budget: "
                                         "WebSockets beyond it wait for a slot (at most 15 s, then 504) or, "
                                         "with maxPendingRequests waiting, are refused (503); the Backend's "
                                         "other requests are unaffected.")
    idle_timeout_seconds: Annotated[int, Field(strict=True, ge=1, le=86_400)] | None = Field(
        None, description="Close a WebSocket after this long with no message either way. Unset: Envoy's stream "
        "idle timeout, 5 minutes; raise it for agents that stay quiet longer, or every one of them reconnects "
        "(a surge of its own).")
    max_connection_duration_seconds: Seconds | None = Field(
        None, description="Close every WebSocket after this long, so agents reconnect and spread over the "
        "endpoints ready now (after a pod restart, the others would otherwise stay on the pod that was left). "
        "Unset: a WebSocket lasts until it is idle.")


class OutlierDetection(Spec):
    """Ejecting a failing endpoint: it gets no traffic for a while, then is tried again."""

    consecutive_5xx: Annotated[int, Field(strict=True, ge=1, le=1000)] = Field(
        5, alias="consecutive5xx", description="Ejected after this many 5xx answers in a row (a refused connection counts as a 503).")
    consecutive_gateway_failures: Annotated[int, Field(strict=True, ge=1, le=1000)] = Field(
        5, description="Ejected after this many 502, 503, 504 or refused connections in a row.")
    interval_seconds: Annotated[int, Field(strict=True, ge=1, le=300)] = Field(
        10, description="How often ejections are reviewed (an ejected endpoint returns at the first review after "
        "its ejection time).")
    base_ejection_time_seconds: Annotated[int, Field(strict=True, ge=1, le=3600)] = Field(
        30, description="The first ejection's length; each new ejection of the same endpoint lasts longer.")
    max_ejection_percent: Annotated[int, Field(strict=True, ge=0, le=100)] = Field(
        50, description="Never more than this share of the endpoints ejected at once (0: never eject).")


class HealthCheck(Spec):
    """Active HTTP health checks: each Envoy asks every endpoint; one that fails is given no traffic."""

    path: Annotated[str, Field(pattern=problems.PATH, max_length=1024)] = Field(
        description="Asked with GET; 200 is healthy.")
    interval_seconds: Annotated[int, Field(strict=True, ge=1, le=3600)] = 5
    timeout_seconds: Annotated[int, Field(strict=True, ge=1, le=60)] = 1
    unhealthy_threshold: Annotated[int, Field(strict=True, ge=1, le=100)] = Field(
        2, description="Failed checks in a row before an endpoint is given no traffic.")
    healthy_threshold: Annotated[int, Field(strict=True, ge=1, le=100)] = Field(
        1, description="Passed checks in a row before it is given traffic again.")


class UpstreamTls(Spec):
    """TLS from Envoy to the Backend's endpoints, their certificates checked like a browser would."""

    ca_secret: DnsLabel = Field(description="A Secret with ca.crt: the endpoints' certificates must chain to it.")
    hostname: DnsName = Field(description="The name Envoy sends as SNI and requires in the endpoints' "
                              "certificates (a DNS subjectAltName), such as api.shop.svc.cluster.local.")
    client_certificate_secret: DnsLabel | None = Field(None, description="A kubernetes.io/tls Secret whose "
                                                       "certificate Envoy presents to the endpoints (mutual TLS).")


class ServiceRef(Spec):
    name: DnsLabel
    port: PortOrName = Field(description="The Service port, by number or by name.")


_ROUTES_DO_NOT_REPEAT = (
    "self.routes.all(a, (has(a.headers) && size(a.headers) > 0) || self.routes.exists_one(b, "
    "(!has(b.headers) || size(b.headers) == 0) && (has(a.path) ? has(b.path) && b.path == a.path : "
    "!has(b.path) && (!has(a.pathPrefix) || has(b.pathPrefix) && b.pathPrefix == a.pathPrefix))))")
"""Two routes with the same path (or pathPrefix) and no headers match the same requests. Routes with
headers are compared by translation (DuplicateRoute): their header lists are sets, and CEL cannot
compare 128 routes' sets of 16 headers within the API server's cost budget."""


class BackendSpec(Spec):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": _ROUTES_DO_NOT_REPEAT,
         "message": "routes must not repeat: two routes with the same path (or pathPrefix) and no headers match "
                    "the same requests; remove one"}]})

    gateway: DnsLabel = Field(description="The Gateway, in the Backend's namespace, that serves these routes.")
    listener: DnsLabel | None = Field(None, description="One listener of the Gateway; all of them if unset.")
    service: ServiceRef
    routes: list[Route] = Field(min_length=1, max_length=128)
    circuit_breakers: CircuitBreakers = CircuitBreakers()
    connect_timeout_ms: Annotated[int, Field(strict=True, ge=10, le=60_000)] = 1000
    tls: UpstreamTls | None = Field(None, description="TLS to the endpoints; plain text when unset.")
    websocket: WebSocket | None = Field(None, description="When set, WebSocket upgrades on these routes are "
                                        "accepted and sent to the cluster <namespace>/<name>/websocket, with "
                                        "its own circuit-breaker budget. When unset, Envoy refuses them (403).")
    outlier_detection: OutlierDetection = Field(OutlierDetection(), description="Ejecting a failing endpoint "
                                                "(on by default, with these values).")
    health_check: HealthCheck | None = Field(None, description="Active HTTP health checks; none when unset.")
    max_requests_per_connection: Budget | None = Field(
        None, description="Close an upstream connection after this many requests (it is reopened, possibly to "
        "another endpoint). Unset: no limit.")


class Condition(Spec):
    type: Literal["Accepted", "ResolvedRefs", "Programmed"]
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    observed_generation: int = 0
    last_transition_time: str | None = None


class ComputedBudget(Spec):
    """A budget as each Envoy runs it now: computed for the ready endpoints and, with `scope:
    Gateway`, shared among the Gateway's Envoys (unset: Envoy's default, 1024)."""

    cluster: str = Field(description="The Envoy cluster: the Backend's, or its WebSocket cluster.")
    priority: Literal["Default", "High"]
    scope: Scope
    ready_endpoints: int = Field(description="What perEndpoint limits were computed for.")
    envoys: int = Field(description="The Gateway's Envoys a Gateway-wide budget is shared among (1 otherwise).")
    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None


class Status(Spec):
    conditions: list[Condition] = Field(default_factory=list)
    budgets: list[ComputedBudget] = Field(default_factory=list, description="Backends: each circuit-breaker "
                                          "budget as each Envoy runs it now.")


KINDS = {"Gateway": GatewaySpec, "Backend": BackendSpec}
PLURALS = {"Gateway": "gateways", "Backend": "backends"}
