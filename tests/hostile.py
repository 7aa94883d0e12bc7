"""Malformed manifest files, generated: the input `tests/test_hostile_input.py` feeds a running
`controlplane serve`, one file at a time, beside a Gateway and a Backend that carry traffic.

Each `Case` is one file with one thing wrong, in one of the classes of `CLASSES`: a wrong type, an
unknown field, a number out of range, an address Envoy cannot use, a bad name, a control character,
bytes that are not UTF-8, YAML nested deep, a huge file, an alias bomb, a duplicate of an object
another file holds, a conflict with what an established object holds, a collision of names. A case
is either a newcomer (a new file, with a new object named `case-NNN`) or an edit: a bad version of
an established file (`ESTABLISHED`), which the test restores afterwards.

Every newcomer is valid but for the one thing wrong with it, so when it is accepted anyway, that
is the control plane's fault; and its objects point at the established Gateway and Service, so
what a wrongly accepted one does reaches the Envoy under test (a NACK, failed requests).

`all_cases()` is the full set (deterministic: random bytes come from fixed seeds); `sample()` a
deterministic subset with every class in it, for `make test`.
"""

from __future__ import annotations

import codecs
import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from tests.harness import free_port
from tests.objects import NS, backend, endpoint_slice, gateway, ready, service

CLASSES = ("wrong-type", "unknown-field", "out-of-range", "listener-address", "endpointslice", "name",
           "control-chars", "non-utf8", "deep-nesting", "huge", "alias-bomb", "duplicate", "conflict",
           "name-collision")
HEAVY = ("deep-nesting", "huge", "alias-bomb")
"""Classes that may cost the control plane seconds (or much more, unguarded): run last."""


@dataclass(frozen=True)
class World:
    """What the cases are written against: the established objects' ports, and fresh ports."""

    listener_port: int  # the established Gateway `edge`'s listener, on 127.0.0.1
    backend_port: int  # the sample backend the established EndpointSlice points at
    fresh_port: Callable[[], int]  # a free port, for a newcomer's listener


GATEWAY, BACKEND, SLICE = "edge", "api", "api-1"
ESTABLISHED_FILES = ("gateway.yaml", "api.yaml", "slices.yaml")


def established_objects(world: World) -> dict[str, list[dict]]:
    """The valid objects the traffic goes through, by file."""
    return {
        "gateway.yaml": [gateway(GATEWAY, port=world.listener_port)],
        "api.yaml": [backend(BACKEND, routes=[{"pathPrefix": "/"}], websocket={}), service(BACKEND)],
        "slices.yaml": [endpoint_slice(BACKEND, [ready("127.0.0.1")], port=world.backend_port, name=SLICE)],
    }


def established(world: World) -> dict[str, bytes]:
    return {name: dump(objects) for name, objects in established_objects(world).items()}


def dump(objects: Sequence[Any]) -> bytes:
    """YAML as a user would write it (control characters and non-ASCII escaped by the emitter)."""
    return yaml.safe_dump_all(list(objects), sort_keys=False).encode()


@dataclass(frozen=True)
class Case:
    number: int
    """Its place in the full set: names its file and its new objects, the same in every mode."""
    klass: str
    id: str
    """What is wrong, for people: `<kind> <field>=<value>` or a phrase."""
    build: Callable[[World, str], bytes]
    """(world, the case's object name) -> the file's bytes."""
    target: str | None = None
    """The established file this case is a bad edit of (restored afterwards); None: a new file."""
    order: str = "hostile"
    """A new file's name prefix: "0-hostile" sorts before the established files, "zz-hostile" after."""
    objects: tuple[str, ...] = ()
    """The objects the refusal must name (`{name}` is the case's object), besides the file."""
    fields: tuple[str, ...] = ()
    """The fields (or values) the refusal must name, such as `listeners[0].port` (`{port}`: the established port)."""
    heavy: bool = False

    @property
    def name(self) -> str:
        return f"case-{self.number:03d}"

    @property
    def file_name(self) -> str:
        return self.target or f"{self.order}-{self.number:03d}.yaml"

    @property
    def label(self) -> str:
        form = f"edit of {self.target}" if self.target else self.file_name
        return f"#{self.number:03d} [{self.klass}] {self.id} ({form})"

    def content(self, world: World) -> bytes:
        return self.build(world, self.name)

    def expected_objects(self) -> tuple[str, ...]:
        return tuple(item.replace("{name}", self.name) for item in self.objects)

    def expected_fields(self, world: World) -> tuple[str, ...]:
        return tuple(item.replace("{port}", str(world.listener_port)) for item in self.fields)


# ---------------------------------------------------------------------------------------------
# Bad values

PORTS_OUT = [0, -1, 65536, 70000, 2**32, 2**64]
PORTS_WRONG = ["eighty", "80", 80.5, True, None, [80], {"port": 80}, float("nan")]
BUDGETS_OUT = [0, -1, 2**40, 10_000_001, 2**64]
BUDGETS_WRONG = ["100", 1.5, True, [1]]
LISTENER_ADDRESSES = ["not-an-ip", "localhost", "", "::g", "１２７.０.０.１", "256.1.1.1", "127.0.0.01",
                      "127.0.0.1:8080", "[::1]", "fe80::1%eth0", "::ffff:127.0.0.1", " 127.0.0.1", "127.1",
                      2130706433]
ENDPOINT_ADDRESSES = ["999.1.2.3", "localhost", "", "not-an-ip", "１０.０.０.１", "10.0.0.1/32", "::1",
                      "10.0.0.1 ", "fe80::1%eth0", "::ffff:10.0.0.1", 167772161, None]
