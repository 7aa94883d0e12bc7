"""Nothing that works stops working: a refused edit, a conflicting newcomer or a bug in one object
leaves what was served in place (translation, the same Translator across views, as `serve` runs it)."""

from __future__ import annotations

import copy

import pytest

from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import to_ir
from tests.objects import NS, app, backend, endpoint_slice, gateway, ready, service


class Session:
    """One Translator fed successive states of the store, like the pipeline does."""

    def __init__(self):
        self.translator = to_ir.Translator()
        self.objects: dict[ObjectKey, dict] = {}

    def apply(self, *objects: dict | list[dict]) -> to_ir.Translation:
        for group in objects:
            for obj in group if isinstance(group, list) else [group]:
                self.objects[ObjectKey.of(obj)] = obj
        return self.translate()

    def delete(self, kind: str, name: str) -> to_ir.Translation:
        del self.objects[ObjectKey(kind, NS, name)]
        return self.translate()

    def translate(self) -> to_ir.Translation:
        return self.translator.translate(Store(list(self.objects.values())).view())


def routes(translation: to_ir.Translation, group: str = "edge") -> list[tuple[str, str]]:
    return [(r.path_prefix or r.path, r.backend) for listener in translation.groups[group].listeners
            for r in listener.routes]


def condition(translation, kind: str, name: str, index: int = 0):
    return translation.conditions[ObjectKey(kind, NS, name)][index]


def endpoints(translation, name: str = "shop/api") -> list[str]:
    backend_ = next(b for b in translation.groups["edge"].backends if b.name == name)
    return [e.address for e in backend_.endpoints]


def edited(obj: dict, generation: int, **spec) -> dict:
    new = copy.deepcopy(obj)
    new["metadata"]["generation"] = generation
    new["spec"].update(spec)
    return new


GOOD = backend("api", routes=[{"pathPrefix": "/api"}, {"pathPrefix": "/login"}])


@pytest.mark.parametrize("mistake, reason", [
    (lambda: [edited(GOOD, 2, routes=[{"pathPrefix": "/api", "priorty": "High"}])], "Invalid"),
    (lambda: [edited(GOOD, 2, service={"name": "api", "port": "grpc"})], "ServicePortNotFound"),
    (lambda: [edited(GOOD, 2, service={"name": "nope", "port": "http"})], "ServiceNotFound"),
    (lambda: [edited(GOOD, 2, gateway="nope")], "GatewayNotFound"),
    (lambda: [GOOD, service("api", port_name="web"), endpoint_slice("api", [ready("10.0.0.2")], port_name="web")],
     "ServicePortNotFound"),  # the Service's port renamed under the Backend
])
def test_a_refused_edit_keeps_serving_the_last_accepted_version(mistake, reason):
    session = Session()
    before = session.apply(gateway(), GOOD, service("api"), endpoint_slice("api", [ready("10.0.0.1")]))
    assert condition(before, "Backend", "api").status == "True"

    after = session.apply(*mistake())
    assert routes(after) == routes(before)
    assert endpoints(after) in (["10.0.0.1"], ["10.0.0.2"])
    accepted = condition(after, "Backend", "api")
    assert (accepted.status, accepted.reason) == ("False", reason)
    assert "Envoys keep serving generation 1, the last accepted version" in accepted.message
    assert after.serving_last_accepted == {ObjectKey("Backend", NS, "api"): 1}
    assert after.node_groups[ObjectKey("Backend", NS, "api")] == "edge"  # Programmed follows what is served

    fixed = session.apply(edited(GOOD, 3), service("api"), endpoint_slice("api", [ready("10.0.0.3")]))
    assert condition(fixed, "Backend", "api").status == "True" and fixed.serving_last_accepted == {}
    assert endpoints(fixed) == ["10.0.0.3"]


def test_the_last_accepted_version_follows_endpoint_changes():
    session = Session()
    session.apply(gateway(), GOOD, service("api"), endpoint_slice("api", [ready("10.0.0.1")]))
    session.apply(edited(GOOD, 2, routes=[{"pathPrefix": "/api", "bogus": 1}]))
    moved = session.apply(endpoint_slice("api", [ready("10.0.0.7")]))  # a pod restarted meanwhile
    assert endpoints(moved) == ["10.0.0.7"] and moved.serving_last_accepted


