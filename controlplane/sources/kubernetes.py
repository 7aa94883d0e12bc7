"""Kubernetes as a source: list, then watch, every kind we read, with the official client.

One reflector thread per kind (the official client is synchronous): list the collection, put it
in the store in one step, then watch from the list's resourceVersion with bookmarks. On 410 Gone
it lists again, and the store keeps the known state until that list has succeeded: a broken
watch never becomes an empty endpoint set. Any other failure (the API server restarting, a
dropped connection, a timeout) is retried with a short capped backoff, from the last
resourceVersion seen, so the source catches up within about a second of the API server's return.
Requests go through `ApiClient.call_api`, so kubeconfig, in-cluster service-account tokens and
TLS are the client's own; paths and raw JSON are ours, for every kind.

An outage is two log lines, not one per kind and retry: one when the API server stops
answering, one when it answers again (with how long it was away). A failing kind (403, 404) is
logged once per distinct error, and a 403 only once it outlasts the API server's RBAC cache
warming up at its start.

Nothing is published until every kind has been listed once: Envoy never sees Backends whose
Services have not been read yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kubernetes import client as k8s

from controlplane.model import crds
from controlplane.sources.kube_api import ApiError, Kind, KubeApi, brief
from controlplane.sources.store import ObjectKey, Store

log = logging.getLogger(__name__)


WATCHED = (
    Kind("Gateway", crds.GROUP, crds.VERSION, crds.PLURALS["Gateway"]),
    Kind("Backend", crds.GROUP, crds.VERSION, crds.PLURALS["Backend"]),
    Kind("Service", "", "v1", "services"),
    Kind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
    Kind("Secret", "", "v1", "secrets"),
)


# A 401/403 in the first seconds the API server answers is not yet worth a warning: a starting
# API server answers 403 to everyone for about 2 s while its RBAC cache loads, and 429 "storage is
# (re)initializing" for a moment before that.
RBAC_WARMUP = 5.0


class _Expired(Exception):
    """410 Gone: the resourceVersion we watch from is too old; list again."""


@dataclass
class Backoff:
    """Exponential backoff with equal jitter (a delay in [d/2, d]), reset after a success.

    Why these numbers: catch-up within 2 s of the API server's return means no reflector may be
    asleep for longer than about 1 s when it comes back, hence `cap` = 1 s (a 30 s cap once made
    catch-up take 8-21 s). Equal jitter keeps at least 0.5 s between retries at the cap, so a
    replica retries each kind at most twice a second: 10 requests/s for its five kinds, against a
    server that is down (a refused connection) or overloaded (where 429/5xx answers are cheap),
    and the replicas' retries are spread out rather than synchronized.
    """

    base: float = 0.2
    cap: float = 1.0
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class _Availability:
    """Whether the API server answers, shared by the reflectors: one log line per outage and return.

    "Answers" means any HTTP response (a 403 or a 503 is an answer, logged by its kind); no answer
    is a refused or broken connection or a timeout.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._lost_at: float | None = None
        self._answering_since = time.monotonic()

    def lost(self, error: Exception) -> None:
        with self._lock:
            if self._lost_at is not None:
                return
            self._lost_at = time.monotonic()
        log.warning("Kubernetes API server not answering (%s); serving the last known state, retrying every "
                    "second at most", brief(error))

    def answered(self) -> None:
        with self._lock:
            lost_at, self._lost_at = self._lost_at, None
            if lost_at is not None:
                self._answering_since = time.monotonic()
        if lost_at is not None:
            log.info("Kubernetes API server answering again after %.1fs; catching up", time.monotonic() - lost_at)

    def answering_for(self) -> float:
        """Seconds since the API server answered first (since the source started, or since an outage)."""
        return time.monotonic() - self._answering_since


