"""The `controlplane` command: serve, render, demo, bootstrap, crds.

Errors a user can fix are one line saying what and where, and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import yaml

from controlplane import certs, check_secret, fleet_status, surge
from controlplane.runtime import demo, logs
from controlplane.runtime.memory import FileMemory, SecretMemory
from controlplane.sources.files import DirectorySource, ManifestError
from controlplane.translate import render, secrets, to_ir, to_xds
from controlplane.translate.bootstrap import STATS_FLUSH_SECONDS, XdsClientTls, ads_bootstrap
from controlplane.xds.server_tls import ServerTls


def _host_port(value: str) -> tuple[str, int]:
    """HOST:PORT with a port from 1 to 65535. Port 0 (any free port) is refused: Envoys and
    Prometheus must be told the port, so a random one is never what was meant."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:18000)")
    if not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: port {port} is out of range; give a port from 1 to 65535")
    return host, int(port)


def _listen_address(value: str) -> str:
    """A checked HOST:PORT, kept as the string the servers take."""
    _host_port(value)
    return value


def _flush_seconds(value: str) -> int:
    """Whole seconds from 1 to 299: Envoy takes an interval under 300 s."""
    try:
        seconds = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of seconds") from None
    if not 1 <= seconds <= 299:
        raise argparse.ArgumentTypeError(f"{seconds}: give 1 to 299 seconds (Envoy takes an interval under 300 s)")
    return seconds


def _metrics_address(value: str) -> str:
    """A checked HOST:PORT, or '' (no metrics)."""
    return value and _listen_address(value)


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port; give a number from 1 to 65535")
    return int(value)


