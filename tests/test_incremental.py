"""Translation that costs what changed must give exactly what translating everything gives.

A random sequence of changes (endpoints, Backend edits, Services, Secrets, deletions, bad input)
is fed to one long-lived `Translator` and `SnapshotBuilder` per node group, as the pipeline feeds
them: they take every shortcut they have (the EndpointSlice fast path, memos, patched
snapshots). After each change the result is compared with a reference that takes none: a
Translator given a fresh store every time (so it can never know what changed, and translates
every object) with the same history, and a fresh SnapshotBuilder for each of its node groups.
The history is shared on purpose: what was last accepted is policy, not a cache.
"""

from __future__ import annotations

import copy
import gc
import weakref

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import to_ir, to_xds
from controlplane.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, RUNTIME, SECRET
from tests.certs import ca_secret, issue, tls_secret
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service

AUTHORITY = issue("endpoints CA", ca=True)
OTHER_AUTHORITY = issue("another CA", ca=True)
EDGE_CLIENT = issue("edge", issuer=AUTHORITY, client=True)
LISTENER_CERTIFICATE = issue("localhost", issuer=AUTHORITY)  # a Gateway's, named by no Backend
UPSTREAM_TLS = {"caSecret": "endpoints-ca", "hostname": "b.shop.svc", "clientCertificateSecret": "edge-client"}
PER_ENDPOINT = {"perEndpoint": {"maxConnections": 10, "maxRequests": 20, "min": {"maxConnections": 15},
                                "max": {"maxRequests": 50}}}
SERVICES = ["a", "b", "c", "d"]
NEWCOMER = "e"  # a Backend and Service that come and go

# Each Backend edit is a whole spec: a route, budgets, a WebSocket block, upstream TLS, or bad input.
BACKEND_SPECS = {
    "plain": {},
    "other-route": {"routes": [{"pathPrefix": "/moved"}]},  # may claim another Backend's route: a conflict
    "per-endpoint": {"circuitBreakers": {"default": PER_ENDPOINT, "high": PER_ENDPOINT}},
    "websocket": {"websocket": {"circuitBreakers": {"maxConnections": 5, "perEndpoint": {"maxRequests": 3}}}},
    # Only what shapes the clusters: the fast path that rebuilds these Backends alone.
    "budgets-only": {"circuitBreakers": {"default": {"scope": "Gateway", "maxConnections": 40}},
                     "connectTimeoutMs": 250, "outlierDetection": {"consecutive5xx": 2}},
    "websocket-budget": {"websocket": {"circuitBreakers": {"maxConnections": 9}}},
    # The same prefix, one header each: they tie on specificity, so their order must not depend on
    # which Backend was placed first.
    "canary": {"routes": [{"pathPrefix": "/moved", "headers": [{"name": "x-canary", "value": "1"}]}]},
    "canary-2": {"routes": [{"pathPrefix": "/moved", "headers": [{"name": "x-canary", "value": "2"}]}]},
    "admin-listener": {"listener": "admin"},  # refused while the Gateway has no such listener
    "tls": {"tls": UPSTREAM_TLS},
    "invalid": {"circuitBreakers": {"default": {"maxConnections": -1}}},  # refused: the last accepted one serves
    "missing-service": {"service": {"name": "nowhere", "port": "http"}},
}

CHANGES = st.one_of(
    st.tuples(st.just("slice"), st.sampled_from(SERVICES), st.integers(0, 3),
              st.sampled_from(["put", "delete", "not-ready", "bad-port"])),
    st.tuples(st.just("backend"), st.sampled_from([*SERVICES, NEWCOMER]), st.sampled_from([*BACKEND_SPECS, "delete"])),
    st.tuples(st.just("service"), st.sampled_from([*SERVICES, NEWCOMER]),
              st.sampled_from(["port-renamed", "delete", "restore"])),
    st.tuples(st.just("secret"), st.sampled_from(["endpoints-ca", "edge-client", "edge-cert"]),
              st.sampled_from(["rotate", "garbage", "delete", "restore"])),
    st.tuples(st.just("gateway"), st.sampled_from(["second-listener", "one-listener", "tls-listener"])),
)


