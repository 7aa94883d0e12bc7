"""A real kube-apiserver (v1.36) with etcd for tests, in the spirit of controller-runtime's envtest.

Why: the in-repo tests/kube_api_server.py models no schema or CEL validation, no RBAC and no
watch cache; a real API server showed ten defects it never could. This module starts the real one.

How to use (fixtures registered in tests/conftest.py):

    def test_something(real_kube, kube_namespace):
        real_kube.apply(gateway_dict)                     # as admin; namespace defaults to kube_namespace
        api_client = real_kube.api_client("controlplane")  # the ServiceAccount of k8s/controlplane/rbac.yaml
        kubeconfig = real_kube.kubeconfig("controlplane")  # a file for `controlplane serve --kubeconfig`
        with pytest.raises(KubeError) as refused:          # the API server's 4xx, its message in .message
            real_kube.create(bad_backend)
        real_kube.stop_apiserver(); real_kube.start_apiserver()   # etcd and its data stay
        real_kube.force_gone()                            # etcd compacted + API server restarted: 410 Gone

- `real_kube` (session): one etcd + API server on 127.0.0.1, free ports, data in a temp dir, RBAC on,
  our CRDs (k8s/crds/) Established, k8s/controlplane/namespace.yaml and rbac.yaml applied as shipped,
  and the RBAC warm-up (403 for about a second after start) waited out. Startup takes ~3-5 s.
- `kube_namespace` (function): a fresh namespace with a unique name; on teardown every Gateway,
  Backend, Service, EndpointSlice, Secret and ConfigMap in it is deleted (no controller-manager runs,
  so nothing else would), and the Leases, Secrets and ConfigMaps the control plane wrote in its own
  namespace (controlplane-system) are deleted, so a test never sees a previous test's leader or memory.
- Users: "admin" (system:masters) and "controlplane" (system:serviceaccount:controlplane-system:
  controlplane with the ServiceAccount groups), and "certs" (the ServiceAccount controlplane-certs of
  k8s/controlplane/certs-job.yaml, whose RBAC its test applies): least privilege is tested as shipped.
- Writes use fieldValidation=Strict, as kubectl does: an unknown field is a 400, not pruned
  (pass `field_validation="Ignore"` for what `kubectl apply --validate=false` does).
- The binary comes from env KUBE_APISERVER, else ../shared/kube-apiserver/kube-apiserver from the repo
  root; etcd from env ETCD, else `etcd` on PATH. Where one is missing the tests skip, naming it,
  unless REQUIRE_KUBE_APISERVER=1 (CI), where they fail.
- EndpointSlices may not point at loopback; tests that send traffic to endpoints need a network
  namespace with TEST-NET addresses (see ../shared/kube-apiserver/README.md).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client as k8s

from tests.certs import issue

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "k8s" / "crds"
CONTROLPLANE_MANIFESTS = (REPO / "k8s" / "controlplane" / "namespace.yaml", REPO / "k8s" / "controlplane" / "rbac.yaml")
STARTUP_SECONDS = 60
# Kinds a test namespace is emptied of on teardown, and those the control plane writes in its own.
TEST_KINDS = (("xds.controlplane.dev/v1alpha1", "Gateway"), ("xds.controlplane.dev/v1alpha1", "Backend"),
              ("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice"), ("v1", "Secret"), ("v1", "ConfigMap"))
CONTROLPLANE_KINDS = (("coordination.k8s.io/v1", "Lease"), ("v1", "Secret"), ("v1", "ConfigMap"))


class KubeError(Exception):
    """An HTTP error from the API server: `status` (e.g. 422) and the Status object's `message`."""

    def __init__(self, status: int, body: bytes):
        try:
            self.status_object = json.loads(body)
        except ValueError:
            self.status_object = {}
        self.status = status
        self.message = self.status_object.get("message") or body.decode(errors="replace")
        self.reason = self.status_object.get("reason", "")
        super().__init__(f"HTTP {status} {self.reason}: {self.message}")


