"""How many Envoys each node group has, fleet-wide: what Gateway-wide budgets are divided by.

Why: a Backend budget of `scope: Gateway` is for all the Gateway's Envoys together, so each Envoy
runs total ÷ Envoys. The count must be the fleet's, not one replica's: an Envoy connects to one
control-plane replica, and each replica sees only its own. In Kubernetes every replica already
publishes its Envoys per node group in a Lease of its own (runtime/fleet.py, for `Programmed`), and
every replica can list them: each one counts its own Envoys plus those of its peers' records that
are not expired. All replicas read the same records, so they agree within one refresh (2 s here,
plus the peers' own write interval), and a dead replica's Envoys leave the count when its Lease
expires (they reconnect to a live replica, which counts them then). Without Kubernetes there is
one replica: the count is its own Envoys.

A rise applies at once (each Envoy's share shrinks: never more than the total offered); a fall
applies once it has lasted `settle` seconds, so an Envoy whose stream drops and reconnects does
not make the others' shares flap up and back down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from controlplane.runtime.fleet import EnvoyRecords, GroupEnvoys
from controlplane.xds import SnapshotCache

log = logging.getLogger(__name__)

SETTLE_SECONDS = 5.0


class SettledCounts:
    """Observed counts per node group in, the counts to use out: rises at once, falls once settled."""

    def __init__(self, settle: float = SETTLE_SECONDS):
        self._settle = settle
        self.counts: dict[str, int] = {}
        self._falling_since: dict[str, float] = {}

    def update(self, observed: Mapping[str, int], now: float) -> dict[str, int]:
        for group in sorted(observed.keys() | self.counts.keys()):
            seen, used = observed.get(group, 0), self.counts.get(group)
            if used is None or seen > used:
                self.counts[group] = seen
                self._falling_since.pop(group, None)
            elif seen < used:
                since = self._falling_since.setdefault(group, now)
                if now - since >= self._settle:
                    self.counts[group] = seen
                    del self._falling_since[group]
            else:
                self._falling_since.pop(group, None)
        for group in [group for group, count in self.counts.items() if count == 0]:
            del self.counts[group]
        return dict(self.counts)


def local_counts(cache: SnapshotCache) -> Counter[str]:
    return Counter(envoy.node_group for envoy in cache.status())


def fleet_counts(local: Mapping[str, int], peers: Iterable[tuple[str, Mapping[str, GroupEnvoys]]]) -> Counter[str]:
    counts = Counter(local)
    for _replica, groups in peers:
        for group, envoys in groups.items():
            counts[group] += envoys.envoys
    return counts


async def keep_counted(cache: SnapshotCache, apply: Callable[[Mapping[str, int]], None], *,
                       records: EnvoyRecords | None = None, interval: float = 1.0, peers_every: float = 2.0,
                       settle: float = SETTLE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
    """Count every `interval` seconds and `apply` the settled counts when they change. With
    `records`, the peers' records are listed every `peers_every` seconds; while that fails, the
    last ones read are used (a warning once, and once when it works again)."""
    settled = SettledCounts(settle)
    peers: list[tuple[str, dict[str, GroupEnvoys]]] = []
    listed_at = -peers_every
    failing: str | None = None
    applied: dict[str, int] | None = None
    while True:
        if records is not None and clock() - listed_at >= peers_every:
            listed_at = clock()
            try:
                peers = await asyncio.to_thread(records.peers)
                if failing is not None:
                    log.info("reading the other replicas' Envoy records works again")
                    failing = None
            except Exception as error:  # noqa: BLE001 -- the API server away: keep the last count
                if str(error) != failing:
                    failing = str(error)
                    log.warning("reading the other replicas' Envoy records: %s; Gateway-wide budgets keep the last "
                                "Envoy count read", error)
        counts = settled.update(fleet_counts(local_counts(cache), peers), clock())
        if counts != applied:
            apply(counts)
            applied = counts
        await asyncio.sleep(interval)
