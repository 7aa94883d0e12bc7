"""A small Kubernetes API test server, over real HTTP on 127.0.0.1: for faults a real one cannot make.

Most Kubernetes tests belong on the real kube-apiserver (tests/real_kube.py): it validates the CRD
schema and CEL, enforces RBAC as shipped, merges status patches, serves selectors and pagination,
none of which this server models (it took every object, let anyone do anything, and replaced the
whole status on a "merge patch": ten defects went unseen). Keep this one only for what the real
server cannot do on demand and fast: cut every open watch at once (`drop_watches()`) while the
server stays up, send bookmarks every fraction of a second (the real one: about once a minute),
and answer 410 Gone to a watch from an older version as soon as a test calls `compact()`, with no
restart (the real one's watch cache keeps serving a window of events after an etcd compaction;
there, `force_gone()` restarts it).

Why not kmock: its stateful emulator returns placeholder resourceVersions and does not serve the
official client's watch requests (see DESIGN.md). This server does what our source relies on:
- list: items plus the collection's resourceVersion, cluster-wide or per namespace;
- watch from a resourceVersion: every later event, in order, as a chunked JSON-lines stream;
  BOOKMARK events when asked for; `timeoutSeconds`; 410 Gone (an ERROR event with an Expired
  Status) for a version older than the last compaction;
- monotonic resourceVersions across all kinds (one counter, like etcd);
- faults on demand: `compact()`, `drop_watches()`, `stop()` and `start()` (state survives, like etcd);
- get, create (POST), update (PUT, with resourceVersion conflicts: 409), and merge-patch of
  `/status`, enough for status writing and Lease-based leader election.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from kubernetes import client as k8s

RESOURCES = {
    ("", "v1", "services"): "Service",
    ("", "v1", "secrets"): "Secret",
    ("discovery.k8s.io", "v1", "endpointslices"): "EndpointSlice",
    ("xds.controlplane.dev", "v1alpha1", "gateways"): "Gateway",
    ("xds.controlplane.dev", "v1alpha1", "backends"): "Backend",
    ("coordination.k8s.io", "v1", "leases"): "Lease",
}
_BY_KIND = {kind: key for key, kind in RESOURCES.items()}


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}


class KubeAPIServer:
    def __init__(self, *, bookmark_interval: float = 0.5):
        self.bookmark_interval = bookmark_interval
        self.port: int | None = None
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query) for assertions
        self.forbidden: set[str] = set()  # kinds this server's RBAC refuses to list and watch
        self.initializing: set[str] = set()  # kinds answered 429 "storage is (re)initializing", as at a start
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._events: list[tuple[int, str, str, dict]] = []  # (rv, type, kind, object)
        self._rv = 100
        self._compacted = 0
        self._changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._watch_sockets: set[socket.socket] = set()

    # -- test controls ---------------------------------------------------------------------------

    def start(self) -> int:
        api = self

        class Handler(_Handler):
            server_api = api

        server = ThreadingHTTPServer(("127.0.0.1", self.port or 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self.port

    def stop(self) -> None:
        """The API server goes away: listening stops and every open connection breaks."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.drop_watches()

    def drop_watches(self) -> None:
        with self._changed:
            sockets, self._watch_sockets = set(self._watch_sockets), set()
            self._changed.notify_all()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def compact(self) -> None:
        """Forget history: a watch from any version before now gets 410 Gone."""
        with self._changed:
            self._compacted = self._rv
            self._events.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> k8s.ApiClient:
        """The official client, configured for this server."""
        configuration = k8s.Configuration()
        configuration.host = self.url
        return k8s.ApiClient(configuration)

    def create(self, obj: dict) -> dict:
        return self._write("ADDED", obj)

    def update(self, obj: dict) -> dict:
        return self._write("MODIFIED", obj)

    def apply(self, obj: dict) -> dict:
        key = self._key_of(obj)
        return self._write("MODIFIED" if key in self._objects else "ADDED", obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._changed:
            obj = self._objects.pop((kind, namespace, name))
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._events.append((self._rv, "DELETED", kind, obj))
            self._changed.notify_all()

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._changed:
            found = self._objects.get((kind, namespace, name))
            return copy.deepcopy(found) if found else None

    # -- storage ---------------------------------------------------------------------------------

    @staticmethod
    def _key_of(obj: dict) -> tuple[str, str, str]:
        return obj["kind"], obj["metadata"].get("namespace", "default"), obj["metadata"]["name"]

    def _write(self, event: str, obj: dict, *, status_only: bool = False) -> dict:
        with self._changed:
            obj = copy.deepcopy(obj)
            key = self._key_of(obj)
            old = self._objects.get(key)
            metadata = obj.setdefault("metadata", {})
            metadata.setdefault("namespace", "default")
            self._rv += 1
            metadata["resourceVersion"] = str(self._rv)
            metadata["uid"] = (old or {}).get("metadata", {}).get("uid") or f"uid-{self._rv}"
            generation = (old or {}).get("metadata", {}).get("generation", 0)
            if old is None or (not status_only and old.get("spec") != obj.get("spec")):
                generation += 1
            metadata["generation"] = generation
            group, version, _ = _BY_KIND[obj["kind"]]
            obj["apiVersion"] = f"{group}/{version}" if group else version
            self._objects[key] = obj
            self._events.append((self._rv, event, obj["kind"], copy.deepcopy(obj)))
            self._changed.notify_all()
            return copy.deepcopy(obj)

    def _list(self, kind: str, namespace: str | None) -> dict:
        with self._changed:
            items = [copy.deepcopy(o) for (k, ns, _), o in sorted(self._objects.items())
                     if k == kind and (namespace is None or ns == namespace)]
            return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)},
                    "items": items}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_api: KubeAPIServer

    def log_message(self, *args):
        pass

    def _route(self):
        parsed = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        parts = [p for p in parsed.path.split("/") if p]
        if parts[:1] == ["api"]:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"]:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        kind = RESOURCES.get((group, version, rest[0])) if rest else None
        if kind is None:
            return None
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        self.server_api.requests.append((self.command, parsed.path, query))
        return kind, namespace, name, subresource, query

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def do_GET(self):  # noqa: N802
        route = self._route()
        if route is None:
            return self._send(404, _status(404, "NotFound", f"no such path {self.path}"))
        kind, namespace, name, _sub, query = route
        if kind in self.server_api.forbidden:
            return self._send(403, _status(403, "Forbidden", f"{kind.lower()}s is forbidden: User cannot list"))
        if kind in self.server_api.initializing:
            return self._send(429, _status(429, "TooManyRequests", "storage is (re)initializing"))
        if name is not None:
            found = self.server_api.get(kind, namespace or "default", name)
            return self._send(200, found) if found else self._send(404, _status(404, "NotFound", f"{name} not found"))
        if query.get("watch") in ("true", "1"):
            return self._watch(kind, namespace, query)
        return self._send(200, self.server_api._list(kind, namespace))

    def do_POST(self):  # noqa: N802
        route = self._route()
        if route is None:
            return self._send(404, _status(404, "NotFound", self.path))
        obj = self._body()
        if self.server_api.get(*self.server_api._key_of(obj)) is not None:
            return self._send(409, _status(409, "AlreadyExists", f"{obj['metadata']['name']} already exists"))
        self._send(201, self.server_api.create(obj))

    def do_PUT(self):  # noqa: N802
        route = self._route()
        if route is None:
            return self._send(404, _status(404, "NotFound", self.path))
        obj = self._body()
        current = self.server_api.get(*self.server_api._key_of(obj))
        if current is None:
            return self._send(404, _status(404, "NotFound", obj["metadata"]["name"]))
        if obj["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return self._send(409, _status(409, "Conflict", "the object has been modified; please apply your "
                                                            "changes to the latest version and try again"))
        self._send(200, self.server_api.update(obj))

    def do_PATCH(self):  # noqa: N802
        route = self._route()
        if route is None or route[3] != "status":
            return self._send(404, _status(404, "NotFound", self.path))
        kind, namespace, name, _sub, _query = route
        current = self.server_api.get(kind, namespace or "default", name)
        if current is None:
            return self._send(404, _status(404, "NotFound", f"{name} not found"))
        current["status"] = self._body().get("status", {})
        self._send(200, self.server_api._write("MODIFIED", current, status_only=True))

    def _watch(self, kind: str, namespace: str | None, query: dict) -> None:
        api = self.server_api
        since = int(query.get("resourceVersion") or 0)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with api._changed:
            api._watch_sockets.add(self.connection)
        try:
            if since < api._compacted:
                self._chunk({"type": "ERROR", "object": _status(
                    410, "Expired", f"too old resource version: {since} ({api._compacted})")})
                return
            last_bookmark = time.monotonic()
            while time.monotonic() < deadline:
                with api._changed:
                    if self.connection not in api._watch_sockets:
                        return
                    if since < api._compacted:
                        self._chunk({"type": "ERROR", "object": _status(410, "Expired", "too old resource version")})
                        return
                    pending = self._pending(kind, namespace, since)
                    if not pending:
                        api._changed.wait(timeout=min(0.2, api.bookmark_interval))
                        pending = self._pending(kind, namespace, since)
                    covered = api._rv  # every event of this kind up to here is in `pending`
                for event_type, obj in pending:
                    self._chunk({"type": event_type, "object": obj})
                since = max(since, covered)
                if bookmarks and time.monotonic() - last_bookmark >= api.bookmark_interval:
                    group, version, _ = _BY_KIND[kind]
                    self._chunk({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": f"{group}/{version}" if group else version,
                        "metadata": {"resourceVersion": str(since)}}})
                    last_bookmark = time.monotonic()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            with api._changed:
                api._watch_sockets.discard(self.connection)
            self.close_connection = True

    def _pending(self, kind: str, namespace: str | None, since: int) -> list[tuple[str, dict]]:
        return [(event_type, obj) for rv, event_type, event_kind, obj in self.server_api._events
                if rv > since and event_kind == kind
                and (namespace is None or obj["metadata"].get("namespace") == namespace)]

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
