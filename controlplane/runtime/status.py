"""CRD status: translation's conditions, with `Programmed` from what the Envoys did with them.

`Programmed` is True once every Envoy of the object's node group, on every replica, has accepted
what it was sent; False, with Envoy's own message, when an Envoy rejected a resource this object
produced (the Envoy keeps serving its last accepted configuration); Unknown while no Envoy is
connected or a push is in flight. Other replicas' Envoys come from their records (runtime/fleet.py).

Only the leader writes, and only what differs from the object's current status as the watch last
saw it (a merge patch of /status, with that resourceVersion as a precondition): a new leader, an
API server back after an outage, or an object deleted and created again under the same name each
get exactly the writes that change something, and `lastTransitionTime` stays as it is while a
condition's status does not change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from controlplane.model import crds
from controlplane.runtime import envoy_rows
from controlplane.runtime.events import RotationEvents
from controlplane.runtime.fleet import EnvoyRecords, GroupEnvoys, fleet, summarize
from controlplane.runtime.leader import LeaderElection, RbacWarmUp, rbac_hint
from controlplane.sources.kube_api import ApiError, KubeApi, brief, timestamp
from controlplane.sources.kubernetes import WATCHED
from controlplane.sources.store import ObjectKey, StoreView
from controlplane.translate import capacity
from controlplane.translate.to_ir import Translation
from controlplane.xds import SnapshotCache

log = logging.getLogger(__name__)

KINDS = {kind.kind: kind for kind in WATCHED if kind.group == crds.GROUP}
CONDITION_FIELDS = ("type", "status", "reason", "message", "observedGeneration", "lastTransitionTime")


def with_programmed(translation: Translation, groups: Mapping[str, GroupEnvoys]) -> dict[ObjectKey, list[crds.Condition]]:
    """Every object's conditions, its Programmed condition decided by its node group's Envoys
    (`groups`: from `summarize` of this replica's Envoys, or `fleet` of every replica's)."""
    nobody = GroupEnvoys()
    produced: dict[ObjectKey, set[str]] = {}
    for resource, origin in translation.origins.items():
        produced.setdefault(origin, set()).add(resource)
    result = {}
    for key, conditions in translation.conditions.items():
        conditions = list(conditions)
        group = translation.node_groups.get(key)
        if group is not None:  # served: as it is, in part, or its last accepted version
            conditions[2] = _programmed(conditions[2], group, produced.get(key, set()), groups.get(group, nobody))
        result[key] = conditions
    return result


def _programmed(pending: crds.Condition, group: str, resources: set[str], envoys: GroupEnvoys) -> crds.Condition:
    generation = pending.observed_generation
    for rejection in envoys.rejections:
        if resources & rejection.resources:
            rejected = ", ".join(sorted(resources & rejection.resources))
            who = f"Envoy {rejection.node_id}"
            if rejection.envoys > 1:
                who += f" (and {rejection.envoys - 1} more)"
            if rejection.replica:
                who += f", connected to replica {rejection.replica},"
            return crds.Condition(type="Programmed", status="False", reason="Rejected",
                                  message=f"{who} rejected {rejected}: {rejection.message}. It keeps "
                                          "serving its last accepted configuration; fix this object.",
                                  observed_generation=generation)
    if not envoys.envoys:
        return crds.Condition(type="Programmed", status="Unknown", reason="NoEnvoys",
                              message=f"No Envoy of node cluster {group!r} is connected.",
                              observed_generation=generation)
    if not envoys.pending:
        return crds.Condition(type="Programmed", status="True", reason="Programmed",
                              message=f"Accepted by {envoys.envoys} Envoy(s) of node cluster {group!r}.",
                              observed_generation=generation)
    if envoys.behind:
        return crds.Condition(type="Programmed", status="Unknown", reason="Pending",
                              message=f"Replica(s) {', '.join(envoys.behind)} have not yet sent the current "
                                      f"configuration to their Envoys of node cluster {group!r}.",
                              observed_generation=generation)
    return pending


class StatusWriter:
    """The leader's status writes; every replica's record of its own Envoys (with `records`)."""

    def __init__(self, api: KubeApi, cache: SnapshotCache, leader: LeaderElection, *,
                 objects: Callable[[], StoreView], records: EnvoyRecords | None = None,
                 clock: Callable[[], float] = time.time, envoys: Callable[[], Mapping[str, int]] = dict,
                 budget_use: Callable[[], list] = list):
        self._api = api
        self._cache = cache
        self._leader = leader
        self._objects = objects
        self._records = records
        self._clock = clock
        self._envoys = envoys  # per node group: the Envoys Gateway-wide budgets are shared among
        self._budget_use = budget_use  # what this replica's Envoys report (envoy_stats.budget_use), for its record
        self._translation: Translation | None = None
        self._rotation_events = RotationEvents(instance=leader.identity)
        self._written: dict[ObjectKey, tuple[str, str, tuple[list[dict], list[dict] | None], str]] = {}
        """What this replica wrote: (the object's uid and resourceVersion before, the conditions and
        the budgets (None: not a Backend), its resourceVersion after). Until the watch brings a newer version of the object, that write is
        its current status."""

    def update(self, translation: Translation) -> None:
        self._translation = translation
        self._rotation_events.collect(translation)

    async def run(self, interval: float = 1.0) -> None:
        """A pass every `interval`; a failure is logged once until it changes (a 401/403 only after
        the API server's RBAC warm-up), and its end once."""
        failing: str | None = None
        warm_up = RbacWarmUp()
        while True:
            try:
                await asyncio.to_thread(self.write_pass)
                warm_up.quiet(None)
                if failing is not None:
                    log.info("writing status (and this replica's Envoy record) works again")
                    failing = None
            except Exception as error:  # noqa: BLE001 -- the API server away must not stop the control plane
                if not warm_up.quiet(error) and brief(error) != failing:
                    log.warning("writing status or this replica's Envoy record: %s; retrying every %.0fs%s",
                                brief(error), interval, rbac_hint(error, self._leader.namespace))
                    failing = brief(error)
            await asyncio.sleep(interval)

    def _snapshots(self, groups: Iterable[str]) -> dict[str, str]:
        """The version of the snapshot this replica serves each of `groups`."""
        found = {group: self._cache.snapshot(group) for group in groups}
        return {group: snapshot.version for group, snapshot in found.items() if snapshot is not None}

    def write_pass(self) -> int:
        """Record this replica's Envoys; as the leader, write every status that differs. Returns the writes."""
        envoys = self._cache.status()
        local = summarize(envoys, self._snapshots({envoy.node_group for envoy in envoys}))
        if self._records is not None:
            self._records.publish(local, envoy_rows.pack(envoy_rows.rows(envoys, self._records.identity),
                                                         [dataclasses.asdict(use) for use in self._budget_use()]))
        translation = self._translation
        if not self._leader.is_leader or translation is None:
            self._rotation_events.drop()
            return 0
        if self._records is not None:
            local = fleet(local, self._records.peers(), self._snapshots(translation.groups))
        view = self._objects()
        writes = self.write_changed(translation, local, view)
        self._rotation_events.post(self._api, view, self._clock())
        return writes

    def write_changed(self, translation: Translation, groups: Mapping[str, GroupEnvoys], view: StoreView) -> int:
        writes = 0
        budgets = computed_budgets(translation, self._envoys())
        for key, conditions in sorted(with_programmed(translation, groups).items()):
            current = view.get(*key)
            if current is None:  # deleted since it was translated
                self._written.pop(key, None)
                continue
            metadata = current.get("metadata") or {}
            uid, version = metadata.get("uid", ""), metadata.get("resourceVersion", "")
            written = self._written.get(key)
            if written is not None and written[:2] == (uid, version):  # the watch has not brought our write back yet
                (before, budgets_before), version = written[2], written[3]
            else:
                status = current.get("status") or {}
                before = _our_fields(status.get("conditions"))
                budgets_before = status.get("budgets") if key.kind == "Backend" else None
            body = [self._as_status(condition, before) for condition in conditions]
            # A refused Backend never served has no budgets: an empty list, not a stale one.
            budget_body = budgets.get(key, []) if key.kind == "Backend" else None
            if body == before and (budget_body is None or budget_body == (budgets_before or [])):
                continue
            status_body: dict = {"conditions": body}
            if budget_body is not None:
                status_body["budgets"] = budget_body
            try:
                # resourceVersion: a precondition, so what was computed for a version the watch has not
                # caught up with (changed, or deleted and created again) is not written over a newer one.
                written_now = self._api.json(
                    "PATCH", KINDS[key.kind].path(key.namespace, key.name, "status"),
                    body={"metadata": {"resourceVersion": version}, "status": status_body},
                    content_type="application/merge-patch+json")
            except ApiError as error:
                # 404: deleted meanwhile; 409: changed meanwhile: the watch brings it, and the next pass sees it.
                if error.status not in (404, 409):
                    log.warning("could not write the status of %s: %s", key, error)
                continue
            self._written[key] = (uid, metadata.get("resourceVersion", ""), (body, budget_body),
                                  (written_now.get("metadata") or {}).get("resourceVersion", ""))
            writes += 1
        for key in self._written.keys() - translation.conditions.keys():
            del self._written[key]
        return writes

    def _as_status(self, condition: crds.Condition, previous: list[dict]) -> dict:
        body = condition.model_dump(by_alias=True, exclude={"last_transition_time"})
        before = next((p for p in previous if p.get("type") == condition.type), None)
        unchanged = before is not None and before.get("status") == condition.status and before.get("lastTransitionTime")
        body["lastTransitionTime"] = before["lastTransitionTime"] if unchanged else timestamp(self._clock())
        return body


def computed_budgets(translation: Translation, envoys: Mapping[str, int]) -> dict[ObjectKey, list[dict]]:
    """Each served Backend's budgets as each Envoy runs them (status.budgets), by object."""
    found: dict[ObjectKey, list[dict]] = {}
    for name, group in translation.groups.items():
        count = max(1, envoys.get(name, 1))
        for backend in group.backends:
            key = translation.origins.get(backend.name)
            if key is None or key.kind != "Backend":
                continue
            ready = capacity.ready_endpoints(backend.endpoints)
            budgets = [(backend.name, "Default", backend.default_budget), (backend.name, "High", backend.high_budget)]
            if backend.websocket is not None:
                budgets.append((backend.websocket.name, "Default", backend.websocket.budget))
            found[key] = [_budget_status(cluster, priority, budget, ready, count) for cluster, priority, budget in budgets]
    return found


def _budget_status(cluster: str, priority: str, budget, ready: int, envoys: int) -> dict:
    shared = budget.gateway_wide
    entry = {"cluster": cluster, "priority": priority, "scope": "Gateway" if shared else "Envoy",
             "readyEndpoints": ready, "envoys": envoys if shared else 1}
    for field, name in (("max_connections", "maxConnections"), ("max_pending_requests", "maxPendingRequests"),
                        ("max_requests", "maxRequests")):
        value = getattr(budget, field)
        if value is not None:
            entry[name] = capacity.share(value, envoys) if shared else value
    return entry


def _our_fields(conditions: Any) -> list[dict]:
    """An object's conditions as this writer writes them (fields it does not write left out)."""
    if not isinstance(conditions, list):
        return []
    return [{name: c[name] for name in CONDITION_FIELDS if name in c} for c in conditions if isinstance(c, dict)]
