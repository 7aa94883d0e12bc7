"""`controlplane status`: every Envoy of the fleet, and whether it runs what it was sent (like
`istioctl proxy-status`).

Two places to ask:
- a local `serve` (default): its metrics port's `/debug/envoys` and `/debug/config?node=`
  (runtime/debug_views.py), which answer loopback connections only: on Kubernetes, through
  `kubectl port-forward` to one replica;
- a cluster (`--kubeconfig`): every replica's Envoys, from the Envoy records each replica keeps in
  a Lease of its own (runtime/fleet.py), so one command sees the Envoys of all replicas. Reading
  them takes `list` on Leases in the control plane's namespace: the admin's, not a workload's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from controlplane.runtime.envoy_rows import TYPES

DEFAULT_SERVER = "http://127.0.0.1:9102"
DEFAULT_NAMESPACE = "controlplane-system"


class StatusError(Exception):
    """Why there is nothing to show: one line saying what to do."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("status", help="every Envoy of the fleet: connected to which replica, in sync or not")
    parser.add_argument("--server", default=DEFAULT_SERVER, metavar="URL",
                        help=f"a running serve's metrics address (default {DEFAULT_SERVER}; it answers from this "
                             "host only: on Kubernetes, kubectl port-forward to a replica first)")
    parser.add_argument("--kubeconfig", metavar="FILE",
                        help="read every replica's Envoys from the cluster (their Envoy records) instead")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                        help=f"with --kubeconfig: the control plane's namespace (default {DEFAULT_NAMESPACE})")
    parser.add_argument("--node", metavar="ID", help="one Envoy: its state and the configuration it is sent "
                                                     "(private keys redacted)")
    parser.add_argument("--output", choices=("table", "json"), default="table")
    return parser


def run(args: argparse.Namespace, kube_api_client: Callable[[str | None], Any]) -> int:
    try:
        if args.kubeconfig is not None:
            records, config = _from_cluster(args, kube_api_client)
        else:
            records, config = _from_server(args.server, args.node)
    except StatusError as error:
        print(f"controlplane status: {error}", file=sys.stderr)
        return 2
    rows = [row for record in records for row in record["rows"]]
    if args.node is not None:
        found = [row for row in rows if row["node"] == args.node]
        if not found:
            print(f"controlplane status: no Envoy with node id {args.node!r} is connected "
                  f"({len(rows)} Envoy(s) are; `controlplane status` lists them)", file=sys.stderr)
            return 1
        if args.output == "json":
            print(json.dumps({"envoys": found, "config": config}, indent=1, sort_keys=True))
        else:
            print(table(found))
            if config is not None:
                print(json.dumps(config, indent=1, sort_keys=True))
        return 0
    if args.output == "json":
        print(json.dumps({"replicas": records}, indent=1, sort_keys=True))
        return 0
    print(table(rows))
    for line in _notes(records, rows):
        print(line)
    budgets = merged_budgets([use for record in records for use in record.get("budgets", [])])
    if budgets:
        print()
        print(budget_table(budgets))
    return 0


