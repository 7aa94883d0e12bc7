"""TLS Secrets, checked before any Envoy sees them. Pure: the time to check against is an argument.

This is the check a bad rotation meets before it can break mutual TLS for every client (the
second outage: a service secret rotated to a wrong value, agents locked out for 1.5 hours). One
code path serves a listener's certificate, a Backend's client certificate and `controlplane
check-secret`, in three layers, so that translation can cache what does not change:
- `certificate` / `trusted_ca` (per Secret version): the parts parse and fit together: PEM, a
  private key that is not encrypted and matches the certificate, a key Envoy loads, the chain
  (leaf, then the intermediates in tls.crt) verifying to the same Secret's ca.crt when it has one.
- `lasting_failures` (per use): what the user needs and time does not change: the listener's
  hostname, the extended key usage of the use (serverAuth for a listener, clientAuth upstream),
  key usage that lets the key sign a handshake, and trust continuity: the certificate chains to
  what its clients trust (`clientsTrustSecret`) or, without it, to what the last valid version
  listed in its ca.crt; a client CA bundle keeps every CA the last valid one had, unless the
  Secret names the drop (annotation `DROP_CAS_ANNOTATION`). Dropping a CA is refused even when no
  connected client uses it: the control plane does not know which clients connect (a
  conservative reading of "a CA which issued certificates of currently connected clients").
- `time_failures` (every translation): valid now, and a new version lasts at least the minimum
  remaining lifetime (the version already served is kept until it expires).
Each failure names its check (the counter's `reason`) and says what to do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.ir import types as ir

DEFAULT_MIN_LIFETIME = 24 * 3600.0
DROP_CAS_ANNOTATION = "xds.controlplane.dev/drop-cas"
"""On a client CA Secret: the SHA-256 fingerprints (hex, separated by commas or spaces) of the CAs
the new ca.crt may drop; without it, a new bundle must keep every CA of the last valid one."""
PARTS = ("tls.crt", "tls.key", "ca.crt")


@dataclass(frozen=True)
class Failure:
    """One failed check: `check` is its name (the counter's reason), `text` what is wrong and what to do."""

    check: str
    text: str


def describe(where: str, failures: Sequence[Failure]) -> str:
    return "; ".join(f"Secret {where}{'' if f.text.startswith(_ABOUT_THE_SECRET) else ':'} {f.text} (check {f.check})"
                     for f in failures)


_ABOUT_THE_SECRET = ("does not exist", "is of type", "has no ")  # "Secret x does not exist", not "Secret x: does ..."


class SecretProblem(ValueError):
    """A Secret that must not be served; the message says what is wrong and what to do."""

    def __init__(self, where: str, failures: Sequence[Failure]):
        super().__init__(describe(where, failures))
        self.failures = tuple(failures)


@dataclass(frozen=True)
class Rotation:
    """A new version of a Secret, judged for one object that uses it, replacing a last valid one."""

    secret: str  # namespace/name
    user: str  # "Gateway shop/edge"
    failures: tuple[Failure, ...]
    served: str | None  # the version Envoys keep after a refusal; None when none is left

    @property
    def result(self) -> str:
        return "refused" if self.failures else "accepted"

    @property
    def reason(self) -> str:
        return self.failures[0].check if self.failures else "Valid"

    def log_line(self) -> str:
        if not self.failures:
            return f"Secret {self.secret}: rotation accepted for {self.user}"
        kept = (f"Envoys keep serving the last valid version ({self.served})" if self.served is not None
                else "no valid version is left to serve, so what uses it is refused")
        return (f"Secret {self.secret}: rotation refused for {self.user}, check "
                f"{', '.join(f.check for f in self.failures)} failed: {'; '.join(f.text for f in self.failures)}; "
                f"{kept}")


@dataclass(frozen=True)
class Use:
    """What a Secret is used for, and what that user requires of it (a hashable key: the last
    valid version is kept per Secret and use)."""

    purpose: str  # "server" (a listener's certificate), "client" (upstream), "client-ca", "upstream-ca"
    hostname: str | None = None
    min_lifetime: float = DEFAULT_MIN_LIFETIME
    clients_trust_secret: str | None = None

    @property
    def certificate(self) -> bool:
        return self.purpose in ("server", "client")

    def as_json(self) -> dict[str, Any]:
        return {"purpose": self.purpose, "hostname": self.hostname, "minLifetime": self.min_lifetime,
                "clientsTrustSecret": self.clients_trust_secret}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Use:
        return cls(data["purpose"], data.get("hostname"), float(data.get("minLifetime", DEFAULT_MIN_LIFETIME)),
                   data.get("clientsTrustSecret"))


@dataclass(frozen=True)
class Window:
    """When the certificates of a Secret may be used, and the sentences to say when they may not."""

    not_before: datetime
    not_after: datetime
    where: str
    key: str

    def problem(self, now: float) -> str | None:
        failure = self.failure(now)
        return None if failure is None else f"Secret {self.where}: {failure.text}"

    def failure(self, now: float) -> Failure | None:
        moment = datetime.fromtimestamp(now, timezone.utc)
        if self.not_after <= moment:
            return Failure("Expired", f"the certificate in {self.key} expired on {self.not_after:%Y-%m-%d %H:%M} UTC; "
                           "renew it")
        if self.not_before > moment:
            return Failure("NotYetValid", f"the certificate in {self.key} is not valid before "
                           f"{self.not_before:%Y-%m-%d %H:%M} UTC: issue one valid now (or fix the issuer's clock)")
        return None


@dataclass(frozen=True, eq=False)
class Checked:
    """A Secret version whose parts parse and fit together; whether it suits a use, and whether it
    is valid *now*, is for `lasting_failures` and `time_failures` to say."""

    value: ir.Certificate | ir.TrustedCa | None
    window: Window | None
    chain: tuple[x509.Certificate, ...] = ()  # tls.crt, leaf first
    authorities: tuple[x509.Certificate, ...] = ()  # ca.crt
    content: tuple = ()  # what makes two versions the same version
    version: str = ""  # the version in words, for log lines
    allowed_drops: frozenset[str] = field(default_factory=frozenset)
    key_kind: str = ""


def content(secret: Mapping[str, Any] | None) -> tuple:
    if secret is None:
        return ()
    data = secret.get("data") if isinstance(secret.get("data"), Mapping) else {}
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    return (secret.get("type"), tuple(sorted((str(k), str(v)) for k, v in data.items())),
            str(annotations.get(DROP_CAS_ANNOTATION, "")) if isinstance(annotations, Mapping) else "")


def certificate(secret: Mapping[str, Any] | None, *, where: str, name: str) -> Checked:
    """A kubernetes.io/tls Secret's parts, parsed and checked together; raises SecretProblem."""
    if secret is None:
        raise SecretProblem(where, [Failure("NotFound", "does not exist: create it (kubectl create secret tls), or "
                                            "fix the name")])
    if secret.get("type") != "kubernetes.io/tls":
        kind = secret.get("type") or "Opaque"
        raise SecretProblem(where, [Failure("WrongType", f"is of type {kind!r}: a certificate needs a "
                                            "kubernetes.io/tls Secret (kubectl create secret tls)")])
    failures: list[Failure] = []
    parts = {part: _data(secret, part, failures, required=part != "ca.crt") for part in PARTS}
    checked = certificate_parts(parts["tls.crt"], parts["tls.key"], parts["ca.crt"], failures, where=where, name=name)
    if failures:
        raise SecretProblem(where, failures)
    return _versioned(checked, secret)


def trusted_ca(secret: Mapping[str, Any] | None, *, where: str, name: str) -> Checked:
    """A Secret with CA certificates in ca.crt; raises SecretProblem."""
    if secret is None:
        raise SecretProblem(where, [Failure("NotFound", "does not exist: create it with the CA certificate in "
                                            "ca.crt, or fix the name")])
    failures: list[Failure] = []
    pem = _data(secret, "ca.crt", failures, required=True)
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    drops = annotations.get(DROP_CAS_ANNOTATION, "") if isinstance(annotations, Mapping) else ""
    checked = bundle_parts(pem, failures, where=where, name=name, allowed_drops=_fingerprints(str(drops)))
    if failures:
        raise SecretProblem(where, failures)
    return _versioned(checked, secret)


def certificate_parts(chain_pem: bytes | None, key_pem: bytes | None, ca_pem: bytes | None, failures: list[Failure],
                      *, where: str = "", name: str = "", labels: Mapping[str, str] | None = None) -> Checked:
    """The checks of a certificate's own parts, appending to `failures` every one that fails (so a
    pipeline sees them all at once); `labels` names the parts in messages (files, for the CLI)."""
    label = {part: part for part in PARTS} | dict(labels or {})
    chain = _certificates(chain_pem, label["tls.crt"], failures) if chain_pem is not None else []
    authorities = _certificates(ca_pem, label["ca.crt"], failures) if ca_pem is not None else []
    key = _private_key(key_pem, label["tls.key"], failures) if key_pem is not None else None
    window = None
    if chain:
        leaf = chain[0]
        if key is not None and _public_der(key.public_key()) != _public_der(leaf.public_key()):
            failures.append(Failure("KeyMismatch", f"{label['tls.key']} does not match the certificate in "
                                    f"{label['tls.crt']} (subject {_subject(leaf)}); put the key that was issued "
                                    "with this certificate"))
        unsupported = _key_envoy_refuses(leaf.public_key())
        if unsupported is not None:
            failures.append(Failure("KeyType", f"the certificate in {label['tls.crt']} has {unsupported}, which Envoy "
                                    "cannot load; issue one with an RSA key of 2048 bits or more, or an ECDSA key on "
                                    "P-256, P-384 or P-521"))
        if authorities and not _reaches(chain, authorities):
            failures.append(Failure("Chain", f"the certificate in {label['tls.crt']} (issued by {_issuer(chain)}) "
                                    f"does not chain to {label['ca.crt']} of the same Secret "
                                    f"({', '.join(map(_subject, authorities))}): put its issuing CA in "
                                    f"{label['ca.crt']}, and its intermediates in {label['tls.crt']} after it"))
        window = _window(chain, where, label["tls.crt"])
    value = None
    if chain_pem is not None and key_pem is not None:
        value = ir.Certificate(name=name, certificate_chain=chain_pem, private_key=key_pem)
    return Checked(value, window, tuple(chain), tuple(authorities), key_kind=_key_kind(key))


def bundle_parts(pem: bytes | None, failures: list[Failure], *, where: str = "", name: str = "",
                 allowed_drops: frozenset[str] = frozenset(), label: str = "ca.crt") -> Checked:
    authorities = _certificates(pem, label, failures) if pem is not None else []
    for authority in authorities:
        try:
            is_ca = authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            failures.append(Failure("NotACa", f"{label} holds {_subject(authority)}, which is not a CA certificate; "
                                    "put the CA that issues the certificates to trust"))
    window = _window(authorities, where, label) if authorities else None
    value = ir.TrustedCa(name=name, certificates=pem) if pem is not None else None
    return Checked(value, window, authorities=tuple(authorities), allowed_drops=allowed_drops)


def lasting_failures(checked: Checked, use: Use, *, previous: Checked | None = None,
                     clients_trust: Checked | SecretProblem | None = None, trust_label: str = "") -> list[Failure]:
    """What `use` requires of a version that time does not change. `previous`: the last valid
    version for this use; `clients_trust`: the parsed `clientsTrustSecret`, when the use has one."""
    if not use.certificate:
        return _dropped_authorities(checked, previous) if use.purpose == "client-ca" else []
    if not checked.chain:
        return []
    leaf, found, crt = checked.chain[0], [], _label(checked)
    if use.hostname is not None and not _covers(leaf, use.hostname):
        found.append(Failure("Hostname", f"the certificate in {crt} covers {_dns_names(leaf)}, not "
                             f"{use.hostname} (the listener's hostname), so clients would refuse it; issue one "
                             f"with {use.hostname} in its DNS subjectAltNames"))
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if use.purpose == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    usages = _extension(leaf, x509.ExtendedKeyUsage)
    if usages is not None and wanted not in usages:
        allowed = ", ".join(_EKU_NAMES.get(u, u.dotted_string) for u in usages) or "nothing"
        who = "a listener's clients require" if use.purpose == "server" else "the Backend's endpoints require"
        found.append(Failure("ExtendedKeyUsage", f"the certificate in {crt} allows {allowed} (extended key usage), "
                             f"not {_EKU_NAMES[wanted]}, which {who}; issue it with {_EKU_NAMES[wanted]}"))
    key_usage = _extension(leaf, x509.KeyUsage)
    if key_usage is not None and not key_usage.digital_signature:
        found.append(Failure("KeyUsage", f"the certificate in {crt} has key usage without digitalSignature, which "
                             f"a TLS handshake needs to sign with its {checked.key_kind or 'private'} key; issue it "
                             "with digitalSignature"))
    if use.clients_trust_secret is not None:
        found.extend(_clients_trust_failures(checked, clients_trust, trust_label or use.clients_trust_secret))
    elif previous is not None and previous.content != checked.content:
        found.extend(_continuity_failures(checked, previous))
    return found


def time_failures(checked: Checked, use: Use, *, now: float, new: bool) -> list[Failure]:
    """Valid at `now`; and when the version is `new` (not the one already served), a certificate
    lasts at least the use's minimum remaining lifetime."""
    if checked.window is None:
        return []
    failure = checked.window.failure(now)
    if failure is not None:
        return [failure]
    left = checked.window.not_after.timestamp() - now
    if new and use.certificate and left < use.min_lifetime:
        return [Failure("ExpiresSoon", f"the certificate in {checked.window.key} expires on "
                        f"{checked.window.not_after:%Y-%m-%d %H:%M} UTC, in {format_duration(left)}, under the "
                        f"minimum remaining lifetime of {format_duration(use.min_lifetime)}; issue one that lasts "
                        "longer (the version served now is kept)")]
    return []


_DURATION = re.compile(r"^(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,6})s)?$")
DURATION_PATTERN = _DURATION.pattern


def parse_duration(text: str) -> float:
    """Seconds in `24h`, `90m`, `1h30m` or `0s`; ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"{text!r} is not a duration such as 24h, 90m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600.0 + minutes * 60.0 + seconds


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h" + (f" {seconds % 3600 // 60} min" if seconds % 3600 >= 60 else "")
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"


def fingerprint(certificate_: x509.Certificate) -> str:
    return hashlib.sha256(certificate_.public_bytes(serialization.Encoding.DER)).hexdigest()


def _versioned(checked: Checked, secret: Mapping[str, Any]) -> Checked:
    resource_version = (secret.get("metadata") or {}).get("resourceVersion")
    if checked.chain:
        leaf = checked.chain[0]
        words = (f"certificate {_subject(leaf)} serial {leaf.serial_number:x}, valid until "
                 f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    else:
        words = f"ca.crt of {', '.join(map(_subject, checked.authorities))}"
    if resource_version:
        words = f"resourceVersion {resource_version}: {words}"
    return Checked(checked.value, checked.window, checked.chain, checked.authorities, content(secret), words,
                   checked.allowed_drops, checked.key_kind)


def _data(secret: Mapping[str, Any], key: str, failures: list[Failure], *, required: bool) -> bytes | None:
    data = secret.get("data")
    value = data.get(key) if isinstance(data, Mapping) else None
    if not value:
        if required:
            failures.append(Failure("Unreadable", f"has no {key}"))
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        failures.append(Failure("Unreadable", f"{key} is not base64 (Secret data must be)"))
        return None


def _certificates(pem: bytes, label: str, failures: list[Failure]) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(pem)
    except ValueError:
        found = []
    if not found:
        failures.append(Failure("Unreadable", f"{label} holds no PEM certificate (empty, truncated or not PEM): put "
                                "the whole PEM certificate there"))
    return found


def _private_key(pem: bytes, label: str, failures: list[Failure]):
    if b"ENCRYPTED" in pem and b"PRIVATE KEY" in pem:
        failures.append(Failure("EncryptedKey", f"{label} is an encrypted private key, which Envoy cannot load: "
                                "decrypt it (openssl pkey -in key.pem -out plain.pem) and put the plain key there"))
        return None
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        failures.append(Failure("EncryptedKey", f"{label} is an encrypted private key, which Envoy cannot load: "
                                "decrypt it (openssl pkey -in key.pem -out plain.pem) and put the plain key there"))
    except (ValueError, UnsupportedAlgorithm):
        if b"-----BEGIN CERTIFICATE-----" in pem:
            failures.append(Failure("NotAKey", f"{label} holds a certificate, not a private key: put the private key "
                                    "there (the certificate goes in tls.crt)"))
        else:
            failures.append(Failure("NotAKey", f"{label} is not a PEM private key (empty, truncated or garbage): put "
                                    "the private key issued with the certificate"))
    return None


def _window(certificates: Sequence[x509.Certificate], where: str, key: str) -> Window:
    return Window(not_before=max(c.not_valid_before_utc for c in certificates),
                  not_after=min(c.not_valid_after_utc for c in certificates), where=where, key=key)


def _issued_by(certificate_: x509.Certificate, issuer: x509.Certificate) -> bool:
    if certificate_.issuer != issuer.subject:
        return False
    try:
        certificate_.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _reaches(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]) -> bool:
    """Whether the leaf, through the intermediates that follow it (in any order), is issued by an anchor."""
    current, pool = chain[0], list(chain[1:])
    for _ in range(len(chain)):  # each step uses up one intermediate
        if any(current == anchor or _issued_by(current, anchor) for anchor in anchors):
            return True
        following = next((c for c in pool if _issued_by(current, c)), None)
        if following is None:
            return False
        pool.remove(following)
        current = following
    return False


def _clients_trust_failures(checked: Checked, trust: Checked | SecretProblem | None, label: str) -> list[Failure]:
    if not isinstance(trust, Checked):
        why = str(trust) if trust is not None else f"Secret {label} is missing"
        return [Failure("ClientsTrust", f"what the listener's clients trust cannot be read ({why}): fix "
                        "tls.clientsTrustSecret or that Secret")]
    if _reaches(checked.chain, trust.authorities):
        return []
    return [Failure("ClientsTrust", f"the certificate in {_label(checked)} (issued by {_issuer(checked.chain)}) "
                    "does not chain "
                    f"to what the listener's clients trust ({label}: {', '.join(map(_subject, trust.authorities))}); "
                    "give clients the new CA first (add it to that Secret), then rotate")]


def _label(checked: Checked) -> str:
    return checked.window.key if checked.window is not None else "tls.crt"


def _continuity_failures(checked: Checked, previous: Checked) -> list[Failure]:
    """Without `clientsTrustSecret`, the last valid version tells what clients trust: its ca.crt,
    or, when it had none, its issuer."""
    if not previous.chain:
        return []
    if previous.authorities:
        if _reaches(checked.chain, previous.authorities):
            return []
        trusted = ", ".join(map(_subject, previous.authorities))
    elif _issuer(checked.chain) == _issuer(previous.chain):
        return []
    else:
        trusted = _issuer(previous.chain)
    return [Failure("NewIssuer", f"the certificate in {_label(checked)} moves to issuer {_issuer(checked.chain)}, "
                    "which the "
                    f"last valid version did not list in its ca.crt (it trusted {trusted}), so clients may not "
                    "trust it yet: first add the new CA to ca.crt keeping the certificate, let clients take it, "
                    "then rotate the certificate (or declare tls.clientsTrustSecret)")]


def _dropped_authorities(checked: Checked, previous: Checked | None) -> list[Failure]:
    if previous is None:
        return []
    kept = {_identity(a) for a in checked.authorities}
    found = []
    for authority in previous.authorities:
        print_ = fingerprint(authority)
        if _identity(authority) not in kept and print_ not in checked.allowed_drops:
            found.append(Failure("CaDropped", f"ca.crt no longer has the CA {_subject(authority)}, which the last "
                                 "valid version trusted: clients with certificates it issued would be refused. Keep "
                                 "it until they have new certificates, or drop it on purpose: annotate the Secret "
                                 f"{DROP_CAS_ANNOTATION}={print_}"))
    return found


def _identity(certificate_: x509.Certificate) -> tuple[bytes, bytes]:
    """A CA renewed with the same name and key is the same CA to its clients' certificates."""
    return certificate_.subject.public_bytes(), _public_der(certificate_.public_key())


def _fingerprints(text: str) -> frozenset[str]:
    return frozenset(part.replace(":", "").lower() for part in re.split(r"[\s,]+", text) if part)


def _extension(certificate_: x509.Certificate, kind: type):
    try:
        return certificate_.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:  # a malformed extension: as if it had none, the other checks still run
        return None


def _dns_names(certificate_: x509.Certificate) -> str:
    names = _extension(certificate_, x509.SubjectAlternativeName)
    found = names.get_values_for_type(x509.DNSName) if names is not None else []
    return ", ".join(found) if found else "no DNS name"


def _covers(certificate_: x509.Certificate, hostname: str) -> bool:
    """Whether a DNS subjectAltName covers `hostname` as a TLS client checks it (a wildcard covers
    one leftmost label; a listener's wildcard hostname only by the same wildcard)."""
    names = _extension(certificate_, x509.SubjectAlternativeName)
    host = hostname.lower().rstrip(".")
    for name in (names.get_values_for_type(x509.DNSName) if names is not None else []):
        name = name.lower().rstrip(".")
        if name == host or (name.startswith("*.") and not host.startswith("*.")
                            and host.partition(".")[2] == name[2:] and host.partition(".")[0]):
            return True
    return False


_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
              ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning", ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
              ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping", ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning"}


def _subject(certificate_: x509.Certificate) -> str:
    return certificate_.subject.rfc4514_string() or "(no subject)"


def _issuer(chain: Sequence[x509.Certificate]) -> str:
    return chain[-1].issuer.rfc4514_string() or "(no name)"


def _key_kind(key) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return ""


_ENVOY_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def _key_envoy_refuses(public_key) -> str | None:
    """The kind of a certificate key Envoy 1.40 refuses to load ("only RSA certificates with 2048-bit
    or larger keys are supported"; ECDSA on the NIST curves only), or None when it loads it."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return None if public_key.key_size >= 2048 else f"a {public_key.key_size}-bit RSA key"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return None if public_key.curve.name in _ENVOY_CURVES else f"an ECDSA key on curve {public_key.curve.name}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return None
    return f"a {type(public_key).__name__.removeprefix('_')} key"


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
