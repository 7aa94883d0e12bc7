"""`controlplane certs`: the certificates of mutual-TLS xDS, as files or as Kubernetes Secrets.

It writes a CA, the control plane's server certificate (for its Service's DNS names) and one
client certificate per node group: the identity the xDS server authorizes (xds/identity.py),
so an Envoy gets its own Gateway's secrets and no other's. Contour's `certgen` is the model:
one command, run again to rotate, as files, as Secret manifests, or straight into the cluster
(the Job in k8s/controlplane/certs-job.yaml).

Running it again rotates the server and client certificates and keeps the CA, so nothing in
flight breaks: the server re-reads its files on the next handshake and still trusts the client
certificates Envoys hold, and Envoys still trust the server. `--new-ca` replaces the CA; the
bundles (`ca.crt`) then list the new CA and the previous one, so the server keeps accepting the
Envoys' current certificates until they restart with their new files.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.runtime import xds_certificates as pki
from controlplane.xds.identity import DEFAULT_TRUST_DOMAIN

CA_SECRET = "controlplane-xds-ca"
SERVER_SECRET = "controlplane-xds-server"
CLIENT_SECRET_PREFIX = "controlplane-xds-client-"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


class CertsError(Exception):
    """Input `certs` cannot work with; the message says what and what to do."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "certs", help="write the CA, server and per-node-group client certificates of mutual-TLS xDS",
        description="Write a CA, the control plane's server certificate and a client certificate per node group "
        "(a Gateway's nodeCluster) for mutual-TLS xDS. Run it again to rotate them; the CA is kept.")
    parser.add_argument("--output", metavar="DIR", type=Path,
                        help="where to write (files, or with --output-format secrets one manifest per Secret)")
    parser.add_argument("--output-format", choices=("files", "secrets"), default="files",
                        help="files: DIR/ca.crt, DIR/server/, DIR/node-groups/<group>/ (tls.crt, tls.key, ca.crt); "
                        "secrets: Kubernetes Secret manifests, to `kubectl apply -f DIR`")
    parser.add_argument("--kubernetes", action="store_true",
                        help="create or update the Secrets in the cluster itself (in-cluster service account, or "
                        "--kubeconfig); what the Job in k8s/controlplane/certs-job.yaml runs")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None, metavar="PATH")
    parser.add_argument("--node-cluster", action="append", default=[], metavar="NAME",
                        help="a node group to issue a client certificate for (repeat it)")
    parser.add_argument("--admin", action="store_true",
                        help="also an admin client certificate (admin/ in --output DIR, files only): it may read "
                             "every Envoy's state over CSDS; keep its key with the people who operate the fleet")
    parser.add_argument("--manifests", type=Path, metavar="DIR",
                        help="also every nodeCluster of the Gateways in this directory of manifests")
    parser.add_argument("--namespace", default="controlplane-system",
                        help="the control plane's namespace: its Service's DNS names, and where the CA and server "
                        "Secrets go (default: controlplane-system)")
    parser.add_argument("--service", default="controlplane", help="the control plane's Service (default: controlplane)")
    parser.add_argument("--server-name", action="append", default=[], metavar="NAME",
                        help="one more DNS name or IP address for the server certificate (repeat it)")
    parser.add_argument("--gateway-namespace", metavar="NAMESPACE",
                        help="where the Envoys run: the namespace of their client Secrets (default: --namespace)")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN,
                        help=f"of the client certificates' URI SANs (default: {DEFAULT_TRUST_DOMAIN})")
    parser.add_argument("--days", type=_days, default=pki.LEAF_DAYS,
                        help=f"validity of the server and client certificates (default: {pki.LEAF_DAYS})")
    parser.add_argument("--new-ca", action="store_true",
                        help="replace the CA (the bundles keep the previous one, so current certificates keep "
                        "working until their holders restart)")
    return parser


