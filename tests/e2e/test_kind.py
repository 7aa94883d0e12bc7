"""End to end on a real Kubernetes: kind, the image, the manifests in k8s/, traffic through Envoy.

Runs where Docker (with a running engine), kind and kubectl exist; elsewhere it skips and says
which one is missing. It creates and deletes its own cluster, `controlplane-e2e`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "controlplane-e2e"


def _missing() -> str | None:
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 15 s"
    if info.returncode != 0:
        return "no Docker engine is running (`docker info` failed): kind needs one"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"kind e2e skipped: {MISSING}")


def run(*command: str, timeout: int = 600) -> str:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def cluster():
    run("kind", "create", "cluster", "--name", CLUSTER, "--config", "k8s/kind.yaml", "--wait", "120s")
    try:
        run("docker", "build", "-t", "controlplane:dev", ".")
        run("kind", "load", "docker-image", "controlplane:dev", "--name", CLUSTER)
        for path in ("k8s/crds", "k8s/controlplane/namespace.yaml", "k8s/controlplane", "k8s/gateway",
                     "k8s/examples"):
            run("kubectl", "--context", f"kind-{CLUSTER}", "apply", "-f", path)
        for namespace, deployment in (("controlplane-system", "controlplane"), ("controlplane-system", "envoy-gateway"),
                                      ("shop", "echo")):
            run("kubectl", "--context", f"kind-{CLUSTER}", "-n", namespace, "rollout", "status",
                f"deployment/{deployment}", "--timeout=300s")
        yield f"kind-{CLUSTER}"
    finally:
        subprocess.run(["kind", "delete", "cluster", "--name", CLUSTER], capture_output=True, timeout=300)


def test_traffic_and_status_on_kind(cluster):
    deadline = time.monotonic() + 120
    body = None
    while time.monotonic() < deadline and body is None:
        try:
            with urllib.request.urlopen("http://127.0.0.1:30080/", timeout=5) as response:
                body = response.read().decode()
        except OSError:
            time.sleep(2)
    assert body is not None and "hello from echo" in body
    programmed = run("kubectl", "--context", cluster, "-n", "shop", "get", "backend", "echo", "-o",
                     "jsonpath={.status.conditions[?(@.type=='Programmed')].status}")
    assert programmed == "True"
