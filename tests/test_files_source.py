"""The file source: manifests parsed with errors that name the file and the line."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.sources import files
from controlplane.sources.files import EVENTS, POLL, DirectorySource, ManifestError, parse_file
from controlplane.sources.store import ObjectKey, Store
from controlplane.translate import to_ir
from tests.harness import eventually
from tests.objects import NS, service


@pytest.mark.parametrize("text, message", [
    ("kind: Service\n  bad: [x\n", "line 2, column 6: not valid YAML"),
    ("- just\n- a list\n", "document 1 is not a mapping"),
    ("kind: Service\nmetadata: {}\n", "document 1 has no kind or no metadata.name"),
    ("kind: Service\nmetadata: [api]\n", "document 1 has no kind or no metadata.name"),
    ("kind: Backend\nmetadata: {name: 7}\n", "document 1 (Backend 7): metadata.name: must be a string (it is 7)"),
    ("kind: Service\nmetadata: {name: api}\nspec: {ports: [{name: http, port: http}]}\n",
     "document 1 (Service api): spec.ports[0].port: must be a whole number, such as 8080 (it is 'http')"),
    ("kind: ConfigMap\nmetadata: {name: x}\n---\nkind: EndpointSlice\nmetadata: {name: api-1}\n"
     "endpoints: [{addresses: 10.0.0.1}]\n", "document 2 (EndpointSlice api-1): endpoints[0].addresses: must be a "
     "list (it is '10.0.0.1')"),
    ("kind: Backend\nmetadata: {name: api, labels: [x], generation: two}\n",
     "metadata.labels: must be a mapping (key: value) (it is ['x']); metadata.generation: must be a whole number, "
     "such as 8080 (it is 'two')"),
    ("kind: Secret\nmetadata: {name: tls}\ndata: [tls.crt]\n", "document 1 (Secret tls): data: must be a mapping "
     "(key: value) (it is ['tls.crt'])"),
])
def test_parse_errors_say_where(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as error:
        parse_file(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_kinds_we_do_not_read_are_skipped_and_files_reload_only_when_changed(tmp_path):
    (tmp_path / "a.yaml").write_text("kind: ConfigMap\nmetadata: {name: x}\n---\n"
                                     "kind: Service\nmetadata: {name: api, namespace: shop}\nspec: {}\n")
    source = DirectorySource(tmp_path)
    assert source.load() is True
    assert [str(key) for key in source.store().view()] == ["Service shop/api"]
    assert source.load() is False
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yml").write_text("kind: Service\nmetadata: {name: web}\n")
    assert source.load() is True
    assert sorted(str(key) for key in source.store().view()) == ["Service default/web", "Service shop/api"]


@pytest.mark.parametrize("mode", [EVENTS, POLL])
def test_a_file_open_for_writing_is_read_once_its_writer_closes_it(tmp_path, mode):
    manifest = tmp_path / "api.yaml"
    manifest.write_text("kind: Service\nmetadata: {name: api}\n")
    source = DirectorySource(tmp_path, mode=mode)
    source.load()
    with manifest.open("w") as writer:  # an editor's truncate, or a `>` redirection, before the write
        assert source.load(settled_only=True) is False
        writer.write("kind: Service\n  bad: [x\n")  # the write lands: a typo
        writer.flush()
        assert source.load(settled_only=True) is False
        assert source.load(settled_only=True) is False  # unchanged, but still open: not complete
    assert source.load(settled_only=True) is True  # closed (and, polling, unchanged since the last poll): read
    assert "line 2" in str(source.errors[manifest])
    assert [str(key) for key in source.store().view()] == ["Service default/api"]  # kept, not emptied


@pytest.mark.parametrize("mode", [EVENTS, POLL])
def test_where_writers_cannot_be_seen_a_file_is_read_once_it_settled(tmp_path, mode, monkeypatch):
    """Another owner's file, or a network file system: no lease tells whether a writer has it open."""
    monkeypatch.setattr(files, "open_for_writing", lambda path: None)
    manifest = tmp_path / "api.yaml"
    source = DirectorySource(tmp_path, mode=mode, interval=files.SETTLE)
    manifest.write_text("kind: Service\nmetadata: {name: api}\n")
    assert source.load(settled_only=True) is False  # just changed
    time.sleep(files.SETTLE)
    assert source.load(settled_only=True) is True
    assert [str(key) for key in source.store().view()] == ["Service default/api"]


