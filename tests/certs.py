"""Certificates for tests, made on the spot with `cryptography`: a CA, server and client certs."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: object  # a private key of any kind cryptography makes

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(common_name: str, *, issuer: Issued | None = None, ca: bool = False, client: bool = False,
          valid_days: float = 30, starts_days_ago: float = 1, dns_names: tuple[str, ...] = ("localhost",),
          key=None, extended_usages: tuple | None = None, key_usage: x509.KeyUsage | None = None) -> Issued:
    """A certificate for `key` (a new ECDSA P-256 key by default), signed by `issuer` or by itself;
    `extended_usages` replaces the serverAuth (or, `client`, clientAuth) extended key usage."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(issuer.certificate.subject if issuer else _name(common_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=starts_days_ago))
               .not_valid_after(now - timedelta(days=starts_days_ago) + timedelta(days=valid_days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_usages or [usage])), critical=False)
        if not client:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [*map(x509.DNSName, dns_names), x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    signer = issuer.key if issuer else key
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()  # Ed25519 hashes itself
    return Issued(builder.sign(signer, algorithm), key)


def tls_secret(name: str, cert_pem: bytes, key_pem: bytes, *, namespace: str = "shop",
               secret_type: str = "kubernetes.io/tls", ca_pem: bytes | None = None) -> dict:
    data = {"tls.crt": base64.b64encode(cert_pem).decode(), "tls.key": base64.b64encode(key_pem).decode()}
    if ca_pem is not None:
        data["ca.crt"] = base64.b64encode(ca_pem).decode()
    return {"apiVersion": "v1", "kind": "Secret", "type": secret_type,
            "metadata": {"name": name, "namespace": namespace}, "data": data}


def ca_secret(name: str, ca_pem: bytes, *, namespace: str = "shop", annotations: dict | None = None) -> dict:
    metadata = {"name": name, "namespace": namespace, **({"annotations": annotations} if annotations else {})}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata,
            "data": {"ca.crt": base64.b64encode(ca_pem).decode()}}


def encrypted_key_pem(issued: Issued, password: bytes = b"secret") -> bytes:
    """The key as a real passphrase-protected PEM (what `openssl pkey -aes256` writes)."""
    return issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(password))


@dataclass(frozen=True)
class MutualTlsWorld:
    """A listener's certificate Secret (`edge-cert`: tls.crt from `server_ca`, which its ca.crt
    lists), its client CA Secret (`agents`) and what clients hold: the postmortem's setup."""

    hostname: str = "edge.example.test"
    server_ca: Issued = field(default_factory=lambda: issue("edge server CA", ca=True))
    agents_ca: Issued = field(default_factory=lambda: issue("agents CA", ca=True))

    def server(self, **options) -> Issued:
        return issue(self.hostname, issuer=options.pop("issuer", self.server_ca),
                     dns_names=options.pop("dns_names", (self.hostname,)), **options)

    def certificate_secret(self, issued: Issued, *, key_pem: bytes | None = None, ca_pem: bytes | None = None,
                           cert_pem: bytes | None = None) -> dict:
        return tls_secret("edge-cert", issued.cert_pem if cert_pem is None else cert_pem,
                          issued.key_pem if key_pem is None else key_pem,
                          ca_pem=self.server_ca.cert_pem if ca_pem is None else ca_pem)

    def agents_secret(self, *cas: Issued, annotations: dict | None = None) -> dict:
        return ca_secret("agents", b"".join(ca.cert_pem for ca in (cas or (self.agents_ca,))), annotations=annotations)


@dataclass(frozen=True)
class BadRotation:
    name: str
    check: str  # the check that must refuse it
    secret: dict  # replaces the Secret of the same name


def bad_rotations(world: MutualTlsWorld) -> list[BadRotation]:
    """Every bad rotation of the postmortem kind, each one Secret replacing a good one in `world`."""
    good = world.server()
    other_ca = issue("some other CA", ca=True)
    new_ca = issue("a new CA clients do not trust yet", ca=True)
    from_new = world.server(issuer=new_ca)
    half = len(good.cert_pem) // 2
    weak = world.server(key=rsa.generate_private_key(65537, 1024))
    no_signing = world.server(key_usage=x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=True, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False))
    cert = world.certificate_secret
    cases = [
        ("key not matching", "KeyMismatch", cert(good, key_pem=issue("x").key_pem)),
        ("key that is a certificate", "NotAKey", cert(good, key_pem=good.cert_pem)),
        ("empty certificate", "Unreadable", cert(good, cert_pem=b"")),
        ("truncated certificate PEM", "Unreadable", cert(good, cert_pem=good.cert_pem[:half])),
        ("truncated key PEM", "NotAKey", cert(good, key_pem=good.key_pem[:len(good.key_pem) // 2])),
        ("encrypted key", "EncryptedKey", cert(good, key_pem=encrypted_key_pem(good))),
        ("expired", "Expired", cert(world.server(valid_days=1, starts_days_ago=3))),
        ("not yet valid", "NotYetValid", cert(world.server(starts_days_ago=-2))),
        ("expiring within the minimum", "ExpiresSoon", cert(world.server(valid_days=1.5, starts_days_ago=1))),
        ("wrong hostname", "Hostname", cert(world.server(dns_names=("other.example.test",)))),
        ("wrong extended key usage", "ExtendedKeyUsage",
         cert(world.server(extended_usages=(ExtendedKeyUsageOID.CLIENT_AUTH,)))),
        ("key usage without digitalSignature", "KeyUsage", cert(no_signing)),
        ("issuer not in its own ca.crt", "Chain", cert(world.server(issuer=other_ca))),
        ("a new issuer clients do not trust", "NewIssuer", cert(from_new, ca_pem=new_ca.cert_pem)),
        ("RSA under 2048 bits", "KeyType", cert(weak)),
        ("client CA bundle dropping the CA in use", "CaDropped", world.agents_secret(issue("agents CA 2", ca=True))),
    ]
    return [BadRotation(*case) for case in cases]
