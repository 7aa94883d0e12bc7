"""Snapshots and the cache: consistency, versions from bytes, both message flavours, node groups."""

from __future__ import annotations

import subprocess
import sys

import pytest
from envoy.config.core.v3 import base_pb2
from envoy_data_plane.envoy.config.cluster.v3 import Cluster as DataPlaneCluster
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment as DataPlaneAssignment

from controlplane.translate import builders as b
from controlplane.xds import CLUSTER, ENDPOINT, ROUTE, Snapshot, SnapshotCache, SnapshotError


def test_endpoints_without_an_eds_cluster_are_refused_with_their_names():
    with pytest.raises(SnapshotError) as refused:
        Snapshot(clusters=[b.eds_cluster("api")],
                 endpoints=[b.load_assignment("api", []), b.load_assignment("ghost", []),
                            b.load_assignment("orphan", [])])
    assert refused.value.dangling == {ENDPOINT: ["ghost", "orphan"]}
    assert "ghost, orphan" in str(refused.value)


def test_listener_naming_a_missing_route_configuration_is_refused():
    with pytest.raises(SnapshotError) as refused:
        Snapshot(listeners=[b.http_listener("http", address="0.0.0.0", port=80, route_config_name="missing")])
    assert refused.value.dangling == {ROUTE: ["missing"]}
    assert "missing" in str(refused.value) and "rds.route_config_name" in str(refused.value)


def test_duplicate_names_are_refused():
    with pytest.raises(SnapshotError, match="duplicate clusters names: api"):
        Snapshot(clusters=[b.eds_cluster("api"), b.eds_cluster("api", connect_timeout_ms=5)])


def test_resource_without_a_name_is_refused():
    with pytest.raises(ValueError, match="without a name"):
        Snapshot(clusters=[b.eds_cluster("")])


def test_envoy_data_plane_messages_serialize_to_the_same_resource():
    upb = Snapshot(clusters=[b.eds_cluster("api")], endpoints=[b.load_assignment("api", [("10.0.0.1", 80)])])
    dataclasses = Snapshot(
        clusters=[DataPlaneCluster.FromString(b.eds_cluster("api").SerializeToString())],
        endpoints=[DataPlaneAssignment().parse(b.load_assignment("api", [("10.0.0.1", 80)]).SerializeToString())])
    assert dataclasses.version == upb.version
    assert dataclasses.resources(CLUSTER).resources["api"].body == upb.resources(CLUSTER).resources["api"].body


def test_versions_come_from_content_and_replace_shares_unchanged_types():
    first = Snapshot(clusters=[b.eds_cluster("api")], endpoints=[b.load_assignment("api", [("10.0.0.1", 80)])])
    same = Snapshot(clusters=[b.eds_cluster("api")], endpoints=[b.load_assignment("api", [("10.0.0.1", 80)])])
    moved = first.replace(endpoints=[b.load_assignment("api", [("10.0.0.2", 80)])])
    assert same.version == first.version != moved.version
    assert moved.resources(CLUSTER) is first.resources(CLUSTER)
    assert moved.resources(ENDPOINT).resources["api"].version != first.resources(ENDPOINT).resources["api"].version


def test_replace_is_checked_for_consistency_too():
    first = Snapshot(clusters=[b.eds_cluster("api")], endpoints=[b.load_assignment("api", [])])
    with pytest.raises(SnapshotError, match="not the EDS name of any cluster"):
        first.replace(clusters=[])


def test_node_groups_default_to_node_cluster_and_are_pluggable():
    node = base_pb2.Node(id="edge-7", cluster="gateway")
    assert SnapshotCache().node_group(node) == "gateway"
    by_prefix = SnapshotCache(node_group=lambda n: n.id.split("-")[0])
    assert by_prefix.node_group(node) == "edge"


def test_set_snapshot_notifies_watchers_of_that_group_only():
    cache = SnapshotCache()
    seen: list[str] = []
    stop = cache.watch("a", lambda: seen.append("a"))
    cache.watch("b", lambda: seen.append("b"))
    cache.set_snapshot("a", Snapshot())
    stop()
    cache.set_snapshot("a", Snapshot())
    assert seen == ["a"]
    assert cache.snapshot("a") is not None and cache.snapshot("nobody") is None
    with pytest.raises(TypeError, match="needs a Snapshot"):
        cache.set_snapshot("a", {"clusters": []})


def test_listener_naming_a_missing_sds_secret_is_refused():
    from controlplane.xds import SECRET
    listener = b.http_listener("https", address="0.0.0.0", port=443, route_config_name="r",
                               transport_socket=b.downstream_tls("edge/cert", "edge/ca"))
    routes = [b.route_configuration("r", [])]
    with pytest.raises(SnapshotError) as refused:
        Snapshot(listeners=[listener], routes=routes, secrets=[b.certificate_secret("edge/cert", b"c", b"k")])
    assert refused.value.dangling == {SECRET: ["edge/ca"]}
    Snapshot(listeners=[listener], routes=routes, secrets=[b.certificate_secret("edge/cert", b"c", b"k"),
                                                           b.trusted_ca_secret("edge/ca", b"ca")])


def test_the_same_content_has_the_same_version_in_another_process():
    """A restarted or second replica gives unchanged content the version Envoys already hold
    (the runtime layer is a map, which upb wrote in a different order in each process)."""
    program = ("from controlplane.translate import builders as b; from controlplane.xds.resources import Resource, "
               "RUNTIME; print(Resource.from_message(RUNTIME, b.runtime_layer({f'circuit_breakers.c{i}.default."
               "max_connections': i for i in range(20)})).version)")
    versions = {subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
                for _ in range(3)}
    assert len(versions) == 1
