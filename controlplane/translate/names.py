"""Names of the Envoy resources we emit: one module, so every name is made the same way.

Names carry the Kubernetes namespace and object name, so an Envoy NACK or a stat names the
object a user can fix (`cluster.default/api.upstream_rq_pending_overflow`).

The invariant: two different objects never get the same Envoy name of one resource type. Envoy
keys each type by name, so a collision would silently replace one object's cluster, listener or
secret with another's. It holds because
- every name is its parts joined by '/', and no part holds a '/': Kubernetes names and
  namespaces are DNS-1123 (lowercase letters, digits, '-', '.'), and so are our listener names
  (a DNS label); so the parts of a name are recovered by splitting it on '/';
- within one resource type, the names of different kinds of object differ in the number of
  their parts or in a fixed last part: a cluster has two parts (namespace, Backend), a WebSocket
  cluster three ending in `websocket`; a certificate three ending in `certificate`, a CA three
  ending in `ca`. Listeners and route configurations are one kind each, of three parts.
A name made from a part with a '/' (`cluster("shop", "api/websocket")`) could collide, and
`collide` says so; `part_problem` says which parts are unsafe, for whoever accepts names from a
source other than the Kubernetes API, which enforces DNS-1123 (a manifest file).
"""

from __future__ import annotations

from collections.abc import Callable

SEPARATOR = "/"


def cluster(namespace: str, backend: str) -> str:
    return f"{namespace}/{backend}"


def websocket_cluster(namespace: str, backend: str) -> str:
    """Cannot collide with `cluster`: it has three parts, a cluster two (see the module's invariant)."""
    return f"{namespace}/{backend}/websocket"


def listener(namespace: str, gateway: str, listener_name: str) -> str:
    return f"{namespace}/{gateway}/{listener_name}"


def route_configuration(namespace: str, gateway: str, listener_name: str) -> str:
    """The listener's own name: an RDS name is another resource type, so they cannot collide."""
    return listener(namespace, gateway, listener_name)


def certificate_secret(namespace: str, secret: str) -> str:
    return f"{namespace}/{secret}/certificate"


def trusted_ca_secret(namespace: str, secret: str) -> str:
    return f"{namespace}/{secret}/ca"


RESOURCE_TYPES: dict[Callable[..., str], str] = {
    cluster: "cluster", websocket_cluster: "cluster", listener: "listener", route_configuration: "route",
    certificate_secret: "secret", trusted_ca_secret: "secret",
}
"""The Envoy resource type each naming function names: names collide only within one type."""

Named = tuple[Callable[..., str], tuple[str, ...]]
"""One object's name, as the naming function and its arguments: (names.cluster, ("shop", "api"))."""


def collide(first: Named, second: Named) -> bool:
    """Whether two different objects get the same Envoy name of the same resource type.

    Never when every part is safe (`part_problem` is None for each): the module's invariant."""
    (make_first, parts_first), (make_second, parts_second) = first, second
    if make_first is make_second and tuple(parts_first) == tuple(parts_second):
        return False  # one object, named twice
    return (RESOURCE_TYPES[make_first] == RESOURCE_TYPES[make_second]
            and make_first(*parts_first) == make_second(*parts_second))


def part_problem(part: str) -> str | None:
    """Why `part` could make one object's Envoy name another's (None when it cannot)."""
    if SEPARATOR in part:
        return f"holds {SEPARATOR!r}, which separates the parts of Envoy resource names"
    return None
