"""The last accepted state survives a restart: a new Translator given what the old one remembered
serves what the old one served, through a bad edit and a bad Secret rotation."""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import sys

import pytest

from controlplane.runtime.memory import FileMemory, MemoryWriter, SecretMemory
from controlplane.sources.kube_api import KubeApi
from controlplane.sources.store import ObjectKey, Store
from controlplane.ir import types as ir
from controlplane.translate import to_ir, to_xds
from controlplane.xds import ENDPOINT
from tests.certs import issue, tls_secret
from tests.harness import eventually, free_port, write
from tests.objects import NS, app, backend, endpoint_slice, gateway, ready, service
from tests.test_envoy_xds import body_of

HTTPS = [{"name": "https", "port": 8443, "address": "127.0.0.1", "protocol": "HTTPS",
          "tls": {"certificateSecret": "edge-cert"}}]


def served(translation: to_ir.Translation):
    group = translation.groups["edge"]
    return [(listener.name, listener.tls, [(r.path_prefix, r.backend) for r in listener.routes])
            for listener in group.listeners], [(b.name, b.endpoints) for b in group.backends]


def test_a_restart_during_a_bad_edit_and_a_bad_rotation_serves_what_was_served(tmp_path):
    issued = issue("edge.example")
    good_secret = tls_secret("edge-cert", issued.cert_pem, issued.key_pem)
    api, *rest = app("api")
    before = [gateway(listeners=HTTPS), good_secret, api, *rest]
    first = to_ir.Translator()
    served_before = served(first.translate(Store(before).view()))

    bad_api = {**api, "metadata": {**api["metadata"], "generation": 2}, "spec": {**api["spec"], "bogus": 1}}
    bad_secret = {**good_secret, "data": {**good_secret["data"], "tls.key": good_secret["data"]["tls.crt"]}}
    during = [gateway(listeners=HTTPS), bad_secret, bad_api, *rest]
    assert served(first.translate(Store(during).view())) == served_before

    memory = FileMemory(tmp_path / "state" / "last-accepted.json")
    memory.save(first.remembered_json())
    assert stat.S_IMODE((tmp_path / "state" / "last-accepted.json").stat().st_mode) == 0o600  # private keys

    restarted = to_ir.Translator()
    assert restarted.restore(memory.load()) == []
    translation = restarted.translate(Store(during).view())
    assert served(translation) == served_before
    assert translation.serving_last_accepted == {ObjectKey("Backend", NS, "api"): 1}

    fresh = to_ir.Translator()  # what a restart without the memory would do: the Gateway and Backend gone
    assert "edge" not in fresh.translate(Store(during).view()).groups


@pytest.mark.parametrize("damaged", [["x" * 70, 8080, False], ["10.0.0.1", 0, False], ["10.0.0.1", "8080", False],
                                     ["10.0.0.1", 8080, "yes"], ["10.0.0.1"], "10.0.0.1:8080"])
def test_damaged_remembered_endpoints_are_not_restored_and_the_rest_is(damaged):
    """A saved state is a file or a Secret anyone with access may edit: an endpoint in it that is
    not an IP address and a port would be refused by Envoy with the node group's other endpoints.
    That object's last version is not taken (one line says why); the others' are."""
    api, web = app("api", "10.0.0.1"), app("web", "10.0.0.2")
    translator = to_ir.Translator()
    translator.translate(Store([gateway(), *api, *web]).view())
    state = translator.remembered()
    for item in state["objects"]:
        item["endpoints"] = [damaged] if item["name"] == "api" else item["endpoints"]

    restarted = to_ir.Translator()
    skipped = restarted.restore(state)
    assert len(skipped) == 1 and skipped[0].startswith(f"Backend {NS}/api: its remembered endpoints: ")
    without_services = [gateway(), api[0], web[0]]  # both Services gone: only what was remembered serves
    group = restarted.translate(Store(without_services).view()).groups["edge"]
    assert [(b.name, b.endpoints) for b in group.backends] == [(f"{NS}/web", (ir.Endpoint("10.0.0.2", 8080),))]
    assert to_xds.SnapshotBuilder().snapshot(group).resources(ENDPOINT).resources.keys() == {f"{NS}/web"}


