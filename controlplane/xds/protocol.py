"""The xDS protocol of one stream, as a state machine with no I/O (h2's sans-IO style).

`StreamProtocol.receive(request)` and `StreamProtocol.refresh()` return a `Step`: the responses
to write, in order, and the ACKs and NACKs to report. The gRPC servicer only moves bytes.

Invariants this class keeps, per stream and per resource type:
- At most one response is in flight; the next waits for its ACK or NACK. A request whose nonce
  is not the one in flight is stale: its subscription is taken, its ACK/NACK is not.
- Content already sent is never sent again, and content Envoy has is never resent: a NACKed
  version is not pushed in a loop. Rejected resources are replaced by what Envoy last accepted.
  One exception, which Envoy needs: a new or changed cluster is followed by its endpoints, even
  when Envoy has them: the cluster stays warming until a ClusterLoadAssignment arrives for it,
  and Envoy does not ask for one it already has (Delta), or asks with a stale nonce (SotW).
- A rejection is pinned on the resource that caused it, so good changes are never held hostage:
  a NACK of one changed resource rejects that one; of several, the ones Envoy's message names;
  failing that, each of them becomes a suspect, and suspects are sent one per response until
  each was accepted or rejected alone.
- ADS ordering (Envoy's "eventual consistency considerations"): types are pushed in
  `PUSH_ORDER`; a listener or route that names a cluster of the snapshot is held until Envoy has
  ACKed that cluster and, for EDS clusters, its endpoints; a cluster that an accepted route or
  listener still names is kept until Envoy has accepted the routes that drop it.
- A subscribed name that does not exist yet is remembered and sent when a snapshot has it; but
  the endpoints of a cluster this stream sent, which the snapshot dropped before Envoy asked for
  them, are an empty set at once: Envoy holds its ACK of the clusters until each new one has its
  endpoints, and the next clusters wait for that ACK.
- Only what changed is sent: Delta by design; State-of-the-World too for the types Envoy
  subscribes to by name (endpoints, routes, secrets), as the xDS protocol allows ("Grouping
  Resources into Responses"): resources left out of such a response are kept, not removed. Only
  clusters and listeners, and wildcard subscriptions, are sent whole. One changed endpoint is one
  endpoint set on the wire, not every endpoint set of the Envoy.
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds import resources as xr
from controlplane.xds.cache import NackRecord, ResourceSet, Selection, TypeStatus

_EMPTY: Mapping[str, xr.Resource] = {}
_NO_NAMES: frozenset[str] = frozenset()  # one for every stream: each `frozenset()` is a new object of 216 bytes
_SENT_WHOLE = (xr.CLUSTER, xr.LISTENER)  # SotW: a response holds all of them; what is left out is removed


class ConfigSource(Protocol):
    """What a stream reads from its node group (`cache.GroupState` is one)."""

    def resources(self, type_url: str) -> ResourceSet | None: ...

    def rejected(self, type_url: str) -> set[str]: ...

    def last_acked(self, type_url: str) -> Selection | None: ...

    def record_nack(self, type_url: str, rejected: Iterable[str]) -> None:
        """Envoy rejected these resource versions: every stream of the group leaves them out."""


# NamedTuples, and a Step with slots: every stream makes a Step and a Response per push, and a Step
# and an Ack per ACK; a frozen dataclass sets each field through object.__setattr__.
class Response(NamedTuple):
    """A serialized DiscoveryResponse or DeltaDiscoveryResponse, ready for the wire."""

    type_url: str
    nonce: str
    version: str
    payload: bytes


class Ack(NamedTuple):
    selection: Selection


class Nack(NamedTuple):
    record: NackRecord
    rejected: frozenset[str]


class Step:
    """What one request or one refresh gives: responses to write, ACKs and NACKs to record."""

    __slots__ = ("responses", "acks", "nacks")

    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.acks: list[Ack] = []
        self.nacks: list[Nack] = []


class _InFlight(NamedTuple):
    nonce: str
    selection: Selection
    changed: tuple[str, ...]
    within: frozenset[str] | None
    """The subscription the selection was chosen within (its names are all in it); None where it
    may hold more: a wildcard's, or a cluster selection (clusters still named by routes stay)."""


