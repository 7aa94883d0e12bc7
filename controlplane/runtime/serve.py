"""`controlplane serve`: a source, the pipeline, the xDS server and metrics, until SIGTERM.

It ends on a signal, or at startup when it cannot begin (an address taken, a setting wrong):
never because of input. Every long-lived task is supervised: one that fails (a source's watch
raising on input nobody foresaw) is logged with its traceback and restarted after a backoff,
while Envoys keep the configuration published last. A control plane that stopped watching but
went on serving would look healthy and never publish again; one that exited would drop every
Envoy's stream over one bad input.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable

from controlplane.runtime.activity_metrics import ActivityCollector
from controlplane.runtime.envoy_stats import EnvoyStatsCollector, budget_use
from controlplane.runtime.debug_views import DebugViews
from controlplane.runtime.envoy_count import keep_counted
from controlplane.runtime.fleet import EnvoyRecords
from controlplane.runtime.leader import LeaderElection
from controlplane.runtime.memory import Memory, MemoryWriter
from controlplane.runtime.metrics import ControlPlaneCollector, serve_metrics
from controlplane.runtime.pipeline import Pipeline, Source, cancel, feed, periodically
from controlplane.runtime.status import StatusWriter
from controlplane.sources.kube_api import brief
from controlplane.sources.kubernetes import KubernetesSource
from controlplane.translate import secrets
from controlplane.xds import SnapshotCache, XdsServer, identity
from controlplane.xds.csds import CsdsService
from controlplane.xds.metrics_service import MetricsService, StatsStore
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
    return MemoryWriter(memory, translator.remembered_json, lambda: translator.remembered_changes, may_write=may_write)


def _leave(leader: LeaderElection, records: EnvoyRecords) -> None:
    """On shutdown: give the Lease up and delete this replica's Envoy record (its Envoys reconnect elsewhere)."""
    leader.release()
    try:
        records.remove()
    except Exception as error:  # noqa: BLE001 -- stopping anyway; the leader deletes it once it expires
        log.warning("could not delete this replica's Envoy record (it expires by itself): %s", brief(error))


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

# A failed task is restarted after 1 s, then 2, 4, ... up to 60 s while it keeps failing; after a
# minute of running well, the next failure starts again from 1 s.
RESTART_BACKOFF = (1.0, 60.0)


class ServeError(Exception):
    """`serve` cannot go on; the message says why (details, if any, were logged before)."""