def test_a_damaged_state_file_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "last-accepted.json"
    path.write_bytes(b"\xff not json")
    assert FileMemory(path).load() is None
    assert "cannot read the last accepted state" in caplog.text


def test_the_state_lives_in_a_secret_every_replica_reads(real_kube, kube_namespace):
    """On a real API server, as the ServiceAccount of k8s/controlplane/rbac.yaml (its Role allows
    exactly this Secret): created, updated, read by another replica."""
    kube = KubeApi(real_kube.api_client("controlplane"))
    memory = SecretMemory(kube, "controlplane-system")
    assert memory.load() is None
    translator = to_ir.Translator()
    translator.translate(Store([gateway(), *app("api")]).view())
    memory.save(translator.remembered_json())
    memory.save(translator.remembered_json())  # an update of the Secret it created
    other_replica = to_ir.Translator()
    assert other_replica.restore(SecretMemory(kube, "controlplane-system").load()) == []
    assert other_replica.remembered() == translator.remembered()
    stored = real_kube.get("v1", "Secret", "controlplane-last-accepted", namespace="controlplane-system")
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "controlplane"}


async def test_the_writer_saves_only_changes_and_only_while_allowed(tmp_path):
    saved = []

    class Recorder:
        def save(self, state):
            saved.append(state)

    changes, leader = [0], [False]
    writer = MemoryWriter(Recorder(), lambda: {"n": changes[0]}, lambda: changes[0], may_write=lambda: leader[0],
                          interval=0.01)
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.05)
    assert saved == []  # not the leader
    leader[0] = True
    await asyncio.sleep(0.05)
    changes[0] = 1
    await asyncio.sleep(0.05)
    task.cancel()
    assert saved == [{"n": 0}, {"n": 1}]


async def test_serve_restarted_during_a_bad_edit_keeps_the_route_envoy_had(tmp_path, envoys, backends):
    """`serve` SIGKILLed while a Backend's edit is refused, and started again: Envoy still gets the
    Backend's last accepted version from the state file (without it, the route would be gone)."""
    api = backends("api")
    port, xds_port = free_port(), free_port()
    manifests, state = tmp_path / "manifests", tmp_path / "state.json"
    manifests.mkdir()
    write(manifests / "gateway.yaml", gateway(port=port))
    good = backend("api", routes=[{"pathPrefix": "/"}])
    others = [service("api"), endpoint_slice("api", [ready("127.0.0.1")], port=api.port)]
    write(manifests / "api.yaml", good, *others)
    command = [sys.executable, "-m", "controlplane.cli", "serve", "--source", str(manifests), "--xds-address",
               f"127.0.0.1:{xds_port}", "--metrics-address", "", "--state-file", str(state)]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        serve = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            envoys(xds_port, node_cluster="edge")
            assert await eventually(lambda: body_of(port), what="first traffic") == "api"
            bad = {**good, "metadata": {**good["metadata"], "generation": 2}, "spec": {**good["spec"], "typo": 1}}
            write(manifests / "api.yaml", bad, *others)
            await eventually(lambda: b"typo" in log_path.read_bytes(), what="the refusal in the log")
            await asyncio.sleep(1.5)  # the state is saved at most once a second
            serve.send_signal(signal.SIGKILL)
            serve.wait()
            assert state.exists()
            serve = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            await eventually(lambda: b"restored the last accepted state" in log_path.read_bytes(),
                             what="the state restored")
            await asyncio.sleep(2)  # Envoy reconnects and converges on what the new serve publishes
            assert await body_of(port) == "api"
        finally:
            serve.terminate()
            serve.wait(10)