class _Reflector:
    def __init__(self, source: KubernetesSource, kind: Kind):
        self.source = source
        self.kind = kind
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.backoff = Backoff(base=source.backoff_base)
        self._response = None
        self._logged_error: str | None = None  # logged once; repeats are not

    def run(self) -> None:
        while not self.source.stopping.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
            except _Expired:
                log.info("%s: resourceVersion %s expired (410 Gone); listing again, serving the known state meanwhile",
                         self.kind.plural, self.resource_version)
                self.resource_version = None
            except Exception as error:  # noqa: BLE001 -- any failure is retried; the known state stays served
                if self.source.stopping.is_set():
                    return
                self._report(error)
                self.source.stopping.wait(self.backoff.next_delay())

    def _succeeded(self) -> None:
        self.backoff.reset()
        if self._logged_error is not None:
            log.info("%s: listing and watching again", self.kind.plural)
            self._logged_error = None

    def _report(self, error: Exception) -> None:
        """Log a failure once: no answer through `_Availability`, an answer (403, 404) once per message."""
        if not isinstance(error, ApiError):
            self.source.availability.lost(error)
            return
        self.source.availability.answered()
        message = brief(error)
        if message == self._logged_error:
            return
        if error.status in (401, 403, 429) and self.source.availability.answering_for() < RBAC_WARMUP:
            return  # a starting API server answers 403 while its RBAC cache loads, 429 while its storage does
        self._logged_error = message
        log.warning("%s: %s; retrying (serving the last known state)%s", self.kind.plural, message, _hint(error))

    def _list(self) -> None:
        body = json.loads(self.source.get(self.kind.path(self.source.namespace), {}, timeout=30).read())
        items = []
        for item in body.get("items") or []:
            item.setdefault("kind", self.kind.kind)  # list items carry neither kind nor apiVersion
            item.setdefault("apiVersion", self.kind.api_version)
            items.append(item)
        self.source.store.replace_kind(self.kind.kind, items, self.source.namespace)
        if self.synced.is_set():
            self.source.relists[self.kind.kind] += 1
        self.resource_version = body["metadata"]["resourceVersion"]
        self._succeeded()
        self.synced.set()
        self.source.changed()

    def _watch(self) -> None:
        query = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": self.resource_version,
                 "timeoutSeconds": str(int(self.source.watch_timeout * random.uniform(1.0, 1.2)))}
        response = self.source.get(self.kind.path(self.source.namespace), query,
                                   timeout=self.source.watch_timeout * 1.2 + self.source.read_timeout)
        self._succeeded()
        self._response = response
        try:
            for event in _events(response):
                self._apply(event)
        finally:
            self._response = None
            response.response.release_conn()

    def _apply(self, event: dict) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        self.source.watch_events[self.kind.kind, str(kind)] += 1
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired()
            raise ApiError(obj.get("code", 500), obj.get("message", "watch error"))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.resource_version = version or self.resource_version
            return
        obj.setdefault("kind", self.kind.kind)
        if kind in ("ADDED", "MODIFIED"):
            self.source.store.put(obj)
        elif kind == "DELETED":
            self.source.store.delete(ObjectKey.of(obj))
        self.resource_version = version or self.resource_version
        self.source.changed()

    def interrupt(self) -> None:
        response = self._response
        if response is not None:
            try:
                response.response.shutdown()
            except Exception:  # noqa: BLE001 -- best effort while stopping
                pass


class KubernetesSource:
    """Watches Gateways, Backends, Services, EndpointSlices and Secrets (one namespace or all)."""

    def __init__(self, api_client: k8s.ApiClient, *, namespace: str | None = None, watch_timeout: float = 300,
                 read_timeout: float = 90, backoff_base: float = 0.2, kinds: tuple[Kind, ...] = WATCHED):
        self.api = KubeApi(api_client)
        self.namespace = namespace
        self.watch_timeout = watch_timeout
        self.read_timeout = read_timeout
        self.backoff_base = backoff_base
        self.store = Store()
        self.stopping = threading.Event()
        self.availability = _Availability()
        # For the metrics endpoint; each kind's reflector thread writes only its own keys.
        self.watch_events: Counter[tuple[str, str]] = Counter()  # (kind, event type)
        self.relists: Counter[str] = Counter()  # lists after a kind's first: its resourceVersion expired (410 Gone)
        self._reflectors = [_Reflector(self, kind) for kind in kinds]
        self._notify: Callable[[], None] = lambda: None

    def get(self, path: str, query: dict[str, str], *, timeout: float):
        response = self.api.request("GET", path, query=query, timeout=timeout)
        self.availability.answered()
        return response

    def synced(self) -> bool:
        return all(reflector.synced.is_set() for reflector in self._reflectors)

    def read_once(self) -> Store:
        """Every kind listed once, no watch (`render --source kubernetes`); raises what the API answers."""
        for reflector in self._reflectors:
            reflector._list()
        return self.store

    def changed(self) -> None:
        if self.synced():
            self._notify()

    async def watch(self, on_change: Callable[[Store], None]) -> None:
        """Call `on_change(store)` once every kind is listed, then after every change, until cancelled."""
        loop = asyncio.get_running_loop()
        self._notify = lambda: loop.call_soon_threadsafe(on_change, self.store)
        threads = [threading.Thread(target=r.run, name=f"watch-{r.kind.plural}", daemon=True)
                   for r in self._reflectors]
        for thread in threads:
            thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self.stopping.set()
            for reflector in self._reflectors:
                reflector.interrupt()


def _events(response) -> Iterator[dict]:
    """JSON watch events, one per line, from a streamed response."""
    pending = b""
    for chunk in response.response.stream(64 * 1024, decode_content=True):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _hint(error: Exception) -> str:
    if isinstance(error, ApiError) and error.status in (401, 403):
        return ". The control plane's service account may not list/watch this kind: apply k8s/rbac.yaml"
    if isinstance(error, ApiError) and error.status == 404:
        return ". If this is a Gateway or Backend, install the CRDs: kubectl apply -f k8s/crds/"
    return ""
