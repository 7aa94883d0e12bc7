"""Who an Envoy is, from its xDS connection: the node groups its client certificate names.

What an Envoy's request says about itself (`node.cluster`, `node.id`) is a claim: any client can
write anything there. Its identity is the client certificate of mutual-TLS xDS, which gRPC has
verified against the client CA before a request is read. The certificate names the node groups
it may see in SPIFFE-style URI SANs:

    spiffe://<trust domain>/node-group/<node group>

One certificate per node group (a Gateway's `nodeCluster`: the unit the control plane serves,
shared by every Envoy of that gateway); a certificate may name several groups. The claim in
`node.cluster` then only selects among those. This is Istio's rule for SDS (a proxy gets the
secrets of the identity it proved, never of one it names) in this project's terms; Open Service
Mesh compares the node ID with the certificate's name the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cryptography import x509

DEFAULT_TRUST_DOMAIN = "controlplane"
_GROUP_PATH = "/node-group/"
_ADMIN_PATH = "/admin"


def admin_uri(trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The URI SAN of the admin identity: who may read every Envoy's state (CSDS)."""
    return f"spiffe://{trust_domain}{_ADMIN_PATH}"


def node_group_uri(group: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The URI SAN that names `group` in a client certificate."""
    return f"spiffe://{trust_domain}{_GROUP_PATH}{group}"


@dataclass(frozen=True)
class Peer:
    """What the connection proves about a client: `groups` is None when it proves nothing
    (plaintext, or TLS without a client certificate)."""

    description: str
    groups: frozenset[str] | None
    admin: bool = False

    def may_see(self, group: str) -> bool:
        return self.groups is None or group in self.groups


ANONYMOUS = Peer("no client certificate", None)


def peer_of(auth_context: dict, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Peer:
    """The peer of a gRPC call, from `context.auth_context()` (values are lists of bytes)."""
    pems = auth_context.get("x509_pem_cert") or auth_context.get(b"x509_pem_cert")
    if not pems:
        return ANONYMOUS
    subject, uris = _names(bytes(pems[0]))
    prefix = f"spiffe://{trust_domain}{_GROUP_PATH}"
    groups = frozenset(uri[len(prefix):] for uri in uris
                       if uri.startswith(prefix) and uri[len(prefix):] and "/" not in uri[len(prefix):])
    shown = ", ".join(uris) if uris else "no URI SAN"
    return Peer(f"certificate {subject} ({shown})", groups, admin=admin_uri(trust_domain) in uris)


@functools.lru_cache(maxsize=1024)  # a fleet's Envoys present few certificates; parsed once each
def _names(pem: bytes) -> tuple[str, tuple[str, ...]]:
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(alternative.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    return certificate.subject.rfc4514_string() or "without a subject", uris
