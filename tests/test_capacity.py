"""Budgets that follow the ready endpoints, and the settings that keep a surge from growing:
computed values, what the models refuse (and say), and a real Envoy taking a recomputed budget."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from pydantic import ValidationError

from controlplane.model import crds, problems
from controlplane.runtime.envoy_count import SettledCounts, fleet_counts
from controlplane.runtime.fleet import GroupEnvoys
from controlplane.runtime.pipeline import Pipeline
from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import to_ir, to_xds
from controlplane.xds import CLUSTER, RUNTIME, SnapshotCache
from controlplane.xds.resources import parse
from tests.harness import eventually, free_port, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

PER_ENDPOINT = {"perEndpoint": {"maxConnections": 10, "maxRequests": 20, "maxPendingRequests": 5,
                                "min": {"maxConnections": 15}, "max": {"maxRequests": 50}}}


def _terminating(address: str) -> tuple[str, dict]:
    return (address, {"ready": False, "serving": True, "terminating": True})


def _api(*endpoints: tuple[str, dict], **spec) -> Store:
    return Store([gateway(), backend("api", **spec), service("api"), endpoint_slice("api", list(endpoints))])


def _backend(store: Store, translator: to_ir.Translator | None = None):
    translation = (translator or to_ir.Translator()).translate(store.view())
    [api] = translation.groups["edge"].backends
    return api


@pytest.mark.parametrize(("endpoints", "connections", "requests", "pending"), [
    ([ready("10.0.0.1"), ready("10.0.0.2"), ready("10.0.0.3")], 30, 50, 15),  # requests: 60, capped by max
    ([ready("10.0.0.1"), ready("10.0.0.2")], 20, 40, 10),
    ([ready("10.0.0.1")], 15, 20, 5),  # connections: 10, raised to min
    ([ready("10.0.0.1"), _terminating("10.0.0.2")], 15, 20, 5),  # a terminating pod is not counted
    ([_terminating("10.0.0.2")], 15, 20, 5),  # none ready: one endpoint's worth, never 0
    ([], 15, 20, 5),
])
def test_a_per_endpoint_budget_is_per_endpoint_capacity_times_ready_endpoints(endpoints, connections, requests,
                                                                               pending):
    api = _backend(_api(*endpoints, circuitBreakers={"default": PER_ENDPOINT}))
    budget = api.default_budget
    assert (budget.max_connections, budget.max_requests, budget.max_pending_requests) == (connections, requests,
                                                                                           pending)
    assert budget.per_host_max_connections == 10  # what any one pod may hold, however many there are
    [thresholds] = to_xds.cluster(api).circuit_breakers.per_host_thresholds
    assert thresholds.max_connections.value == 10


def test_the_websocket_budget_follows_the_endpoints_and_fixed_limits_stay_fixed():
    spec = {"circuitBreakers": {"default": {"maxConnections": 100}},
            "websocket": {"circuitBreakers": {"maxPendingRequests": 7, "perEndpoint": {"maxConnections": 3}}}}
    store = _api(ready("10.0.0.1"), ready("10.0.0.2"), **spec)
    translator = to_ir.Translator()
    two = _backend(store, translator)
    assert (two.websocket.budget.max_connections, two.websocket.budget.max_pending_requests) == (6, 7)
    store.put(endpoint_slice("api", [ready("10.0.0.1")]))  # one pod restarts
    one = _backend(store, translator)  # the EndpointSlice fast path
    assert (one.websocket.budget.max_connections, one.websocket.budget.max_pending_requests) == (3, 7)
    assert one.default_budget.max_connections == two.default_budget.max_connections == 100
    assert one.default_budget.per_host_max_connections is None


def test_a_computed_limit_stays_within_what_envoy_and_the_model_accept():
    endpoints = [ready(f"10.0.{i // 250}.{i % 250 + 1}") for i in range(3)]
    api = _backend(_api(*endpoints, circuitBreakers={"default": {"perEndpoint": {"maxConnections": 10_000_000}}}))
    assert api.default_budget.max_connections == 10_000_000


def test_the_last_resolved_endpoints_keep_their_budget():
    """A Service renamed its port: the Backend keeps its last endpoints, and the budget computed for them."""
    spec = {"circuitBreakers": {"default": {"perEndpoint": {"maxConnections": 4}}}}
    store = _api(ready("10.0.0.1"), ready("10.0.0.2"), **spec)
    translator = to_ir.Translator()
    assert _backend(store, translator).default_budget.max_connections == 8
    renamed = service("api", port_name="web")
    store.put(renamed)
    store.put(endpoint_slice("api", [ready("10.0.0.1"), ready("10.0.0.2")], port_name="web"))
    translation = translator.translate(store.view())
    [api] = translation.groups["edge"].backends
    assert len(api.endpoints) == 2 and api.default_budget.max_connections == 8
    assert translation.conditions[ObjectKey("Backend", NS, "api")][0].status == "False"


def _refusal(spec: dict) -> str:
    with pytest.raises(ValidationError) as raised:
        crds.BackendSpec.model_validate({"gateway": "edge", "service": {"name": "api", "port": 80},
                                         "routes": [{"pathPrefix": "/"}], **spec})
    return "; ".join(problems.explain(raised.value, "spec"))


@pytest.mark.parametrize(("spec", "message"), [
    ({"circuitBreakers": {"default": {"maxConnections": 5, "perEndpoint": {"maxConnections": 5}}}},
     "spec.circuitBreakers.default.maxConnections: set maxConnections or perEndpoint.maxConnections, not both"),
    ({"circuitBreakers": {"default": {"perEndpoint": {"maxRequests": 5, "min": {"maxConnections": 5}}}}},
     "spec.circuitBreakers.default.perEndpoint.min.maxConnections: min.maxConnections needs "
     "perEndpoint.maxConnections"),
    ({"websocket": {"circuitBreakers": {"perEndpoint": {"maxConnections": 5, "min": {"maxConnections": 9},
                                                        "max": {"maxConnections": 8}}}}},
     "spec.websocket.circuitBreakers.perEndpoint.min.maxConnections: min.maxConnections (9) exceeds "
     "max.maxConnections (8)"),
    ({"circuitBreakers": {"high": {"perEndpoint": {"maxConnections": 0}}}},
     "spec.circuitBreakers.high.perEndpoint.maxConnections: must be at least 1"),
    ({"circuitBreakers": {"default": {"maxRetries": 3, "retryBudget": {}}}},
     "spec.circuitBreakers.default.maxRetries: set maxRetries or retryBudget, not both"),
    ({"circuitBreakers": {"default": {"retryBudget": {"percent": 101}}}},
     "spec.circuitBreakers.default.retryBudget.percent: must be at most 100"),
    ({"routes": [{"pathPrefix": "/", "retries": {"retryOn": ["5xx", "5xx"]}}]},
     "spec.routes[0].retries.retryOn: retryOn lists a condition twice"),
    ({"routes": [{"pathPrefix": "/", "retries": {"retryOn": ["always"]}}]}, "spec.routes[0].retries.retryOn[0]"),
    ({"routes": [{"pathPrefix": "/", "retries": {"attempts": 11}}]},
     "spec.routes[0].retries.attempts: must be at most 10"),
    ({"outlierDetection": {"maxEjectionPercent": 101}}, "spec.outlierDetection.maxEjectionPercent: must be at most"),
    ({"outlierDetection": {"consecutive5Xx": 3}}, "spec.outlierDetection.consecutive5Xx: unknown field"),
    ({"healthCheck": {"path": "healthz"}}, "spec.healthCheck.path"),
    ({"websocket": {"maxConnectionDurationSeconds": 0}}, "spec.websocket.maxConnectionDurationSeconds: must be at "
                                                         "least 1"),
])
def test_a_capacity_setting_that_cannot_work_is_refused_saying_what_to_change(spec, message):
    assert message in _refusal(spec)


def test_outlier_detection_is_on_by_default_and_retries_only_where_asked():
    store = Store([gateway(), backend("api", routes=[{"path": "/login", "retries": {}}, {"pathPrefix": "/"}]),
                   service("api"), endpoint_slice("api", [ready("10.0.0.1")])])
    [group] = to_ir.translate(store.view()).groups.values()
    cluster = to_xds.cluster(group.backends[0])
    assert cluster.outlier_detection.consecutive_gateway_failure.value == 5
    assert cluster.outlier_detection.enforcing_consecutive_gateway_failure.value == 100  # Envoy's default: 0
    assert cluster.outlier_detection.max_ejection_percent.value == 50
    assert all(t.retry_budget.budget_percent.value == 20 for t in cluster.circuit_breakers.thresholds)
    login, rest = to_xds.route_configuration(group.listeners[0]).virtual_hosts[0].routes
    assert login.route.retry_policy.retry_on == "connect-failure,refused-stream,gateway-error"
    assert login.route.retry_policy.num_retries.value == 1
    assert not rest.route.HasField("retry_policy")


# -- a real Envoy -------------------------------------------------------------------------------------

async def _active_thresholds(envoy, cluster: str) -> dict | None:
    dump = await envoy.config_dump()
    section = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
    if section.get("dynamic_warming_clusters"):
        return None
    active = {c["cluster"]["name"]: c["cluster"] for c in section.get("dynamic_active_clusters", [])}
    return active.get(cluster, {}).get("circuit_breakers")


@pytest.mark.envoy
async def test_a_budget_recomputed_after_a_pod_left_is_active_in_envoy_at_once(served, envoys, backends):
    source, _pipeline, server = served
    first, second = backends("api-1"), backends("api-2")
    port = free_port()
    api = backend("api", routes=[{"pathPrefix": "/"}],
                  websocket={"circuitBreakers": {"perEndpoint": {"maxConnections": 3, "maxRequests": 3}}})
    slices = [endpoint_slice("api", [ready("127.0.0.1")], port=first.port, name="api-1"),
              endpoint_slice("api", [ready("127.0.0.1")], port=second.port, name="api-2")]
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", api, service("api"), *slices)
    envoy = envoys(server.port, node_cluster="edge")
    assert await eventually(lambda: body_of(port), what="traffic through Envoy") in ("api-1", "api-2")
    websocket = f"{NS}/api/websocket"

    async def limits() -> tuple | None:
        """The WebSocket cluster's limits as Envoy applies them: runtime overrides over its own."""
        entries = (await envoy.admin.get("/runtime")).json()["entries"]
        computed = [entries.get(f"circuit_breakers.{websocket}.default.{limit}", {}).get("final_value")
                    for limit in ("max_connections", "max_requests")]
        breakers = await _active_thresholds(envoy, websocket)
        if None in computed or not breakers:
            return None
        [per_host] = breakers["per_host_thresholds"]
        return int(computed[0]), int(computed[1]), per_host["max_connections"]

    assert await eventually(limits, what="the WebSocket budget for two pods") == (6, 6, 3)
    rejected = await envoy.stat("cluster_manager.cds.update_rejected")
    modified = await envoy.stat("cluster_manager.cluster_modified")
    loop = asyncio.get_running_loop()
    started = loop.time()
    write(source.directory / "api.yaml", api, service("api"), slices[0])  # one pod of two restarts
    assert await eventually(lambda: _is(limits(), (3, 3, 3)), timeout=5, interval=0.02,
                            what="the halved budget active in Envoy")
    print(f"budget recomputed for one pod, active in Envoy after {loop.time() - started:.3f} s")
    assert await envoy.stat("cluster_manager.cds.update_rejected") == rejected
    # The cluster itself never changed (Envoy would rebuild it and count its connections from zero).
    assert await envoy.stat("cluster_manager.cluster_modified") == modified
    assert await body_of(port) == "api-1"


