"""Fixtures: an xDS server on a free port, and real Envoys bootstrapped to it."""

from __future__ import annotations

import pytest

from controlplane.runtime.pipeline import Pipeline, cancel, feed
from controlplane.runtime.sample_backend import SampleBackend
from controlplane.sources.files import DirectorySource
from controlplane.xds import SnapshotCache, XdsServer
from tests.harness import Envoy
from tests.kube_api_server import KubeAPIServer


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.expected.yaml")
    parser.addoption("--hostile-full", action="store_true",
                     help="tests/test_hostile_input.py: run the full generated set of hostile manifests, not the sample")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


@pytest.fixture
async def xds():
    cache = SnapshotCache()
    # Plaintext on 127.0.0.1 for tests of TLS listeners: a lab, so keys may travel (tests/test_xds_identity.py
    # tests the secure default).
    server = XdsServer(cache, address="127.0.0.1:0", insecure_private_keys_over_plaintext=True)
    await server.start()
    yield cache, server
    await server.stop(0)


@pytest.fixture
def backends():
    started: list[SampleBackend] = []

    def start(name: str, **options) -> SampleBackend:
        backend = SampleBackend(name, **options)
        started.append(backend)
        return backend
    yield start
    for backend in started:
        backend.close()


@pytest.fixture
async def envoys(request, tmp_path):
    """Start real Envoys with `await envoys(xds_port, node_cluster=..., delta=...)`; logs shown on failure."""
    started: list[Envoy] = []

    def start(xds_port: int, *, node_cluster: str = "gateway", delta: bool = False, node_id: str = "envoy-1",
              stats_port: int | None = None) -> Envoy:
        envoy = Envoy(tmp_path, xds_port=xds_port, node_cluster=node_cluster, delta=delta, node_id=node_id,
                      stats_port=stats_port)
        started.append(envoy)
        return envoy
    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for envoy in started:
        if failed:
            print(f"\n----- Envoy log ({envoy.log_path.name}) -----\n{envoy.log_tail()}")
        await envoy.close()


@pytest.fixture
def api():
    """The Kubernetes API test server on 127.0.0.1 (bookmarks every 0.2 s)."""
    server = KubeAPIServer(bookmark_interval=0.2)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def served(xds, tmp_path):
    """The file source and pipeline feeding the xDS server, as `controlplane serve` wires them."""
    cache, server = xds
    (tmp_path / "manifests").mkdir()
    source = DirectorySource(tmp_path / "manifests", interval=0.05)
    pipeline = Pipeline(cache)
    _coalescer, tasks = feed(source, pipeline)
    yield source, pipeline, server
    await cancel(tasks)


@pytest.fixture(scope="session")
def real_kube():
    """A real kube-apiserver + etcd with our CRDs and RBAC (tests/real_kube.py says how to use it)."""
    from tests.real_kube import start_real_kube
    yield from start_real_kube()


@pytest.fixture
def kube_namespace(real_kube):
    """A fresh namespace on `real_kube`, emptied on teardown with the control plane's Leases and memory."""
    namespace = real_kube.new_namespace()
    yield namespace
    real_kube.clean_namespace(namespace)
