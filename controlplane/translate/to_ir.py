"""Kubernetes objects -> IR and status conditions. Pure: a StoreView in, values out.

Every problem becomes a condition on the object that has it, with a message that says what is
wrong and what to change; everything else is still translated. A bad Backend never takes its
Gateway's other Backends down with it, and nothing that works stops working:
- **Last known good, per object.** A Gateway or Backend whose new version is refused (a bad edit,
  a Service port renamed, a Service deleted) keeps serving its last accepted version, which is
  said in its `Accepted` condition; only deleting the object itself removes it. The attempts, in
  order: the object as it is now; its last accepted version with today's references; its last
  accepted version with the references it last resolved (EndpointSlices are always today's).
- **Holders keep what they hold.** A route or listener port claimed twice stays with the object
  that held it (served by the previous translation; then the oldest `creationTimestamp`; then
  namespace/name); only the newcomer's conflicting route or listener is left out, the rest of it
  is served.
- **A bug stays alone.** An unexpected exception while translating one object refuses that object
  (and is reported with its traceback in `Translation.failures`); the rest is translated.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import operator
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError

from controlplane.ir import types as ir
from controlplane.model import crds, kube, problems
from controlplane.model.kube import slice_service
from controlplane.sources.store import ObjectKey, StoreView
from controlplane.translate import capacity, names, secrets


@dataclass
class Translation:
    groups: dict[str, ir.NodeGroup]
    conditions: dict[ObjectKey, tuple[crds.Condition, ...]]
    origins: dict[str, ObjectKey] = field(default_factory=dict)
    """Envoy resource name -> the object it came from (for Envoy's NACKs)."""
    node_groups: dict[ObjectKey, str] = field(default_factory=dict)
    """Accepted object -> the node group (nodeCluster) whose Envoys it configures."""
    certificate_expiry: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """(namespace, Secret, "certificate" or "ca") of each TLS Secret a Gateway or Backend refers to -> when
    the version Envoys are given (the last valid one, after a refused rotation) expires, in epoch seconds."""
    serving_last_accepted: dict[ObjectKey, int] = field(default_factory=dict)
    """Objects whose current version is refused, served from their last accepted one -> its generation."""
    failures: dict[ObjectKey, str] = field(default_factory=dict)
    """Objects refused because translating them raised unexpectedly (a bug) -> the traceback."""
    secret_rotations: tuple[secrets.Rotation, ...] = ()
    """Secret versions judged by this translation that replace a last valid one (for the log)."""
    secret_rotations_total: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(result, reason) -> rotations since start: the counter controlplane_secret_rotations_total."""


class _Rejected(Exception):
    def __init__(self, reason: str, message: str, *, unresolved: bool = False):
        super().__init__(message)
        self.reason, self.message, self.unresolved = reason, message, unresolved


@dataclass(frozen=True)
class _Gateway:
    key: ObjectKey
    spec: crds.GatewaySpec
    tls: dict[str, ir.Tls] = field(default_factory=dict)
    listeners: tuple[crds.Listener, ...] = ()
    """The listeners it is given: all of its spec's but those whose port another Gateway holds."""


# _Good, _Attempt and _Placed are NamedTuples: a full translation makes one of each per Backend, and
# a frozen dataclass sets each field through object.__setattr__ (2.3x slower to make).
class _Good(NamedTuple):
    """An object's last accepted version: the object, and for a Backend what it resolved."""

    obj: Mapping[str, Any]
    service: Mapping[str, Any] | None = None
    endpoints: tuple[ir.Endpoint, ...] = ()


class _Attempt(NamedTuple):
    """One way to translate an object: as it is now, or from its last accepted version."""

    variant: str  # part of memo keys: each attempt caches apart
    obj: Mapping[str, Any]
    service: Mapping[str, Any] | None = None  # the Service to use instead of today's
    endpoints: tuple[ir.Endpoint, ...] = ()  # the endpoints to keep if today's EndpointSlices give none


class _Placed(NamedTuple):
    """Where a served Backend's parts went: what placing it again first takes back."""

    node_cluster: str
    backend: str  # its cluster's name: its place in the node group
    service: tuple[str, str]  # (namespace, name): whose EndpointSlices it follows
    routes: dict[tuple[ObjectKey, str], list[ir.Route]]  # the routes it was given, by (Gateway, listener)
    origins: tuple[str, ...]  # the Envoy resource names it is the origin of


_FAILED = "TranslationFailed"
_PARTIAL = ("RouteConflict", "PortConflict")  # Accepted reasons of an object served in part


def translate(view: StoreView, *, now: float | None = None) -> Translation:
    """Translate from scratch (see `Translator` for translating a stream of views)."""
    return Translator().translate(view, now=now)


class Translator:
    """Translates views, reusing what it computed for objects that are unchanged.

    Unchanged means the very same object: sources replace an object when it changes and keep it
    otherwise. Each memo entry holds its inputs and compares them as a tuple, which tries identity
    first, so unchanged objects cost a pointer comparison, and an equal copy still hits correctly
    (a recycled id() can never hit). The result is exactly `translate(view)`: the memo is a cache;
    entries of objects that are gone are dropped after each full pass. One piece of policy state
    is kept on purpose: the last valid version of each TLS Secret (see `_secret`).
    """

    def __init__(self, *, min_certificate_lifetime: float = secrets.DEFAULT_MIN_LIFETIME):
        """`min_certificate_lifetime`: seconds a new certificate must still be valid for, unless its
        Gateway says otherwise (spec.minCertificateLifetime)."""
        self._min_lifetime = min_certificate_lifetime
        self._rotations: list[secrets.Rotation] = []
        self._rotation_totals: Counter[tuple[str, str]] = Counter()
        self._memo: dict[tuple, tuple[tuple, bool, Any]] = {}
        self._used: set[tuple] = set()
        # The last Secret value that was valid, per Secret and use (secrets.Use: what its user requires):
        # what Envoys keep getting when a rotation brings a bad one (the postmortem's outage), and what
        # a rotation must stay trusted by. Policy, not a cache: it outlives the objects.
        self._last_valid: dict[tuple[str, str, str, secrets.Use | None], secrets.Checked] = {}
        self._last_valid_objects: dict[tuple[str, str, str, secrets.Use | None], Mapping[str, Any]] = {}
        self._now: float | None = None
        self._next_validity_change = float("inf")  # when a certificate in use expires or becomes valid
        self._last: tuple[StoreView, Translation] | None = None
        # What the last translation placed, kept so that a change places again only what it touches
        # (`_backends_changed`): a full pass rebuilds all of it.
        self._service_users: dict[tuple[str, str], dict[ObjectKey, _Attempt]] = {}
        self._backend_positions: dict[str, tuple[str, int]] = {}  # cluster name -> (node group, index in it)
        self._gateways: dict[tuple[str, str], _Gateway] = {}  # accepted, by (namespace, name)
        self._claimed: dict[tuple[ObjectKey, str], dict[tuple, ObjectKey]] = {}  # (Gateway, listener) -> route -> holder
        self._listener_routes: dict[tuple[ObjectKey, str], list[ir.Route]] = {}  # (Gateway, listener) -> sorted routes
        self._placed: dict[ObjectKey, _Placed] = {}
        # The dependency index: ("Service" or "Secret", namespace, name) -> the Backends that name it
        # (refused ones too: a Service created may resolve them), and each Backend's entries.
        self._references: dict[tuple[str, str, str], set[ObjectKey]] = {}
        self._references_of: dict[ObjectKey, set[tuple[str, str, str]]] = {}
        self._gateway_secrets: set[tuple[str, str]] = set()  # (namespace, name) of the Secrets Gateways name
        # A Backend was refused a route another holds, in any attempt (a fallback to its last accepted
        # version too, even one refused for another reason): who gets the route depends on everyone.
        self._contested = False
        self._met_conflict = False  # the same, in the pass under way
        self._journal: dict[tuple, tuple | None] | None = None  # memo entries a fast path replaced (`_checkpoint`)
        self._expiry: dict[tuple[str, str, str], float] = {}
        # Policy, like `_last_valid`: each object's last accepted version, and what was served.
        self._good: dict[ObjectKey, _Good] = {}
        self._good_json: dict[ObjectKey, tuple[_Good, str]] = {}  # each object's part of remembered_json()
        self._served: frozenset[ObjectKey] = frozenset()
        self._partly_served: frozenset[ObjectKey] = frozenset()
        self.remembered_changes = 0
        """Grows whenever what `remembered()` returns changes: when to save it again."""

    def remembered(self) -> dict[str, Any]:
        """The policy state that must survive a restart (Secrets' keys included: store it as a
        Secret). A replica that `restore`s it serves what this one served."""
        return json.loads(self.remembered_json())

    def remembered_json(self) -> bytes:
        """`remembered()` as the JSON document a Memory stores. Each object's part is serialized when
        it changes, not on every save: at 10,000 Backends, building the whole state anew took 120-200 ms
        of the event loop per save (docs/benchmarks.md)."""
        parts: dict[ObjectKey, tuple[_Good, str]] = {}
        for key, good in sorted(self._good.items()):
            cached = self._good_json.get(key)
            if cached is None or cached[0] is not good:
                cached = (good, json.dumps({"kind": key.kind, "namespace": key.namespace, "name": key.name,
                                            "object": good.obj, "service": good.service,
                                            "endpoints": [list(e) for e in good.endpoints]}, separators=(",", ":")))
            parts[key] = cached
        self._good_json = parts  # deleted objects' parts go with them
        last_valid_secrets = [{"use": kind, "namespace": namespace, "name": name, "object": obj,
                               **({"for": use.as_json()} if use is not None else {})}
                              for (kind, namespace, name, use), obj in sorted(self._last_valid_objects.items(),
                                                                              key=lambda item: repr(item[0]))]
        return (f'{{"version":1,"objects":[{",".join(part for _, part in parts.values())}],"secrets":'
                f'{json.dumps(last_valid_secrets, separators=(",", ":"))}}}').encode()

    def restore(self, remembered: Mapping[str, Any]) -> list[str]:
        """Take what a previous run `remembered()`, before the first translation; returns what could
        not be taken (a Secret no longer valid, say), one line each."""
        skipped = []
        for item in remembered.get("objects", ()):
            key = ObjectKey(item["kind"], item["namespace"], item["name"])
            try:
                endpoints = tuple(_remembered_endpoint(entry) for entry in item.get("endpoints") or ())
            except (TypeError, ValueError) as problem:  # damaged: this object's last version is not taken
                skipped.append(f"{key.kind} {key.namespace}/{key.name}: its remembered endpoints: {problem}")
                continue
            self._good[key] = _Good(item["object"], item.get("service"), endpoints)
        self._served = frozenset(self._good)
        for item in remembered.get("secrets", ()):
            use, namespace, secret = item["use"], item["namespace"], item["name"]
            for_ = secrets.Use.from_json(item["for"]) if item.get("for") else None  # absent: saved by an older version
            parse, name = ((secrets.certificate, names.certificate_secret(namespace, secret)) if use == "certificate"
                           else (secrets.trusted_ca, names.trusted_ca_secret(namespace, secret)))
            try:
                checked = parse(item["object"], where=f"{namespace}/{secret}", name=name)
            except secrets.SecretProblem as problem:
                skipped.append(f"Secret {namespace}/{secret}: {problem}")
                continue
            self._last_valid[(use, namespace, secret, for_)] = checked
            self._last_valid_objects[(use, namespace, secret, for_)] = item["object"]
        return skipped

    def _cached(self, key: tuple, inputs: tuple, compute, *args):
        """`compute(*args)`, or what it returned last time for the same `inputs` (arguments that
        cost something to make are made inside `compute`: they are not needed on a hit)."""
        entry = self._memo.get(key)
        # Tuple equality tries identity first: unchanged objects compare in C, without a deep look.
        if entry is None or entry[0] != inputs:
            if self._journal is not None:
                self._journal.setdefault(key, entry)
            try:
                entry = (inputs, True, compute(*args))
            except _Rejected as rejected:
                entry = (inputs, False, (rejected.reason, rejected.message, rejected.unresolved))
            self._memo[key] = entry
        self._used.add(key)
        if not entry[1]:
            # A new exception each time, and only its words kept: raising a kept one again added each
            # pass's frames to its traceback, and with them that pass's translation (a leak per pass).
            reason, message, unresolved = entry[2]
            raise _Rejected(reason, message, unresolved=unresolved)
        return entry[2]

    def translate(self, view: StoreView, *, now: float | None = None) -> Translation:
        """`now` (seconds since the epoch) checks certificate validity; None skips that check."""
        self._now = now
        self._rotations = []
        certificates_unchanged = now is None or now < self._next_validity_change
        translation = None
        if self._last is not None and certificates_unchanged:
            changed = view.changed_since(self._last[0])
            if changed is not None and all(key.kind == "EndpointSlice" for key in changed):
                translation = self._endpoints_changed(view, changed)
            elif changed is not None:
                rollback = self._checkpoint()
                translation = (self._listener_secrets_changed(view, changed) if any(
                    key.kind == "Secret" and (key.namespace, key.name) in self._gateway_secrets for key in changed)
                    else self._backends_changed(view, changed))
                if translation is None:
                    rollback()
                self._journal = None
        if translation is None:
            translation = self._translate(view)
        self._last = (view, translation)
        return translation

    def _endpoints_changed(self, view: StoreView, changed: set[ObjectKey]) -> Translation:
        """Only EndpointSlices changed: they change endpoints, never acceptance, conditions or routes,
        so only the Backends of the touched Services are rebuilt (tests prove it equals a full pass)."""
        earlier, last = self._last
        if any(self._slice_verdict(key, obj)[1] for key in changed for obj in (earlier.get(*key), view.get(*key))
               if obj is not None):
            return self._translate(view)  # a slice's problems come or go: they are on its Backends' status
        services = {(key.namespace, service) for key in changed
                    for obj in (earlier.get(*key), view.get(*key)) if obj is not None
                    and (service := slice_service(obj))}
        replaced: dict[str, ir.Backend] = {}
        for namespace, service in services:
            for key, attempt in self._service_users.get((namespace, service), {}).items():
                spec = self._memo[("spec", key, attempt.variant)][2]
                # Secrets unchanged: so are the warnings
                backend, _left_out = self._backend(view, key, spec, attempt, warnings=[])
                replaced[backend.name] = backend
                good = self._good.get(key)
                if attempt.variant == "now" and good is not None and good.endpoints != backend.endpoints:
                    self._good[key] = good._replace(endpoints=backend.endpoints)
                    self.remembered_changes += 1
        if not replaced:
            return dataclasses.replace(last, secret_rotations=())
        patches: dict[str, dict[int, ir.Backend]] = {}
        for name, backend in replaced.items():
            if name in self._backend_positions:
                group, position = self._backend_positions[name]
                patches.setdefault(group, {})[position] = backend
        groups = dict(last.groups)
        for name, patch in patches.items():
            backends = list(groups[name].backends)  # copying references, in C: the walk is over the patch
            for position, backend in patch.items():
                backends[position] = backend
            groups[name] = ir.NodeGroup(name, groups[name].listeners, tuple(backends))
        return Translation(groups=groups, conditions=last.conditions, origins=last.origins,
                           node_groups=last.node_groups, certificate_expiry=last.certificate_expiry,
                           serving_last_accepted=last.serving_last_accepted, failures=last.failures,
                           secret_rotations_total=last.secret_rotations_total)

    def _backends_changed(self, view: StoreView, changed: set[ObjectKey]) -> Translation | None:
        """Only Backends, Services, EndpointSlices and Secrets that no Gateway names changed: only
        the Backends that name what changed are placed again (the dependency index), each after
        taking back what it held. None when the change reaches further (a full pass then;
        tests/test_incremental.py proves both equal):
        - a Gateway changed (its listeners, ports and TLS shape every Backend of it);
        - a route is contested (refused to one Backend because another holds it, in any attempt:
          a fallback to a last accepted version too), before or after: who gets it depends on the
          order of everyone;
        - a Backend of these shares a Secret with another object (which one a NACK names depends
          on the order of everyone)."""
        earlier, last = self._last
        if self._contested:
            return None
        affected: set[ObjectKey] = set()
        for key in changed:
            if key.kind == "Backend":
                affected.add(key)
            elif key.kind == "EndpointSlice":
                for obj in (earlier.get(*key), view.get(*key)):
                    if obj is not None and (service := slice_service(obj)):
                        affected |= self._references.get(("Service", key.namespace, service), set())
            elif key.kind == "Service" or (key.kind == "Secret"
                                           and (key.namespace, key.name) not in self._gateway_secrets):
                affected |= self._references.get((key.kind, key.namespace, key.name), set())
            else:
                return None
        if not affected:
            return dataclasses.replace(last, secret_rotations=())  # what changed is named by nothing
        if self._shares_secrets(affected):
            return None
        self._expiry = dict(last.certificate_expiry)
        out = Translation(groups={}, conditions=dict(last.conditions), origins=dict(last.origins),
                          node_groups=dict(last.node_groups), serving_last_accepted=dict(last.serving_last_accepted),
                          failures=dict(last.failures))
        gone: dict[str, set[str]] = {}  # node group -> the names of the Backends taken out of it
        targets: set[tuple[ObjectKey, str]] = set()  # the listeners whose routes may change
        for key in affected:
            for found in (out.conditions, out.node_groups, out.serving_last_accepted, out.failures):
                found.pop(key, None)
            placed = self._placed.pop(key, None)
            if placed is not None:
                if not self._take_back(key, placed, out.origins):
                    return None
                gone.setdefault(placed.node_cluster, set()).add(placed.backend)
                targets |= placed.routes.keys()
            for kind, namespace, name in self._references_of.get(key, ()):
                if kind == "Secret":  # its own alone (`_shares_secrets`): its user says when it expires
                    self._expiry.pop((namespace, name, "certificate"), None)
                    self._expiry.pop((namespace, name, "ca"), None)
            self._forget_references(key)
        added: dict[str, dict[str, ir.Backend]] = {}
        present = [(key, obj) for key in affected if (obj := view.get(*key)) is not None]
        self._met_conflict = False
        for key, obj in sorted(present, key=self._claim_order):
            placed = self._translate_object(key, obj, out, lambda attempt: self._place_backend(
                view, key, attempt, self._gateways, self._claimed))
            if placed is not None:
                backend, node_cluster = self._record_backend(key, obj, *placed, out)
                added.setdefault(node_cluster, {})[backend.name] = backend
                for target, routes in self._placed[key].routes.items():
                    targets.add(target)
                    for route in routes:
                        bisect.insort(self._listener_routes[target], route, key=_specificity)
        if self._met_conflict or self._shares_secrets(affected):
            return None
        groups = dict(last.groups)
        moved = set()  # node groups whose Backends came or went
        for name in gone.keys() | added.keys():
            group, taken, given = groups[name], gone.get(name, set()), added.get(name, {})
            if taken == given.keys():  # the same Backends, new values: each at its place
                backends = list(group.backends)
                for backend in given.values():
                    backends[self._backend_positions[backend.name][1]] = backend
            else:
                backends = [backend for backend in group.backends if backend.name not in taken]
                for backend in given.values():
                    bisect.insort(backends, backend, key=_BY_NAME)
                moved.add(name)
            groups[name] = ir.NodeGroup(name, group.listeners, tuple(backends))
        self._rebuild_listeners(groups, self._gateways, targets)
        self._served = (self._served - affected) | {key for key, _obj in present if key in out.node_groups}
        for name in moved:
            self._backend_positions.update((backend.name, (name, position))
                                           for position, backend in enumerate(groups[name].backends))
        for key in affected:
            if key.kind == "Backend" and view.get(*key) is None:
                self._forget(key)
        out.groups, out.certificate_expiry = groups, self._expiry
        out.secret_rotations, out.secret_rotations_total = tuple(self._rotations), dict(self._rotation_totals)
        return out

    def _checkpoint(self) -> Callable[[], None]:
        """Before a fast path that may give way to a full pass midway: what undoes what it did to
        the policy state (last accepted versions, last valid Secrets, rotations counted) and to
        the memo (a rotation is recorded once per version and user, through it). A fast path
        tries attempts a full pass may never try (placed in another order, a Backend wins the
        route it conflicted with), so the full pass must start from the state before it."""
        good, valid, valid_objects = dict(self._good), dict(self._last_valid), dict(self._last_valid_objects)
        totals, rotations, changes = Counter(self._rotation_totals), len(self._rotations), self.remembered_changes
        self._journal = journal = {}

        def rollback() -> None:
            for key, entry in journal.items():
                if entry is None:
                    self._memo.pop(key, None)
                else:
                    self._memo[key] = entry
            self._good, self._last_valid, self._last_valid_objects = good, valid, valid_objects
            self._rotation_totals, self.remembered_changes = totals, changes
            del self._rotations[rotations:]
        return rollback

    def _listener_secrets_changed(self, view: StoreView, changed: set[ObjectKey]) -> Translation | None:
        """Only Secrets changed, Gateways name some, and no Backend names any of them or a Gateway's
        (a listener's certificate rotated): the Gateways (a handful) are accepted again and, if each kept its
        spec and listeners, only the listeners whose TLS changed are rebuilt; their routes, the
        Backends and their conditions stay. None otherwise (a full pass then)."""
        _earlier, last = self._last
        if any(key.kind != "Secret" or ("Secret", key.namespace, key.name) in self._references for key in changed) \
                or any(("Secret", namespace, name) in self._references for namespace, name in self._gateway_secrets):
            return None  # a Backend's Secret changed too (in the same batch), or a Backend shares a Gateway's
        self._expiry = dict(last.certificate_expiry)  # each Gateway still accepted says again when its expire
        scratch = Translation(groups={}, conditions={})
        gateways = self._accepted_gateways(view, scratch)
        if gateways.keys() != self._gateways.keys() or any(
                gateway.spec is not self._gateways[name].spec or gateway.listeners != self._gateways[name].listeners
                for name, gateway in gateways.items()):
            return None
        groups = dict(last.groups)
        self._rebuild_listeners(groups, gateways, {(gateway.key, listener.name) for gateway in gateways.values()
                                                   for listener in gateway.listeners})
        self._gateways = gateways
        serving_last_accepted, failures = (
            {key: value for key, value in found.items() if key.kind != "Gateway"} | fresh
            for found, fresh in ((last.serving_last_accepted, scratch.serving_last_accepted),
                                 (last.failures, scratch.failures)))
        return Translation(groups=groups, conditions=last.conditions | scratch.conditions, origins=last.origins,
                           node_groups=last.node_groups, certificate_expiry=self._expiry,
                           serving_last_accepted=serving_last_accepted, failures=failures,
                           secret_rotations=tuple(self._rotations),
                           secret_rotations_total=dict(self._rotation_totals))

    def _rebuild_listeners(self, groups: dict[str, ir.NodeGroup], gateways: dict[tuple[str, str], _Gateway],
                           targets: set[tuple[ObjectKey, str]]) -> None:
        """Build each (Gateway, listener) of `targets` again from its routes held now, and put it in
        its node group in `groups` where it is not the same listener (the memo keeps unchanged ones)."""
        for gateway_key, listener_name in targets:
            gateway = gateways[(gateway_key.namespace, gateway_key.name)]
            listener = next(listener for listener in gateway.listeners if listener.name == listener_name)
            built = self._built_listener(gateway, listener, tuple(self._listener_routes[(gateway_key, listener_name)]))
            group = groups[gateway.spec.node_cluster]
            if not any(held is built for held in group.listeners):
                groups[group.name] = ir.NodeGroup(group.name, tuple(built if held.name == built.name else held
                                                                    for held in group.listeners), group.backends)

    def _shares_secrets(self, backends: set[ObjectKey]) -> bool:
        """Whether one of these Backends names a Secret that another object names too."""
        return any(kind == "Secret" and (len(self._references[(kind, namespace, name)]) > 1
                                         or (namespace, name) in self._gateway_secrets)
                   for key in backends for kind, namespace, name in self._references_of.get(key, ()))

    def _take_back(self, key: ObjectKey, placed: _Placed, origins: dict[str, ObjectKey]) -> bool:
        """Undo what placing a Backend did: its routes, claims, origins and Service use. False if
        a route is not where it was put (a bug: the caller translates everything instead)."""
        for target, routes in placed.routes.items():
            held, claims = self._listener_routes[target], self._claimed[target]
            for route in routes:
                position = bisect.bisect_left(held, _specificity(route), key=_specificity)
                if claims.pop(route.match_key, None) != key or position == len(held) or held[position] != route:
                    return False
                del held[position]
        for name in placed.origins:
            if origins.get(name) == key:  # a Secret's may have gone to a Backend that sorts first since
                del origins[name]
        users = self._service_users[placed.service]
        del users[key]
        if not users:
            del self._service_users[placed.service]
        return True

    def _forget(self, key: ObjectKey) -> None:
        """A Backend deleted: its last accepted version and what the memo holds of it go."""
        if self._good.pop(key, None) is not None:
            self.remembered_changes += 1
        for variant in ("now", "last-accepted", "last-resolved"):
            for part in ("spec", "backend", "routes"):
                self._memo.pop((part, key, variant), None)
        for part in ("backend-kept", "upstream-tls"):
            self._memo.pop((part, key), None)

    def _refer(self, key: ObjectKey, spec: crds.BackendSpec) -> None:
        """Index what a Backend's spec names (each attempt's: any may be the one served)."""
        named = [("Service", key.namespace, spec.service.name)]
        if spec.tls is not None:
            named += [("Secret", key.namespace, secret) for secret in (spec.tls.ca_secret,
                                                                      spec.tls.client_certificate_secret) if secret]
        for reference in named:
            self._references.setdefault(reference, set()).add(key)
        self._references_of.setdefault(key, set()).update(named)

    def _forget_references(self, key: ObjectKey) -> None:
        for reference in self._references_of.pop(key, ()):
            users = self._references[reference]
            users.discard(key)
            if not users:
                del self._references[reference]

    def _translate(self, view: StoreView) -> Translation:
        self._used = set()
        self._met_conflict = False
        self._next_validity_change = float("inf")
        self._service_users, self._placed, self._references, self._references_of = {}, {}, {}, {}
        self._gateway_secrets = set()
        self._expiry: dict[tuple[str, str, str], float] = {}
        out = Translation(groups={}, conditions={})
        gateways = self._accepted_gateways(view, out)
        targets = [(gateway, listener) for gateway in gateways.values() for listener in gateway.listeners]
        claimed: dict[tuple[ObjectKey, str], dict[tuple, ObjectKey]] = {
            (gateway.key, listener.name): {} for gateway, listener in targets}
        backends: dict[str, list[ir.Backend]] = {}
        for key, obj in self._holders_first(view, "Backend"):
            placed = self._translate_object(key, obj, out, lambda attempt: self._place_backend(
                view, key, attempt, gateways, claimed))
            if placed is not None:
                backend, node_cluster = self._record_backend(key, obj, *placed, out)
                backends.setdefault(node_cluster, []).append(backend)
        listeners: dict[tuple[ObjectKey, str], list[ir.Route]] = {target: [] for target in claimed}
        for placed in self._placed.values():
            for target, routes in placed.routes.items():
                listeners[target].extend(routes)
        group_listeners: dict[str, list[ir.Listener]] = {}
        for gateway, listener in targets:
            routes = listeners[(gateway.key, listener.name)]
            routes.sort(key=_specificity)
            built = self._built_listener(gateway, listener, tuple(routes))
            out.origins[built.name] = gateway.key
            if built.tls is not None:
                _claim_secrets(out.origins, gateway.key, built.tls.certificate, built.tls.client_ca)
            group_listeners.setdefault(gateway.spec.node_cluster, []).append(built)
        out.groups = {node_cluster: ir.NodeGroup(node_cluster, tuple(sorted(listeners_, key=_BY_NAME)),
                                                 tuple(sorted(backends.get(node_cluster, []), key=_BY_NAME)))
                      for node_cluster, listeners_ in sorted(group_listeners.items())}
        self._backend_positions = {backend.name: (group.name, position) for group in out.groups.values()
                                   for position, backend in enumerate(group.backends)}
        self._gateways, self._claimed, self._listener_routes = gateways, claimed, listeners
        for stale in self._memo.keys() - self._used:
            del self._memo[stale]
        for deleted in self._good.keys() - set(view):  # only deleting an object forgets its last good version
            del self._good[deleted]
            self.remembered_changes += 1
        # Served whole: a newcomer that got only its free routes or ports must not outrank, next time,
        # the holder of the ones it was refused.
        self._served = frozenset(key for key in out.node_groups if out.conditions[key][0].reason not in _PARTIAL)
        self._partly_served = frozenset(out.node_groups) - self._served
        self._contested = self._met_conflict
        out.certificate_expiry = self._expiry
        out.secret_rotations, out.secret_rotations_total = tuple(self._rotations), dict(self._rotation_totals)
        return out

    def _record_backend(self, key: ObjectKey, obj: Mapping[str, Any], attempt: _Attempt, placed: tuple,
                        out: Translation) -> tuple[ir.Backend, str]:
        """Enter a placed Backend in `out` (its origins, node group, conditions) and in what the
        translator keeps of it (`_placed`, the Service it follows): (its value, its node group)."""
        gateway, spec, backend, routes, (warnings, left_out), conflicts = placed
        node_cluster = gateway.spec.node_cluster
        service = (key.namespace, spec.service.name)
        self._service_users.setdefault(service, {})[key] = attempt
        origins = [backend.name]
        if backend.websocket is not None:
            origins.append(backend.websocket.name)
        out.origins.update(dict.fromkeys(origins, key))
        if backend.tls is not None:
            _claim_secrets(out.origins, key, backend.tls.ca, backend.tls.client_certificate)
            origins += [secret.name for secret in (backend.tls.ca, backend.tls.client_certificate)
                        if secret is not None and out.origins[secret.name] == key]
        self._placed[key] = _Placed(node_cluster, backend.name, service, routes, tuple(origins))
        out.node_groups[key] = node_cluster
        if attempt.variant == "now":
            out.conditions[key] = _accepted_conditions(_generation(obj), node_cluster)
        if conflicts:
            out.conditions[key] = _partially(out.conditions[key], "RouteConflict", "; ".join(conflicts)
                                             + ". The Backend's other routes are served")
        if warnings or left_out:
            out.conditions[key] = _with_unresolved(out.conditions[key],
                                                   "InvalidSecret" if warnings else "InvalidEndpointSlice",
                                                   "; ".join((*warnings, *left_out)))
        return backend, node_cluster

    def _built_listener(self, gateway: _Gateway, listener: crds.Listener, routes: tuple[ir.Route, ...]) -> ir.Listener:
        name = names.listener(gateway.key.namespace, gateway.key.name, listener.name)
        tls = gateway.tls.get(listener.name)
        return self._cached(("listener", name), (gateway.spec, tls, *routes), _listener, name, listener, routes,
                            gateway.spec.limits.max_connections, tls)

    def _holders_first(self, view: StoreView, kind: str) -> list[tuple[ObjectKey, Mapping[str, Any]]]:
        return sorted(view.of_kind(kind), key=self._claim_order)

    def _claim_order(self, item: tuple[ObjectKey, Mapping[str, Any]]) -> tuple:
        """The order objects claim routes and ports in: those served before keep what they hold,
        then those served in part (a newcomer's free routes), then the oldest (creationTimestamp,
        which sorts as text), then by namespace/name."""
        key, obj = item
        created = (obj.get("metadata") or {}).get("creationTimestamp")
        rank = 0 if key in self._served else 1 if key in self._partly_served else 2
        return (rank, created if isinstance(created, str) else "~", key)

    def _attempts(self, key: ObjectKey, obj: Mapping[str, Any]) -> Iterator[_Attempt]:
        yield _Attempt("now", obj)
        good = self._good.get(key)
        if good is not None:
            yield _Attempt("last-accepted", good.obj)
            if good.service is not None:
                yield _Attempt("last-resolved", good.obj, good.service, good.endpoints)

    def _translate_object(self, key: ObjectKey, obj: Mapping[str, Any], out: Translation, place):
        """`place(attempt)` -> (value, the Service it resolved) for each attempt until one is accepted:
        returns (attempt, value), or None with the object refused. Conditions report the object as
        it is now."""
        refusal: _Rejected | None = None
        for attempt in self._attempts(key, obj):
            try:
                placed = place(attempt)
            except _Rejected as rejected:
                refusal = refusal or rejected
                continue
            except Exception:  # a bug: this object is refused, the rest is translated
                out.failures.setdefault(key, traceback.format_exc())
                refusal = refusal or _Rejected(_FAILED, "translating this object failed unexpectedly (a bug in the "
                                               "control plane: its log has the details; please report it)")
                continue
            value, resolved = placed
            if attempt.variant == "now":
                good = self._good.get(key)
                if good is None or good.obj is not obj or (resolved and (
                        good.service is not resolved[0] or good.endpoints != resolved[1])):
                    self._good[key] = _Good(obj, *resolved)
                    self.remembered_changes += 1
            else:
                generation = _generation(attempt.obj)
                out.serving_last_accepted[key] = generation
                out.conditions[key] = _last_accepted_conditions(obj, refusal, generation)
            return attempt, value
        out.conditions[key] = _rejected_conditions(obj, refusal)
        return None

    def _place_backend(self, view: StoreView, key: ObjectKey, attempt: _Attempt,
                       gateways: dict[tuple[str, str], _Gateway],
                       claimed: dict[tuple[ObjectKey, str], dict[tuple, ObjectKey]]):
        """A Backend, its routes by listener (without those another object holds) and its problems,
        claiming its routes; with the Service and endpoints it resolved. Raises _Rejected."""
        spec = self._cached(("spec", key, attempt.variant), (attempt.obj,), _parse, crds.BackendSpec, attempt.obj)
        self._refer(key, spec)
        gateway = gateways.get((key.namespace, spec.gateway))
        if gateway is None:
            raise _Rejected("GatewayNotFound", f"Gateway {key.namespace}/{spec.gateway} does not exist or "
                            "is not accepted: create it in the Backend's namespace, or fix spec.gateway",
                            unresolved=True)
        targets = _target_listeners(gateway, spec)
        warnings: list[str] = []
        backend, left_out = self._backend(view, key, spec, attempt, warnings=warnings)
        routes = self._cached(("routes", key, attempt.variant), (spec,), _routes, spec, backend)
        try:
            served, conflicts = _claim_routes(key, routes, targets, claimed)
        except _Rejected as rejected:
            self._met_conflict = self._met_conflict or rejected.reason == "RouteConflict"
            raise
        self._met_conflict = self._met_conflict or bool(conflicts)
        service = attempt.service or view.get("Service", key.namespace, spec.service.name)
        return (gateway, spec, backend, served, (warnings, left_out), conflicts), (service, backend.endpoints)

    def _backend(self, view: StoreView, key: ObjectKey, spec: crds.BackendSpec, attempt: _Attempt, *,
                 warnings: list[str]) -> tuple[ir.Backend, tuple[str, ...]]:
        """A Backend's cluster and endpoints, and what was left out of its EndpointSlices (for its
        status), rebuilt only when its spec, Service, slices or TLS changed. The Service is
        today's, or the one its last accepted version resolved (`attempt.service`)."""
        service = attempt.service or view.get("Service", key.namespace, spec.service.name)
        slices = view.endpoint_slices(key.namespace, spec.service.name)
        tls = self._upstream_tls(view, key, spec.tls, warnings) if spec.tls is not None else None
        backend, left_out = self._cached(("backend", key, attempt.variant), (spec, service, tls, *slices),
                                         self._backend_and_problems, key, spec, service, slices, tls)
        if not backend.endpoints and attempt.endpoints:
            # The Service it last resolved is gone or renamed its port, and today's EndpointSlices follow
            # the new name: the endpoints it last had are better than none.
            backend = self._cached(("backend-kept", key), (backend, attempt.endpoints), _with_endpoints, backend,
                                   attempt.endpoints, spec)
        return backend, left_out

    def _backend_and_problems(self, key: ObjectKey, spec: crds.BackendSpec, service: Mapping[str, Any] | None,
                              slices: list[Mapping[str, Any]], tls: ir.UpstreamTls | None
                              ) -> tuple[ir.Backend, tuple[str, ...]]:
        verdicts = self._slice_verdicts(slices)
        return _build_backend(key, spec, service, verdicts, tls), _slice_problems(slices, verdicts)

    def _slice_verdicts(self, slices: list[Mapping[str, Any]]) -> list[_SliceVerdict]:
        return [self._slice_verdict(ObjectKey.of(raw), raw) for raw in slices]

    def _slice_verdict(self, key: ObjectKey, raw: Mapping[str, Any]) -> _SliceVerdict:
        """Each EndpointSlice is validated once, not once for its endpoints and again for its
        Backend's status (a third of a full translation at 10,000 Backends was their validation)."""
        return self._cached(("slice", key), (raw,), _checked_slice, raw)

    def _upstream_tls(self, view: StoreView, backend: ObjectKey, spec: crds.UpstreamTls,
                      warnings: list[str]) -> ir.UpstreamTls:
        ca = self._secret(view, backend, spec.ca_secret, secrets.Use("upstream-ca"), warnings)
        client_certificate = None
        if spec.client_certificate_secret is not None:
            client_certificate = self._secret(view, backend, spec.client_certificate_secret,
                                              secrets.Use("client", min_lifetime=self._min_lifetime), warnings)
        return self._cached(("upstream-tls", backend), (spec.hostname, ca, client_certificate), ir.UpstreamTls,
                            spec.hostname, ca, client_certificate)

    def _accepted_gateways(self, view: StoreView, out: Translation) -> dict[tuple[str, str], _Gateway]:
        """Gateways served, by (namespace, name); a listener port of a node cluster stays with the
        Gateway that holds it, and a newcomer's listener on that port is left out."""
        accepted: dict[tuple[str, str], _Gateway] = {}
        ports: dict[tuple[str, int], ObjectKey] = {}
        for key, obj in self._holders_first(view, "Gateway"):
            placed = self._translate_object(key, obj, out, lambda attempt: (
                self._place_gateway(view, key, attempt, ports), ()))
            if placed is None:
                continue
            attempt, (gateway, warnings, conflicts) = placed
            accepted[(key.namespace, key.name)] = gateway
            out.node_groups[key] = gateway.spec.node_cluster
            if attempt.variant == "now":
                out.conditions[key] = _accepted_conditions(_generation(obj), gateway.spec.node_cluster)
            if conflicts:
                out.conditions[key] = _partially(out.conditions[key], "PortConflict", "; ".join(conflicts)
                                                 + ". The Gateway's other listeners are served")
            if warnings:
                out.conditions[key] = _with_unresolved(out.conditions[key], "InvalidSecret", "; ".join(warnings))
        return accepted

    def _place_gateway(self, view: StoreView, key: ObjectKey, attempt: _Attempt,
                       ports: dict[tuple[str, int], ObjectKey]) -> tuple[_Gateway, list[str], list[str]]:
        spec = self._cached(("spec", key, attempt.variant), (attempt.obj,), _parse, crds.GatewaySpec, attempt.obj)
        self._gateway_secrets.update((key.namespace, secret) for listener in spec.listeners if listener.tls is not None
                                     for secret in (listener.tls.certificate_secret, listener.tls.client_ca_secret,
                                                    listener.tls.clients_trust_secret) if secret)
        given, conflicts = [], []
        for listener in spec.listeners:
            holder = ports.get((spec.node_cluster, listener.port))
            if holder is None:
                given.append(listener)
            else:
                conflicts.append(f"listener {listener.name!r} is not served: port {listener.port} is held by "
                                 f"{holder} for node cluster {spec.node_cluster!r}; pick another port")
        if not given:
            raise _Rejected("PortConflict", "; ".join(conflicts))
        tls, warnings = {}, []
        for listener in given:
            if listener.tls is not None:
                tls[listener.name] = self._tls(view, key, listener, self._gateway_min_lifetime(spec), warnings)
        for listener in given:
            ports[(spec.node_cluster, listener.port)] = key
        return _Gateway(key, spec, tls, tuple(given)), warnings, conflicts

    def _gateway_min_lifetime(self, spec: crds.GatewaySpec) -> float:
        if spec.min_certificate_lifetime is None:
            return self._min_lifetime
        return secrets.parse_duration(spec.min_certificate_lifetime)  # the model checked its pattern

    def _tls(self, view: StoreView, gateway: ObjectKey, listener: crds.Listener, min_lifetime: float,
             warnings: list[str]) -> ir.Tls:
        spec = listener.tls
        use = secrets.Use("server", listener.hostname, min_lifetime, spec.clients_trust_secret)
        certificate = self._secret(view, gateway, spec.certificate_secret, use, warnings)
        client_ca = None
        if spec.client_ca_secret is not None:
            client_ca = self._secret(view, gateway, spec.client_ca_secret, secrets.Use("client-ca"), warnings)
        return self._cached(("tls", gateway, listener.name), (certificate, client_ca), ir.Tls, certificate, client_ca)

    def _watch_validity(self, window: secrets.Window) -> None:
        """Remember the next moment a certificate in use changes validity: a translation at or after
        it must not take the EndpointSlice fast path (expiry is noticed even if nothing changed)."""
        for moment in (window.not_before.timestamp(), window.not_after.timestamp()):
            if self._now is None or moment > self._now:
                self._next_validity_change = min(self._next_validity_change, moment)

    def _secret(self, view: StoreView, user: ObjectKey, secret: str, use: secrets.Use, warnings: list[str]):
        """A Secret value that passed every check of `use`; if the current version fails one, the last
        valid version for this use, with a warning. A new version replacing a last valid one is a
        rotation: counted, and recorded for the log, once per version and user."""
        namespace, where = user.namespace, f"{user.namespace}/{secret}"
        obj = view.get("Secret", namespace, secret)
        kind = "certificate" if use.certificate else "ca"
        parse, name = ((secrets.certificate, names.certificate_secret(namespace, secret)) if use.certificate
                       else (secrets.trusted_ca, names.trusted_ca_secret(namespace, secret)))
        key = (kind, namespace, secret, use)
        previous = self._last_valid.get(key) or self._last_valid.get((kind, namespace, secret, None))
        checked = self._cached(("secret", kind, namespace, secret), (obj,), _parsed_secret, parse, obj, where, name)
        if isinstance(checked, secrets.Checked):
            trust = None
            if use.clients_trust_secret is not None:
                trust_obj = view.get("Secret", namespace, use.clients_trust_secret)
                trust = self._cached(("secret", "ca", namespace, use.clients_trust_secret), (trust_obj,),
                                     _parsed_secret, secrets.trusted_ca, trust_obj, f"{namespace}/"
                                     f"{use.clients_trust_secret}", names.trusted_ca_secret(namespace,
                                                                                           use.clients_trust_secret))
            failures = [*self._cached(("secret-use", key), (checked, previous, trust), _lasting_failures, checked, use,
                                      previous, trust, f"{namespace}/{use.clients_trust_secret}")]
            if self._now is not None and checked.window is not None:
                self._watch_validity(checked.window)
                new = previous is None or previous.content != checked.content
                failures += secrets.time_failures(checked, use, now=self._now, new=new)
        else:
            failures = list(checked.failures)
        usable = previous is not None and (self._now is None or previous.window.problem(self._now) is None)
        if previous is not None and previous.content != secrets.content(obj):
            self._cached(("rotation", key, user), (obj,), self._rotated, secrets.Rotation(
                where, f"{user.kind} {user.namespace}/{user.name}", tuple(failures),
                previous.version if failures and usable else None))
        if failures:
            message = secrets.describe(where, failures)
            if not usable:
                raise _Rejected("InvalidSecret", message, unresolved=True)
            warnings.append(f"{message}. Envoys keep the last valid version of this Secret ({previous.version}) until "
                            "it is fixed")
            self._watch_validity(previous.window)
            self._expiry[(namespace, secret, kind)] = previous.window.not_after.timestamp()
            return previous.value
        if previous is not checked:
            self._last_valid[key] = checked
            self._last_valid_objects[key] = obj
            self.remembered_changes += 1
        self._expiry[(namespace, secret, kind)] = checked.window.not_after.timestamp()
        return checked.value

    def _rotated(self, rotation: secrets.Rotation) -> None:
        self._rotations.append(rotation)
        self._rotation_totals[rotation.result, rotation.reason] += 1


def _claim_secrets(origins: dict[str, ObjectKey], key: ObjectKey, *used: ir.Certificate | ir.TrustedCa | None) -> None:
    """A Secret shared by several objects is reported on the first of them (Backends, then
    Gateways, each by namespace and name: keys sort so), whatever the order they were placed in:
    an Envoy NACK of it marks an object that uses it."""
    for secret in used:
        if secret is not None and (secret.name not in origins or key < origins[secret.name]):
            origins[secret.name] = key


def _target_listeners(gateway: _Gateway, spec: crds.BackendSpec) -> list[tuple[ObjectKey, str]]:
    names_ = [listener.name for listener in gateway.listeners]
    if spec.listener is None:
        return [(gateway.key, name) for name in names_]
    if spec.listener not in names_:
        raise _Rejected("ListenerNotFound", f"Gateway {gateway.key.namespace}/{gateway.key.name} has no listener "
                        f"{spec.listener!r} (it has: {', '.join(names_)}): fix spec.listener or leave it unset",
                        unresolved=True)
    return [(gateway.key, spec.listener)]


def _build_backend(key: ObjectKey, spec: crds.BackendSpec, service_obj: Mapping[str, Any] | None,
                   slices: list[_SliceVerdict], tls: ir.UpstreamTls | None) -> ir.Backend:
    if service_obj is None:
        raise _Rejected("ServiceNotFound", f"Service {key.namespace}/{spec.service.name} does not exist: create it, "
                        "or fix spec.service.name", unresolved=True)
    try:
        service = kube.ServiceSpec.model_validate(service_obj.get("spec") or {})
    except ValidationError as error:
        raise _Rejected("InvalidService", f"Service {key.namespace}/{spec.service.name}: "
                        f"{'; '.join(problems.explain(error, 'spec'))}: fix the Service", unresolved=True) from None
    port = next((p for p in service.ports if p.port == spec.service.port or (p.name and p.name == spec.service.port)),
                None)
    if port is None:
        offered = ", ".join(f"{p.name or '(unnamed)'}={p.port}" for p in service.ports) or "none"
        raise _Rejected("ServicePortNotFound", f"Service {key.namespace}/{spec.service.name} has no port "
                        f"{spec.service.port!r} (its ports: {offered}): fix spec.service.port", unresolved=True)
    endpoints = _endpoints(slices, port)
    return ir.Backend(name=names.cluster(key.namespace, key.name), endpoints=endpoints,
                      connect_timeout_ms=spec.connect_timeout_ms, tls=tls, **capacity.backend_fields(
                          spec, endpoints, websocket_name=names.websocket_cluster(key.namespace, key.name)))


def _endpoints(slices: list[_SliceVerdict], port: kube.ServicePort) -> tuple[ir.Endpoint, ...]:
    """Ready endpoints, and terminating-but-serving ones as draining; never not-serving ones."""
    found: dict[int, dict[str, bool]] = {}  # port number -> address -> draining
    for usable, _problem in slices:
        if usable is None:
            continue
        ports, addresses, drains = usable
        number = next((number for name, number in ports if name == port.name and number), None)
        if number is None:
            continue
        by_address = found.get(number)
        if by_address is None:
            found[number] = by_address = {}
        by_address.update(zip(addresses, drains))
    # By address and port: each pair is there once. Made by tuple.__new__, in C: a namedtuple's own
    # __new__ is a Python function, a tenth of this function's time.
    made = [_new_tuple(ir.Endpoint, (address, number, drains)) for number, by_address in found.items()
            for address, drains in sorted(by_address.items())]
    if len(found) > 1:  # slices that give the port different numbers
        made.sort()
    return tuple(made)


_new_tuple = tuple.__new__


_SliceVerdict = tuple[kube.OfferedEndpoints | None, str | None]
"""What an EndpointSlice offers (kube.OfferedEndpoints: its ports, its serving endpoints' addresses
and whether each drains), None if nothing (its address type is not IP, or its shape is wrong); and
what is wrong with it (None: nothing). Plain tuples, not the parsed model: the memo keeps one per
slice, and 10,000 parsed slices kept alive made every garbage collection of a full translation
slower than their parsing."""


def _checked_slice(raw: Mapping[str, Any]) -> _SliceVerdict:
    """The EndpointSlice without the ports and endpoints Envoy would refuse. Kubernetes stores an
    EndpointSlice port of 0, -1 or 70000 (it checks a Service's ports, not a slice's): such a part
    is left out (and reported by `_slice_problems`), the rest of the slice still serves."""
    plain = kube.plain_endpoint_slice(raw)
    if plain is not None:
        return plain, None
    return _checked_slice_by_model(raw)


def _checked_slice_by_model(raw: Mapping[str, Any]) -> _SliceVerdict:
    try:
        return _offered(kube.EndpointSlice.model_validate(raw)), None
    except ValidationError as error:
        wrong = "; ".join(problems.explain(error, ""))
    family = raw.get("addressType", "IPv4")
    parts = {field: [part for part in (raw.get(field) if isinstance(raw.get(field), list) else ())
                     if _slice_problem({"addressType": family, field: [part]}) is None]
             for field in ("ports", "endpoints")}
    try:
        return _offered(kube.EndpointSlice.model_validate({**raw, **parts})), wrong
    except ValidationError:  # its addressType or its shape itself: nothing in it can be used
        return None, wrong


def _offered(endpoint_slice: kube.EndpointSlice):
    if endpoint_slice.address_type not in ("IPv4", "IPv6"):
        return None
    addresses, drains = [], []
    for endpoint in endpoint_slice.endpoints:
        conditions = endpoint.conditions
        it_drains = kube.draining(conditions.ready, conditions.serving, conditions.terminating)
        if it_drains is not None and endpoint.addresses:
            addresses.append(endpoint.addresses[0])
            drains.append(it_drains)
    return tuple((p.name, p.port) for p in endpoint_slice.ports), tuple(addresses), tuple(drains)


def _slice_problem(raw: Mapping[str, Any]) -> str | None:
    try:
        kube.EndpointSlice.model_validate(raw)
    except ValidationError as error:
        return "; ".join(problems.explain(error, ""))
    return None


def _slice_problems(slices: list[Mapping[str, Any]], verdicts: list[_SliceVerdict]) -> tuple[str, ...]:
    """What was left out of a Backend's EndpointSlices, one sentence per slice, for its status."""
    found = []
    for raw, (_usable, wrong) in zip(slices, verdicts):
        if wrong is not None:
            name = (raw.get("metadata") or {}).get("name")
            found.append(f"EndpointSlice {name}: {wrong.lstrip('.')}: those ports or endpoints are left out (the rest "
                         "of the slice is served): fix the EndpointSlice or the controller that writes it")
    return tuple(found)


def _with_endpoints(backend: ir.Backend, endpoints: tuple[ir.Endpoint, ...], spec: crds.BackendSpec) -> ir.Backend:
    """Its budgets follow the endpoints it is given."""
    websocket_name = backend.websocket.name if backend.websocket is not None else ""
    return dataclasses.replace(backend, endpoints=endpoints,
                               **capacity.backend_fields(spec, endpoints, websocket_name=websocket_name))


def _routes(spec: crds.BackendSpec, backend: ir.Backend) -> tuple[ir.Route, ...]:
    """Built from the spec alone (the memo's input): of `backend`, only its names are read."""
    websocket = None
    if backend.websocket is not None:
        websocket = ir.WebSocketRoute(backend.websocket.name, spec.websocket.idle_timeout_seconds,
                                      spec.websocket.max_connection_duration_seconds)
    return tuple(_route(route, backend.name, websocket) for route in spec.routes)


def _listener(name: str, listener: crds.Listener, routes: tuple[ir.Route, ...],
              max_connections: int | None, tls: ir.Tls | None) -> ir.Listener:
    return ir.Listener(name=name, address=listener.address, port=listener.port, routes=routes,
                       max_connections=max_connections, tls=tls)


def _parsed_secret(parse, obj, where: str, name: str) -> secrets.Checked | secrets.SecretProblem:
    try:
        return parse(obj, where=where, name=name)
    except secrets.SecretProblem as problem:
        return problem.with_traceback(None)  # kept in the memo: without the frames it was raised through


def _lasting_failures(checked: secrets.Checked, use: secrets.Use, previous: secrets.Checked | None,
                      trust: secrets.Checked | secrets.SecretProblem | None, trust_label: str) -> list[secrets.Failure]:
    return secrets.lasting_failures(checked, use, previous=previous, clients_trust=trust, trust_label=trust_label)


def _route(route: crds.Route, backend: str, websocket: ir.WebSocketRoute | None) -> ir.Route:
    return ir.Route(backend=backend, path_prefix=route.path_prefix, path=route.path,
                    headers=tuple(ir.HeaderMatch(h.name, h.value) for h in route.headers),
                    high_priority=route.priority == crds.Priority.HIGH, websocket=websocket,
                    retries=capacity.retries(route.retries))


def _claim_routes(key: ObjectKey, routes: tuple[ir.Route, ...], targets: list[tuple[ObjectKey, str]],
                  claimed: dict[tuple[ObjectKey, str], dict[tuple, ObjectKey]]
                  ) -> tuple[dict[tuple[ObjectKey, str], list[ir.Route]], list[str]]:
    """Claim the Backend's routes on its listeners: (the routes it is given, per listener; why the
    others are not). A route another object holds stays with the holder; refused only if none is left."""
    keys = [route.match_key for route in routes]
    for position, match in enumerate(keys):
        if match in keys[:position]:
            raise _Rejected("DuplicateRoute", f"spec.routes[{position}] repeats an earlier route of this Backend "
                            f"({_describe(routes[position])}): remove one")
    given: dict[tuple[ObjectKey, str], list[ir.Route]] = {}
    conflicts: list[str] = []
    for target in targets:
        for route in routes:
            holder = claimed[target].get(route.match_key)
            if holder is None:
                given.setdefault(target, []).append(route)
            else:
                conflicts.append(f"route {_describe(route)} on listener {target[1]!r} is not served: {holder} "
                                 "already serves it; change the path or headers")
    if not given:
        raise _Rejected("RouteConflict", "; ".join(conflicts))
    for target, served in given.items():
        for route in served:
            claimed[target][route.match_key] = key
    return given, conflicts


def _describe(route: ir.Route) -> str:
    match = f"path {route.path}" if route.path is not None else f"pathPrefix {route.path_prefix}"
    headers = "".join(f", header {h.name}={h.value}" for h in route.headers)
    return match + headers


def _specificity(route: ir.Route) -> tuple:
    """Envoy takes the first matching route: exact paths, then longer prefixes, then more headers.
    A total order over a listener's routes (no two it serves have the same match): each route's
    place does not depend on the order Backends were placed in."""
    return (route.path is None, -len(route.path or route.path_prefix or ""), -len(route.headers),
            route.path or route.path_prefix or "", route.match_key[2], route.backend)


_BY_NAME = operator.attrgetter("name")


def _parse(model: type, obj: Mapping[str, Any]):
    try:
        return model.model_validate(obj.get("spec") or {})
    except ValidationError as error:
        raise _Rejected("Invalid", "; ".join(problems.explain(error, "spec"))) from None


def _remembered_endpoint(entry: Any) -> ir.Endpoint:
    """An endpoint of a saved state, checked as translation checks a slice's: what a damaged or
    edited state file holds must not reach Envoy (it would refuse the node group's endpoints)."""
    address, port, draining = entry
    problems.ip_literal(address)  # each raises a ValueError that says what is wrong
    problems.port_number(port)
    if type(draining) is not bool:
        raise ValueError(f"{problems.shown(draining)} is not true or false (whether it drains)")
    return ir.Endpoint(address, port, draining)


def _generation(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 0)


def _condition(kind: str, status: str, reason: str, message: str, generation: int) -> crds.Condition:
    # Built from values we control: no validation needed (model_construct), thousands per translation.
    return crds.Condition.model_construct(type=kind, status=status, reason=reason, message=message,
                                          observed_generation=generation)


@functools.lru_cache(maxsize=4096)
def _accepted_conditions(generation: int, node_cluster: str) -> tuple[crds.Condition, ...]:
    """The same for every accepted object of a generation and node cluster: built once, shared (frozen)."""
    return (
        _condition("Accepted", "True", "Accepted", "Valid.", generation),
        _condition("ResolvedRefs", "True", "ResolvedRefs", "Every reference resolves.", generation),
        _condition("Programmed", "Unknown", "Pending",
                   f"Waiting for the Envoys of node cluster {node_cluster!r} to accept the configuration.", generation),
    )


def _with_unresolved(conditions: tuple[crds.Condition, ...], reason: str,
                     message: str) -> tuple[crds.Condition, ...]:
    """Accepted, but a reference is not as it should be (served from its last valid version)."""
    accepted, _resolved, programmed = conditions
    return accepted, _condition("ResolvedRefs", "False", reason, message, accepted.observed_generation), programmed


def _partially(conditions: tuple[crds.Condition, ...], reason: str, message: str) -> tuple[crds.Condition, ...]:
    """Served, but not all of it: part of the object conflicts with what another object holds."""
    accepted, resolved, programmed = conditions
    return _condition("Accepted", "False", reason, message, accepted.observed_generation), resolved, programmed


def _last_accepted_conditions(obj: Mapping[str, Any], rejected: _Rejected,
                              served_generation: int) -> tuple[crds.Condition, ...]:
    """Refused as it is now; its last accepted version is still served (and programmed, or not)."""
    refused, resolved, _not_sent = _rejected_conditions(obj, rejected)
    generation = refused.observed_generation
    message = (f"{rejected.message}. Envoys keep serving generation {served_generation}, the last accepted version, "
               "until this is fixed (deleting the object removes it)")
    return (_condition("Accepted", "False", rejected.reason, message, generation), resolved,
            _condition("Programmed", "Unknown", "Pending", f"Waiting for the Envoys to accept generation "
                       f"{served_generation}, the last accepted version.", generation))


def _rejected_conditions(obj: Mapping[str, Any], rejected: _Rejected) -> tuple[crds.Condition, ...]:
    generation = _generation(obj)
    if rejected.unresolved:
        resolved = _condition("ResolvedRefs", "False", rejected.reason, rejected.message, generation)
    elif rejected.reason in _PARTIAL:  # everything it asks for is held by others: its references did resolve
        resolved = _condition("ResolvedRefs", "True", "ResolvedRefs", "Every reference resolves.", generation)
    else:  # refused before its references were looked at: saying they resolve would be a guess
        resolved = _condition("ResolvedRefs", "Unknown", "NotChecked", "References are checked once the object is "
                              "accepted: see the Accepted condition.", generation)
    return (
        _condition("Accepted", "False", rejected.reason, rejected.message, generation),
        resolved,
        _condition("Programmed", "False", "NotAccepted", "Not sent to Envoy: see the Accepted condition.", generation),
    )