async def _is(awaitable, expected) -> bool:
    return await awaitable == expected


@pytest.mark.envoy
def test_the_envoy_wide_connection_cap_is_a_bootstrap_flag_envoy_loads(tmp_path, capsys):
    from controlplane import cli
    from tests.harness import assert_envoy_accepts

    assert cli.main(["bootstrap", "--node-cluster", "edge", "--stats-port", "9902",
                     "--max-downstream-connections", "10000"]) == 0
    printed = capsys.readouterr().out
    [monitor] = yaml.safe_load(printed)["overload_manager"]["resource_monitors"]
    assert monitor["typed_config"]["max_active_downstream_connections"] == 10000
    assert_envoy_accepts(printed, tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["bootstrap", "--node-cluster", "edge", "--max-downstream-connections", "0"])
    assert "'0' is not a number of connections" in capsys.readouterr().err


@pytest.mark.envoy
async def test_retries_move_a_failed_request_to_another_pod_and_websockets_end_at_their_maximum_duration(
        served, envoys, backends):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    source, _pipeline, server = served
    healthy, broken = backends("api-1"), backends("api-2")
    broken.failing = True  # 503s: each one retried on the other pod
    port = free_port()
    api = backend("api", routes=[{"pathPrefix": "/", "retries": {"attempts": 1, "retryOn": ["gateway-error"]}}],
                  outlierDetection={"maxEjectionPercent": 0},  # never ejected: every retry is the route's doing
                  websocket={"maxConnectionDurationSeconds": 1})
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", api, service("api"),
          *[endpoint_slice("api", [ready("127.0.0.1")], port=pod.port, name=pod.name) for pod in (healthy, broken)])
    envoy = envoys(server.port, node_cluster="edge")
    cluster = f"cluster.{NS}/api"
    await eventually(lambda: _is(envoy.stat(f"{cluster}.membership_healthy"), 2), what="both pods in Envoy")
    assert [await body_of(port, "/orders") for _ in range(10)] == ["api-1"] * 10
    assert await envoy.stat(f"{cluster}.upstream_rq_retry") >= 4

    websocket = await connect(f"ws://127.0.0.1:{port}/agents", open_timeout=5, ping_interval=None)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ConnectionClosed):
        for _ in range(100):  # bounded: 100 round trips, 0.1 s apart
            await websocket.send("still here")
            await asyncio.wait_for(websocket.recv(), timeout=5)
            await asyncio.sleep(0.1)
    print(f"a busy WebSocket closed after {asyncio.get_running_loop().time() - started:.2f} s (maximum 1 s)")
    assert await envoy.stat(f"http.{NS}/edge/http.downstream_rq_max_duration_reached") == 1  # closed for its age


