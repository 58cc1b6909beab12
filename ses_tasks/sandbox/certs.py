"""A private CA and a server certificate, so clients verify the sandbox like they verify SES.

Clients keep full verification (CA trust and host name); they only add ``ca.pem``.
"""

from __future__ import annotations

import os
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

import trustme

__all__ = ["SERVER_NAMES", "SandboxCertificates", "ensure_certificates", "server_tls_context"]

#: Names on the server certificate: connect by any of them with host-name checking on.
SERVER_NAMES = ("localhost", "127.0.0.1", "email-smtp.sandbox.local")
CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"


@dataclass(frozen=True, slots=True)
class SandboxCertificates:
    ca_file: str
    cert_file: str
    key_file: str


def ensure_certificates(directory: str | Path) -> SandboxCertificates:
    """Reuse the CA and server certificate in ``directory``, or create them.

    Reuse keeps clients that already trust ``ca.pem`` working across sandbox restarts.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    certs = SandboxCertificates(
        ca_file=str(folder / CA_FILE),
        cert_file=str(folder / CERT_FILE),
        key_file=str(folder / KEY_FILE),
    )
    if all(Path(p).is_file() for p in (certs.ca_file, certs.cert_file, certs.key_file)):
        return certs
    ca = trustme.CA(organization_name="ses-tasks sandbox")
    server = ca.issue_cert(*SERVER_NAMES)
    server.private_key_pem.write_to_path(certs.key_file)
    os.chmod(certs.key_file, 0o600)
    with open(certs.cert_file, "wb") as handle:
        for blob in server.cert_chain_pems:
            handle.write(blob.bytes())
    ca.cert_pem.write_to_path(certs.ca_file)
    return certs


def server_tls_context(
    certs: SandboxCertificates,
    *,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """TLS >= 1.2 like SES, unless a test asks for an older range to check clients refuse it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    with warnings.catch_warnings():
        # Old versions are asked for on purpose: tests check that clients refuse them.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = min_version or ssl.TLSVersion.TLSv1_2
        if max_version is not None:
            context.maximum_version = max_version
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 refuses TLS 1.0/1.1 at the default security level.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context