@dataclass(slots=True)
class _TypeState:
    requested: bool = False
    wildcard: bool = False
    named_before: bool = False
    subscribed: frozenset[str] = _NO_NAMES
    in_flight: _InFlight | None = None
    sent: Selection | None = None
    acked: Selection | None = None
    acked_within: frozenset[str] | None = None  # the subscription `acked` was chosen within, if known
    settled_on: ResourceSet | None = None  # the resource set of the last pump that left nothing to send
    resend: frozenset[str] = _NO_NAMES  # names to send again although Envoy has them (endpoints of a new cluster)
    suspects: frozenset[str] = _NO_NAMES  # versions in a NACKed response whose culprit is unknown
    status: TypeStatus = field(default_factory=TypeStatus)


class StreamProtocol:
    """One ADS (or single-type) stream, State-of-the-World or Delta."""

    def __init__(self, source: ConfigSource, *, delta: bool, types: tuple[str, ...] = xr.PUSH_ORDER):
        self._source = source
        self._delta = delta
        self._types = {type_url: _TypeState() for type_url in xr.PUSH_ORDER if type_url in types}
        self._nonces = itertools.count(1)

    def type_status(self) -> dict[str, TypeStatus]:
        return {type_url: state.status for type_url, state in self._types.items() if state.requested}

    def settled(self) -> bool:
        """Nothing in flight and nothing held back: Envoy has answered all this stream has to send now."""
        return all(state.in_flight is None and state.settled_on is not None
                   for state in self._types.values() if state.requested)

    # -- inputs ---------------------------------------------------------------------------------

    def receive(self, request, *, now: float = 0.0, wire: bytes | None = None) -> Step:
        """Take one DiscoveryRequest (or DeltaDiscoveryRequest on a Delta stream); `wire`: its bytes
        as received, if at hand (a SotW request's names are found by them)."""
        step = Step()
        state = self._types.get(request.type_url)
        if state is None:
            return step  # a type we do not serve (runtime, VHDS...): Envoy times it out alone
        if self._delta:
            self._take_delta_subscription(state, request)
        else:
            self._take_sotw_subscription(state, request, wire)
        in_flight = state.in_flight
        if request.response_nonce and in_flight is not None and request.response_nonce == in_flight.nonce:
            state.in_flight = None
            if request.error_detail.code or request.error_detail.message:
                nack = self._reject(request, state, in_flight, now)
                self._source.record_nack(request.type_url, nack.rejected)  # before pumping: the rest goes on
                step.nacks.append(nack)
            else:
                state.acked, state.acked_within = in_flight.selection, in_flight.within
                state.status.version_acked = in_flight.selection.version
                if state.suspects:
                    state.suspects = state.suspects - {in_flight.selection.resources[n].version
                                                       for n in in_flight.changed}
                step.acks.append(Ack(in_flight.selection))
        elif not request.response_nonce and not state.requested:
            self._resume(request, state)
        if not self._delta and self._sends_changes_only(request.type_url, state) and state.acked is not None \
                and state.acked_within is not state.subscribed and not state.acked.names <= state.subscribed:
            # A SotW request's names replace the subscription: what it dropped is forgotten (after
            # taking the ACK, which may bring names the new subscription no longer has).
            self._forget(state, state.acked.names - state.subscribed)
        state.requested = True
        self._pump(step)
        return step

    def refresh(self) -> Step:
        """The node group's snapshot changed."""
        step = Step()
        self._pump(step, skip_unchanged_sets=True)
        return step

    # -- subscriptions ---------------------------------------------------------------------------

    def _take_sotw_subscription(self, state: _TypeState, request: discovery_pb2.DiscoveryRequest,
                                wire: bytes | None) -> None:
        names, star = _sotw_names(request, wire)
        if star:
            state.wildcard = True
        elif names:
            state.wildcard = False
        else:
            # Legacy wildcard: an empty first request means "everything"; after names were
            # given, an empty list means "none".
            state.wildcard = not state.named_before
        state.named_before = state.named_before or bool(names)
        if names is not state.subscribed and names != state.subscribed:
            state.subscribed = names

    def _take_delta_subscription(self, state: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        subscribe, unsubscribe = set(request.resource_names_subscribe), set(request.resource_names_unsubscribe)
        if "*" in subscribe or (not state.requested and not subscribe):  # explicit, or legacy wildcard
            state.wildcard = True
        if "*" in unsubscribe:
            state.wildcard = False
        if subscribe or unsubscribe:
            state.subscribed = _shared(frozenset((state.subscribed | subscribe) - unsubscribe - {"*"}))
        if unsubscribe and state.acked is not None:
            self._forget(state, unsubscribe)

    @staticmethod
    def _forget(state: _TypeState, names: set[str] | frozenset[str]) -> None:
        """Envoy forgets what it unsubscribes from: a later subscribe must send it again."""
        kept = {n: r for n, r in state.acked.resources.items() if n not in names}
        state.acked, state.acked_within = Selection(state.acked.type_url, kept), None
        state.sent = None

    def _resume(self, request, state: _TypeState) -> None:
        """A reconnecting Envoy says what it has: matching content is not sent again."""
        if self._delta:
            if request.initial_resource_versions:
                ours = self._source.resources(request.type_url)
                ours = ours.resources if ours is not None else _EMPTY
                known = {name: _known_resource(request.type_url, name, version, ours.get(name))
                         for name, version in request.initial_resource_versions.items()}
                state.acked, state.acked_within = Selection(request.type_url, known), None
            return
        if request.version_info:
            desired = self._desired(request.type_url, state, self._source.resources(request.type_url))
            if desired is not None and desired.version == request.version_info:
                state.acked = state.sent = desired
                state.acked_within = None
                state.status.version_acked = state.status.version_sent = desired.version

    def _resend_endpoints_of(self, clusters: Selection, changed: Iterable[str]) -> None:
        """New or changed clusters are on their way: each one warms until it gets its endpoints, even
        when the content is what Envoy already has (otherwise a budget change waits for Envoy's
        15 s initial fetch timeout). Only endpoint sets Envoy was already given need this; they
        follow the clusters on the same ordered stream, so they reach the new clusters."""
        endpoints = self._types.get(xr.ENDPOINT)
        if endpoints is None:
            return
        given = (endpoints.acked.names if endpoints.acked is not None else frozenset()) | (
            endpoints.sent.names if endpoints.sent is not None else frozenset())
        names = {eds for name in changed for eds in clusters.resources[name].referenced(xr.ENDPOINT)}
        names.intersection_update(given)
        if names:
            endpoints.resend = endpoints.resend | names
            endpoints.settled_on = None

    def _reject(self, request, state: _TypeState, in_flight: _InFlight, now: float) -> Nack:
        """Pin the NACK on its culprit: see the module docstring."""
        message = request.error_detail.message
        culprits = in_flight.changed
        if len(culprits) > 1:
            culprits = tuple(name for name in in_flight.changed if _names(message, name))
        versions = frozenset(in_flight.selection.resources[name].version for name in culprits)
        if not culprits:
            state.suspects = state.suspects | {in_flight.selection.resources[name].version
                                               for name in in_flight.changed}
        else:
            state.suspects = state.suspects - versions
        record = NackRecord(type_url=request.type_url, version=in_flight.selection.version,
                            resource_names=culprits or in_flight.changed, message=message, at=now)
        state.status.last_nack = record
        return Nack(record, versions)

    # -- outputs ---------------------------------------------------------------------------------

    def _pump(self, step: Step, *, skip_unchanged_sets: bool = False) -> None:
        """Send what each type needs. With `skip_unchanged_sets` (a new snapshot): a type already
        settled on the very same resource set has nothing new, which skips most types of most
        pushes (an endpoint moved: clusters, listeners, routes and secrets are the same sets)."""
        for type_url, state in self._types.items():
            if not state.requested or state.in_flight is not None:
                continue
            resource_set = self._source.resources(type_url)
            if skip_unchanged_sets and resource_set is state.settled_on and resource_set is not None:
                continue
            state.settled_on = resource_set if self._pump_type(type_url, state, resource_set, step) else None

    def _pump_type(self, type_url: str, state: _TypeState, resource_set: ResourceSet | None, step: Step) -> bool:
        """Respond if this type needs it; returns False while a response waits for Envoy (`_ready`)."""
        desired = self._desired(type_url, state, resource_set)
        if desired is None:
            return True
        resend = state.resend & desired.names if state.resend else _NO_NAMES
        state.resend = _NO_NAMES
        if not resend and desired.same_content(state.sent):
            return True
        acked = state.acked
        if not resend and desired.same_content(acked):
            return True  # Envoy has exactly this (it NACKed the newer content we sent)
        changed, removed = (tuple(desired.resources), ()) if acked is None else desired.changes_since(acked)
        if resend:
            changed = tuple(sorted(resend.union(changed)))
        if not self._ready(desired, changed):
            return False
        changes_only = self._sends_changes_only(type_url, state)
        # Removals are news on Delta only: a SotW endpoint set goes with its cluster.
        nothing_to_tell = not changed and not (removed and self._delta)
        if changes_only and nothing_to_tell and state.status.version_sent:
            state.sent = desired  # the first response is always sent
            return True
        body_names = changed if changes_only else None
        step.responses.append(self._respond(type_url, state, desired, changed, removed, body_names))
        return True

    def _sends_changes_only(self, type_url: str, state: _TypeState) -> bool:
        return self._delta or (not state.wildcard and type_url not in _SENT_WHOLE)

    def _respond(self, type_url: str, state: _TypeState, desired: Selection, changed: tuple[str, ...],
                 removed: tuple[str, ...], body_names: tuple[str, ...] | None) -> Response:
        """`body_names`: the resources a SotW response carries (None: all of them)."""
        nonce = str(next(self._nonces))
        if self._delta:
            payload = desired.delta_header(removed) + b"".join(desired.resources[n].delta_fragment for n in changed)
        else:
            whole = body_names is None or len(body_names) == len(desired.resources)
            payload = desired.sotw_body if whole else desired.sotw_body_of(body_names)
        payload += xr.delimited(5, nonce.encode())  # field 5 of both response types, after the rest: fields merge
        within = state.subscribed if not state.wildcard and type_url != xr.CLUSTER else None
        state.in_flight = _InFlight(nonce, desired, changed, within)
        state.sent = desired
        if type_url == xr.CLUSTER:
            self._resend_endpoints_of(desired, changed)
        state.status.version_sent = desired.version
        return Response(type_url, nonce, desired.version, payload)

    def _desired(self, type_url: str, state: _TypeState, resource_set: ResourceSet | None) -> Selection | None:
        """What Envoy should have for this type now, or None while the group has no snapshot."""
        if resource_set is None:
            return None
        selection = resource_set.select(None if state.wildcard else state.subscribed)
        chosen: dict[str, xr.Resource] | None = None
        rejected = self._source.rejected(type_url)
        if rejected:
            for version in selection.versions & rejected:
                name = selection.name_of[version]
                chosen = dict(selection.resources) if chosen is None else chosen
                good = self._last_good(type_url, state, name, rejected)
                if good is None:
                    del chosen[name]
                else:
                    chosen[name] = good
        for name, resource in self._still_needed(type_url, state, selection).items():
            chosen = dict(selection.resources) if chosen is None else chosen
            chosen[name] = resource
        if type_url == xr.ENDPOINT and not state.wildcard and len(selection.resources) != len(state.subscribed):
            for name, resource in self._warming_without_endpoints(state, selection).items():
                chosen = dict(selection.resources) if chosen is None else chosen
                chosen[name] = resource
        # Suspects the group rejected already (another Envoy named them) are handled above: left out,
        # or their last good version. The others go one per response: its ACK or NACK is then its own.
        suspects = sorted(selection.name_of[version] for version in selection.versions & state.suspects - rejected) \
            if state.suspects else ()
        for name in suspects[1:]:
            chosen = dict(selection.resources) if chosen is None else chosen
            had = state.acked.resources.get(name) if state.acked is not None else None
            if had is None:
                del chosen[name]
            else:
                chosen[name] = had
        return selection if chosen is None else Selection(type_url, dict(sorted(chosen.items())))

    def _last_good(self, type_url: str, state: _TypeState, name: str,
                   rejected: set[str]) -> xr.Resource | None:
        for accepted in (state.acked, self._source.last_acked(type_url)):
            if accepted is not None:
                good = accepted.resources.get(name)
                if good is not None and good.version not in rejected:
                    return good
        return None

    def _still_needed(self, type_url: str, state: _TypeState, selection: Selection) -> Mapping[str, xr.Resource]:
        """Resources gone from the snapshot that Envoy must keep for now (make before break)."""
        if state.acked is None or state.acked is selection or type_url not in (xr.CLUSTER, xr.ENDPOINT):
            return _EMPTY
        gone = selection.changes_since(state.acked)[1]
        if not gone:
            return _EMPTY
        if type_url == xr.CLUSTER:
            named = {name for kind in (xr.ROUTE, xr.LISTENER) if kind in self._types
                     for resource in self._accepted(kind).values() for name in resource.referenced(xr.CLUSTER)}
            gone = named.intersection(gone)
        elif not state.wildcard:
            # Endpoints of a cluster Envoy still has stay until Envoy unsubscribes: a missing
            # endpoint set never becomes an empty one.
            gone = state.subscribed.intersection(gone)
        return {name: state.acked.resources[name] for name in gone}

    def _warming_without_endpoints(self, state: _TypeState, selection: Selection) -> Mapping[str, xr.Resource]:
        """Endpoint sets Envoy asks for that the snapshot no longer has, of clusters this stream sent
        it and Envoy never got endpoints for: an empty one each. Envoy keeps such a cluster warming,
        and holds its ACK of the clusters, until it has its endpoints (15 s, its initial fetch
        timeout), while this stream holds the next clusters until that ACK: a cluster added and
        removed before Envoy asked for its endpoints held every later change for 15 s. Bounded by
        the clusters sent (a name only Envoy knows, such as a bootstrap cluster's, waits as before).
        Called only when a name asked for is not in the snapshot: the usual case costs nothing."""
        clusters = self._types.get(xr.CLUSTER)
        if clusters is None:
            return _EMPTY
        missing = state.subscribed.difference(selection.resources)
        if state.acked is not None:
            missing = missing.difference(state.acked.resources)
        warming: set[str] = set()
        for sent in (clusters.acked, clusters.in_flight.selection if clusters.in_flight is not None else None):
            if sent is not None:
                warming.update(missing & sent.endpoint_names)
        return {name: _no_endpoints(name) for name in sorted(warming)}

    def _accepted(self, type_url: str) -> Mapping[str, xr.Resource]:
        acked = self._types[type_url].acked
        return acked.resources if acked is not None else _EMPTY

    def _ready(self, desired: Selection, changed: tuple[str, ...]) -> bool:
        """Whether every cluster the changed resources name is already warm in Envoy."""
        if desired.type_url not in (xr.LISTENER, xr.ROUTE) or xr.CLUSTER not in self._types:
            return True
        clusters = self._source.resources(xr.CLUSTER)
        endpoints = self._source.resources(xr.ENDPOINT)
        have_clusters = self._accepted(xr.CLUSTER)
        have_endpoints = self._accepted(xr.ENDPOINT) if xr.ENDPOINT in self._types else _EMPTY
        for name in changed:
            for cluster_name in desired.resources[name].referenced(xr.CLUSTER):
                if cluster_name not in clusters.resources:
                    continue  # not ours to wait for (a static cluster, or a route to nowhere)
                if cluster_name not in have_clusters:
                    return False
                for eds_name in clusters.resources[cluster_name].referenced(xr.ENDPOINT):
                    if endpoints is not None and eds_name in endpoints and eds_name not in have_endpoints:
                        return False
        return True


def _names(message: str, name: str) -> bool:
    """Whether Envoy's NACK message names the resource `name` (as a whole word: 'default/api' is
    not named by 'default/api/websocket')."""
    return re.search(rf"(?<![\w./:-]){re.escape(name)}(?![\w./-])", message) is not None


class _Kept:
    """Entries kept while they cost `budget` in all, the least recently used given up first: the
    keys come from clients (a client may send 16 MiB of names per request), and a server that runs
    for months sees subscriptions come and go (a given-up entry still serves the streams that hold
    its value; only newcomers stop sharing it)."""

    def __init__(self, budget: int):
        self._entries: OrderedDict = OrderedDict()  # key -> (value, cost)
        self._budget, self.cost = budget, 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key):
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def keep(self, key, value, cost: int) -> None:
        if cost > self._budget or key in self._entries:
            return
        self._entries[key] = (value, cost)
        self.cost += cost
        while self.cost > self._budget:
            _key, (_value, given_up) = self._entries.popitem(last=False)
            self.cost -= given_up


