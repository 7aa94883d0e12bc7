"""`controlplane demo`: the control plane, a real Envoy and sample backends on 127.0.0.1.

It runs the product's own path: the manifests in `examples/demo/` (a Gateway, a Backend, a
Service and its EndpointSlices) are read and watched by the file source, translated, and served
over ADS to a real Envoy. A sample backend answers on every 127.0.0.1 endpoint the manifests
name, so `curl` through Envoy shows which one served the request.

xDS runs over mutual TLS, as in production: the demo makes a CA, the server certificate and the
demo Envoy's client certificate on the spot (runtime/xds_certificates.py), so its HTTPS
listeners get their keys, and the demo stays one command.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from controlplane.model.kube import SERVICE_NAME_LABEL
from controlplane.runtime.debug_views import DebugViews
from controlplane.runtime.envoy_process import EnvoyProcess
from controlplane.runtime.metrics import ControlPlaneCollector, serve_metrics
from controlplane.runtime.pipeline import Pipeline, cancel, feed
from controlplane.runtime import xds_certificates as pki
from controlplane.runtime.sample_backend import SampleBackend, websocket_round_trip
from controlplane.sources.files import DirectorySource
from controlplane.sources.store import StoreView
from controlplane.translate.bootstrap import XdsClientTls
from controlplane.xds import SnapshotCache, XdsServer
from controlplane.xds.server_tls import ServerTls

NODE_CLUSTER = "demo-gateway"


@dataclass(frozen=True)
class DemoPorts:
    xds: int = 18000
    admin: int = 9901
    metrics: int = 9102


class SampleBackends:
    """A sample backend on each 127.0.0.1 endpoint of the manifests' EndpointSlices, kept in step
    with the manifests: an endpoint added while the demo runs gets one too (else Envoy would send
    a request in N to a port nobody listens on)."""

    def __init__(self):
        self.started: dict[int, SampleBackend] = {}

    def ensure(self, view: StoreView) -> None:
        for _key, endpoint_slice in view.of_kind("EndpointSlice"):
            service = (endpoint_slice.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL, "backend")
            for port in endpoint_slice.get("ports") or []:
                number = port.get("port") if isinstance(port, dict) else None
                if not isinstance(number, int) or number in self.started:
                    continue
                if any("127.0.0.1" in (endpoint.get("addresses") or []) for endpoint in
                       endpoint_slice.get("endpoints") or [] if isinstance(endpoint, dict)):
                    try:
                        self.started[number] = SampleBackend(f"{service}-{len(self.started) + 1}", port=number)
                    except OSError as error:
                        print(f"demo: no sample backend on 127.0.0.1:{number} ({error.strerror or error}): requests "
                              "Envoy sends there fail", flush=True)

    @property
    def names(self) -> list[str]:
        return [backend.name for backend in self.started.values()]

    def close(self) -> None:
        for backend in self.started.values():
            backend.close()


async def keep_backends(backends: SampleBackends, source: DirectorySource, every: float = 0.3) -> None:
    while True:
        await asyncio.sleep(every)
        backends.ensure(source.store().view())


def check_ports_free(ports: dict[int, str]) -> None:
    """Raise RuntimeError naming the first port of `ports` (port -> what it is for) in use."""
    for port, what in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise RuntimeError(f"port {port} ({what}) is in use on 127.0.0.1: is another demo (or a "
                                   "`controlplane serve`) running? Stop it, or give the demo other ports "
                                   "(--xds-port, --admin-port, --metrics-port; the others are in the manifests)") from None


def _listener_url(view: StoreView) -> str:
    for _key, gateway in view.of_kind("Gateway"):
        spec = gateway.get("spec") or {}
        if spec.get("nodeCluster") == NODE_CLUSTER and spec.get("listeners"):
            listener = spec["listeners"][0]
            return f"http://{listener.get('address', '127.0.0.1')}:{listener['port']}/"
    raise RuntimeError(f"the demo manifests have no Gateway with nodeCluster {NODE_CLUSTER!r}")


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


def mutual_tls(workdir: Path, node_group: str = NODE_CLUSTER) -> tuple[ServerTls, XdsClientTls]:
    """Certificates for xDS on 127.0.0.1, in `workdir`: the server's, and an Envoy's for `node_group`."""
    ca = pki.new_ca("controlplane demo CA")
    server = pki.server_certificate(ca, ["127.0.0.1", "localhost"])
    envoy = pki.client_certificate(ca, node_group)
    files = {"ca.crt": ca.cert, "server.crt": server.cert, "server.key": server.key,
             "envoy.crt": envoy.cert, "envoy.key": envoy.key}
    for name, pem in files.items():
        (workdir / name).write_bytes(pem)
        (workdir / name).chmod(0o600)
    return (ServerTls(workdir / "server.crt", workdir / "server.key", client_ca=workdir / "ca.crt"),
            XdsClientTls(str(workdir / "ca.crt"), str(workdir / "envoy.crt"), str(workdir / "envoy.key")))


async def run_demo(manifests: Path, ports: DemoPorts = DemoPorts(), *, check: bool = False) -> int:
    """Run until interrupted (or, with `check`, send a few requests through Envoy and return)."""
    source = DirectorySource(manifests)
    source.load()
    view = source.store().view()
    url = _listener_url(view)
    listener_port = urlsplit(url).port
    check_ports_free({ports.xds: "xDS", ports.admin: "Envoy's admin", ports.metrics: "metrics and status",
                      listener_port: "the Gateway's listener, in the manifests"})
    backends = SampleBackends()
    workdir = Path(tempfile.mkdtemp(prefix="controlplane-demo-"))
    tasks: list[asyncio.Task] = []
    envoy = server = None
    try:
        backends.ensure(view)
        server_tls, envoy_tls = mutual_tls(workdir)
        cache = SnapshotCache()
        pipeline = Pipeline(cache)
        server = XdsServer(cache, address=f"127.0.0.1:{ports.xds}", tls=server_tls)
        await server.start()
        serve_metrics(f"127.0.0.1:{ports.metrics}", ControlPlaneCollector(cache, lambda: pipeline.last),
                      ready=lambda: pipeline.last is not None, debug=DebugViews(cache, "demo"))
        _coalescer, tasks = feed(source, pipeline)
        tasks.append(asyncio.create_task(keep_backends(backends, source)))
        envoy = EnvoyProcess(workdir, xds_port=ports.xds, admin_port=ports.admin, node_cluster=NODE_CLUSTER,
                             node_id="demo-envoy", xds_tls=envoy_tls)  # on the main thread: Envoy dies with its thread
        await _first_success(url, envoy)
        if check:
            answers = Counter([await asyncio.to_thread(_get, url) for _ in range(20)])
            print(f"20 requests through Envoy at {url}: {dict(sorted(answers.items(), key=str))}")
            listener = urlsplit(url)
            host, port = listener.hostname, listener.port
            echo = await asyncio.to_thread(websocket_round_trip, host, port, "/agents", "hello")
            print(f"a WebSocket through Envoy at ws://{host}:{port}/agents answered {echo!r}")
            return 0 if set(answers) == set(backends.names) and echo.endswith(": hello") else 1
        admin = f"http://127.0.0.1:{ports.admin}"
        print(f"""
Control plane (xDS over mutual TLS) on 127.0.0.1:{ports.xds}, serving the manifests in {manifests}/ to a real Envoy.

    curl {url}                       # answered by {' or '.join(backends.names)}, through Envoy
    .venv/bin/python -m websockets {url.replace('http://', 'ws://', 1)}agents   # a WebSocket echo, its own budget
    .venv/bin/controlplane status --server http://127.0.0.1:{ports.metrics}   # the Envoy: in sync with what it was sent?
    curl {admin}/clusters                       # Envoy's clusters, their endpoints and health
    curl '{admin}/stats?filter=circuit_breakers'   # the budgets: remaining_cx, remaining_rq, ...
    curl {admin}/runtime                        # the computed budgets the control plane sent (RTDS)

Edit {manifests}/*.yaml (say, remove an endpoint, or add one: it gets a sample backend) and Envoy
follows within a second. Envoy's log: {envoy.log_path}. Press Ctrl-C to stop.""", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        if envoy is not None:
            envoy.stop()
        await cancel(tasks)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop(0.5)
        backends.close()
        shutil.rmtree(workdir, ignore_errors=True)  # the demo's keys and Envoy's files: nothing left behind
