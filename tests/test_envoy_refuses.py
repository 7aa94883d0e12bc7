"""We refuse what Envoy refuses: anything we send that Envoy NACKs is our bug.

Each value our models refuse is built into an Envoy resource by our builders (or, where a proto
cannot even hold it, into the bootstrap dict the builders' output becomes) and given to the real
`envoy --mode validate`: Envoy must refuse it too, for that reason, unless it is in the case's
`stricter` table, which says why we refuse a value Envoy would load (it can never match a
request, Kubernetes refuses it, or it means something else than what was written). Near misses
we accept must load in Envoy. So the models refuse exactly what Envoy refuses, plus that table.

One `envoy --mode validate` takes about 0.1 s; the accepted values of a case load together in one
bootstrap, the refused ones one per run, on a few threads.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controlplane.model import crds, kube, problems
from controlplane.runtime.envoy_process import envoy_binary
from controlplane.sources.store import Store
from controlplane.translate import builders as b
from controlplane.translate import render, to_ir, to_xds
from controlplane.xds import Snapshot
from tests.objects import backend, endpoint_slice, gateway, ready, service

# -- the real Envoy ---------------------------------------------------------------------------------


def envoy_validates(bootstraps: Mapping[str, dict], directory: Path) -> dict[str, subprocess.CompletedProcess]:
    """`envoy --mode validate` of each bootstrap, a few at a time: {key: the finished process}."""
    def validate(item: tuple[int, tuple[str, dict]]) -> tuple[str, subprocess.CompletedProcess]:
        index, (key, bootstrap) = item
        path = directory / f"bootstrap-{index}.json"  # JSON: the bytes of any string, escaped, as xDS would carry them
        path.write_text(json.dumps(bootstrap))
        return key, subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True,
                                   text=True, timeout=60)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(validate, enumerate(bootstraps.items())))


def refusal(process: subprocess.CompletedProcess) -> str:
    """Envoy's reason for refusing a bootstrap (from its critical log line on), or "" when it loaded."""
    if process.returncode == 0:
        return ""
    output = process.stdout + process.stderr
    return output[output.find("[critical]"):] or output


# -- a small configuration, built by our builders, with one value changed ---------------------------

LISTENER, CLUSTER = "shop/edge/http", "shop/api"


def snapshot_bootstrap(*, listeners=(("127.0.0.1", 8080),), endpoints=(("10.0.0.1", 8080),),
                       routes: list | None = None) -> dict:
    """Listeners (address, port), one cluster with `endpoints`, and `routes` to it, as our
    builders make them for xDS, inlined into a static bootstrap (render.static_bootstrap)."""
    routes = routes if routes is not None else [b.route(CLUSTER, prefix="/")]
    built = [b.http_listener(f"{LISTENER}-{index}", address=address, port=port, route_config_name=LISTENER)
             for index, (address, port) in enumerate(listeners)]
    snapshot = Snapshot(listeners=built, routes=[b.route_configuration(LISTENER, [b.virtual_host("all", routes)])],
                        clusters=[b.eds_cluster(CLUSTER)], endpoints=[b.load_assignment(CLUSTER, list(endpoints))])
    return render.static_bootstrap(snapshot, admin_port=9901)  # validate mode binds nothing


