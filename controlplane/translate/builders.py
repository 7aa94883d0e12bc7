"""Builders of Envoy messages, each named for what it returns (Contour's internal/envoy style).

Pure functions over plain values; the translation layers call them, and so do the demo and the
tests, so every Envoy resource this project emits is shaped in one place.

Builders trust their input: the models (controlplane/model) have already refused every value Envoy
would refuse, tests/test_envoy_refuses.py holds them to the real Envoy through these builders. A
value no proto can hold (a port of -1 or 2**32, a lone surrogate) raises ValueError here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.connection_limit.v3 import connection_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.runtime.v3 import rtds_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

HostPort = tuple[str, int]


def _any(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _milliseconds(value: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value // 1000, nanos=(value % 1000) * 1_000_000)


def socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def ads_config_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def thresholds(priority: int, *, max_connections: int | None = None, max_pending_requests: int | None = None,
               max_requests: int | None = None, max_retries: int | None = None,
               retry_budget: tuple[int, int] | None = None) -> circuit_breaker_pb2.CircuitBreakers.Thresholds:
    """One priority's circuit-breaker budget; unset limits keep Envoy's defaults. Remaining
    capacity is tracked, so `remaining_*` gauges show a budget running out before it trips.
    `retry_budget` (percent of the requests in flight, minimum retries at once) replaces max_retries."""
    limits = {"max_connections": max_connections, "max_pending_requests": max_pending_requests,
              "max_requests": max_requests, "max_retries": max_retries}
    built = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=priority, track_remaining=True,
        **{field: wrappers_pb2.UInt32Value(value=value) for field, value in limits.items() if value is not None})
    if retry_budget is not None:
        percent, min_concurrency = retry_budget
        built.retry_budget.budget_percent.CopyFrom(percent_pb2.Percent(value=percent))
        built.retry_budget.min_retry_concurrency.value = min_concurrency
    return built


RUNTIME_LAYER = "controlplane-budgets"
"""The RTDS resource every node group gets (empty when nothing follows its endpoints): the
bootstrap's runtime layer names it, and Envoy waits for it at start."""


def budget_runtime_key(cluster_name: str, priority: int, limit: str) -> str:
    """Envoy's runtime key for one circuit-breaker limit of a cluster (it reads it on every check,
    over the cluster's own value): circuit_breakers.<cluster>.<default|high>.<limit>."""
    return f"circuit_breakers.{cluster_name}.{'high' if priority == base_pb2.HIGH else 'default'}.{limit}"


def runtime_layer(values: dict[str, int]) -> rtds_pb2.Runtime:
    layer = struct_pb2.Struct()
    for key, value in sorted(values.items()):
        layer[key] = value
    return rtds_pb2.Runtime(name=RUNTIME_LAYER, layer=layer)


def per_host_thresholds(priority: int, max_connections: int) -> circuit_breaker_pb2.CircuitBreakers.Thresholds:
    """The connections any one endpoint may be given (the only per-host limit Envoy has)."""
    return circuit_breaker_pb2.CircuitBreakers.Thresholds(priority=priority,
                                                          max_connections=wrappers_pb2.UInt32Value(value=max_connections))


def outlier_detection(*, consecutive_5xx: int, consecutive_gateway_failures: int, interval_s: int,
                      base_ejection_time_s: int, max_ejection_percent: int) -> outlier_detection_pb2.OutlierDetection:
    """Ejects an endpoint after consecutive 5xx or gateway failures (a refused connection counts as a 503:
    local-origin errors are not split out); both enforced always, never more than the share given ejected."""
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=consecutive_5xx),
        consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=consecutive_gateway_failures),
        enforcing_consecutive_5xx=wrappers_pb2.UInt32Value(value=100),
        enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
        interval=duration_pb2.Duration(seconds=interval_s),
        base_ejection_time=duration_pb2.Duration(seconds=base_ejection_time_s),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=max_ejection_percent))


def http_health_check(path: str, *, interval_s: int, timeout_s: int, unhealthy_threshold: int,
                      healthy_threshold: int) -> health_check_pb2.HealthCheck:
    """GET `path` on every endpoint each interval (also while the cluster has no traffic); 200 is healthy."""
    interval = duration_pb2.Duration(seconds=interval_s)
    return health_check_pb2.HealthCheck(
        timeout=duration_pb2.Duration(seconds=timeout_s), interval=interval, no_traffic_interval=interval,
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=unhealthy_threshold),
        healthy_threshold=wrappers_pb2.UInt32Value(value=healthy_threshold),
        http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(path=path))


