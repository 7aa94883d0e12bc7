"""sources -> translate -> cache: turns the store into one snapshot per node group.

Bursts of events (a rollout touches many EndpointSlices at once) are coalesced: translation runs
once the events pause for `hold_off`, and at the latest `max_delay` after the first one, so a
steady stream of events cannot starve Envoy of updates. The hold-off is 20 ms: long enough for the
objects of one `kubectl apply` against a nearby API server to arrive together (a Backend seen
without its Service would be refused for a moment), short enough that a change reaches Envoy in
tens of milliseconds (at 50 ms, the hold-off was most of a file change's 65 ms to Envoy).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from controlplane.sources.store import ObjectKey, Store, StoreView
from controlplane.translate import secrets, to_ir, to_xds
from controlplane.xds import Snapshot, SnapshotCache, SnapshotError
from controlplane.xds.telemetry import Histogram

log = logging.getLogger(__name__)

# Seconds from the store to published snapshots (1,000 Backends: ~0.2 s, bench/translate.py).
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Pipeline:
    def __init__(self, cache: SnapshotCache, *, on_translated: Callable[[to_ir.Translation], None] | None = None,
                 min_certificate_lifetime: float = secrets.DEFAULT_MIN_LIFETIME):
        self._cache = cache
        self._on_translated = on_translated
        self.translator = to_ir.Translator(min_certificate_lifetime=min_certificate_lifetime)
        self._builders: dict[str, to_xds.SnapshotBuilder] = {}
        self._reported: dict[ObjectKey, tuple[str, str | None]] = {}
        self._failed: set[ObjectKey] = set()
        self.last: to_ir.Translation | None = None
        self._files: Mapping[ObjectKey, str] = {}  # the last view's object -> file (the file source's)
        self.envoys: dict[str, int] = {}
        """Per node group, the Envoys its Gateway-wide budgets are shared among (see `share_among`)."""
        self.publish_seconds = Histogram(PUBLISH_BUCKETS)  # store to snapshots published: translation and building

    def publish(self, view: StoreView) -> to_ir.Translation:
        """Translate `view` and publish a snapshot to every node group (an empty one to groups
        whose Gateways are gone, so their Envoys drop the old listeners)."""
        started = time.perf_counter()
        with collector_paused():
            translation = self.translator.translate(view, now=time.time())
            for name, group in translation.groups.items():
                try:
                    builder = self._builders.setdefault(name, to_xds.SnapshotBuilder())
                    self._cache.set_snapshot(name, builder.snapshot(group, envoys=self.envoys.get(name, 1)))
                except SnapshotError as error:  # a translation bug, not bad input: keep the last good one
                    log.error("node group %r: not publishing an inconsistent snapshot (%s); Envoys keep the last one",
                              name, error)
                except Exception:  # a bug too; one node group's stays with it, the other groups publish
                    log.exception("node group %r: building its snapshot failed; its Envoys keep the last one", name)
                    self._builders.pop(name, None)  # start afresh next time: it may hold half of this attempt
        for gone in sorted(self._builders.keys() - translation.groups.keys()):
            self._cache.set_snapshot(gone, Snapshot())
            del self._builders[gone]
        self.publish_seconds.observe(time.perf_counter() - started)
        self._log_problems(translation, view)
        if translation is not self.last:  # a translation reused whole judged no Secret again
            for rotation in translation.secret_rotations:
                log.log(logging.WARNING if rotation.failures else logging.INFO, "%s", rotation.log_line())
        self.last = translation
        self._files = view.origins
        if self._on_translated is not None:
            self._on_translated(translation)
        return translation

    def describe(self, resource: str) -> str | None:
        """Where an Envoy resource came from ("Backend shop/api (in manifests/api.yaml)"), for NACK
        log lines; None for a resource no object produced. Called from the xDS server's loop."""
        translation = self.last
        key = translation.origins.get(resource) if translation is not None else None
        if key is None:
            return None
        file = self._files.get(key)
        return f"{key}" + (f" (in {file})" if file else "")

    def share_among(self, envoys: Mapping[str, int]) -> None:
        """New fleet-wide Envoy counts per node group (at least 1 each): the groups whose count changed
        get a new runtime layer (each Envoy's share of the Gateway-wide budgets), nothing else
        rebuilt; a group without such budgets gets the snapshot it has."""
        changed = {name: max(1, count) for name, count in envoys.items() if self.envoys.get(name, 1) != max(1, count)}
        changed.update({name: 1 for name in self.envoys.keys() - envoys.keys() if self.envoys[name] != 1})
        if not changed:
            return
        self.envoys.update(changed)
        groups = self.last.groups if self.last is not None else {}
        for name, count in sorted(changed.items()):
            builder, group = self._builders.get(name), groups.get(name)
            if builder is None or group is None:
                continue
            if any(_gateway_wide(backend) for backend in group.backends):
                log.info("node group %r: Gateway-wide budgets shared among %d Envoy%s now", name, count,
                         "" if count == 1 else "s", extra={"group": name})
            try:
                self._cache.set_snapshot(name, builder.snapshot(group, envoys=count))
            except Exception:  # a bug: this group keeps its last snapshot; the next publish tries again
                log.exception("node group %r: sharing its budgets among %d Envoys failed; its Envoys keep the "
                              "last configuration", name, count)
                self._builders.pop(name, None)

    def _log_problems(self, translation: to_ir.Translation, view: StoreView) -> None:
        """Log each object's problem once (and when it is fixed), not on every translation; a bug's
        traceback once too."""
        for key, trace in sorted(translation.failures.items()):
            if key not in self._failed:
                log.error("%s: translating it failed, so it is refused (a bug; the rest is served):\n%s", key, trace)
        self._failed = set(translation.failures)
        # The same problem in another file (one deleted, its copy written) is news: it names the file.
        problems = {key: (accepted.message, view.origins.get(key)) for key, conditions in translation.conditions.items()
                    for accepted in conditions[:1] if accepted.status == "False"}
        for key, (message, origin) in sorted(problems.items()):
            if self._reported.get(key) != (message, origin):
                log.warning("%s%s not accepted: %s", key, f" (in {origin})" if origin else "", message,
                            extra={"object": key, "file": origin})
        for key in sorted(set(self._reported) - set(problems)):
            if view.get(*key) is not None:
                log.info("%s accepted now", key)
            else:
                log.info("%s deleted (it was not accepted; its problem is gone with it)", key)
        self._reported = problems


