"""The Envoy bootstrap that points an Envoy at our ADS server (a plain dict, written as YAML)."""

from __future__ import annotations

from typing import Any

XDS_CLUSTER = "xds_cluster"


def ads_bootstrap(*, node_id: str, node_cluster: str, xds_host: str, xds_port: int, admin_port: int,
                  delta: bool = False) -> dict[str, Any]:
    """Everything comes over one ADS stream; only the xDS cluster itself is static.

    The xDS cluster speaks HTTP/2 with TCP keepalives so a dead control plane is noticed, and
    Envoy keeps serving its last configuration while it reconnects. The admin interface stays on
    127.0.0.1: it can change Envoy's state and must not be reachable from the network.
    """
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
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