def eds_cluster(name: str, *, connect_timeout_ms: int = 1000, endpoints_name: str | None = None,
                budgets: Sequence[circuit_breaker_pb2.CircuitBreakers.Thresholds] = (),
                per_host_budgets: Sequence[circuit_breaker_pb2.CircuitBreakers.Thresholds] = (),
                transport_socket: base_pb2.TransportSocket | None = None,
                outlier: outlier_detection_pb2.OutlierDetection | None = None,
                health_checks: Sequence[health_check_pb2.HealthCheck] = (),
                max_requests_per_connection: int | None = None) -> cluster_pb2.Cluster:
    """A cluster whose endpoints come over EDS, under the cluster's own name or `endpoints_name`
    (clusters that share endpoints share one ClusterLoadAssignment: sent once, one Envoy watch).
    `max_requests_per_connection` goes in the HTTP/1.1 protocol options (the cluster field is deprecated)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_config_source(),
                                                                service_name=endpoints_name or ""),
        connect_timeout=_milliseconds(connect_timeout_ms),
    )
    if budgets:
        cluster.circuit_breakers.thresholds.extend(budgets)
    if per_host_budgets:
        cluster.circuit_breakers.per_host_thresholds.extend(per_host_budgets)
    if transport_socket is not None:
        cluster.transport_socket.CopyFrom(transport_socket)
    if outlier is not None:
        cluster.outlier_detection.CopyFrom(outlier)
    cluster.health_checks.extend(health_checks)
    if max_requests_per_connection is not None:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http_protocol_options={}))
        options.common_http_protocol_options.max_requests_per_connection.value = max_requests_per_connection
        cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(options)
    return cluster


def load_assignment(cluster_name: str, endpoints: Iterable[Sequence], *,
                    draining: Collection[HostPort] = ()) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints of a cluster, each (host, port) or longer (the IR's (host, port, draining)); the
    `draining` ones get no new traffic while others are healthy.

    Each endpoint added in place, then its socket address's two fields set: 1.4x faster than
    nested dicts and 3x faster than message constructors, for the same bytes (this runs for every
    endpoint of every Service on a full translation)."""
    healthy, drained = health_check_pb2.HEALTHY, health_check_pb2.DRAINING
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name)
    lb_endpoints = assignment.endpoints.add().lb_endpoints
    for endpoint in endpoints:
        host, port = endpoint[0], endpoint[1]
        status = drained if draining and (host, port) in draining else healthy
        address = lb_endpoints.add(health_status=status).endpoint.address.socket_address
        address.address = host
        address.port_value = port
    return assignment


def route(cluster: str, *, prefix: str | None = None, path: str | None = None,
          headers: Sequence[tuple[str, str]] = (), high_priority: bool = False,
          retry_policy: rc.RetryPolicy | None = None) -> rc.Route:
    """A route to `cluster` by path prefix or exact path, and exact header values.

    High priority routes draw on the cluster's HIGH circuit-breaker budget, so they keep
    working when the default budget is exhausted (logins during a WebSocket surge).

    Nested dicts, not message constructors: upb builds them in C, 1.7x faster for the same bytes
    (a route configuration holds every route of every Backend)."""
    action = {"cluster": cluster, "priority": base_pb2.HIGH if high_priority else base_pb2.DEFAULT}
    if retry_policy is not None:
        action["retry_policy"] = retry_policy
    return rc.Route(match=_route_match(prefix, path, headers), route=action)


def retry_policy(attempts: int, retry_on: Sequence[str], *, per_try_timeout_ms: int | None = None) -> rc.RetryPolicy:
    """Up to `attempts` retries on the conditions `retry_on` (Envoy's x-envoy-retry-on names); retries
    draw on the cluster's retry budget, so they cannot multiply a surge."""
    policy = rc.RetryPolicy(retry_on=",".join(retry_on), num_retries=wrappers_pb2.UInt32Value(value=attempts))
    if per_try_timeout_ms is not None:
        policy.per_try_timeout.CopyFrom(_milliseconds(per_try_timeout_ms))
    return policy


