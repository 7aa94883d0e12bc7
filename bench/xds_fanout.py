"""xDS fan-out: N simulated Envoys, one endpoint changes; how long until all have it, and memory.

The control plane (SnapshotCache + XdsServer) runs in this process, so its memory is measured
alone, and tuned as `controlplane serve` runs it (garbage collector, free memory given back).
The simulated Envoys run in a child process (`--role clients`), each with its own gRPC
channel (its own HTTP/2 connection, like a real Envoy), subscribed over ADS to 100 clusters
(CDS wildcard) and their 100 endpoint sets (EDS by name), ACKing every response. Their first
request carries a node as large as a real Envoy's (its list of extensions).

Each round changes one endpoint of one cluster and records, per client, the time from
`set_snapshot` to the client having received the new EDS response and written its ACK
(CLOCK_MONOTONIC is system-wide on Linux, so the two processes' clocks agree), and the control
plane's CPU time per stream for the round (compare with bench/grpc_floor.py).

Each row runs in pairs, alternately (three pairs by default, `--pairs`): with a bare grpc.aio
server that has no xDS logic (`BareAds`: it answers the same simulated Envoys' subscriptions with
the same responses, pre-serialized, and pushes each round's EDS response, built before the round,
to every stream), then with our server. The table prints every row and the median of the pairs'
ratios (each pair's too): what our protocol, cache and bookkeeping cost above gRPC's own floor,
in time to all ACKed and in memory per stream.

    python bench/xds_fanout.py                          # N = 1,000, 5,000; SotW and Delta
    python bench/xds_fanout.py --clients 1000 --modes delta --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from google.protobuf import any_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2 as d  # noqa: E402

from controlplane.runtime.serve import release_free_memory, tune_gc  # noqa: E402
from controlplane.translate import builders as b  # noqa: E402
from controlplane.xds import CLUSTER, ENDPOINT, Snapshot, SnapshotCache, XdsServer  # noqa: E402

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
GROUP = "bench"


def rss_bytes() -> int:
    """Resident memory with free heap pages given back, as `controlplane serve` does every minute."""
    release_free_memory()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def envoy_like_node(index: int) -> base_pb2.Node:
    """A node the size of a real Envoy 1.40's: it lists its 516 extensions (61 KB on the wire).

    The server must not keep it: held per stream, it was most of a stream's memory."""
    node = base_pb2.Node()
    node.CopyFrom(_node_template())
    node.id = f"envoy-{index}"
    return node


@functools.cache
def _node_template() -> base_pb2.Node:
    categories = ("envoy.filters.http", "envoy.filters.network", "envoy.filters.listener", "envoy.clusters",
                  "envoy.transport_sockets.upstream", "envoy.access_loggers", "envoy.tracers", "envoy.matching")
    extensions = [base_pb2.Extension(name=f"{category}.extension_{number:03d}", category=category,
                                     type_urls=[f"envoy.extensions.{category[6:]}.extension_{number:03d}.v3.Config"])
                  for number in range(516) for category in [categories[number % len(categories)]]]
    node = base_pb2.Node(cluster=GROUP, user_agent_name="envoy", extensions=extensions)
    node.user_agent_build_version.version.major_number, node.user_agent_build_version.version.minor_number = 1, 40
    return node


def endpoints(clusters: int, round_number: int):
    """Cluster i has 10 endpoints; each round moves one endpoint of cluster (round % clusters)."""
    changed = round_number % clusters
    return [b.load_assignment(f"service-{i}", [(f"10.{i // 250}.{i % 250}.{host}",
                                                8080 + (round_number if i == changed and host == 1 else 0))
                                               for host in range(1, 11)])
            for i in range(clusters)]


# -- the simulated Envoys (child process) -------------------------------------------------------

