"""The shortcuts IR -> Envoy resources takes must give the bytes the plain way gives.

Clusters are copies of a shared shape given their names afterwards (to_xds._cluster_shape), and
a Backend's own cluster is its name's bytes followed by its shape's (to_xds._cluster_resource);
endpoints are added in place, routes built from dicts, and `Resource.from_message` reads a upb
message as it is instead of parsing its bytes back. Each is compared here with building the same
message with its names from the start, with message constructors, and with reading the bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as components
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import string_pb2

from controlplane.ir import types as ir
from controlplane.sources.files import DirectorySource
from controlplane.sources.store import Store
from controlplane.translate import builders as b
from controlplane.translate import to_ir, to_xds
from controlplane.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource
from controlplane.xds.resources import MESSAGE_CLASSES
from tests.certs import ca_secret, issue, tls_secret
from tests.objects import app, gateway

GOLDEN = Path(__file__).resolve().parent / "golden"
AUTHORITY = issue("endpoints CA", ca=True)
CLIENT = issue("edge", issuer=AUTHORITY, client=True)
PER_ENDPOINT = {"perEndpoint": {"maxConnections": 10, "maxRequests": 20, "min": {"maxConnections": 15}}}
SPECS = [
    {},
    {"circuitBreakers": {"default": PER_ENDPOINT, "high": {"retryBudget": {"percent": 10, "minConcurrency": 2}}}},
    {"circuitBreakers": {"default": {"scope": "Gateway", "maxConnections": 40}}, "connectTimeoutMs": 250},
    {"outlierDetection": {"consecutive5xx": 2}, "healthCheck": {"path": "/healthz"}, "maxRequestsPerConnection": 9},
    {"websocket": {"circuitBreakers": {"maxConnections": 5, "perEndpoint": {"maxRequests": 3}}}},
    {"tls": {"caSecret": "endpoints-ca", "hostname": "b.shop.svc", "clientCertificateSecret": "edge-client"},
     "websocket": {"circuitBreakers": {"maxConnections": 9}}},
    {"routes": [{"path": "/login", "priority": "High"},
                {"pathPrefix": "/api", "headers": [{"name": "x-canary", "value": "false"}],
                 "retries": {"attempts": 2, "retryOn": ["connect-failure"], "perTryTimeoutMs": 2500}}],
     "websocket": {"idleTimeoutSeconds": 60, "maxConnectionDurationSeconds": 600}},
]


def _groups() -> list[ir.NodeGroup]:
    objects = [gateway(), ca_secret("endpoints-ca", AUTHORITY.cert_pem),
               tls_secret("edge-client", CLIENT.cert_pem, CLIENT.key_pem)]
    for index, spec in enumerate(SPECS):
        objects += app(f"app-{index}", f"10.0.0.{index + 1}", **spec)
    groups = list(to_ir.translate(Store(objects).view()).groups.values())
    for case in ("basic", "tls"):
        source = DirectorySource(GOLDEN / case)
        source.load()
        groups += to_ir.translate(source.store().view()).groups.values()
    return groups


GROUPS = _groups()
BACKENDS = [backend for group in GROUPS for backend in group.backends]


def _built_with_names(backend: ir.Backend, budgets: dict[int, ir.Budget], name: str,
                      endpoints_name: str | None = None) -> cluster_pb2.Cluster:
    """The cluster `eds_cluster` builds with its names given from the start, as to_xds once did."""
    return to_xds._cluster_built(name, tuple(budgets.items()), *to_xds._cluster_options(backend),
                                 endpoints_name=endpoints_name)


def test_the_shapes_cover_every_cluster_option():
    assert any(backend.tls for backend in BACKENDS) and any(backend.websocket for backend in BACKENDS)
    assert any(backend.health_check for backend in BACKENDS) and any(backend.max_requests_per_connection
                                                                     for backend in BACKENDS)
    assert any(budget.per_host_max_connections and budget.retry_budget for backend in BACKENDS
               for budget in (backend.default_budget, backend.high_budget))


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "shared-shape"])
def test_a_named_copy_of_a_shape_is_the_cluster_built_with_its_names(cold):
    for backend in BACKENDS:
        if cold:
            to_xds._cluster_shape.cache_clear()
            to_xds._shape_bytes.cache_clear()
        budgets = {base_pb2.DEFAULT: backend.default_budget, base_pb2.HIGH: backend.high_budget}
        expected = _built_with_names(backend, budgets, backend.name)
        assert to_xds.cluster(backend).SerializeToString() == expected.SerializeToString()
        written, built = to_xds._cluster_resource(backend), Resource.from_message(CLUSTER, expected)
        assert (written.name, written.body, written.version, written.references) == (
            built.name, built.body, built.version, built.references)
        if backend.websocket is not None:
            expected = _built_with_names(backend, {base_pb2.DEFAULT: backend.websocket.budget},
                                         backend.websocket.name, endpoints_name=backend.name)
            assert to_xds.websocket_cluster(backend).SerializeToString() == expected.SerializeToString()


def test_the_shared_shape_is_never_modified():
    backend = BACKENDS[0]
    to_xds.cluster(backend)
    budgets = ((base_pb2.DEFAULT, backend.default_budget), (base_pb2.HIGH, backend.high_budget))
    assert to_xds._cluster_shape(budgets, *to_xds._cluster_options(backend)).name == ""


def test_endpoints_added_in_place_are_the_message_constructors_endpoints():
    endpoints = (ir.Endpoint("10.0.0.2", 8080), ir.Endpoint("10.0.0.1", 8080, draining=True),
                 ir.Endpoint("10.0.0.3", 9090))
    pairs = [(host, port) for host, port, _draining in endpoints]
    assert (b.load_assignment("shop/api", pairs, draining={("10.0.0.1", 8080)}).SerializeToString()
            == _constructed("shop/api", endpoints).SerializeToString())


def _constructed(name: str, endpoints) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[components.LocalityLbEndpoints(
        lb_endpoints=[components.LbEndpoint(endpoint=components.Endpoint(address=b.socket_address(host, port)),
                                            health_status=health_check_pb2.DRAINING if draining
                                            else health_check_pb2.HEALTHY)
                      for host, port, draining in endpoints])])


_ADDRESSES = ["10.0.0.1", "255.255.255.255", "::1", "fd00:10:244::1f",
              "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8::ffff:255.255.255.255"]  # the longest: 45


@pytest.mark.parametrize("name", ["shop/api", "n/" + "x" * 300])  # a name whose length takes two bytes
def test_endpoints_written_as_bytes_are_the_ones_upb_serializes(name):
    cases = [(), *((ir.Endpoint(address, port, draining),) for address in _ADDRESSES
                   for port in (1, 127, 128, 16383, 16384, 65535) for draining in (False, True)),
             tuple(ir.Endpoint(f"10.0.{i // 250}.{i % 250}", 8080 + i % 3, i % 7 == 0) for i in range(300))]
    for endpoints in cases:
        written = to_xds._endpoints_resource(ir.Backend(name, endpoints))
        built = Resource.from_message(ENDPOINT, _constructed(name, endpoints))
        assert (written.name, written.body, written.version, written.references) == (
            built.name, built.body, built.version, built.references)
    with pytest.raises(ValueError, match="not an IP address"):
        to_xds._endpoints_resource(ir.Backend(name, (ir.Endpoint("a" * 65 + ".example", 80),)))


@pytest.mark.parametrize("path, prefix", [(None, "/api"), ("/login", None), (None, None), (None, "")])
def test_routes_from_dicts_are_the_message_constructors_routes(path, prefix):
    policy = b.retry_policy(2, ["connect-failure", "gateway-error"], per_try_timeout_ms=2500)
    for headers in ((), [("x-canary", "false"), ("x-b", "")]):
        for high_priority, retry_policy in ((False, None), (True, policy)):
            match = rc.RouteMatch(prefix=prefix) if path is None else rc.RouteMatch(path=path)
            match.headers.extend(rc.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(exact=value))
                                 for name, value in headers)
            action = rc.RouteAction(cluster="api", priority=base_pb2.HIGH if high_priority else base_pb2.DEFAULT)
            if retry_policy is not None:
                action.retry_policy.CopyFrom(retry_policy)
            built = b.route("api", prefix=prefix, path=path, headers=headers, high_priority=high_priority,
                            retry_policy=retry_policy)
            assert built.SerializeToString() == rc.Route(match=match, route=action).SerializeToString()


def test_a_upb_message_read_as_it_is_gives_what_its_bytes_give():
    for group in GROUPS:
        for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            for resource in to_xds.snapshot(group).resources(type_url).resources.values():
                message = MESSAGE_CLASSES[type_url].FromString(resource.body)
                # Another class over the same bytes: a copy that `from_message` must parse back.
                wrapped = Resource.from_message(type_url, _Opaque(resource.body))
                direct = Resource.from_message(type_url, message)
                for read in (wrapped, direct):
                    assert (read.name, read.version, read.references) == (
                        resource.name, resource.version, resource.references)


class _Opaque:
    """A message of no upb class that serializes: as an envoy-data-plane (betterproto2) one does."""

    def __init__(self, body: bytes):
        self._body = body

    def __bytes__(self) -> bytes:
        return self._body


def test_a_route_configuration_assembled_from_each_routes_bytes_is_the_one_built_whole():
    listeners = [listener for group in GROUPS for listener in group.listeners]
    assert any(route.websocket for listener in listeners for route in listener.routes)
    empty = ir.Listener(name="shop/edge/empty", address="127.0.0.1", port=9, routes=(), max_connections=None, tls=None)
    many = ir.Listener(name="shop/edge/many", address="127.0.0.1", port=9, max_connections=None, tls=None, routes=tuple(
        ir.Route(backend=f"shop/b{index}", path_prefix=f"/b{index}") for index in range(3000)))  # 3-byte lengths
    for listener in [*listeners, empty, many]:
        whole = Resource.from_message(ROUTE, to_xds.route_configuration(listener))
        held: dict = {}
        first = to_xds._assembled_route_configuration(listener, {}, held)
        again = to_xds._assembled_route_configuration(listener, held, {})  # every route's bytes reused
        for assembled in (first, again):
            assert (assembled.name, assembled.version, assembled.references) == (
                whole.name, whole.version, whole.references)
