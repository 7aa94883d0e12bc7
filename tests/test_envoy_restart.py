"""A control plane restart, as a real `controlplane serve` process and a real Envoy see it.

`serve` is SIGKILLed under steady traffic and started again on the same port. Envoy keeps its
configuration while nobody serves it (no request fails), and reconnects within about a second of
the new `serve` listening, thanks to the bootstrap's ADS retry backoff (Envoy's own default left
it 4-12 s behind), so a change made right after the restart reaches traffic within 2 s.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import eventually, free_port, write
from tests.objects import backend, endpoint_slice, gateway, ready, service

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parent.parent
OUTAGE = 5.0  # seconds from SIGKILL to starting serve again: long enough for Envoy's default backoff to reach 8 s


class Traffic:
    """GETs through Envoy one after another, every 20 ms, until stopped (10,000 or 60 s at most)."""

    def __init__(self, port: int):
        self.port = port
        self.answers: list[tuple[float, str]] = []  # (monotonic time, body or the failure)
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=2) as http:
            while not self._stop.is_set() and len(self.answers) < 10_000 and time.monotonic() < deadline:
                try:
                    response = await http.get(f"http://127.0.0.1:{self.port}/")
                    answer = response.text.strip() if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as error:
                    answer = f"{type(error).__name__}: {error}"
                self.answers.append((time.monotonic(), answer))
                if answer not in ("one", "two"):
                    self.failures.append(answer)
                await asyncio.sleep(0.02)

    def first(self, body: str) -> float | None:
        return next((at for at, answer in self.answers if answer == body), None)

    async def stop(self) -> None:
        self._stop.set()
        await self.task


def serve_command(manifests: Path, xds_port: int, state: Path) -> list[str]:
    return [sys.executable, "-m", "controlplane.cli", "serve", "--source", str(manifests), "--xds-address",
            f"127.0.0.1:{xds_port}", "--metrics-address", "", "--state-file", str(state)]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


async def test_envoy_serves_through_a_restart_and_takes_a_change_soon_after(tmp_path, envoys, backends):
    one, two = backends("one"), backends("two")
    port, xds_port = free_port(), free_port()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(manifests / "gateway.yaml", gateway(port=port))
    write(manifests / "api.yaml", backend("api", routes=[{"pathPrefix": "/"}]), service("api"))
    write(manifests / "slices.yaml", endpoint_slice("api", [ready("127.0.0.1")], port=one.port))
    command = serve_command(manifests, xds_port, tmp_path / "state.json")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        serve = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            envoy = envoys(xds_port, node_cluster="edge")
            await eventually(lambda: _answers(port, "one"), timeout=30, what="traffic through Envoy")
            traffic = Traffic(port)
            await asyncio.sleep(0.5)

            serve.send_signal(signal.SIGKILL)
            serve.wait(10)
            killed = time.monotonic()
            await eventually(lambda: _disconnected(envoy), what="Envoy to notice the control plane is gone")
            await asyncio.sleep(killed + OUTAGE - time.monotonic())  # Envoy's retries back off meanwhile
            serve = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            write(manifests / "slices.yaml", endpoint_slice("api", [ready("127.0.0.1")], port=two.port))
            await eventually(lambda: listening(xds_port), timeout=30, interval=0.01, what="serve to listen again")
            restarted = time.monotonic()
            await eventually(lambda: traffic.first("two"), timeout=10, interval=0.01,
                             what="the change made at the restart to reach traffic")
            await asyncio.sleep(0.5)
            await traffic.stop()
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(20)

    served = traffic.first("two") - restarted
    print(f"\nserve down {restarted - killed:.2f}s (SIGKILL to listening again); the change reached traffic "
          f"{served:.2f}s after serve listened again; {len(traffic.answers)} requests, "
          f"{len(traffic.failures)} failed")
    assert traffic.failures == [], traffic.failures[:5]
    assert len(traffic.answers) > 50
    assert served < 2.0
    output = log_path.read_text()
    assert serve.returncode == 0 and "Traceback" not in output, output
    assert "stopping: 1 Envoy connected" in output, output


async def _answers(port: int, expected: str) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        response = await http.get(f"http://127.0.0.1:{port}/")
    return response.status_code == 200 and response.text.strip() == expected


async def _disconnected(envoy) -> bool:
    return await envoy.stat("control_plane.connected_state") == 0