async def simulated_envoy(port: int, index: int, delta: bool, names: list[str], received: list[float],
                          ready: asyncio.Event, reconnects: list[int]) -> None:
    """Subscribe like Envoy over ADS and ACK everything; like Envoy, reconnect when the stream fails."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    node = envoy_like_node(index)
    for attempt in range(10):
        try:
            await _one_stream(channel, node, delta, names, received, ready)
            return
        except grpc.aio.AioRpcError:
            reconnects[0] += 1
            await asyncio.sleep(0.5 * (attempt + 1))


async def _one_stream(channel, node, delta: bool, names: list[str], received: list[float],
                      ready: asyncio.Event) -> None:
    if delta:
        call = channel.stream_stream(ADS + "DeltaAggregatedResources",
                                     request_serializer=d.DeltaDiscoveryRequest.SerializeToString,
                                     response_deserializer=d.DeltaDiscoveryResponse.FromString)()
        await call.write(d.DeltaDiscoveryRequest(node=node, type_url=CLUSTER))
    else:
        call = channel.stream_stream(ADS + "StreamAggregatedResources",
                                     request_serializer=_encoded,
                                     response_deserializer=d.DiscoveryResponse.FromString)()
        await call.write(d.DiscoveryRequest(node=node, type_url=CLUSTER).SerializeToString())
        # A SotW ACK repeats every subscribed name. Envoy encodes that in C++; here the names are
        # encoded once and the message assembled from bytes, so that 1,000 simulated Envoys cost
        # the cores they share with the control plane as little as they can. In field-number order,
        # as Envoy writes it: version_info (1), resource_names (3), type_url (4), response_nonce (5).
        names_part = d.DiscoveryRequest(resource_names=names).SerializeToString()
    subscribed = False
    async for response in call:
        if delta:
            await call.write(d.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce))
        else:
            version = d.DiscoveryRequest(version_info=response.version_info).SerializeToString()
            rest = d.DiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce).SerializeToString()
            await call.write(version + (names_part if response.type_url == ENDPOINT else b"") + rest)
        if response.type_url == CLUSTER and not subscribed:
            subscribed = True
            if delta:
                await call.write(d.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=names))
            else:
                await call.write(names_part + d.DiscoveryRequest(type_url=ENDPOINT).SerializeToString())
        elif response.type_url == ENDPOINT:
            if ready.is_set():
                received.append(time.monotonic())
                LAST_PUSH_BYTES[0] = response.ByteSize()
            else:
                ready.set()


LAST_PUSH_BYTES = [0]
"""The size of the last EDS response a client received: the servers' pushes must be the same size."""


def _encoded(message: bytes) -> bytes:
    return message


async def run_clients(port: int, count: int, delta: bool, clusters: int) -> None:
    raise_fd_limit()
    names = [f"service-{i}" for i in range(clusters)]
    received: list[list[float]] = [[] for _ in range(count)]
    ready = [asyncio.Event() for _ in range(count)]
    reconnects = [0]
    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(simulated_envoy(port, index, delta, names, received[index], ready[index],
                                                           reconnects)))
        if index % 100 == 99:
            await asyncio.sleep(0.1)  # connect in waves, as a fleet rolling out would
    try:
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in ready)), timeout=120)
    except TimeoutError:
        failed = [task.exception() for task in tasks if task.done() and not task.cancelled()]
        sys.exit(f"{sum(not e.is_set() for e in ready)} of {count} simulated Envoys not in sync after 120 s; "
                 f"{len(failed)} ended: {failed[:3]!r}")
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (line := (await reader.readline()).decode().strip()) != "done":
        want = int(line)  # round number: report once every client has received it
        while min(len(r) for r in received) < want:
            await asyncio.sleep(0.002)
        print("round", want, flush=True)
    print(json.dumps({"received": received, "reconnects": reconnects[0], "push_bytes": LAST_PUSH_BYTES[0]}),
          flush=True)
    for task in tasks:
        task.cancel()


# -- the control plane (this process) -----------------------------------------------------------

class OurServer:
    """The control plane: SnapshotCache and XdsServer, a new snapshot per round."""

    def __init__(self, clusters: int, delta: bool):
        self.clusters = clusters
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache, address="127.0.0.1:0")
        self.snapshot = Snapshot(clusters=[b.eds_cluster(f"service-{i}") for i in range(clusters)],
                                 endpoints=endpoints(clusters, 0))

    async def start(self) -> int:
        port = await self.server.start()
        self.cache.set_snapshot(GROUP, self.snapshot)
        return port

    def prepare(self, round_number: int) -> None:
        self.snapshot = self.snapshot.replace(endpoints=endpoints(self.clusters, round_number))

    def push(self, round_number: int) -> None:
        self.cache.set_snapshot(GROUP, self.snapshot)

    async def stop(self) -> None:
        await self.server.stop(0)


