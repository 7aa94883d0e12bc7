"""What the control plane last accepted, kept where a restarted or second replica finds it.

Last known good is state, and it is shared (DESIGN.md): each Gateway's and Backend's last accepted
version, the Service and endpoints it last resolved, and each TLS Secret's last valid version
(`Translator.remembered()`). Without it, a control plane restarted during a bad edit or a bad
rotation would refuse the object outright and withdraw traffic its predecessor kept flowing.

- Files: a JSON file, written atomically (a temporary file renamed over it), readable by its
  owner only: it holds private keys.
- Kubernetes: a Secret the control plane owns in its own namespace (`controlplane-last-accepted`),
  gzipped JSON under one key. Only the leader writes it; every replica reads it when it starts.
  A Secret holds at most 1 MiB: beyond that the state is not saved, and the log says so.

Saving never blocks translation: `MemoryWriter` saves the latest state from a thread, at most
once a second, and a failure to save is logged and retried with the next change.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from controlplane.sources.kube_api import ApiError, KubeApi, brief

log = logging.getLogger(__name__)

SECRET_NAME = "controlplane-last-accepted"
SECRET_KEY = "last-accepted.json.gz"
SECRET_LIMIT = 1024 * 1024 - 64 * 1024  # the API server refuses Secrets over 1 MiB; room for metadata


class Memory(Protocol):
    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: bytes) -> None:
        """`state`: the JSON document (`Translator.remembered_json()`)."""


class FileMemory:
    """The state in a file (for `serve --source DIR`)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def load(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("cannot read the last accepted state from %s (%s): starting without it", self.path, error)
            return None

    def save(self, state: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(descriptor, "wb") as out:  # mkstemp: readable by its owner only
                out.write(state)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class SecretMemory:
    """The state in a Secret of the control plane's namespace (for `serve --source kubernetes`)."""

    def __init__(self, api: KubeApi, namespace: str, *, name: str = SECRET_NAME):
        self._api, self._namespace, self._name = api, namespace, name

    def __str__(self) -> str:
        return f"Secret {self._namespace}/{self._name}"

    def _path(self, name: str | None = None) -> str:
        return f"/api/v1/namespaces/{self._namespace}/secrets" + (f"/{name}" if name else "")

    def load(self) -> dict[str, Any] | None:
        try:
            secret = self._api.json("GET", self._path(self._name))
            packed = (secret.get("data") or {}).get(SECRET_KEY)
            return json.loads(gzip.decompress(base64.b64decode(packed))) if packed else None
        except ApiError as error:
            if error.status != 404:
                log.warning("cannot read the last accepted state from %s (%s): starting without it", self,
                            brief(error))
            return None
        except (ValueError, OSError, EOFError) as error:  # not ours, or damaged: start without it
            log.warning("%s does not hold a readable state (%s): starting without it", self, error)
            return None

    def save(self, state: bytes) -> None:
        packed = gzip.compress(state)
        if len(packed) > SECRET_LIMIT:
            raise ValueError(f"the state is {len(packed) // 1024} KiB gzipped, over what a Secret holds "
                             f"({SECRET_LIMIT // 1024} KiB)")
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": self._name, "namespace": self._namespace,
                             "labels": {"app.kubernetes.io/managed-by": "controlplane"}},
                "data": {SECRET_KEY: base64.b64encode(packed).decode()}}
        try:
            current = self._api.json("GET", self._path(self._name))
        except ApiError as error:
            if error.status != 404:
                raise
            self._api.json("POST", self._path(), body=body)
            return
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]  # only the leader writes
        self._api.json("PUT", self._path(self._name), body=body)


class MemoryWriter:
    """Saves the translator's state when it changed, from a thread, at most once per `interval`;
    with `may_write` (the leader), only while it says so."""

    def __init__(self, memory: Memory, state: Callable[[], bytes], changes: Callable[[], int], *,
                 may_write: Callable[[], bool] = lambda: True, interval: float = 1.0):
        self._memory, self._state, self._changes = memory, state, changes
        self._may_write, self._interval = may_write, interval
        self._saved: int | None = None

    def save_if_changed(self) -> bool:
        """Save now if anything changed since the last save; returns whether it saved."""
        pending = self._pending()
        if pending is not None:
            self._memory.save(pending[1])
            self._saved = pending[0]
        return pending is not None

    def _pending(self) -> tuple[int, bytes] | None:
        """(change count, state) to save, taken on the loop: translation changes the state there."""
        changes = self._changes()
        if changes == self._saved or not self._may_write():
            return None
        return changes, self._state()

    async def run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            pending = self._pending()
            if pending is None:
                continue
            try:
                await asyncio.to_thread(self._memory.save, pending[1])
            except Exception as error:  # noqa: BLE001 -- a disk or API server away must not stop serving
                if not failing:
                    log.warning("cannot save the last accepted state to %s (%s): a restart now would not know "
                                "it; retrying", self._memory, brief(error))
                failing = True
                continue
            self._saved = pending[0]
            if failing:
                log.info("saved the last accepted state to %s again", self._memory)
            failing = False
