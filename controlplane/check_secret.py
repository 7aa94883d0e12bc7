"""`controlplane check-secret`: the checks a Secret rotation meets in the control plane, run in a
pipeline before the rotation is applied (the same code: controlplane.translate.secrets).

A certificate and key as PEM files, or a Kubernetes Secret manifest (`data` in base64 or
`stringData`); a Secret with only ca.crt is checked as a CA bundle. Exit 0 when every check
passes; otherwise 1, with every failed check on its own line, saying what to do. Whatever the
input (missing files, directories, binary, garbage YAML), a line that says what is wrong, never a
traceback. What needs the last valid version (continuity of issuers, dropped client CAs) is the
control plane's to check; `--trusted-by` checks against what the clients trust instead.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
import time
from collections.abc import Mapping
from typing import Any

import yaml

from controlplane.translate import secrets

_MAX_FILE = 1 << 20  # a PEM file or a Secret manifest is a few KiB; this keeps a wrong path from filling memory


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("check-secret", help="check a TLS certificate and key, or a Secret manifest, "
                                   "as the control plane will before serving it")
    _add_arguments(parser)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cert", help="PEM certificate chain: the certificate, then its intermediates (tls.crt)")
    parser.add_argument("--key", help="PEM private key, not encrypted (tls.key)")
    parser.add_argument("--ca", help="PEM CA certificates the chain must verify to (the Secret's ca.crt)")
    parser.add_argument("--secret", metavar="FILE.yaml", help="a Kubernetes Secret manifest instead of --cert/--key")
    parser.add_argument("--trusted-by", metavar="FILE", help="PEM CA certificates the clients trust: the chain "
                        "must verify to one (a listener's tls.clientsTrustSecret)")
    parser.add_argument("--hostname", help="the name the certificate must cover (a listener's hostname)")
    parser.add_argument("--usage", choices=("server", "client"), default="server",
                        help="server: a listener's certificate (serverAuth); client: one Envoy presents upstream "
                        "(clientAuth); default server")
    parser.add_argument("--min-lifetime", type=duration, default=secrets.DEFAULT_MIN_LIFETIME, metavar="DURATION",
                        help="the remaining lifetime the certificate must have, such as 24h (the default) or 90m")


def duration(text: str) -> float:
    """An argparse type: '24h', '90m', '1h30m' as seconds."""
    try:
        return secrets.parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    files_given = (args.cert, args.key, args.ca) != (None, None, None)
    if (args.secret is not None and files_given) or (args.secret is None and None in (args.cert, args.key)):
        print("check-secret: give --cert and --key (and optionally --ca), or --secret FILE.yaml", file=sys.stderr)
        return 2
    failures: list[secrets.Failure] = []
    use = secrets.Use(args.usage, args.hostname, args.min_lifetime, args.trusted_by)
    if args.secret is not None:
        checked, what = _from_manifest(args.secret, failures)
    else:
        labels = {"tls.crt": f"--cert {args.cert}", "tls.key": f"--key {args.key}", "ca.crt": f"--ca {args.ca}"}
        parts = {part: _read(path, labels[part], failures) if path is not None else None
                 for part, path in (("tls.crt", args.cert), ("tls.key", args.key), ("ca.crt", args.ca))}
        checked = secrets.certificate_parts(parts["tls.crt"], parts["tls.key"], parts["ca.crt"], failures,
                                            labels=labels)
        what = f"certificate {args.cert}"
    if checked is not None:
        trust = _trusted_by(args.trusted_by, failures) if args.trusted_by is not None and checked.chain else None
        failures += secrets.lasting_failures(checked, use, clients_trust=trust, trust_label=f"--trusted-by "
                                             f"{args.trusted_by}")
        failures += secrets.time_failures(checked, use, now=time.time(), new=True)
    for failure in failures:
        print(f"FAIL {failure.check}: {failure.text}")
    if failures:
        return 1
    print(f"OK: {what} passes every check ({_passed(use, checked)})")
    return 0


def _passed(use: secrets.Use, checked: secrets.Checked) -> str:
    if not checked.chain:
        return f"{len(checked.authorities)} CA certificate(s), valid now"
    said = [f"usage {use.purpose}", f"at least {secrets.format_duration(use.min_lifetime)} left"]
    if use.hostname:
        said.append(f"covers {use.hostname}")
    if checked.authorities:
        said.append("chains to its ca.crt")
    if use.clients_trust_secret:
        said.append(f"chains to {use.clients_trust_secret}")
    return ", ".join(said)


def _read(path: str, label: str, failures: list[secrets.Failure]) -> bytes | None:
    try:
        with open(path, "rb") as file:
            content = file.read(_MAX_FILE + 1)
    except OSError as error:
        failures.append(secrets.Failure("Unreadable", f"{label} cannot be read ({error.strerror or error}): give the "
                                        "path of a PEM file"))
        return None
    if len(content) > _MAX_FILE:
        failures.append(secrets.Failure("Unreadable", f"{label} is larger than {_MAX_FILE >> 20} MiB, which no PEM "
                                        "certificate or key is: give the right file"))
        return None
    return content


def _trusted_by(path: str, failures: list[secrets.Failure]) -> secrets.Checked | secrets.SecretProblem:
    found: list[secrets.Failure] = []
    pem = _read(path, f"--trusted-by {path}", found)
    checked = secrets.bundle_parts(pem, found, label=f"--trusted-by {path}") if pem is not None else None
    if found or checked is None:
        failures.extend(found)
        return secrets.SecretProblem(path, found)
    return checked


def _from_manifest(path: str, failures: list[secrets.Failure]) -> tuple[secrets.Checked | None, str]:
    content = _read(path, f"--secret {path}", failures)
    if content is None:
        return None, path
    try:
        manifest = yaml.safe_load(content.decode())
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        failures.append(secrets.Failure("Unreadable", f"--secret {path} is not one YAML document "
                                        f"({str(error).splitlines()[0]}): give a Secret manifest"))
        return None, path
    if not isinstance(manifest, Mapping) or manifest.get("kind", "Secret") != "Secret":
        failures.append(secrets.Failure("Unreadable", f"--secret {path} is not a Kubernetes Secret manifest (kind: "
                                        "Secret, with data or stringData)"))
        return None, path
    name = (manifest.get("metadata") or {}).get("name") if isinstance(manifest.get("metadata"), Mapping) else None
    what = f"Secret {name or path}"
    parts = {part: _manifest_part(manifest, part, path, failures) for part in secrets.PARTS}
    labels = {part: f"{part} of {path}" for part in secrets.PARTS}
    if parts["tls.crt"] is None and parts["tls.key"] is None and parts["ca.crt"] is not None:
        return secrets.bundle_parts(parts["ca.crt"], failures, label=labels["ca.crt"]), what
    if manifest.get("type") != "kubernetes.io/tls":
        failures.append(secrets.Failure("WrongType", f"{path} is of type {manifest.get('type') or 'Opaque'!r}: a "
                                        "certificate needs a kubernetes.io/tls Secret (kubectl create secret tls)"))
    for part in ("tls.crt", "tls.key"):
        if parts[part] is None and not any(f.text.startswith(labels[part]) for f in failures):
            failures.append(secrets.Failure("Unreadable", f"{path} has no {part}"))
    return secrets.certificate_parts(parts["tls.crt"], parts["tls.key"], parts["ca.crt"], failures,
                                     labels=labels), what


def _manifest_part(manifest: Mapping[str, Any], part: str, path: str, failures: list[secrets.Failure]) -> bytes | None:
    """A part from `data` (base64) or `stringData` (text), as the API server merges them."""
    string_data, data = manifest.get("stringData"), manifest.get("data")
    if isinstance(string_data, Mapping) and isinstance(string_data.get(part), str) and string_data[part]:
        return string_data[part].encode()
    value = data.get(part) if isinstance(data, Mapping) else None
    if not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        failures.append(secrets.Failure("Unreadable", f"{part} of {path} is not base64 (Secret data must be; use "
                                        "stringData for PEM text)"))
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="controlplane check-secret", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
