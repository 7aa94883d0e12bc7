"""A directory of YAML manifests as a source: the embedded default, so no cluster is needed.

The same manifests a cluster would hold (Gateways, Backends, Services, EndpointSlices, Secrets),
in `*.yaml`/`*.yml` files, multi-document allowed. The directory is polled for changes (stdlib
only, works on every filesystem). A file that stops parsing keeps its last good objects and
its error is reported with the file and line: a typo never empties a Gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from controlplane.sources.store import KINDS, ObjectKey, Store

log = logging.getLogger(__name__)


class ManifestError(Exception):
    """A manifest file that cannot be read: the file, and what is wrong with it."""

    def __init__(self, path: Path, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def parse_file(path: Path) -> list[Mapping[str, Any]]:
    """The objects of one manifest file; raises ManifestError saying where and what is wrong."""
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError(path, f"{where}not valid YAML ({problem})") from None
    except OSError as error:
        raise ManifestError(path, f"cannot read it ({error.strerror})") from None
    objects = []
    for index, document in enumerate(documents):
        if document is None:
            continue
        if not isinstance(document, dict):
            raise ManifestError(path, f"document {index + 1} is not a mapping (a Kubernetes object)")
        if not document.get("kind") or not (document.get("metadata") or {}).get("name"):
            raise ManifestError(path, f"document {index + 1} has no kind or no metadata.name")
        if document["kind"] in KINDS:
            objects.append(document)
        else:
            log.info("%s: ignoring %s %s (not a kind this control plane reads)", path, document["kind"],
                     document["metadata"]["name"])
    return objects


class DirectorySource:
    """Loads a directory into a Store and reloads it when its files change."""

    def __init__(self, directory: Path | str, *, interval: float = 0.5):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ManifestError(self.directory, "is not a directory of manifests")
        self.interval = interval
        self._by_file: dict[Path, list[Mapping[str, Any]]] = {}
        self._seen: dict[Path, tuple[int, int]] = {}
        self.errors: dict[Path, ManifestError] = {}

    def _files(self) -> dict[Path, tuple[int, int]]:
        found = {}
        for path in sorted([*self.directory.rglob("*.yaml"), *self.directory.rglob("*.yml")]):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found[path] = (stat.st_mtime_ns, stat.st_size)
        return found

    def load(self) -> bool:
        """Re-read changed files; returns whether the set of objects may have changed."""
        files = self._files()
        if files == self._seen:
            return False
        for path in set(self._by_file) - set(files):
            del self._by_file[path]
            self.errors.pop(path, None)
        for path, stamp in files.items():
            if self._seen.get(path) == stamp:
                continue
            try:
                self._by_file[path] = parse_file(path)
                self.errors.pop(path, None)
            except ManifestError as error:
                self.errors[path] = error
                kept = len(self._by_file.get(path, []))
                log.error("%s; keeping the %d objects it had before: fix the file to apply changes", error, kept)
        self._seen = files
        return True

    def store(self) -> Store:
        store, seen, duplicates = Store(), set(), []
        for path, objects in sorted(self._by_file.items()):
            for obj in objects:
                key = ObjectKey.of(obj)
                if key in seen:
                    duplicates.append(f"{key} (again in {path})")
                seen.add(key)
                store.put(obj)
        for duplicate in duplicates:
            log.warning("duplicate object %s: the last one read wins", duplicate)
        return store

    async def watch(self, on_change: Callable[[Store], None]) -> None:
        """Call `on_change` with the current objects now and after every change, until cancelled."""
        self.load()
        on_change(self.store())
        while True:
            await asyncio.sleep(self.interval)
            if await asyncio.to_thread(self.load):
                on_change(self.store())