def websocket_route(cluster: str, *, prefix: str | None = None, path: str | None = None,
                    headers: Sequence[tuple[str, str]] = (), idle_timeout_s: int | None = None,
                    max_duration_s: int | None = None) -> rc.Route:
    """The WebSocket upgrades among the requests `route(prefix, path, headers)` matches, to `cluster`.

    Upgrades are enabled on this route only (the connection manager enables none), so a route
    without its WebSocket twin refuses upgrades and they never reach its cluster's budget. Envoy's
    route timeout (15 s) bounds the handshake only, a wait for the budget included (504); an open
    WebSocket lasts until it has been idle for `idle_timeout_s`, by default the connection
    manager's stream idle timeout (5 minutes)."""
    match = rc.RouteMatch(**_route_match(prefix, path, headers))
    match.headers.append(rc.HeaderMatcher(name="upgrade", string_match=string_pb2.StringMatcher(
        exact="websocket", ignore_case=True)))
    action = rc.RouteAction(cluster=cluster, upgrade_configs=[rc.RouteAction.UpgradeConfig(upgrade_type="websocket")])
    if idle_timeout_s is not None:
        action.idle_timeout.seconds = idle_timeout_s
    if max_duration_s is not None:  # then closed, however busy: the agent reconnects to an endpoint ready now
        action.max_stream_duration.max_stream_duration.seconds = max_duration_s
    return rc.Route(match=match, route=action)


def _route_match(prefix: str | None, path: str | None, headers: Sequence[tuple[str, str]]) -> dict:
    """A RouteMatch as the dict its constructor takes."""
    match = {"prefix": prefix} if path is None else {"path": path}
    if headers:
        match["headers"] = [{"name": name, "string_match": {"exact": value}} for name, value in headers]
    return match


def virtual_host(name: str, routes: Sequence[rc.Route], *,
                 domains: Sequence[str] = ("*",)) -> rc.VirtualHost:
    return rc.VirtualHost(name=name, domains=list(domains), routes=list(routes))


def route_configuration(name: str, virtual_hosts: Sequence[rc.VirtualHost]
                        ) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=list(virtual_hosts))


def certificate_secret(name: str, certificate_chain: bytes, private_key: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=certificate_chain),
        private_key=base_pb2.DataSource(inline_bytes=private_key)))


def trusted_ca_secret(name: str, certificates: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=certificates)))


def downstream_tls(certificate_secret_name: str, client_ca_secret_name: str | None = None
                   ) -> base_pb2.TransportSocket:
    """TLS for a listener, its certificate (and client CA: mutual TLS) fetched over SDS by name,
    so a rotation reaches Envoy without touching the listener."""
    common = tls_pb2.CommonTlsContext(tls_certificate_sds_secret_configs=[_sds(certificate_secret_name)])
    context = tls_pb2.DownstreamTlsContext(common_tls_context=common)
    if client_ca_secret_name is not None:
        context.common_tls_context.validation_context_sds_secret_config.CopyFrom(_sds(client_ca_secret_name))
        context.require_client_certificate.value = True
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(context))


def upstream_tls(hostname: str, ca_secret_name: str, client_certificate_secret_name: str | None = None
                 ) -> base_pb2.TransportSocket:
    """TLS from Envoy to a cluster's endpoints: SNI `hostname`; their certificates must chain to the CA
    (over SDS) and name `hostname` (a DNS subjectAltName); with a client certificate, mutual TLS."""
    names = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
        default_validation_context=common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[
            common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.DNS,
                                             matcher=string_pb2.StringMatcher(exact=hostname))]),
        validation_context_sds_secret_config=_sds(ca_secret_name))
    common = tls_pb2.CommonTlsContext(combined_validation_context=names)
    if client_certificate_secret_name is not None:
        common.tls_certificate_sds_secret_configs.append(_sds(client_certificate_secret_name))
    context = tls_pb2.UpstreamTlsContext(sni=hostname, common_tls_context=common)
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(context))


def _sds(secret_name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=secret_name, sds_config=ads_config_source())


def http_listener(name: str, *, address: str, port: int, route_config_name: str,
                  max_connections: int | None = None,
                  transport_socket: base_pb2.TransportSocket | None = None) -> listener_pb2.Listener:
    """An HTTP listener whose routes come over RDS, with an optional connection limit and TLS."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(config_source=ads_config_source(), route_config_name=route_config_name),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))],
    )
    filters = [listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                              typed_config=_any(manager))]
    if max_connections is not None:
        limit = connection_limit_pb2.ConnectionLimit(stat_prefix=name,
                                                     max_connections=wrappers_pb2.UInt64Value(value=max_connections))
        filters.insert(0, listener_components_pb2.Filter(name="envoy.filters.network.connection_limit",
                                                         typed_config=_any(limit)))
    chain = listener_components_pb2.FilterChain(filters=filters)
    if transport_socket is not None:
        chain.transport_socket.CopyFrom(transport_socket)
    return listener_pb2.Listener(name=name, address=socket_address(address, port), filter_chains=[chain])
