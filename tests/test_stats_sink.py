"""Envoy's stats in the control plane: a real Envoy, bootstrapped by `ads_bootstrap` with its
metrics-service sink, pushes them to the xDS port; what the control plane shows matches Envoy's
own /stats. Then the bounds: hostile or excessive pushers cannot grow the store.
"""

from __future__ import annotations

import asyncio
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane import cli
from controlplane.runtime.debug_views import DebugViews
from controlplane.runtime.envoy_stats import EnvoyStatsCollector, budget_use
from controlplane.runtime.pipeline import Pipeline, cancel, feed
from controlplane.sources.files import DirectorySource
from controlplane.xds import SnapshotCache, XdsServer
from controlplane.xds.metrics_service import (METHOD, SERVICE, MetricFamily, MetricsService, StatsStore,
                                              StreamMetricsMessage, StreamMetricsResponse)
from tests.harness import eventually, free_port, write
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_websocket import open_websocket, refused_with
from tests.test_envoy_xds import body_of

class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


BUDGET = {"maxConnections": 2, "maxPendingRequests": 1, "maxRequests": 2}


@pytest.fixture
async def sinked(tmp_path):
    """`serve`'s wiring: the file source and pipeline, and the xDS server with the metrics service."""
    cache, store = SnapshotCache(), StatsStore()
    server = XdsServer(cache, address="127.0.0.1:0", services=(MetricsService(store).handler(),),
                       insecure_private_keys_over_plaintext=True)  # a lab: its TLS listeners get their keys
    await server.start()
    (tmp_path / "manifests").mkdir()
    source = DirectorySource(tmp_path / "manifests", interval=0.05)
    pipeline = Pipeline(cache)
    _coalescer, tasks = feed(source, pipeline)
    yield source, pipeline, server, store
    await cancel(tasks)
    await server.stop(0)


@pytest.mark.envoy
async def test_budget_use_from_pushed_stats_matches_envoys_own_stats(sinked, envoys, backends, capsys):
    source, pipeline, server, store = sinked
    api = backends("api")
    port = free_port()
    write(source.directory / "all.yaml", gateway(port=port),
          backend("api", routes=[{"path": "/login"}, {"pathPrefix": "/"}],
                  circuitBreakers={"default": BUDGET}, websocket={"circuitBreakers": BUDGET}),
          service("api"), endpoint_slice("api", [ready("127.0.0.1")], port=api.port))
    envoy = envoys(server.port, node_cluster="edge", node_id="edge-1")
    assert await eventually(lambda: body_of(port, "/login"), what="logins through Envoy") == "api"
    agents = [await open_websocket(port, "/agents") for _ in range(2)]  # the WebSocket budget is spent...
    api_cluster, websocket_cluster = f"{NS}/api", f"{NS}/api/websocket"
    waiting = asyncio.create_task(open_websocket(port, "/agents"))  # the next one waits in the queue...
    await eventually(lambda: envoy.stat(f"cluster.{websocket_cluster}.upstream_rq_pending_active"),
                     what="the third WebSocket to wait for the budget")
    assert await refused_with(port, "/agents") == 503  # ...and the one after overflows

    async def pushed_equals_envoys_own():
        """The last flush pushed to us equals what Envoy's admin says now (two flushes at most: 10 s)."""
        held = store.envoys()
        if not held:
            return None
        (stats,) = held
        own = await envoy.stats()
        pushed = {f"cluster.{labels['envoy_cluster_name']}.{name.removeprefix('cluster.')}": value
                  for name in ("cluster.circuit_breakers.default.remaining_cx", "cluster.upstream_cx_active",
                               "cluster.upstream_rq_pending_overflow", "cluster.upstream_cx_overflow")
                  for labels, value in stats.series(name)
                  if labels.get("envoy_cluster_name") in (api_cluster, websocket_cluster)}
        # Envoy's sink sends only the stats that were ever used: a counter never incremented is 0.
        wanted = [f"cluster.{cluster}.{stat}" for cluster in (api_cluster, websocket_cluster)
                  for stat in ("circuit_breakers.default.remaining_cx", "upstream_cx_active",
                               "upstream_rq_pending_overflow", "upstream_cx_overflow")]
        pushed = {name: pushed.get(name, 0) for name in wanted} if len(pushed) >= 4 else {}
        same = bool(pushed) and all(own[name] == value for name, value in pushed.items())
        return pushed if same and pushed[f"cluster.{websocket_cluster}.upstream_rq_pending_overflow"] == 1 else None

    pushed = await eventually(pushed_equals_envoys_own, timeout=20, interval=0.5, what="Envoy's stats pushed")
    assert pushed[f"cluster.{websocket_cluster}.circuit_breakers.default.remaining_cx"] == 0
    assert pushed[f"cluster.{websocket_cluster}.upstream_cx_active"] == 2
    assert pushed[f"cluster.{api_cluster}.upstream_rq_pending_overflow"] == 0

    uses = {(u.cluster, u.priority, u.resource): u for u in budget_use(pipeline.last, store.envoys())}
    websocket_cx, api_cx = uses[websocket_cluster, "default", "cx"], uses[api_cluster, "default", "cx"]
    assert (websocket_cx.traffic, websocket_cx.backend, websocket_cx.limit, websocket_cx.in_use) == (
        "websocket", api_cluster, 2, 2)  # spent: that is what refused the upgrade
    assert (api_cx.traffic, api_cx.limit, api_cx.envoys) == ("api", 2, 1)
    assert api_cx.in_use == 2 - pushed[f"cluster.{api_cluster}.circuit_breakers.default.remaining_cx"] < 2
    assert await body_of(port, "/login") == "api"  # logins still have theirs

    registry = CollectorRegistry()
    registry.register(EnvoyStatsCollector(store, lambda: pipeline.last))
    exposed = generate_latest(registry).decode()
    assert ('controlplane_budget_in_use{backend="shop/api",envoy_cluster_name="shop/api/websocket",'
            'node_group="edge",priority="default",resource="cx",traffic="websocket"} 2.0') in exposed
    assert ('controlplane_envoy_cluster_overflows_total{envoy_cluster_name="shop/api/websocket",node_group="edge",'
            'overflow="pending"} 1.0') in exposed
    assert 'controlplane_envoy_stats_envoys{node_group="edge"} 1.0' in exposed

    # `controlplane status` shows the same, API and WebSocket side by side.
    views = DebugViews(server._cache, "cp-test", lambda: budget_use(pipeline.last, store.envoys()))
    web = make_server("127.0.0.1", 0, views, handler_class=_Quiet)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        code = await asyncio.to_thread(cli.main, ["status", "--server", f"http://127.0.0.1:{web.server_port}"])
    finally:
        web.shutdown()
        web.server_close()
    out = capsys.readouterr().out
    assert code == 0
    rows = {tuple(line.split()[:5]): line.split()[5:] for line in out.splitlines() if line.startswith("edge ")}
    assert rows["edge", "shop/api", "shop/api/websocket", "websocket", "default"][0] == "2/2"  # spent
    assert rows["edge", "shop/api", "shop/api", "api", "default"][0] == f"{api_cx.in_use}/2"
    for agent in agents:
        await agent.close()
    waiting.cancel()


