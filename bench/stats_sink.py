"""What Envoy's stats sink costs: bytes per flush from a real Envoy, and the control plane's CPU
per flush with 1,000 simulated Envoys pushing.

1. A real Envoy (bootstrap from `ads_bootstrap`, the sink on, flushing every second for the
   measurement) is given Backends with a WebSocket block each (2 clusters per Backend) and one
   plaintext and one mutual-TLS listener, and sends traffic through each cluster; its flushes
   are recorded as received (bytes on the wire, series kept after filtering).
2. That Envoy's last flush is replayed by N simulated Envoys in a child process (`--role
   clients`, one gRPC channel each, like a real Envoy), each pushing R flushes as fast as the
   server takes them; the control plane's CPU time (this process: gRPC's threads included)
   over the N x R flushes gives the CPU per flush, and, at Envoy's 5 s flush interval, the share
   of a core that N Envoys cost.

    python bench/stats_sink.py                       # 50 Backends (100 clusters), 1,000 Envoys
    python bench/stats_sink.py --backends 200 --envoys 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import httpx  # noqa: E402
import yaml  # noqa: E402

from controlplane.runtime.envoy_process import envoy_binary, stop_process  # noqa: E402
from controlplane.runtime.pipeline import Pipeline, cancel, feed  # noqa: E402
from controlplane.runtime.serve import tune_gc  # noqa: E402
from controlplane.sources.files import DirectorySource  # noqa: E402
from controlplane.translate.bootstrap import ads_bootstrap  # noqa: E402
from controlplane.xds import SnapshotCache, XdsServer  # noqa: E402
from controlplane.xds import metrics_service as ms  # noqa: E402
from tests.harness import free_port, write  # noqa: E402
from tests.objects import backend, endpoint_slice, gateway, ready, service  # noqa: E402
from tests.certs import ca_secret, issue, tls_secret  # noqa: E402

PATH = f"/{ms.SERVICE}/{ms.METHOD}"


class Recording(ms.StatsStore):
    """The store, keeping each flush's bytes and series count (for the real Envoy only)."""

    def __init__(self):
        super().__init__()
        self.flushes: list[tuple[int, int, bytes]] = []

    def received(self, stats, message, size):
        super().received(stats, message, size)
        self.flushes.append((size, len(stats.values), message.SerializeToString()))