_SHARED_SUBSCRIPTIONS = _Kept(budget=32 << 20)  # cost: bytes of memory (`_names_size`)


def _names_size(names: frozenset[str]) -> int:
    """The memory a set of names holds: the set and each string (a short name is ~60 bytes, an
    astral character takes 4: counting characters undercounted a client's names 20-40 times)."""
    return sys.getsizeof(names) + sum(map(sys.getsizeof, names))


def _shared(names: frozenset[str]) -> frozenset[str]:
    """One copy of each distinct subscription, whatever the number of Envoys that hold it.

    A fleet subscribes to the same names; sharing them saves ~10 KiB per stream for 100 names,
    and lets `ResourceSet.select` find its memo by identity. Bounded by memory (`_Kept`).
    """
    shared = _SHARED_SUBSCRIPTIONS.get(names)
    if shared is None:
        shared = names
        _SHARED_SUBSCRIPTIONS.keep(names, names, _names_size(names))
    return shared


_SOTW_NAMES_BY_WIRE = _Kept(budget=32 << 20)  # cost: bytes of memory, the names' bytes and the names they find


def _sotw_names(request, wire: bytes | None = None) -> tuple[frozenset[str], bool]:
    """A State-of-the-World request's names (shared, without "*"), and whether it names "*";
    `wire`: its bytes as received (None: they are written again).

    Every SotW ACK repeats every name its Envoy subscribes to: making 100 Python strings and a set
    of them was 6.4 us of each stream's work per push. The names' own bytes in the request (Envoy
    and upb write them after version_info and before type_url) find what the same bytes gave
    before: under 1 us. They find it only if those bytes were seen to be a list of names and
    nothing else, and the request holds as many names as that list: a request written in another
    order is read plainly, never wrongly. A first request (its node is ~60 KB, and comes once) and
    anything but a upb message are read plainly too."""
    region = None
    if type(request) is discovery_pb2.DiscoveryRequest and not request.HasField("node"):
        region = _names_region(request.SerializeToString() if wire is None else wire, request.type_url)
        known = _SOTW_NAMES_BY_WIRE.get(region) if region is not None else None
        if known is not None and known[2] == len(request.resource_names):
            return known[0], known[1]
    names = set(request.resource_names)
    star = "*" in names
    names.discard("*")
    read = (_shared(frozenset(names)), star)
    if region is not None and region == discovery_pb2.DiscoveryRequest(
            resource_names=request.resource_names).SerializeToString():  # the names and nothing else
        _SOTW_NAMES_BY_WIRE.keep(region, (*read, len(request.resource_names)),
                                 sys.getsizeof(region) + _names_size(read[0]))
    return read


