"""How fast a Kubernetes write reaches Envoy: a real API server, `controlplane serve`, a real Envoy.

A real kube-apiserver v1.36 with etcd (tests/real_kube.py), and, in a network namespace of this
process (tests/netns.py: EndpointSlices may not point at loopback), `controlplane serve --source
kubernetes` as the ServiceAccount of k8s/controlplane/rbac.yaml, a real Envoy and a sample
backend on a TEST-NET address. Two figures:

- EndpointSlice change -> Envoy: from the PATCH of a slice (one endpoint, a new address each
  time) to Envoy's admin /clusters listing that address, polled every millisecond.
- Backend create -> traffic: from the POST of a Backend (its Service and slice already there) to
  the first 200 on its route through Envoy's listener, polled every 2 ms.

Needs root (network namespaces) and the kube-apiserver binary (../shared/kube-apiserver/, or
KUBE_APISERVER) with etcd. Every loop is bounded in count and time.

    python bench/kube_propagation.py                 # 60 slice changes, 15 Backends
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.runtime.envoy_process import EnvoyProcess, stop_process  # noqa: E402
from controlplane.runtime.sample_backend import SampleBackend  # noqa: E402
from tests.netns import NetworkNamespace, unavailable  # noqa: E402
from tests.objects import backend, endpoint_slice, gateway, ready, service  # noqa: E402
from tests.real_kube import RealKube, binaries, free_port  # noqa: E402

BACKEND_ADDRESS = "192.0.2.10"
TIMEOUT = 10.0  # a change not served within this is reported as lost


def wait_until(check, *, timeout: float, interval: float) -> float | None:
    """Seconds until `check()` is true, polled every `interval`; None after `timeout`."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if check():
            return time.perf_counter() - start
        time.sleep(interval)
    return None


def get(netns: NetworkNamespace, port: int, path: str) -> tuple[int, bytes]:
    """A GET on a new connection from inside the namespace; (0, b"") when it fails."""
    with netns.inside():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            return 0, b""
        finally:
            connection.close()


def summary(name: str, seconds: list[float], lost: int) -> str:
    ms = sorted(s * 1000 for s in seconds)
    if len(ms) < 2:
        return f"{name}: {len(ms)} measured, {lost} not served within {TIMEOUT:g} s"
    centiles = statistics.quantiles(ms, n=100, method="inclusive")
    return (f"{name}: n={len(ms)}  p50 {centiles[49]:.0f} ms  p90 {centiles[89]:.0f} ms  p99 {centiles[98]:.0f} ms  "
            f"max {ms[-1]:.0f} ms  (not served within {TIMEOUT:g} s: {lost})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=60, help="EndpointSlice changes (at least 50 for a p99)")
    parser.add_argument("--backends", type=int, default=15, help="Backends created")
    args = parser.parse_args()
    apiserver, etcd, missing = binaries()
    reason = missing or unavailable()
    if reason:
        print(f"kube_propagation: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="kube-propagation-") as workdir:
        kube = RealKube(apiserver, etcd, Path(workdir))
        netns = NetworkNamespace()
        processes: list[subprocess.Popen] = []
        envoy = sample = None
        try:
            kube.start()
            namespace = kube.new_namespace()
            netns.reach_host(kube.port)
            xds_port, listener = free_port(), free_port()
            serve_log = Path(workdir) / "serve.log"
            with serve_log.open("wb") as output:
                processes.append(netns.popen(
                    [sys.executable, "-m", "controlplane.cli", "serve", "--source", "kubernetes",
                     "--kubeconfig", str(kube.kubeconfig("controlplane")), "--namespace", namespace,
                     "--xds-address", f"127.0.0.1:{xds_port}", "--metrics-address", ""],
                    env={**os.environ, "POD_NAMESPACE": kube.controlplane_namespace},
                    stdout=output, stderr=subprocess.STDOUT))
            with netns.inside():
                envoy = EnvoyProcess(Path(workdir), xds_port=xds_port, admin_port=free_port(), node_cluster="edge")
                sample = SampleBackend("one", host=BACKEND_ADDRESS)
            for obj in (gateway(port=listener, namespace=namespace), service("api", namespace=namespace),
                        endpoint_slice("api", [ready(BACKEND_ADDRESS)], port=sample.port, namespace=namespace),
                        backend("api", routes=[{"pathPrefix": "/api"}], namespace=namespace)):
                kube.apply(obj, namespace=namespace)
            if wait_until(lambda: get(netns, listener, "/api")[0] == 200, timeout=60, interval=0.1) is None:
                print(f"kube_propagation: no traffic through Envoy after 60 s; serve log:\n{serve_log.read_text()}",
                      file=sys.stderr)
                return 1

            slices, lost_slices, writes = [], 0, []
            for index in range(args.changes):
                address = f"192.0.2.{20 + index % 200}"
                started = time.perf_counter()
                kube.patch("discovery.k8s.io/v1", "EndpointSlice", "api-1",
                           {"endpoints": [{"addresses": [address], "conditions": {"ready": True}}]},
                           namespace=namespace)
                writes.append(time.perf_counter() - started)
                marker = f"::{address}:{sample.port}::".encode()
                served = wait_until(lambda: marker in get(netns, envoy.admin_port, "/clusters")[1],
                                    timeout=TIMEOUT, interval=0.001)
                if served is None:
                    lost_slices += 1
                else:
                    slices.append(writes[-1] + served)
            kube.patch("discovery.k8s.io/v1", "EndpointSlice", "api-1",
                       {"endpoints": [{"addresses": [BACKEND_ADDRESS], "conditions": {"ready": True}}]},
                       namespace=namespace)

            created, lost_backends = [], 0
            for index in range(args.backends):
                name = f"b{index:03d}"
                kube.apply(service(name, namespace=namespace), namespace=namespace)
                kube.apply(endpoint_slice(name, [ready(BACKEND_ADDRESS)], port=sample.port, namespace=namespace),
                           namespace=namespace)
                time.sleep(0.2)  # the Service and slice are known first: the figure is the Backend's alone
                assert get(netns, listener, f"/{name}/")[0] == 404, f"/{name} is served before its Backend exists"
                started = time.perf_counter()
                kube.create(backend(name, routes=[{"pathPrefix": f"/{name}/"}], namespace=namespace),
                            namespace=namespace)
                served = wait_until(lambda: get(netns, listener, f"/{name}/")[0] == 200, timeout=TIMEOUT,
                                    interval=0.002)
                if served is None:
                    lost_backends += 1
                else:
                    created.append(time.perf_counter() - started)

            print(f"kube-apiserver v1.36 + etcd, controlplane serve (ServiceAccount), Envoy 1.40; {os.cpu_count()} CPUs")
            print(f"API write (PATCH of an EndpointSlice), for reference: p50 {statistics.median(writes) * 1000:.0f} ms")
            print(summary("EndpointSlice change -> Envoy /clusters", slices, lost_slices))
            print(summary("Backend create -> traffic on its route", created, lost_backends))
            return 0 if not (lost_slices or lost_backends) else 1
        finally:
            if envoy is not None:
                envoy.stop()
            for process in processes:
                stop_process(process)
            if sample is not None:
                sample.close()
            netns.close()
            kube.close()


if __name__ == "__main__":
    sys.exit(main())
