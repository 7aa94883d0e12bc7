"""Translation: objects in, IR and conditions out. Bad input is refused per object, with a message."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.ir import types as ir
from controlplane.model import kube
from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import to_ir, to_xds
from controlplane.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.xds.resources import parse
from tests.certs import ca_secret, issue, tls_secret
from tests.objects import NS, app, backend, endpoint_slice, gateway, ready, service


def translate(*objects):
    return to_ir.translate(Store([o for group in objects for o in (group if isinstance(group, list) else [group])]
                                 ).view())


def accepted(translation, kind: str, name: str):
    return translation.conditions[ObjectKey(kind, NS, name)][0]


def routes_of(translation, group: str = "edge"):
    return [(r.path_prefix or r.path, r.backend) for r in translation.groups[group].listeners[0].routes]


def test_a_valid_gateway_and_backend():
    result = translate(gateway(), app("api"))
    assert [(c.type, c.status) for c in result.conditions[ObjectKey("Backend", NS, "api")]] == [
        ("Accepted", "True"), ("ResolvedRefs", "True"), ("Programmed", "Unknown")]
    assert routes_of(result) == [("/api", "shop/api")]
    assert result.groups["edge"].backends[0].endpoints[0].address == "10.0.0.1"
    assert result.origins["shop/api"] == ObjectKey("Backend", NS, "api")


BAD_BACKENDS = [
    ("missing service", [backend("api")], "ServiceNotFound", "Service shop/api does not exist"),
    ("wrong port", [backend("api", port=9999), service("api")], "ServicePortNotFound",
     "has no port 9999 (its ports: http=80)"),
    ("wrong port name", [backend("api", port="grpc"), service("api")], "ServicePortNotFound", "has no port 'grpc'"),
    ("missing gateway", [*app("api", gateway_name="nope")], "GatewayNotFound", "Gateway shop/nope does not exist"),
    ("missing listener", [*app("api", listener="https")], "ListenerNotFound", "has no listener 'https'"),
    ("unknown field", [*app("api", circuitBreakers={"default": {"maxConection": 5}})], "Invalid",
     "spec.circuitBreakers.default.maxConection: unknown field"),
    ("absurd budget", [*app("api", circuitBreakers={"default": {"maxConnections": -3}})], "Invalid",
     "spec.circuitBreakers.default.maxConnections: must be at least 1 (it is -3)"),
    ("websocket typo", [*app("api", websocket={"circuitBreaker": {"maxConnections": 5}})], "Invalid",
     "spec.websocket.circuitBreaker: unknown field"),
    ("absurd websocket budget", [*app("api", websocket={"circuitBreakers": {"maxRequests": 0}})], "Invalid",
     "spec.websocket.circuitBreakers.maxRequests: must be at least 1 (it is 0)"),
    ("bad TLS hostname", [*app("api", tls={"caSecret": "ca", "hostname": "https://api"})], "Invalid",
     "spec.tls.hostname: 'https://api' is not a DNS name"),
    ("both paths", [*app("api", routes=[{"path": "/a", "pathPrefix": "/a"}])], "Invalid",
     "set exactly one of pathPrefix and path"),
    ("relative path", [*app("api", routes=[{"pathPrefix": "api"}])], "Invalid", "spec.routes[0].pathPrefix"),
    ("no routes", [*app("api", routes=[])], "Invalid", "spec.routes: needs at least 1 item (it has 0)"),
    ("duplicate route in itself", [*app("api", routes=[{"pathPrefix": "/a"}, {"pathPrefix": "/a"}])],
     "DuplicateRoute", "spec.routes[1] repeats an earlier route"),
    ("route another backend has", [*app("api", routes=[{"pathPrefix": "/shared"}]),
                                   *app("zeta", routes=[{"pathPrefix": "/shared"}])],
     "RouteConflict", "Backend shop/api already serves it"),
]


@pytest.mark.parametrize("objects, reason, message", [case[1:] for case in BAD_BACKENDS],
                         ids=[case[0] for case in BAD_BACKENDS])
def test_a_bad_backend_is_refused_and_the_rest_still_served(objects, reason, message):
    bad_name = [o for o in objects if o["kind"] == "Backend"][-1]["metadata"]["name"]
    result = translate(gateway(), app("good", "10.0.0.9"), objects)
    condition = accepted(result, "Backend", bad_name)
    assert (condition.status, condition.reason) == ("False", reason)
    assert message in condition.message
    assert accepted(result, "Backend", "good").status == "True"
    assert ("/good", "shop/good") in routes_of(result)
    assert f"shop/{bad_name}" not in [b.name for b in result.groups["edge"].backends]
    to_xds.snapshot(result.groups["edge"])  # and what is served is consistent


def test_unresolved_references_say_so_in_resolved_refs():
    result = translate(gateway(), backend("api"))
    resolved = result.conditions[ObjectKey("Backend", NS, "api")][1]
    assert (resolved.type, resolved.status, resolved.reason) == ("ResolvedRefs", "False", "ServiceNotFound")


def test_conflicting_gateway_port_is_refused_on_the_later_gateway():
    result = translate(gateway("a"), gateway("b"))
    assert accepted(result, "Gateway", "a").status == "True"
    refused = accepted(result, "Gateway", "b")
    assert (refused.status, refused.reason) == ("False", "PortConflict")
    assert "port 8080 is held by Gateway shop/a" in refused.message


def test_invalid_gateway_message_names_the_field():
    bad = gateway(listeners=[{"name": "http", "port": 70000}])
    assert "spec.listeners[0].port: must be at most 65535 (it is 70000)" in accepted(
        translate(bad), "Gateway", "edge").message


def test_observed_generation_is_the_objects_generation():
    result = translate(gateway(generation=7), app("api"))
    assert {c.observed_generation for c in result.conditions[ObjectKey("Gateway", NS, "edge")]} == {7}


def test_endpoint_conditions():
    slice_ = endpoint_slice("api", [ready("10.0.0.1"),
                                    ("10.0.0.2", {"ready": False, "serving": True, "terminating": True}),
                                    ("10.0.0.3", {"ready": False, "serving": False, "terminating": True}),
                                    ("10.0.0.4", {})])
    result = translate(gateway(), backend("api"), service("api"), slice_)
    endpoints = result.groups["edge"].backends[0].endpoints
    assert [(e.address, e.draining) for e in endpoints] == [("10.0.0.1", False), ("10.0.0.2", True),
                                                             ("10.0.0.4", False)]


def test_endpoints_from_many_slices_and_only_the_named_port():
    slices = [endpoint_slice("api", [ready("10.0.0.1")], name="api-a"),
              endpoint_slice("api", [ready("10.0.0.2")], name="api-b"),
              endpoint_slice("api", [ready("10.0.0.3")], name="api-metrics", port_name="metrics", port=9090)]
    result = translate(gateway(), backend("api"), service("api"), *slices)
    assert [e.address for e in result.groups["edge"].backends[0].endpoints] == ["10.0.0.1", "10.0.0.2"]


def test_routes_are_ordered_most_specific_first():
    result = translate(gateway(), app("root", routes=[{"pathPrefix": "/"}]),
                       app("api", routes=[{"pathPrefix": "/api"}, {"path": "/api/login", "priority": "High"}]),
                       app("v2", routes=[{"pathPrefix": "/api", "headers": [{"name": "x-version", "value": "2"}]}]))
    assert routes_of(result) == [("/api/login", "shop/api"), ("/api", "shop/v2"), ("/api", "shop/api"),
                                 ("/", "shop/root")]
    assert result.groups["edge"].listeners[0].routes[0].high_priority


def test_only_a_websocket_block_lets_upgrades_through_and_onto_a_budget_of_their_own():
    result = translate(gateway(), app("api", routes=[{"path": "/login", "priority": "High"}, {"pathPrefix": "/api"}],
                                      websocket={"circuitBreakers": {"maxConnections": 7}}),
                       app("shop", "10.0.0.2", routes=[{"pathPrefix": "/shop"}]))
    snapshot = to_xds.snapshot(result.groups["edge"])
    clusters = {r.name: r for r in snapshot.resources(CLUSTER).resources.values()}
    assert sorted(clusters) == ["shop/api", "shop/api/websocket", "shop/shop"]
    assert result.origins["shop/api/websocket"] == ObjectKey("Backend", NS, "api")  # Envoy's NACKs land there
    assert clusters["shop/api/websocket"].referenced(ENDPOINT) == ["shop/api"]  # the same endpoints, sent once
    assert sorted(snapshot.resources(ENDPOINT).resources) == ["shop/api", "shop/shop"]
    websocket = parse(CLUSTER, clusters["shop/api/websocket"].body)
    assert [t.max_connections.value for t in websocket.circuit_breakers.thresholds] == [7]

    (route_configuration,) = snapshot.resources(ROUTE).resources.values()
    (virtual_host,) = parse(ROUTE, route_configuration.body).virtual_hosts
    routes = [(route.match.path or route.match.prefix, route.route.cluster,
               [upgrade.upgrade_type for upgrade in route.route.upgrade_configs]) for route in virtual_host.routes]
    assert routes == [("/login", "shop/api/websocket", ["websocket"]), ("/login", "shop/api", []),
                      ("/shop", "shop/shop", []),  # no block: upgrades to it are refused (403)
                      ("/api", "shop/api/websocket", ["websocket"]), ("/api", "shop/api", [])]
    (listener,) = snapshot.resources(LISTENER).resources.values()
    assert b"websocket" not in listener.body  # nothing enables upgrades listener-wide


def test_translation_is_deterministic():
    objects = [gateway(), *app("a"), *app("b", "10.0.0.2"), *app("c", "10.0.0.3")]
    first = to_xds.snapshot(translate(objects).groups["edge"])
    again = to_xds.snapshot(translate(list(reversed(objects))).groups["edge"])
    assert first.version == again.version


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner,
                                                                                        max_size=3), max_leaves=8)
route_like = st.fixed_dictionaries({}, optional={"pathPrefix": json_values | st.just("/x"), "path": json_values,
                                                 "priority": json_values | st.sampled_from(["High", "Default"]),
                                                 "headers": json_values})
spec_like = st.fixed_dictionaries({}, optional={
    "gateway": json_values | st.just("edge"), "listener": json_values,
    "service": json_values | st.fixed_dictionaries({"name": st.just("api"), "port": json_values}),
    "routes": json_values | st.lists(route_like, max_size=3),
    "circuitBreakers": json_values, "connectTimeoutMs": json_values, "extra": json_values,
    "websocket": json_values | st.fixed_dictionaries({}, optional={"circuitBreakers": json_values}),
    "tls": json_values | st.fixed_dictionaries({"caSecret": json_values | st.just("ca"),
                                                "hostname": json_values | st.just("api.shop.svc")})})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=spec_like)
def test_generated_backends_never_crash_and_never_break_the_others(spec):
    weird = {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Backend",
             "metadata": {"name": "weird", "namespace": NS}, "spec": spec}
    result = translate(gateway(), app("good"), service("api"), weird)
    assert accepted(result, "Backend", "good").status == "True"
    condition = accepted(result, "Backend", "weird")
    assert condition.status == "True" or condition.message
    to_xds.snapshot(result.groups["edge"])


kubernetes_like = st.fixed_dictionaries(
    {"kind": st.sampled_from(["Service", "EndpointSlice", "Secret"]),
     "metadata": st.fixed_dictionaries({"name": st.just("api"), "namespace": st.just(NS)},
                                       optional={"labels": json_values | st.just({"kubernetes.io/service-name": "api"}),
                                                 "generation": json_values})},
    optional={"spec": json_values | st.fixed_dictionaries({"ports": json_values | st.lists(
                  st.fixed_dictionaries({}, optional={"name": json_values | st.just("http"),
                                                      "port": json_values | st.just(80)}), max_size=2)}),
              "endpoints": json_values | st.lists(st.fixed_dictionaries({}, optional={
                  "addresses": json_values, "conditions": json_values}), max_size=2),
              "ports": json_values, "addressType": json_values, "type": json_values, "data": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=kubernetes_like)
def test_kubernetes_objects_of_any_shape_are_refused_by_the_source_check_or_translated(obj):
    """What the file source lets through (`kube.problems` finds nothing) never breaks translation."""
    if kube.problems(obj):
        return
    upstream_tls = {"caSecret": "api", "hostname": "api.shop.svc"}
    result = translate(gateway(), backend("api", port=80, tls=upstream_tls), obj)
    assert accepted(result, "Backend", "api").status in ("True", "False")
    if "edge" in result.groups:
        to_xds.snapshot(result.groups["edge"])


AUTHORITY = issue("endpoints CA", ca=True)
EDGE_CLIENT = issue("edge", issuer=AUTHORITY, client=True)
UPSTREAM_SECRETS = [ca_secret("endpoints-ca", AUTHORITY.cert_pem),
                    tls_secret("edge-client", EDGE_CLIENT.cert_pem, EDGE_CLIENT.key_pem)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "orphan"]), st.integers(0, 3),
                                  st.sampled_from(["put", "delete", "not-ready", "bad-port"])), min_size=1, max_size=8))
def test_incremental_translation_equals_a_full_one(changes):
    """The EndpointSlice fast path of `Translator` gives exactly what a full translation gives,
    Backends with a WebSocket cluster and with upstream TLS included, and slices with a bad port;
    budgets per endpoint (the WebSocket's, and a Backend's with min and max) follow the endpoints."""
    upstream_tls = {"caSecret": "endpoints-ca", "hostname": "b.shop.svc", "clientCertificateSecret": "edge-client"}
    per_endpoint = {"perEndpoint": {"maxConnections": 10, "maxRequests": 20, "min": {"maxConnections": 15},
                                    "max": {"maxRequests": 50}}}
    store = Store([gateway(), *app("a", websocket={"circuitBreakers": {"maxConnections": 5,
                                                                        "perEndpoint": {"maxRequests": 3}}}),
                   *app("b", "10.0.0.2", tls=upstream_tls),
                   *app("c", "10.0.0.3", port=80, circuitBreakers={"default": per_endpoint, "high": per_endpoint}),
                   *UPSTREAM_SECRETS])
    translator = to_ir.Translator()
    translator.translate(store.view())
    for service_name, host, action in changes:
        name = f"{service_name}-extra"
        if action == "delete":
            store.delete(ObjectKey("EndpointSlice", NS, name))
        else:
            conditions = {"ready": action == "put", "serving": True, "terminating": action != "put"}
            extra = endpoint_slice(service_name, [(f"10.9.0.{host}", conditions)], name=name)
            if action == "bad-port":  # Kubernetes stores it; only that port is left out, and the status says so
                extra["ports"].append({"name": "metrics", "port": 70000, "protocol": "TCP"})
            store.put(extra)
        incremental = translator.translate(store.view())
        full = to_ir.translate(store.view())
        assert incremental.groups == full.groups
        assert incremental.conditions == full.conditions


def test_envoy_names_of_different_objects_never_collide_with_kubernetes_names():
    """Every naming function, over parts chosen to collide if anything could (each other's fixed
    words, dots): one Envoy name of one resource type is one object. A part with '/' breaks it."""
    import itertools

    from controlplane.translate import names

    parts = ["a", "b", "websocket", "ca", "certificate", "a.ca", "a-websocket"]
    seen: dict[tuple[str, str], names.Named] = {}
    for make, kind in names.RESOURCE_TYPES.items():
        arity = make.__code__.co_argcount
        for args in itertools.product(parts, repeat=arity):
            named = (make, args)
            other = seen.setdefault((kind, make(*args)), named)
            assert other == named and not names.collide(named, other), f"{other} and {named}: {make(*args)!r}"
            assert all(names.part_problem(part) is None for part in args)
    assert not names.collide((names.cluster, ("shop", "api")), (names.websocket_cluster, ("shop", "api")))
    assert names.collide((names.cluster, ("shop", "api/websocket")), (names.websocket_cluster, ("shop", "api")))
    assert names.part_problem("api/websocket") is not None and names.part_problem("api.v2") is None


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-1, 70000), st.floats(allow_nan=False), st.text(max_size=4),
                 st.lists(st.integers(), max_size=1), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


def _mostly(valid, wrong=_ANY):
    """`valid` nine times in ten: most slices read fast, and each field is sometimes wrong."""
    return st.integers(0, 9).flatmap(lambda roll: wrong if roll == 0 else valid)


_CONDITION = _mostly(st.one_of(st.none(), st.booleans()), st.sampled_from([0, 1, 1.0, "true", "False"]))
_ADDRESSES = {"IPv4": ["10.0.0.1", "127.0.0.1", "10.1.2.3"], "IPv6": ["::1", "2001:db8::1", "fd00::2"]}
_WRONG_ADDRESS = st.one_of(st.sampled_from(["fe80::1%eth0", "::ffff:10.0.0.1", "999.1.2.3", "010.0.0.1", "localhost",
                                            "", "10.0.0.1", "::1"]), _ANY)


def _slice(family: str):
    endpoint = _mostly(st.fixed_dictionaries({}, optional={
        "addresses": _mostly(st.lists(_mostly(st.sampled_from(_ADDRESSES[family]), _WRONG_ADDRESS), max_size=2)),
        "conditions": _mostly(st.fixed_dictionaries({}, optional={
            "ready": _CONDITION, "serving": _CONDITION, "terminating": _CONDITION})),
        "hostname": _ANY}))
    port = _mostly(st.fixed_dictionaries({}, optional={
        "name": _mostly(st.sampled_from(["http", "", "metrics"])),
        "port": _mostly(st.integers(1, 65535), st.integers(-1, 70000)), "protocol": _mostly(st.just("TCP"))}))
    return st.fixed_dictionaries({}, optional={
        "addressType": _mostly(st.just(family), st.sampled_from(["FQDN", "ipv4", None])),
        "address_type": st.sampled_from(["IPv4", "IPv6"]),  # the model reads it where addressType is absent
        "endpoints": _mostly(st.lists(endpoint, max_size=3)), "ports": _mostly(st.lists(port, max_size=2))})


_SLICE = st.sampled_from(["IPv4", "IPv6"]).flatmap(_slice)


@settings(max_examples=1500, deadline=None)
@given(raw=_SLICE)
def test_an_endpoint_slice_read_without_the_model_reads_as_the_model_reads_it(raw):
    """The fast reading of EndpointSlices (a full translation's largest cost) takes only what the
    model takes, and reads it the same: the same ports, endpoints and draining ones."""
    plain = kube.plain_endpoint_slice(raw)
    if plain is not None:
        assert to_ir._checked_slice_by_model(raw) == (plain, None)


_OFFER = st.tuples(st.lists(st.tuples(st.sampled_from(["http", "", "metrics"]), st.sampled_from([None, 80, 8080]))),
                   st.lists(st.tuples(st.sampled_from(["10.0.0.2", "10.0.0.10", "10.0.0.1", "fd00::1"]), st.booleans()),
                            max_size=6))


@settings(max_examples=400, deadline=None)
@given(offers=st.lists(st.none() | _OFFER, max_size=4), port_name=st.sampled_from(["http", ""]))
def test_a_backends_endpoints_are_its_slices_endpoints_once_each_by_address_and_port(offers, port_name):
    """Each (address, port) once, the last slice's word on whether it drains, sorted: also when two
    slices give the port different numbers or repeat an address."""
    verdicts = [(None if offer is None else (tuple(offer[0]), tuple(a for a, _ in offer[1]),
                                             tuple(d for _, d in offer[1])), None) for offer in offers]
    expected: dict[tuple[str, int], bool] = {}
    for offer in offers:
        number = next((n for name, n in (offer[0] if offer else ()) if name == port_name and n), None)
        if number is not None:
            expected.update({(address, number): drains for address, drains in offer[1]})
    endpoints = to_ir._endpoints(verdicts, kube.ServicePort(name=port_name, port=1))
    assert endpoints == tuple(sorted((a, n, d) for (a, n), d in expected.items()))
    assert all(type(endpoint) is ir.Endpoint for endpoint in endpoints)


def test_the_usual_endpoint_slice_is_read_without_the_model():
    raw = endpoint_slice("a", [ready("10.0.0.1"), ("10.0.0.2", {"ready": False, "serving": True, "terminating": True}),
                               ("10.0.0.3", {"ready": False}), ("10.0.0.4", {"ready": True, "terminating": True})])
    expected = ((("http", 8080),), ("10.0.0.1", "10.0.0.2", "10.0.0.4"), (False, True, True))
    assert kube.plain_endpoint_slice(raw) == expected == to_ir._checked_slice_by_model(raw)[0]
    assert kube.plain_endpoint_slice({**raw, "addressType": "IPv6"}) is None  # the model says what is wrong
