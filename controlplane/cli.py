"""The `controlplane` command: `demo` and `bootstrap` (serve and render come with the sources)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import yaml

from controlplane.runtime import demo
from controlplane.translate.bootstrap import ads_bootstrap


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:18000)")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description="An xDS control plane for Envoy.")
    commands = parser.add_subparsers(dest="command", required=True)

    run_demo = commands.add_parser("demo", help="control plane, a real Envoy and sample backends on 127.0.0.1")
    run_demo.add_argument("--xds-port", type=int, default=demo.DemoPorts.xds)
    run_demo.add_argument("--listener-port", type=int, default=demo.DemoPorts.listener)
    run_demo.add_argument("--admin-port", type=int, default=demo.DemoPorts.admin)
    run_demo.add_argument("--check", action="store_true",
                          help="send 20 requests through Envoy, print who answered, and exit")

    bootstrap = commands.add_parser("bootstrap", help="print an Envoy bootstrap (YAML) that points at an ADS server")
    bootstrap.add_argument("--xds-address", type=_host_port, default=("127.0.0.1", 18000), metavar="HOST:PORT")
    bootstrap.add_argument("--node-cluster", required=True, help="the node group (a Gateway's nodeCluster)")
    bootstrap.add_argument("--node-id", default="envoy")
    bootstrap.add_argument("--admin-port", type=int, default=9901)
    bootstrap.add_argument("--delta", action="store_true", help="use Delta xDS instead of State-of-the-World")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        ports = demo.DemoPorts(xds=args.xds_port, listener=args.listener_port, admin=args.admin_port)
        try:
            return asyncio.run(demo.run_demo(ports, check=args.check))
        except (OSError, RuntimeError) as error:
            print(f"controlplane demo: {error}", file=sys.stderr)
            return 1
    host, port = args.xds_address
    print(yaml.safe_dump(ads_bootstrap(node_id=args.node_id, node_cluster=args.node_cluster, xds_host=host,
                                       xds_port=port, admin_port=args.admin_port, delta=args.delta),
                         sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
