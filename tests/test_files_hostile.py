"""The file source against hostile files: whatever a file holds, it is read or refused as that
file's error (naming it), the file keeps its last good objects and the other files are untouched.
A control plane that a stray file can stop, or empty, is an outage waiting for a typo."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane import cli
from controlplane.sources.files import MAX_FILE_BYTES, DirectorySource, ManifestError, parse_file
from controlplane.sources.store import ObjectKey
from tests.objects import NS, app, backend, gateway, service

GOOD = yaml.safe_dump_all([backend("api"), service("api")])
API_OBJECTS = [f"Backend {NS}/api", f"Service {NS}/api"]


def _bomb(levels: int = 9) -> str:
    """Billion laughs: each level is nine aliases of the one before, 9**levels strings in all."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _named(kind: str, name: str, namespace: str = NS) -> str:
    return yaml.safe_dump({"kind": kind, "metadata": {"name": name, "namespace": namespace}})


HOSTILE: dict[str, tuple[bytes, str]] = {
    "latin-1": ("kind: Service\nmetadata: {name: api, labels: {owner: José}}\n".encode("latin-1"),
                "line 2: byte 0xe9 is not UTF-8"),
    "utf-16 with BOM": (GOOD.encode("utf-16"), "is UTF-16 text"),
    "utf-16-be with BOM": (b"\xfe\xff" + GOOD.encode("utf-16-be"), "is UTF-16 text"),
    "utf-16-le without BOM": (GOOD.encode("utf-16-le"), "line 1: the character U+0000 is not allowed in YAML"),
    "utf-16-be without BOM": (GOOD.encode("utf-16-be"), "line 1: the character U+0000 is not allowed in YAML"),
    "NUL bytes": (GOOD.encode()[:40] + b"\x00\x00" + GOOD.encode()[40:], "the character U+0000 is not allowed"),
    "a control character": (b"kind: Service\nmetadata: {name: a\x1bpi}\n", "line 2: the character U+001B"),
    **{f"random bytes (seed {seed})": (random.Random(seed).randbytes(512), "") for seed in range(5)},
    "500-deep flow list": (b"[" * 500 + b"]" * 500, "line 1, column 101: nested more than 100 levels deep"),
    "500-deep block list": ("".join("  " * n + "-\n" for n in range(500)).encode(),
                            "line 101, column 201: nested more than 100 levels deep"),
    "500-deep flow map": (b"{a: " * 500 + b"1" + b"}" * 500, "nested more than 100 levels deep"),
    "500-deep block map": ("".join("  " * n + "a:\n" for n in range(500)).encode(), "nested more than 100 levels"),
    "deep through aliases": (("a0: &a0 []\n" + "".join(f"a{n}: &a{n} [*a{n - 1}]\n" for n in range(1, 200)))
                             .encode(), "nested more than 100 levels deep (counting what aliases stand for)"),
    "over the size limit": (b"#" * MAX_FILE_BYTES + b"\n", f"is {MAX_FILE_BYTES + 1} bytes, over the 4 MiB limit"),
    "alias bomb": (_bomb().encode(), "more than 1,000,000 YAML nodes, counting each alias as all it stands for"),
    "alias bomb in a Service": (("kind: Service\nmetadata:\n  name: api\n  labels: &l0 {a: b}\n"
                                 + "".join(f"  l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 20)}]\n" for n in range(1, 7)))
                                .encode(), "more than 1,000,000 YAML nodes"),
    "a value that contains itself": (b"kind: Service\nmetadata: &m {name: api, again: *m}\n",
                                     "line 2, column 33: the alias *m is inside the node &m it names"),
    "a month 13": (b"kind: Service\nmetadata: {name: api, created: 2024-13-01}\n",
                   "line 2, column 32: cannot read this timestamp (month must be in 1..12)"),
    "a bad !!timestamp": (b"a: !!timestamp soon\n", "cannot read this timestamp"),
    "a bad !!bool": (b"a: !!bool maybe\n", "cannot read this bool"),
    "an empty !!int": (b"a: !!int ''\n", "cannot read this int"),
    "an integer of 5000 digits": (b"a: " + b"7" * 5000 + b"\n", "cannot read this int (Exceeds the limit"),
    "a Python tag": (b"a: !!python/object/apply:os.system [true]\n", "not valid YAML (could not determine"),
    "Backend api/websocket": (_named("Backend", "api/websocket").encode(),
                              "document 1 (Backend api/websocket): metadata.name: 'api/websocket' is not a valid name"),
    "Gateway in upper case": (_named("Gateway", "Edge").encode(), "metadata.name: 'Edge' is not a valid name"),
    "Secret starting with '-'": (_named("Secret", "-tls").encode(), "metadata.name: '-tls' is not a valid name"),
    "EndpointSlice with '_'": (_named("EndpointSlice", "api_1").encode(), "'api_1' is not a valid name"),
    "Backend of 254 characters": (_named("Backend", "a" * 254).encode(), "at most 253 characters"),
    "Service starting with a digit": (_named("Service", "1api").encode(), "'1api' is not a valid Service name"),
    "Service with a dot": (_named("Service", "api.v2").encode(), "'api.v2' is not a valid Service name"),
    "namespace in upper case": (_named("Service", "api", "Shop").encode(),
                                "metadata.namespace: 'Shop' is not a valid namespace"),
    "namespace with a dot": (_named("Backend", "api", "shop.eu").encode(), "'shop.eu' is not a valid namespace"),
    "an object twice in one file": ((GOOD + "---\n" + yaml.safe_dump(service("api", port=81))).encode(),
                                    f"document 3 defines Service {NS}/api again (document 2 did first)"),
}