def initial_objects() -> list[dict]:
    objects = [gateway(), ca_secret("endpoints-ca", AUTHORITY.cert_pem),
               tls_secret("edge-client", EDGE_CLIENT.cert_pem, EDGE_CLIENT.key_pem),
               tls_secret("edge-cert", LISTENER_CERTIFICATE.cert_pem, LISTENER_CERTIFICATE.key_pem)]
    for index, name in enumerate(SERVICES):
        objects += [backend(name, **(BACKEND_SPECS["tls"] if name == "b" else {})), service(name),
                    endpoint_slice(name, [ready(f"10.0.0.{index + 1}")])]
    return objects


def apply(store: dict[ObjectKey, dict], change: tuple, step: int) -> None:
    """Apply one change to `store` (key -> object): each write is a new object, as sources make."""
    kind, name, *how = change
    if kind == "slice":
        host, action = how
        key = ObjectKey("EndpointSlice", NS, f"{name}-extra")
        if action == "delete":
            store.pop(key, None)
            return
        conditions = {"ready": action == "put", "serving": True, "terminating": action != "put"}
        extra = endpoint_slice(name, [(f"10.9.0.{host}", conditions)], name=key.name)
        if action == "bad-port":
            extra["ports"].append({"name": "metrics", "port": 70000, "protocol": "TCP"})
        store[key] = extra
    elif kind == "backend":
        key = ObjectKey("Backend", NS, name)
        if how[0] == "delete":
            store.pop(key, None)
            return
        spec = copy.deepcopy(BACKEND_SPECS[how[0]])
        store[key] = backend(name, generation=step + 2, **spec)
    elif kind == "service":
        key = ObjectKey("Service", NS, name)
        if how[0] == "delete":
            store.pop(key, None)
        else:
            store[key] = service(name, port_name="web" if how[0] == "port-renamed" else "http")
    elif kind == "secret":
        key = ObjectKey("Secret", NS, name)
        action = how[0]
        if action == "delete":
            store.pop(key, None)
        elif name == "endpoints-ca":
            pem = {"rotate": OTHER_AUTHORITY.cert_pem, "garbage": b"not a certificate", "restore": AUTHORITY.cert_pem}
            store[key] = ca_secret(name, pem[action])
        elif name == "edge-cert":
            issued = {"rotate": issue("localhost", issuer=AUTHORITY), "restore": LISTENER_CERTIFICATE}.get(action)
            store[key] = (tls_secret(name, issued.cert_pem, issued.key_pem) if issued is not None
                          else tls_secret(name, b"garbage", b"garbage"))
        else:
            issued = {"rotate": issue("edge", issuer=AUTHORITY, client=True), "restore": EDGE_CLIENT}.get(action)
            store[key] = (tls_secret(name, issued.cert_pem, issued.key_pem) if issued is not None
                          else tls_secret(name, b"garbage", b"garbage"))
    else:
        listeners = [{"name": "http", "port": 8080, "address": "127.0.0.1"}]
        if name == "second-listener":
            listeners.append({"name": "admin", "port": 8081, "address": "127.0.0.1"})
        if name == "tls-listener":
            listeners.append({"name": "https", "port": 8443, "address": "127.0.0.1", "protocol": "HTTPS",
                              "tls": {"certificateSecret": "edge-cert"}})
        store[ObjectKey("Gateway", NS, "edge")] = gateway(listeners=listeners, generation=step + 2)


def content(snapshot) -> dict[str, tuple[str, dict[str, str]]]:
    """Per type: the version of the whole set and each resource's version, by name."""
    return {type_url: (snapshot.resources(type_url).select(None).version,
                       {name: r.version for name, r in snapshot.resources(type_url).resources.items()})
            for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, RUNTIME)}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(CHANGES, min_size=1, max_size=3), min_size=1, max_size=10))
