"""Translation at scale: 1,000 Backends x 10 endpoints, full and after endpoints change.

    python bench/translate.py [--backends 1000] [--endpoints 10] [--repeat 15]

Full: store view -> IR -> Envoy resources -> serialized Snapshot, from cold caches.
One endpoint changed: the same, with one EndpointSlice updated (what a pod restart causes); ten
successive changes after each full pass, as a running control plane sees them; then the new
snapshot's version (what publishing it computes first), and the last accepted state `serve`
saves (`Translator.remembered_json()`, on the event loop). A burst: 100 EndpointSlices of
different Services updated before one translation (a rollout, coalesced by the pipeline), three
after each full pass. Then changes that are not EndpointSlices, three of each per run: a Backend's
budget edited, a Backend's routes edited, a Service's port edited, a Backend added (with its
Service and EndpointSlice), that Backend deleted. The garbage collector is tuned as `controlplane serve` tunes it
(runtime.serve.tune_gc) and paused during each publish as the pipeline pauses it
(runtime.pipeline.collector_paused, which also freezes what a large pass leaves, unless no full
collection has run since the last freeze was undone: then that pass pays the young collection).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.runtime.pipeline import collector_paused  # noqa: E402
from controlplane.runtime.serve import tune_gc  # noqa: E402
from controlplane.sources.store import ObjectKey, Store  # noqa: E402
from controlplane.translate import to_ir, to_xds  # noqa: E402


def objects(backends: int, endpoints: int) -> list[dict]:
    gateway = {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Gateway",
               "metadata": {"name": "edge", "namespace": "bench", "resourceVersion": "1"},
               "spec": {"nodeCluster": "edge", "listeners": [{"name": "http", "port": 8080}]}}
    found = [gateway]
    for i in range(backends):
        found += [backend(i), service(i), endpoint_slice(f"svc-{i}", i, endpoints, version=1)]
    return found


def backend(index: int, *, max_connections: int = 1000) -> dict:
    name = f"svc-{index}"
    return {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Backend",
            "metadata": {"name": name, "namespace": "bench", "resourceVersion": str(max_connections)},
            "spec": {"gateway": "edge", "service": {"name": name, "port": "http"},
                     "routes": [{"pathPrefix": f"/{name}"}],
                     "circuitBreakers": {"default": {"maxConnections": max_connections},
                                         "high": {"maxConnections": 100}}}}


def service(index: int, *, port: int = 80) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{index}", "namespace": "bench",
                                                                "resourceVersion": str(port)},
            "spec": {"ports": [{"name": "http", "port": port}]}}


def endpoint_slice(name: str, index: int, endpoints: int, *, version: int, moved: int = 0) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "bench", "resourceVersion": str(version),
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [f"10.{index // 250}.{index % 250}.{host + moved}"],
                           "conditions": {"ready": True}} for host in range(1, endpoints + 1)]}


class Publisher:
    """What the pipeline does per change: translate the view, build the node group's snapshot."""

    def __init__(self):
        self.translator = to_ir.Translator()
        self.builder = to_xds.SnapshotBuilder()

    def publish(self, store: Store):
        with collector_paused():  # as the pipeline does
            return self.builder.snapshot(self.translator.translate(store.view()).groups["edge"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--one-pass", action="store_true",
                        help="one full pass, nothing printed: for counting instructions under callgrind")
    args = parser.parse_args()
    tune_gc()
    if args.one_pass:
        Publisher().publish(Store(objects(args.backends, args.endpoints)))
        return
    full, changed, versions, remembered, bursts, edits = [], [], [], [], [], {}
    for round_number in range(args.repeat):
        store = Store(objects(args.backends, args.endpoints))
        publisher = Publisher()
        started = time.perf_counter()
        first = publisher.publish(store)
        full.append((time.perf_counter() - started) * 1000)
        previous = first
        for change in range(10):
            index = (round_number * 10 + change) * 37 % args.backends
            store.put(endpoint_slice(f"svc-{index}", index, args.endpoints, version=2 + change, moved=100 + change))
            started = time.perf_counter()
            snapshot = publisher.publish(store)
            changed.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            assert snapshot.version != previous.version
            versions.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            publisher.translator.remembered_json()
            remembered.append((time.perf_counter() - started) * 1000)
            previous = snapshot
        for burst in range(3):
            for index in range(burst * 100, (burst + 1) * 100):
                index = index * 97 % args.backends
                store.put(endpoint_slice(f"svc-{index}", index, args.endpoints, version=20 + burst, moved=120 + burst))
            started = time.perf_counter()
            snapshot = publisher.publish(store)
            bursts.append((time.perf_counter() - started) * 1000)
            assert snapshot.version != previous.version
            previous = snapshot
        for edit in range(3):  # what is not an EndpointSlice: Backends and Services edited, added, deleted
            index = (round_number * 3 + edit) * 53 % args.backends
            added = args.backends + round_number * 3 + edit
            routed = backend(index + 1)
            routed["spec"]["routes"] = [{"pathPrefix": f"/moved-{round_number}-{edit}"}]
            for label, write, new_version in (
                    ("Backend budget edited", lambda: store.put(backend(index, max_connections=500 + edit)), True),
                    ("Backend routes edited", lambda: store.put(routed), True),
                    ("Service edited", lambda: store.put(service(index, port=81 + edit)), False),
                    ("Backend added", lambda: [store.put(o) for o in (service(added), backend(added),
                                                                      endpoint_slice(f"svc-{added}", added,
                                                                                     args.endpoints, version=1))],
                     True),
                    ("Backend deleted", lambda: store.delete(ObjectKey("Backend", "bench", f"svc-{added}")), True)):
                write()
                started = time.perf_counter()
                snapshot = publisher.publish(store)
                edits.setdefault(label, []).append((time.perf_counter() - started) * 1000)
                # A Service's port number changes no Envoy resource (endpoints come from the slices).
                assert (snapshot.version != previous.version) == new_version, label
                previous = snapshot
    print(f"{args.backends} Backends x {args.endpoints} endpoints, {args.repeat} runs (best / median):")
    print(f"  full translation + serialization: {min(full):7.1f} / {statistics.median(full):7.1f} ms")
    print(f"  one endpoint changed -> snapshot: {min(changed):7.1f} / {statistics.median(changed):7.1f} ms")
    print(f"  then the snapshot's version:      {min(versions):7.1f} / {statistics.median(versions):7.1f} ms")
    print(f"  then the state to save:           {min(remembered):7.1f} / {statistics.median(remembered):7.1f} ms")
    print(f"  100 slices in a burst -> snapshot: {min(bursts):6.1f} / {statistics.median(bursts):7.1f} ms")
    for label, times in edits.items():
        print(f"  one {label} -> snapshot:{' ' * (22 - len(label))}{min(times):7.1f} / "
              f"{statistics.median(times):7.1f} ms")


if __name__ == "__main__":
    main()
