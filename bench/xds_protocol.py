"""The xDS protocol alone: what one push and its ACK cost per stream, without gRPC or asyncio.

    python bench/xds_protocol.py [--streams 1000] [--rounds 10]

`bench/xds_fanout.py` measures the whole server against a bare grpc.aio one; this isolates the
part that is only ours, `StreamProtocol`: N streams subscribed, like the fan-out's simulated
Envoys, to 100 clusters (CDS wildcard) and their 100 endpoint sets (EDS by name), SotW and Delta.
Each round publishes a snapshot with one endpoint moved, then times every stream's `refresh()`
(which sends the changed endpoint set) and every stream's `receive()` of its ACK (a SotW ACK
repeats the 100 names, as Envoy's does; given its bytes too, as the server gives them). Prints the best round's microseconds per stream.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.service.discovery.v3 import discovery_pb2 as d  # noqa: E402

from controlplane.translate import builders as b  # noqa: E402
from controlplane.xds import CLUSTER, ENDPOINT, Snapshot, SnapshotCache  # noqa: E402
from controlplane.xds.protocol import StreamProtocol  # noqa: E402

CLUSTERS = 100


def endpoint_sets(round_number: int) -> list:
    """Cluster i has 10 endpoints; each round moves one endpoint of cluster (round % 100)."""
    changed = round_number % CLUSTERS
    return [b.load_assignment(f"service-{i}", [(f"10.0.{i}.{host}", 8080 + (round_number if i == changed and
                                                                            host == 1 else 0))
                                               for host in range(1, 11)]) for i in range(CLUSTERS)]


def ack(response, type_url: str, delta: bool, names: list[str]) -> tuple:
    """What Envoy sends back: its bytes, and the request parsed from them as the server parses it."""
    if delta:
        wire = d.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce).SerializeToString()
        return d.DeltaDiscoveryRequest.FromString(wire), wire
    wire = d.DiscoveryRequest(type_url=type_url, response_nonce=response.nonce, version_info=response.version,
                              resource_names=names if type_url == ENDPOINT else []).SerializeToString()
    return d.DiscoveryRequest.FromString(wire), wire


def measure(streams: int, rounds: int, delta: bool) -> tuple[float, float]:
    """(best refresh, best ACK) in microseconds per stream."""
    cache = SnapshotCache()
    snapshot = Snapshot(clusters=[b.eds_cluster(f"service-{i}") for i in range(CLUSTERS)], endpoints=endpoint_sets(0))
    cache.set_snapshot("bench", snapshot)
    group = cache.group("bench")
    names = [f"service-{i}" for i in range(CLUSTERS)]
    request = d.DeltaDiscoveryRequest if delta else d.DiscoveryRequest
    protocols = [StreamProtocol(group, delta=delta) for _ in range(streams)]
    for protocol in protocols:
        sent = protocol.receive(request(type_url=CLUSTER)).responses[0]
        protocol.receive(ack(sent, CLUSTER, delta, names)[0])
        subscription = {"resource_names_subscribe": names} if delta else {"resource_names": names}
        sent = protocol.receive(request(type_url=ENDPOINT, **subscription)).responses[0]
        protocol.receive(ack(sent, ENDPOINT, delta, names)[0])
    refreshes, acks = [], []
    for round_number in range(1, rounds + 1):
        cache.set_snapshot("bench", snapshot.replace(endpoints=endpoint_sets(round_number)))
        started = time.perf_counter()
        steps = [protocol.refresh() for protocol in protocols]
        refreshes.append((time.perf_counter() - started) / streams * 1e6)
        assert all(len(step.responses) == 1 for step in steps)
        answers = [ack(step.responses[0], ENDPOINT, delta, names) for step in steps]
        started = time.perf_counter()
        for protocol, (answer, wire) in zip(protocols, answers):
            assert protocol.receive(answer, wire=wire).acks
        acks.append((time.perf_counter() - started) / streams * 1e6)
    return min(refreshes), min(acks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    print(f"{args.streams} streams, {CLUSTERS} clusters x 10 endpoints, one endpoint moved per round, "
          f"best of {args.rounds} rounds (µs per stream):")
    for delta in (False, True):
        refresh, acked = measure(args.streams, args.rounds, delta)
        print(f"  {'Delta' if delta else 'SotW':5}  push one endpoint set {refresh:5.1f}   its ACK {acked:5.1f}")


if __name__ == "__main__":
    main()