def _names_region(wire: bytes, type_url: str) -> bytes | None:
    """The bytes between a request's version_info (field 1, first) and its type_url (field 4), where
    its names are when written in field order; None where that order is not found."""
    start = 0
    if wire[:1] == b"\x0a":
        if wire[1] > 0x7F:  # a version of 128 bytes or more: not ours, nor an echo of ours
            return None
        start = 2 + wire[1]
    end = wire.find(_type_url_field(type_url), start)
    return wire[start:end] if end >= 0 else None


@functools.lru_cache(maxsize=64)  # the types served: the caller answers no other
def _type_url_field(type_url: str) -> bytes:
    return xr.delimited(4, type_url.encode())


@functools.lru_cache(maxsize=1024)
def _no_endpoints(name: str) -> xr.Resource:
    """An empty ClusterLoadAssignment (names are of clusters this control plane sent)."""
    return xr.Resource.from_message(xr.ENDPOINT, endpoint_pb2.ClusterLoadAssignment(cluster_name=name))


def _known_resource(type_url: str, name: str, version: str, ours: xr.Resource | None) -> xr.Resource:
    """A resource Envoy reports having (Delta initial_resource_versions).

    Ours when the version is ours (nothing to send); otherwise a stand-in whose version is made
    unique per name, since another control plane may give many resources one version string.
    """
    if ours is not None and ours.version == version:
        return ours
    return xr.Resource(type_url, name, f"{version}@{name}", b"")