def _rewrite(path: Path, data: bytes) -> None:
    """Write `data` so that the next load sees a change even within one mtime tick."""
    stamp = path.stat().st_mtime_ns + 10**9 if path.exists() else None
    path.write_bytes(data)
    if stamp is not None:
        os.utime(path, ns=(stamp, stamp))


def _served(source: DirectorySource) -> list[str]:
    return sorted(str(key) for key in source.store().view())


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_file_is_its_own_error_and_keeps_its_last_good_objects(tmp_path, case):
    data, message = HOSTILE[case]
    hostile, other = tmp_path / "api.yaml", tmp_path / "web.yaml"
    hostile.write_text(GOOD)
    other.write_text(yaml.safe_dump(service("web")))
    source = DirectorySource(tmp_path)
    source.load()
    _rewrite(hostile, data)
    assert source.load() is True
    error = source.errors[hostile]
    assert str(error).startswith(f"{hostile}: ") and message in str(error) and "\n" not in str(error)
    assert list(source.errors) == [hostile]
    assert _served(source) == [*API_OBJECTS, f"Service {NS}/web"]  # kept, and the other file untouched
    with pytest.raises(ManifestError) as raised:
        parse_file(hostile)
    assert str(raised.value) == str(error)


@pytest.mark.parametrize("data", [b"\xef\xbb\xbf" + GOOD.encode(), GOOD.replace("\n", "\r\n").encode()],
                         ids=["UTF-8 with a BOM", "CRLF line ends"])
def test_what_kubectl_reads_is_read(tmp_path, data):
    (tmp_path / "api.yaml").write_bytes(data)
    assert [obj["kind"] for obj in parse_file(tmp_path / "api.yaml")] == ["Backend", "Service"]


@pytest.mark.parametrize("kind, name, namespace", [
    ("Backend", "api.v2", NS), ("Gateway", "a" * 253, NS), ("Service", "a" + "-b" * 31, NS),
    ("Secret", "edge-cert.2024", "a" * 63), ("EndpointSlice", "api-x7k2p", "default"), ("Service", "api", ""),
])
def test_names_the_api_server_accepts_are_accepted(tmp_path, kind, name, namespace):
    (tmp_path / "a.yaml").write_text(_named(kind, name, namespace))
    assert parse_file(tmp_path / "a.yaml")[0]["metadata"]["name"] == name


def test_a_file_that_is_not_a_regular_file_or_cannot_be_read_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.yaml")  # opening it would wait for a writer forever
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    (tmp_path / "ok.yaml").write_text(GOOD)
    source = DirectorySource(tmp_path)
    source.load()
    assert "is not a regular file" in str(source.errors[tmp_path / "pipe.yaml"])
    assert "cannot read it (Too many levels of symbolic links)" in str(source.errors[tmp_path / "loop.yaml"])
    assert _served(source) == API_OBJECTS


def test_hidden_files_and_directories_are_skipped(tmp_path):
    """A ConfigMap volume: each file is a link into `..<timestamp>/`, which holds the same objects."""
    (tmp_path / "..2024_01_01").mkdir()
    (tmp_path / "..2024_01_01" / "api.yaml").write_text(GOOD)
    (tmp_path / "api.yaml").symlink_to(tmp_path / "..2024_01_01" / "api.yaml")
    (tmp_path / ".api.yaml").write_text("not: [yaml")
    source = DirectorySource(tmp_path)
    source.load()
    assert not source.errors and _served(source) == API_OBJECTS


def _port(source: DirectorySource, name: str) -> int:
    return source.store().view().get("Service", NS, name)["spec"]["ports"][0]["port"]


def _services(*ports: tuple[str, int]) -> str:
    return yaml.safe_dump_all([service(name, port=port) for name, port in ports])


