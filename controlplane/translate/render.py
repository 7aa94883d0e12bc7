"""What a node group gets, as plain data: for `controlplane render`, golden tests and reviews.

`resources_document` lists the Envoy resources as proto3 JSON mappings (secrets too, their private
keys redacted). `config_dump` shapes them like the dynamic part of Envoy's admin `/config_dump`
(`?include_eds`), so what the control plane would send and what an Envoy runs can be diffed
(`controlplane render --format config-dump`; docs/operations in README). `static_bootstrap` turns
a snapshot into an Envoy bootstrap with everything inline (EDS clusters become STATIC, RDS
becomes inline route configurations, SDS secrets are inlined), so `envoy --mode validate` can check it with no control
plane running.
"""

from __future__ import annotations

import json
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from controlplane.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Snapshot
from controlplane.xds.resources import SHORT_NAMES, parse, redacted


def _messages(snapshot: Snapshot, type_url: str) -> list:
    return [parse(type_url, resource.body) for resource in snapshot.resources(type_url).resources.values()]


def _as_dict(message) -> dict[str, Any]:
    # Through JSON text: MessageToDict leaves OrderedDicts inside Any values, which YAML refuses.
    return json.loads(json_format.MessageToJson(message))


def resources_document(snapshot: Snapshot) -> dict[str, list[dict[str, Any]]]:
    return {SHORT_NAMES[type_url]: [_as_dict(redacted(m)) for m in _messages(snapshot, type_url)]
            for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)}


def _as_dump_entry(message) -> dict[str, Any]:
    """As /config_dump prints a resource: proto field names, with its type as "@type"."""
    return {"@type": f"type.googleapis.com/{message.DESCRIPTOR.full_name}",
            **json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))}


def _endpoints_as_envoy_shows_them(snapshot: Snapshot) -> list:
    """Envoy's dump of endpoints is not what it was sent but its host sets: one entry per EDS
    cluster (two clusters sharing a ClusterLoadAssignment show it twice), with the defaults it
    applied written out. Shown the same way, the two diff (tests/test_render.py holds it to Envoy)."""
    assignments = {m.cluster_name: m for m in _messages(snapshot, ENDPOINT)}
    shown = []
    for cluster in _messages(snapshot, CLUSTER):
        if cluster.type != cluster_pb2.Cluster.EDS:
            continue
        assignment = endpoint_pb2.ClusterLoadAssignment()
        assignment.CopyFrom(assignments.get(cluster.eds_cluster_config.service_name or cluster.name,
                                            endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster.name)))
        for group in assignment.endpoints:
            group.locality.SetInParent()
            group.load_balancing_weight.value = group.load_balancing_weight.value  # written out, 0 when unset
            for host in group.lb_endpoints:
                host.endpoint.health_check_config.SetInParent()
                host.load_balancing_weight.value = host.load_balancing_weight.value or 1
        if not assignment.policy.HasField("overprovisioning_factor"):
            assignment.policy.overprovisioning_factor.value = 140  # Envoy's default
        shown.append(assignment)
    return shown


_DUMPS = (  # (the config dump type, its list of dynamic resources, how one entry holds its resource)
    (CLUSTER, "ClustersConfigDump", "dynamic_active_clusters", lambda m: {"cluster": _as_dump_entry(m)}),
    (ENDPOINT, "EndpointsConfigDump", "dynamic_endpoint_configs", lambda m: {"endpoint_config": _as_dump_entry(m)}),
    (LISTENER, "ListenersConfigDump", "dynamic_listeners",
     lambda m: {"name": m.name, "active_state": {"listener": _as_dump_entry(m)}}),
    (ROUTE, "RoutesConfigDump", "dynamic_route_configs", lambda m: {"route_config": _as_dump_entry(m)}),
    (SECRET, "SecretsConfigDump", "dynamic_active_secrets",
     lambda m: {"name": m.name, "secret": _as_dump_entry(redacted(m))}),
)


def config_dump(snapshot: Snapshot) -> dict[str, Any]:
    """The node group's resources keyed as Envoy's `/config_dump?include_eds` keys its dynamic ones,
    without what only a running Envoy has (`version_info`, `last_updated`, static resources), in
    name order (Envoy lists secrets in an order of its own)."""
    def resources(type_url: str) -> list:
        return _endpoints_as_envoy_shows_them(snapshot) if type_url == ENDPOINT else _messages(snapshot, type_url)
    configs = []
    for type_url, dump_type, field, entry in _DUMPS:
        config = {"@type": f"type.googleapis.com/envoy.admin.v3.{dump_type}"}
        entries = [entry(m) for m in resources(type_url)]
        if entries:  # as Envoy prints it: an empty list is left out
            config[field] = entries
        configs.append(config)
    return {"configs": configs}


def _inline_secrets(transport_socket, secrets) -> None:
    """SDS references of a TLS transport socket replaced by the secrets themselves (a static
    bootstrap has no SDS); a combined validation context becomes one plain validation context."""
    typed_config = transport_socket.typed_config
    context_class = next((c for c in (tls_pb2.DownstreamTlsContext, tls_pb2.UpstreamTlsContext)
                          if typed_config.Is(c.DESCRIPTOR)), None)
    if context_class is None:
        return
    context = context_class()
    typed_config.Unpack(context)
    common = context.common_tls_context
    for sds in common.tls_certificate_sds_secret_configs:
        common.tls_certificates.append(secrets[sds.name].tls_certificate)
    common.ClearField("tls_certificate_sds_secret_configs")
    if common.HasField("validation_context_sds_secret_config"):
        common.validation_context.CopyFrom(secrets[common.validation_context_sds_secret_config.name].validation_context)
    elif common.HasField("combined_validation_context"):
        combined = common.combined_validation_context
        validation = secrets[combined.validation_context_sds_secret_config.name].validation_context
        validation.MergeFrom(combined.default_validation_context)
        common.validation_context.CopyFrom(validation)
    typed_config.Pack(context)


def static_bootstrap(snapshot: Snapshot, *, admin_port: int = 9901) -> dict[str, Any]:
    assignments = {m.cluster_name: m for m in _messages(snapshot, ENDPOINT)}
    routes = {m.name: m for m in _messages(snapshot, ROUTE)}
    secrets = {m.name: m for m in _messages(snapshot, SECRET)}
    clusters = []
    for cluster in _messages(snapshot, CLUSTER):
        if cluster.type == cluster_pb2.Cluster.EDS:
            eds_name = cluster.eds_cluster_config.service_name or cluster.name
            cluster.ClearField("eds_cluster_config")
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.load_assignment.CopyFrom(assignments.get(eds_name, endpoint_pb2.ClusterLoadAssignment(
                cluster_name=cluster.name)))
        _inline_secrets(cluster.transport_socket, secrets)
        clusters.append(_as_dict(cluster))
    listeners = []
    for listener in _messages(snapshot, LISTENER):
        for chain in listener.filter_chains:
            _inline_secrets(chain.transport_socket, secrets)
            for network_filter in chain.filters:
                if network_filter.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                    manager = hcm_pb2.HttpConnectionManager()
                    network_filter.typed_config.Unpack(manager)
                    if manager.HasField("rds"):
                        manager.route_config.CopyFrom(routes[manager.rds.route_config_name])
                    network_filter.typed_config.Pack(manager)
        listeners.append(_as_dict(listener))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
