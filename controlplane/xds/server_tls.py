"""TLS for the xDS server, from files that may be rotated while it runs.

The xDS stream carries private keys (SDS), so it must not travel in plaintext. The certificate
and key are read from files (a mounted Kubernetes Secret); gRPC asks for the configuration on
every new handshake and gets a new one when the files changed, so the control plane's own
certificate rotates without a restart. With a client CA, Envoys must present a certificate
signed by it (mutual TLS between Envoy and the control plane), whose URI SANs in `trust_domain`
name the node groups it may see (xds/identity.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.xds.identity import DEFAULT_TRUST_DOMAIN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTls:
    certificate: Path
    private_key: Path
    client_ca: Path | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def credentials(self) -> grpc.ServerCredentials:
        for path in self._paths():
            if not path.is_file():
                raise OSError(f"xDS TLS: {path} does not exist or is not a file")
        seen, refused = [self._stamp()], [None]
        try:
            initial = self._configuration()
        except ValueError as error:
            raise OSError(f"xDS TLS: {error}") from None

        def fetch():
            stamp = self._stamp()
            if stamp in (seen[0], refused[0]):
                return None  # unchanged (or refused as it is): gRPC keeps the current configuration
            try:
                configuration = self._configuration()
            except (OSError, ValueError) as error:  # mid-rotation, or a bad rotation: logged once per state
                refused[0] = stamp
                log.error("xDS TLS: cannot use the rotated files (%s); keeping the current certificate until they "
                          "change", error)
                return None
            seen[0] = stamp
            log.info("xDS TLS: certificate files changed; new connections use the new certificate")
            return configuration

        return grpc.dynamic_ssl_server_credentials(initial, fetch,
                                                   require_client_authentication=self.client_ca is not None)

    def _configuration(self):
        """Raises ValueError when the key is not the certificate's: a rotation half written."""
        key, chain = self.private_key.read_bytes(), self.certificate.read_bytes()
        try:
            matches = _public_key(x509.load_pem_x509_certificate(chain).public_key()) == _public_key(
                serialization.load_pem_private_key(key, password=None).public_key())
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.certificate} or {self.private_key} is not a PEM certificate and its unencrypted "
                             f"key ({error})") from None
        if not matches:
            raise ValueError(f"{self.private_key} is not the key of {self.certificate}")
        return grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=self.client_ca.read_bytes() if self.client_ca else None)

    def _paths(self) -> list[Path]:
        return [self.certificate, self.private_key, *([self.client_ca] if self.client_ca else [])]

    def _stamp(self) -> tuple:
        """(mtime, size) of each file, None for a missing one: read on every TLS handshake."""
        return tuple(_stat_stamp(path) for path in self._paths())


def _stat_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _public_key(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