def test_open_for_writing_tells_a_writer_from_none(tmp_path):
    manifest = tmp_path / "api.yaml"
    manifest.write_text("")
    assert files.open_for_writing(manifest) is False
    with manifest.open("a"):
        assert files.open_for_writing(manifest) is True
    with manifest.open("r"):
        assert files.open_for_writing(manifest) is False
    assert files.open_for_writing(tmp_path / "absent.yaml") is None


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=6)
documents = st.fixed_dictionaries(
    {"kind": st.sampled_from(["Gateway", "Backend", "Service", "EndpointSlice", "Secret", "ConfigMap"]) | json_values},
    optional={"metadata": json_values | st.fixed_dictionaries({"name": st.just("api") | json_values},
                                                              optional={"namespace": json_values,
                                                                        "labels": json_values}),
              "spec": json_values, "endpoints": json_values, "ports": json_values, "data": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_any_manifest_is_read_or_refused_with_a_manifest_error_never_a_crash(tmp_path, document):
    path = tmp_path / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        objects = parse_file(path)
    except ManifestError:
        return
    to_ir.translate(Store(objects).view())  # what the source lets through, translation takes


def _manifest(*names: str) -> str:
    return yaml.safe_dump_all([service(name) for name in names])


def _keys(*names: str) -> list[str]:
    return sorted(f"Service {NS}/{name}" for name in names)


@pytest.fixture
async def watched():
    """`watched(directory, **options)` runs a DirectorySource's watch: (source, every list of objects it published)."""
    tasks: list[asyncio.Task] = []

    def start(directory: Path, **options) -> tuple[DirectorySource, list[list[str]]]:
        source, published = DirectorySource(directory, **options), []
        tasks.append(asyncio.create_task(source.watch(lambda store: published.append(sorted(map(str, store.view()))))))
        return source, published
    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_file_renamed_into_place_is_served_on_its_event(tmp_path, watched, caplog):
    caplog.set_level(logging.INFO, logger=files.__name__)
    _source, published = watched(tmp_path, interval=3600)  # the next poll is an hour away: only events are seen
    await eventually(lambda: published == [[]], what="the first publication")
    staged = tmp_path / ".api.yaml.tmp"  # hidden: never read
    staged.write_text(_manifest("api"))
    os.replace(staged, tmp_path / "api.yaml")
    await eventually(lambda: published[-1] == _keys("api"), timeout=5, what="the renamed file to be served")
    (tmp_path / "team").mkdir()  # a directory made while watching is watched too
    (tmp_path / "team" / ".web.yaml.tmp").write_text(_manifest("web"))
    os.replace(tmp_path / "team" / ".web.yaml.tmp", tmp_path / "team" / "web.yaml")
    await eventually(lambda: published[-1] == _keys("api", "web"), timeout=5, what="the nested file to be served")
    assert f"watching {tmp_path} for changes with file-system events" in caplog.text
    assert published == [[], _keys("api"), _keys("api", "web")]


async def test_a_file_written_in_two_parts_with_a_pause_is_served_only_whole(tmp_path, watched):
    source, published = watched(tmp_path, interval=3600)
    await eventually(lambda: published == [[]], what="the first publication")
    whole = _manifest("api", "web")
    half = whole.index("---")  # the first part alone is a valid file, of one Service
    with (tmp_path / "app.yaml").open("w") as writer:
        writer.write(whole[:half])
        writer.flush()
        await asyncio.sleep(0.5)  # far longer than a batch of events, a settle time or a recheck
        assert source.pending and published == [[]]
        writer.write(whole[half:])
    await eventually(lambda: published[-1] == _keys("api", "web"), timeout=5, what="the whole file to be served")
    assert published == [[], _keys("api", "web")]  # never the half


async def test_a_deleted_file_takes_its_objects_with_it(tmp_path, watched):
    (tmp_path / "api.yaml").write_text(_manifest("api"))
    (tmp_path / "web.yaml").write_text(_manifest("web"))
    _source, published = watched(tmp_path, interval=3600)
    await eventually(lambda: published == [_keys("api", "web")], what="the first publication")
    (tmp_path / "web.yaml").unlink()
    await eventually(lambda: published[-1] == _keys("api"), timeout=5, what="web to be removed")


async def test_a_configmap_volume_update_is_seen_through_its_links(tmp_path, watched):
    """Kubernetes swaps the hidden `..data` link; the visible files are links through it and do not change."""
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "app.yaml").write_text(_manifest("api"))
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "app.yaml").symlink_to("..data/app.yaml")
    _source, published = watched(tmp_path, interval=3600)
    await eventually(lambda: published == [_keys("api")], what="the first publication")
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "app.yaml").write_text(_manifest("api", "web"))
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    await eventually(lambda: published[-1] == _keys("api", "web"), timeout=5, what="the new ConfigMap version")


