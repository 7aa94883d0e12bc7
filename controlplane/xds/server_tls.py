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
        seen = [self._stamp()]

        def fetch():
            stamp = self._stamp()
            if stamp == seen[0]:
                return None  # unchanged: gRPC keeps the current configuration
            try:
                configuration = self._configuration()
            except OSError as error:
                log.error("xDS TLS: cannot read the rotated files (%s); keeping the current certificate", error)
                return None
            seen[0] = stamp
            log.info("xDS TLS: certificate files changed; new connections use the new certificate")
            return configuration

        return grpc.dynamic_ssl_server_credentials(self._configuration(), fetch,
                                                   require_client_authentication=self.client_ca is not None)

    def _configuration(self):
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key.read_bytes(), self.certificate.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None)

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
