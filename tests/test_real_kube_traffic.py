"""Real traffic from a real API server: `controlplane serve` as the shipped ServiceAccount, a real Envoy.

Everything that carries traffic (the backends on TEST-NET addresses, Envoy, the control plane)
runs in a network namespace of the test's own (tests/netns.py), because the API server refuses
EndpointSlices that point at loopback; the API server stays on the host's 127.0.0.1, forwarded in.
Requests go one after another, each on a new connection (a new TLS handshake), from inside the
namespace, and every failure is kept with its reason: "0 failed requests" is counted, not sampled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import os
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.runtime import demo
from controlplane.runtime.envoy_process import stop_process
from controlplane.runtime.sample_backend import SampleBackend
from tests.certs import issue, tls_secret
from tests.harness import Envoy, eventually, free_port
from tests.netns import NetworkNamespace, unavailable
from tests.objects import backend, endpoint_slice, gateway, ready, service

pytestmark = pytest.mark.envoy

CA = issue("test CA", ca=True)
ONE, TWO, THREE = "192.0.2.10", "192.0.2.11", "192.0.2.12"


class SteadyTraffic:
    """GETs one after another from inside the namespace until stopped (at most `limit` seconds)."""

    def __init__(self, netns: NetworkNamespace, port: int, *, tls: ssl.SSLContext | None = None,
                 limit: float = 180):
        self.port, self.tls, self.limit = port, tls, limit
        self.answers: list[tuple[float, str]] = []  # (when, body or certificate serial)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._netns = netns
        self._thread = threading.Thread(target=self._run, name="steady-traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        with self._netns.inside():
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    self.answers.append((time.monotonic(), request(self.port, self.tls)))
                except (OSError, http.client.HTTPException, RuntimeError) as error:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {type(error).__name__}: {error}")
                self._stop.wait(0.02)

    def last(self) -> str | None:
        return self.answers[-1][1] if self.answers else None

    def first_after(self, moment: float, answer: str) -> float | None:
        return next((when for when, got in self.answers if when >= moment and got == answer), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def request(port: int, tls: ssl.SSLContext | None) -> str:
    """One GET / on a new connection: the body (over TLS with a digest of the certificate Envoy presented)."""
    if tls is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=tls)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read().decode().strip()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:100]}")
        if tls is not None:
            body += f" certificate={hashlib.sha256(connection.sock.getpeercert(binary_form=True)).hexdigest()[:12]}"
        return body
    finally:
        connection.close()


@dataclass
class World:
    kube: object
    namespace: str
    netns: NetworkNamespace
    envoy: Envoy
    serve: subprocess.Popen
    log: Path
    port: int  # the Gateway's listener, inside the namespace

    def apply(self, *objects: dict) -> None:
        for obj in objects:
            self.kube.apply(obj, namespace=self.namespace)

    def backend_at(self, name: str, address: str) -> SampleBackend:
        with self.netns.inside():
            return SampleBackend(name, host=address)

    def serve_log(self) -> str:
        return self.log.read_text(errors="replace")

    async def answer(self, tls: ssl.SSLContext | None = None) -> str | None:
        """One request from inside the namespace (on a worker thread): its answer, None if it failed."""
        def probe() -> str | None:
            with self.netns.inside():
                try:
                    return request(self.port, tls)
                except (OSError, http.client.HTTPException, RuntimeError):
                    return None
        return await asyncio.to_thread(probe)


def async_equals(probe, expected):
    async def check() -> bool:
        return await probe() == expected
    return check


@pytest.fixture
def netns():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    namespace = NetworkNamespace()
    yield namespace
    namespace.close()


@pytest.fixture
async def world(real_kube, kube_namespace, netns, tmp_path, request):
    """`controlplane serve` (the ServiceAccount of k8s/controlplane/rbac.yaml) and an Envoy, in `netns`."""
    netns.reach_host(real_kube.port)
    xds_port = free_port()
    log = tmp_path / "serve.log"
    xds_tls, envoy_tls = demo.mutual_tls(tmp_path, "edge")  # as k8s/ ships it: keys travel over mutual TLS only
    with log.open("wb") as output:
        serve = netns.popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--source", "kubernetes",
             "--kubeconfig", str(real_kube.kubeconfig("controlplane")), "--namespace", kube_namespace,
             "--xds-address", f"127.0.0.1:{xds_port}", "--metrics-address", f"127.0.0.1:{free_port()}",
             "--xds-tls-cert", str(xds_tls.certificate), "--xds-tls-key", str(xds_tls.private_key),
             "--xds-client-ca", str(xds_tls.client_ca)],
            env={**os.environ, "POD_NAMESPACE": real_kube.controlplane_namespace},
            stdout=output, stderr=subprocess.STDOUT)
    with netns.inside():
        envoy = Envoy(tmp_path, xds_port=xds_port, node_cluster="edge", delta=False, xds_tls=envoy_tls)
    netns.reach_inside(envoy.admin_port)
    yield World(real_kube, kube_namespace, netns, envoy, serve, log, free_port())
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        print(f"\n----- serve log -----\n{log.read_text(errors='replace')[-5000:]}")
        print(f"\n----- Envoy log -----\n{envoy.log_tail()}")
    await envoy.close()
    stop_process(serve)


def plain_app(world: World, *addresses_and_backends: tuple[str, SampleBackend]) -> list[dict]:
    """Gateway `edge` (HTTP on the world's port), Service and Backend `api` routing /, the slice's endpoints."""
    return [gateway(port=world.port, namespace=world.namespace), service("api", namespace=world.namespace),
            slice_of(world, *addresses_and_backends), backend("api", routes=[{"pathPrefix": "/"}],
                                                              namespace=world.namespace)]


def slice_of(world: World, *endpoints: tuple[str, SampleBackend]) -> dict:
    ports = {b.port for _address, b in endpoints}
    assert len(ports) == 1, "a slice has one port: start the backends on the same port"
    return endpoint_slice("api", [ready(address) for address, _b in endpoints], port=ports.pop(),
                          namespace=world.namespace)


@contextlib.contextmanager
def backends_on_one_port(world: World, *names_and_addresses: tuple[str, str]):
    first = world.backend_at(*names_and_addresses[0])
    started = [first]
    with world.netns.inside():
        started += [SampleBackend(name, host=address, port=first.port) for name, address in names_and_addresses[1:]]
    try:
        yield started
    finally:
        for started_backend in started:
            started_backend.close()


async def test_endpoint_slice_changes_reach_traffic_with_no_failed_request(world):
    with backends_on_one_port(world, ("one", ONE), ("two", TWO)) as (one, two):
        world.apply(*plain_app(world, (ONE, one)))
        await eventually(async_equals(world.answer, "one"), timeout=30, what="the Backend's first traffic")
        traffic = SteadyTraffic(world.netns, world.port)
        try:
            world.apply(slice_of(world, (ONE, one), (TWO, two)))
            await eventually(lambda: traffic.last() == "two", what="a second endpoint in the slice")
            world.apply(slice_of(world, (TWO, two)))
            await eventually(lambda: [got for _when, got in traffic.answers[-20:]] == ["two"] * 20,
                             what="the first endpoint leaving the slice")
        finally:
            traffic.stop()
    assert traffic.failures == [] and len(traffic.answers) > 20


async def test_a_good_secret_rotation_rolls_out_and_a_bad_one_is_kept_out(world, tmp_path):
    first, renewed, unrelated = issue("localhost", issuer=CA), issue("localhost", issuer=CA), issue("other")
    https = [{"name": "https", "port": world.port, "address": "127.0.0.1", "protocol": "HTTPS",
              "tls": {"certificateSecret": "edge-cert"}}]
    (tmp_path / "ca.pem").write_bytes(CA.cert_pem)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client.check_hostname = False  # the chain is verified; the test connects to an address, not a name
    ns = world.namespace
    with backends_on_one_port(world, ("one", ONE)) as (one,):
        world.apply(tls_secret("edge-cert", first.cert_pem, first.key_pem, namespace=ns),
                    gateway(listeners=https, namespace=ns), service("api", namespace=ns), slice_of(world, (ONE, one)),
                    backend("api", routes=[{"pathPrefix": "/"}], namespace=ns))
        served_first = await eventually(lambda: world.answer(client), timeout=30, what="HTTPS traffic")
        traffic = SteadyTraffic(world.netns, world.port, tls=client)
        try:
            world.apply(tls_secret("edge-cert", renewed.cert_pem, renewed.key_pem, namespace=ns))
            await eventually(lambda: traffic.last() not in (None, served_first), what="the renewed certificate")
            served_renewed = traffic.last()

            world.apply(tls_secret("edge-cert", renewed.cert_pem, unrelated.key_pem, namespace=ns))  # a wrong key
            await eventually(lambda: "tls.key does not match" in condition(world, "Gateway", "edge", "ResolvedRefs"),
                             timeout=20, what="the bad rotation named on the Gateway")
            settled = time.monotonic()
            await eventually(lambda: traffic.answers[-1][0] > settled + 1, what="traffic after the bad rotation")
        finally:
            traffic.stop()
    assert traffic.failures == []
    assert {got for when, got in traffic.answers if when >= settled} == {served_renewed}


def condition(world: World, kind: str, name: str, kind_of_condition: str) -> str:
    status = world.kube.get("xds.controlplane.dev/v1alpha1", kind, name, namespace=world.namespace).get("status", {})
    found = [c for c in status.get("conditions", []) if c["type"] == kind_of_condition]
    return f"{found[0]['status']} {found[0].get('reason')}: {found[0].get('message')}" if found else ""


async def test_api_server_away_for_30s_under_traffic_then_caught_up_within_2s(world):
    with backends_on_one_port(world, ("one", ONE), ("two", TWO)) as (one, two):
        world.apply(*plain_app(world, (ONE, one)))
        await eventually(async_equals(world.answer, "one"), timeout=30, what="the Backend's first traffic")
        traffic = SteadyTraffic(world.netns, world.port)
        try:
            world.kube.stop_apiserver()
            away = time.monotonic()
            while time.monotonic() - away < 30:  # Envoy keeps serving what it has
                await eventually(lambda: traffic.answers and traffic.answers[-1][0] > time.monotonic() - 1,
                                 what="steady traffic while the API server is away")
                await asyncio.sleep(1)
            restarted = time.monotonic()
            world.kube.start_apiserver()  # returns once /readyz says ok and RBAC answers
            back = time.monotonic()
            world.apply(slice_of(world, (TWO, two)))
            await eventually(lambda: traffic.first_after(back, "two"), timeout=5,
                             what="a change made once the API server is back")
            catch_up = traffic.first_after(back, "two") - back
        finally:
            traffic.stop()
    log = world.serve_log()
    print(f"\ncatch-up after a 30 s API-server outage: {catch_up:.2f} s from its return (ready, {back - restarted:.1f} s "
          f"after its start) to a change made then serving; {len(traffic.answers)} requests, "
          f"{len(traffic.failures)} failed; the control plane logged:\n" +
          "\n".join(line for line in log.splitlines() if "Kubernetes API server" in line))
    assert traffic.failures == []
    assert log.count("Kubernetes API server not answering") == 1 and log.count("answering again after") == 1, log
    assert "Retrying" not in log and "Traceback" not in log


async def test_410_gone_after_an_etcd_compaction_relists_with_no_live_endpoint_removed(world):
    with backends_on_one_port(world, ("one", ONE), ("two", TWO), ("three", THREE)) as (one, two, three):
        world.apply(*plain_app(world, (ONE, one), (TWO, two)))
        await eventually(async_equals(world.answer, "two"), timeout=30, what="the Backend's first traffic")
        traffic = SteadyTraffic(world.netns, world.port)
        try:
            for index in range(5):  # the cluster moves on past what the control plane last saw
                world.kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"unwatched-{index}"},
                                  "data": {"index": str(index)}}, namespace=world.namespace)
            world.kube.stop_apiserver()
            world.kube.compact()
            world.kube.start_apiserver()
            await eventually(lambda: "(410 Gone); listing again" in world.serve_log(), timeout=10,
                             what="a relist after 410 Gone")
            world.apply(slice_of(world, (ONE, one), (TWO, two), (THREE, three)))
            await eventually(lambda: traffic.last() == "three", what="watching again after the relist")
        finally:
            traffic.stop()
    assert traffic.failures == []
    assert {"one", "two"} <= {got for _when, got in traffic.answers}