def merged_budgets(uses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every replica's budget use as one: in use on the busiest Envoy of any replica, the Envoys
    reporting summed (the limit per Envoy is the same everywhere)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for use in uses:
        key = tuple(use.get(name) for name in ("node_group", "backend", "cluster", "traffic", "priority", "resource"))
        seen = merged.get(key)
        if seen is None:
            merged[key] = dict(use)
        else:
            seen["in_use"] = max(seen["in_use"] or 0, use.get("in_use") or 0)
            seen["envoys"] = seen.get("envoys", 0) + use.get("envoys", 0)
    return list(merged.values())


def budget_table(uses: list[dict[str, Any]]) -> str:
    """Each Backend's budgets, API and WebSocket clusters side by side: in use on the busiest Envoy
    of the node group / the limit each Envoy runs, per resource (from the stats Envoys push)."""
    resources = ("cx", "pending", "rq")
    merged: dict[tuple, dict[str, str]] = {}
    for use in uses:
        if use["resource"] not in resources:
            continue
        key = (use["node_group"], use["backend"], use["cluster"], use["traffic"], use["priority"])
        in_use = "?" if use["in_use"] is None else str(use["in_use"])
        merged.setdefault(key, {})[use["resource"]] = f"{in_use}/{use['limit']}"
        merged[key]["envoys"] = str(max(int(merged[key].get("envoys", 0)), use["envoys"]))
    header = ["GROUP", "BACKEND", "CLUSTER", "TRAFFIC", "PRIORITY", "CONNECTIONS", "PENDING", "REQUESTS",
              "ENVOYS REPORTING"]
    lines = [header] + [[*key, cells.get("cx", "-"), cells.get("pending", "-"), cells.get("rq", "-"),
                         cells.get("envoys", "0")] for key, cells in sorted(merged.items())]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(["Budgets in use (busiest Envoy of the group) / limit per Envoy:", *text])


def table(rows: list[dict[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = ["NODE", "GROUP", "REPLICA", "CONNECTED", *TYPES.values()]
    lines = [header]
    nacks = []
    for row in rows:
        states = [_cell(row["types"].get(short, {})) for short in TYPES.values()]
        lines.append([row["node"], row["group"], row["replica"], f"{_ago(now - row['connected_since'])} "
                      f"({row['transport']})", *states])
        for short, entry in row["types"].items():
            nack = entry.get("nack")
            if nack:
                now_or_before = ("NACKED" if entry.get("state") == "NACKED" else
                                 "last NACK (an earlier version; it runs the last accepted one of what it rejected)")
                nacks.append(f"  {row['node']} {short} {now_or_before}, {_ago(now - nack['at'])}: "
                             f"{', '.join(nack['resources'])}: {nack['message']}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(text + nacks)


def _cell(entry: dict[str, Any]) -> str:
    """A type's state with the versions, short: "SYNCED 3f2a91", "STALE 3f2a91>9c0d12" (ACKed >
    sent), "NACKED 9c0d12" (the version rejected), "NOT SENT"."""
    state, sent, acked = entry.get("state", "NOT SENT"), entry.get("sent", "")[:6], entry.get("acked", "")[:6]
    if state == "NOT SENT":
        return state
    if state == "STALE":
        return f"STALE {acked or '-'}>{sent}"
    return f"{state} {sent}"


def _notes(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    replicas = {record["replica"] for record in records}
    synced = sum(all(entry["state"] in ("SYNCED", "NOT SENT") and not entry.get("nack")
                     for entry in row["types"].values()) for row in rows)
    notes = [f"{len(rows)} Envoy(s) on {len(replicas)} replica(s): {synced} in sync, {len(rows) - synced} not "
             "(a NACK, or a push not acknowledged yet)"]
    for record in records:
        if record.get("expired"):
            notes.append(f"replica {record['replica']}: its record has expired (the replica is gone or cannot reach "
                         "the API server); its Envoys above may have reconnected elsewhere")
        if record.get("budgets_left_out"):
            notes.append(f"replica {record['replica']}: the budget use of {record['budgets_left_out']} more clusters "
                         "is not in its record; port-forward to that replica and use --server to see it")
        if record.get("left_out"):
            notes.append(f"replica {record['replica']}: {record['left_out']} more Envoy(s) not listed (a record holds "
                         f"at most {len(record['rows'])}); port-forward to that replica and run "
                         "`controlplane status` there to see them all")
        if record.get("problem"):
            notes.append(f"replica {record['replica']}: {record['problem']}")
    return notes


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _from_server(server: str, node: str | None) -> tuple[list[dict[str, Any]], dict | None]:
    base = server.rstrip("/")
    try:
        with httpx.Client(timeout=10) as http:
            answer = http.get(f"{base}/debug/envoys")
            _check(answer, base)
            envoys = answer.json()
            config = None
            if node is not None:
                found = http.get(f"{base}/debug/config", params={"node": node})
                if found.status_code != 404:
                    _check(found, base)
                    config = found.json()["config_dump"]
    except httpx.HTTPError as error:
        raise StatusError(f"no control plane answers at {base} ({error}): is `controlplane serve` running with "
                          "its metrics on that address (--metrics-address)? On Kubernetes: kubectl port-forward "
                          "to a replica's metrics port, or use --kubeconfig") from None
    except (ValueError, KeyError) as error:
        raise StatusError(f"{base} did not answer as a control plane does ({error})") from None
    return [{"replica": envoys["replica"], "rows": envoys["rows"], "left_out": envoys.get("left_out", 0),
             "expired": False, "budgets": envoys.get("budgets", [])}], config


def _check(answer: httpx.Response, base: str) -> None:
    if answer.status_code != 200:
        try:
            said = answer.json().get("error", answer.text)
        except ValueError:
            said = answer.text.strip()[:200]
        raise StatusError(f"{base} answered {answer.status_code}: {said}")


def _from_cluster(args: argparse.Namespace, kube_api_client) -> tuple[list[dict[str, Any]], dict | None]:
    from controlplane.runtime.fleet import every_replica
    from controlplane.sources.kube_api import KubeApi, brief
    api_client = kube_api_client(args.kubeconfig)  # a bad kubeconfig: the caller's one-line error
    try:
        records = every_replica(KubeApi(api_client), args.namespace)
    except Exception as error:  # noqa: BLE001 -- an API server away or refusing: one line, no traceback
        raise StatusError(f"cannot read the control plane's Envoy records in namespace {args.namespace} "
                          f"({brief(error)}): check --kubeconfig and --namespace, and that you may list Leases "
                          "there") from None
    config = None
    if args.node is not None:
        config = _rendered_for(args, api_client, records)
    return [{"replica": r.replica, "rows": r.rows, "left_out": r.left_out, "expired": r.expired,
             "problem": r.problem, "budgets": r.budgets, "budgets_left_out": r.budgets_left_out}
            for r in records], config


def _rendered_for(args, api_client, records) -> dict | None:
    """What the live cluster's objects translate to for the Envoy's node group (`serve` translates
    the same objects): the configuration it is being sent, keys redacted."""
    from controlplane.sources.kubernetes import KubernetesSource
    from controlplane.translate import render, to_ir, to_xds
    group = next((row["group"] for record in records for row in record.rows if row["node"] == args.node), None)
    if group is None:
        return None
    store = KubernetesSource(api_client, namespace=None).read_once()
    translated = to_ir.translate(store.view(), now=time.time()).groups.get(group)
    if translated is None:
        return {"note": f"no Gateway of the cluster has node cluster {group!r} now"}
    return {"note": "rendered from the cluster's objects now, as every replica translates them",
            "group": group, "config_dump": render.config_dump(to_xds.snapshot(translated))}