# A route freed by its holder goes to the Backend it was refused to.
@example(batches=[[("backend", "a", "other-route")], [("backend", "b", "other-route")], [("backend", "a", "plain")]])
# A Secret another Backend uses: a NACK of it names the first Backend in claim order.
@example(batches=[[("backend", "a", "tls")], [("secret", "endpoints-ca", "rotate")], [("backend", "b", "plain")]])
# A listener's certificate rotated, then refused (the last valid one serves), then deleted.
@example(batches=[[("gateway", "tls-listener")], [("secret", "edge-cert", "rotate")], [("secret", "edge-cert", "garbage")],
                  [("secret", "edge-cert", "delete")], [("secret", "edge-cert", "restore")]])
# A Backend's routes change after a listener's certificate rotated: the listener keeps the new one.
@example(batches=[[("gateway", "tls-listener")], [("secret", "edge-cert", "rotate")], [("backend", "a", "other-route")]])
# A fast path that gives way to a full pass leaves no trace: placed alone, b conflicts with c and
# falls back to its last accepted version, whose CA rotation it judges; placed in order, b wins the
# route and names no CA any more.
@example(batches=[[("backend", "c", "other-route")], [("backend", "b", "other-route"),
                                                     ("secret", "endpoints-ca", "rotate")]])
# d falls back to its last accepted version (its Service renamed the port), which is refused the
# route c took first; c moves away: d's fallback gets the route (found by this test, 2026-12-07).
@example(batches=[[("backend", "d", "other-route")], [("backend", "c", "other-route"), ("service", "d", "port-renamed")],
                  [("backend", "c", "plain")]])
# A listener's certificate and a Backend's CA rotated in one batch: both reach the Envoys.
@example(batches=[[("gateway", "tls-listener")], [("secret", "edge-cert", "rotate"), ("secret", "endpoints-ca", "rotate")]])
def test_incremental_translation_and_snapshots_equal_translating_everything(batches):
    objects = {ObjectKey.of(obj): obj for obj in initial_objects()}
    store = Store(objects.values())  # the long-lived store: its views say what changed
    incremental, reference = to_ir.Translator(), to_ir.Translator()
    builders: dict[str, to_xds.SnapshotBuilder] = {}
    incremental.translate(store.view())
    reference.translate(Store(objects.values()).view())
    for step, change in enumerate(batches):  # a batch: the changes one translation sees together
        before = dict(objects)
        for one in change:
            apply(objects, one, step)
        for key in before.keys() - objects.keys():
            store.delete(key)
        for key, obj in objects.items():
            if before.get(key) is not obj:
                store.put(obj)
        fast = incremental.translate(store.view())
        full = reference.translate(Store(objects.values()).view())  # a new store: nothing to be incremental about
        assert fast.conditions == full.conditions, change
        assert fast.groups == full.groups, change
        assert fast.origins == full.origins, change  # what an Envoy NACK is reported on
        assert fast.node_groups == full.node_groups, change
        assert fast.certificate_expiry == full.certificate_expiry, change
        assert fast.serving_last_accepted == full.serving_last_accepted, change
        assert fast.failures.keys() == full.failures.keys(), change
        assert incremental.remembered() == reference.remembered(), change  # what a restart keeps
        for name, group in fast.groups.items():
            patched = builders.setdefault(name, to_xds.SnapshotBuilder()).snapshot(group)
            fresh = to_xds.snapshot(full.groups[name])
            assert content(patched) == content(fresh), change
            assert patched.version == fresh.version
        for gone in builders.keys() - fast.groups.keys():
            del builders[gone]


