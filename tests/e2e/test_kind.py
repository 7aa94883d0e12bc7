"""End to end on a real Kubernetes: the README's kind quickstart, as written, then traffic and status.

The steps are not copied here: the fixture runs the README's quickstart block (after the
`<!-- quickstart` marker) line by line, so the README cannot drift from what works. Runs where
Docker (with a running engine), kind and kubectl exist; elsewhere it skips and says which one is
missing. It creates and deletes its own cluster, `controlplane-e2e` (KIND_CLUSTER_NAME), with a
kubeconfig of its own (KUBECONFIG), so a developer's clusters and contexts are left alone.
"""

from __future__ import annotations

import os
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
needs_kind = pytest.mark.skipif(MISSING is not None, reason=f"kind e2e skipped: {MISSING}")


def quickstart() -> list[str]:
    """The commands of the README's kind quickstart, in order."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- quickstart", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_quickstart_is_the_whole_way_from_nothing():
    steps = quickstart()
    assert steps[0].startswith("kind create cluster") and "make image" in steps
    assert any(step.startswith("kind load docker-image") for step in steps)


def run(command: str, env: dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {**os.environ, "KIND_CLUSTER_NAME": CLUSTER,
           "KUBECONFIG": str(tmp_path_factory.mktemp("kind") / "kubeconfig")}
    try:
        for step in quickstart():
            run(step, env)
        yield env
    finally:
        subprocess.run(["kind", "delete", "cluster"], capture_output=True, timeout=300, env=env)


@needs_kind
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
    header, *rows = run("kubectl get backends -A", cluster).splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "ACCEPTED", "PROGRAMMED", "REASON", "AGE"]
    [echo] = [row.split() for row in rows if row.split()[:2] == ["shop", "echo"]]
    assert echo[2:4] == ["True", "True"], rows
