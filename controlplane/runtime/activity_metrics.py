"""What the control plane does, for the metrics endpoint: pushes, NACKs and rollouts (how long
until every Envoy of a node group runs a new version), Envoys by sync state, the time from a
change to published snapshots, Kubernetes watch events and relists, and leadership.

The counting is done where things happen (xds/telemetry.py, the pipeline, the Kubernetes
source); this only reads it when scraped. Envoys' sync state, per Envoy, is the worst of its
types: `nacked` (it rejects the latest version sent), `stale` (a version was sent and is not
ACKed yet: for minutes, the Envoy is stuck; the EnvoysNotConverged alert), `not_sent` (a
type it asked for has had nothing to send it), or `synced`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from controlplane.xds import SnapshotCache
from controlplane.xds.cache import EnvoyStatus
from controlplane.xds.resources import SHORT_NAMES
from controlplane.xds.telemetry import Histogram

SYNC_STATES = ("synced", "stale", "not_sent", "nacked")


def sync_state(status: EnvoyStatus) -> str:
    types = status.types.values()
    if any(t.rejected is not None for t in types):
        return "nacked"
    if any(t.version_sent and t.version_acked != t.version_sent for t in types):
        return "stale"
    if any(not t.version_sent for t in types):
        return "not_sent"
    return "synced"


class ActivityCollector:
    """`publish_seconds`: the pipeline's histogram; `source`: a Kubernetes source (its `watch_events`
    and `relists`) or None; `is_leader`: None when there is no leader election."""

    def __init__(self, cache: SnapshotCache, *, publish_seconds: Histogram | None = None, source=None,
                 is_leader: Callable[[], bool] | None = None):
        self._cache = cache
        self._publish_seconds = publish_seconds
        self._source = source
        self._is_leader = is_leader

    def collect(self):
        telemetry = self._cache.telemetry
        pushes = CounterMetricFamily("controlplane_xds_pushes", "xDS responses sent to Envoys, per node group and "
                                     "type.", labels=["node_group", "type"])
        for (group, type_url), count in sorted(dict(telemetry.pushes).items()):
            pushes.add_metric([group, SHORT_NAMES[type_url]], count)
        nacks = CounterMetricFamily("controlplane_xds_nacks", "xDS responses Envoys rejected, per node group and type.",
                                    labels=["node_group", "type"])
        for (group, type_url), count in sorted(dict(telemetry.nacks).items()):
            nacks.add_metric([group, SHORT_NAMES[type_url]], count)
        rollouts = CounterMetricFamily("controlplane_xds_rollouts", "New snapshot versions of a node group, by how "
                                       "they ended: converged (every Envoy connected at publication ACKed it), "
                                       "rejected (one NACKed), superseded (a newer one came first).",
                                       labels=["node_group", "result"])
        for (group, result), count in sorted(dict(telemetry.rollouts).items()):
            rollouts.add_metric([group, result], count)
        rollout_seconds = HistogramMetricFamily(
            "controlplane_xds_rollout_seconds", "From a new snapshot's publication until every Envoy of its node "
            "group (connected at publication) ACKed all it was sent (push-to-ACK latency).", labels=["node_group"])
        for group, histogram in sorted(dict(telemetry.rollout_seconds).items()):
            rollout_seconds.add_metric([group], _buckets(histogram), histogram.total)
        envoys = GaugeMetricFamily("controlplane_xds_envoys", "Connected Envoys per node group and sync state "
                                   "(synced, stale: sent and not ACKed yet, not_sent, nacked).",
                                   labels=["node_group", "sync"])
        states = Counter((status.node_group, sync_state(status)) for status in self._cache.status())
        for group in sorted({group for group, _ in states}):
            for state in SYNC_STATES:
                envoys.add_metric([group, state], states.get((group, state), 0))
        yield from (pushes, nacks, rollouts, rollout_seconds, envoys)
        if self._publish_seconds is not None:
            publish = HistogramMetricFamily("controlplane_publish_seconds", "From a change of the objects to "
                                            "published snapshots: translation and building, per publication.")
            publish.add_metric([], _buckets(self._publish_seconds), self._publish_seconds.total)
            yield publish
        if self._source is not None:
            events = CounterMetricFamily("controlplane_kubernetes_watch_events", "Watch events received from the "
                                         "API server, per kind and event type.", labels=["kind", "type"])
            for (kind, event), count in sorted(dict(self._source.watch_events).items()):
                events.add_metric([kind, event], count)
            relists = CounterMetricFamily("controlplane_kubernetes_relists", "Lists of a kind after its first: its "
                                          "watch's resourceVersion expired (410 Gone).", labels=["kind"])
            for kind, count in sorted(dict(self._source.relists).items()):
                relists.add_metric([kind], count)
            yield from (events, relists)
        if self._is_leader is not None:
            yield GaugeMetricFamily("controlplane_leader", "1 on the replica holding the leader Lease (it writes "
                                    "status), 0 on the others.", value=1 if self._is_leader() else 0)


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, as Prometheus histograms have them."""
    pairs, total = [], 0
    for bound, count in zip((*histogram.buckets, float("inf")), histogram.counts, strict=True):
        total += count
        pairs.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return pairs
