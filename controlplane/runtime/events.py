"""Kubernetes Events for refused Secret rotations, on the Gateway or Backend that uses the Secret.

A refused rotation keeps the last valid certificate serving, so nothing breaks yet: the risk is
that nobody notices until that certificate expires. Its log line and counter are for operators;
an Event is where the team that rotated the Secret looks (`kubectl describe gateway`,
`kubectl get events`), next to the object's ResolvedRefs condition.

Every replica translates the same objects, so every replica judges the same rotations; only the
leader posts their Events (one per rotation and object), the others drop theirs.
"""

from __future__ import annotations

import logging
from collections import deque

from controlplane.model import crds
from controlplane.sources.kube_api import ApiError, KubeApi, brief, timestamp
from controlplane.sources.store import StoreView
from controlplane.translate.secrets import Rotation
from controlplane.translate.to_ir import Translation

log = logging.getLogger(__name__)

REASON = "SecretRotationRefused"
PENDING_LIMIT = 100  # a burst of bad rotations beyond this is in the log and the counter, not in Events
MESSAGE_LIMIT = 1024  # what an Event's message holds


class RotationEvents:
    def __init__(self, *, component: str = "controlplane", instance: str = ""):
        self._component, self._instance = component, instance
        self._pending: deque[Rotation] = deque(maxlen=PENDING_LIMIT)
        self._refused: str | None = None  # the last refusal logged, so that repeats are not

    def collect(self, translation: Translation) -> None:
        """Keep the refused rotations `translation` judged (each translation judges a rotation once)."""
        self._pending.extend(rotation for rotation in translation.secret_rotations if rotation.failures)

    def drop(self) -> None:
        """Not the leader: the leader posts these."""
        self._pending.clear()

    def post(self, api: KubeApi, view: StoreView, now: float) -> int:
        """Post an Event for each pending rotation whose object still exists; returns how many. An
        Event the API server refuses (no RBAC for events, say) is logged once and dropped: it must
        not hold the status writes up. Without an answer (the API server away), the rest waits."""
        posted = 0
        while self._pending:
            rotation = self._pending[0]
            kind, _, where = rotation.user.partition(" ")
            namespace, _, name = where.partition("/")
            obj = view.get(kind, namespace, name)
            if obj is not None:
                try:
                    api.json("POST", f"/api/v1/namespaces/{namespace}/events",
                             body=self._event(rotation, kind, obj, now))
                    posted += 1
                except ApiError as error:
                    if brief(error) != self._refused:
                        log.warning("could not post an Event on %s %s/%s (%s): the refused rotation is in this log "
                                    "and its condition only", kind, namespace, name, brief(error))
                        self._refused = brief(error)
            self._pending.popleft()
        return posted

    def _event(self, rotation: Rotation, kind: str, obj: dict, now: float) -> dict:
        metadata = obj.get("metadata") or {}
        when = timestamp(now)
        return {
            "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": REASON,
            "metadata": {"generateName": f"{metadata.get('name')}.", "namespace": metadata.get("namespace")},
            "involvedObject": {"apiVersion": crds.API_VERSION, "kind": kind, "name": metadata.get("name"),
                               "namespace": metadata.get("namespace"), "uid": metadata.get("uid"),
                               "resourceVersion": metadata.get("resourceVersion")},
            "message": rotation.log_line()[:MESSAGE_LIMIT],
            "source": {"component": self._component}, "reportingComponent": self._component,
            "reportingInstance": self._instance, "firstTimestamp": when, "lastTimestamp": when, "count": 1,
        }
