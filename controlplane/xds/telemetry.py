"""What the xDS server did, counted for the metrics endpoint: responses pushed and NACKs received,
per node group and type, and rollouts: how long each new version of a node group's snapshot took
until every Envoy of the group had ACKed it.

A rollout starts when a snapshot with new content is published (the periodic identical
re-publish starts none) and waits for the Envoys connected at that moment; an Envoy is done when
its stream has nothing in flight and nothing held back after the publication (it ACKed all it
was sent), or when it NACKed something (the rollout is then `rejected`), or left. The rollout
ends `converged` when the last one is done, `superseded` when a newer version is published
first. Envoys that connect during a rollout get the new version at once and are not waited for.
Each rollout's end is one log line: INFO when every Envoy applied it (with how long it took),
WARNING when some rejected it. Envoys that all left say nothing: nobody applied anything.

Counted on the event loop (a dict increment per response); read from the metrics endpoint's
threads as copies. Bounded by the node groups that were published to.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Seconds; a local push is ~10 ms, a fleet of 1,000 Envoys ~1 s (docs/benchmarks.md).
ROLLOUT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class _Rollout:
    version: str
    started: float
    waiting: set[Hashable]
    acked: bool = False
    rejected: bool = False
    envoys: int = 0  # waited for at the start
    rejecting: int = 0


class Histogram:
    """Counts per bucket (upper bounds `buckets`, then +Inf; not cumulative), and their sum."""

    def __init__(self, buckets: tuple[float, ...] = ROLLOUT_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.total += seconds


class XdsTelemetry:
    def __init__(self, *, clock=time.monotonic):
        self._clock = clock
        self._rollouts: dict[str, _Rollout] = {}
        self.pushes: Counter[tuple[str, str]] = Counter()  # (node group, type URL)
        self.nacks: Counter[tuple[str, str]] = Counter()
        self.rollouts: Counter[tuple[str, str]] = Counter()  # (node group, result)
        self.rollout_seconds: dict[str, Histogram] = {}  # converged rollouts, by node group

    def published(self, group: str, version: str, waiting: Iterable[Hashable]) -> None:
        """A snapshot of `group` was published; `waiting`: one key per connected Envoy (its stream)."""
        previous = self._rollouts.get(group)
        if previous is not None and previous.version == version:
            return
        if previous is not None and previous.waiting:
            self.rollouts[group, "superseded"] += 1
        waiting = set(waiting)
        self._rollouts[group] = _Rollout(version, self._clock(), waiting, envoys=len(waiting))

    def handled(self, group: str, stream: Hashable, step, *, settled: bool) -> None:
        """A stream of `group` handled a protocol step (`settled`: nothing in flight or held back after it)."""
        for response in step.responses:
            self.pushes[group, response.type_url] += 1
        for nack in step.nacks:
            self.nacks[group, nack.record.type_url] += 1
        rollout = self._rollouts.get(group)
        if rollout is None or stream not in rollout.waiting:
            return
        if step.nacks:
            rollout.rejected = True
            rollout.rejecting += 1
        elif settled:
            rollout.acked = True
        else:
            return
        self._done(group, rollout, stream)

    def left(self, group: str, stream: Hashable) -> None:
        """A stream of `group` ended."""
        rollout = self._rollouts.get(group)
        if rollout is not None and stream in rollout.waiting:
            self._done(group, rollout, stream)

    def _done(self, group: str, rollout: _Rollout, stream: Hashable) -> None:
        rollout.waiting.discard(stream)
        if rollout.waiting:
            return
        took = self._clock() - rollout.started
        extra = {"group": group, "version": rollout.version}
        if rollout.rejected:
            self.rollouts[group, "rejected"] += 1
            log.warning("node group %r: version %s rejected by %d of its %d Envoys after %.0f ms (their NACKs are "
                        "logged above); the others applied it", group, rollout.version, rollout.rejecting,
                        rollout.envoys, took * 1000, extra=extra)
        elif rollout.acked:
            self.rollouts[group, "converged"] += 1
            self.rollout_seconds.setdefault(group, Histogram()).observe(took)
            log.info("node group %r: version %s applied by all %d Envoy%s in %.0f ms", group, rollout.version,
                     rollout.envoys, "" if rollout.envoys == 1 else "s", took * 1000, extra=extra)
