"""The Kubernetes source with the official client, over real HTTP, against tests/kube_api_server.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from controlplane.sources.kubernetes import KubernetesSource
from controlplane.sources.store import ObjectKey
from tests.harness import eventually
from tests.kube_api_server import KubeAPIServer
from tests.objects import NS, app, endpoint_slice, gateway, ready


class Recorder:
    """The source's callback: every published state, as the set of object keys it held."""

    def __init__(self):
        self.states: list[set[ObjectKey]] = []
        self.store = None

    def __call__(self, store) -> None:
        self.store = store
        self.states.append(set(store.view()))

    def has(self, kind: str, name: str) -> bool:
        return bool(self.states) and ObjectKey(kind, NS, name) in self.states[-1]


@contextlib.asynccontextmanager
async def watching(api: KubeAPIServer, **options):
    source = KubernetesSource(api.client(), backoff_base=0.05, **options)
    recorder = Recorder()
    task = asyncio.create_task(source.watch(recorder))
    try:
        yield source, recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def lists(api: KubeAPIServer, plural: str) -> int:
    return sum(1 for method, path, query in api.requests
               if method == "GET" and path.endswith(f"/{plural}") and "watch" not in query)


async def test_publishes_once_every_kind_is_listed_then_follows_changes(api):
    for obj in [gateway(), *app("api")]:
        api.create(obj)
    async with watching(api) as (_source, recorder):
        await eventually(lambda: recorder.states, what="the first publication")
        assert {ObjectKey("Gateway", NS, "edge"), ObjectKey("Backend", NS, "api"), ObjectKey("Service", NS, "api"),
                ObjectKey("EndpointSlice", NS, "api-1")} <= recorder.states[0]

        api.create(endpoint_slice("api", [ready("10.0.0.2")], name="api-2"))
        await eventually(lambda: recorder.has("EndpointSlice", "api-2"), what="an added object")
        api.delete("EndpointSlice", NS, "api-1")
        await eventually(lambda: not recorder.has("EndpointSlice", "api-1"), what="a deleted object")
        api.update({**api.get("Backend", NS, "api"), "spec": {**api.get("Backend", NS, "api")["spec"],
                                                              "connectTimeoutMs": 500}})
        await eventually(lambda: recorder.store.view().get("Backend", NS, "api")["spec"]["connectTimeoutMs"] == 500,
                         what="an updated object")


async def test_dropped_watches_resume_from_the_last_version_without_relisting(api):
    api.create(gateway())
    async with watching(api) as (_source, recorder):
        await eventually(lambda: recorder.states, what="the first publication")
        await asyncio.sleep(0.5)  # bookmarks flow
        for _ in range(3):
            api.drop_watches()
            api.create(endpoint_slice("api", [ready("10.0.0.9")], name=f"slice-{len(recorder.states)}"))
            await asyncio.sleep(0.3)
        await eventually(lambda: len([k for k in recorder.states[-1] if k.kind == "EndpointSlice"]) == 3,
                         what="every event made while watches were broken")
        assert lists(api, "endpointslices") == 1
    watches = [query for method, path, query in api.requests if query.get("watch") == "true"]
    assert all(query["allowWatchBookmarks"] == "true" and query["resourceVersion"] for query in watches)


async def test_410_gone_relists_and_never_publishes_a_state_without_known_objects(api):
    for obj in [gateway(), *app("api")]:
        api.create(obj)
    async with watching(api) as (_source, recorder):
        await eventually(lambda: recorder.states, what="the first publication")
        api.create(endpoint_slice("api", [ready("10.0.0.2")], name="api-2"))
        api.compact()
        api.drop_watches()
        await eventually(lambda: lists(api, "endpointslices") >= 2, what="a relist after 410 Gone")
        api.create(endpoint_slice("api", [ready("10.0.0.3")], name="api-3"))
        await eventually(lambda: recorder.has("EndpointSlice", "api-3"), what="watching again after the relist")
    assert all(ObjectKey("EndpointSlice", NS, "api-1") in state for state in recorder.states)


async def test_api_server_going_away_keeps_the_known_state_catches_up_and_logs_two_lines(api, caplog):
    caplog.set_level(logging.INFO)
    for obj in [gateway(), *app("api")]:
        api.create(obj)
    async with watching(api) as (_source, recorder):
        await eventually(lambda: recorder.states, what="the first publication")
        published = len(recorder.states)
        api.stop()
        await asyncio.sleep(3.0)  # long enough for a 30 s backoff cap to have grown past 2 s
        assert len(recorder.states) == published  # nothing was withdrawn while the API server was away
        api.start()
        api.create(endpoint_slice("api", [ready("10.0.0.7")], name="api-after"))
        await eventually(lambda: recorder.has("EndpointSlice", "api-after"), timeout=2.5,
                         what="changes within about 2 s of the API server's return")
    assert all(ObjectKey("EndpointSlice", NS, "api-1") in state for state in recorder.states)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("Kubernetes API server not answering"), warnings
    back = [r.getMessage() for r in caplog.records if "answering again after" in r.getMessage()]
    assert len(back) == 1 and re.search(r"after [3-9]\.\ds", back[0]), back


async def test_one_namespace_only(api):
    api.create(gateway())
    api.create(gateway(namespace="other"))
    async with watching(api, namespace=NS) as (_source, recorder):
        await eventually(lambda: recorder.states, what="the first publication")
        assert [key.namespace for key in recorder.states[-1]] == [NS]
    assert all(f"/namespaces/{NS}/" in path for _m, path, _q in api.requests)


async def test_forbidden_kind_is_retried_with_an_rbac_hint_and_nothing_is_published_meanwhile(api, caplog):
    api.create(gateway())
    api.forbidden.add("Secret")
    async with watching(api) as (source, recorder):
        await eventually(lambda: "may not list/watch this kind: apply k8s/rbac.yaml" in caplog.text,
                         what="the RBAC hint in the log")
        assert recorder.states == [] and not source.synced()  # half a picture is never published
        api.forbidden.clear()
        await eventually(lambda: recorder.states, what="the first publication once access is granted")


async def test_a_starting_api_servers_429_is_retried_quietly(api, caplog):
    """Right after it starts, a real API server answers 429 "storage is (re)initializing" for a
    moment: retried at once, and not worth a warning."""
    api.create(gateway())
    api.initializing.add("Secret")
    async with watching(api) as (source, recorder):
        await asyncio.sleep(1.0)
        assert recorder.states == [] and not source.synced()
        api.initializing.clear()
        await eventually(lambda: recorder.states, what="the first publication once storage is ready")
    assert "initializing" not in caplog.text and "WARNING" not in caplog.text