def _connections(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 10_000_000:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of connections (1-10000000)")
    return int(value)


def _version() -> str:
    try:
        return importlib.metadata.version("controlplane")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description="An xDS control plane for Envoy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper, default="INFO")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one object per line (message, level, logger, and node, group, type, version "
                        "where they apply), for log pipelines")
    commands = parser.add_subparsers(dest="command", required=True)

    run_demo = commands.add_parser("demo", help="control plane, a real Envoy and sample backends on 127.0.0.1")
    run_demo.add_argument("--source", default="examples/demo", metavar="PATH",
                          help="the manifests to serve (default: examples/demo)")
    run_demo.add_argument("--xds-port", type=_port, default=demo.DemoPorts.xds)
    run_demo.add_argument("--admin-port", type=_port, default=demo.DemoPorts.admin)
    run_demo.add_argument("--metrics-port", type=_port, default=demo.DemoPorts.metrics,
                          help="metrics and what `controlplane status` reads (default: %(default)s)")
    run_demo.add_argument("--check", action="store_true",
                          help="send 20 requests through Envoy, print who answered, and exit")

    run_serve = commands.add_parser("serve", help="serve xDS from Kubernetes or from a directory of manifests")
    run_serve.add_argument("--source", required=True, metavar="kubernetes|PATH",
                           help="'kubernetes', or a directory of YAML manifests (Gateways, Backends, Services, ...)")
    run_serve.add_argument("--xds-address", type=_listen_address, default="0.0.0.0:18000", metavar="HOST:PORT")
    run_serve.add_argument("--metrics-address", type=_metrics_address, default="0.0.0.0:9102", metavar="HOST:PORT",
                           help="Prometheus metrics; empty to turn off")
    run_serve.add_argument("--namespace", default=os.environ.get("CONTROLPLANE_NAMESPACE") or None,
                           help="watch one namespace (default: all)")
    run_serve.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None,
                           help="default: $KUBECONFIG, else ~/.kube/config, else the in-cluster service account")
    run_serve.add_argument("--lease-namespace", metavar="NAMESPACE",
                           help="with kubernetes: the control plane's own namespace, where its Leases and last "
                           "accepted state live (default: $POD_NAMESPACE, else the pod's ServiceAccount namespace)")
    run_serve.add_argument("--state-file", metavar="PATH",
                           help="with a directory source: where the last accepted state is kept across restarts "
                           "(default: under $XDG_STATE_HOME or ~/.local/state/controlplane/; 'none' to keep none). "
                           "With kubernetes it is the Secret controlplane-last-accepted in the control plane's "
                           "namespace")
    run_serve.add_argument("--min-certificate-lifetime", type=check_secret.duration, metavar="DURATION",
                           default=secrets.DEFAULT_MIN_LIFETIME,
                           help="a Secret rotation to a certificate with less time left is refused (the current "
                           "one keeps serving); default 24h; a Gateway's spec.minCertificateLifetime overrides it")
    run_serve.add_argument("--insecure-serve-private-keys-over-plaintext", action="store_true",
                           help="serve private keys (TLS listeners' certificates) over xDS without mutual TLS: anyone "
                           "who reaches the xDS port and claims a node group gets its keys. A lab only")
    run_serve.add_argument("--xds-trust-domain", default="controlplane", metavar="DOMAIN",
                           help="the trust domain of the Envoys' client certificates "
                           "(spiffe://DOMAIN/node-group/<group>)")
    run_serve.add_argument("--xds-tls-cert", type=Path, metavar="PATH",
                           help="serve xDS over TLS with this certificate (PEM; re-read when it changes)")
    run_serve.add_argument("--xds-tls-key", type=Path, metavar="PATH", help="the certificate's private key (PEM)")
    run_serve.add_argument("--xds-client-ca", type=Path, metavar="PATH",
                           help="require Envoys to present a certificate signed by this CA (mutual TLS)")

    run_render = commands.add_parser("render", help="print the Envoy resources a node group gets")
    run_render.add_argument("--source", required=True, metavar="kubernetes|PATH",
                            help="a directory of YAML manifests, or kubernetes: the live cluster's objects, read once")
    run_render.add_argument("--node-cluster", required=True, help="the node group (a Gateway's nodeCluster)")
    run_render.add_argument("--format", choices=["yaml", "json", "config-dump", "bootstrap"], default="yaml",
                            help="config-dump: keyed like Envoy's /config_dump?include_eds, to diff with a running "
                            "Envoy's; bootstrap: a static Envoy bootstrap with everything inline. Private keys "
                            "are redacted, except in bootstrap")
    run_render.add_argument("--namespace", default=None, help="with --source kubernetes: one namespace only")
    run_render.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None, metavar="PATH",
                            help="with --source kubernetes (default: KUBECONFIG, ~/.kube/config, in-cluster)")

    write_crds = commands.add_parser("crds", help="write the CRDs generated from the models (make crds)")
    write_crds.add_argument("--output", default="k8s/crds", metavar="DIR")

    bootstrap = commands.add_parser("bootstrap", help="print an Envoy bootstrap (YAML) that points at an ADS server")
    bootstrap.add_argument("--xds-address", type=_host_port, default=("127.0.0.1", 18000), metavar="HOST:PORT")
    bootstrap.add_argument("--node-cluster", required=True, help="the node group (a Gateway's nodeCluster)")
    bootstrap.add_argument("--node-id", default="envoy")
    bootstrap.add_argument("--admin-port", type=_port, default=9901, help="the admin, on 127.0.0.1 only")
    bootstrap.add_argument("--stats-port", type=_port, metavar="PORT", help="also serve the admin's /stats/prometheus "
                           "and /ready (only those) on 0.0.0.0:PORT, for Prometheus and a readiness probe")
    bootstrap.add_argument("--delta", action="store_true", help="use Delta xDS instead of State-of-the-World")
    bootstrap.add_argument("--stats-flush-interval", type=_flush_seconds, default=STATS_FLUSH_SECONDS, metavar="SECONDS",
                           help="how often Envoy pushes its stats to the control plane (default %(default)s; the "
                           "control plane's cost is in proportion: ~1 core per 1,000 Envoys at 5 s)")
    bootstrap.add_argument("--max-downstream-connections", type=_connections, metavar="N",
                           help="connections this Envoy accepts over all its listeners (the overload manager; the "
                           "stats port is exempt); each Gateway listener's limits.maxConnections applies too")
    bootstrap.add_argument("--xds-ca", metavar="PATH", help="connect over TLS, trusting this CA (a path in Envoy's "
                           "container); the server certificate must name the --xds-address host")
    bootstrap.add_argument("--xds-client-cert", metavar="PATH", help="Envoy's certificate, for mutual TLS")
    bootstrap.add_argument("--xds-client-key", metavar="PATH", help="Envoy's private key, for mutual TLS")
    check_secret.add_parser(commands)
    surge.add_parser(commands)
    certs.add_parser(commands)
    fleet_status.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-secret":  # its output is the checks' verdict: no log lines around it
        return check_secret.run(args)
    if args.command == "surge":  # its output is the per-step table
        return surge.run(args)
    if args.command == "certs":
        return certs.run(args)
    if args.command == "status":  # its output is the table (or JSON)
        try:
            return fleet_status.run(args, _kube_api_client)
        except SettingsError as error:
            print(f"controlplane status: {error}", file=sys.stderr)
            return 2
    logs.configure(args.log_level, args.log_format)
    if args.command == "demo":
        ports = demo.DemoPorts(xds=args.xds_port, admin=args.admin_port, metrics=args.metrics_port)
        try:
            return asyncio.run(demo.run_demo(Path(args.source), ports, check=args.check))
        except (OSError, RuntimeError, ManifestError) as error:
            print(f"controlplane demo: {error}", file=sys.stderr)
            return 1
    if args.command == "crds":
        from controlplane.model import crds, schema
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        for kind in crds.KINDS:
            path = output / f"{crds.PLURALS[kind]}.yaml"
            path.write_text(crd_yaml(schema.crd(kind)))
            print(f"wrote {path}")
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "render":
        if args.source == "kubernetes":
            return _render_kubernetes(args)
        try:
            source = DirectorySource(Path(args.source))
        except ManifestError as error:
            print(f"controlplane render: {error}", file=sys.stderr)
            return 2
        return _render(source, args.node_cluster, args.format)
    host, port = args.xds_address
    if (args.xds_client_cert or args.xds_client_key) and not args.xds_ca:
        print("controlplane bootstrap: --xds-client-cert/--xds-client-key need --xds-ca", file=sys.stderr)
        return 2
    tls = XdsClientTls(args.xds_ca, args.xds_client_cert, args.xds_client_key) if args.xds_ca else None
    print(yaml.safe_dump(ads_bootstrap(node_id=args.node_id, node_cluster=args.node_cluster, xds_host=host,
                                       xds_port=port, admin_port=args.admin_port, delta=args.delta, tls=tls,
                                       stats_port=args.stats_port, stats_flush_seconds=args.stats_flush_interval,
                                       max_downstream_connections=args.max_downstream_connections),
                         sort_keys=False), end="")
    return 0