def _with_port(path: str) -> Callable[[Any], dict]:
    """A bootstrap whose listener or endpoint port is `value`, set in the bootstrap itself: a proto
    cannot hold -1 or 2**32 (a builder raises), Envoy's JSON parser says so."""
    def bootstrap(value: Any) -> dict:
        config = copy.deepcopy(BASE)
        resources = config["static_resources"]
        address = (resources["listeners"][0]["address"] if path == "listener" else
                   resources["clusters"][0]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"])
        address["socketAddress"]["portValue"] = value
        return config
    return bootstrap


BASE = snapshot_bootstrap()


def _accepts(validate: Callable[[Any], object]) -> Callable[[Any], bool]:
    def accepts(value: Any) -> bool:
        try:
            validate(value)
        except ValidationError:
            return False
        return True
    return accepts


def _slice(family: str, address: Any = "10.0.0.1", port: Any = 8080) -> dict:
    return {"addressType": family, "endpoints": [{"addresses": [address]}], "ports": [{"name": "http", "port": port}]}


# -- the cases ---------------------------------------------------------------------------------------

NEVER_MATCHES = "a request carrying it is refused by Envoy's codecs (400), so the route could never match"
NOT_A_TOKEN = "not an HTTP token: " + NEVER_MATCHES
KUBERNETES = "Kubernetes refuses it (CEL isIP() for our CRD; EndpointSlice validation)"
ZONE = "an IPv6 zone: whether Envoy takes it depends on the interfaces of each Envoy's host"
NUL = "Envoy reads the address up to the NUL and binds what precedes it, not what was written"
QUERY = "Envoy matches the path without its query string and fragment: the route could never match"


@dataclass(frozen=True)
class Case:
    name: str
    accepted: tuple  # near misses: we accept them, Envoy loads them
    refused: tuple  # we refuse them; Envoy refuses them, saying `envoy_says`, or they are in `stricter`
    we_accept: Callable[[Any], bool]
    bootstrap: Callable[[Any], dict]
    envoy_says: str  # a regular expression for Envoy's reason
    stricter: Mapping[Any, str] = field(default_factory=dict)  # refused by us, loaded by Envoy: why
    together: Callable[[tuple], dict] | None = None  # one bootstrap with all the accepted values


def _header_route(name: str, value: str) -> list:
    return [b.route(CLUSTER, prefix="/", headers=[(name, value)])]


CASES = [
    Case("listener address",
         accepted=("0.0.0.0", "::", "::1", "10.0.0.1", "127.0.0.1", "255.255.255.255", "2001:db8::1", "FE80::1",
                   "0:0:0:0:0:0:0:1", "::0001", "::1.2.3.4", "64:ff9b::1.2.3.4"),
         refused=("not-an-ip", "localhost", "", "::g", "１２７.0.0.1", "١٢٧.0.0.1", "01.2.3.4", "00.0.0.0", "1.2.3",
                  "127.1", "1.2.3.4.5", "256.1.1.1", "0x7f.0.0.1", " 1.2.3.4", "1.2.3.4 ", "::1\n", "[::1]",
                  "1::2::3", "::00001", "1.2.3.4/32", "2001:db8::1%", "::ffff:01.2.3.4", "fe80::1%lo",
                  "::ffff:1.2.3.4", "1.2.3.4\x00x"),
         we_accept=_accepts(lambda value: crds.Listener.model_validate({"name": "http", "port": 8080,
                                                                         "address": value})),
         bootstrap=lambda value: snapshot_bootstrap(listeners=[(value, 8080)]),
         together=lambda values: snapshot_bootstrap(listeners=[(v, 8000 + i) for i, v in enumerate(values)]),
         envoy_says=r"malformed IP address|SocketAddressValidationError.Address",
         stricter={"fe80::1%lo": ZONE, "::ffff:1.2.3.4": KUBERNETES + "; write 1.2.3.4", "1.2.3.4\x00x": NUL}),
    Case("listener port", accepted=(1, 65535), refused=(0, 65536, 70000, -1, 2**32, True, "80"),
         we_accept=_accepts(lambda value: crds.Listener.model_validate({"name": "http", "port": value})),
         bootstrap=_with_port("listener"), envoy_says=r"PortValue|Unable to parse JSON as proto",
         stricter={0: "Envoy binds a random port: no one could reach it",
                   "80": "a string: the API server's schema (type: integer) refuses it"}),
    Case("IPv4 EndpointSlice address",
         accepted=("10.0.0.1", "192.0.2.1", "0.0.0.0", "255.255.255.255"),
         refused=("999.1.2.3", "localhost", "", "10.0.0", "010.0.0.1", "１０.0.0.1", "api.shop.svc", "10.0.0.1 ",
                  "::1", "::ffff:10.0.0.1", "10.0.0.1\x00"),
         we_accept=_accepts(lambda value: kube.EndpointSlice.model_validate(_slice("IPv4", value))),
         bootstrap=lambda value: snapshot_bootstrap(endpoints=[(value, 8080)]),
         together=lambda values: snapshot_bootstrap(endpoints=[(v, 8080) for v in values]),
         envoy_says=r"malformed IP address|SocketAddressValidationError.Address",
         stricter={"::1": "an IPv6 address in an IPv4 EndpointSlice: " + KUBERNETES,
                   "::ffff:10.0.0.1": KUBERNETES, "10.0.0.1\x00": NUL}),
    Case("IPv6 EndpointSlice address",
         accepted=("2001:db8::1", "::1", "fd00::1", "2001:DB8:0:0:0:0:0:1"),
         refused=("2001:db8::g", "2001:db8:::1", "[2001:db8::1]", "10.0.0.1", "fe80::1%lo", "::ffff:10.0.0.1"),
         we_accept=_accepts(lambda value: kube.EndpointSlice.model_validate(_slice("IPv6", value))),
         bootstrap=lambda value: snapshot_bootstrap(endpoints=[(value, 8080)]),
         together=lambda values: snapshot_bootstrap(endpoints=[(v, 8080) for v in values]),
         envoy_says=r"malformed IP address",
         stricter={"10.0.0.1": "an IPv4 address in an IPv6 EndpointSlice: " + KUBERNETES, "fe80::1%lo": ZONE,
                   "::ffff:10.0.0.1": KUBERNETES}),
    Case("EndpointSlice port", accepted=(1, 65535), refused=(0, 65536, 70000, -1, 2**32),
         we_accept=_accepts(lambda value: kube.EndpointSlice.model_validate(_slice("IPv4", port=value))),
         bootstrap=_with_port("endpoint"), envoy_says=r"PortValue|Unable to parse JSON as proto",
         stricter={0: "Envoy would connect to port 0, where nothing listens (Kubernetes stores it)"}),
    Case("header name",
         accepted=("x-tenant", ":authority", "X-Upper", "x_y", "x.y~!#$%&'*+^`|"),
         refused=("", "x\x00y", "x\ny", "x\ry", "x\r\n", "x y", "x\ty", "x\x7fy", "x\x01y", "xé", "x:y", 'x"y',
                  "x/y", "x\ud800"),
         we_accept=_accepts(lambda value: crds.HeaderMatch.model_validate({"name": value, "value": "v"})),
         bootstrap=lambda value: snapshot_bootstrap(routes=_header_route(value, "v")),
         together=lambda values: snapshot_bootstrap(routes=[b.route(CLUSTER, prefix="/", headers=[(v, "v")])
                                                            for v in values]),
         envoy_says=r"HeaderMatcherValidationError.Name",
         stricter={value: NOT_A_TOKEN for value in ("x y", "x\ty", "x\x7fy", "x\x01y", "xé", "x:y", 'x"y', "x/y")}),
    Case("header value",
         accepted=("", "a", "a b", "a\tb", "é", "😀", "a\u0085b", "a,b;c=d"),
         refused=("a\x00b", "a\nb", "a\rb", "a\x01b", "a\x1fb", "a\x7fb", "a\ud800"),
         we_accept=_accepts(lambda value: crds.HeaderMatch.model_validate({"name": "x-v", "value": value})),
         bootstrap=lambda value: snapshot_bootstrap(routes=_header_route("x-v", value)),
         together=lambda values: snapshot_bootstrap(routes=[b.route(CLUSTER, prefix="/", headers=[("x-v", v)])
                                                            for v in values]),
         envoy_says=r"(?!)",  # Envoy's proto takes any value
         stricter={value: NEVER_MATCHES for value in ("a\x00b", "a\nb", "a\rb", "a\x01b", "a\x1fb", "a\x7fb")}),
    *[Case(f"route {key}",
           accepted=("/", "/a", "/a-b_c.d~e", "/%20", "/a%2Fb", "/ok!$&'()*+,;=:@", "//"),
           refused=("", "a", "/a b", "/a\tb", "/a\x00b", "/a\nb", "/a\x7f", "/é", "/a?b", "/a#b", "/\ud800"),
           we_accept=_accepts(lambda value, key=key: crds.Route.model_validate({key: value})),
           bootstrap=lambda value, kind=kind: snapshot_bootstrap(routes=[b.route(CLUSTER, **{kind: value})]),
           together=lambda values, kind=kind: snapshot_bootstrap(routes=[b.route(CLUSTER, **{kind: v})
                                                                         for v in values]),
           envoy_says=r"(?!)",  # Envoy's proto takes any path
           stricter={"": "a path starts with '/'", "a": "a path starts with '/': " + NEVER_MATCHES,
                     "/a?b": QUERY, "/a#b": QUERY, **{value: NEVER_MATCHES for value in
                                                       ("/a b", "/a\tb", "/a\x00b", "/a\nb", "/a\x7f", "/é")}})
      for kind, key in (("prefix", "pathPrefix"), ("path", "path"))],
]


def _built(case: Case, value: Any) -> dict | None:
    """The bootstrap with `value`, or None where it cannot even be built (a lone surrogate is not UTF-8)."""
    try:
        return case.bootstrap(value)
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        return None


@pytest.mark.envoy
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_we_refuse_exactly_what_envoy_refuses(case, tmp_path):
    for value in case.accepted:
        assert case.we_accept(value), f"{case.name}: we refuse the near miss {value!r}"
    for value in case.refused:
        assert not case.we_accept(value), f"{case.name}: we accept {value!r}"
    assert set(case.stricter) <= set(case.refused)

    envoy_refuses = [value for value in case.refused if value not in case.stricter]
    bootstraps = {repr(value): _built(case, value) for value in envoy_refuses}
    unbuildable = [key for key, bootstrap in bootstraps.items() if bootstrap is None]
    assert all("\\ud800" in key for key in unbuildable), f"{case.name}: cannot build {unbuildable}"
    bootstraps = {key: bootstrap for key, bootstrap in bootstraps.items() if bootstrap is not None}
    # What must load, loads together where it can: one run says it all, or names the culprit.
    loads = {"we accept": case.accepted, "we refuse, for a reason of ours,": tuple(case.stricter)}
    for what, values in loads.items():
        if case.together is not None and values:
            bootstraps[f"{what}: {values!r}"] = case.together(values)
        else:
            bootstraps.update({f"{what}: {value!r}": case.bootstrap(value) for value in values})
    verdicts = {key: refusal(process) for key, process in envoy_validates(bootstraps, tmp_path).items()}

    for what in loads:
        for key, reason in verdicts.items():
            assert not key.startswith(what) or reason == "", (
                f"{case.name}: Envoy refuses what {key} (if it is in `stricter`, move it out): {reason[:3000]}")
    for value in envoy_refuses:
        reason = verdicts.get(repr(value))
        if reason is None:
            continue  # could not be built (a lone surrogate is not UTF-8): it cannot reach Envoy at all
        assert reason, f"{case.name}: Envoy loads {value!r}, which we refuse (add it to `stricter`, saying why)"
        assert re.search(case.envoy_says, reason), f"{case.name}: Envoy refuses {value!r}, not for it: {reason[:3000]}"


def test_an_envoy_refusal_is_told_apart_from_a_broken_test_bootstrap(tmp_path):
    """The base configuration loads, so a refusal above is the value's, not the bootstrap's."""
    assert refusal(envoy_validates({"base": BASE}, tmp_path)["base"]) == ""


# -- the ranges: the extremes of every number we accept, translated by us, load in Envoy ------------

def _extreme(name: str, budget: int, retries: int, connect_ms: int, idle_s: int, *, percent: int, timeout_ms: int,
             attempts: int, outlier: dict, health: dict) -> dict:
    """Every number of a Backend at one end of its range."""
    thresholds = {"maxConnections": budget, "maxPendingRequests": budget, "maxRequests": budget,
                  "maxRetries": retries}
    limits = {"maxConnections": budget, "maxPendingRequests": budget, "maxRequests": budget}
    per_endpoint = {"retryBudget": {"percent": percent, "minConcurrency": budget},
                    "perEndpoint": {**limits, "min": limits, "max": limits}}
    retries_ = {"attempts": attempts, "retryOn": [on.value for on in crds.RetryOn], "perTryTimeoutMs": timeout_ms}
    return backend(name, routes=[{"pathPrefix": f"/{name}", "retries": retries_},
                                 {"path": f"/{name}/login", "priority": "High",
                                  "headers": [{"name": "x-tenant", "value": "a\tb"}]}],
                   circuitBreakers={"default": thresholds, "high": per_endpoint}, connectTimeoutMs=connect_ms,
                   websocket={"circuitBreakers": per_endpoint, "idleTimeoutSeconds": idle_s,
                              "maxConnectionDurationSeconds": idle_s},
                   outlierDetection=outlier, healthCheck={"path": f"/{name}/healthz", **health},
                   maxRequestsPerConnection=budget)


@pytest.mark.envoy
def test_the_extremes_of_every_range_load_in_envoy(tmp_path):
    """Budgets (UInt32Value), connection limits (UInt64Value, at least 1), timeouts (Duration > 0),
    ports 1 and 65535, IPv6 addresses: the bounds our models accept, translated, load in Envoy."""
    listeners = [{"name": "low", "port": 1, "address": "::"}, {"name": "high", "port": 65535, "address": "0.0.0.0"}]
    objects = [gateway(listeners=listeners, limits={"maxConnections": 10_000_000}),
               _extreme("most", 10_000_000, 10_000_000, 60_000, 86_400, percent=100, timeout_ms=3_600_000,
                        attempts=10, outlier={"consecutive5xx": 1000, "consecutiveGatewayFailures": 1000,
                                              "intervalSeconds": 300, "baseEjectionTimeSeconds": 3600,
                                              "maxEjectionPercent": 100},
                        health={"intervalSeconds": 3600, "timeoutSeconds": 60, "unhealthyThreshold": 100,
                                "healthyThreshold": 100}), service("most", port=65535),
               endpoint_slice("most", [ready("2001:db8::1")], port=65535),
               _extreme("least", 1, 0, 10, 1, percent=1, timeout_ms=1, attempts=1,
                        outlier={"consecutive5xx": 1, "consecutiveGatewayFailures": 1, "intervalSeconds": 1,
                                 "baseEjectionTimeSeconds": 1, "maxEjectionPercent": 0},
                        health={"intervalSeconds": 1, "timeoutSeconds": 1, "unhealthyThreshold": 1,
                                "healthyThreshold": 1}), service("least", port=1),
               endpoint_slice("least", [ready("10.0.0.1")], port=1)]
    objects[3]["addressType"] = "IPv6"
    translation = to_ir.translate(Store(objects).view(), now=time.time())
    refused = {str(key): [c.message for c in conditions if c.status == "False"]
               for key, conditions in translation.conditions.items()}
    assert not any(refused.values()), refused
    [group] = translation.groups.values()
    bootstrap = render.static_bootstrap(to_xds.snapshot(group), admin_port=9901)
    assert refusal(envoy_validates({"extremes": bootstrap}, tmp_path)["extremes"]) == ""
    with pytest.raises(ValidationError):
        crds.Thresholds.model_validate({"maxConnections": 10_000_001})
    with pytest.raises(ValidationError):
        crds.BackendSpec.model_validate({**objects[1]["spec"], "connectTimeoutMs": 9})


# -- what a user reads ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "message"), [
    (_slice("IPv4", "999.1.2.3"), "endpoints[0].addresses[0]: '999.1.2.3' is not an IPv4 address (the "
                                  "EndpointSlice's addressType is IPv4)"),
    (_slice("IPv4", "localhost"), "endpoints[0].addresses[0]: 'localhost' is not an IPv4 address"),
    (_slice("IPv6", "10.0.0.1"), "endpoints[0].addresses[0]: '10.0.0.1' is not an IPv6 address"),
    (_slice("IPv4", port=70000), "ports[0].port: must be at most 65535 (it is 70000)"),
    (_slice("IPv4", port=-1), "ports[0].port: must be at least 1 (it is -1)"),
    (_slice("IPv4", port=2**32), "ports[0].port: must be at most 65535 (it is 4294967296)"),
])
def test_a_bad_endpoint_slice_raises_a_validation_error_that_says_what_is_wrong(raw, message):
    with pytest.raises(ValidationError) as raised:
        kube.EndpointSlice.model_validate(raw)
    [sentence] = problems.explain(raised.value, "")
    assert sentence.startswith(message)
    assert kube.problems({"kind": "EndpointSlice", "metadata": {"name": "api-1"}, **raw}) == [sentence]


