"""`controlplane demo`: the control plane, a real Envoy and sample backends on 127.0.0.1.

Until the Kubernetes and file sources land, the demo serves a small built-in snapshot: one HTTP
listener whose routes send `/` to a cluster of two sample backends over EDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from controlplane.runtime.envoy_process import EnvoyProcess
from controlplane.runtime.sample_backend import SampleBackend
from controlplane.translate import builders as b
from controlplane.xds import Snapshot, SnapshotCache, XdsServer

NODE_CLUSTER = "demo-gateway"


@dataclass(frozen=True)
class DemoPorts:
    xds: int = 18000
    listener: int = 10000
    admin: int = 9901


def demo_snapshot(listener_port: int, backends: list[SampleBackend]) -> Snapshot:
    return Snapshot(
        clusters=[b.eds_cluster("api")],
        endpoints=[b.load_assignment("api", [backend.address for backend in backends])],
        listeners=[b.http_listener("http", address="127.0.0.1", port=listener_port, route_config_name="http")],
        routes=[b.route_configuration("http", [b.virtual_host("demo", [b.route("api", prefix="/")])])],
    )


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode().strip()
    except (urllib.error.URLError, OSError):
        return None


async def _first_success(url: str, envoy: EnvoyProcess, timeout: float = 30.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if envoy.process.poll() is not None:
            raise RuntimeError(f"Envoy exited with code {envoy.process.returncode}:\n{envoy.log_tail()}")
        body = await asyncio.to_thread(_get, url)
        if body is not None:
            return body
        await asyncio.sleep(0.2)
    raise RuntimeError(f"no answer through Envoy at {url} after {timeout:.0f}s; Envoy's log:\n{envoy.log_tail()}")


async def run_demo(ports: DemoPorts = DemoPorts(), *, check: bool = False) -> int:
    """Run until interrupted (or, with `check`, send a few requests through Envoy and return)."""
    backends = [SampleBackend("api-1"), SampleBackend("api-2")]
    cache = SnapshotCache()
    server = XdsServer(cache, address=f"127.0.0.1:{ports.xds}")
    await server.start()
    cache.set_snapshot(NODE_CLUSTER, demo_snapshot(ports.listener, backends))
    workdir = Path(tempfile.mkdtemp(prefix="controlplane-demo-"))
    envoy = EnvoyProcess(workdir, xds_port=ports.xds, admin_port=ports.admin, node_cluster=NODE_CLUSTER,
                         node_id="demo-envoy")  # on the main thread: Envoy dies with the thread that starts it
    url = f"http://127.0.0.1:{ports.listener}/"
    try:
        await _first_success(url, envoy)
        if check:
            answers = Counter([await asyncio.to_thread(_get, url) for _ in range(20)])
            print(f"20 requests through Envoy at {url}: {dict(sorted(answers.items(), key=str))}")
            return 0 if set(answers) == {"api-1", "api-2"} else 1
        print(f"""
Control plane (xDS) on 127.0.0.1:{ports.xds}; Envoy is serving its configuration. Try:

    curl {url}                       # answered by api-1 or api-2, through Envoy
    curl http://127.0.0.1:{ports.admin}/config_dump   # what the control plane told Envoy

Envoy's log: {envoy.log_path}. Press Ctrl-C to stop.""", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        envoy.stop()
        with contextlib.suppress(Exception):
            await server.stop(0.5)
        for backend in backends:
            backend.close()
