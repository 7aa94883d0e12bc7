"""The xDS cache and server: the part of the control plane that knows nothing of Kubernetes.

Embed it like go-control-plane: build `Snapshot`s of Envoy resources (xds-protos messages or
envoy-data-plane dataclasses), `SnapshotCache.set_snapshot(node_group, snapshot)`, and serve the
cache with `XdsServer`.
"""

from controlplane.xds.cache import (
    EnvoyStatus,
    NackRecord,
    NodeGroupFn,
    Snapshot,
    SnapshotCache,
    SnapshotError,
    TypeStatus,
    by_node_cluster,
)
from controlplane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, RUNTIME, SECRET, Resource
from controlplane.xds.server import XdsServer

__all__ = [
    "CLUSTER", "ENDPOINT", "LISTENER", "ROUTE", "RUNTIME", "SECRET",
    "EnvoyStatus", "NackRecord", "NodeGroupFn", "Resource", "Snapshot", "SnapshotCache", "SnapshotError",
    "TypeStatus", "XdsServer", "by_node_cluster",
]
