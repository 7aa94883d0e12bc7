"""Kubernetes as a source: list, then watch, every kind we read, with the official client.

One reflector thread per kind (the official client is synchronous): list the collection, put it
in the store in one step, then watch from the list's resourceVersion with bookmarks. On 410 Gone
it lists again, and the store keeps the known state until that list has succeeded: a broken
watch never becomes an empty endpoint set. Any other failure (the API server restarting, a
dropped connection, a timeout) is retried with exponential backoff and full jitter, from the last
resourceVersion seen. Requests go through `ApiClient.call_api`, so kubeconfig, in-cluster
service-account tokens and TLS are the client's own; paths and raw JSON are ours, for every kind.

Nothing is published until every kind has been listed once: Envoy never sees Backends whose
Services have not been read yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
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


class _Expired(Exception):
    """410 Gone: the resourceVersion we watch from is too old; list again."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    base: float = 0.2
    cap: float = 30.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2 ** self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class _Reflector:
    def __init__(self, source: KubernetesSource, kind: Kind):
        self.source = source
        self.kind = kind
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.backoff = Backoff(base=source.backoff_base)
        self._response = None

    def run(self) -> None:
        while not self.source.stopping.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                self.backoff.reset()
            except _Expired:
                log.info("%s: resourceVersion %s expired (410 Gone); listing again, serving the known state meanwhile",
                         self.kind.plural, self.resource_version)
                self.resource_version = None
            except Exception as error:  # noqa: BLE001 -- any failure is retried; the known state stays served
                if self.source.stopping.is_set():
                    return
                delay = self.backoff.next_delay()
                log.warning("%s: %s; retrying in %.1fs (serving the last known state)%s", self.kind.plural,
                            brief(error), delay, _hint(error))
                self.source.stopping.wait(delay)

    def _list(self) -> None:
        body = json.loads(self.source.get(self.kind.path(self.source.namespace), {}, timeout=30).read())
        items = []
        for item in body.get("items") or []:
            item.setdefault("kind", self.kind.kind)  # list items carry neither kind nor apiVersion
            item.setdefault("apiVersion", self.kind.api_version)
            items.append(item)
        self.source.store.replace_kind(self.kind.kind, items, self.source.namespace)
        self.resource_version = body["metadata"]["resourceVersion"]
        self.synced.set()
        self.source.changed()

    def _watch(self) -> None:
        query = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": self.resource_version,
                 "timeoutSeconds": str(int(self.source.watch_timeout * random.uniform(1.0, 1.2)))}
        response = self.source.get(self.kind.path(self.source.namespace), query,
                                   timeout=self.source.watch_timeout * 1.2 + self.source.read_timeout)
        self._response = response
        try:
            for event in _events(response):
                self._apply(event)
        finally:
            self._response = None
            response.response.release_conn()

    def _apply(self, event: dict) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
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
        self._reflectors = [_Reflector(self, kind) for kind in kinds]
        self._notify: Callable[[], None] = lambda: None

    def get(self, path: str, query: dict[str, str], *, timeout: float):
        return self.api.request("GET", path, query=query, timeout=timeout)

    def synced(self) -> bool:
        return all(reflector.synced.is_set() for reflector in self._reflectors)

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