def _days(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 3650:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days from 1 to 3650")
    return int(value)


@dataclass(frozen=True)
class Issued:
    """Everything one run issues. `bundle` is what both sides trust: the CA, and the previous
    one while a new CA takes over."""

    ca: pki.Pair
    bundle: bytes
    server: pki.Pair
    clients: dict[str, pki.Pair]
    admin: pki.Pair | None = None


def run(args) -> int:
    try:
        groups = _node_groups(args.node_cluster, args.manifests)
        if not _TRUST_DOMAIN.match(args.trust_domain):
            raise CertsError(f"--trust-domain {args.trust_domain!r}: use lowercase letters, digits, '.', '-', '_'")
        if args.kubernetes == (args.output is not None):
            raise CertsError("give --output DIR (files or Secret manifests) or --kubernetes (Secrets in the cluster)")
        if args.admin and (args.kubernetes or args.output_format != "files"):
            raise CertsError("--admin writes files only (--output DIR): the admin's key belongs with its people, "
                             "not in a Secret of the cluster")
        store = _KubernetesStore(args) if args.kubernetes else _DirectoryStore(args.output, args.output_format,
                                                                               args.namespace,
                                                                               args.gateway_namespace or args.namespace)
        previous = store.current_ca()
        issued = issue(previous, groups, server_names=service_names(args), trust_domain=args.trust_domain,
                       days=args.days, new_ca=args.new_ca, admin=args.admin)
        written = store.write(issued)
    except CertsError as error:
        print(f"controlplane certs: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"controlplane certs: {error.filename or ''} {error.strerror or error}".replace("  ", " "),
              file=sys.stderr)
        return 1
    kept = "kept the CA" if previous is not None and not args.new_ca else "a new CA"
    print(f"wrote {len(written)} {'Secrets' if args.kubernetes or args.output_format == 'secrets' else 'files'} "
          f"({kept}; client certificates for node groups: {', '.join(groups) or 'none'}):")
    for line in written:
        print(f"  {line}")
    return 0


def issue(previous: tuple[pki.Pair, bytes] | None, groups: Iterable[str], *, server_names: list[str],
          trust_domain: str, days: int, new_ca: bool, admin: bool = False) -> Issued:
    """New server and client certificates, from the previous CA unless `new_ca` or there is none."""
    if previous is not None and not new_ca:
        ca, bundle = previous[0], previous[1]
    else:
        ca = pki.new_ca()
        bundle = ca.cert + (previous[0].cert if previous is not None else b"")  # never more than two CAs
    server = pki.server_certificate(ca, server_names, days=days)
    clients = {group: pki.client_certificate(ca, group, trust_domain=trust_domain, days=days) for group in groups}
    return Issued(ca, bundle, server, clients,
                  pki.admin_certificate(ca, trust_domain=trust_domain, days=days) if admin else None)


def service_names(args) -> list[str]:
    service, namespace = args.service, args.namespace
    names = [f"{service}.{namespace}.svc", service, f"{service}.{namespace}", f"{service}.{namespace}.svc.cluster.local"]
    return names + [name for name in args.server_name if name not in names]


def _node_groups(named: list[str], manifests: Path | None) -> list[str]:
    groups = list(named)
    if manifests is not None:
        groups += _gateway_node_clusters(manifests)
    for group in groups:
        if not _DNS_LABEL.match(group):
            raise CertsError(f"node cluster {group!r} is not a DNS label (lowercase letters, digits and '-', at most "
                             "63): a Gateway's nodeCluster is one")
    return sorted(set(groups))


def _gateway_node_clusters(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise CertsError(f"--manifests {directory}: not a directory")
    found = []
    for path in sorted([*directory.rglob("*.yaml"), *directory.rglob("*.yml")]):
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise CertsError(f"{path}: not YAML ({str(error).splitlines()[0]}); fix it or leave it out") from None
        for document in documents:
            if isinstance(document, dict) and document.get("kind") == "Gateway":
                node_cluster = (document.get("spec") or {}).get("nodeCluster")
                if not isinstance(node_cluster, str):
                    name = (document.get("metadata") or {}).get("name", "?")
                    raise CertsError(f"{path}: Gateway {name} has no spec.nodeCluster string")
                found.append(node_cluster)
    if not found:
        raise CertsError(f"--manifests {directory}: no Gateway found (each needs kind: Gateway and spec.nodeCluster)")
    return found


def _read_ca(certificate: bytes, key: bytes, where: str) -> tuple[pki.Pair, bytes]:
    """(the CA, the bundle it was written with), checked: a CA that cannot sign is not kept silently."""
    try:
        bundle = x509.load_pem_x509_certificates(certificate)
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as error:
        raise CertsError(f"{where}: the CA is unreadable ({error}); restore it, or pass --new-ca to start over "
                         "(Envoys then need their new client certificates)") from None
    own = bundle[0]
    if own.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertsError(f"{where}: the CA's key does not match its certificate; restore them, or pass --new-ca")
    return pki.Pair(own.public_bytes(serialization.Encoding.PEM), key), certificate


class _DirectoryStore:
    def __init__(self, directory: Path, output_format: str, namespace: str, gateway_namespace: str):
        self.directory, self.format = directory, output_format
        self.namespace, self.gateway_namespace = namespace, gateway_namespace

    def current_ca(self) -> tuple[pki.Pair, bytes] | None:
        if self.format == "files":
            cert, key = self.directory / "ca.crt", self.directory / "ca.key"
            if not cert.exists() and not key.exists():
                return None
            return _read_ca(cert.read_bytes(), key.read_bytes(), str(self.directory))
        path = self.directory / f"{CA_SECRET}.yaml"
        if not path.exists():
            return None
        try:
            data = yaml.safe_load(path.read_text())["data"]
            return _read_ca(base64.b64decode(data["ca.crt"]), base64.b64decode(data["ca.key"]), str(path))
        except (yaml.YAMLError, KeyError, TypeError, ValueError) as error:
            raise CertsError(f"{path}: not a CA Secret this command wrote ({error!r}); restore it, or pass "
                             "--new-ca") from None

    def write(self, issued: Issued) -> list[str]:
        if self.format == "files":
            files = {"ca.crt": issued.bundle, "ca.key": issued.ca.key,
                     "server/tls.crt": issued.server.cert, "server/tls.key": issued.server.key,
                     "server/ca.crt": issued.bundle}
            for group, pair in issued.clients.items():
                files |= {f"node-groups/{group}/tls.crt": pair.cert, f"node-groups/{group}/tls.key": pair.key,
                          f"node-groups/{group}/ca.crt": issued.bundle}
            if issued.admin is not None:
                files |= {"admin/tls.crt": issued.admin.cert, "admin/tls.key": issued.admin.key,
                          "admin/ca.crt": issued.bundle}
        else:
            files = {f"{secret['metadata']['name']}.yaml": yaml.safe_dump(secret, sort_keys=False).encode()
                     for secret in secrets(issued, self.namespace, self.gateway_namespace)}
        # Keys first, certificates last: a server re-reading mid-run sees its old pair or the new one
        # (server_tls.py also waits until certificate and key match).
        for relative in sorted(files, key=lambda name: not name.endswith(".key")):
            _write_atomically(self.directory / relative, files[relative])
        return [str(self.directory / relative) for relative in sorted(files)]


def secrets(issued: Issued, namespace: str, gateway_namespace: str) -> list[dict]:
    """The Secrets: the CA (with its key: only this command reads it), the server's, each group's."""
    def secret(name: str, secret_namespace: str, secret_type: str, data: dict[str, bytes], group: str | None = None):
        labels = {"app.kubernetes.io/managed-by": "controlplane-certs"}
        if group is not None:
            labels["xds.controlplane.dev/node-group"] = group
        return {"apiVersion": "v1", "kind": "Secret", "type": secret_type,
                "metadata": {"name": name, "namespace": secret_namespace, "labels": labels},
                "data": {key: base64.b64encode(value).decode() for key, value in data.items()}}
    found = [secret(CA_SECRET, namespace, "Opaque", {"ca.crt": issued.bundle, "ca.key": issued.ca.key}),
             secret(SERVER_SECRET, namespace, "kubernetes.io/tls",
                    {"tls.crt": issued.server.cert, "tls.key": issued.server.key, "ca.crt": issued.bundle})]
    for group, pair in issued.clients.items():
        found.append(secret(CLIENT_SECRET_PREFIX + group, gateway_namespace, "kubernetes.io/tls",
                            {"tls.crt": pair.cert, "tls.key": pair.key, "ca.crt": issued.bundle}, group))
    return found


class _KubernetesStore:
    def __init__(self, args):
        from kubernetes import client, config
        try:
            if args.kubeconfig or Path("~/.kube/config").expanduser().exists():
                config.load_kube_config(config_file=args.kubeconfig)
            else:
                config.load_incluster_config()
        except (config.ConfigException, OSError) as error:
            raise CertsError(f"cannot configure the Kubernetes client ({error}): pass --kubeconfig, set KUBECONFIG, "
                             "or run in a pod with a service account") from None
        self.api = client.CoreV1Api()
        self.namespace, self.gateway_namespace = args.namespace, args.gateway_namespace or args.namespace

    def current_ca(self) -> tuple[pki.Pair, bytes] | None:
        from kubernetes.client.exceptions import ApiException
        try:
            found = self.api.read_namespaced_secret(CA_SECRET, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise CertsError(f"cannot read Secret {self.namespace}/{CA_SECRET}: {error.status} {error.reason}") from None
        data = found.data or {}
        if "ca.crt" not in data or "ca.key" not in data:
            raise CertsError(f"Secret {self.namespace}/{CA_SECRET} has no ca.crt and ca.key; restore it, or pass "
                             "--new-ca")
        return _read_ca(base64.b64decode(data["ca.crt"]), base64.b64decode(data["ca.key"]),
                        f"Secret {self.namespace}/{CA_SECRET}")

    def write(self, issued: Issued) -> list[str]:
        from kubernetes.client.exceptions import ApiException
        written = []
        for secret in secrets(issued, self.namespace, self.gateway_namespace):
            name, namespace = secret["metadata"]["name"], secret["metadata"]["namespace"]
            try:
                try:
                    self.api.replace_namespaced_secret(name, namespace, secret)
                except ApiException as error:
                    if error.status != 404:
                        raise
                    self.api.create_namespaced_secret(namespace, secret)
            except ApiException as error:
                raise CertsError(f"cannot write Secret {namespace}/{name}: {error.status} {error.reason} (the Job's "
                                 "ServiceAccount needs get, create and update on secrets there)") from None
            written.append(f"Secret {namespace}/{name}")
        return written


def _write_atomically(path: Path, content: bytes) -> None:
    """Readers see the old file or the new one, never half of one; keys are readable by their owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(content)
        os.chmod(temporary, 0o600 if path.name.endswith(".key") or path.suffix == ".yaml" else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
