"""One writer of status among replicas: leader election on a coordination.k8s.io Lease.

Every replica serves xDS from its own watches; only the leader writes CRD status, so replicas never
fight over conditions. The algorithm is client-go's: the holder renews the Lease every
`retry_period`; another replica takes it over once `renewTime + leaseDurationSeconds` has passed;
updates carry the Lease's resourceVersion, so two replicas cannot both win (409 Conflict). A
replica stops acting as leader as soon as it could not renew in time, and releases the Lease on
shutdown so a peer takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from controlplane.sources.kube_api import ApiError, Kind, KubeApi, brief, parse_timestamp, timestamp

log = logging.getLogger(__name__)

LEASE = Kind("Lease", "coordination.k8s.io", "v1", "leases")


class LeaderElection:
    def __init__(self, api: KubeApi, *, namespace: str, identity: str, name: str = "controlplane-status-writer",
                 lease_duration: float = 15.0, retry_period: float = 2.0, clock: Callable[[], float] = time.time):
        self.api = api
        self._path = LEASE.path(namespace, name)
        self._collection = LEASE.path(namespace)
        self._name, self._namespace = name, namespace
        self.namespace = namespace  # the control plane's own: where what it owns lives
        self.identity = identity
        self.lease_duration = lease_duration
        self.retry_period = retry_period
        self._clock = clock
        self._held_until = 0.0

    @property
    def is_leader(self) -> bool:
        return self._clock() < self._held_until

    def try_acquire_or_renew(self) -> bool:
        now = self._clock()
        try:
            lease = self.api.json("GET", self._path)
        except ApiError as error:
            if error.status != 404:
                raise
            return self._write("POST", self._collection, self._lease_body(now, transitions=0), now)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        expired = parse_timestamp(spec.get("renewTime")) + spec.get("leaseDurationSeconds", self.lease_duration) < now
        if holder not in ("", self.identity) and not expired:
            self._held_until = 0.0
            return False
        transitions = spec.get("leaseTransitions", 0) + (0 if holder == self.identity else 1)
        body = self._lease_body(now, transitions=transitions,
                                acquired=spec.get("acquireTime") if holder == self.identity else None)
        body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
        if holder != self.identity:
            log.info("taking the status-writer Lease %s/%s from %r", self._namespace, self._name, holder or "nobody")
        return self._write("PUT", self._path, body, now)

    def release(self) -> None:
        """Give the Lease up (on shutdown) so another replica takes over without waiting for expiry."""
        if not self.is_leader:
            return
        self._held_until = 0.0
        try:
            lease = self.api.json("GET", self._path)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                self.api.json("PUT", self._path, body=lease)
        except Exception as error:  # noqa: BLE001 -- best effort at shutdown
            log.warning("could not release the Lease (a peer takes over when it expires): %s", error)

    async def run(self) -> None:
        while True:
            try:
                was_leader = self.is_leader
                leading = await asyncio.to_thread(self.try_acquire_or_renew)
                if leading != was_leader:
                    log.info("%s the status writer", "now" if leading else "no longer")
            except Exception as error:  # noqa: BLE001 -- the API server away must not stop the control plane
                log.warning("leader election: %s; retrying in %.0fs", brief(error), self.retry_period)
            await asyncio.sleep(self.retry_period)

    def _lease_body(self, now: float, *, transitions: int, acquired: str | None = None) -> dict:
        return {"apiVersion": LEASE.api_version, "kind": "Lease",
                "metadata": {"name": self._name, "namespace": self._namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_duration),
                         "acquireTime": acquired or timestamp(now), "renewTime": timestamp(now),
                         "leaseTransitions": transitions}}

    def _write(self, method: str, path: str, body: dict, now: float) -> bool:
        try:
            self.api.json(method, path, body=body)
        except ApiError as error:
            if error.status in (409,):  # someone else won the race
                self._held_until = 0.0
                return False
            raise
        # Peers may take over at renewTime + leaseDuration; stop acting well before (client-go's renew deadline).
        self._held_until = now + self.lease_duration * 2 / 3
        return True