def binaries() -> tuple[Path | None, Path | None, str]:
    """(kube-apiserver, etcd, why not): the paths where both exist, else a reason naming what is missing."""
    apiserver = Path(os.environ.get("KUBE_APISERVER") or REPO.parent / "shared" / "kube-apiserver" / "kube-apiserver")
    etcd_name = os.environ.get("ETCD") or "etcd"
    etcd = shutil.which(etcd_name)
    missing = []
    if not (apiserver.is_file() and os.access(apiserver, os.X_OK)):
        missing.append(f"kube-apiserver not found at {apiserver} (set KUBE_APISERVER)")
    if etcd is None:
        missing.append(f"etcd not found ({etcd_name!r} on PATH; apt-get install etcd-server, or set ETCD)")
    return apiserver, Path(etcd) if etcd else None, "; ".join(missing)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(what: str, ready, *, seconds: float, process: subprocess.Popen | None = None, log: Path | None = None):
    """Polls `ready()` (true, or raises) until it is true; bounded in time; a dead process ends it at once."""
    deadline = time.monotonic() + seconds
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{what}: the process exited with {process.returncode}\n{tail}")
        try:
            if ready():
                return
        except Exception as error:  # noqa: BLE001 - any failure is "not ready yet" until the deadline
            last_error = error
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not ready after {seconds:g} s (last error: {last_error})")


