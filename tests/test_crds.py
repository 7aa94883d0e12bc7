"""The CRDs in k8s/crds are generated from the pydantic models, and are structural schemas; the
models' messages say what is wrong in a user's words."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from controlplane.cli import crd_yaml
from controlplane.model import crds, problems, schema

CRD_DIR = Path(__file__).resolve().parent.parent / "k8s" / "crds"


def test_crd_files_match_the_models():
    for kind in crds.KINDS:
        path = CRD_DIR / f"{crds.PLURALS[kind]}.yaml"
        assert path.read_text() == crd_yaml(schema.crd(kind)), f"{path} drifted from the models: run `make crds`"


def _walk(node, where="$"):
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from _walk(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{where}[{index}]")


def test_schemas_are_structural():
    for kind in crds.KINDS:
        root = yaml.safe_load((CRD_DIR / f"{crds.PLURALS[kind]}.yaml").read_text())
        openapi = root["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for where, node in _walk(openapi):
            if "properties" in node and not where.endswith(".properties"):
                assert node.get("type") == "object", f"{kind} {where}: an object schema needs type: object"
            assert "$ref" not in node and "anyOf" not in node, f"{kind} {where}: not structural"


def test_cel_rules_mirror_the_model_validators():
    rules = [v["rule"] for _, node in _walk(schema.crd("Backend")) for v in node.get("x-kubernetes-validations", [])]
    assert "has(self.pathPrefix) != has(self.path)" in rules
    gateway_rules = [v["message"] for _, node in _walk(schema.crd("Gateway"))
                     for v in node.get("x-kubernetes-validations", [])]
    assert gateway_rules == ["listener ports must be unique", "listener names must be unique",
                             "tls is required for HTTPS, and only for it",
                             "must be an IP address (Envoy binds an IP literal, such as 0.0.0.0 or ::)"]


def _messages(model, spec) -> list[str]:
    try:
        model.model_validate(spec)
    except ValidationError as error:
        return problems.explain(error, "spec")
    return []


def _gateway(**listener) -> dict:
    return {"nodeCluster": "edge", "listeners": [{"name": "http", "port": 8080, **listener}]}


def _backend(port=80, **route) -> dict:
    return {"gateway": "edge", "service": {"name": "api", "port": port}, "routes": [route or {"pathPrefix": "/"}]}


@pytest.mark.parametrize(("model", "spec", "message"), [
    (crds.GatewaySpec, _gateway(address="not-an-ip"),
     "spec.listeners[0].address: 'not-an-ip' is not an IP address (Envoy binds an IP literal, such as 0.0.0.0 or ::)"),
    (crds.GatewaySpec, _gateway(address=""), "spec.listeners[0].address: '' is not an IP address"),
    (crds.GatewaySpec, _gateway(address="１２７.0.0.1"), "spec.listeners[0].address: '１２７.0.0.1' (with '１', "
                                                        "U+FF11 FULLWIDTH DIGIT ONE"),
    (crds.GatewaySpec, _gateway(address="fe80::1%eth0"), "spec.listeners[0].address: 'fe80::1%eth0' has an IPv6 "
                                                         "zone ('%eth0')"),
    (crds.GatewaySpec, _gateway(address="::ffff:10.0.0.1"), "spec.listeners[0].address: '::ffff:10.0.0.1' is an "
                                                            "IPv4-mapped IPv6 address: write it as 10.0.0.1"),
    (crds.GatewaySpec, _gateway(port=70000), "spec.listeners[0].port: must be at most 65535 (it is 70000)"),
    (crds.GatewaySpec, _gateway(port=0), "spec.listeners[0].port: must be at least 1 (it is 0)"),
    (crds.GatewaySpec, _gateway(port="80"), "spec.listeners[0].port: must be a whole number, not a string: write it "
                                            "without quotes (it is '80')"),
    (crds.GatewaySpec, _gateway(protocol="TCP"), "spec.listeners[0].protocol: must be 'HTTP' or 'HTTPS' (it is 'TCP')"),
    (crds.GatewaySpec, {"listeners": [{"name": "http", "port": 8080}]}, "spec.nodeCluster: required, but missing: "
                                                                       "add it"),
    (crds.GatewaySpec, {"nodeCluster": "edge", "listeners": []}, "spec.listeners: needs at least 1 item (it has 0)"),
    (crds.GatewaySpec, {"nodeCluster": "a" * 64, "listeners": [{"name": "http", "port": 8080}]},
     "spec.nodeCluster: is too long: at most 63 characters (it is 'aaaa"),
    (crds.BackendSpec, {**_backend(), "service": "api"}, "spec.service: must be a mapping of fields (name: value) "
                                                         "(it is 'api')"),
    (crds.BackendSpec, _backend(70000), "spec.service.port: 70000 is not a port number (1-65535)"),
    (crds.BackendSpec, _backend(-1), "spec.service.port: -1 is not a port number (1-65535)"),
    (crds.BackendSpec, _backend("HTTP_x"), "spec.service.port: 'HTTP_x' is neither a port number (1-65535) nor a "
                                           "port name (a DNS label"),
    (crds.BackendSpec, _backend(pathPrefix="/a b"), "spec.routes[0].pathPrefix: '/a b' is not a path"),
    (crds.BackendSpec, _backend(path="/a\x00"), "spec.routes[0].path: '/a\\x00' is not a path"),
    (crds.BackendSpec, _backend(pathPrefix="/", headers=[{"name": "x-a\n", "value": "v"}]),
     "spec.routes[0].headers[0].name: 'x-a\\n' is not an HTTP header name"),
    (crds.BackendSpec, _backend(pathPrefix="/", headers=[{"name": "x-a", "value": "v\r\n"}]),
     "spec.routes[0].headers[0].value: 'v\\r\\n' is not a header value"),
    (crds.BackendSpec, _backend(pathPrefix="/\ud800"), "spec.routes[0].pathPrefix: '/\\ud800' is not valid Unicode"),
])
def test_a_user_reads_what_is_wrong_and_what_is_right(model, spec, message):
    [sentence] = _messages(model, spec)
    assert sentence.startswith(message)


# pydantic's own vocabulary, which says nothing to a user: union members, wrapped validators, the
# Python class a mapping should be an instance of, a raw regular expression.
INTERNAL = re.compile(r"constrained-|function-|lax-|json-or-python|value_error|Value error|instance of|\[\^|\$'|"
                      r"\.int\b|\.str\b|literal\[|_error|_type\b|Input should|String should|List should|"
                      r"after validation|Field required|valid dictionary")

BAD_SPECS = [
    (crds.GatewaySpec, _gateway(address=5)), (crds.GatewaySpec, _gateway(port=True)),
    (crds.GatewaySpec, {"nodeCluster": "Edge!", "listeners": "http"}),
    (crds.GatewaySpec, {"nodeCluster": "edge", "listeners": [5]}),
    (crds.GatewaySpec, _gateway(protocol="TCP", tls={"certificateSecret": "A_B"})),
    (crds.BackendSpec, _backend(1.5)), (crds.BackendSpec, _backend(None)), (crds.BackendSpec, _backend([80])),
    (crds.BackendSpec, _backend(priority="Low")), (crds.BackendSpec, _backend(pathPrefix=5)),
    (crds.BackendSpec, {**_backend(), "tls": {"caSecret": "ca", "hostname": "https://x"}}),
    (crds.BackendSpec, {**_backend(), "circuitBreakers": {"default": {"maxConnections": "ten"}}}),
    (crds.BackendSpec, {**_backend(), "websocket": {"idleTimeoutSeconds": 0}}),
    (crds.BackendSpec, {**_backend(), "service": "api"}),
]


_FULL_GATEWAY = {"nodeCluster": "edge", "limits": {"maxConnections": 5}, "listeners": [
    {"name": "https", "port": 8443, "address": "0.0.0.0", "protocol": "HTTPS",
     "tls": {"certificateSecret": "cert", "clientCaSecret": "ca"}}]}
_FULL_BACKEND = {
    "gateway": "edge", "listener": "https", "service": {"name": "api", "port": 80}, "connectTimeoutMs": 100,
    "routes": [{"pathPrefix": "/", "headers": [{"name": "x-tenant", "value": "a"}], "priority": "High"}],
    "circuitBreakers": {"default": {"maxConnections": 1, "maxPendingRequests": 1, "maxRequests": 1, "maxRetries": 0},
                        "high": {"maxConnections": 1}},
    "tls": {"caSecret": "ca", "hostname": "api.shop", "clientCertificateSecret": "client"},
    "websocket": {"circuitBreakers": {"maxConnections": 1}, "idleTimeoutSeconds": 5}}
_WRONG_VALUES = [None, True, 0, -1, 1.5, 2**70, "", "X_Y", "80", [], [1], {}, {"a": 1}, "\ud800", "１", "a" * 5000]


def _places(node, path=()):
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _places(child, (*path, key))


def _with(node, path, value):
    if not path:
        return value
    node = copy.deepcopy(node)
    parent = node
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return node


WRONG_EVERYWHERE = [(model, _with(spec, path, value)) for model, spec in ((crds.GatewaySpec, _FULL_GATEWAY),
                                                                          (crds.BackendSpec, _FULL_BACKEND))
                    for path in _places(spec) for value in _WRONG_VALUES]


def test_every_field_of_both_kinds_is_exercised():
    assert crds.GatewaySpec.model_validate(_FULL_GATEWAY) and crds.BackendSpec.model_validate(_FULL_BACKEND)
    assert len(WRONG_EVERYWHERE) > 700


@pytest.mark.parametrize(("model", "spec"), BAD_SPECS + WRONG_EVERYWHERE)
def test_no_message_shows_pydantic_internals(model, spec):
    sentences = _messages(model, spec)
    for sentence in sentences:
        assert not INTERNAL.search(sentence), sentence
        assert sentence.startswith("spec"), sentence
