"""Our CRDs on a real kube-apiserver v1.36 (tests/real_kube.py): what the API server itself refuses
(OpenAPI schema and CEL), what only translation can refuse, and what `kubectl get` shows.

Every CEL rule we ship is evaluated here at least once on an object it accepts and on one it
refuses (`test_every_cel_rule_is_evaluated_both_ways`): until this ran, the rules were only ever
compared as strings.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import to_ir
from tests.e2e.test_kind import quickstart
from tests.real_kube import CRDS, REPO, KubeError

GROUP_VERSION = "xds.controlplane.dev/v1alpha1"


def _rules() -> dict[str, str]:
    """Every CEL rule in the CRDs we ship: message -> rule."""
    found: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for validation in node.get("x-kubernetes-validations", []):
                found[validation["message"]] = validation["rule"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    for path in sorted(CRDS.glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return found


def gateway(*listeners: dict, **spec: Any) -> dict:
    return {"apiVersion": GROUP_VERSION, "kind": "Gateway", "metadata": {"name": "edge"},
            "spec": {"nodeCluster": "edge", "listeners": list(listeners) or [{"name": "http", "port": 8080}], **spec}}


def listener(**fields: Any) -> dict:
    return {"name": "http", "port": 8080, **fields}


def backend(*routes: dict, port: Any = 80, **spec: Any) -> dict:
    return {"apiVersion": GROUP_VERSION, "kind": "Backend", "metadata": {"name": "api"},
            "spec": {"gateway": "edge", "service": {"name": "api", "port": port},
                     "routes": list(routes) or [{"pathPrefix": "/"}], **spec}}


def route(**fields: Any) -> dict:
    return fields or {"pathPrefix": "/"}


HTTPS = {"protocol": "HTTPS", "tls": {"certificateSecret": "edge-cert"}}

# (what is wrong, the object, the field the API server names, words of its message)
REFUSED = [
    ("listener port above 65535", gateway(listener(port=70000)), "spec.listeners[0].port",
     "less than or equal to 65535"),
    ("listener port 0", gateway(listener(port=0)), "spec.listeners[0].port", "greater than or equal to 1"),
    ("listener port as a string", gateway(listener(port="80")), "spec.listeners[0].port", "must be of type integer"),
    ("listener address not an IP", gateway(listener(address="not-an-ip")), "spec.listeners[0].address",
     "must be an IP address"),
    ("listener address with an IPv6 zone", gateway(listener(address="fe80::1%eth0")), "spec.listeners[0].address",
     "must be an IP address"),
    ("listener address IPv4-mapped IPv6", gateway(listener(address="::ffff:10.0.0.1")), "spec.listeners[0].address",
     "must be an IP address"),
    ("listener address IPv4 with a leading zero", gateway(listener(address="10.0.0.01")), "spec.listeners[0].address",
     "must be an IP address"),
    ("listener protocol TCP", gateway(listener(protocol="TCP")), "spec.listeners[0].protocol",
     'supported values: "HTTP", "HTTPS"'),
    ("HTTPS without tls", gateway(listener(protocol="HTTPS")), "spec.listeners[0]",
     "tls is required for HTTPS, and only for it"),
    ("HTTP with tls", gateway(listener(tls={"certificateSecret": "edge-cert"})), "spec.listeners[0]",
     "tls is required for HTTPS, and only for it"),
    ("two listeners on one port", gateway(listener(), listener(name="other")), "spec",
     "listener ports must be unique"),
    ("two listeners of one name", gateway(listener(), listener(port=8081)), "spec",
     "listener names must be unique"),
    ("nodeCluster not a DNS label", gateway(nodeCluster="Edge!"), "spec.nodeCluster", "should match"),
    ("no listeners", gateway(listeners=[]), "spec.listeners", "at least 1 items"),
    ("no nodeCluster", {**gateway(), "spec": {"listeners": [listener()]}}, "spec.nodeCluster", "Required value"),
    ("connection limit 0", gateway(limits={"maxConnections": 0}), "spec.limits.maxConnections",
     "greater than or equal to 1"),
    ("certificate Secret not a DNS label", gateway(listener(protocol="HTTPS", tls={"certificateSecret": "A_B"})),
     "spec.listeners[0].tls.certificateSecret", "should match"),
    ("Service port above 65535", backend(port=70000), "spec.service.port",
     "must be a port number (1-65535) or a port name"),
    ("Service port -1", backend(port=-1), "spec.service.port", "must be a port number (1-65535) or a port name"),
    ("Service port 0", backend(port=0), "spec.service.port", "must be a port number (1-65535) or a port name"),
    ("Service port name with an underscore", backend(port="HTTP_x"), "spec.service.port",
     "must be a port number (1-65535) or a port name"),
    ("Service port name longer than 63", backend(port="a" * 64), "spec.service.port",
     "must be a port number (1-65535) or a port name"),
    ("a route repeated", backend(route(pathPrefix="/"), route(path="/login"), route(pathPrefix="/")), "spec",
     "routes must not repeat"),
    ("an exact path repeated, one with a priority", backend(route(path="/login"), route(path="/login", priority="High")),
     "spec", "routes must not repeat"),
    ("route with path and pathPrefix", backend(route(path="/a", pathPrefix="/")), "spec.routes[0]",
     "set exactly one of pathPrefix and path"),
    ("route with neither path nor pathPrefix", backend(route(priority="High")), "spec.routes[0]",
     "set exactly one of pathPrefix and path"),
    ("pathPrefix with a space", backend(route(pathPrefix="/a b")), "spec.routes[0].pathPrefix", "should match"),
    ("path without a leading /", backend(route(path="login")), "spec.routes[0].path", "should match"),
    ("header name with a space", backend(route(pathPrefix="/", headers=[{"name": "x a", "value": "v"}])),
     "spec.routes[0].headers[0].name", "should match"),
    ("header value with a newline", backend(route(pathPrefix="/", headers=[{"name": "x-a", "value": "v\n"}])),
     "spec.routes[0].headers[0].value", "should match"),
    ("priority Low", backend(route(pathPrefix="/", priority="Low")), "spec.routes[0].priority",
     'supported values: "Default", "High"'),
    ("no routes", backend(routes=[]), "spec.routes", "at least 1 items"),
    ("connect timeout below 10 ms", backend(connectTimeoutMs=5), "spec.connectTimeoutMs",
     "greater than or equal to 10"),
    ("upstream TLS hostname a URL", backend(tls={"caSecret": "ca", "hostname": "https://x"}), "spec.tls.hostname",
     "should match"),
    ("budget as words", backend(circuitBreakers={"default": {"maxConnections": "ten"}}),
     "spec.circuitBreakers.default.maxConnections", "must be of type integer"),
    ("WebSocket idle timeout 0", backend(websocket={"idleTimeoutSeconds": 0}), "spec.websocket.idleTimeoutSeconds",
     "greater than or equal to 1"),
    ("Service as a string", backend(service="api"), "spec.service", "must be of type object"),
]
LIMITS = ("maxConnections", "maxPendingRequests", "maxRequests")
_OTHER = dict(zip(LIMITS, LIMITS[1:] + LIMITS[:1]))  # another limit, so that perEndpoint is not empty
REFUSED += [
    *((f"{limit} both fixed and per endpoint", backend(circuitBreakers={"default": {limit: 5, "perEndpoint": {
        limit: 5}}}), "spec.circuitBreakers.default", f"set {limit} or perEndpoint.{limit}, not both")
      for limit in LIMITS),
    *((f"{bound}.{limit} without perEndpoint.{limit}", backend(websocket={"circuitBreakers": {"perEndpoint": {
        _OTHER[limit]: 5, bound: {limit: 5}}}}), "spec.websocket.circuitBreakers.perEndpoint",
       f"{bound}.{limit} needs perEndpoint.{limit}") for bound in ("min", "max") for limit in LIMITS),
    *((f"min.{limit} above max.{limit}", backend(circuitBreakers={"high": {"perEndpoint": {
        limit: 5, "min": {limit: 9}, "max": {limit: 8}}}}), "spec.circuitBreakers.high.perEndpoint",
       f"min.{limit} must not exceed max.{limit}") for limit in LIMITS),
]


@pytest.mark.parametrize(("manifest", "field", "words"), [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_the_api_server_refuses(real_kube, kube_namespace, manifest, field, words):
    with pytest.raises(KubeError) as refused:
        real_kube.create(copy.deepcopy(manifest), namespace=kube_namespace)
    assert refused.value.status == 422, refused.value
    assert f"{field}: " in refused.value.message and words in refused.value.message, refused.value.message


def test_an_unknown_field_is_refused_by_strict_validation_and_pruned_without_it(real_kube, kube_namespace):
    typo = backend(circuitBreakers={"default": {"maxConection": 10}})
    with pytest.raises(KubeError) as refused:  # what kubectl apply does (fieldValidation=Strict)
        real_kube.create(copy.deepcopy(typo), namespace=kube_namespace)
    assert refused.value.status == 400 and 'strict decoding error: unknown field ' \
        '"spec.circuitBreakers.default.maxConection"' in refused.value.message, refused.value
    stored = real_kube.create(copy.deepcopy(typo), namespace=kube_namespace, field_validation="Ignore")
    assert stored["spec"]["circuitBreakers"] == {"default": {}}  # kubectl apply --validate=false: silently dropped


# (the rule's message, objects it accepts): every rule we ship, accepted at least once.
ACCEPTED = {
    "must be an IP address (Envoy binds an IP literal, such as 0.0.0.0 or ::)": [
        gateway(listener(address="0.0.0.0")), gateway(listener(address="::")),
        gateway(listener(address="2001:db8::1"))],
    "tls is required for HTTPS, and only for it": [gateway(listener(**HTTPS)), gateway(listener(protocol="HTTP"))],
    "listener ports must be unique": [gateway(listener(), listener(name="admin", port=9090))],
    "listener names must be unique": [gateway(listener(), listener(name="admin", port=9090))],
    "must be a port number (1-65535) or a port name (a DNS label, such as http)": [
        backend(port=1), backend(port=65535), backend(port="http"), backend(port="grpc-web")],
    "set exactly one of pathPrefix and path": [backend(route(path="/login"), route(pathPrefix="/"))],
    "routes must not repeat: two routes with the same path (or pathPrefix) and no headers match the same "
    "requests; remove one": [
        backend(route(path="/a"), route(pathPrefix="/a"), route(pathPrefix="/b")),
        backend(route(pathPrefix="/"), route(pathPrefix="/", headers=[{"name": "x-tenant", "value": "a"}]),
                route(pathPrefix="/", headers=[{"name": "x-tenant", "value": "b"}]))],
    **{f"set {limit} or perEndpoint.{limit}, not both": [
        backend(circuitBreakers={"default": {"perEndpoint": {limit: 5}}}),
        backend(circuitBreakers={"default": {limit: 5, "perEndpoint": {_OTHER[limit]: 5}}})] for limit in LIMITS},
    **{f"{bound}.{limit} needs perEndpoint.{limit}: it bounds the budget computed from it": [
        backend(websocket={"circuitBreakers": {"perEndpoint": {limit: 5, bound: {limit: 5}}}})]
       for bound in ("min", "max") for limit in LIMITS},
    **{f"min.{limit} must not exceed max.{limit}": [
        backend(circuitBreakers={"high": {"perEndpoint": {limit: 5, "min": {limit: 8}, "max": {limit: 8}}}})]
       for limit in LIMITS},
}


@pytest.mark.parametrize("message", sorted(ACCEPTED))
def test_what_every_cel_rule_accepts(real_kube, kube_namespace, message):
    for manifest in ACCEPTED[message]:
        stored = real_kube.create(copy.deepcopy(manifest), namespace=kube_namespace)
        real_kube.delete(GROUP_VERSION, stored["kind"], stored["metadata"]["name"], namespace=kube_namespace)


def test_every_cel_rule_is_evaluated_both_ways():
    refused_words = {case[3] for case in REFUSED}
    for message in _rules():
        assert message in ACCEPTED, f"no object in ACCEPTED passes the CEL rule {message!r}"
        assert any(words in message for words in refused_words), f"no case in REFUSED fails the CEL rule {message!r}"


def test_every_crd_we_ship_is_established_and_served(real_kube):
    for path in sorted(CRDS.glob("*.yaml")):
        crd = real_kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                            yaml.safe_load(path.read_text())["metadata"]["name"])
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True", path.name
    assert real_kube.list(GROUP_VERSION, "Gateway", user="controlplane") == []


def _service(port_name: str = "http") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
            "spec": {"ports": [{"name": port_name, "port": 80, "targetPort": 8080}]}}


def _translate_what_the_control_plane_reads(real_kube, namespace: str):
    """The objects as the shipped ServiceAccount lists them from the API server, translated."""
    objects = []
    for api_version, kind in ((GROUP_VERSION, "Gateway"), (GROUP_VERSION, "Backend"), ("v1", "Service"),
                              ("discovery.k8s.io/v1", "EndpointSlice")):
        for item in real_kube.list(api_version, kind, namespace=namespace, user="controlplane"):
            objects.append({"apiVersion": api_version, "kind": kind, **item})
    return to_ir.translate(Store(objects).view())


# What the API server stores but only we can refuse: (what is wrong, objects, reason, words of the message).
ONLY_WE_REFUSE = [
    ("a Service port name the Service does not have", [gateway(), _service(), backend(port="grpc")],
     "ServicePortNotFound", "has no port"),
    ("a Service port number the Service does not have", [gateway(), _service(), backend(port=8443)],
     "ServicePortNotFound", "has no port"),
    ("a Gateway that does not exist", [_service(), backend()], "GatewayNotFound", "does not exist"),
    ("a Service that does not exist", [gateway(), backend()], "ServiceNotFound", "does not exist"),
    ("a listener the Gateway does not have", [gateway(), _service(), backend(listener="admin")],
     "ListenerNotFound", "has no listener"),
    ("a route with headers repeated in one Backend", [gateway(), _service(), backend(
        route(pathPrefix="/", headers=[{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "2"}]),
        route(pathPrefix="/", headers=[{"name": "X-B", "value": "2"}, {"name": "x-a", "value": "1"}]))],
     "DuplicateRoute", "repeats an earlier route"),
]


@pytest.mark.parametrize(("objects", "reason", "words"), [case[1:] for case in ONLY_WE_REFUSE],
                         ids=[case[0] for case in ONLY_WE_REFUSE])
def test_what_only_translation_refuses_gets_our_conditions(real_kube, kube_namespace, objects, reason, words):
    for manifest in objects:
        real_kube.create(copy.deepcopy(manifest), namespace=kube_namespace)
    translation = _translate_what_the_control_plane_reads(real_kube, kube_namespace)
    accepted = translation.conditions[ObjectKey("Backend", kube_namespace, "api")][0]
    assert (accepted.status, accepted.reason) == ("False", reason), accepted
    assert words in accepted.message, accepted.message


def _table(real_kube, namespace: str, *, wide: bool) -> dict[str, str]:
    """The row `kubectl get backends` prints for Backend api (the API server computes it)."""
    table = real_kube.request("GET", real_kube.path(GROUP_VERSION, "Backend", namespace=namespace),
                              accept="application/json;as=Table;v=v1;g=meta.k8s.io",
                              query={"includeObject": "None"})
    columns = [c["name"] for c in table["columnDefinitions"] if wide or c["priority"] == 0]
    [row] = table["rows"]
    cells = [cell for cell, c in zip(row["cells"], table["columnDefinitions"]) if wide or c["priority"] == 0]
    return dict(zip(columns, cells))


def _conditions(accepted: tuple[str, str, str], resolved: tuple[str, str, str], programmed: tuple[str, str, str]):
    return {"status": {"conditions": [
        {"type": kind, "status": status, "reason": reason, "message": message, "observedGeneration": 1,
         "lastTransitionTime": "2026-01-01T00:00:00Z"}
        for kind, (status, reason, message) in zip(("Accepted", "ResolvedRefs", "Programmed"),
                                                   (accepted, resolved, programmed))]}}


def test_kubectl_get_shows_why_an_object_is_refused(real_kube, kube_namespace):
    real_kube.create(backend(port="grpc"), namespace=kube_namespace)
    missing_port = "Service shop/api has no port 'grpc': use one of its ports (http)"
    real_kube.patch(GROUP_VERSION, "Backend", "api", _conditions(
        ("False", "ServicePortNotFound", missing_port), ("False", "ServicePortNotFound", missing_port),
        ("False", "Rejected", "not served")), namespace=kube_namespace, subresource="status", user="controlplane")
    row = _table(real_kube, kube_namespace, wide=False)
    assert (row["Accepted"], row["Programmed"], row["Reason"]) == ("False", "False", "ServicePortNotFound")
    assert "Message" not in row
    assert _table(real_kube, kube_namespace, wide=True)["Message"] == missing_port

    real_kube.patch(GROUP_VERSION, "Backend", "api", _conditions(
        ("True", "Accepted", "ok"), ("True", "ResolvedRefs", "ok"), ("Unknown", "NoEnvoys", "no Envoy connected")),
        namespace=kube_namespace, subresource="status", user="controlplane")
    assert _table(real_kube, kube_namespace, wide=True)["Reason"] == "NoEnvoys"

    real_kube.patch(GROUP_VERSION, "Backend", "api", _conditions(
        ("True", "Accepted", "ok"), ("True", "ResolvedRefs", "ok"), ("True", "Programmed", "on 2 Envoys")),
        namespace=kube_namespace, subresource="status", user="controlplane")
    row = _table(real_kube, kube_namespace, wide=True)
    assert (row["Accepted"], row["Programmed"], row["Reason"], row["Message"]) == ("True", "True", None, None)


def test_the_quickstart_manifests_apply_in_the_quickstart_order(real_kube):
    """What the README's quickstart applies (tests/e2e runs it on kind) is accepted as written, strictly
    validated, by a real API server; then deleted, so other tests see none of it."""
    files = []
    for step in quickstart():
        if step.startswith("kubectl apply"):
            for path in (REPO / argument for argument in step.split()[2:] if argument != "-f"):
                files += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    assert REPO / "k8s" / "examples" / "echo.yaml" in files
    applied = []
    try:
        for path in files:
            for document in yaml.safe_load_all(path.read_text()):
                if document:
                    stored = real_kube.apply(document)
                    applied.append((stored["apiVersion"], stored["kind"], stored["metadata"]))
        kinds = {kind for _, kind, _ in applied}
        assert {"Gateway", "Backend", "Deployment", "Service", "ClusterRoleBinding"} <= kinds, kinds
    finally:
        for api_version, kind, metadata in reversed(applied):
            if kind not in ("CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole",
                            "ClusterRoleBinding", "Role", "RoleBinding"):  # the fixture's own, as shipped
                real_kube.delete(api_version, kind, metadata["name"], namespace=metadata.get("namespace"))
