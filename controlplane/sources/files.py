"""A directory of YAML manifests as a source: the embedded default, so no cluster is needed.

The same manifests a cluster would hold (Gateways, Backends, Services, EndpointSlices, Secrets),
in `*.yaml`/`*.yml` files, multi-document allowed. The directory is polled for changes (stdlib
only, works on every filesystem). A file that stops parsing, or holds an object of the wrong
shape (a Service port that is not a number, labels that are not a mapping), keeps its last good
objects and its error is reported with the file, the line or the field: a typo never empties a
Gateway, and never reaches translation.

While watching, a changed file is read only once it has stopped changing for one poll interval
(0.25 s, so a saved change applies within half a second). Editors and `>` redirections truncate
a file before writing it: reading it in between would apply an empty file, deleting its objects,
and a parse error that follows would then keep that empty state as the "last good" one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from controlplane.model import kube
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
        metadata = document.get("metadata")
        if not document.get("kind") or not isinstance(metadata, dict) or not metadata.get("name"):
            raise ManifestError(path, f"document {index + 1} has no kind or no metadata.name")
        if document["kind"] in KINDS:
            wrong = kube.problems(document)
            if wrong:
                raise ManifestError(path, f"document {index + 1} ({document['kind']} "
                                          f"{document['metadata']['name']}): {'; '.join(wrong)}")
            objects.append(document)
        else:
            log.info("%s: ignoring %s %s (not a kind this control plane reads)", path, document["kind"],
                     document["metadata"]["name"])
    return objects


class DirectorySource:
    """Loads a directory into a Store and reloads it when its files change."""

    def __init__(self, directory: Path | str, *, interval: float = 0.25):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ManifestError(self.directory, "is not a directory of manifests")
        self.interval = interval
        self._by_file: dict[Path, list[Mapping[str, Any]]] = {}
        self._polled: dict[Path, tuple[int, int]] = {}  # (mtime, size) of every file at the last poll
        self._applied: dict[Path, tuple[int, int]] = {}  # (mtime, size) of every file when it was read
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

    def load(self, *, settled_only: bool = False) -> bool:
        """Re-read changed files; returns whether the set of objects may have changed.

        With `settled_only`, a changed file waits until a later call finds it unchanged.
        """
        files = self._files()
        previous_poll, self._polled = self._polled, files
        removed = set(self._applied) - set(files)
        for path in removed:
            del self._applied[path]
            self._by_file.pop(path, None)
            self.errors.pop(path, None)
        changed = [path for path, stamp in files.items() if self._applied.get(path) != stamp
                   and (not settled_only or previous_poll.get(path) == stamp)]
        for path in changed:
            self._applied[path] = files[path]
            try:
                self._by_file[path] = parse_file(path)
                self.errors.pop(path, None)
            except ManifestError as error:
                self.errors[path] = error
                kept = len(self._by_file.get(path, []))
                log.error("%s; keeping the %d objects it had before: fix the file to apply changes", error, kept)
        return bool(removed or changed)

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
            if await asyncio.to_thread(self.load, settled_only=True):
                on_change(self.store())