@pytest.mark.parametrize("first, second", [("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")])
def test_at_startup_the_first_file_by_path_defines_a_duplicate_object(tmp_path, first, second):
    (tmp_path / first).write_text(_services(("api", 80)))
    (tmp_path / second).write_text(_services(("api", 81), ("web", 82)))
    source = DirectorySource(tmp_path)
    source.load()
    winner, loser = sorted([tmp_path / first, tmp_path / second])
    assert _port(source, "api") == (80 if winner.name == first else 81)
    assert list(source.errors) == [loser]
    assert str(source.errors[loser]) == (f"{loser}: Service {NS}/api is already defined in {winner}, which serves "
                                         "it; remove it from one of the two files")
    assert (f"Service {NS}/web" in _served(source)) == (winner.name == second)  # a refused file is refused whole


@pytest.mark.parametrize("newcomer", ["a.yaml", "c.yaml"])  # before and after the served file, by path
def test_a_duplicate_of_a_served_object_is_the_newcomer_files_error_and_it_keeps_its_last_good_objects(
        tmp_path, newcomer):
    served, late = tmp_path / "b.yaml", tmp_path / newcomer
    served.write_text(_services(("api", 80)))
    late.write_text(_services(("web", 90)))
    source = DirectorySource(tmp_path)
    source.load()
    _rewrite(late, _services(("web", 91), ("api", 81)).encode())
    assert source.load() is True
    assert f"Service {NS}/api is already defined in {served}" in str(source.errors[late])
    assert (_port(source, "api"), _port(source, "web")) == (80, 90)  # the served api, and web as it was

    _rewrite(late, _services(("web", 91)).encode())  # the newcomer drops its copy: it applies
    source.load()
    assert not source.errors and (_port(source, "api"), _port(source, "web")) == (80, 91)


@pytest.mark.parametrize("newcomer", ["a.yaml", "c.yaml"])
@pytest.mark.parametrize("holder_goes", ["deleted", "drops it"])
def test_the_waiting_definition_applies_once_the_holder_lets_go(tmp_path, newcomer, holder_goes):
    holder, late = tmp_path / "b.yaml", tmp_path / newcomer
    holder.write_text(_services(("api", 80), ("db", 70)))
    source = DirectorySource(tmp_path)
    source.load()
    late.write_text(_services(("api", 81)))
    source.load()
    assert list(source.errors) == [late] and _port(source, "api") == 80
    if holder_goes == "deleted":
        holder.unlink()
    else:
        _rewrite(holder, _services(("db", 70)).encode())
    assert source.load() is True
    assert not source.errors and _port(source, "api") == 81


@pytest.mark.parametrize("names", [("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")])
def test_an_object_moved_between_files_in_one_change_moves(tmp_path, names):
    old, new = (tmp_path / name for name in names)
    old.write_text(_services(("api", 80), ("db", 70)))
    new.write_text(_services(("web", 90)))
    source = DirectorySource(tmp_path)
    source.load()
    _rewrite(old, _services(("db", 70)).encode())
    _rewrite(new, _services(("web", 90), ("api", 81)).encode())
    source.load()
    assert not source.errors and _port(source, "api") == 81


def test_two_files_that_swap_objects_in_one_change_apply_together(tmp_path):
    """Each alone would define an object the other still serves (a `git checkout` of both)."""
    (tmp_path / "a.yaml").write_text(_services(("api", 80)))
    (tmp_path / "b.yaml").write_text(_services(("web", 90)))
    source = DirectorySource(tmp_path)
    source.load()
    _rewrite(tmp_path / "a.yaml", _services(("web", 91)).encode())
    _rewrite(tmp_path / "b.yaml", _services(("api", 81)).encode())
    source.load()
    assert not source.errors and (_port(source, "api"), _port(source, "web")) == (81, 91)


def test_render_prints_each_file_error_on_one_line_and_exits_1(tmp_path, capsys):
    (tmp_path / "app.yaml").write_text(yaml.safe_dump_all([gateway(), *app("shop-api")]))
    hostile = {"latin1.yaml": "latin-1", "utf16.yaml": "utf-16 with BOM", "deep.yaml": "500-deep flow list",
               "bomb.yaml": "alias bomb", "name.yaml": "Backend api/websocket", "huge.yaml": "over the size limit"}
    for name, case in hostile.items():
        (tmp_path / name).write_bytes(HOSTILE[case][0])
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump(service("shop-api", port=81)))
    assert cli.main(["render", "--source", str(tmp_path), "--node-cluster", "edge"]) == 1
    output = capsys.readouterr()
    lines = output.err.splitlines()
    for name, case in hostile.items():
        assert [line for line in lines if str(tmp_path / name) in line] == [f"error: {_error_of(tmp_path / name)}"]
        assert HOSTILE[case][1] in _error_of(tmp_path / name)
    assert f"error: {tmp_path / 'twice.yaml'}: Service {NS}/shop-api is already defined in" in output.err
    assert "Traceback" not in output.err + output.out
    assert f"{NS}/shop-api" in output.out  # the good file is still rendered