@pytest.mark.parametrize("force", ["parameter", "environment"])
async def test_polling_can_be_forced_and_says_so(tmp_path, watched, caplog, monkeypatch, force):
    """For a file system without events (NFS, some container mounts), where inotify stays silent."""
    caplog.set_level(logging.INFO, logger=files.__name__)
    monkeypatch.setattr(files.watchfiles, "awatch", None)  # events would fail loudly
    if force == "environment":
        monkeypatch.setenv("CONTROLPLANE_FILE_WATCH", "poll")
    _source, published = watched(tmp_path, interval=0.05, **({"mode": POLL} if force == "parameter" else {}))
    await eventually(lambda: published == [[]], what="the first publication")
    (tmp_path / "api.yaml").write_text(_manifest("api"))
    await eventually(lambda: published[-1] == _keys("api"), timeout=5, what="the change to be polled")
    (tmp_path / "api.yaml").unlink()
    await eventually(lambda: published[-1] == [], timeout=5, what="the deletion to be polled")
    assert f"polling {tmp_path} every 0.05s for changes (CONTROLPLANE_FILE_WATCH=poll)" in caplog.text


def test_an_unknown_watch_mode_is_refused_saying_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLPLANE_FILE_WATCH", "inotify")
    with pytest.raises(ManifestError, match="CONTROLPLANE_FILE_WATCH='inotify' is not a way to watch it; set events"):
        DirectorySource(tmp_path)


async def test_without_file_system_events_it_polls_and_says_why(tmp_path, watched, caplog, monkeypatch):
    def no_events(*paths, **options):
        raise OSError("OS file watch limit reached")
    monkeypatch.setattr(files.watchfiles, "awatch", no_events)
    source, published = watched(tmp_path, interval=0.05)
    await eventually(lambda: published == [[]], what="the first publication")
    (tmp_path / "api.yaml").write_text(_manifest("api"))
    await eventually(lambda: published[-1] == _keys("api"), timeout=5, what="the change to be polled")
    assert source.mode == POLL
    assert (f"{tmp_path}: file-system events are not available (OSError: OS file watch limit reached); polling it "
            "every 0.05s instead") in caplog.text


