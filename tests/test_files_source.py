"""The file source: manifests parsed with errors that name the file and the line."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.sources.files import DirectorySource, ManifestError, parse_file
from controlplane.sources.store import Store
from controlplane.translate import to_ir


@pytest.mark.parametrize("text, message", [
    ("kind: Service\n  bad: [x\n", "line 2, column 6: not valid YAML"),
    ("- just\n- a list\n", "document 1 is not a mapping"),
    ("kind: Service\nmetadata: {}\n", "document 1 has no kind or no metadata.name"),
    ("kind: Service\nmetadata: [api]\n", "document 1 has no kind or no metadata.name"),
    ("kind: Backend\nmetadata: {name: 7}\n", "document 1 (Backend 7): metadata.name: Input should be a valid string"),
    ("kind: Service\nmetadata: {name: api}\nspec: {ports: [{name: http, port: http}]}\n",
     "document 1 (Service api): spec.ports[0].port: Input should be a valid integer"),
    ("kind: ConfigMap\nmetadata: {name: x}\n---\nkind: EndpointSlice\nmetadata: {name: api-1}\n"
     "endpoints: [{addresses: 10.0.0.1}]\n", "document 2 (EndpointSlice api-1): endpoints[0].addresses: Input should "
     "be a valid list"),
    ("kind: Backend\nmetadata: {name: api, labels: [x], generation: two}\n",
     "metadata.labels: Input should be a valid dictionary; metadata.generation: Input should be a valid integer"),
    ("kind: Secret\nmetadata: {name: tls}\ndata: [tls.crt]\n", "document 1 (Secret tls): data: Input should be a "
     "valid dictionary"),
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


def test_a_file_caught_between_truncate_and_write_is_not_applied(tmp_path):
    manifest = tmp_path / "api.yaml"
    manifest.write_text("kind: Service\nmetadata: {name: api}\n")
    source = DirectorySource(tmp_path)
    source.load()
    manifest.write_text("")  # what a reader sees between an editor's truncate and its write
    assert source.load(settled_only=True) is False
    manifest.write_text("kind: Service\n  bad: [x\n")  # the write lands: a typo
    assert source.load(settled_only=True) is False  # still changing
    assert source.load(settled_only=True) is True  # unchanged for one poll: read
    assert "line 2" in str(source.errors[manifest])
    assert [str(key) for key in source.store().view()] == ["Service default/api"]  # kept, not emptied


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
