"""Envoy's stats, pushed to us: the server side of Envoy's metrics-service stats sink.

ACK and NACK say that a configuration loaded; whether it works (budgets running out, TLS
handshakes failing) is in Envoy's stats. Envoy's admin is 127.0.0.1-only in each pod, so every
Envoy pushes them here instead (`envoy.stat_sinks.metrics_service` in the bootstrap,
controlplane/translate/bootstrap.py), over the same gRPC server and port as xDS.

What Envoy sends is filtered here, on receipt: its sink has no filter of its own, and a
`stats_matcher` in the bootstrap would also hide those stats from Envoy's own admin /stats and
/stats/prometheus, which the alerts read. Envoy sends the stats it has used, once per flush
(5 s), as Prometheus `MetricFamily` messages; `KEPT` names the few we read. The latest value of
each is kept per Envoy, bounded: at most MAX_SERIES_PER_ENVOY series per Envoy and MAX_ENVOYS
Envoys; an Envoy whose stream ended is forgotten FORGET_AFTER seconds later.

Envoy sends every stat it has used, each as a MetricFamily of its own: ~3,000 families and
~290 KB per flush for 100 clusters, of which ~650 series are kept (bench/stats_sink.py). Neither
xds-protos nor grpcio ship `envoy.service.metrics.v3` for upb, and envoy-data-plane's pure-Python
classes are far slower; so the few messages we read are described here (a subset of their
fields) and decoded by upb from a private descriptor pool, each family left as bytes until its
name is known to be kept, and a kept one read from its bytes when its series was seen before.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from controlplane.xds import identity

log = logging.getLogger(__name__)

SERVICE = "envoy.service.metrics.v3.MetricsService"
METHOD = "StreamMetrics"

MAX_ENVOYS = 20_000
MAX_SERIES_PER_ENVOY = 5_000
FORGET_AFTER = 300.0

# The stats we read, by their tag-extracted name (the sink's `emit_tags_as_labels`): the cluster
# or listener is a label. Circuit breakers: Envoy's `remaining_*` gauges (with `track_remaining`)
# and the overflow counters; connections; TLS handshakes and why they failed.
_CIRCUIT_BREAKER = tuple(f"cluster.circuit_breakers.{priority}.remaining_{resource}"
                         for priority in ("default", "high") for resource in ("cx", "pending", "rq", "retries"))
_TLS = ("ssl.handshake", "ssl.connection_error", "ssl.fail_verify_error", "ssl.fail_verify_no_cert",
        "ssl.fail_verify_san", "ssl.fail_verify_cert_hash", "ssl.no_certificate")
KEPT = frozenset((*_CIRCUIT_BREAKER, "cluster.upstream_cx_overflow", "cluster.upstream_rq_pending_overflow",
                  "cluster.upstream_cx_active",
                  *(f"cluster.{name}" for name in _TLS), *(f"listener.{name}" for name in _TLS)))


def _messages():
    """The message classes, from a descriptor of the fields we read (numbers as in the .proto files)."""
    optional, repeated = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    kinds = {"string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
             "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
             "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
             "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32}

    def message(file, name: str, *fields: tuple[str, int, str, bool]):
        described = file.message_type.add(name=name)
        for field_name, number, kind, is_repeated in fields:
            entry = described.field.add(name=field_name, number=number, label=repeated if is_repeated else optional)
            if kind in kinds:
                entry.type = kinds[kind]
            else:
                entry.type, entry.type_name = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, kind

    prometheus = descriptor_pb2.FileDescriptorProto(name="controlplane/io_prometheus_client_subset.proto",
                                                   package="io.prometheus.client", syntax="proto2")
    message(prometheus, "LabelPair", ("name", 1, "string", False), ("value", 2, "string", False))
    message(prometheus, "Gauge", ("value", 1, "double", False))
    message(prometheus, "Counter", ("value", 1, "double", False))
    message(prometheus, "Metric", ("label", 1, ".io.prometheus.client.LabelPair", True),
            ("gauge", 2, ".io.prometheus.client.Gauge", False), ("counter", 3, ".io.prometheus.client.Counter", False))
    message(prometheus, "MetricFamily", ("name", 1, "string", False), ("type", 3, "int32", False),
            ("metric", 4, ".io.prometheus.client.Metric", True))
    metrics = descriptor_pb2.FileDescriptorProto(name="controlplane/envoy_metrics_service_subset.proto",
                                                package="envoy.service.metrics.v3", syntax="proto3",
                                                dependency=[prometheus.name])
    message(metrics, "Node", ("id", 1, "string", False), ("cluster", 2, "string", False))
    message(metrics, "Identifier", ("node", 1, ".envoy.service.metrics.v3.Node", False))
    # Each MetricFamily stays serialized: only those with a KEPT name are decoded (`kept_values`).
    message(metrics, "StreamMetricsMessage", ("identifier", 1, ".envoy.service.metrics.v3.Identifier", False),
            ("envoy_metrics", 2, "bytes", True))
    message(metrics, "StreamMetricsResponse")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(prometheus)
    pool.Add(metrics)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
                 for name in ("envoy.service.metrics.v3.StreamMetricsMessage",
                              "envoy.service.metrics.v3.StreamMetricsResponse", "io.prometheus.client.MetricFamily"))


StreamMetricsMessage, StreamMetricsResponse, MetricFamily = _messages()
_KEPT_NAMES = {name.encode(): name for name in KEPT}

Labels = tuple[tuple[str, str], ...]


@dataclass
class EnvoyStats:
    """One Envoy's latest values of the KEPT stats, by (name, labels); labels named as in Prometheus."""

    node_id: str
    node_group: str
    values: dict[tuple[str, Labels], float] = field(default_factory=dict)
    received_at: float = 0.0
    streams: int = 0  # open streams from this node id (a restarting Envoy may briefly hold two)
    ended_at: float | None = None
    flushes: int = 0

    def series(self, name: str) -> Iterable[tuple[dict[str, str], float]]:
        for (series_name, labels), value in self.values.items():
            if series_name == name:
                yield dict(labels), value