def test_fqdn_endpoint_slices_and_absent_ports_are_not_refused():
    kube.EndpointSlice.model_validate({**_slice("FQDN", "api.example.com"), "ports": [{"name": "http"}]})


@pytest.mark.parametrize(("ports", "message"), [
    ([{"port": 70000}], "spec.ports[0].port: must be at most 65535 (it is 70000)"),
    ([{"port": 80, "targetPort": "HTTP_x"}], "spec.ports[0].targetPort: 'HTTP_x' is neither a port number "
                                             "(1-65535) nor a port name"),
    ([{"port": 80, "targetPort": 70000}], "spec.ports[0].targetPort: 70000 is not a port number (1-65535)"),
])
def test_a_bad_service_port_raises_a_validation_error_that_says_what_is_wrong(ports, message):
    with pytest.raises(ValidationError) as raised:
        kube.ServiceSpec.model_validate({"ports": ports})
    [sentence] = problems.explain(raised.value, "spec")
    assert sentence.startswith(message)


@pytest.mark.envoy
def test_an_endpoint_slice_envoy_would_refuse_never_reaches_it(tmp_path):
    """A slice with an address or port Envoy refuses (one froze publishing: -1 raised in the builder)
    is left out by translation; the Backend keeps its good endpoints, and what we send loads."""
    bad_address = endpoint_slice("api", [ready("999.1.2.3")], name="api-2")
    bad_port = endpoint_slice("api", [ready("10.0.0.3")], name="api-3", port=-1)
    objects = [gateway(), backend("api"), service("api"), endpoint_slice("api", [ready("10.0.0.1")]),
               bad_address, bad_port]
    translation = to_ir.translate(Store(objects).view(), now=time.time())
    [group] = translation.groups.values()
    [api] = group.backends
    assert [(e.address, e.port) for e in api.endpoints] == [("10.0.0.1", 8080)]
    bootstrap = render.static_bootstrap(to_xds.snapshot(group), admin_port=9901)
    assert refusal(envoy_validates({"translated": bootstrap}, tmp_path)["translated"]) == ""