async def supervise(what: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run `run()` for ever: again after RESTART_BACKOFF whenever it fails or returns.

    A failure is logged with its traceback; the same failure again (type and message) is one line,
    so a watch that fails on every restart does not fill the log with tracebacks."""
    first, longest = RESTART_BACKOFF
    delay, last = first, None
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await run()
            error = None
        except Exception as failure:  # noqa: BLE001 -- any failure: what it is, is logged
            error = failure
        if loop.time() - started > longest:  # it ran well for a while: this is a new failure
            delay, last = first, None
        if error is None:
            log.error("%s ended, which it should not; restarting it in %.0fs", what, delay)
        elif (type(error), str(error)) == last:
            log.error("%s failed again (%s: %s); restarting it in %.0fs", what, type(error).__name__, error, delay)
        else:
            log.error("%s failed; restarting it in %.0fs. Envoys keep the configuration published last.",
                      what, delay, exc_info=error)
            last = (type(error), str(error))
        await asyncio.sleep(delay)
        delay = min(delay * 2, longest)


def _supervised(what: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task:
    return asyncio.create_task(supervise(what, run), name=what)


class _SupervisedSource:
    """`source` with its watch supervised: restarted (and the files or objects listed again) when it fails."""

    def __init__(self, source: Source):
        self._source = source

    async def watch(self, on_change) -> None:
        await supervise("the source's watch", lambda: self._source.watch(on_change))


async def serve(source: Source, *, xds_address: str, metrics_address: str | None = None,
                leader: LeaderElection | None = None, xds_tls: ServerTls | None = None, grace: float = 5.0,
                memory: Memory | None = None, min_certificate_lifetime: float = secrets.DEFAULT_MIN_LIFETIME,
                insecure_private_keys_over_plaintext: bool = False) -> None:
    """Serve until SIGTERM or SIGINT. With `leader` (Kubernetes: `source` is a KubernetesSource),
    every replica records its Envoys' state and the elected one also writes CRD status. With `memory`, the last accepted state is restored from it first and saved to it on
    changes (by the leader only, with one). Raises OSError or ServeError, each one line, when it
    cannot start (or, for a bug, when publishing stopped)."""
    tune_gc()
    cache = SnapshotCache()
    writer = records = None
    if leader is not None:  # Kubernetes: the source has a store, whose objects carry their current status
        records = EnvoyRecords(leader.api, namespace=leader.namespace, identity=leader.identity,
                               duration=leader.lease_duration)
        writer = StatusWriter(leader.api, cache, leader, objects=source.store.view, records=records,
                              envoys=lambda: pipeline.envoys,
                              budget_use=lambda: budget_use(pipeline.last, stats.envoys(), pipeline.envoys))
    pipeline = Pipeline(cache, on_translated=writer.update if writer is not None else None,
                        min_certificate_lifetime=min_certificate_lifetime)
    stats = StatsStore()  # what Envoys push by their stats sink, to the xDS port
    if metrics_address:
        activity = ActivityCollector(cache, publish_seconds=pipeline.publish_seconds,
                                     source=source if isinstance(source, KubernetesSource) else None,
                                     is_leader=(lambda: leader.is_leader) if leader is not None else None)
        try:
            serve_metrics(metrics_address, ControlPlaneCollector(cache, lambda: pipeline.last, lambda: pipeline.envoys),
                          ready=lambda: pipeline.last is not None,
                          more=(activity, EnvoyStatsCollector(stats, lambda: pipeline.last, lambda: pipeline.envoys)),
                          debug=DebugViews(cache, leader.identity if leader is not None else socket.gethostname(),
                                           lambda: budget_use(pipeline.last, stats.envoys(), pipeline.envoys)))
        except OSError as error:
            raise OSError(f"cannot serve metrics on {metrics_address}: {error.strerror or error}; stop what holds "
                          "it, or choose another --metrics-address ('' turns metrics off)") from None
        log.info("metrics on http://%s/metrics", metrics_address)
    trust_domain = xds_tls.trust_domain if xds_tls is not None else identity.DEFAULT_TRUST_DOMAIN
    server = XdsServer(cache, address=xds_address, tls=xds_tls,
                       services=(MetricsService(stats, trust_domain=trust_domain).handler(),
                                 CsdsService(cache, trust_domain=trust_domain).handler()),
                       insecure_private_keys_over_plaintext=insecure_private_keys_over_plaintext,
                       describe=pipeline.describe)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        memory_writer = _remember(memory, pipeline, leader)
        coalescer, tasks = feed(_SupervisedSource(source), pipeline)
        if memory_writer is not None:
            tasks.append(_supervised("saving the last accepted state", memory_writer.run))
        tasks.append(_supervised("the periodic re-publish", lambda: periodically(coalescer.poke, 60)))
        tasks.append(_supervised("counting the Envoys that share Gateway-wide budgets",
                                 lambda: keep_counted(cache, pipeline.share_among, records=records)))
        tasks.append(_supervised("giving free memory back", lambda: periodically(release_free_memory, 60)))
        if leader is not None:
            tasks += [_supervised("leader election", leader.run),
                      _supervised("the status writer and this replica's Envoy record", writer.run)]
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        # Supervised tasks never end; the one that can is the pipeline's publisher, and only by a bug.
        broken = [task for task in done if task is not stopped]
        for task in broken:
            log.error("publishing stopped; exiting, so that the process is restarted", exc_info=task.exception())
        stopped.cancel()
        await cancel(tasks)
        if memory_writer is not None:
            try:
                memory_writer.save_if_changed()
            except Exception as error:  # noqa: BLE001 -- stopping anyway: say what a restart will miss
                log.warning("could not save the last accepted state to %s on the way out: %s", memory, error)
        if leader is not None:
            await asyncio.to_thread(_leave, leader, records)
        if broken:
            raise ServeError("publishing stopped (a bug: its traceback is logged above)")
    finally:
        await server.stop(grace)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