async def test_when_idle_it_neither_looks_nor_spins(tmp_path, watched, monkeypatch):
    (tmp_path / "api.yaml").write_text(_manifest("api"))
    looks = []
    files_of = DirectorySource._files
    monkeypatch.setattr(DirectorySource, "_files", lambda self: looks.append(1) or files_of(self))
    _source, published = watched(tmp_path)
    await eventually(lambda: published and looks, what="the first publication")
    await asyncio.sleep(0.2)
    before, cpu = len(looks), resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(1)
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert len(looks) == before  # no scan of the directory without an event
    assert after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime < 0.2  # a spinning loop would take ~1 s


async def test_a_burst_of_1000_writes_is_a_few_publications(tmp_path, watched):
    _source, published = watched(tmp_path, interval=3600)
    await eventually(lambda: published == [[]], what="the first publication")
    names = [f"svc-{number}" for number in range(1000)]

    def burst() -> None:
        for name in names:
            (tmp_path / f"{name}.yaml").write_text(_manifest(name))
    await asyncio.to_thread(burst)
    await eventually(lambda: published[-1] == _keys(*names), timeout=30, what="all 1,000 files to be served")
    assert len(published) <= 15, len(published)  # one per file would be 1,001; measured 5-6


async def test_a_directory_that_disappears_keeps_serving_and_is_read_again_when_back(tmp_path, watched, caplog):
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "api.yaml").write_text(_manifest("api"))
    source, published = watched(directory, interval=0.05)
    await eventually(lambda: published == [_keys("api")], what="the first publication")
    shutil.rmtree(directory)
    await eventually(lambda: f"{directory} is gone: keeping the 1 objects its files served" in caplog.text,
                     timeout=5, what="the directory to be missed")
    directory.mkdir()
    (directory / "web.yaml").write_text(_manifest("web"))
    await eventually(lambda: published[-1] == _keys("web"), timeout=5, what="the directory to be read again")
    (directory / "db.yaml").write_text(_manifest("db"))  # and watched again
    await eventually(lambda: published[-1] == _keys("db", "web"), timeout=5, what="a change in it")
    assert [] not in published  # nothing was ever withdrawn for the directory's absence


async def test_a_directory_moved_into_place_is_the_one_watched(tmp_path, watched):
    directory, fresh = tmp_path / "manifests", tmp_path / "fresh"
    directory.mkdir()
    fresh.mkdir()
    (directory / "api.yaml").write_text(_manifest("api"))
    (fresh / "web.yaml").write_text(_manifest("web"))
    _source, published = watched(directory, interval=0.05)
    await eventually(lambda: published == [_keys("api")], what="the first publication")
    directory.rename(tmp_path / "old")
    fresh.rename(directory)
    await eventually(lambda: published[-1] == _keys("web"), timeout=5, what="the new directory to be read")
    (directory / "db.yaml").write_text(_manifest("db"))
    await eventually(lambda: published[-1] == _keys("db", "web"), timeout=5, what="a change in the new directory")


def test_a_file_edit_writes_only_what_it_changed_so_translation_costs_that(tmp_path):
    """One Store for the source's life: a view says what a file edit changed (the translator's fast
    paths need it; a new Store each time made every edit a full translation)."""
    (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: {name: api, namespace: shop}\nspec: {}\n---\n"
                                     "kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {}\n")
    (tmp_path / "b.yaml").write_text("kind: Service\nmetadata: {name: db, namespace: shop}\nspec: {}\n")
    source = DirectorySource(tmp_path)
    source.load()
    store = source.store()
    before = store.view()
    (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: {name: api, namespace: shop}\nspec: {}\n---\n"
                                     "kind: Service\nmetadata: {name: web, namespace: shop, labels: {a: b}}\nspec: {}\n")
    (tmp_path / "b.yaml").unlink()
    assert source.load() is True
    assert source.store() is store
    after = store.view()
    assert after.changed_since(before) == {ObjectKey("Service", "shop", "web"), ObjectKey("Service", "shop", "db")}
    assert sorted(str(key) for key in after) == ["Service shop/api", "Service shop/web"]
    assert after.origins[ObjectKey("Service", "shop", "api")] == str(tmp_path / "a.yaml")