def _serve(args) -> int:
    from controlplane.runtime.serve import ServeError, serve
    try:
        leader = None
        if args.source == "kubernetes":
            source, leader = _kubernetes_source(args.kubeconfig, args.namespace, args.lease_namespace)
            memory = SecretMemory(leader.api, leader.namespace)
        else:
            source = DirectorySource(Path(args.source))
            memory = None if args.state_file == "none" else FileMemory(args.state_file or _default_state_file(
                source.directory))
        xds_tls = None
        if args.xds_tls_cert or args.xds_tls_key or args.xds_client_ca:
            if not (args.xds_tls_cert and args.xds_tls_key):
                raise SettingsError("--xds-tls-cert and --xds-tls-key go together (and --xds-client-ca needs both)")
            xds_tls = ServerTls(args.xds_tls_cert, args.xds_tls_key, args.xds_client_ca,
                                trust_domain=args.xds_trust_domain)
        asyncio.run(serve(source, xds_address=args.xds_address, metrics_address=args.metrics_address or None,
                          leader=leader, xds_tls=xds_tls, memory=memory,
                          min_certificate_lifetime=args.min_certificate_lifetime,
                          insecure_private_keys_over_plaintext=args.insecure_serve_private_keys_over_plaintext))
    except (OSError, ManifestError, SettingsError, ServeError) as error:
        print(f"controlplane serve: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before serve took the signal over
        return 130
    return 0


def _default_state_file(directory: Path) -> Path:
    """One state file per manifest directory, in the user's state directory (XDG)."""
    state_home = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]
    return state_home / "controlplane" / f"last-accepted-{directory.resolve().name}-{digest}.json"


