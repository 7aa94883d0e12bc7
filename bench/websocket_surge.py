"""The WebSocket surge of the postmortem, replayed through a real Envoy: do logins survive it?

Two configurations of the same Backend, with the same budget (100 connections, 10 pending,
100 requests) on a real Envoy, a sample backend and this control plane on 127.0.0.1:

- "shared": the classic gateway setup, written with the builders: WebSocket upgrades are
  allowed on the API route, so WebSockets and logins draw on one circuit-breaker budget;
- "split": the Backend with a `websocket` block, translated from manifests as `serve` does:
  WebSockets get their own cluster and a budget of the same size.

Each run measures logins (GET /login, 5 at a time) before the surge, then opens a surge of
WebSockets (`--websockets`, 10 at a time, each given 2 s to open), and measures logins again
while the WebSockets are held open. Every loop is bounded in count and time.

    python bench/websocket_surge.py                  # 150 WebSockets, 100 logins per measurement
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from controlplane.runtime.envoy_process import EnvoyProcess  # noqa: E402
from controlplane.runtime.pipeline import Pipeline  # noqa: E402
from controlplane.runtime.sample_backend import SampleBackend  # noqa: E402
from controlplane.sources.store import Store  # noqa: E402
from controlplane.translate import builders as b  # noqa: E402
from controlplane.xds import Snapshot, SnapshotCache, XdsServer  # noqa: E402

GROUP = "edge"
BUDGET = {"maxConnections": 100, "maxPendingRequests": 10, "maxRequests": 100}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def split_objects(port: int, backend_port: int) -> list[dict]:
    """The manifests of the split configuration, as a user writes them."""
    meta = {"namespace": "shop"}
    return [
        {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Gateway", "metadata": {"name": "edge", **meta},
         "spec": {"nodeCluster": GROUP, "listeners": [{"name": "http", "port": port, "address": "127.0.0.1"}]}},
        {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Backend", "metadata": {"name": "api", **meta},
         "spec": {"gateway": "edge", "service": {"name": "api", "port": 80}, "routes": [{"pathPrefix": "/"}],
                  "circuitBreakers": {"default": BUDGET}, "websocket": {"circuitBreakers": BUDGET}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", **meta},
         "spec": {"ports": [{"name": "http", "port": 80}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "api-1", "labels": {"kubernetes.io/service-name": "api"}, **meta},
         "addressType": "IPv4", "ports": [{"name": "http", "port": backend_port}],
         "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]},
    ]


def shared_snapshot(port: int, backend_port: int) -> Snapshot:
    """The classic setup: upgrades allowed on the API route, one cluster, one budget."""
    budget = b.thresholds(base_pb2.DEFAULT, max_connections=BUDGET["maxConnections"],
                          max_pending_requests=BUDGET["maxPendingRequests"], max_requests=BUDGET["maxRequests"])
    return Snapshot(
        clusters=[b.eds_cluster("shop/api", budgets=[budget])],
        endpoints=[b.load_assignment("shop/api", [("127.0.0.1", backend_port)])],
        listeners=[b.http_listener("http", address="127.0.0.1", port=port, route_config_name="http")],
        routes=[b.route_configuration("http", [b.virtual_host("all", [
            b.websocket_route("shop/api", prefix="/"), b.route("shop/api", prefix="/")])])])


async def logins(port: int, count: int) -> tuple[int, list[float]]:
    """`count` logins, 5 at a time, 1 s each at most: how many succeeded, and their latencies (ms)."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=5, max_keepalive_connections=5)
    async with httpx.AsyncClient(timeout=1, limits=limits) as http:
        async def login() -> None:
            started = time.perf_counter()
            try:
                response = await http.get(f"http://127.0.0.1:{port}/login")
            except httpx.HTTPError:
                return
            if response.status_code == 200:
                latencies.append((time.perf_counter() - started) * 1000)
        for start in range(0, count, 5):
            await asyncio.gather(*(login() for _ in range(min(5, count - start))))
    return len(latencies), latencies


async def surge(port: int, count: int):
    """Open `count` WebSockets, 10 at a time (agents reconnecting after a migration, not one
    instant burst); returns those that opened and the refusals by status."""
    opening = asyncio.Semaphore(10)

    async def open_one():
        try:
            async with opening:
                return await connect(f"ws://127.0.0.1:{port}/agents", open_timeout=2, ping_interval=None,
                                     close_timeout=1)
        except InvalidStatus as refused:
            return refused.response.status_code
        except (OSError, TimeoutError):
            return "timeout"
    results = await asyncio.gather(*(open_one() for _ in range(count)))
    opened = [r for r in results if not isinstance(r, (int, str))]
    refused: dict = {}
    for result in results:
        if isinstance(result, (int, str)):
            refused[result] = refused.get(result, 0) + 1
    return opened, refused


async def wait_for_logins(port: int, envoy: EnvoyProcess) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=1) as http:
        while time.monotonic() < deadline:
            if envoy.process.poll() is not None:
                raise SystemExit(f"Envoy exited:\n{envoy.log_tail()}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/login")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"no answer through Envoy after 30 s:\n{envoy.log_tail()}")


def describe(ok: int, latencies: list[float], count: int) -> str:
    if not latencies:
        return f"{ok}/{count} ok"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{ok}/{count} ok, p50 {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms"


async def run(configuration: str, websockets: int, count: int) -> None:
    backend = SampleBackend("api")
    cache = SnapshotCache()
    server = XdsServer(cache, address="127.0.0.1:0")
    await server.start()
    port = free_port()
    if configuration == "shared":
        cache.set_snapshot(GROUP, shared_snapshot(port, backend.port))
    else:
        Pipeline(cache).publish(Store(split_objects(port, backend.port)).view())
    workdir = Path(tempfile.mkdtemp(prefix="websocket-surge-"))
    envoy = EnvoyProcess(workdir, xds_port=server.port, admin_port=free_port(), node_cluster=GROUP)
    try:
        await wait_for_logins(port, envoy)
        before = await logins(port, count)
        opened, refused = await surge(port, websockets)
        during = await logins(port, count)
        await asyncio.gather(*(websocket.close() for websocket in opened))
        refusals = ", ".join(f"{n} {status}" for status, n in sorted(refused.items(), key=str)) or "none"
        print(f"| {configuration} | {len(opened)}/{websockets} open, refused: {refusals} "
              f"| {describe(*before, count)} | {describe(*during, count)} |", flush=True)
    finally:
        envoy.stop()
        await server.stop(0)
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--websockets", type=int, default=150)
    parser.add_argument("--logins", type=int, default=100)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"Budget per cluster: {BUDGET}; {args.websockets} WebSockets; {args.logins} logins per measurement.")
    print("| configuration | WebSockets | logins before the surge | logins during the surge |")
    print("|---|---|---|---|")
    for configuration in ("shared", "split"):
        asyncio.run(run(configuration, args.websockets, args.logins))


if __name__ == "__main__":
    main()
