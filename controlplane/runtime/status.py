"""CRD status: translation's conditions, with `Programmed` from what the Envoys did with them.

`Programmed` is True once every connected Envoy of the object's node group has accepted what it
was sent; False, with Envoy's own message, when an Envoy rejected a resource this object produced
(the Envoy keeps serving its last accepted configuration); Unknown while no Envoy is connected or
a push is in flight. Only the leader writes, and only what changed (a merge patch of /status).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from controlplane.model import crds
from controlplane.runtime.leader import LeaderElection
from controlplane.sources.kube_api import ApiError, KubeApi, brief, timestamp
from controlplane.sources.kubernetes import WATCHED
from controlplane.sources.store import ObjectKey
from controlplane.translate.to_ir import Translation
from controlplane.xds import EnvoyStatus, SnapshotCache

log = logging.getLogger(__name__)

KINDS = {kind.kind: kind for kind in WATCHED if kind.group == crds.GROUP}


class _GroupEnvoys:
    """What the Envoys of one node group did, read once per status pass (not once per object)."""

    def __init__(self, envoys: list[EnvoyStatus]):
        self.count = len(envoys)
        self.rejections = [(envoy.node_id, nack, frozenset(nack.resource_names)) for envoy in envoys
                           for state in envoy.types.values() if (nack := state.rejected) is not None]
        self.all_accepted = all(state.version_acked == state.version_sent
                                for envoy in envoys for state in envoy.types.values())


def with_programmed(translation: Translation, envoys: Iterable[EnvoyStatus]) -> dict[ObjectKey, list[crds.Condition]]:
    """Every object's conditions, its Programmed condition decided by the Envoys' ACKs and NACKs."""
    by_group: dict[str, list[EnvoyStatus]] = {}
    for envoy in envoys:
        by_group.setdefault(envoy.node_group, []).append(envoy)
    groups = {group: _GroupEnvoys(members) for group, members in by_group.items()}
    nobody = _GroupEnvoys([])
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


def _programmed(pending: crds.Condition, group: str, resources: set[str], envoys: _GroupEnvoys) -> crds.Condition:
    generation = pending.observed_generation
    for node_id, nack, names in envoys.rejections:
        if resources & names:
            rejected = ", ".join(sorted(resources & names))
            return crds.Condition(type="Programmed", status="False", reason="Rejected",
                                  message=f"Envoy {node_id} rejected {rejected}: {nack.message}. It keeps "
                                          "serving its last accepted configuration; fix this object.",
                                  observed_generation=generation)
    if not envoys.count:
        return crds.Condition(type="Programmed", status="Unknown", reason="NoEnvoys",
                              message=f"No Envoy of node cluster {group!r} is connected.",
                              observed_generation=generation)
    if envoys.all_accepted:
        return crds.Condition(type="Programmed", status="True", reason="Programmed",
                              message=f"Accepted by {envoys.count} Envoy(s) of node cluster {group!r}.",
                              observed_generation=generation)
    return pending


class StatusWriter:
    def __init__(self, api: KubeApi, cache: SnapshotCache, leader: LeaderElection, *,
                 clock: Callable[[], float] = time.time):
        self._api = api
        self._cache = cache
        self._leader = leader
        self._clock = clock
        self._translation: Translation | None = None
        self._written: dict[ObjectKey, list[dict]] = {}

    def update(self, translation: Translation) -> None:
        self._translation = translation

    async def run(self, interval: float = 1.0) -> None:
        while True:
            if self._leader.is_leader and self._translation is not None:
                try:
                    await asyncio.to_thread(self.write_changed, self._translation, self._cache.status())
                except Exception as error:  # noqa: BLE001 -- the API server away must not stop the control plane
                    log.warning("writing status: %s; retrying in %.0fs", brief(error), interval)
            else:
                self._written.clear()  # a new term starts from what is in the API server
            await asyncio.sleep(interval)

    def write_changed(self, translation: Translation, envoys: list[EnvoyStatus]) -> None:
        for key, conditions in sorted(with_programmed(translation, envoys).items()):
            previous = self._written.get(key, [])
            body = [self._as_status(condition, previous) for condition in conditions]
            if body == previous:
                continue
            try:
                self._api.json("PATCH", KINDS[key.kind].path(key.namespace, key.name, "status"),
                               body={"status": {"conditions": body}}, content_type="application/merge-patch+json")
                self._written[key] = body
            except ApiError as error:
                if error.status != 404:  # deleted meanwhile: nothing to write
                    log.warning("could not write the status of %s: %s", key, error)

    def _as_status(self, condition: crds.Condition, previous: list[dict]) -> dict:
        body = condition.model_dump(by_alias=True, exclude={"last_transition_time"})
        before = next((p for p in previous if p["type"] == condition.type), None)
        unchanged = before is not None and before["status"] == condition.status
        body["lastTransitionTime"] = before["lastTransitionTime"] if unchanged else timestamp(self._clock())
        return body