def test_an_envoy_that_left_is_forgotten_and_the_store_is_bounded():
    now = [0.0]
    store = StatsStore(max_envoys=2, max_series=3, forget_after=60, clock=lambda: now[0])
    flush = StreamMetricsMessage()
    for number in range(5):
        family = MetricFamily(name="cluster.upstream_cx_active", type=1)
        metric = family.metric.add()
        metric.label.add(name="envoy.cluster_name", value=f"c{number}")
        metric.gauge.value = number
        flush.envoy_metrics.append(family.SerializeToString())
    uptime = MetricFamily(name="server.uptime", type=1)
    uptime.metric.add().gauge.value = 7
    flush.envoy_metrics.append(uptime.SerializeToString())  # not kept
    first = store.opened("envoy-1", "edge")
    store.received(first, flush, 100)
    assert len(store.envoys()[0].values) == 3  # max_series
    second = store.opened("envoy-2", "edge")
    store.received(second, flush, 100)
    assert store.opened("envoy-3", "edge") is None  # max_envoys
    store.closed(first)
    now[0] = 59
    assert [s.node_id for s in store.envoys()] == ["envoy-1", "envoy-2"]  # kept a while: it may reconnect
    now[0] = 61
    assert [s.node_id for s in store.envoys()] == ["envoy-2"]
    assert store.opened("envoy-3", "edge") is not None  # room again


async def test_a_stream_that_does_not_say_which_envoy_it_is_is_refused():
    store = StatsStore()
    server = XdsServer(SnapshotCache(), address="127.0.0.1:0", services=(MetricsService(store).handler(),))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            push = channel.stream_unary(f"/{SERVICE}/{METHOD}", request_serializer=lambda data: data,
                                        response_deserializer=StreamMetricsResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await push(iter([StreamMetricsMessage().SerializeToString()]))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as garbage:
                await push(iter([b"\xff\xff\xff"]))
            assert garbage.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    finally:
        await server.stop(0)
    assert store.envoys() == []
