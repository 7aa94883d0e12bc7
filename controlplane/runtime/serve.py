"""`controlplane serve`: a source, the pipeline, the xDS server and metrics, until SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import signal

from controlplane.runtime.leader import LeaderElection
from controlplane.runtime.memory import Memory, MemoryWriter
from controlplane.runtime.metrics import ControlPlaneCollector, serve_metrics
from controlplane.runtime.pipeline import Pipeline, Source, cancel, feed, periodically
from controlplane.runtime.status import StatusWriter
from controlplane.xds import SnapshotCache, XdsServer
from controlplane.xds.server_tls import ServerTls

log = logging.getLogger(__name__)


def _remember(memory: Memory | None, pipeline: Pipeline, leader: LeaderElection | None) -> MemoryWriter | None:
    """Restore what the previous run accepted (a damaged state is logged and skipped, never fatal)
    and return the writer that keeps it up to date."""
    if memory is None:
        return None
    translator = pipeline.translator
    state = memory.load()
    if state:
        try:
            skipped = translator.restore(state)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            log.warning("%s does not hold a state this version reads (%r): starting without it", memory, error)
            translator = pipeline.translator = type(translator)()
        else:
            log.info("restored the last accepted state from %s: %d objects, %d Secrets", memory,
                     len(state.get("objects", ())), len(state.get("secrets", ())) - len(skipped))
            for line in skipped:
                log.warning("not restoring the last valid version of %s", line)
    may_write = (lambda: leader.is_leader) if leader is not None else (lambda: True)
    return MemoryWriter(memory, translator.remembered, lambda: translator.remembered_changes, may_write=may_write)


def tune_gc() -> None:
    """Collect young objects every 10,000 allocations instead of 700.

    A full translation allocates ~100k short-lived objects; with Python's default threshold the
    collector walks every live object (the store, the snapshots) dozens of times per pass. Measured
    on 1,000 Backends (bench/translate.py): 240 ms at the default, 200 ms with this setting.
    """
    gc.set_threshold(10_000, 10, 10)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's `malloc_trim`; a no-op elsewhere).

    When a fleet connects, each Envoy's first request carries its node: ~60 KB with Envoy 1.40's
    list of 516 extensions, so 1,000 Envoys reconnecting after a restart are ~60 MB of short-lived
    buffers. glibc keeps freed memory in its arenas and the resident size would stay at that peak;
    trimming every minute makes it follow what is live (bench/xds_fanout.py, docs/benchmarks.md).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator returns memory itself
        return None


_MALLOC_TRIM = _malloc_trim()


async def serve(source: Source, *, xds_address: str, metrics_address: str | None = None,
                leader: LeaderElection | None = None, xds_tls: ServerTls | None = None, grace: float = 5.0,
                memory: Memory | None = None) -> None:
    """Serve until SIGTERM. With `leader` (Kubernetes), the elected replica also writes CRD status.
    With `memory`, the last accepted state is restored from it first and saved to it on changes (by
    the leader only, with one)."""
    tune_gc()
    cache = SnapshotCache()
    server = XdsServer(cache, address=xds_address, tls=xds_tls)
    await server.start()
    writer = StatusWriter(leader.api, cache, leader) if leader is not None else None
    pipeline = Pipeline(cache, on_translated=writer.update if writer is not None else None)
    if metrics_address:
        serve_metrics(metrics_address, ControlPlaneCollector(cache, lambda: pipeline.last),
                      ready=lambda: pipeline.last is not None)
        log.info("metrics on http://%s/metrics", metrics_address)
    memory_writer = _remember(memory, pipeline, leader)
    coalescer, tasks = feed(source, pipeline)
    if memory_writer is not None:
        tasks.append(asyncio.create_task(memory_writer.run()))
    tasks.append(asyncio.create_task(periodically(coalescer.poke, 60)))
    tasks.append(asyncio.create_task(periodically(release_free_memory, 60)))
    if leader is not None:
        tasks += [asyncio.create_task(leader.run()), asyncio.create_task(writer.run())]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task in tasks and task.exception() is not None:
            log.error("stopping: %s", task.exception())
    log.info("shutting down: closing xDS streams within %.0fs; Envoys keep their configuration", grace)
    await cancel(tasks)
    if memory_writer is not None:
        try:
            memory_writer.save_if_changed()
        except Exception as error:  # noqa: BLE001 -- stopping anyway: say what a restart will miss
            log.warning("could not save the last accepted state to %s on the way out: %s", memory, error)
    if leader is not None:
        await asyncio.to_thread(leader.release)
    await server.stop(grace)
