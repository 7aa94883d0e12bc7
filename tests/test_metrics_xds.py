"""The control plane's activity metrics move as a real Envoy is pushed to, ACKs and NACKs.

Read as Prometheus reads them (the text exposition), over State-of-the-World and Delta.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.runtime.activity_metrics import ActivityCollector, sync_state
from controlplane.translate import builders as b
from controlplane.xds.cache import EnvoyStatus, NackRecord, TypeStatus
from controlplane.xds.telemetry import XdsTelemetry
from tests.harness import eventually, free_port
from tests.test_envoy_nack import _port_70000
from tests.test_envoy_xds import GROUP, body_of, delta, web_snapshot  # noqa: F401 (delta: a fixture)


def scrape(collector) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.envoy
async def test_pushes_rollouts_and_nacks_as_a_real_envoy_answers(xds, envoys, backends, delta):
    cache, server = xds
    metrics = ActivityCollector(cache)
    api, other = backends("api"), backends("other")
    port = free_port()
    first = web_snapshot(port, {"api": [api.address], "other": [other.address]})
    cache.set_snapshot(GROUP, first)
    envoys(server.port, node_cluster=GROUP, delta=delta)
    assert await eventually(lambda: body_of(port), what="first traffic") == "api"
    before = scrape(metrics)
    assert value(before, "controlplane_xds_pushes_total", node_group=GROUP, type="clusters") >= 1
    assert value(before, "controlplane_xds_pushes_total", node_group=GROUP, type="listeners") >= 1
    assert value(before, "controlplane_xds_envoys", node_group=GROUP, sync="synced") == 1

    # A new version: pushed, ACKed, and the rollout's time observed once.
    cache.set_snapshot(GROUP, first.replace(endpoints=[b.load_assignment("api", [api.address, other.address]),
                                                       b.load_assignment("other", [other.address])]))

    def converged():
        samples = scrape(metrics)
        return samples if value(samples, "controlplane_xds_rollouts_total", node_group=GROUP,
                                result="converged") == 1 else None
    after = await eventually(converged, what="the rollout to converge")
    assert value(after, "controlplane_xds_rollout_seconds_count", node_group=GROUP) == 1
    assert 0 < value(after, "controlplane_xds_rollout_seconds_sum", node_group=GROUP) < 15
    assert value(after, "controlplane_xds_pushes_total", node_group=GROUP, type="endpoints") > \
        value(before, "controlplane_xds_pushes_total", node_group=GROUP, type="endpoints")
    assert value(after, "controlplane_xds_nacks_total", node_group=GROUP, type="endpoints") == 0

    # Envoy refuses the next one: counted as a NACK, the rollout as rejected, the Envoy as nacked.
    cache.set_snapshot(GROUP, first.replace(endpoints=[b.load_assignment("api", [api.address, other.address]),
                                                       _port_70000("other")]))

    def rejected():
        samples = scrape(metrics)
        return samples if value(samples, "controlplane_xds_rollouts_total", node_group=GROUP,
                                result="rejected") == 1 else None
    refused = await eventually(rejected, what="the NACK to be counted")
    assert value(refused, "controlplane_xds_nacks_total", node_group=GROUP, type="endpoints") == 1
    assert value(refused, "controlplane_xds_envoys", node_group=GROUP, sync="nacked") == 1
    assert value(refused, "controlplane_xds_envoys", node_group=GROUP, sync="synced") == 0
    assert value(refused, "controlplane_xds_rollout_seconds_count", node_group=GROUP) == 1  # not a convergence
    assert await body_of(port) in ("api", "other")  # and Envoy serves on


def test_an_identical_republish_starts_no_rollout_and_a_newer_version_supersedes():
    clock = iter(range(100)).__next__
    telemetry = XdsTelemetry(clock=clock)
    telemetry.published("edge", "v1", waiting=["envoy-1", "envoy-2"])
    telemetry.published("edge", "v1", waiting=["envoy-1", "envoy-2"])  # serve's periodic re-publish
    telemetry.published("edge", "v2", waiting=["envoy-1", "envoy-2"])
    assert telemetry.rollouts == {("edge", "superseded"): 1}

    class Step:
        responses, nacks = (), ()
    telemetry.handled("edge", "envoy-1", Step, settled=True)
    telemetry.handled("edge", "envoy-2", Step, settled=False)  # still has something in flight
    assert ("edge", "converged") not in telemetry.rollouts
    telemetry.left("edge", "envoy-2")  # gone: the rollout is complete for the Envoys still there
    assert telemetry.rollouts[("edge", "converged")] == 1
    assert sum(telemetry.rollout_seconds["edge"].counts) == 1


@pytest.mark.parametrize(("types", "state"), [
    ({"c": TypeStatus("v1", "v1"), "e": TypeStatus("v2", "v2")}, "synced"),
    ({"c": TypeStatus("v1", "v1"), "e": TypeStatus("v3", "v2")}, "stale"),
    ({"c": TypeStatus("v1", "v1"), "r": TypeStatus("", "")}, "not_sent"),
    ({"c": TypeStatus("v2", "v1", NackRecord("c", "v2", ("a",), "bad", 0.0)), "e": TypeStatus("v3", "v2")}, "nacked"),
])
def test_an_envoys_sync_state_is_the_worst_of_its_types(types, state):
    assert sync_state(EnvoyStatus("envoy-1", "edge", 0.0, "ads", types)) == state