def _anys(type_url: str, messages) -> list[any_pb2.Any]:
    return [any_pb2.Any(type_url=type_url, value=message.SerializeToString()) for message in messages]


class BareAds:
    """grpc.aio with no xDS logic: the floor the control plane is compared with. Per stream it
    answers the first request with every cluster and the EDS subscription with every endpoint set
    (pre-serialized, as our responses are), ignores ACKs, and a push writes one pre-built response
    holding the endpoint sets that changed (the round's, and the previous round's moved back: what
    our server sends, in both modes) from a short task, the shape of `XdsServer`'s pushes. Versions
    are 16 hex digits, as ours are, so the messages are the same size to within a few bytes."""

    def __init__(self, clusters: int, delta: bool):
        self.clusters, self.delta = clusters, delta
        cds = _anys(CLUSTER, [b.eds_cluster(f"service-{i}") for i in range(clusters)])
        eds = _anys(ENDPOINT, endpoints(clusters, 0))
        self.first = [self._response(CLUSTER, cds, f"{1:016x}"), self._response(ENDPOINT, eds, f"{1:016x}")]
        self.payload = b""
        self.streams: list = []
        self.server = grpc.aio.server()

    def _response(self, type_url: str, resources: list[any_pb2.Any], version: str) -> bytes:
        if self.delta:
            return d.DeltaDiscoveryResponse(type_url=type_url, system_version_info=version, nonce=version, resources=[
                d.Resource(name=f"r{i}", version=version, resource=resource)
                for i, resource in enumerate(resources)]).SerializeToString()
        return d.DiscoveryResponse(type_url=type_url, version_info=version, nonce=version,
                                   resources=resources).SerializeToString()

    async def _stream(self, requests, context) -> None:
        loop = asyncio.get_running_loop()
        one_write_at_a_time = asyncio.Lock()  # gRPC refuses a write while one is in flight

        async def write(payload: bytes) -> None:
            async with one_write_at_a_time:
                await context.write(payload)

        count = 0
        async for _request in requests:  # 1: CDS subscription, 2: its ACK, 3: EDS subscription, then ACKs
            count += 1
            if count in (1, 3):
                await write(self.first[count // 2])
            if count == 3:
                self.streams.append(lambda: loop.create_task(write(self.payload)))

    async def start(self) -> int:
        identity = grpc.stream_stream_rpc_method_handler(self._stream)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            {"StreamAggregatedResources": identity, "DeltaAggregatedResources": identity})])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def prepare(self, round_number: int) -> None:
        before, now = endpoints(self.clusters, round_number - 1), endpoints(self.clusters, round_number)
        changed = [assignment for old, assignment in zip(before, now) if old != assignment]
        self.payload = self._response(ENDPOINT, _anys(ENDPOINT, changed), f"{round_number + 1:016x}")

    def push(self, round_number: int) -> None:
        for write in self.streams:
            write()

    async def stop(self) -> None:
        await self.server.stop(0)


SERVERS = {"ours": OurServer, "bare": BareAds}


async def measure(count: int, delta: bool, rounds: int, clusters: int, server_kind: str = "ours") -> dict:
    raise_fd_limit()
    tune_gc()  # as `controlplane serve` runs
    server = SERVERS[server_kind](clusters, delta)
    port = await server.start()
    baseline = rss_bytes()

    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "clients", "--port", str(port), "--clients", str(count),
        "--clusters", str(clusters), "--modes", "delta" if delta else "sotw",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=2**26)  # the last line holds every receipt time
    if (await child.stdout.readline()).decode().strip() != "ready":
        await server.stop()
        raise SystemExit("the simulated Envoys did not get in sync (see their error above)")
    await asyncio.sleep(0.5)
    per_stream = (rss_bytes() - baseline) / count

    started: list[float] = []
    cpu = 0.0
    for round_number in range(1, rounds + 1):
        server.prepare(round_number)
        started.append(time.monotonic())
        cpu_before = time.process_time()
        server.push(round_number)
        child.stdin.write(f"{round_number}\n".encode())
        await child.stdin.drain()
        assert (await child.stdout.readline()).decode().split() == ["round", str(round_number)]
        cpu += time.process_time() - cpu_before
        await asyncio.sleep(0.2)
    child.stdin.write(b"done\n")
    await child.stdin.drain()
    report = json.loads(await child.stdout.readline())
    received = report["received"]
    await child.wait()
    await server.stop()

    latencies = sorted((times[r] - started[r]) * 1000 for times in received for r in range(rounds))
    slowest_per_round = [max(times[r] - started[r] for times in received) * 1000 for r in range(rounds)]
    return {
        "clients": count, "mode": "delta" if delta else "sotw", "server": server_kind, "rounds": rounds,
        "push_bytes": report["push_bytes"],
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "all_acked_ms": statistics.median(slowest_per_round),
        "rss_mib": rss_bytes() / 2**20, "per_stream_kib": per_stream / 1024,
        "cpu_us_per_stream": cpu / rounds / count * 1e6,
        "reconnects": report["reconnects"],
    }