@pytest.mark.envoy
async def test_an_endpoint_failing_its_health_check_gets_no_traffic(served, envoys, backends):
    source, _pipeline, server = served
    healthy, sick = backends("api-1"), backends("api-2")
    port = free_port()
    api = backend("api", routes=[{"pathPrefix": "/"}], outlierDetection={"maxEjectionPercent": 0},
                  healthCheck={"path": "/healthz", "intervalSeconds": 1, "unhealthyThreshold": 1})
    write(source.directory / "gateway.yaml", gateway(port=port))
    write(source.directory / "api.yaml", api, service("api"),
          *[endpoint_slice("api", [ready("127.0.0.1")], port=pod.port, name=pod.name) for pod in (healthy, sick)])
    envoy = envoys(server.port, node_cluster="edge")
    cluster = f"cluster.{NS}/api"
    await eventually(lambda: _is(envoy.stat(f"{cluster}.membership_healthy"), 2), what="both pods checked healthy")
    sick.failing = True  # its /healthz answers 503 now
    await eventually(lambda: _is(envoy.stat(f"{cluster}.membership_healthy"), 1), what="the sick pod unhealthy")
    assert [await body_of(port, "/orders") for _ in range(10)] == ["api-1"] * 10
    assert await envoy.stat(f"{cluster}.health_check.failure") >= 1