NAMES = ["api/websocket", "API", "Edge", "a" * 300, "", "api_v2", "-api", "api-", "a b", "ａｐｉ", "api\x00",
         "api\r\n", 42, None]
"""Names no Kubernetes object may have."""
LABELS = ["api/websocket", "API", "a" * 64, "api.v2", "", "api_v2", "ａｐｉ", "api\x00"]
"""Values no DNS-label field of our CRDs takes (listener names, nodeCluster, references)."""
NAMESPACES = ["shop/api", "Shop", "a" * 300, 42, "shop\x00"]
PATHS = ["/a\x00b", "/a\r\nb", "/a\x7fb", "/a\nb", "/a\x1bb", "/a\x08b", "/a\tb"]
HEADER_NAMES = ["x-a\x00", "x-a\r\nx-b", "x-a\x7f", "x-a\n", "x\ta", "x a"]
HEADER_VALUES = ["v\x00", "v\r\nx-b: w", "v\x7f", "v\nw", "v\x1b"]


def _shown(value: Any) -> str:
    if callable(value):
        return "(generated)"
    text = repr(value)
    return text if len(text) <= 40 else text[:30] + f"... ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------
# Objects: newcomers (valid, named after the case) and the established ones, as bases to break

def _new_gateway(world: World, name: str) -> list[dict]:
    return [gateway(name, listeners=[{"name": "http", "port": world.fresh_port(), "address": "127.0.0.1"}])]


def _new_backend(world: World, name: str) -> list[dict]:
    return [backend(name, service=BACKEND, routes=[{"pathPrefix": f"/{name}"}], websocket={})]


def _new_service(world: World, name: str) -> list[dict]:
    return [service(name)]


def _new_slice(world: World, name: str) -> list[dict]:
    """Another EndpointSlice of the established Service: accepted wrongly, it reaches Envoy."""
    return [endpoint_slice(BACKEND, [ready("127.0.0.1")], port=world.backend_port, name=name)]


def _edit(file: str) -> Callable[[World, str], list[dict]]:
    def base(world: World, name: str) -> list[dict]:
        return copy.deepcopy(established_objects(world)[file])
    return base


NEW = {"Gateway": _new_gateway, "Backend": _new_backend, "Service": _new_service, "EndpointSlice": _new_slice}
EDIT = {"Gateway": ("gateway.yaml", 0, GATEWAY), "Backend": ("api.yaml", 0, BACKEND),
        "Service": ("api.yaml", 1, BACKEND), "EndpointSlice": ("slices.yaml", 0, SLICE)}


def _set(obj: Any, path: tuple, value: Any) -> None:
    """Set `path` (keys and list indexes) in `obj` to `value`; `_DELETE` removes the key."""
    for step in path[:-1]:
        if isinstance(obj, dict) and not isinstance(obj.get(step), (dict, list)):
            obj[step] = {}
        obj = obj[step]
    if value is _DELETE:
        obj.pop(path[-1], None)
    else:
        obj[path[-1]] = value


_DELETE = object()


def _mutated(base: Callable[[World, str], list[dict]], index: int,
             changes: Sequence[tuple[tuple, Any]]) -> Callable[[World, str], bytes]:
    def build(world: World, name: str) -> bytes:
        objects = base(world, name)
        for path, value in changes:
            _set(objects[index], path, value() if callable(value) else value)
        return dump(objects)
    return build


def _field(path: tuple) -> str:
    """How a refusal names a field: the path under spec (or the object), as `listeners[0].port`."""
    parts = list(path[1:] if path and path[0] == "spec" else path)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "spec"


class _Builder:
    def __init__(self):
        self.cases: list[tuple] = []

    def add(self, klass: str, id: str, build, *, target: str | None = None, order: str = "hostile",
            objects: Sequence[str] = (), fields: Sequence[str] = (), heavy: bool = False) -> None:
        assert klass in CLASSES, klass
        self.cases.append((klass, id, build, target, order, tuple(objects), tuple(fields), heavy or klass in HEAVY))

    def field(self, klass: str, kind: str, path: tuple, value: Any, *, edit: bool = False,
              expect_field: str | None = None, also: Sequence[tuple[tuple, Any]] = (), name_field: bool = False,
              shown: str | None = None):
        """`kind`'s `path` set to `value`, in a newcomer or (edit) in the established object."""
        changes = [*also, (path, value)]
        where = expect_field if expect_field is not None else _field(path)
        shown = shown or _shown(value)
        if edit:
            file, index, obj_name = EDIT[kind]
            self.add(klass, f"{kind} {obj_name} {where}={shown}", _mutated(_edit(file), index, changes),
                     target=file, objects=[] if name_field else [obj_name], fields=[where])
        else:
            self.add(klass, f"new {kind} {where}={shown}", _mutated(NEW[kind], 0, changes),
                     objects=[] if name_field else ["{name}"], fields=[where])

    def build(self) -> list[Case]:
        return [Case(number, *fields) for number, fields in enumerate(self.cases)]


# ---------------------------------------------------------------------------------------------
# Raw YAML: nesting, bombs, bytes

def _raw(text_of: Callable[[World, str], str], encoding: str = "utf-8") -> Callable[[World, str], bytes]:
    def build(world: World, name: str) -> bytes:
        return text_of(world, name).encode(encoding)
    return build


def _backend_text(name: str, extra: str = "", *, route: str | None = None) -> str:
    return (f"apiVersion: xds.controlplane.dev/v1alpha1\nkind: Backend\n"
            f"metadata: {{name: {name}, namespace: {NS}}}\n"
            f"spec:\n  gateway: {GATEWAY}\n  service: {{name: {BACKEND}, port: http}}\n"
            f"  routes: [{{pathPrefix: {route or '/' + name}}}]\n{extra}")


