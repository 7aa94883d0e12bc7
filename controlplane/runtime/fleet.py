"""Every replica's Envoys, as the leader sees them: one small record per replica, in a Lease of its own.

Why: each replica serves its own Envoys over xDS, and only the leader writes status. Were the
leader to count only its own Envoys, an object would read `Programmed=Unknown NoEnvoys` while the
follower's Envoys serve it, and a follower's NACK would never be reported. So every replica sums
up its Envoys per node group (how many, how many have not yet acknowledged what they were sent,
which resources they reject with Envoy's message, and the snapshot version it serves them) and
keeps that summary in a `coordination.k8s.io` Lease named after itself (`controlplane-envoys-<pod>`,
JSON in an annotation). It writes the Lease when the summary changes, and renews it at least every
third of its duration. The leader lists these Leases, ignores its own (it reads its live state)
and any whose `renewTime + leaseDurationSeconds` has passed (a dead replica's Envoys reconnected
elsewhere), and deletes expired ones; a replica deletes its own on shutdown.

A record is bounded: at most 20 distinct rejections per node group (the same rejection by many
Envoys is one entry, with a count), each message cut at 500 characters.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from controlplane.sources.kube_api import ApiError, KubeApi, parse_timestamp, timestamp
from controlplane.runtime import envoy_rows
from controlplane.runtime.leader import LEASE
from controlplane.xds import EnvoyStatus

log = logging.getLogger(__name__)

RECORD_LABEL = "xds.controlplane.dev/envoy-record"
SUMMARY_ANNOTATION = "xds.controlplane.dev/envoys"
ROWS_ANNOTATION = "xds.controlplane.dev/envoy-list"
"""Each Envoy's row (runtime/envoy_rows.py), for `controlplane status`: written with the summary,
and when only rows changed (versions moving) at most every `ROWS_EVERY` seconds."""
ROWS_EVERY = 2.0
MAX_REJECTIONS = 20
MAX_MESSAGE = 500


@dataclass(frozen=True)
class Rejection:
    """Envoys of one node group rejecting `resources` with `message` (the first Envoy's id, how many)."""

    node_id: str
    resources: frozenset[str]
    message: str
    envoys: int = 1
    replica: str = ""


@dataclass(frozen=True)
class GroupEnvoys:
    """The Envoys of one node group on one or more replicas."""

    envoys: int = 0
    pending: int = 0
    """Envoys that have not acknowledged what they were last sent (or whose replica serves an older snapshot)."""
    rejections: tuple[Rejection, ...] = ()
    snapshot: str = ""
    """The version of the snapshot the replica serves this node group ("" for none)."""
    behind: tuple[str, ...] = field(default=())
    """Replicas serving this node group another snapshot than the leader's (their Envoys count as pending)."""

    def merged(self, other: GroupEnvoys) -> GroupEnvoys:
        return GroupEnvoys(self.envoys + other.envoys, self.pending + other.pending,
                           self.rejections + other.rejections, self.snapshot or other.snapshot,
                           self.behind + other.behind)


def summarize(envoys: Iterable[EnvoyStatus], snapshots: Mapping[str, str] | None = None) -> dict[str, GroupEnvoys]:
    """This replica's Envoys per node group; `snapshots`: the version it serves each group."""
    counts: dict[str, list[int]] = {}
    rejections: dict[str, dict[tuple[frozenset[str], str], Rejection]] = {}
    for envoy in envoys:
        count = counts.setdefault(envoy.node_group, [0, 0])
        count[0] += 1
        if any(state.version_acked != state.version_sent for state in envoy.types.values()):
            count[1] += 1
        found = rejections.setdefault(envoy.node_group, {})
        for state in envoy.types.values():
            nack = state.rejected
            if nack is None:
                continue
            key = (frozenset(nack.resource_names), nack.message[:MAX_MESSAGE])
            seen = found.get(key)
            if seen is not None:
                found[key] = replace(seen, envoys=seen.envoys + 1)
            elif len(found) < MAX_REJECTIONS:
                found[key] = Rejection(envoy.node_id, key[0], key[1])
    snapshots = snapshots or {}
    return {group: GroupEnvoys(envoys, pending, tuple(rejections.get(group, {}).values()), snapshots.get(group, ""))
            for group, (envoys, pending) in counts.items()}


def fleet(local: Mapping[str, GroupEnvoys], peers: Iterable[tuple[str, Mapping[str, GroupEnvoys]]],
          snapshots: Mapping[str, str]) -> dict[str, GroupEnvoys]:
    """The leader's Envoys and its peers', per node group (`snapshots`: the version the leader serves
    each group). A peer serving a group another snapshot has not caught up yet (or is ahead): its
    Envoys count as pending, whatever they acknowledged."""
    result = dict(local)
    for replica, groups in peers:
        for group, envoys in groups.items():
            behind = bool(envoys.envoys) and envoys.snapshot != snapshots.get(group, "")
            theirs = GroupEnvoys(envoys.envoys, envoys.envoys if behind else envoys.pending,
                                 tuple(replace(r, replica=replica) for r in envoys.rejections),
                                 behind=(replica,) if behind else ())
            result[group] = result.get(group, GroupEnvoys()).merged(theirs)
    return result


def to_json(groups: Mapping[str, GroupEnvoys]) -> str:
    return json.dumps({group: {"envoys": g.envoys, "pending": g.pending, "snapshot": g.snapshot,
                               "rejections": [{"node": r.node_id, "resources": sorted(r.resources),
                                               "message": r.message, "envoys": r.envoys} for r in g.rejections]}
                       for group, g in sorted(groups.items())}, sort_keys=True, separators=(",", ":"))


def from_json(text: str) -> dict[str, GroupEnvoys]:
    """A peer's record; raises ValueError (or KeyError, TypeError) on one this version cannot read."""
    return {str(group): GroupEnvoys(int(g["envoys"]), int(g["pending"]),
                                    tuple(Rejection(str(r["node"]), frozenset(map(str, r["resources"])),
                                                    str(r["message"])[:MAX_MESSAGE], int(r["envoys"]))
                                          for r in g["rejections"][:MAX_REJECTIONS]), str(g["snapshot"]))
            for group, g in json.loads(text).items()}


def record_name(identity: str) -> str:
    """A Lease name (a DNS subdomain) for a replica: its pod name, or host-pid outside a pod."""
    cleaned = re.sub(r"[^a-z0-9.-]+", "-", identity.lower()).strip("-.") or "replica"
    return f"controlplane-envoys-{cleaned}"[:253].rstrip("-.")


class EnvoyRecords:
    """This replica's record (written), and its unexpired peers' (read by the leader)."""

    def __init__(self, api: KubeApi, *, namespace: str, identity: str, duration: float = 15.0,
                 clock: Callable[[], float] = time.time):
        self._api = api
        self.namespace = namespace
        self.identity = identity
        self.name = record_name(identity)
        self.duration = duration
        self._clock = clock
        self._written: tuple[str, float, str | None] | None = None  # (summary, when, rows)
        self._version: str | None = None  # the record's resourceVersion after this replica's last write
        self._unreadable: set[str] = set()

    def publish(self, groups: Mapping[str, GroupEnvoys], rows: str | None = None) -> bool:
        """Write this replica's record if its summary changed, its Envoys' `rows` (envoy_rows.pack)
        changed `ROWS_EVERY` seconds after the last write, or a third of its duration passed;
        returns whether it wrote."""
        now = self._clock()
        summary = to_json(groups)
        if self._written is not None:
            summary_was, when, rows_were = self._written
            due = now - when >= self.duration / 3 or (rows != rows_were and now - when >= ROWS_EVERY)
            if summary_was == summary and not due:
                return False
        annotations = {SUMMARY_ANNOTATION: summary}
        if rows is not None:
            annotations[ROWS_ANNOTATION] = rows
        body = {"apiVersion": LEASE.api_version, "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace, "labels": {RECORD_LABEL: "true"},
                             "annotations": annotations},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                         "renewTime": timestamp(now)}}
        self._write(body)
        self._written = (summary, now, rows)
        return True

    def _write(self, body: dict) -> None:
        """PUT over the version last seen (a GET first when none is), POST when there is none yet."""
        path = LEASE.path(self.namespace, self.name)
        for _attempt in range(2):
            if self._version is None:
                try:
                    self._version = self._api.json("GET", path)["metadata"]["resourceVersion"]
                except ApiError as error:
                    if error.status != 404:
                        raise
                    self._version = self._api.json("POST", LEASE.path(self.namespace), body=body)["metadata"][
                        "resourceVersion"]
                    return
            body["metadata"]["resourceVersion"] = self._version
            try:
                self._version = self._api.json("PUT", path, body=body)["metadata"]["resourceVersion"]
                return
            except ApiError as error:
                self._version = None  # changed or deleted meanwhile (by the leader, after a long pause): again
                if error.status not in (404, 409):
                    raise
        raise ApiError(409, f"Lease {self.namespace}/{self.name} keeps changing under this replica")

    def peers(self) -> list[tuple[str, dict[str, GroupEnvoys]]]:
        """Every other replica's groups, from records renewed within their duration; expired records
        (replicas gone) are deleted."""
        listed = self._api.json("GET", LEASE.path(self.namespace), query={"labelSelector": f"{RECORD_LABEL}=true"})
        now = self._clock()
        found = []
        for lease in listed.get("items") or []:
            metadata, spec = lease.get("metadata") or {}, lease.get("spec") or {}
            name = metadata.get("name", "")
            if name == self.name or (metadata.get("labels") or {}).get(RECORD_LABEL) != "true":
                continue
            renewed = parse_timestamp(spec.get("renewTime"))
            if renewed + (spec.get("leaseDurationSeconds") or self.duration) < now:
                self._delete_expired(name)
                continue
            try:
                groups = from_json((metadata.get("annotations") or {}).get(SUMMARY_ANNOTATION) or "{}")
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                if name not in self._unreadable:  # a replica of another version: say so once
                    log.warning("Lease %s/%s: cannot read its Envoys' summary (%r); its Envoys are not counted "
                                "in Programmed", self.namespace, name, error)
                    self._unreadable.add(name)
                continue
            found.append((spec.get("holderIdentity") or name, groups))
        return sorted(found, key=lambda peer: peer[0])

    def remove(self) -> None:
        """Delete this replica's record (on shutdown: its Envoys reconnect to another replica)."""
        try:
            self._api.json("DELETE", LEASE.path(self.namespace, self.name))
        except ApiError as error:
            if error.status != 404:
                raise
        self._written = self._version = None

    def _delete_expired(self, name: str) -> None:
        try:
            self._api.json("DELETE", LEASE.path(self.namespace, name))
            log.info("deleted the expired Envoy record %s/%s (its replica is gone)", self.namespace, name)
        except ApiError as error:
            if error.status != 404:
                log.warning("could not delete the expired Envoy record %s/%s: %s", self.namespace, name, error)