# -- scope: Gateway -----------------------------------------------------------------------------------

def test_a_gateway_wide_budget_reaches_each_envoy_as_its_share_and_the_cluster_keeps_the_total():
    spec = {"circuitBreakers": {"default": {"scope": "Gateway", "maxConnections": 100, "maxPendingRequests": 7},
                                "high": {"maxConnections": 100}},
            "websocket": {"circuitBreakers": {"scope": "Gateway", "perEndpoint": {"maxConnections": 30}}}}
    group = to_ir.translate(_api(ready("10.0.0.1"), ready("10.0.0.2"), **spec).view()).groups["edge"]
    builder = to_xds.SnapshotBuilder()

    def layer(envoys: int) -> dict:
        snapshot = builder.snapshot(group, envoys=envoys)
        [runtime] = snapshot.resources(RUNTIME).resources.values()
        return _layer(runtime)

    def key(cluster: str, limit: str, priority: str = "default") -> str:
        return f"circuit_breakers.{NS}/{cluster}.{priority}.{limit}"

    assert layer(1) == {key("api", "max_connections"): 100, key("api", "max_pending_requests"): 7,
                        key("api/websocket", "max_connections"): 60}  # the high budget is each Envoy's
    clusters = builder.snapshot(group, envoys=1).resources(CLUSTER)
    assert layer(4) == {key("api", "max_connections"): 25, key("api", "max_pending_requests"): 1,
                        key("api/websocket", "max_connections"): 15}
    assert layer(3)[key("api", "max_connections")] == 33  # rounded down: the fleet never offers more
    assert layer(500)[key("api", "max_connections")] == 1  # never 0: that would shut the cluster
    # The Envoys coming and going changed the runtime layer only: Envoy never rebuilds the clusters.
    assert builder.snapshot(group, envoys=2).resources(CLUSTER) is clusters
    [default, _high] = to_xds.cluster(group.backends[0]).circuit_breakers.thresholds
    assert default.max_connections.value == 100  # what an Envoy without our runtime layer falls back to


