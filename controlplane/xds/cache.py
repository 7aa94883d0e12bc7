"""Immutable snapshots per node group, and the cache that hands them to xDS streams.

A `Snapshot` is the whole configuration one group of Envoys should have: clusters, endpoints,
listeners, routes and secrets. It is refused at construction when it is not self-consistent
(go-control-plane's `Snapshot.Consistent()`): an endpoint set that no EDS cluster uses, or a
listener that names a route configuration the snapshot lacks, would leave Envoy warming forever.

Everything a stream sends is computed once per snapshot and shared: a `ResourceSet` memoises
each `Selection` (the resources one subscription sees, with their content version and the
pre-serialized State-of-the-World body), so a thousand Envoys with the same subscription cost
one serialization. The cache also remembers, per group, what Envoy rejected and what it last
accepted, so that new Envoys of a group are not handed a configuration its peers just NACKed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds import resources as xr
from controlplane.xds.telemetry import XdsTelemetry

ResourceInput = Any
"""A protobuf message from xds-protos, an envoy-data-plane message, or an `xr.Resource`."""


class SnapshotError(ValueError):
    """A snapshot that would leave Envoy inconsistent; `dangling` names what is missing."""

    def __init__(self, message: str, dangling: Mapping[str, list[str]] | None = None):
        super().__init__(message)
        self.dangling = dict(dangling or {})


@dataclass(frozen=True, eq=False)
class Selection:
    """The resources of one type that one subscription sees: a read-only name->Resource map."""

    type_url: str
    resources: Mapping[str, xr.Resource]

    @cached_property
    def versions(self) -> frozenset[str]:
        """The content, as resource versions: a version hashes bytes that include the name, so it
        stands for (name, content). Strings cache their hash: comparing these is cheap."""
        return frozenset(resource.version for resource in self.resources.values())

    @cached_property
    def names(self) -> frozenset[str]:
        return frozenset(self.resources)

    @cached_property
    def endpoint_names(self) -> frozenset[str]:
        """The endpoint sets its resources name (a cluster selection's EDS names)."""
        return _referenced(self.resources.values(), xr.ENDPOINT)

    @cached_property
    def name_of(self) -> dict[str, str]:
        return {resource.version: name for name, resource in self.resources.items()}

    @cached_property
    def version(self) -> str:
        return xr.content_version([(name, r.version) for name, r in self.resources.items()])  # names are unique

    def same_content(self, other: Selection | None) -> bool:
        # Versions that differ are content that differs (a version is a function of the content):
        # one string comparison instead of a walk over every resource's version, on every push.
        return other is not None and (other is self or
                                      other.version == self.version and other.versions == self.versions)

    @cached_property
    def sotw_body(self) -> bytes:
        """A DiscoveryResponse without its nonce; the stream appends one (fields merge)."""
        return self._sotw_body(tuple(sorted(self.resources)))

    def changes_since(self, previous: Selection) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(names new or changed since `previous`, names gone since), each sorted.

        Every stream of a fleet moves between the same two selections on a push: memoised by the
        previous content's version (not the object, which the memo would keep alive)."""
        found = self._changes.get(previous.version)
        if found is None:
            changed = tuple(sorted(self.name_of[version] for version in self.versions - previous.versions))
            found = (changed, tuple(sorted(previous.names - self.names)))
            if len(self._changes) < 16:
                self._changes[previous.version] = found
        return found

    @cached_property
    def _changes(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        return {}

    @cached_property
    def _partial_bodies(self) -> dict[tuple[str, ...], bytes]:
        return {}

    def sotw_body_of(self, names: tuple[str, ...]) -> bytes:
        """Like `sotw_body`, with only the resources `names`: what changed, for the types that
        State-of-the-World sends as changes. Memoised: a fleet that had the same content before
        gets the same changes."""
        body = self._partial_bodies.get(names)
        if body is None:
            body = self._sotw_body(names)
            if len(self._partial_bodies) < 64:  # bounded: streams lagging behind in odd ways are few
                self._partial_bodies[names] = body
        return body

    def delta_header(self, removed: tuple[str, ...]) -> bytes:
        """A DeltaDiscoveryResponse's version, type and removed names, without its nonce and
        resources; memoised like `sotw_body_of` (a fleet's streams remove the same names)."""
        header = self._delta_headers.get(removed)
        if header is None:
            header = discovery_pb2.DeltaDiscoveryResponse(system_version_info=self.version, type_url=self.type_url,
                                                          removed_resources=removed).SerializeToString()
            if len(self._delta_headers) < 64:
                self._delta_headers[removed] = header
        return header

    @cached_property
    def _delta_headers(self) -> dict[tuple[str, ...], bytes]:
        return {}

    def _sotw_body(self, names: tuple[str, ...]) -> bytes:
        header = discovery_pb2.DiscoveryResponse(version_info=self.version, type_url=self.type_url)
        return header.SerializeToString() + b"".join(self.resources[name].sotw_fragment for name in names)


def _referenced(resources: Iterable[xr.Resource], type_url: str) -> frozenset[str]:
    """Every name of `type_url` these resources refer to."""
    return frozenset(name for resource in resources for name in resource.referenced(type_url))


class ResourceSet:
    """All resources of one type in one snapshot, with memoised selections by subscription."""

    __slots__ = ("type_url", "resources", "_selections", "_referenced")

    def __init__(self, type_url: str, resources: Mapping[str, xr.Resource]):
        self.type_url = type_url
        self.resources = dict(sorted(resources.items()))
        self._selections: dict[frozenset[str] | None, Selection] = {}
        self._referenced: dict[str, frozenset[str]] = {}

    def patched(self, patch: Mapping[str, xr.Resource | None]) -> tuple[ResourceSet, bool]:
        """(A copy with `patch` applied: name -> its new Resource, or None to remove it; whether
        names or references changed, so the snapshot's consistency must be checked again). Costs
        copying references and looking at the patch: nothing is re-sorted unless a name is new."""
        resources = dict(self.resources)
        added: list[xr.Resource] = []
        reshaped = False
        for name, resource in patch.items():
            old = resources.get(name)
            if resource is None:
                if old is not None:
                    del resources[name]  # the order of the rest stands
                    reshaped = True
                continue
            if not isinstance(resource, xr.Resource) or resource.type_url != self.type_url or resource.name != name:
                raise SnapshotError(f"a patch of {xr.SHORT_NAMES[self.type_url]} gives {name!r} something else than a "
                                    f"{xr.SHORT_NAMES[self.type_url][:-1]} Resource of that name")
            if old is None:
                added.append(resource)
            elif old.references != resource.references:
                reshaped = True
            resources[name] = resource
        new = object.__new__(ResourceSet)
        new.type_url = self.type_url
        new.resources = dict(sorted(resources.items())) if added else resources
        new._selections = {}
        # What the set refers to is known when no resource left or changed its references: the old plus the added.
        new._referenced = {} if reshaped else {
            type_url: names.union(*(r.referenced(type_url) for r in added))
            for type_url, names in self._referenced.items()}
        return new, reshaped or bool(added)

    def referenced(self, type_url: str) -> frozenset[str]:
        """Every name of `type_url` these resources refer to (computed once per set)."""
        found = self._referenced.get(type_url)
        if found is None:
            found = self._referenced[type_url] = _referenced(self.resources.values(), type_url)
        return found

    def __contains__(self, name: str) -> bool:
        return name in self.resources

    def __len__(self) -> int:
        return len(self.resources)

    def select(self, names: frozenset[str] | None) -> Selection:
        """The selection for `names` (None: every resource, a wildcard subscription)."""
        selection = self._selections.get(names)
        if selection is None:
            if names is None:
                chosen = self.resources
            else:
                chosen = {name: self.resources[name] for name in sorted(names) if name in self.resources}
            selection = Selection(self.type_url, chosen)
            # Bounded: the subscriptions of a group's Envoys are few; odd ones are not memoised.
            if len(self._selections) < 256:
                self._selections[names] = selection
        return selection


class Snapshot:
    """An immutable, consistent set of Envoy resources for one node group."""

    def __init__(self, *, clusters: Iterable[ResourceInput] = (), endpoints: Iterable[ResourceInput] = (),
                 listeners: Iterable[ResourceInput] = (), routes: Iterable[ResourceInput] = (),
                 secrets: Iterable[ResourceInput] = (), runtimes: Iterable[ResourceInput] = ()):
        given = _by_type(clusters, endpoints, listeners, routes, secrets, runtimes)
        self._sets = {type_url: _resource_set(type_url, items) for type_url, items in given.items()}
        _check_consistent(self._sets)

    def replace(self, *, clusters: Iterable[ResourceInput] | None = None,
                endpoints: Iterable[ResourceInput] | None = None,
                listeners: Iterable[ResourceInput] | None = None,
                routes: Iterable[ResourceInput] | None = None,
                secrets: Iterable[ResourceInput] | None = None,
                runtimes: Iterable[ResourceInput] | None = None) -> Snapshot:
        """A new snapshot with the given types replaced; the others are shared, not re-serialized."""
        given = _by_type(clusters, endpoints, listeners, routes, secrets, runtimes)
        new = object.__new__(Snapshot)
        new._sets = {type_url: self._sets[type_url] if items is None else _resource_set(type_url, items)
                     for type_url, items in given.items()}
        _check_consistent(new._sets)
        return new

    def patch(self, changes: Mapping[str, Mapping[str, xr.Resource | None]]) -> Snapshot:
        """A new snapshot with, per type URL, resources replaced or added (name -> Resource) or
        removed (name -> None); everything else is shared, not re-serialized. It costs what
        changed: at 10,000 Backends, one endpoint set changed must not rebuild the 9,999 others.
        Checked for consistency like any snapshot, unless no name and no reference changed (then
        it is as consistent as this one)."""
        new = object.__new__(Snapshot)
        new._sets = dict(self._sets)
        reshaped = False
        for type_url, patch in changes.items():
            if patch:
                new._sets[type_url], changed_shape = self._sets[type_url].patched(patch)
                reshaped = reshaped or changed_shape
        if reshaped:
            _check_consistent(new._sets)
        return new

    def resources(self, type_url: str) -> ResourceSet:
        return self._sets[type_url]

    @cached_property
    def version(self) -> str:
        return xr.content_version(frozenset(
            (type_url, resource_set.select(None).version) for type_url, resource_set in self._sets.items()))

    @cached_property
    def keyless(self) -> Keyless:
        """This snapshot without any secret that holds a private key (or any other secret value:
        only validation contexts, which hold CA certificates, stay), and without the listeners
        and clusters that name such a secret: served over a connection that proves no identity.
        A listener left without its certificate's secret would warm for ever or serve handshakes
        that fail; left out whole, it is never half configured. Endpoints follow their cluster.
        Computed once per snapshot, shared by every stream."""
        secrets = self._sets[xr.SECRET]
        withheld = frozenset(name for name, resource in secrets.resources.items() if not _public(resource))
        if not withheld:
            return Keyless(self, {})
        left_out = {xr.SECRET: withheld}
        for type_url in (xr.LISTENER, xr.CLUSTER):
            left_out[type_url] = frozenset(name for name, resource in self._sets[type_url].resources.items()
                                           if withheld.intersection(resource.referenced(xr.SECRET)))
        clusters = [r for name, r in self._sets[xr.CLUSTER].resources.items() if name not in left_out[xr.CLUSTER]]
        used_endpoints = {name for cluster in clusters for name in cluster.referenced(xr.ENDPOINT)}
        left_out[xr.ENDPOINT] = frozenset(self._sets[xr.ENDPOINT].resources.keys() - used_endpoints)
        kept = {type_url: [r for name, r in self._sets[type_url].resources.items() if name not in left_out[type_url]]
                for type_url in (xr.SECRET, xr.LISTENER, xr.ENDPOINT)}
        reduced = self.replace(clusters=clusters, endpoints=kept[xr.ENDPOINT], listeners=kept[xr.LISTENER],
                               secrets=kept[xr.SECRET])
        return Keyless(reduced, {type_url: tuple(sorted(names)) for type_url, names in left_out.items() if names})

    def __repr__(self) -> str:
        counts = ", ".join(f"{xr.SHORT_NAMES[t]}={len(s)}" for t, s in self._sets.items())
        return f"Snapshot({counts}, version={self.version})"


@dataclass(frozen=True)
class Keyless:
    """A snapshot fit for a connection that proves no identity, and what was left out of it."""

    snapshot: Snapshot
    left_out: Mapping[str, tuple[str, ...]]


def _public(secret: xr.Resource) -> bool:
    """A secret that is only a validation context (CA certificates, match rules): nothing secret."""
    return xr.parse(xr.SECRET, secret.body).WhichOneof("type") == "validation_context"


def _by_type(clusters, endpoints, listeners, routes, secrets, runtimes) -> dict[str, Any]:
    return {xr.RUNTIME: runtimes, xr.CLUSTER: clusters, xr.ENDPOINT: endpoints, xr.LISTENER: listeners,
            xr.ROUTE: routes, xr.SECRET: secrets}


def _resource_set(type_url: str, items: Iterable[ResourceInput]) -> ResourceSet:
    by_name: dict[str, xr.Resource] = {}
    duplicates: list[str] = []
    for item in items:
        resource = item if isinstance(item, xr.Resource) else xr.Resource.from_message(type_url, item)
        if resource.type_url != type_url:
            raise SnapshotError(f"{resource.name!r} is a {resource.type_url}, given as {xr.SHORT_NAMES[type_url]}")
        if resource.name in by_name:
            duplicates.append(resource.name)
        by_name[resource.name] = resource
    if duplicates:
        raise SnapshotError(f"duplicate {xr.SHORT_NAMES[type_url]} names: {', '.join(sorted(set(duplicates)))}; "
                            "each name must be unique within its type",
                            {type_url: sorted(set(duplicates))})
    return ResourceSet(type_url, by_name)


def _check_consistent(sets: Mapping[str, ResourceSet]) -> None:
    orphan_endpoints = sorted(sets[xr.ENDPOINT].resources.keys() - sets[xr.CLUSTER].referenced(xr.ENDPOINT))
    missing_routes = sorted(sets[xr.LISTENER].referenced(xr.ROUTE) - sets[xr.ROUTE].resources.keys())
    problems, dangling = [], {}
    if orphan_endpoints:
        problems.append(f"endpoints {', '.join(orphan_endpoints)} are not the EDS name of any cluster "
                        "(add an EDS cluster with that name or service_name, or drop the endpoints)")
        dangling[xr.ENDPOINT] = orphan_endpoints
    named_secrets = sets[xr.LISTENER].referenced(xr.SECRET) | sets[xr.CLUSTER].referenced(xr.SECRET)
    missing_secrets = sorted(named_secrets - sets[xr.SECRET].resources.keys())
    if missing_secrets:
        problems.append(f"listeners or clusters name secrets {', '.join(missing_secrets)} that the snapshot does "
                        "not have (add them to secrets, or fix the SDS secret names of their TLS contexts)")
        dangling[xr.SECRET] = missing_secrets
    if missing_routes:
        problems.append(f"listeners name route configurations {', '.join(missing_routes)} that the snapshot "
                        "does not have (add them to routes, or fix the listener's rds.route_config_name)")
        dangling[xr.ROUTE] = missing_routes
    if problems:
        raise SnapshotError("inconsistent snapshot: " + "; ".join(problems), dangling)


NodeGroupFn = Callable[[base_pb2.Node], str]


def by_node_cluster(node: base_pb2.Node) -> str:
    """The default node group: Envoy's `--service-cluster` / `node.cluster`."""
    return node.cluster


@dataclass
class NackRecord:
    """An Envoy's rejection of one response: what, when, and Envoy's own words."""

    type_url: str
    version: str
    resource_names: tuple[str, ...]
    message: str
    at: float


@dataclass(slots=True)
class TypeStatus:
    version_sent: str = ""
    version_acked: str = ""
    last_nack: NackRecord | None = None

    @property
    def rejected(self) -> NackRecord | None:
        """The NACK of the version sent last: Envoy is rejecting it now (not an earlier one)."""
        nack = self.last_nack
        return nack if nack is not None and nack.version == self.version_sent else None


@dataclass
class EnvoyStatus:
    """What one connected Envoy was sent and has accepted, per resource type."""

    node_id: str
    node_group: str
    connected_since: float
    transport: str
    types: dict[str, TypeStatus] = field(default_factory=dict)


class StatusSource(Protocol):
    """A live stream that can report its status on demand (read only when status is asked for)."""

    def status(self) -> EnvoyStatus: ...


class ConfigWatcher(Protocol):
    """What an xDS stream needs from a cache: where the cache and the server meet."""

    def node_group(self, node: base_pb2.Node) -> str: ...

    def group(self, name: str) -> GroupState: ...

    def watch(self, group: str, on_change: Callable[[], None]) -> Callable[[], None]: ...

    def connect(self, stream: StatusSource) -> Callable[[], None]: ...


class GroupState:
    """One node group: its snapshot, what its Envoys rejected, and what they last accepted."""

    def __init__(self, name: str, telemetry: XdsTelemetry | None = None):
        self.name = name
        self.telemetry = telemetry if telemetry is not None else XdsTelemetry()
        self.snapshot: Snapshot | None = None
        self._rejected: dict[str, set[str]] = {}
        self._last_acked: dict[str, Selection] = {}
        self.watchers: list[Callable[[], None]] = []

    def resources(self, type_url: str) -> ResourceSet | None:
        return None if self.snapshot is None else self.snapshot.resources(type_url)

    def rejected(self, type_url: str) -> set[str]:
        """Versions of resources this group's Envoys rejected. A version hashes a resource's name
        and content: it stays rejected until that resource's content changes."""
        return self._rejected.get(type_url, set())

    def last_acked(self, type_url: str) -> Selection | None:
        return self._last_acked.get(type_url)

    def record_ack(self, selection: Selection) -> None:
        self._last_acked[selection.type_url] = selection

    def record_nack(self, type_url: str, rejected: Iterable[str]) -> None:
        self._rejected.setdefault(type_url, set()).update(rejected)

    def new_snapshot(self, snapshot: Snapshot) -> None:
        # Rejections are remembered by content, not by publish: an identical republish (serve does one
        # every minute) must not hand the rejected resource to an Envoy that connects afterwards. Only
        # rejected versions the new snapshot still has are kept, so the memory is bounded by it.
        self.snapshot = snapshot
        for type_url, rejected in list(self._rejected.items()):
            present = snapshot.resources(type_url).select(None).versions
            still = rejected & present
            if still:
                self._rejected[type_url] = still
            else:
                del self._rejected[type_url]


class KeylessGroup:
    """A node group as a connection that proves no identity sees it: each snapshot's `keyless`
    form. What its Envoys accept and reject is the group's own record (a `ConfigSource`)."""

    __slots__ = ("_group", "name", "telemetry")

    def __init__(self, group: GroupState):
        self._group = group
        self.name = group.name
        self.telemetry = group.telemetry

    def keyless(self) -> Keyless | None:
        return None if self._group.snapshot is None else self._group.snapshot.keyless

    def resources(self, type_url: str) -> ResourceSet | None:
        keyless = self.keyless()
        return None if keyless is None else keyless.snapshot.resources(type_url)

    def rejected(self, type_url: str) -> set[str]:
        return self._group.rejected(type_url)

    def last_acked(self, type_url: str) -> Selection | None:
        """The group's last accepted selection, unless it holds what this view leaves out (an
        Envoy on a mutual-TLS server sharing this cache accepted it): never a key by this road."""
        selection = self._group.last_acked(type_url)
        keyless = self.keyless()
        if selection is None or keyless is None:
            return selection
        if type_url == xr.SECRET:
            return selection if all(_public(r) for r in selection.resources.values()) else None
        withheld = set(keyless.left_out.get(xr.SECRET, ()))
        refers = any(withheld.intersection(r.referenced(xr.SECRET)) for r in selection.resources.values())
        return None if refers else selection

    def record_ack(self, selection: Selection) -> None:
        self._group.record_ack(selection)

    def record_nack(self, type_url: str, rejected: Iterable[str]) -> None:
        self._group.record_nack(type_url, rejected)


class SnapshotCache:
    """Snapshots by node group; the xDS server watches it. Not thread-safe: call from the loop."""

    def __init__(self, *, node_group: NodeGroupFn = by_node_cluster):
        self._node_group = node_group
        self.telemetry = XdsTelemetry()
        self._groups: dict[str, GroupState] = {}
        self._streams: set[StatusSource] = set()

    def node_group(self, node: base_pb2.Node) -> str:
        return self._node_group(node)

    def group(self, name: str) -> GroupState:
        state = self._groups.get(name)
        if state is None:
            state = self._groups[name] = GroupState(name, self.telemetry)
        return state

    def set_snapshot(self, group: str, snapshot: Snapshot) -> None:
        """Publish `snapshot` to every Envoy of `group`, now and when they connect."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"set_snapshot needs a Snapshot, got {type(snapshot).__name__}")
        state = self.group(group)
        state.new_snapshot(snapshot)
        self.telemetry.published(group, snapshot.version, state.watchers)  # a watcher stands for its stream
        for notify in list(state.watchers):
            notify()

    def snapshot(self, group: str) -> Snapshot | None:
        state = self._groups.get(group)
        return None if state is None else state.snapshot

    def watch(self, group: str, on_change: Callable[[], None]) -> Callable[[], None]:
        """Call `on_change` after each new snapshot of `group`; returns the function that stops it.

        A group that was never published (a `node.cluster` nobody configures, made up by a client)
        is forgotten when its last watcher stops: clients cannot grow the cache without bound."""
        state = self.group(group)
        state.watchers.append(on_change)

        def stop() -> None:
            state.watchers.remove(on_change)
            self.telemetry.left(group, on_change)
            self.forget_if_unused(group)
        return stop

    def forget_if_unused(self, group: str) -> None:
        """Forget `group` if it was never published and nothing watches it (a made-up node.cluster,
        from a stream that ended or a single Fetch*)."""
        state = self._groups.get(group)
        if state is not None and not state.watchers and state.snapshot is None:
            del self._groups[group]

    def connect(self, stream: StatusSource) -> Callable[[], None]:
        self._streams.add(stream)
        return lambda: self._streams.discard(stream)

    def status(self) -> list[EnvoyStatus]:
        """Every connected Envoy's status, sorted by node group and node id."""
        # A copy first: metrics are scraped from another thread while streams come and go.
        return sorted((stream.status() for stream in list(self._streams)),
                      key=lambda s: (s.node_group, s.node_id, s.connected_since))