def kept_values(message, *, limit: int = MAX_SERIES_PER_ENVOY,
                series_of: dict[bytes, tuple[str, Labels]] | None = None) -> tuple[dict[tuple[str, Labels], float], int]:
    """The KEPT series of one flush, and how many were left out past `limit`.

    `series_of` caches each family's series (name and labels) by its bytes up to the value: Envoys
    send the same series at every flush, and the Envoys of a node group the same clusters, so most
    families are read without decoding them (`_value_at`); the others are decoded."""
    values: dict[tuple[str, Labels], float] = {}
    dropped = 0
    cache = series_of if series_of is not None else {}
    for raw in message.envoy_metrics:
        name = _KEPT_NAMES.get(_name_of(raw))
        if name is None:
            continue
        at = _value_at(raw)
        series = cache.get(raw[:at]) if at else None
        if series is not None:
            if len(values) >= limit:
                dropped += 1
            else:
                values[series] = _DOUBLE.unpack_from(raw, at + 3)[0]
            continue
        family = MetricFamily.FromString(raw)
        gauge = family.type == _GAUGE
        for metric in family.metric:
            if len(values) >= limit:
                dropped += 1
                continue
            labels = tuple((_label_name(label.name), label.value) for label in metric.label)
            values[name, labels] = metric.gauge.value if gauge else metric.counter.value
            if at and len(family.metric) == 1 and len(cache) < MAX_CACHED_SERIES:
                cache[raw[:at]] = (name, labels)
    return values, dropped


_GAUGE = 1  # io.prometheus.client.MetricType
_DOUBLE = struct.Struct("<d")
MAX_CACHED_SERIES = 50_000  # ~10 MB at most; past it, families are decoded


def _value_at(family: bytes) -> int:
    """Where the value of a one-metric family's gauge or counter starts, as Envoy writes it: the
    metric ends with `gauge`/`counter` {value: double} then timestamp_ms (a varint). 0 otherwise."""
    end = len(family) - 1
    start = end
    while start > end - 10 and family[start - 1] & 0x80:
        start -= 1
    at = start - 12
    if at <= 0 or family[start - 1] != 0x30 or family[at + 1:at + 3] != b"\t\t" or family[at] not in (0x12, 0x1A):
        return 0
    return at


@functools.lru_cache(maxsize=64)
def _label_name(tag: str) -> str:
    """Envoy's tag name as Prometheus names the label (envoy.cluster_name -> envoy_cluster_name)."""
    return tag.replace(".", "_")


def _name_of(family: bytes) -> bytes | None:
    """The name of a serialized MetricFamily, read without decoding it: Envoy writes field 1 (name)
    first, as protobuf encoders write fields in number order. None when it is not there (a name
    of 128 bytes or more, a field order of another encoder): such a family is never kept."""
    if len(family) > 2 and family[0] == 0x0A and family[1] < 0x80:
        return family[2:2 + family[1]]
    return None