def _nested(kind: str, depth: int) -> str:
    if kind == "flow-seq":
        return "[" * depth + "1" + "]" * depth
    if kind == "flow-map":
        return "{a: " * depth + "1" + "}" * depth
    raise ValueError(kind)


def _block_nested(depth: int, indent: int) -> str:
    return "".join(" " * (indent + 2 * level) + "a:\n" for level in range(depth - 1)) + \
        " " * (indent + 2 * (depth - 1)) + "a: 1\n"


def _deep_case(where: str, form: str, depth: int) -> Callable[[World, str], bytes]:
    def text(world: World, name: str) -> str:
        if where == "document":
            return _nested(form, depth) + "\n" if form != "block" else _block_nested(depth, 0)
        if where == "labels":
            value = f" {_nested(form, depth)}\n" if form != "block" else "\n" + _block_nested(depth, 6)
            return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NS}\n"
                    f"  labels:\n    deep:{value}spec:\n  ports: [{{name: http, port: 80}}]\n")
        value = f" {_nested(form, depth)}\n" if form != "block" else "\n" + _block_nested(depth, 4)
        return _backend_text(name, f"  extra:{value}")
    return _raw(text)


def _laughs(levels: int = 9, width: int = 9) -> str:
    """A billion laughs: `width`**`levels` strings from a few hundred bytes of anchors and aliases."""
    lines = ["bomb:", '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"  l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _bomb_case(where: str) -> Callable[[World, str], bytes]:
    top = "*l8"

    def text(world: World, name: str) -> str:
        bomb = _laughs()
        if where == "service-port":
            return (f"apiVersion: v1\nkind: Service\n{bomb}metadata: {{name: {name}, namespace: {NS}}}\n"
                    f"spec:\n  ports: [{{name: http, port: {top}, targetPort: 8080}}]\n")
        if where == "slice-address":
            return (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n{bomb}"
                    f"metadata: {{name: {name}, namespace: {NS}, labels: {{kubernetes.io/service-name: {BACKEND}}}}}\n"
                    f"addressType: IPv4\nports: [{{name: http, port: {world.backend_port}}}]\n"
                    f"endpoints: [{{addresses: [{top}]}}]\n")
        if where == "listener-address":
            return (f"apiVersion: xds.controlplane.dev/v1alpha1\nkind: Gateway\n{bomb}"
                    f"metadata: {{name: {name}, namespace: {NS}}}\n"
                    f"spec:\n  nodeCluster: {GATEWAY}\n"
                    f"  listeners: [{{name: http, port: {world.fresh_port()}, address: {top}}}]\n")
        if where == "backend-spec":
            return bomb + _backend_text(name, f"  extra: {top}\n")
        if where == "labels":
            return (f"apiVersion: v1\nkind: Service\n{bomb}metadata:\n  name: {name}\n  namespace: {NS}\n"
                    f"  labels: {{a: {top}}}\nspec:\n  ports: [{{name: http, port: 80}}]\n")
        if where == "ignored-kind":
            return f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {NS}}}\n{bomb}data: {top}\n"
        if where == "mapping":
            lines = ["bomb:", "  m0: &m0 {a: lol, b: lol, c: lol, d: lol, e: lol, f: lol, g: lol, h: lol, i: lol}"]
            for level in range(1, 9):
                lines.append(f"  m{level}: &m{level} {{" + ", ".join(f"{k}: *m{level - 1}" for k in "abcdefghi") + "}")
            return "\n".join(lines) + "\n" + _backend_text(name, "  circuitBreakers: *m8\n")
        if where == "recursive-seq":
            return _backend_text(name, "  extra: &r [*r]\n")
        if where == "recursive-map":
            return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\n"
                    f"spec: &s\n  ports: [{{name: http, port: 80}}]\n  self: *s\n")
        if where == "recursive-port":
            return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\n"
                    f"spec:\n  ports: &p [{{name: http, port: *p}}]\n")
        if where == "quadratic":
            big = "x" * (256 * 1024)
            refs = ", ".join(["*big"] * 4096)
            return _backend_text(name, f"  extra: {{blob: &big {big}, copies: [{refs}]}}\n")
        if where == "quadratic-annotations":  # a valid new Backend but for 1 GiB of annotations, from 260 KiB
            big = "x" * (256 * 1024)
            notes = ", ".join([f"a0: &big {big}"] + [f"a{i}: *big" for i in range(1, 4096)])
            text = _backend_text(name)
            return text.replace(f"namespace: {NS}}}", f"namespace: {NS}, annotations: {{{notes}}}}}", 1)
        raise ValueError(where)
    return _raw(text)