@contextlib.contextmanager
def collector_paused():
    """No garbage collection while a store becomes snapshots: a full translation at 10,000 Backends
    keeps ~1 M objects alive while it allocates ~1 M more, and each collection that reached the
    oldest generation walked them all (GC was 30-40 % of the pass, docs/benchmarks.md). What the
    pass leaves unreachable is collected as usual afterwards. Threads that pause it together
    leave it as the first found it (it is never left off: only a pause that disabled it enables it).

    A large pass's objects skip the young generations (`_freeze_if_large`); the next pause gives
    them back to the oldest one, where the collector's full collections see them as usual."""
    with _FREEZING:
        was_enabled = gc.isenabled()
        gc.disable()
        _unfreeze()
    try:
        yield
    finally:
        if was_enabled:
            with _FREEZING:
                _freeze_if_large()
                gc.enable()


LARGE_PASS = 100_000
"""Tracked objects a pass leaves (ten young collections' worth at `serve`'s threshold) from which
they are frozen rather than walked: a full pass at 10,000 Backends leaves ~800,000, one endpoint
changed a few hundred."""

_FREEZING = threading.Lock()
_frozen = False  # whether the permanent generation holds what this module froze
_full_collections_at_unfreeze: int | None = None


def _full_collections() -> int:
    return gc.get_stats()[2]["collections"]