class StatsStore:
    """The latest stats of every Envoy pushing them; thread-safe (read by the metrics endpoint's threads)."""

    def __init__(self, *, max_envoys: int = MAX_ENVOYS, max_series: int = MAX_SERIES_PER_ENVOY,
                 forget_after: float = FORGET_AFTER, clock=time.monotonic):
        self._max_envoys = max_envoys
        self._max_series = max_series
        self._forget_after = forget_after
        self._clock = clock
        self._lock = threading.Lock()
        self._envoys: dict[str, EnvoyStats] = {}
        self._warned: set[str] = set()
        self._series_of: dict[bytes, tuple[str, Labels]] = {}  # kept_values' cache, shared by all Envoys
        self.flushes_received = 0
        self.bytes_received = 0

    def opened(self, node_id: str, node_group: str) -> EnvoyStats | None:
        """A stream from this Envoy began; None when MAX_ENVOYS others are held (its stats are not kept)."""
        with self._lock:
            self._forget_ended(self._clock())
            stats = self._envoys.get(node_id)
            if stats is None:
                if len(self._envoys) >= self._max_envoys:
                    self._warn_once("envoys", "keeping the stats of %d Envoys already: not keeping those of %s "
                                    "(node group %r)", self._max_envoys, node_id, node_group)
                    return None
                stats = self._envoys[node_id] = EnvoyStats(node_id, node_group)
            stats.node_group = node_group
            stats.streams += 1
            stats.ended_at = None
            return stats

    def received(self, stats: EnvoyStats, message, size: int) -> None:
        """One flush: it replaces the Envoy's values (the sink sends all of them in one message)."""
        values, dropped = kept_values(message, limit=self._max_series, series_of=self._series_of)
        if dropped:
            self._warn_once(stats.node_id, "Envoy %s sends more than %d series of the stats kept: %d left out",
                            stats.node_id, self._max_series, dropped)
        with self._lock:
            stats.values = values
            stats.received_at = time.time()
            stats.flushes += 1
            self.flushes_received += 1
            self.bytes_received += size

    def closed(self, stats: EnvoyStats) -> None:
        with self._lock:
            stats.streams -= 1
            if stats.streams <= 0:
                stats.ended_at = self._clock()

    def envoys(self) -> list[EnvoyStats]:
        """Every Envoy whose stats are held (the disconnected ones for FORGET_AFTER), by group and id."""
        with self._lock:
            self._forget_ended(self._clock())
            held = [EnvoyStats(s.node_id, s.node_group, dict(s.values), s.received_at, s.streams, s.ended_at,
                               s.flushes) for s in self._envoys.values() if s.flushes]
        return sorted(held, key=lambda s: (s.node_group, s.node_id))

    def _forget_ended(self, now: float) -> None:
        gone = [node_id for node_id, s in self._envoys.items()
                if s.ended_at is not None and now - s.ended_at > self._forget_after]
        for node_id in gone:
            del self._envoys[node_id]
            self._warned.discard(node_id)

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


class MetricsService:
    """The gRPC handler of `StreamMetrics`: register `handler()` on the xDS server."""

    def __init__(self, store: StatsStore, *, node_group=lambda node: node.cluster,
                 trust_domain: str = identity.DEFAULT_TRUST_DOMAIN):
        self.store = store
        self._node_group = node_group
        self._trust_domain = trust_domain  # over mutual TLS, an Envoy pushes stats for its own node groups only

    def handler(self) -> grpc.GenericRpcHandler:
        stream = grpc.stream_unary_rpc_method_handler(self._stream, request_deserializer=_Sized.FromString,
                                                     response_serializer=StreamMetricsResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, {METHOD: stream})

    async def _stream(self, requests, context):
        stats = None
        try:
            async for sized in requests:
                message = sized.message
                if stats is None:
                    node = message.identifier.node
                    if not node.id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "the first StreamMetricsMessage must identify its Envoy (identifier.node)")
                    group = self._node_group(node)
                    peer = identity.peer_of(context.auth_context(), self._trust_domain)
                    if not peer.may_see(group):  # identity, not claims: nobody writes another group's stats
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                            f"node group {group!r} is not this client's ({peer.description})")
                    stats = self.store.opened(node.id, group)
                    if stats is None:
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many Envoys pushing stats")
                self.store.received(stats, message, sized.size)
        finally:
            if stats is not None:
                self.store.closed(stats)
        return StreamMetricsResponse()


@dataclass(frozen=True)
class _Sized:
    """A decoded message and its size on the wire (for the cost per flush)."""

    message: object
    size: int

    @classmethod
    def FromString(cls, data: bytes) -> _Sized:  # noqa: N802 -- the name gRPC deserializers have
        return cls(StreamMetricsMessage.FromString(data), len(data))
