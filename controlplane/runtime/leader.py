"""One writer of status among replicas: leader election on a coordination.k8s.io Lease.

Every replica serves xDS from its own watches; only the leader writes CRD status, so replicas never
fight over conditions. The algorithm is client-go's: the holder renews the Lease every
`retry_period`; another replica takes it over once `renewTime + leaseDurationSeconds` has passed;
updates carry the Lease's resourceVersion, so two replicas cannot both win (409 Conflict). A
replica stops acting as leader as soon as it could not renew in time, and releases the Lease on
shutdown so a peer takes over at once.

The Lease lives in the control plane's own namespace: `--lease-namespace`, else `POD_NAMESPACE`
(the Deployment sets it from the downward API), else the pod's ServiceAccount namespace file.
Never a guessed `default`: with the shipped RBAC that is a 403 every renewal and no status ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from controlplane.sources.kube_api import ApiError, Kind, KubeApi, brief, parse_timestamp, timestamp

log = logging.getLogger(__name__)

LEASE = Kind("Lease", "coordination.k8s.io", "v1", "leases")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# A starting API server answers 403 to everyone for about 2 s while its RBAC cache loads.
RBAC_WARMUP = 5.0


class NamespaceUnknown(Exception):
    """No namespace for the Lease and what the control plane keeps; the message says what to set."""


def own_namespace(flag: str | None, environ: Mapping[str, str],
                  service_account_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """Where the Leases and the last accepted state live: --lease-namespace, else POD_NAMESPACE,
    else the pod's ServiceAccount namespace file."""
    if flag:
        return flag
    if environ.get("POD_NAMESPACE"):
        return environ["POD_NAMESPACE"]
    try:
        found = service_account_file.read_text().strip()
    except OSError:
        found = ""
    if found:
        return found
    raise NamespaceUnknown(
        "cannot tell which namespace the control plane's Leases and last accepted state live in: pass "
        f"--lease-namespace (e.g. controlplane-system), or set POD_NAMESPACE; in a pod, {service_account_file} "
        "says it, but it is not there")


class RbacWarmUp:
    """Tells a 401/403 worth a warning from a starting API server's: for RBAC_WARMUP seconds after
    the API server answers (first, or again after not answering), a 401/403 is kept quiet."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._answering_since: float | None = None

    def quiet(self, error: Exception | None) -> bool:
        """Call after every attempt (`error` None when it worked); True for a 401/403 to keep quiet."""
        now = self._clock()
        if error is not None and not isinstance(error, ApiError):  # no answer at all
            self._answering_since = None
            return False
        if self._answering_since is None:
            self._answering_since = now
        return (isinstance(error, ApiError) and error.status in (401, 403)
                and now - self._answering_since < RBAC_WARMUP)


def rbac_hint(error: Exception, namespace: str) -> str:
    if isinstance(error, ApiError) and error.status in (401, 403):
        return (f". The control plane's ServiceAccount may not get/create/update Leases in namespace {namespace!r}: "
                "apply k8s/controlplane/rbac.yaml, and run in (or pass --lease-namespace) the namespace it names")
    return ""


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
        """Acquire or renew every `retry_period`. Each change of role is one log line (losing it too,
        with why); a failure is logged once until it changes, and a 401/403 only once it outlasts
        the API server's RBAC warm-up (a starting API server answers 403 for about 2 s)."""
        leading, failing, warm_up = False, None, RbacWarmUp()
        while True:
            error = None
            try:
                await asyncio.to_thread(self.try_acquire_or_renew)
            except Exception as failure:  # noqa: BLE001 -- the API server away must not stop the control plane
                error = failure
            quiet = warm_up.quiet(error)
            if error is None and failing is not None:
                log.info("leader election: the Lease %s/%s answers again", self._namespace, self._name)
                failing = None
            elif error is not None and brief(error) != failing:
                if not quiet:
                    log.warning("leader election: %s; retrying every %.0fs%s", brief(error), self.retry_period,
                                rbac_hint(error, self._namespace))
                    failing = brief(error)
            if self.is_leader != leading:
                leading = self.is_leader
                if leading:
                    log.info("now the status writer (holding the Lease %s/%s as %s)", self._namespace, self._name,
                             self.identity)
                else:
                    log.warning("no longer the status writer: the Lease %s/%s %s; another replica writes status",
                                self._namespace, self._name,
                                f"could not be renewed in time ({brief(error)})" if error is not None
                                else "is held by another replica")
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
