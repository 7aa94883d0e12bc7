"""TLS Secrets, checked before any Envoy sees them. Pure: the time to check against is an argument.

A certificate Secret must be `kubernetes.io/tls`, with a PEM certificate chain in tls.crt and the
matching, unencrypted PEM private key in tls.key, of a kind Envoy loads, valid now (parsing is
done once per Secret; the validity window is checked on every translation, with the time given).
A CA Secret (the client CA of mutual TLS, or the CA of a Backend's endpoints) needs PEM CA
certificates in ca.crt, valid now. Each problem is one sentence naming the Secret, the key and
what to do: this is the check a bad rotation meets before it can break mTLS for every client.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from controlplane.ir import types as ir


class SecretProblem(ValueError):
    """A Secret that must not be served; the message says what is wrong and what to do."""


def certificate(secret: Mapping[str, Any] | None, *, where: str, name: str) -> Checked:
    if secret is None:
        raise SecretProblem(f"Secret {where} does not exist: create it (kubectl create secret tls), or fix the name")
    if secret.get("type") != "kubernetes.io/tls":
        raise SecretProblem(f"Secret {where} is of type {secret.get('type') or 'Opaque'!r}: a certificate needs a "
                            "kubernetes.io/tls Secret (kubectl create secret tls)")
    chain_pem, key_pem = _data(secret, where, "tls.crt"), _data(secret, where, "tls.key")
    chain = _certificates(chain_pem, where, "tls.crt")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SecretProblem(f"Secret {where}: tls.key is not an unencrypted PEM private key") from None
    leaf = chain[0]
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise SecretProblem(f"Secret {where}: tls.key does not match the certificate in tls.crt (subject "
                            f"{leaf.subject.rfc4514_string()}); put the key that was issued with this certificate")
    unsupported = _key_envoy_refuses(leaf.public_key())
    if unsupported is not None:
        raise SecretProblem(f"Secret {where}: the certificate in tls.crt has {unsupported}, which Envoy cannot load; "
                            "issue one with an RSA key of 2048 bits or more, or an ECDSA key on P-256, P-384 or "
                            "P-521")
    return Checked(ir.Certificate(name=name, certificate_chain=chain_pem, private_key=key_pem),
                   _window([leaf], where, "tls.crt"))


def trusted_ca(secret: Mapping[str, Any] | None, *, where: str, name: str) -> Checked:
    if secret is None:
        raise SecretProblem(f"Secret {where} does not exist: create it with the CA certificate in ca.crt, or fix "
                            "the name")
    pem = _data(secret, where, "ca.crt")
    authorities = _certificates(pem, where, "ca.crt")
    for certificate_ in authorities:
        try:
            is_ca = certificate_.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise SecretProblem(f"Secret {where}: ca.crt holds {certificate_.subject.rfc4514_string()}, which is not a "
                                "CA certificate; put the CA that issues the certificates to trust")
    return Checked(ir.TrustedCa(name=name, certificates=pem), _window(authorities, where, "ca.crt"))


def _data(secret: Mapping[str, Any], where: str, key: str) -> bytes:
    value = (secret.get("data") or {}).get(key)
    if not value:
        raise SecretProblem(f"Secret {where} has no {key}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SecretProblem(f"Secret {where}: {key} is not base64 (Secret data must be)") from None


def _certificates(pem: bytes, where: str, key: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(pem)
    except ValueError:
        found = []
    if not found:
        raise SecretProblem(f"Secret {where}: {key} holds no PEM certificate")
    return found


@dataclass(frozen=True)
class Window:
    """When the certificates of a Secret may be used, and the sentences to say when they may not."""

    not_before: datetime
    not_after: datetime
    where: str
    key: str

    def problem(self, now: float) -> str | None:
        moment = datetime.fromtimestamp(now, timezone.utc)
        if self.not_after <= moment:
            return (f"Secret {self.where}: the certificate in {self.key} expired on "
                    f"{self.not_after:%Y-%m-%d %H:%M} UTC; renew it")
        if self.not_before > moment:
            return (f"Secret {self.where}: the certificate in {self.key} is not valid before "
                    f"{self.not_before:%Y-%m-%d %H:%M} UTC")
        return None


@dataclass(frozen=True)
class Checked:
    """A Secret that parsed and whose parts fit together; whether it is valid *now* is `window`'s to say."""

    value: ir.Certificate | ir.TrustedCa
    window: Window


def _window(certificates: list[x509.Certificate], where: str, key: str) -> Window:
    return Window(not_before=max(c.not_valid_before_utc for c in certificates),
                  not_after=min(c.not_valid_after_utc for c in certificates), where=where, key=key)


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
