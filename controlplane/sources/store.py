"""The objects we know, by kind, namespace and name: what every source fills and translation reads.

Objects are kept as the plain dicts the API server (or a YAML file) gave us; translation parses
what it needs. A `StoreView` is an immutable view of one moment, so a translation never sees a
half-applied batch of events.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from controlplane.model.kube import SERVICE_NAME_LABEL

KINDS = ("Gateway", "Backend", "Service", "EndpointSlice", "Secret")


@dataclass(frozen=True, order=True)
class ObjectKey:
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ObjectKey:
        metadata = obj.get("metadata") or {}
        return cls(obj.get("kind", ""), metadata.get("namespace") or "default", metadata.get("name", ""))

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class StoreView:
    """An immutable set of objects, with the look-ups translation needs."""

    def __init__(self, objects: Mapping[ObjectKey, Mapping[str, Any]]):
        self._objects = MappingProxyType(dict(objects))
        slices: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for key, obj in sorted(self._objects.items()):
            if key.kind == "EndpointSlice":
                service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
                if service:
                    slices.setdefault((key.namespace, service), []).append(obj)
        self._slices = slices

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self) -> Iterator[ObjectKey]:
        return iter(self._objects)

    def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self._objects.get(ObjectKey(kind, namespace, name))

    def of_kind(self, kind: str) -> list[tuple[ObjectKey, Mapping[str, Any]]]:
        """Objects of one kind, sorted by namespace and name (translation is deterministic)."""
        return sorted((key, obj) for key, obj in self._objects.items() if key.kind == kind)

    def endpoint_slices(self, namespace: str, service: str) -> list[Mapping[str, Any]]:
        return self._slices.get((namespace, service), [])


class Store:
    """The mutable store sources write into (from their threads); `view()` is an immutable snapshot."""

    def __init__(self, objects: Iterable[Mapping[str, Any]] = ()):
        self._objects: dict[ObjectKey, Mapping[str, Any]] = {}
        self._lock = threading.Lock()
        for obj in objects:
            self.put(obj)

    def put(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._objects[ObjectKey.of(obj)] = obj

    def delete(self, key: ObjectKey) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def replace_kind(self, kind: str, objects: Iterable[Mapping[str, Any]], namespace: str | None = None) -> None:
        """Make the objects of `kind` (in `namespace`, or all) exactly `objects`, in one step (a relist)."""
        fresh = {ObjectKey.of(obj): obj for obj in objects}
        with self._lock:
            for key in [k for k in self._objects if k.kind == kind and (namespace is None or k.namespace == namespace)]:
                del self._objects[key]
            self._objects.update(fresh)

    def view(self) -> StoreView:
        with self._lock:
            return StoreView(self._objects)