def _freeze_if_large() -> None:
    """Move what a large pass leaves to the permanent generation (`gc.freeze()`), so that no young
    collection walks it: right after a full pass at 10,000 Backends that collection took 170-240 ms
    (16 % of the pass, before its snapshot could be sent), and the next older one walked the same
    objects again. They are the snapshots and what translation remembers, alive until a change
    replaces them; what is not in a reference cycle is freed when it is replaced, frozen or not.

    Garbage in a cycle is collected only once unfrozen: the next pause unfreezes (in `serve`, the
    periodic re-publish pauses at least once a minute), and this freezes again only once a full
    collection has run since then, so what was frozen is looked at by a full collection before it
    can be frozen again. A run of full passes (a contested route makes every pass one) freezes
    every other one at most."""
    global _frozen
    if gc.get_count()[0] < LARGE_PASS or _full_collections() == _full_collections_at_unfreeze:
        return
    gc.freeze()
    _frozen = True


def _unfreeze() -> None:
    """Give what this module froze back to the oldest generation (and anything else frozen with it:
    there is one permanent generation)."""
    global _frozen, _full_collections_at_unfreeze
    if _frozen:
        gc.unfreeze()
        _frozen, _full_collections_at_unfreeze = False, _full_collections()


def _gateway_wide(backend) -> bool:
    budgets = [backend.default_budget, backend.high_budget]
    if backend.websocket is not None:
        budgets.append(backend.websocket.budget)
    return any(budget.gateway_wide for budget in budgets)


class Coalescer:
    """Runs `action` after a pause of `hold_off` seconds in calls to `poke()`, or `max_delay` at most.

    An action that fails is logged and the loop goes on: were this task to end, the control plane
    would look healthy while never publishing again."""

    def __init__(self, action: Callable[[], None], *, hold_off: float = 0.02, max_delay: float = 0.5):
        self._action = action
        self._hold_off = hold_off
        self._max_delay = max_delay
        self._wake = asyncio.Event()
        self._first: float | None = None

    def poke(self) -> None:
        loop = asyncio.get_running_loop()
        if self._first is None:
            self._first = loop.time()
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            while True:
                self._wake.clear()
                deadline = self._first + self._max_delay
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, min(self._hold_off,
                                                                                   deadline - loop.time())))
                except TimeoutError:
                    break
                if loop.time() >= deadline:
                    break
            self._first = None
            self._wake.clear()
            try:
                self._action()
            except Exception:  # a bug: bad input becomes conditions and file errors, never an exception
                log.exception("publishing failed; Envoys keep the last published configuration, and the next "
                              "change tries again")


class Source(Protocol):
    """Files or Kubernetes: calls `on_change(store)` with everything known, after every change."""

    async def watch(self, on_change: Callable[[Store], None]) -> None: ...


def feed(source: Source, pipeline: Pipeline) -> tuple[Coalescer, list[asyncio.Task]]:
    """Start feeding `pipeline` from `source`: the source's watch and the coalescer, as tasks."""
    on_change, coalescer = _store_publisher(pipeline)
    return coalescer, [asyncio.create_task(coalescer.run()), asyncio.create_task(source.watch(on_change))]


async def cancel(tasks: list[asyncio.Task]) -> None:
    """Stop `tasks` and wait for them; their failures were reported where they happened."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _store_publisher(pipeline: Pipeline) -> tuple[Callable[[Store], None], Coalescer]:
    """A source callback that hands the latest store to `pipeline`, coalescing bursts."""
    latest: list[Store] = []

    def publish_latest() -> None:
        if latest:
            pipeline.publish(latest[-1].view())

    coalescer = Coalescer(publish_latest)

    def on_change(store: Store) -> None:
        latest[:] = [store]
        coalescer.poke()
    return on_change, coalescer


async def periodically(action: Callable[[], None], every: float) -> None:
    """Call `action` every `every` seconds. For the pipeline's `poke`: re-publishing with nothing
    changed is cheap, and it is how a certificate that expires while nothing else happens is
    noticed and reported."""
    while True:
        await asyncio.sleep(every)
        action()
