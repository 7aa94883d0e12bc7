"""The Envoy bootstrap that points an Envoy at our ADS server (a plain dict, written as YAML)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from controlplane.translate.builders import RUNTIME_LAYER

XDS_CLUSTER = "xds_cluster"

# How soon Envoy retries its ADS stream after the control plane went away: a jittered exponential
# backoff from 0.25 s, capped at 1 s. Envoy's default (0.5 s doubling to 30 s) left Envoys 4-12 s
# behind a restarted control plane; with this one they are back within ~1 s of it listening
# again (tests/test_envoy_restart.py). Retrying a refused connection every second costs little,
# and with replicas behind a Service the first retry already finds another one.
XDS_RETRY_BASE = "0.25s"
XDS_RETRY_MAX = "1s"

# Envoy pushes its stats to the control plane (controlplane/xds/metrics_service.py) over the xDS
# cluster at every flush. The default is Envoy's own 5 s: budget use a surge is watched by must be
# fresh. It sets what the pushes cost (docs/benchmarks.md: ~1 core per 1,000 Envoys of 100
# clusters each at 5 s, in proportion to the interval): `bootstrap --stats-flush-interval` trades
# freshness for cost. Envoy's sink cannot filter what it sends, and a stats_matcher would also hide
# those stats from Envoy's /stats and the Prometheus scrape the alerts read, so none is set; the
# control plane keeps only what it reads, on receipt.
STATS_FLUSH_SECONDS = 5


@dataclass(frozen=True)
class XdsClientTls:
    """How Envoy checks the control plane (CA file), and optionally proves itself (mutual TLS).

    Paths are as Envoy sees them (files mounted into its container)."""

    ca: str
    certificate: str | None = None
    private_key: str | None = None

    def transport_socket(self, server_name: str) -> dict[str, Any]:
        """Envoy checks the chain and that the certificate names `server_name` (DNS name or IP)."""
        san_type = "IP_ADDRESS" if _is_ip(server_name) else "DNS"
        common: dict[str, Any] = {"validation_context": {
            "trusted_ca": {"filename": self.ca},
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": server_name}}]}}
        if self.certificate and self.private_key:
            common["tls_certificates"] = [{"certificate_chain": {"filename": self.certificate},
                                           "private_key": {"filename": self.private_key}}]
        return {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": server_name, "common_tls_context": common}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ads_bootstrap(*, node_id: str, node_cluster: str, xds_host: str, xds_port: int, admin_port: int,
                  delta: bool = False, tls: XdsClientTls | None = None, max_downstream_connections: int | None = None,
                  stats_port: int | None = None, stats_sink: bool = True,
                  stats_flush_seconds: int = STATS_FLUSH_SECONDS) -> dict[str, Any]:
    """Everything comes over one ADS stream; only the xDS cluster itself is static.

    The xDS cluster speaks HTTP/2 with TCP keepalives so a dead control plane is noticed, and
    Envoy keeps serving its last configuration while it reconnects, retrying the ADS stream with
    the backoff of XDS_RETRY_BASE/XDS_RETRY_MAX (the gRPC service's `retry_policy`: Envoy reads it
    for xDS streams only). The admin interface stays on 127.0.0.1: it can change Envoy's state
    and must not be reachable from the network. With `stats_port`, a static listener on 0.0.0.0
    passes on only the admin's read-only /stats/prometheus (for Prometheus and the alerts) and
    /ready (for a readiness probe). With `stats_sink`, Envoy pushes its stats to the control plane
    every `stats_flush_seconds` (Envoy's metrics-service sink).

    `max_downstream_connections` caps the connections this Envoy accepts over all its listeners
    (the overload manager's global_downstream_max_connections), besides each Gateway listener's own
    limit, so a surge cannot exhaust the Envoy's file descriptors and memory. Envoy reads the
    bootstrap once, at start: so this is a flag of `controlplane bootstrap`, not a Gateway field.
    The stats listener is exempt: Prometheus and the readiness probe still get in during a surge.
    """
    bootstrap = {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER, "retry_policy": {"retry_back_off": {
                    "base_interval": XDS_RETRY_BASE, "max_interval": XDS_RETRY_MAX}}}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        # Circuit-breaker limits that follow the ready endpoints (Backend perEndpoint) come as runtime
        # overrides over ADS: a changed limit must not change its cluster, which Envoy would rebuild
        # and count from zero. Envoy waits at most 1 s for the layer at start (0 would mean forever: a
        # snapshot built with the library has none); until it comes, a cluster's own value applies.
        # The admin layer stays last: `runtime_modify` wins.
        "layered_runtime": {"layers": [
            {"name": RUNTIME_LAYER, "rtds_layer": {"name": RUNTIME_LAYER, "rtds_config": {
                "ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "1s"}}},
            {"name": "admin", "admin_layer": {}},
        ]},
        "static_resources": {"clusters": [{
            "name": XDS_CLUSTER,
            "type": "STRICT_DNS",
            "connect_timeout": "1s",
            "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 30, "keepalive_interval": 10,
                                                              "keepalive_probes": 3}},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {
                    "connection_keepalive": {"interval": "30s", "timeout": "10s"}}},
            }},
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": xds_host, "port_value": xds_port}}}}]}]},
        }]},
    }
    if stats_sink:
        bootstrap["stats_sinks"] = [{"name": "envoy.stat_sinks.metrics_service", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig",
            "transport_api_version": "V3", "emit_tags_as_labels": True,
            "grpc_service": {"envoy_grpc": {"cluster_name": XDS_CLUSTER}}}}]
        bootstrap["stats_flush_interval"] = f"{stats_flush_seconds}s"
    if max_downstream_connections is not None:
        bootstrap["overload_manager"] = {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections"
                                      ".v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": max_downstream_connections}}]}
    if tls is not None:
        bootstrap["static_resources"]["clusters"][0]["transport_socket"] = tls.transport_socket(xds_host)
    if stats_port is not None:
        bootstrap["static_resources"]["listeners"] = [_stats_listener(stats_port)]
        bootstrap["static_resources"]["clusters"].append({
            "name": ADMIN_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": ADMIN_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}}]}]}})
    return bootstrap


ADMIN_CLUSTER = "admin"
STATS_PATHS = ("/stats/prometheus", "/ready")


def _stats_listener(port: int) -> dict[str, Any]:
    """GET of the read-only admin paths in STATS_PATHS, passed on to the admin; 404 for the rest."""
    routes = [{"match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
               "route": {"cluster": ADMIN_CLUSTER}} for path in STATS_PATHS]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    return {"name": "stats", "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "ignore_global_conn_limit": True,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": "stats",
                "route_config": {"name": "stats", "virtual_hosts": [{"name": "stats", "domains": ["*"],
                                                                       "routes": routes}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}