class SettingsError(Exception):
    """A setting `serve` cannot start with; the message says which and what to do."""


def _kube_api_client(kubeconfig: str | None):
    from kubernetes import client, config
    try:
        if kubeconfig or Path("~/.kube/config").expanduser().exists():
            config.load_kube_config(config_file=kubeconfig)
        else:
            config.load_incluster_config()
    except (config.ConfigException, OSError) as error:
        raise SettingsError(f"cannot configure the Kubernetes client ({error}): pass --kubeconfig, set "
                              "KUBECONFIG, or run in a pod with a service account") from None
    return client.ApiClient()


def _kubernetes_source(kubeconfig: str | None, namespace: str | None, lease_namespace: str | None):
    from controlplane.runtime.leader import LeaderElection, NamespaceUnknown, own_namespace
    from controlplane.sources.kube_api import KubeApi
    from controlplane.sources.kubernetes import KubernetesSource
    try:
        own = own_namespace(lease_namespace, os.environ)
    except NamespaceUnknown as error:
        raise SettingsError(str(error)) from None
    api_client = _kube_api_client(kubeconfig)
    leader = LeaderElection(KubeApi(api_client), namespace=own,
                            identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}")
    return KubernetesSource(api_client, namespace=namespace), leader


def crd_yaml(manifest: dict) -> str:
    return "# Generated from controlplane/model/crds.py by `make crds`: edit the models, not this file.\n" + \
        yaml.safe_dump(manifest, sort_keys=False)


def _render_kubernetes(args) -> int:
    """What the live cluster's objects translate to: each kind listed once, as `serve` lists them."""
    from controlplane.sources.kube_api import brief
    from controlplane.sources.kubernetes import KubernetesSource
    try:
        store = KubernetesSource(_kube_api_client(args.kubeconfig), namespace=args.namespace).read_once()
    except SettingsError as error:
        print(f"controlplane render: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 -- an API server away or refusing: one line, no traceback
        print(f"controlplane render: cannot read the cluster's objects ({brief(error)})", file=sys.stderr)
        return 2
    return _print_rendered(store.view(), args.node_cluster, args.format, failed=False)


def _render(source: DirectorySource, node_cluster: str, output: str) -> int:
    """Print what `node_cluster` gets; exit 1 when any object is not accepted (a CI lint)."""
    source_log = logging.getLogger(DirectorySource.__module__)
    source_log.disabled = True  # each file's error is printed below, once; the source's log (for `serve`) repeats it
    try:
        source.load()
    finally:
        source_log.disabled = False
    for error in source.errors.values():
        print(f"error: {error}", file=sys.stderr)
    return _print_rendered(source.store().view(), node_cluster, output, failed=bool(source.errors))


def _print_rendered(view, node_cluster: str, output: str, *, failed: bool) -> int:
    translation = to_ir.translate(view, now=time.time())
    problems = [(key, conditions[0].message) for key, conditions in sorted(translation.conditions.items())
                if conditions[0].status == "False"]
    for key, message in problems:
        print(f"error: {key} not accepted: {message}", file=sys.stderr)
    group = translation.groups.get(node_cluster)
    if group is None:
        known = ", ".join(sorted(translation.groups)) or "none"
        print(f"controlplane render: no accepted Gateway has nodeCluster {node_cluster!r} (node clusters: {known})",
              file=sys.stderr)
        return 1
    snapshot = to_xds.snapshot(group)
    if output == "bootstrap":
        text = yaml.safe_dump(render.static_bootstrap(snapshot), sort_keys=False)
    elif output == "config-dump":
        text = json.dumps(render.config_dump(snapshot), indent=2) + "\n"
    elif output == "json":
        text = json.dumps(render.resources_document(snapshot), indent=2) + "\n"
    else:
        text = yaml.safe_dump(render.resources_document(snapshot), sort_keys=False)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `render ... | head`: the reader has what it wanted; end quietly, as any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
