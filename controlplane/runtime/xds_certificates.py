"""The certificates of mutual-TLS xDS: a CA, the control plane's server certificate, and one
client certificate per node group, whose URI SAN is the identity the xDS server authorizes
(xds/identity.py). `controlplane certs` writes them; the demo makes a set on the spot.

ECDSA P-256 keys (what Envoy and gRPC handshake fastest with); leaf certificates carry the
extended key usage of their side only, so a client certificate cannot serve xDS and the server's
cannot pose as an Envoy. Validity starts an hour back: clocks across a cluster differ.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.xds.identity import DEFAULT_TRUST_DOMAIN, admin_uri, node_group_uri

CA_DAYS = 3650
LEAF_DAYS = 365
_SKEW = timedelta(hours=1)


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes


def new_ca(common_name: str = "controlplane xDS CA", *, days: int = CA_DAYS) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (_base(name, name, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(signs_certificates=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return Pair(_pem(builder.sign(key, hashes.SHA256())), _key_pem(key))


def server_certificate(ca: Pair, names: list[str], *, days: int = LEAF_DAYS) -> Pair:
    """For the control plane: `names` are the DNS names (or IP addresses) Envoys connect to."""
    alternatives = [_general_name(name) for name in names]
    return _leaf(ca, names[0], alternatives, ExtendedKeyUsageOID.SERVER_AUTH, days)


def client_certificate(ca: Pair, group: str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                       days: int = LEAF_DAYS) -> Pair:
    """For the Envoys of node group `group`: its URI SAN is their identity."""
    uri = x509.UniformResourceIdentifier(node_group_uri(group, trust_domain))
    return _leaf(ca, group, [uri], ExtendedKeyUsageOID.CLIENT_AUTH, days)


def admin_certificate(ca: Pair, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, days: int = LEAF_DAYS) -> Pair:
    """For whoever may read every Envoy's state over CSDS (`controlplane status` tools, grpcurl)."""
    return _leaf(ca, "admin", [x509.UniformResourceIdentifier(admin_uri(trust_domain))],
                 ExtendedKeyUsageOID.CLIENT_AUTH, days)


def certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _leaf(ca: Pair, common_name: str, alternatives: list[x509.GeneralName], usage, days: int) -> Pair:
    ca_cert = certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    builder = (_base(name, ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(signs_certificates=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    return Pair(_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key))


def _base(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.now(timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW).not_valid_after(now + timedelta(days=days)))


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=signs_certificates,
                         crl_sign=signs_certificates, encipher_only=False, decipher_only=False)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
