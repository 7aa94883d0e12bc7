"""Bursts of events become one translation, and a steady stream of events cannot starve Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

import pytest

from controlplane.runtime.pipeline import LARGE_PASS, Coalescer, Pipeline, collector_paused
from controlplane.sources.store import Store
from controlplane.xds import SnapshotCache


@contextlib.asynccontextmanager
async def running(coalescer: Coalescer):
    task = asyncio.create_task(coalescer.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_burst_is_one_action():
    calls: list[float] = []
    coalescer = Coalescer(lambda: calls.append(asyncio.get_running_loop().time()), hold_off=0.05, max_delay=1.0)
    async with running(coalescer):
        for _ in range(20):  # a rollout touching 20 EndpointSlices within 20 ms
            coalescer.poke()
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
    assert len(calls) == 1


async def test_events_that_never_pause_still_publish_while_they_go_on():
    pokes = 0
    published_after: list[int] = []  # how many events had arrived at each publication
    coalescer = Coalescer(lambda: published_after.append(pokes), hold_off=0.05, max_delay=0.2)
    async with running(coalescer):
        for _ in range(100):  # bounded: an event every 10 ms or more, never a 50 ms pause: >= 1 s in all
            pokes += 1
            coalescer.poke()
            await asyncio.sleep(0.01)
    # The maximum delay, not the end of the events, triggered publications: several, during the stream.
    assert len(published_after) >= 2 and published_after[0] < 100


async def test_a_failed_publication_is_logged_and_the_next_change_is_still_published(caplog):
    attempts: list[int] = []

    def publish():
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise RuntimeError("a translation bug")
    coalescer = Coalescer(publish, hold_off=0.01, max_delay=0.1)
    async with running(coalescer):
        coalescer.poke()
        await asyncio.sleep(0.1)
        coalescer.poke()
        await asyncio.sleep(0.1)
    assert attempts == [0, 1]
    assert "publishing failed" in caplog.text and "a translation bug" in caplog.text


def test_a_refused_object_is_logged_once_then_as_accepted_or_deleted(caplog):
    from controlplane.runtime.pipeline import Pipeline
    from controlplane.sources.store import ObjectKey, Store
    from controlplane.xds import SnapshotCache
    from tests.objects import NS, app, gateway

    pipeline = Pipeline(SnapshotCache())
    store = Store([gateway(), *app("api", service="missing"), *app("web", service="gone")])
    caplog.set_level("INFO")
    pipeline.publish(store.view())
    pipeline.publish(store.view())
    assert caplog.text.count(f"Backend {NS}/api not accepted") == 1
    store.put(app("api")[0])  # fixed: it names its own Service now
    store.delete(ObjectKey("Backend", NS, "web"))
    pipeline.publish(store.view())
    assert f"Backend {NS}/api accepted now" in caplog.text
    assert f"Backend {NS}/web deleted" in caplog.text and f"Backend {NS}/web accepted now" not in caplog.text


def test_serve_s_minimum_certificate_lifetime_reaches_translation():
    """`serve --min-certificate-lifetime 6h`: a certificate with 12 h left is served; with the
    default (24 h) the same new certificate is refused."""
    from controlplane import cli
    from controlplane.runtime.pipeline import Pipeline
    from controlplane.sources.store import ObjectKey, Store
    from controlplane.xds import SnapshotCache
    from tests.certs import issue, tls_secret
    from tests.objects import NS, gateway

    args = cli.build_parser().parse_args(["serve", "--source", "m", "--min-certificate-lifetime", "6h"])
    assert args.min_certificate_lifetime == 6 * 3600
    short_lived = issue("localhost", valid_days=1.5, starts_days_ago=1)  # 12 h left
    store = Store([gateway(listeners=[{"name": "https", "port": 8443, "protocol": "HTTPS",
                                       "tls": {"certificateSecret": "edge-cert"}}]),
                   tls_secret("edge-cert", short_lived.cert_pem, short_lived.key_pem)])
    key = ObjectKey("Gateway", NS, "edge")
    relaxed = Pipeline(SnapshotCache(), min_certificate_lifetime=args.min_certificate_lifetime).publish(store.view())
    default = Pipeline(SnapshotCache()).publish(store.view())
    assert relaxed.conditions[key][0].status == "True"
    assert default.conditions[key][0].status == "False" and "(check ExpiresSoon)" in default.conditions[key][0].message


@pytest.fixture
def nothing_left_frozen():
    yield
    with collector_paused():  # a pause gives back what the test's passes froze
        pass
    assert gc.get_freeze_count() == 0


def _large_pass(kept: list) -> None:
    with collector_paused():
        kept.extend([index] for index in range(LARGE_PASS))


class _Cycle:
    def __init__(self):
        self.itself = self


def test_what_a_large_pass_leaves_is_frozen_until_the_next_pause(nothing_left_frozen):
    gc.collect()
    kept: list = []
    _large_pass(kept)
    assert gc.get_freeze_count() >= LARGE_PASS  # no young collection walks them
    with collector_paused():
        assert gc.get_freeze_count() == 0
        kept.append([0])
    assert gc.get_freeze_count() == 0  # a small pass is left to the collector


def test_frozen_garbage_meets_a_full_collection_before_it_can_be_frozen_again(nothing_left_frozen):
    gc.collect()
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    _large_pass([])
    del cycle
    gc.collect()
    assert gone() is not None  # frozen garbage: a full collection does not see it
    _large_pass([])  # unfrozen, and not frozen again: no full collection has run since
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None
    kept: list = []
    _large_pass(kept)  # one has run now
    assert gc.get_freeze_count() >= LARGE_PASS


def test_the_collector_is_paused_while_publishing_and_on_again_after_even_when_translation_fails():
    pipeline = Pipeline(SnapshotCache())
    seen = []

    def failing(view, now):
        seen.append(gc.isenabled())
        raise RuntimeError("a bug")

    pipeline.translator.translate = failing
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        pipeline.publish(Store().view())
    assert seen == [False] and gc.isenabled()
    gc.disable()  # whoever disabled it keeps it so
    try:
        with pytest.raises(RuntimeError):
            pipeline.publish(Store().view())
        assert not gc.isenabled()
    finally:
        gc.enable()