def _row(count: str, mode: str, server: str, args) -> dict:
    """One measurement in a fresh process, so that each row's memory starts from the same place."""
    row = subprocess.run([sys.executable, __file__, "--role", "row", "--clients", count, "--modes", mode,
                          "--server", server, "--rounds", str(args.rounds), "--clusters", str(args.clusters)],
                         capture_output=True, text=True)
    if row.returncode != 0:
        sys.exit(f"the N={count} {mode} {server} row failed:\n{row.stderr[-3000:]}")
    return json.loads(row.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1000,5000", help="comma-separated N")
    parser.add_argument("--modes", default="sotw,delta")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=3, help="bare and ours measured this many times, alternately: "
                        "one pair's ratio moves by a tenth or more on a busy machine")
    parser.add_argument("--role", choices=["table", "row", "clients"], default="table", help=argparse.SUPPRESS)
    parser.add_argument("--server", choices=sorted(SERVERS), default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "clients":
        asyncio.run(run_clients(args.port, int(args.clients), args.modes == "delta", args.clusters))
        return
    if args.role == "row":
        print(json.dumps(asyncio.run(measure(int(args.clients), args.modes == "delta", args.rounds, args.clusters,
                                             args.server))))
        return
    print(f"{os.cpu_count()} CPUs; {args.clusters} clusters x 10 endpoints per client; "
          f"one endpoint changes per round; {args.rounds} rounds; bare = grpc.aio with no xDS logic, same run")
    print(f"{'N':>6} {'mode':>6} {'server':>6} {'p50 ms':>8} {'p99 ms':>8} {'all ACKed ms':>13} {'KiB/stream':>11} "
          f"{'RSS MiB':>8} {'push B':>7} {'reconnects':>10} {'CPU µs/stream':>14}")
    for count in args.clients.split(","):
        for mode in args.modes.split(","):
            ratios, extra_memory = [], []
            for _pair in range(args.pairs):  # bare, ours, bare, ours...: each pair run within the same minute
                rows = {server: _row(count, mode, server, args) for server in ("bare", "ours")}
                for result in rows.values():
                    print(f"{result['clients']:>6} {result['mode']:>6} {result['server']:>6} {result['p50_ms']:>8.1f} "
                          f"{result['p99_ms']:>8.1f} {result['all_acked_ms']:>13.1f} {result['per_stream_kib']:>11.1f} "
                          f"{result['rss_mib']:>8.0f} {result['push_bytes']:>7} {result['reconnects']:>10} "
                          f"{result['cpu_us_per_stream']:>14.0f}", flush=True)
                ratios.append(rows["ours"]["all_acked_ms"] / rows["bare"]["all_acked_ms"])
                extra_memory.append(rows["ours"]["per_stream_kib"] - rows["bare"]["per_stream_kib"])
            each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
            print(f"{'':>6} {'':>6} {'ratio':>6}  all ACKed ours/bare {statistics.median(ratios):.2f}x (median of "
                  f"{len(ratios)} pair{'s' if len(ratios) > 1 else ''}: {each}); memory beyond grpc.aio's "
                  f"{statistics.median(extra_memory):+.1f} KiB/stream", flush=True)


if __name__ == "__main__":
    main()
