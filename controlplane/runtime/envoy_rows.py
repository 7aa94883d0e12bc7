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
compressed): beyond that the record says how many were left out, and `status` says so.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterable
from typing import Any

from controlplane.xds import EnvoyStatus
from controlplane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, RUNTIME, SECRET

TYPES = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", SECRET: "SDS", RUNTIME: "RTDS"}
MAX_ROWS = 2_000
MAX_MESSAGE = 200


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


def pack(envoy_rows: list[dict[str, Any]]) -> str:
    """The rows for a Lease annotation: {"rows": [...], "left_out": N}, gzip, base64."""
    body = {"rows": envoy_rows[:MAX_ROWS], "left_out": max(0, len(envoy_rows) - MAX_ROWS)}
    return base64.b64encode(gzip.compress(json.dumps(body, separators=(",", ":")).encode(), mtime=0)).decode()


def unpack(text: str) -> tuple[list[dict[str, Any]], int]:
    """(rows, how many were left out); raises ValueError on what this version cannot read."""
    try:
        body = json.loads(gzip.decompress(base64.b64decode(text, validate=True)))
        found = body["rows"]
        if not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
            raise ValueError("rows is not a list of objects")
        return found, int(body.get("left_out", 0))
    except (OSError, EOFError, KeyError, TypeError, json.JSONDecodeError, base64.binascii.Error) as error:
        raise ValueError(f"unreadable Envoy list: {error}") from None