def test_envoys_counted_rise_at_once_and_fall_once_settled():
    counts = SettledCounts(settle=5)
    assert counts.update({"edge": 2}, now=0) == {"edge": 2}
    assert counts.update({"edge": 4}, now=1) == {"edge": 4}  # scaled out: smaller shares at once
    assert counts.update({"edge": 3}, now=2) == {"edge": 4}  # one stream dropped: maybe a reconnect
    assert counts.update({"edge": 4}, now=3) == {"edge": 4}  # it was
    assert counts.update({"edge": 3}, now=4) == {"edge": 4}
    assert counts.update({"edge": 3}, now=8.9) == {"edge": 4}
    assert counts.update({"edge": 3}, now=9) == {"edge": 3}  # gone for 5 s: its share goes to the others
    assert counts.update({}, now=10) == {"edge": 3}
    assert counts.update({}, now=15) == {}


def test_the_fleet_count_is_this_replicas_envoys_and_its_live_peers():
    peers = [("replica-b", {"edge": GroupEnvoys(envoys=2)}), ("replica-c", {"edge": GroupEnvoys(envoys=1),
                                                                            "other": GroupEnvoys(envoys=3)})]
    assert fleet_counts({"edge": 1}, peers) == {"edge": 4, "other": 3}


def test_a_new_envoy_count_republishes_only_the_runtime_layer_of_its_group():
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    spec = {"circuitBreakers": {"default": {"scope": "Gateway", "maxConnections": 100}}}
    pipeline.publish(_api(ready("10.0.0.1"), **spec).view())
    before = cache.snapshot("edge")
    pipeline.share_among({"edge": 4})
    after = cache.snapshot("edge")
    assert after.resources(CLUSTER) is before.resources(CLUSTER)
    assert after.resources(RUNTIME) is not before.resources(RUNTIME)
    pipeline.publish(_api(ready("10.0.0.1"), ready("10.0.0.2"), **spec).view())  # a later translation keeps it
    [runtime] = cache.snapshot("edge").resources(RUNTIME).resources.values()
    assert _layer(runtime) == {f"circuit_breakers.{NS}/api.default.max_connections": 25}


def _layer(runtime) -> dict[str, float]:
    return {key: value.number_value for key, value in parse(RUNTIME, runtime.body).layer.fields.items()}
