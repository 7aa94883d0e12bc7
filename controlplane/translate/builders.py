"""Builders of Envoy messages, each named for what it returns (Contour's internal/envoy style).

Pure functions over plain values; the translation layers call them, and so do the demo and the
tests, so every Envoy resource this project emits is shaped in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, duration_pb2

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


def eds_cluster(name: str, *, connect_timeout_ms: int = 1000) -> cluster_pb2.Cluster:
    """A cluster whose endpoints come over EDS under the cluster's own name."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_config_source()),
        connect_timeout=_milliseconds(connect_timeout_ms),
    )


def load_assignment(cluster_name: str, endpoints: Iterable[HostPort]) -> endpoint_pb2.ClusterLoadAssignment:
    lb_endpoints = [endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=socket_address(host, port))) for host, port in endpoints]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)])


def route(prefix: str, cluster: str) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=prefix),
        route=route_components_pb2.RouteAction(cluster=cluster))


def virtual_host(name: str, routes: Sequence[route_components_pb2.Route], *,
                 domains: Sequence[str] = ("*",)) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(name=name, domains=list(domains), routes=list(routes))


def route_configuration(name: str, virtual_hosts: Sequence[route_components_pb2.VirtualHost]
                        ) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=list(virtual_hosts))


def http_listener(name: str, *, address: str, port: int, route_config_name: str) -> listener_pb2.Listener:
    """A plain HTTP listener whose routes come over RDS."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(config_source=ads_config_source(), route_config_name=route_config_name),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=name,
        address=socket_address(address, port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=_any(manager))])],
    )