def _huge_case(form: str, mib: int) -> Callable[[World, str], bytes]:
    size = mib * 2**20

    def build(world: World, name: str) -> bytes:
        if form == "scalar-field":
            return _backend_text(name, f"  extra: \"{'a' * size}\"\n").encode()
        if form == "annotation":  # valid but for its size: a new Backend with a huge annotation
            text = _backend_text(name)
            return text.replace(f"namespace: {NS}}}", f"namespace: {NS}, annotations: {{note: \"{'n' * size}\"}}}}",
                                1).encode()
        if form == "endpoints":  # a huge EndpointSlice of a new Service (TEST-NET addresses)
            lines = [f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
                     f"metadata: {{name: {name}, namespace: {NS}, labels: {{kubernetes.io/service-name: {name}}}}}\n"
                     f"addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"]
            total, index = len(lines[0]), 0
            while total < size:
                line = f"- {{addresses: [198.18.{index // 256 % 256}.{index % 256}], conditions: {{ready: true}}}}\n"
                lines.append(line)
                total += len(line)
                index += 1
            return "".join(lines).encode()
        if form == "comments":  # nothing but comments: harmless, if a control plane reads it at all
            line = "# " + "c" * 98 + "\n"
            return (line * (size // len(line) + 1)).encode()
        if form == "documents":  # many small documents of a kind nobody reads
            doc = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: shop}\ndata: {k: v}\n"
            return (doc * (size // len(doc) + 1)).encode()
        raise ValueError(form)
    return build


def _random_bytes(seed: int, size: int) -> Callable[[World, str], bytes]:
    def build(world: World, name: str) -> bytes:
        data = random.Random(seed).randbytes(size)
        try:  # never the case for these sizes; keep it non-UTF-8 whatever the seed
            data.decode("utf-8")
            data = b"\xff" + data
        except UnicodeDecodeError:
            pass
        return data
    return build


def _encoded(encoding: str, bom: bytes = b"") -> Callable[[World, str], bytes]:
    """A new, valid Backend, in an encoding other than UTF-8."""
    def build(world: World, name: str) -> bytes:
        return bom + _backend_text(name).encode(encoding)
    return build


def _latin1(where: str) -> Callable[[World, str], bytes]:
    def build(world: World, name: str) -> bytes:
        if where == "annotation":
            text = _backend_text(name).replace(f"namespace: {NS}}}", f"namespace: {NS}, annotations: {{note: café}}}}")
        else:
            text = _backend_text(name, route=f"/{name}/café")
        return text.encode("latin-1")
    return build


def _with_bytes(raw: bytes) -> Callable[[World, str], bytes]:
    """A new Backend whose route has `raw` bytes spliced in (not valid UTF-8, or a raw control byte)."""
    def build(world: World, name: str) -> bytes:
        return _backend_text(name, route=f"/{name}/MARK").encode().replace(b"MARK", raw)
    return build


# ---------------------------------------------------------------------------------------------
# The full set

def all_cases() -> list[Case]:
    b = _Builder()
    _wrong_types(b)
    _unknown_fields(b)
    _out_of_range(b)
    _listener_addresses(b)
    _endpoint_slices(b)
    _names(b)
    _control_chars(b)
    _non_utf8(b)
    _duplicates(b)
    _conflicts(b)
    _collisions(b)
    _deep(b)
    _huge(b)
    _bombs(b)
    _late_additions(b)
    cases = b.build()
    assert len({c.file_name for c in cases if not c.target}) == len([c for c in cases if not c.target])
    return cases


def _wrong_types(b: _Builder) -> None:
    k = "wrong-type"
    fresh = ("spec", "listeners")
    for position, values in [(("spec", "listeners", 0, "port"), PORTS_WRONG)]:
        for index, value in enumerate(values):
            b.field(k, "Gateway", position, value)
            if index % 2 == 0:
                b.field(k, "Gateway", position, value, edit=True)
    for index, value in enumerate([True, None, 80.5, [80], {"port": 80}, "Http", "http_1", ""]):
        b.field(k, "Backend", ("spec", "service", "port"), value, edit=index % 3 == 0)
    for index, value in enumerate(PORTS_WRONG):
        b.field(k, "Service", ("spec", "ports", 0, "port"), value, edit=index % 2 == 1)
    for value in ["http", "8080", True, 80.5, [80]]:
        b.field(k, "EndpointSlice", ("ports", 0, "port"), value)
    for value in BUDGETS_WRONG:
        b.field(k, "Backend", ("spec", "circuitBreakers", "default", "maxConnections"), value)
        b.field(k, "Gateway", ("spec", "limits", "maxConnections"), value)
    b.field(k, "Backend", ("spec", "connectTimeoutMs"), "1s")
    b.field(k, "Backend", ("spec", "connectTimeoutMs"), 1.5)
    b.field(k, "Backend", ("spec", "websocket", "idleTimeoutSeconds"), "1h")
    # Structure
    b.field(k, "Gateway", fresh, "http")
    b.field(k, "Gateway", fresh, {"name": "http", "port": 8080})
    b.field(k, "Gateway", ("spec", "listeners", 0), "http")
    b.field(k, "Gateway", ("spec",), [], expect_field="spec")
    b.field(k, "Gateway", ("spec",), "edge", expect_field="spec", edit=True)
    b.field(k, "Gateway", ("spec", "limits"), 5)
    b.field(k, "Gateway", ("spec", "nodeCluster"), 7)
    b.field(k, "Gateway", ("spec", "listeners", 0, "protocol"), "TCP")
    b.field(k, "Gateway", ("spec", "listeners", 0, "protocol"), "HTTPS", expect_field="listeners[0]")
    b.field(k, "Gateway", ("spec", "listeners", 0, "tls"), "yes")
    b.field(k, "Backend", ("spec", "routes"), "/")
    b.field(k, "Backend", ("spec", "routes", 0), "/")
    b.field(k, "Backend", ("spec", "routes", 0), {"pathPrefix": "/x", "path": "/y"}, expect_field="routes[0]")
    b.field(k, "Backend", ("spec", "routes", 0), {}, expect_field="routes[0]", edit=True)
    b.field(k, "Backend", ("spec", "routes", 0, "headers"), {"name": "x-a", "value": "b"})
    b.field(k, "Backend", ("spec", "routes", 0, "priority"), "Urgent")
    b.field(k, "Backend", ("spec", "routes", 0, "priority"), "high", edit=True)
    b.field(k, "Backend", ("spec", "circuitBreakers"), 5)
    b.field(k, "Backend", ("spec", "websocket"), True)
    b.field(k, "Backend", ("spec", "service"), "api")
    b.field(k, "Backend", ("spec", "service"), _DELETE, edit=True)
    b.field(k, "Backend", ("spec",), None, expect_field="spec")
    b.field(k, "Service", ("spec", "ports"), "http")
    b.field(k, "Service", ("spec", "ports", 0), 80)
    b.field(k, "EndpointSlice", ("endpoints",), "10.0.0.1")
    b.field(k, "EndpointSlice", ("endpoints", 0, "addresses"), "127.0.0.1", edit=True)
    b.field(k, "EndpointSlice", ("endpoints", 0, "conditions", "ready"), "maybe")
    b.field(k, "EndpointSlice", ("ports",), {"name": "http", "port": 8080})
    b.field(k, "Backend", ("metadata",), [], name_field=True)
    b.field(k, "Service", ("metadata",), "api", name_field=True)
    b.field(k, "Backend", ("metadata", "labels"), "x", expect_field="metadata.labels")
    b.field(k, "Service", ("metadata", "labels"), {"tier": 5}, expect_field="metadata.labels")
    b.field(k, "Backend", ("kind",), 5, expect_field="kind", name_field=True)
    b.field(k, "Backend", ("apiVersion",), 5, expect_field="apiVersion")
    b.add(k, "document is a list", _raw(lambda w, n: _backend_text(n).replace("\n", "\n  ").join(["- ", "\n"])))
    b.add(k, "document is a string", _raw(lambda w, n: "just some text\n"))
    b.add(k, "document is a number", _raw(lambda w, n: "42\n"))
    b.add(k, "a document without kind", _raw(lambda w, n: _backend_text(n).replace("kind: Backend\n", "")),
          fields=["kind"])


def _unknown_fields(b: _Builder) -> None:
    k = "unknown-field"
    for kind, path, value, edit in [
            ("Gateway", ("spec", "listener"), "http", False),
            ("Gateway", ("spec", "listeners", 0, "prot"), "HTTP", False),
            ("Gateway", ("spec", "listeners", 0, "hostName"), "shop.example", True),  # the field is hostname
            ("Gateway", ("spec", "limits", "maxConnection"), 100, False),
            ("Gateway", ("spec", "foo"), 1, True),
            ("Backend", ("spec", "route"), [{"pathPrefix": "/x"}], False),
            ("Backend", ("spec", "routes", 0, "prefix"), "/x", False),
            ("Backend", ("spec", "circuitBreakers", "default", "maxConnection"), 100, True),
            ("Backend", ("spec", "circuitBreakers", "low"), {"maxConnections": 1}, False),
            ("Backend", ("spec", "websocket", "idleTimeout"), 60, False),
            ("Backend", ("spec", "service", "namespace"), "shop", True),
            ("Backend", ("spec", "timeout"), "5s", False)]:
        b.field(k, kind, path, value, edit=edit)
    b.field(k, "Backend", ("spec", "routes", 0, "headers"), [{"name": "x-a", "value": "b", "regex": True}],
            expect_field="routes[0].headers[0].regex", edit=True)


def _out_of_range(b: _Builder) -> None:
    k = "out-of-range"
    for index, value in enumerate(PORTS_OUT):
        b.field(k, "Gateway", ("spec", "listeners", 0, "port"), value)
        b.field(k, "Gateway", ("spec", "listeners", 0, "port"), value, edit=True)
        b.field(k, "Backend", ("spec", "service", "port"), value, edit=index % 2 == 0)
        b.field(k, "Service", ("spec", "ports", 0, "port"), value, edit=index % 2 == 1)
        # targetPort 0 is no error: the API server reads it as unset (the port itself)
        b.field(k, "Service", ("spec", "ports", 0, "targetPort"), value if value != 0 else "Not_A_Port_Name")
    for position in [("spec", "circuitBreakers", "default", "maxConnections"),
                     ("spec", "circuitBreakers", "default", "maxPendingRequests"),
                     ("spec", "circuitBreakers", "high", "maxRequests"),
                     ("spec", "websocket", "circuitBreakers", "maxConnections")]:
        for index, value in enumerate(BUDGETS_OUT):
            b.field(k, "Backend", position, value, edit=index == 2 and position[-1] == "maxConnections")
    for value in BUDGETS_OUT:
        b.field(k, "Gateway", ("spec", "limits", "maxConnections"), value, edit=value == 0)
    for value in [-1, 10_000_001]:
        b.field(k, "Backend", ("spec", "circuitBreakers", "default", "maxRetries"), value)
    for value in [0, 9, 60_001, -1, 2**40]:
        b.field(k, "Backend", ("spec", "connectTimeoutMs"), value, edit=value == 0)
    for value in [0, -1, 86_401, 2**40]:
        b.field(k, "Backend", ("spec", "websocket", "idleTimeoutSeconds"), value)
    b.field(k, "Gateway", ("spec", "listeners"), [], expect_field="listeners")
    b.field(k, "Gateway", ("spec", "listeners"), lambda: [
        {"name": f"l{i}", "port": 20000 + i, "address": "127.0.0.1"} for i in range(65)], expect_field="listeners")
    b.field(k, "Backend", ("spec", "routes"), [], expect_field="routes", edit=True)
    b.field(k, "Backend", ("spec", "routes"), [{"pathPrefix": f"/r{i}"} for i in range(129)], expect_field="routes")
    b.field(k, "Backend", ("spec", "routes", 0, "headers"), [{"name": f"x-{i}", "value": "v"} for i in range(17)],
            expect_field="routes[0].headers")


def _listener_addresses(b: _Builder) -> None:
    k = "listener-address"
    for value in LISTENER_ADDRESSES:
        b.field(k, "Gateway", ("spec", "listeners", 0, "address"), value)
        b.field(k, "Gateway", ("spec", "listeners", 0, "address"), value, edit=True)


def _endpoint_slices(b: _Builder) -> None:
    k = "endpointslice"
    for value in ENDPOINT_ADDRESSES:
        b.field(k, "EndpointSlice", ("endpoints", 0, "addresses", 0), value)
        b.field(k, "EndpointSlice", ("endpoints", 0, "addresses", 0), value, edit=True)
    for index, value in enumerate(PORTS_OUT):
        b.field(k, "EndpointSlice", ("ports", 0, "port"), value, edit=index % 2 == 0)
    for value in ["IPv5", "ipv4", 4]:
        b.field(k, "EndpointSlice", ("addressType",), value)
        b.field(k, "EndpointSlice", ("addressType",), value, edit=True)
    b.field(k, "EndpointSlice", ("addressType",), "IPv6", expect_field="endpoints[0].addresses[0]")
    b.field(k, "EndpointSlice", ("addressType",), "IPv6", expect_field="endpoints[0].addresses[0]", edit=True)
    b.field(k, "EndpointSlice", ("endpoints", 0, "addresses", 0), "2001:db8::1",
            expect_field="endpoints[0].addresses[0]", also=[(("addressType",), "IPv4")])


def _names(b: _Builder) -> None:
    k = "name"
    for kind in ("Gateway", "Backend", "Service", "EndpointSlice"):
        for value in NAMES:
            b.field(k, kind, ("metadata", "name"), value, name_field=True)
    for kind in ("Gateway", "Backend"):
        for value in NAMESPACES:
            b.field(k, kind, ("metadata", "namespace"), value, name_field=True)
    for index, value in enumerate(LABELS):
        b.field(k, "Gateway", ("spec", "listeners", 0, "name"), value, edit=index % 2 == 0)
        b.field(k, "Gateway", ("spec", "nodeCluster"), value, edit=index % 4 == 1)
        b.field(k, "Backend", ("spec", "service", "name"), value, edit=index % 4 == 3)
    for value in LABELS[:4]:
        b.field(k, "Backend", ("spec", "gateway"), value)
        b.field(k, "Backend", ("spec", "listener"), value)


def _control_chars(b: _Builder) -> None:
    k = "control-chars"
    for index, value in enumerate(PATHS):
        b.field(k, "Backend", ("spec", "routes", 0, "pathPrefix"), value)
        b.field(k, "Backend", ("spec", "routes", 0), {"path": value}, expect_field="routes[0].path")
        if index < 4:
            b.field(k, "Backend", ("spec", "routes", 0, "pathPrefix"), value, edit=True)
    for index, value in enumerate(HEADER_NAMES):
        b.field(k, "Backend", ("spec", "routes", 0, "headers"), [{"name": value, "value": "v"}],
                expect_field="routes[0].headers[0].name", edit=index % 2 == 1)
    for index, value in enumerate(HEADER_VALUES):
        b.field(k, "Backend", ("spec", "routes", 0, "headers"), [{"name": "x-tenant", "value": value}],
                expect_field="routes[0].headers[0].value", edit=index % 2 == 0)
    for raw in (b"\x00", b"\x7f", b"\x1b", b"\x0c"):
        b.add(k, f"a raw {raw!r} byte in a route path", _with_bytes(raw))


def _non_utf8(b: _Builder) -> None:
    k = "non-utf8"
    b.add(k, "Latin-1 annotation (café)", _latin1("annotation"))
    b.add(k, "Latin-1 route path (/café)", _latin1("path"))
    b.add(k, "UTF-16-LE with BOM", _encoded("utf-16-le", codecs.BOM_UTF16_LE))
    b.add(k, "UTF-16-BE with BOM", _encoded("utf-16-be", codecs.BOM_UTF16_BE))
    b.add(k, "UTF-16-LE without BOM", _encoded("utf-16-le"))
    b.add(k, "UTF-32 with BOM", _encoded("utf-32"))
    b.add(k, "invalid continuation byte (\\xc3\\x28)", _with_bytes(b"\xc3\x28"))
    b.add(k, "overlong encoding (\\xc0\\xaf)", _with_bytes(b"\xc0\xaf"))
    b.add(k, "UTF-8-encoded surrogate (\\xed\\xa0\\x80)", _with_bytes(b"\xed\xa0\x80"))
    b.add(k, "truncated sequence at the end (\\xe2\\x82)", lambda w, n: _backend_text(n).encode() + b"# \xe2\x82")
    for seed, size in [(0, 1024), (1, 1024), (2, 64 * 1024), (3, 17), (4, 4096), (5, 300 * 1024)]:
        b.add(k, f"random bytes (seed {seed}, {size} bytes)", _random_bytes(seed, size))
    b.add(k, "Latin-1 edit of the established Backend", lambda w, n: dump(established_objects(w)["api.yaml"]).replace(
        b"pathPrefix: /", "pathPrefix: /café".encode("latin-1")), target="api.yaml")


def _duplicates(b: _Builder) -> None:
    k = "duplicate"

    def gateway_copy(port: Callable[[World], int] | int, order_listener: str = "http"):
        def build(world: World, name: str) -> bytes:
            value = port(world) if callable(port) else port
            return dump([gateway(GATEWAY, listeners=[{"name": order_listener, "port": value, "address": "127.0.0.1"}])])
        return build

    def backend_copy(**options):
        def build(world: World, name: str) -> bytes:
            return dump([backend(BACKEND, **({"routes": [{"pathPrefix": "/"}], "websocket": {}} | options))])
        return build

    for order in ("0-hostile", "zz-hostile"):
        b.add(k, "a second Gateway edge with port 0", gateway_copy(0), order=order, objects=[GATEWAY])
        b.add(k, "a second Gateway edge with port 70000", gateway_copy(70000), order=order, objects=[GATEWAY])
        b.add(k, "a second Gateway edge on another port", gateway_copy(lambda w: w.fresh_port()), order=order,
              objects=[GATEWAY])
        b.add(k, "a second, identical Backend api", backend_copy(), order=order, objects=[BACKEND])
        b.add(k, "a second Backend api with other routes", backend_copy(routes=[{"pathPrefix": "/other"}]),
              order=order, objects=[BACKEND])
    b.add(k, "a second, identical Gateway edge", lambda w, n: dump(established_objects(w)["gateway.yaml"]),
          order="zz-hostile", objects=[GATEWAY])
    b.add(k, "a second Backend api with service port 0", backend_copy(port=0),
          order="zz-hostile", objects=[BACKEND])
    b.add(k, "a second Service api with another port name", lambda w, n: dump([service(BACKEND, port_name="web")]),
          order="zz-hostile", objects=[BACKEND])
    b.add(k, "a second EndpointSlice api-1 to an address nobody serves", lambda w, n: dump(
        [endpoint_slice(BACKEND, [ready("192.0.2.1")], port=w.backend_port, name=SLICE)]), order="zz-hostile",
        objects=[SLICE])
    b.add(k, "a second EndpointSlice api-1 to an address nobody serves", lambda w, n: dump(
        [endpoint_slice(BACKEND, [ready("192.0.2.1")], port=w.backend_port, name=SLICE)]), order="0-hostile",
        objects=[SLICE])
    b.add(k, "the same new Backend twice in one file", lambda w, n: dump(
        [*_new_backend(w, n), backend(n, service=BACKEND, routes=[{"pathPrefix": f"/{n}/again"}])]),
        objects=["{name}"])
    b.add(k, "a new Backend, then Backend api again, in one file", lambda w, n: dump(
        [*_new_backend(w, n), backend(BACKEND, routes=[{"pathPrefix": "/"}], websocket={})]), objects=[BACKEND])


def _conflicts(b: _Builder) -> None:
    k = "conflict"
    old = OLD

    b.add(k, "a newcomer Backend aaa with pathPrefix / (held by api)", newcomer_backend(),
          objects=["aaa"], fields=["pathPrefix"])
    b.add(k, "a newcomer Backend aaa with pathPrefix /, created in 1970", newcomer_backend(creationTimestamp=OLD),
          objects=["aaa"], fields=["pathPrefix"])
    b.add(k, "a newcomer Backend aaa with pathPrefix /, priority High",
          newcomer_backend(route={"priority": "High"}), objects=["aaa"], fields=["pathPrefix"])

    def newcomer_gateway(*, created: str | None = None, listener: str = "http", second: bool = False,
                         namespace: str = NS, name: str = "aaa"):
        def build(world: World, _: str) -> bytes:
            listeners = [{"name": listener, "port": world.listener_port, "address": "127.0.0.1"}]
            if second:
                listeners.append({"name": "spare", "port": world.fresh_port(), "address": "127.0.0.1"})
            obj = gateway(name, listeners=listeners, namespace=namespace)
            if created:
                obj["metadata"]["creationTimestamp"] = created
            return dump([obj])
        return build

    b.add(k, "a newcomer Gateway aaa on the established port", newcomer_gateway(), objects=["aaa"], fields=["{port}"])
    b.add(k, "a newcomer Gateway aaa on the established port, created in 1970", newcomer_gateway(created=old),
          objects=["aaa"], fields=["{port}"])
    b.add(k, "a newcomer Gateway aaa on the established port, listener named web", newcomer_gateway(listener="web"),
          objects=["aaa"], fields=["{port}"])
    b.add(k, "a newcomer Gateway aaa on the established port and a free one", newcomer_gateway(second=True),
          objects=["aaa"], fields=["{port}"])
    b.add(k, "a Gateway edge in namespace other on the established port", newcomer_gateway(namespace="other",
                                                                                          name=GATEWAY),
          objects=["other"], fields=["{port}"])


OLD = "1970-01-01T00:00:00Z"


def newcomer_backend(route: dict | None = None, *, free_route: bool = False, **metadata):
    """Backend aaa claiming `/`, which api holds, with a Service and endpoints of its own that answer
    nothing: were it given `/`, the traffic would fail (on api's Service, a stolen route would go unseen)."""
    def build(world: World, name: str) -> bytes:
        routes = [{"pathPrefix": "/", **(route or {})}] + ([{"pathPrefix": "/aaa"}] if free_route else [])
        obj = backend("aaa", routes=routes)
        obj["metadata"].update(metadata)
        return dump([obj, service("aaa"), endpoint_slice("aaa", [ready("127.0.0.1")], port=world.fresh_port())])
    return build


def _late_additions(b: _Builder) -> None:
    """Cases added after the set was first reported, last, so that every other case keeps its number."""
    b.add("conflict", "a newcomer Backend aaa with pathPrefix / (held by api) and a free route",
          newcomer_backend(free_route=True), objects=["aaa"], fields=["pathPrefix"])
    b.add("conflict", "a newcomer Backend aaa with pathPrefix / and a free route, created in 1970",
          newcomer_backend(free_route=True, creationTimestamp=OLD), objects=["aaa"], fields=["pathPrefix"])


def _collisions(b: _Builder) -> None:
    k = "name-collision"

    def new_backend(name_of: Callable[[str], str], namespace: str = NS):
        def build(world: World, name: str) -> bytes:
            return dump([backend(name_of(name), service=BACKEND, routes=[{"pathPrefix": f"/{name}"}],
                                 namespace=namespace)])
        return build

    b.add(k, "Backend api/websocket (its cluster would be api's WebSocket cluster)",
          new_backend(lambda n: "api/websocket"), fields=["metadata.name"])
    b.add(k, "Backend websocket in namespace shop/api (the same cluster name)",
          new_backend(lambda n: "websocket", namespace="shop/api"), fields=["metadata.namespace"])
    b.add(k, "Backend api in namespace Shop", new_backend(lambda n: BACKEND, namespace="Shop"),
          fields=["metadata.namespace"])
    b.add(k, "Backend API (api in capitals)", new_backend(lambda n: "API"), fields=["metadata.name"])
    b.field(k, "Gateway", ("spec", "listeners"), lambda: [
        {"name": "http", "port": _PORTS.fresh(), "address": "127.0.0.1"},
        {"name": "http", "port": _PORTS.fresh(), "address": "127.0.0.1"}], expect_field="listeners",
        shown="two listeners named http")
    b.field(k, "Gateway", ("spec", "listeners"), lambda: [
        {"name": "one", "port": _PORTS.same(), "address": "127.0.0.1"},
        {"name": "two", "port": _PORTS.same(), "address": "127.0.0.1"}], expect_field="listeners",
        shown="two listeners on one port")
    b.field(k, "Backend", ("spec", "routes"), [{"pathPrefix": "/dup"}, {"pathPrefix": "/dup"}], expect_field="routes",
            shown="pathPrefix /dup twice")
    b.field(k, "Backend", ("spec", "routes"), [{"path": "/dup", "headers": [{"name": "x-a", "value": "1"}]},
                                               {"path": "/dup", "headers": [{"name": "x-a", "value": "1"}]}],
            expect_field="routes", edit=True, shown="path /dup with header x-a=1 twice")


class _PortSource:
    """Listener ports inside a mutation (which has no World): free, or the same one twice."""

    def __init__(self):
        self._same: int | None = None
        self._count = 0

    def fresh(self) -> int:
        return free_port()

    def same(self) -> int:
        self._count += 1
        if self._same is None or self._count % 2 == 1:
            self._same = self.fresh()
        return self._same


_PORTS = _PortSource()


def _deep(b: _Builder) -> None:
    k = "deep-nesting"
    for where in ("backend-spec", "document", "labels"):
        for form in ("flow-seq", "flow-map", "block"):
            b.add(k, f"{form} nested 500 deep in {where}", _deep_case(where, form, 500),
      )
    for depth in (1000, 5000, 50_000):
        b.add(k, f"flow-seq nested {depth} deep in backend-spec", _deep_case("backend-spec", "flow-seq", depth))
    b.add(k, "flow-map nested 5000 deep in labels", _deep_case("labels", "flow-map", 5000))


def _huge(b: _Builder) -> None:
    k = "huge"
    b.add(k, "a 6 MiB string in a Backend's spec", _huge_case("scalar-field", 6))
    b.add(k, "a new Backend with a 6 MiB annotation", _huge_case("annotation", 6))
    b.add(k, "an EndpointSlice of 4 MiB (new Service)", _huge_case("endpoints", 4))
    b.add(k, "12 MiB of comments", _huge_case("comments", 12))
    b.add(k, "5 MiB of small documents", _huge_case("documents", 5))
    b.add(k, "a 32 MiB string in a Backend's spec", _huge_case("scalar-field", 32))


def _bombs(b: _Builder) -> None:
    k = "alias-bomb"
    for where in ("service-port", "backend-spec", "slice-address", "listener-address", "labels", "ignored-kind",
                  "mapping", "recursive-seq", "recursive-map", "recursive-port", "quadratic", "quadratic-annotations"):
        b.add(k, f"alias bomb: {where}", _bomb_case(where))


# ---------------------------------------------------------------------------------------------
# The sample `make test` runs

SAMPLE_QUOTAS = {"wrong-type": 7, "unknown-field": 4, "out-of-range": 7, "listener-address": 5, "endpointslice": 5,
                 "name": 6, "control-chars": 5, "non-utf8": 4, "deep-nesting": 2, "huge": 1, "alias-bomb": 3,
                 "duplicate": 6, "conflict": 5, "name-collision": 3}


def sample(cases: Sequence[Case]) -> list[Case]:
    """Evenly spaced cases of every class (a third of them edits where the class has edits)."""
    chosen: list[Case] = []
    for klass in CLASSES:
        members = [c for c in cases if c.klass == klass]
        quota = min(SAMPLE_QUOTAS[klass], len(members))
        edits = [c for c in members if c.target]
        news = [c for c in members if not c.target]
        from_edits = min(len(edits), quota // 3)
        chosen += _spaced(edits, from_edits) + _spaced(news, quota - from_edits)
    return sorted(chosen, key=lambda c: c.number)


def _spaced(items: Sequence[Case], count: int) -> list[Case]:
    if count <= 0:
        return []
    return [items[(index * len(items)) // count] for index in range(count)]


def run_order(cases: Sequence[Case]) -> list[Case]:
    """Heavy classes last: if one of them stalls the control plane, the others were measured first."""
    return sorted(cases, key=lambda c: (c.heavy, c.number))