def _error_of(path: Path) -> str:
    with pytest.raises(ManifestError) as raised:
        parse_file(path)
    return str(raised.value)


YAML_PIECES = [b"kind: ", b"Service", b"Backend", b"metadata:", b" name: ", b"api", b"\n", b"  ", b"- ", b": ", b"? ",
               b"[", b"]", b"{", b"}", b",", b"&a ", b"*a", b"&b ", b"*b", b"<<: ", b"---\n", b"...\n", b"#", b"'",
               b'"', b"|", b">", b"%YAML 1.1\n", b"!!binary ", b"!!int ", b"!!bool ", b"!!float ", b"!!timestamp ",
               b"!!set ", b"!!omap ", b"!!str ", b"!x ", b"!!python/name:os.system ", b"2024-13-01", b"0x", b"1:2",
               b".inf", b"~", b"\\u", b"\t", b"\r", b"\x00", b"\x1b", b"\xef\xbb\xbf", b"\xff\xfe", b"\xe9",
               b"\xc3\xa9"]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300) | st.lists(st.sampled_from(YAML_PIECES), max_size=40).map(b"".join))
def test_any_bytes_are_objects_or_a_manifest_error_naming_the_file(data):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzzed.yaml"
        path.write_bytes(data)
        try:
            objects = parse_file(path)
        except ManifestError as error:
            assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        else:
            assert all(isinstance(obj, dict) for obj in objects)


CONTENTS = [_services(("api", 80)).encode(), _services(("api", 81), ("web", 90)).encode(),  # None: deleted
            _services(("web", 91)).encode(), b"", HOSTILE["latin-1"][0], HOSTILE["alias bomb"][0], None]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.lists(st.tuples(st.sampled_from(["a.yaml", "b.yaml", "c.yaml"]),
                                         st.sampled_from(range(len(CONTENTS)))), min_size=1, max_size=3),
                      max_size=8))
def test_any_sequence_of_changes_serves_each_file_or_its_last_good_objects(steps):
    """After every load, the objects served are exactly: what each file without an error holds, and
    the last good objects of each file with one; so no object is served from two files."""
    with tempfile.TemporaryDirectory() as directory:
        source = DirectorySource(directory)
        last_good: dict[str, list[dict]] = {}
        for changes in steps:
            for name, content in changes:
                path = Path(directory) / name
                if CONTENTS[content] is None:
                    path.unlink(missing_ok=True)
                else:
                    _rewrite(path, CONTENTS[content])
            source.load()
            last_good = {name: objects for name, objects in last_good.items() if (Path(directory) / name).exists()}
            for path in sorted(Path(directory).iterdir()):
                if path not in source.errors:
                    last_good[path.name] = parse_file(path)
            expected = [obj for objects in last_good.values() for obj in objects]
            view = source.store().view()
            assert len(view) == len(expected)
            assert all(view.get(*ObjectKey.of(obj)) == obj for obj in expected)


@pytest.mark.parametrize("manifest, message", [
    ({"apiVersion": "v1", "kind": 5, "metadata": {"name": "api"}},
     "document 1: kind: 5 is not a kind; write the object's kind as a string"),
    ({"apiVersion": 5, "kind": "Backend", "metadata": {"name": "api"}},
     "(Backend api): apiVersion: 5 does not serve Backend; write apiVersion: xds.controlplane.dev/v1alpha1"),
    ({"apiVersion": "v1", "kind": "EndpointSlice", "metadata": {"name": "api-1"}},
     "apiVersion: 'v1' does not serve EndpointSlice; write apiVersion: discovery.k8s.io/v1"),
])
def test_a_kind_that_is_not_a_string_or_a_wrong_api_version_is_refused(tmp_path, manifest, message):
    """A cluster would refuse both (kubectl: no matches for kind "Backend" in version "v1"): so does
    the file, instead of serving it or skipping it as a kind we do not read."""
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError) as refused:
        parse_file(tmp_path / "a.yaml")
    assert message in str(refused.value)


def test_an_alias_bomb_of_long_strings_is_refused_before_it_is_built(tmp_path):
    """A thousand aliases of a 100 KiB string are few nodes but 100 MB of text once built (a state
    file of a GiB when such a Backend is remembered): refused like a bomb of nodes."""
    long_text = "x" * 100_000
    notes = ", ".join(f"n{i}: *long" for i in range(1000))
    (tmp_path / "a.yaml").write_text(f"kind: Backend\nmetadata: {{name: api, labels: {{l: &long {long_text}}}, "
                                     f"annotations: {{{notes}}}}}\n")
    with pytest.raises(ManifestError, match="more than 16 MiB of text, counting each alias as all it stands for"):
        parse_file(tmp_path / "a.yaml")