class RealKube:
    """etcd + kube-apiserver on 127.0.0.1, and small helpers to read and write objects as admin."""

    def __init__(self, apiserver: Path, etcd: Path, workdir: Path):
        self.apiserver_binary, self.etcd_binary, self.workdir = apiserver, etcd, workdir
        self.etcd_port, self.etcd_peer_port, self.port = free_port(), free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.url = f"https://127.0.0.1:{self.port}"
        self.etcd_process: subprocess.Popen | None = None
        self.apiserver_process: subprocess.Popen | None = None
        self._plurals: dict[tuple[str, str], tuple[str, bool]] = {}
        self._clients: dict[str, k8s.ApiClient] = {}
        self._provisioned = False  # CRDs and RBAC applied: a later start waits out RBAC's warm-up again
        self.controlplane_namespace, self.controlplane_account = _service_account(CONTROLPLANE_MANIFESTS[1])
        self.tokens = {"admin": uuid.uuid4().hex, "controlplane": uuid.uuid4().hex, "certs": uuid.uuid4().hex}
        self.users = {"admin": "admin",
                      "controlplane": f"system:serviceaccount:{self.controlplane_namespace}:{self.controlplane_account}",
                      # the Job of k8s/controlplane/certs-job.yaml (its RBAC is applied by the tests that use it)
                      "certs": f"system:serviceaccount:{self.controlplane_namespace}:controlplane-certs"}
        self._write_credentials()

    # ---- lifecycle

    def start(self) -> None:
        self.start_etcd()
        self.start_apiserver()
        for path in sorted(CRDS.glob("*.yaml")):
            self.apply(yaml.safe_load(path.read_text()))
        for path in sorted(CRDS.glob("*.yaml")):
            self.wait_established(yaml.safe_load(path.read_text())["metadata"]["name"])
        for path in CONTROLPLANE_MANIFESTS:
            for document in yaml.safe_load_all(path.read_text()):
                if document:
                    self.apply(document)
        self.wait_rbac()
        self._provisioned = True

    def start_etcd(self) -> None:
        data = self.workdir / "etcd-data"
        log = self.workdir / "etcd.log"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self.etcd_process = subprocess.Popen(
            [str(self.etcd_binary), "--name", "test", "--data-dir", str(data),
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"test={peer}",
             "--log-level", "warn"], stdout=log.open("ab"), stderr=subprocess.STDOUT)
        _wait("etcd", lambda: self._etcd("/health").get("health") == "true", seconds=STARTUP_SECONDS,
              process=self.etcd_process, log=log)

    def start_apiserver(self) -> None:
        """Starts (or starts again, on the same port) the API server; returns once /readyz says ok and RBAC answers."""
        log = self.workdir / "kube-apiserver.log"
        directory = self.workdir
        self.apiserver_process = subprocess.Popen(
            [str(self.apiserver_binary), f"--etcd-servers={self.etcd_url}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
             f"--tls-cert-file={directory / 'serving.crt'}", f"--tls-private-key-file={directory / 'serving.key'}",
             f"--client-ca-file={directory / 'ca.crt'}", f"--token-auth-file={directory / 'tokens.csv'}",
             "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
             f"--service-account-key-file={directory / 'sa.key'}",
             f"--service-account-signing-key-file={directory / 'sa.key'}",
             "--api-audiences=https://kubernetes.default.svc", "--service-cluster-ip-range=10.96.0.0/16",
             "--endpoint-reconciler-type=none", f"--cert-dir={directory / 'cert-dir'}", "--v=1"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT)
        _wait("kube-apiserver /readyz", lambda: self._readyz(), seconds=STARTUP_SECONDS,
              process=self.apiserver_process, log=log)
        self._close_clients()
        if self._provisioned:
            self.wait_rbac()

    def stop_apiserver(self) -> None:
        """Stops the API server (SIGTERM, then SIGKILL after 10 s); etcd and every object stay."""
        _stop(self.apiserver_process)
        self.apiserver_process = None

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def close(self) -> None:
        self._close_clients()
        self.stop_apiserver()
        _stop(self.etcd_process)
        self.etcd_process = None

    def _close_clients(self) -> None:
        for api_client in self._clients.values():
            api_client.close()
        self._clients.clear()

    def wait_established(self, crd_name: str, *, seconds: float = 30) -> None:
        def established() -> bool:
            crd = self.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", crd_name)
            return any(c["type"] == "Established" and c["status"] == "True"
                       for c in crd.get("status", {}).get("conditions", []))
        _wait(f"CRD {crd_name} Established", established, seconds=seconds)

    def wait_rbac(self, *, seconds: float = 30) -> None:
        """The ServiceAccount may list Gateways cluster-wide: RBAC's cache has warmed up (~1 s of 403 before)."""
        _wait("RBAC for the controlplane ServiceAccount",
              lambda: self.request("GET", "/apis/xds.controlplane.dev/v1alpha1/gateways", user="controlplane",
                                   query={"limit": "1"}) is not None, seconds=seconds)

    # ---- credentials

    def _write_credentials(self) -> None:
        ca = issue("test-kube-ca", ca=True)
        serving = issue("kube-apiserver", issuer=ca, dns_names=("localhost", "kubernetes", "kubernetes.default.svc"))
        (self.workdir / "ca.crt").write_bytes(ca.cert_pem)
        (self.workdir / "serving.crt").write_bytes(serving.cert_pem)
        (self.workdir / "serving.key").write_bytes(serving.key_pem)
        (self.workdir / "sa.key").write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
        account_groups = f"system:serviceaccounts,system:serviceaccounts:{self.controlplane_namespace}"
        (self.workdir / "tokens.csv").write_text(
            f'{self.tokens["admin"]},admin,admin-uid,"system:masters"\n'
            f'{self.tokens["controlplane"]},{self.users["controlplane"]},controlplane-uid,"{account_groups}"\n'
            f'{self.tokens["certs"]},{self.users["certs"]},certs-uid,"{account_groups}"\n')
        for user in self.tokens:
            (self.workdir / f"kubeconfig-{user}.yaml").write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": user,
                "clusters": [{"name": "real-kube", "cluster": {
                    "server": self.url, "certificate-authority": str(self.workdir / "ca.crt")}}],
                "users": [{"name": user, "user": {"token": self.tokens[user]}}],
                "contexts": [{"name": user, "context": {"cluster": "real-kube", "user": user}}]}))

    def kubeconfig(self, user: str = "controlplane") -> Path:
        """A kubeconfig file for `user` ("admin" or "controlplane")."""
        return self.workdir / f"kubeconfig-{user}.yaml"

    def configuration(self, user: str = "controlplane") -> k8s.Configuration:
        configuration = k8s.Configuration(host=self.url, api_key={"authorization": self.tokens[user]},
                                          api_key_prefix={"authorization": "Bearer"})
        configuration.ssl_ca_cert = str(self.workdir / "ca.crt")
        return configuration

    def api_client(self, user: str = "controlplane") -> k8s.ApiClient:
        """A new `kubernetes.client.ApiClient` for `user`; the caller closes it."""
        return k8s.ApiClient(self.configuration(user))

    # ---- requests

    def request(self, method: str, path: str, *, user: str = "admin", query: dict[str, str] | None = None,
                body: Any = None, content_type: str = "application/json", accept: str = "application/json",
                timeout: float = 30) -> dict[str, Any]:
        """One request; the decoded JSON answer, or KubeError for 4xx/5xx. `accept` may ask for a
        Table (what kubectl get prints): application/json;as=Table;v=v1;g=meta.k8s.io."""
        api_client = self._clients.get(user) or self._clients.setdefault(user, self.api_client(user))
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, post = api_client.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        response = api_client.call_api(method, url, headers, body, post, _request_timeout=(5, timeout))
        data = response.read()
        if response.status >= 400:
            raise KubeError(response.status, data)
        return json.loads(data or b"{}")

    def path(self, api_version: str, kind: str, name: str | None = None, *, namespace: str | None = None,
             subresource: str | None = None) -> str:
        """The REST path of a kind (found through discovery once), e.g. Backend -> .../backends/NAME."""
        plural, namespaced = self._resource(api_version, kind)
        base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        if namespaced and namespace:
            base += f"/namespaces/{namespace}"
        return base + f"/{plural}" + "".join(f"/{part}" for part in (name, subresource) if part)

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        key = (api_version, kind)
        if key not in self._plurals:
            prefix = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
            for resource in self.request("GET", prefix)["resources"]:
                if "/" not in resource["name"]:
                    self._plurals[(api_version, resource["kind"])] = (resource["name"], resource["namespaced"])
        if key not in self._plurals:
            raise KeyError(f"the API server serves no {kind} in {api_version}")
        return self._plurals[key]

    def _target(self, manifest: dict, namespace: str | None) -> tuple[str, str, str | None]:
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        metadata = manifest.setdefault("metadata", {})
        if self._resource(api_version, kind)[1]:
            metadata["namespace"] = metadata.get("namespace") or namespace or "default"
        return api_version, kind, metadata.get("namespace")

    def create(self, manifest: dict, *, namespace: str | None = None, user: str = "admin",
               field_validation: str = "Strict") -> dict:
        api_version, kind, namespace = self._target(manifest, namespace)
        return self.request("POST", self.path(api_version, kind, namespace=namespace), user=user, body=manifest,
                            query={"fieldValidation": field_validation})

    def update(self, manifest: dict, *, namespace: str | None = None, user: str = "admin",
               field_validation: str = "Strict") -> dict:
        """PUT: the whole object, with the current resourceVersion filled in unless the manifest has one."""
        api_version, kind, namespace = self._target(manifest, namespace)
        path = self.path(api_version, kind, manifest["metadata"]["name"], namespace=namespace)
        if not manifest["metadata"].get("resourceVersion"):
            manifest = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion":
                        self.request("GET", path, user=user)["metadata"]["resourceVersion"]}}
        return self.request("PUT", path, user=user, body=manifest, query={"fieldValidation": field_validation})

    def apply(self, manifest: dict, *, namespace: str | None = None, user: str = "admin",
              field_validation: str = "Strict") -> dict:
        """Create, or update what exists (the whole object: not a server-side apply)."""
        try:
            return self.create(manifest, namespace=namespace, user=user, field_validation=field_validation)
        except KubeError as error:
            if error.status != 409:
                raise
        return self.update(manifest, namespace=namespace, user=user, field_validation=field_validation)

    def patch(self, api_version: str, kind: str, name: str, patch: dict, *, namespace: str | None = None,
              user: str = "admin", subresource: str | None = None, patch_type: str = "merge") -> dict:
        return self.request("PATCH", self.path(api_version, kind, name, namespace=namespace, subresource=subresource),
                            user=user, body=patch, content_type=f"application/{patch_type}-patch+json")

    def get(self, api_version: str, kind: str, name: str, *, namespace: str | None = None,
            user: str = "admin") -> dict:
        return self.request("GET", self.path(api_version, kind, name, namespace=namespace), user=user)

    def list(self, api_version: str, kind: str, *, namespace: str | None = None, user: str = "admin") -> list[dict]:
        return self.request("GET", self.path(api_version, kind, namespace=namespace), user=user)["items"]

    def delete(self, api_version: str, kind: str, name: str, *, namespace: str | None = None,
               user: str = "admin", missing_ok: bool = True) -> None:
        try:
            self.request("DELETE", self.path(api_version, kind, name, namespace=namespace), user=user)
        except KubeError as error:
            if not (missing_ok and error.status == 404):
                raise

    def delete_all(self, api_version: str, kind: str, *, namespace: str) -> None:
        self.request("DELETE", self.path(api_version, kind, namespace=namespace))

    # ---- etcd

    def compact(self) -> int:
        """Compacts etcd up to its current revision, so watches from older resourceVersions get 410 Gone.
        Returns the revision compacted to."""
        revision = int(self._etcd("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
        self._etcd("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def force_gone(self) -> int:
        """410 Gone for every watch or list resuming from a resourceVersion older than now: etcd is compacted,
        then the API server restarted (its watch cache otherwise keeps serving a window of recent events
        after a compaction; seen with v1.36). Returns the revision compacted to."""
        revision = self.compact()
        self.restart_apiserver()
        return revision

    def _etcd(self, path: str, body: dict | None = None) -> dict:
        import urllib.request
        request = urllib.request.Request(self.etcd_url + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"{}")

    def _readyz(self) -> bool:
        import ssl
        import urllib.request
        context = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
        request = urllib.request.Request(self.url + "/readyz",
                                         headers={"Authorization": f"Bearer {self.tokens['admin']}"})
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.read() == b"ok"

    # ---- per-test namespaces

    def new_namespace(self) -> str:
        name = f"test-{uuid.uuid4().hex[:10]}"
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        return name

    def clean_namespace(self, namespace: str) -> None:
        """Deletes what a test left (its namespace's objects, the control plane's Leases and memory)."""
        for api_version, kind in TEST_KINDS:
            self.delete_all(api_version, kind, namespace=namespace)
        for api_version, kind in CONTROLPLANE_KINDS:
            self.delete_all(api_version, kind, namespace=self.controlplane_namespace)
        # Without a namespace controller the namespace stays Terminating; its name is never reused.
        self.delete("v1", "Namespace", namespace)


def _service_account(rbac: Path) -> tuple[str, str]:
    for document in yaml.safe_load_all(rbac.read_text()):
        if document and document["kind"] == "ServiceAccount":
            return document["metadata"]["namespace"], document["metadata"]["name"]
    raise ValueError(f"{rbac}: no ServiceAccount")


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def start_real_kube() -> Iterator[RealKube]:
    """The session fixture's body: skips (or fails under REQUIRE_KUBE_APISERVER=1) where a binary is missing."""
    import pytest
    apiserver, etcd, missing = binaries()
    if missing:
        if os.environ.get("REQUIRE_KUBE_APISERVER"):
            pytest.fail(f"a real API server is required here (REQUIRE_KUBE_APISERVER is set): {missing}")
        pytest.skip(missing)
    with tempfile.TemporaryDirectory(prefix="real-kube-") as workdir:
        kube = RealKube(apiserver, etcd, Path(workdir))
        try:
            kube.start()
            yield kube
        finally:
            kube.close()