@dataclass(frozen=True)
class ReplicaEnvoys:
    """One replica's record as `controlplane status` reads it."""

    replica: str
    rows: list
    left_out: int
    expired: bool
    problem: str = ""
    budgets: list = field(default_factory=list)
    budgets_left_out: int = 0


def every_replica(api: KubeApi, namespace: str, clock: Callable[[], float] = time.time) -> list[ReplicaEnvoys]:
    """Every replica's Envoy rows from the records in `namespace` (expired ones marked, not dropped:
    whoever reads them is told)."""
    listed = api.json("GET", LEASE.path(namespace), query={"labelSelector": f"{RECORD_LABEL}=true"})
    found = []
    for lease in listed.get("items") or []:
        metadata, spec = lease.get("metadata") or {}, lease.get("spec") or {}
        replica = spec.get("holderIdentity") or metadata.get("name", "")
        expired = parse_timestamp(spec.get("renewTime")) + (spec.get("leaseDurationSeconds") or 15) < clock()
        packed = (metadata.get("annotations") or {}).get(ROWS_ANNOTATION)
        if packed is None:
            found.append(ReplicaEnvoys(replica, [], 0, expired, "its record has no Envoy list (an older version)"))
            continue
        try:
            record = envoy_rows.unpack(packed)
        except ValueError as error:
            found.append(ReplicaEnvoys(replica, [], 0, expired, str(error)))
            continue
        found.append(ReplicaEnvoys(replica, record.rows, record.left_out, expired, budgets=record.budgets,
                                   budgets_left_out=record.budgets_left_out))
    return sorted(found, key=lambda record: record.replica)