def test_a_refused_gateway_edit_keeps_its_listener():
    session = Session()
    before = session.apply(gateway(), *app("api"))
    after = session.apply(gateway(generation=2, listeners=[{"name": "http", "port": 99999}]))
    assert [listener.port for listener in after.groups["edge"].listeners] == [8080]
    assert routes(after) == routes(before)
    assert condition(after, "Gateway", "edge").reason == "Invalid"
    assert "generation 1" in condition(after, "Gateway", "edge").message


def test_only_deleting_the_object_removes_it():
    session = Session()
    session.apply(gateway(), *app("api"), *app("web"))
    session.apply(edited(app("api")[0], 2, bogus=True))
    gone = session.delete("Backend", "api")
    assert routes(gone) == [("/web", "shop/web")]
    assert ObjectKey("Backend", NS, "api") not in gone.conditions
    back = session.apply(edited(app("api")[0], 3, bogus=True))  # recreated, bad: nothing to fall back on
    assert routes(back) == [("/web", "shop/web")] and condition(back, "Backend", "api").status == "False"


def test_a_newcomer_does_not_take_a_route_from_the_backend_that_holds_it():
    session = Session()
    session.apply(gateway(), *app("api", routes=[{"pathPrefix": "/"}, {"pathPrefix": "/login"}]))
    # 'aaa' sorts first by name and would have won; it is the newcomer, so it gets only what is free.
    after = session.apply(*app("aaa", routes=[{"pathPrefix": "/"}, {"pathPrefix": "/aaa"}]))
    assert sorted(routes(after)) == [("/", "shop/api"), ("/aaa", "shop/aaa"), ("/login", "shop/api")]
    assert condition(after, "Backend", "api").status == "True"
    newcomer = condition(after, "Backend", "aaa")
    assert (newcomer.status, newcomer.reason) == ("False", "RouteConflict")
    assert "pathPrefix / on listener 'http' is not served: Backend shop/api already serves it" in newcomer.message
    assert "other routes are served" in newcomer.message