async def real_envoy_flushes(backends: int, workdir: Path) -> tuple[list[tuple[int, int, bytes]], int]:
    """Flushes of a real Envoy serving `backends` Backends (plus WebSocket clusters), with traffic."""
    cache, store = SnapshotCache(), Recording()
    server = XdsServer(cache, address="127.0.0.1:0", services=(ms.MetricsService(store).handler(),))
    await server.start()
    (workdir / "manifests").mkdir()
    source = DirectorySource(workdir / "manifests", interval=0.05)
    _coalescer, tasks = feed(source, Pipeline(cache))
    port, tls_port, upstream = free_port(), free_port(), free_port()
    authority = issue("bench CA", ca=True)
    certificate = issue("localhost", issuer=authority)
    objects = [gateway(listeners=[{"name": "http", "port": port, "address": "127.0.0.1"},
                                  {"name": "agents", "port": tls_port, "address": "127.0.0.1", "protocol": "HTTPS",
                                   "tls": {"certificateSecret": "edge-cert", "clientCaSecret": "agents"}}]),
               tls_secret("edge-cert", certificate.cert_pem, certificate.key_pem),
               ca_secret("agents", authority.cert_pem)]
    for number in range(backends):
        name = f"b{number}"
        objects += [backend(name, routes=[{"pathPrefix": f"/{name}/"}], websocket={}), service(name),
                    endpoint_slice(name, [ready("127.0.0.1")], port=upstream)]
    write(source.directory / "all.yaml", *objects)
    bootstrap = ads_bootstrap(node_id="bench-envoy", node_cluster="edge", xds_host="127.0.0.1", xds_port=server.port,
                              admin_port=free_port())
    bootstrap["stats_flush_interval"] = "1s"
    config = workdir / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    with open(workdir / "envoy.log", "wb") as log:
        envoy = subprocess.Popen([envoy_binary(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart"],
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                for _ in range(200):  # until the listener is up
                    try:
                        await client.get(f"http://127.0.0.1:{port}/b0/")
                        break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
                for number in range(backends):  # every cluster used once (no endpoint listens: 503s)
                    await client.get(f"http://127.0.0.1:{port}/b{number}/")
            store.flushes.clear()
            await asyncio.sleep(3.5)
        finally:
            stop_process(envoy)
    await cancel(tasks)
    await server.stop(0)
    return store.flushes, backends * 2


async def push(port: int, envoys: int, rounds: int, flush: bytes) -> None:
    """`envoys` streams (one channel each), each sending its identifier then `rounds` flushes."""
    identified = ms.StreamMetricsMessage.FromString(flush)

    async def one(number: int) -> None:
        first = ms.StreamMetricsMessage()
        first.CopyFrom(identified)
        first.identifier.node.id, first.identifier.node.cluster = f"envoy-{number}", "edge"
        messages = [first.SerializeToString()] + [flush] * (rounds - 1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(PATH, request_serializer=lambda data: data,
                                        response_deserializer=lambda data: data)
            await call(iter(messages))
    await asyncio.gather(*(one(number) for number in range(envoys)))


def clients_main(port: int, envoys: int, rounds: int) -> None:
    asyncio.run(push(port, envoys, rounds, sys.stdin.buffer.read()))


async def cpu_per_flush(flush: bytes, envoys: int, rounds: int) -> dict:
    tune_gc()
    store = ms.StatsStore()
    server = XdsServer(SnapshotCache(), address="127.0.0.1:0", services=(ms.MetricsService(store).handler(),))
    port = await server.start()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    clients = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "clients", "--port", str(port), "--envoys", str(envoys),
        "--rounds", str(rounds), stdin=asyncio.subprocess.PIPE)
    await clients.communicate(flush)
    after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    await server.stop(0)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert store.flushes_received == envoys * rounds, store.flushes_received
    return {"envoys": envoys, "flushes": store.flushes_received, "cpu_s": cpu, "wall_s": elapsed,
            "cpu_ms_per_flush": 1000 * cpu / store.flushes_received,
            "core_share_at_5s": cpu / store.flushes_received * envoys / 5,
            "series_held": sum(len(s.values) for s in store.envoys())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="bench", choices=["bench", "clients"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--backends", type=int, default=50)
    parser.add_argument("--envoys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.role == "clients":
        clients_main(args.port, args.envoys, args.rounds)
        return
    with tempfile.TemporaryDirectory() as workdir:
        flushes, clusters = asyncio.run(real_envoy_flushes(args.backends, Path(workdir)))
    if not flushes:
        raise SystemExit("the Envoy pushed no stats: see its log")
    size, kept, flush = flushes[-1]
    print(f"real Envoy 1.40, {clusters} Backend clusters + 2 listeners (1 mutual TLS), flushing every second:")
    print(f"  bytes per flush: {size:,} on the wire ({len(flushes)} flushes seen, "
          f"{min(f[0] for f in flushes):,}-{max(f[0] for f in flushes):,}); series kept after filtering: {kept}")
    print(f"  at the 5 s interval: {size / 5 / 1024:.1f} KiB/s per Envoy, "
          f"{size / 5 * args.envoys / 1024 / 1024:.1f} MiB/s for {args.envoys:,} Envoys")
    result = asyncio.run(cpu_per_flush(flush, args.envoys, args.rounds))
    print(f"{result['envoys']:,} simulated Envoys x {args.rounds} flushes of that size ({result['flushes']:,} flushes, "
          f"{result['wall_s']:.1f} s):")
    print(f"  control plane CPU: {result['cpu_ms_per_flush']:.3f} ms per flush; at the 5 s interval "
          f"{result['core_share_at_5s']:.0%} of a core for {args.envoys:,} Envoys; {result['series_held']:,} series held")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