def test_a_change_places_again_only_the_backends_that_name_what_changed(monkeypatch):
    """The dependency index: a Service, Secret or Backend change at many Backends costs what it touches."""
    listeners = [{"name": "http", "port": 8080, "address": "127.0.0.1"},
                 {"name": "https", "port": 8443, "address": "127.0.0.1", "protocol": "HTTPS",
                  "tls": {"certificateSecret": "edge-cert"}}]
    objects = [gateway(listeners=listeners), ca_secret("endpoints-ca", AUTHORITY.cert_pem),
               tls_secret("edge-cert", LISTENER_CERTIFICATE.cert_pem, LISTENER_CERTIFICATE.key_pem)]
    for index in range(30):
        name = f"b{index}"
        objects += [backend(name, **({"tls": {"caSecret": "endpoints-ca", "hostname": "b.shop.svc"}} if index == 7
                                     else {})),
                    service(name), endpoint_slice(name, [ready(f"10.0.1.{index + 1}")])]
    store = Store(objects)
    translator = to_ir.Translator()
    translator.translate(store.view())
    placed: list[str] = []
    place = to_ir.Translator._place_backend
    monkeypatch.setattr(to_ir.Translator, "_place_backend",
                        lambda self, view, key, *rest: placed.append(key.name) or place(self, view, key, *rest))

    def change(*, put=(), delete=()) -> tuple[list[str], to_ir.Translation]:
        """The Backends placed again, and the translation (checked against one from scratch)."""
        placed.clear()
        for obj in put:
            store.put(obj)
        for key in delete:
            store.delete(key)
        translation, placed_again = translator.translate(store.view()), list(placed)
        assert translation.groups == to_ir.translate(store.view()).groups
        return placed_again, translation

    assert change(put=[service("b3", port=81)])[0] == ["b3"]
    placed_again, translation = change(put=[backend("b4", routes=[{"pathPrefix": "/moved"}], generation=2)])
    assert placed_again == ["b4"]
    routes = {route.path_prefix: route.backend for route in translation.groups["edge"].listeners[0].routes}
    assert routes["/moved"] == "shop/b4" and "/b4" not in routes
    assert change(put=[ca_secret("endpoints-ca", OTHER_AUTHORITY.cert_pem)])[0] == ["b7"]
    placed_again, translation = change(delete=[ObjectKey("Backend", NS, "b5")])
    assert placed_again == [] and "shop/b5" not in {b.name for b in translation.groups["edge"].backends}
    placed_again, translation = change(put=[backend("newcomer", service="b6")])
    assert placed_again == ["newcomer"] and "shop/newcomer" in {b.name for b in translation.groups["edge"].backends}
    assert change(put=[service("nobody-uses-it")])[0] == []
    rotated = issue("localhost", issuer=AUTHORITY)
    placed_again, translation = change(put=[tls_secret("edge-cert", rotated.cert_pem, rotated.key_pem)])
    https = next(listener for listener in translation.groups["edge"].listeners if listener.tls is not None)
    assert placed_again == [] and https.tls.certificate.certificate_chain == rotated.cert_pem


def test_a_rejected_backend_keeps_no_earlier_translation_alive():
    """The memo kept a rejection and raised it again on every full pass: each raise added that pass's
    frames to its traceback, and with them the pass's translation, ~6 MB a pass at 10,000 Backends
    (found by an outside test: memory grew with every Gateway edit while a Backend was refused)."""
    objects = [gateway(), service("api"), endpoint_slice("api", [ready("10.0.0.1")]), backend("api"),
               backend("orphan", service="missing")]
    store, translator, earlier = Store(objects), to_ir.Translator(), []
    for edit in range(4):
        store.put(gateway(generation=edit + 2, limits={"maxConnections": 100 + edit}))  # a full pass each time
        translation = translator.translate(store.view())
        assert translation.conditions[ObjectKey("Backend", NS, "orphan")][0].reason == "ServiceNotFound"
        earlier.append(weakref.ref(translation))
    del translation
    gc.collect()
    assert [ref() is None for ref in earlier] == [True, True, True, False]  # the last one is the translator's