def test_at_startup_the_oldest_object_holds_a_contested_route():
    old = backend("zeta", routes=[{"pathPrefix": "/"}])
    old["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    new = backend("aaa", routes=[{"pathPrefix": "/"}])
    new["metadata"]["creationTimestamp"] = "2026-06-01T00:00:00Z"
    result = Session().apply(gateway(), old, new, service("zeta"), service("aaa"),
                             endpoint_slice("zeta", [ready("10.0.0.1")]), endpoint_slice("aaa", [ready("10.0.0.2")]))
    assert routes(result) == [("/", "shop/zeta")]
    assert condition(result, "Backend", "aaa").reason == "RouteConflict"


def test_a_newcomer_gateway_loses_only_the_listener_whose_port_is_held():
    session = Session()
    session.apply(gateway("zzz", port=8080), *app("api", gateway_name="zzz"))
    after = session.apply(gateway("aaa", listeners=[{"name": "http", "port": 8080, "address": "127.0.0.1"},
                                                    {"name": "other", "port": 9090, "address": "127.0.0.1"}]))
    ports = sorted((listener.name, listener.port) for listener in after.groups["edge"].listeners)
    assert ports == [("shop/aaa/other", 9090), ("shop/zzz/http", 8080)]
    assert condition(after, "Gateway", "zzz").status == "True"
    refused = condition(after, "Gateway", "aaa")
    assert refused.reason == "PortConflict" and "listener 'http' is not served: port 8080 is held by" in refused.message


def test_an_unexpected_error_in_one_object_refuses_it_alone(monkeypatch):
    real = to_ir._build_backend

    def broken(key, *args):
        if key.name == "api":
            raise RuntimeError("a bug")
        return real(key, *args)
    monkeypatch.setattr(to_ir, "_build_backend", broken)
    result = Session().apply(gateway(), *app("api"), *app("web"))
    assert routes(result) == [("/web", "shop/web")]
    assert condition(result, "Backend", "api").reason == "TranslationFailed"
    assert "RuntimeError: a bug" in result.failures[ObjectKey("Backend", NS, "api")]


def test_a_service_with_a_port_envoy_would_refuse_refuses_its_backend_by_name():
    bad_service = service("api")
    bad_service["spec"]["ports"][0]["port"] = 70000
    result = Session().apply(gateway(), backend("api"), bad_service, endpoint_slice("api", [ready("10.0.0.1")]))
    refused = condition(result, "Backend", "api")
    assert refused.reason == "InvalidService" and "spec.ports[0].port" in refused.message
    assert result.failures == {}


def test_a_newcomer_served_in_part_never_takes_the_contested_route_later():
    session = Session()
    session.apply(gateway(), *app("api", routes=[{"pathPrefix": "/"}]))
    session.apply(*app("aaa", routes=[{"pathPrefix": "/"}, {"pathPrefix": "/aaa"}]))
    for _ in range(2):  # the next translations: both were served, but only api whole
        again = session.translate()
        assert sorted(routes(again)) == [("/", "shop/api"), ("/aaa", "shop/aaa")]


def test_a_newcomer_gateway_served_in_part_never_takes_the_held_port_later():
    session = Session()
    session.apply(gateway("zzz", port=8080))
    session.apply(gateway("aaa", listeners=[{"name": "http", "port": 8080, "address": "127.0.0.1"},
                                            {"name": "other", "port": 9090, "address": "127.0.0.1"}]))
    again = session.translate()
    assert sorted(listener.name for listener in again.groups["edge"].listeners) == ["shop/aaa/other",
                                                                                   "shop/zzz/http"]



def _with_bad_parts(endpoint_slice_: dict) -> dict:
    broken = copy.deepcopy(endpoint_slice_)
    broken["ports"].append({"name": "metrics", "port": 70000, "protocol": "TCP"})
    broken["endpoints"].append({"addresses": ["999.1.2.3"], "conditions": {"ready": True}})
    return broken


@pytest.mark.parametrize("one_store", [True, False], ids=["fast-path", "full"])
def test_an_endpoint_slice_part_envoy_would_refuse_is_left_out_alone(one_store):
    """Kubernetes stores an EndpointSlice port of 70000 and we get it from the watch: only that port
    (and an endpoint with a bad address) is left out; the slice's other endpoints keep serving, and
    the Backend's status says what was left out, as the problem comes and goes (with one store,
    on the EndpointSlice fast path)."""
    good_slice = endpoint_slice("api", [ready("10.0.0.1"), ready("10.0.0.2")])
    store = Store([gateway(), backend("api"), service("api"), good_slice])
    translator = to_ir.Translator()

    def put(obj: dict) -> to_ir.Translation:
        nonlocal store
        if one_store:
            store.put(obj)
        else:
            view = store.view()
            store = Store([*(view.get(*key) for key in view if key != ObjectKey.of(obj)), obj])
        return translator.translate(store.view())

    translator.translate(store.view())
    translation = put(_with_bad_parts(good_slice))
    assert endpoints(translation) == ["10.0.0.1", "10.0.0.2"]
    resolved = condition(translation, "Backend", "api", 1)
    assert (resolved.status, resolved.reason) == ("False", "InvalidEndpointSlice")
    assert "EndpointSlice api-1" in resolved.message and "70000" in resolved.message
    assert "999.1.2.3" in resolved.message
    assert condition(translation, "Backend", "api").status == "True"  # still accepted

    fixed = put(endpoint_slice("api", [ready("10.0.0.3")]))
    assert endpoints(fixed) == ["10.0.0.3"]
    assert condition(fixed, "Backend", "api", 1).status == "True"


def test_endpoint_changes_on_the_fast_path_are_remembered_for_a_restart():
    store = Store([gateway(), *app("api", "10.0.0.1")])
    translator = to_ir.Translator()
    translator.translate(store.view())
    store.put(endpoint_slice("api", [ready("10.0.0.9")]))
    translator.translate(store.view())
    remembered = translator.remembered()["objects"]
    assert [item["endpoints"] for item in remembered if item["object"]["kind"] == "Backend"] == [[
        ["10.0.0.9", 8080, False]]]
