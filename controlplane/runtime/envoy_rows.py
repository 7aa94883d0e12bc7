"""One row per connected Envoy: what `controlplane status` prints, `/debug/envoys` serves, and each
replica's Lease record carries for the whole fleet.

Why rows and not only the per-group summary of fleet.py: an operator asks "which Envoys are
connected, what do they run, are they in sync", one Envoy at a time, like `istioctl
proxy-status`. Each type's state:
- SYNCED: the Envoy ACKed the version it was sent last;
- NOT SENT: nothing of that type was sent (the Envoy did not ask for it, or the group has none);
- STALE: sent, not ACKed yet (a push in flight, or an Envoy that stopped answering);
- NACKED: the Envoy rejected the version it was sent last.
A type's last NACK is in the row even once a later version is ACKed: the control plane then sends
the rejected resources' last accepted versions (or none), so SYNCED with a NACK means "runs what it
was sent, which is not yet what the objects ask for".

In a Lease, the rows are gzip-compressed JSON (base64) in an annotation of their own, at most
`MAX_ROWS` per replica (Kubernetes allows 256 KiB of annotations in all; a row is ~60 bytes
compressed), with the budget use the replica's Envoys report (at most `MAX_BUDGETS` entries):
beyond that the record says how many were left out, and `status` says so.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controlplane.xds import EnvoyStatus
from controlplane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, RUNTIME, SECRET

TYPES = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", SECRET: "SDS", RUNTIME: "RTDS"}
MAX_ROWS = 2_000
MAX_MESSAGE = 200
MAX_BUDGETS = 3_000
"""Budget-use entries (cluster, priority, resource) in a record: ~40 bytes each compressed."""


def row(envoy: EnvoyStatus, replica: str) -> dict[str, Any]:
    types = {}
    for type_url, short in TYPES.items():
        state = envoy.types.get(type_url)
        sent, acked = (state.version_sent, state.version_acked) if state is not None else ("", "")
        nack = state.last_nack if state is not None else None
        entry: dict[str, Any] = {"sent": sent, "acked": acked}
        if not sent:
            entry["state"] = "NOT SENT"
        elif nack is not None and nack.version == sent:
            entry["state"] = "NACKED"
        else:
            entry["state"] = "SYNCED" if acked == sent else "STALE"
        if nack is not None:  # also one of an earlier version: what it rejected is held back from it since
            entry["nack"] = {"version": nack.version, "resources": list(nack.resource_names[:20]),
                             "message": nack.message.strip()[:MAX_MESSAGE], "at": round(nack.at, 3)}
        types[short] = entry
    return {"node": envoy.node_id, "group": envoy.node_group, "replica": replica,
            "connected_since": round(envoy.connected_since, 3), "transport": envoy.transport, "types": types}


def rows(envoys: Iterable[EnvoyStatus], replica: str) -> list[dict[str, Any]]:
    return sorted((row(envoy, replica) for envoy in envoys), key=lambda r: (r["group"], r["node"]))


def pack(envoy_rows: list[dict[str, Any]], budgets: list[dict[str, Any]] = ()) -> str:
    """The rows (and the budget use this replica's Envoys report: envoy_stats.budget_use, as dicts)
    for a Lease annotation, each list bounded and saying how many were left out; gzip, base64."""
    budgets = [use for use in budgets if use.get("in_use") is not None]
    body = {"rows": envoy_rows[:MAX_ROWS], "left_out": max(0, len(envoy_rows) - MAX_ROWS),
            "budgets": budgets[:MAX_BUDGETS], "budgets_left_out": max(0, len(budgets) - MAX_BUDGETS)}
    return base64.b64encode(gzip.compress(json.dumps(body, separators=(",", ":")).encode(), mtime=0)).decode()


@dataclass(frozen=True)
class Packed:
    rows: list[dict[str, Any]]
    left_out: int
    budgets: list[dict[str, Any]]
    budgets_left_out: int


def unpack(text: str) -> Packed:
    """What `pack` wrote; raises ValueError on what this version cannot read."""
    try:
        body = json.loads(gzip.decompress(base64.b64decode(text, validate=True)))
        found, budgets = body["rows"], body.get("budgets", [])
        for listed in (found, budgets):
            if not isinstance(listed, list) or not all(isinstance(r, dict) for r in listed):
                raise ValueError("a list of objects was expected")
        return Packed(found, int(body.get("left_out", 0)), budgets, int(body.get("budgets_left_out", 0)))
    except (OSError, EOFError, KeyError, TypeError, json.JSONDecodeError, base64.binascii.Error) as error:
        raise ValueError(f"unreadable Envoy list: {error}") from None
