"""Where to connect and how: SES host names, port modes and the TLS policy."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from enum import StrEnum

from ses_tasks.errors import ConfigurationError

__all__ = [
    "DEFAULT_PORT",
    "STARTTLS_PORTS",
    "TLS_WRAPPER_PORTS",
    "Endpoint",
    "PortMode",
    "make_tls_context",
    "resolve_endpoint",
    "ses_host",
]

log = logging.getLogger(__name__)

STARTTLS_PORTS = frozenset({25, 587, 2587})
TLS_WRAPPER_PORTS = frozenset({465, 2465})
DEFAULT_PORT = 587
SES_HOST_SUFFIX = ".amazonaws.com"


class PortMode(StrEnum):
    #: Plain connect, EHLO, STARTTLS, EHLO again over TLS, then AUTH.
    STARTTLS = "starttls"
    #: TLS from the first byte ("SMTPS").
    TLS = "tls"

    @property
    def queue(self) -> str:
        """The Celery queue whose workers keep connections of this mode."""
        return f"ses.{self.value}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One SMTP endpoint. ``tls_server_name`` is what the certificate must name.

    It differs from ``host`` when connecting through a VPC endpoint or a tunnel whose DNS
    name is not on the certificate.
    """

    host: str
    port: int
    mode: PortMode
    tls_server_name: str

    @property
    def key(self) -> str:
        return f"{self.mode.value}://{self.host}:{self.port}"


def ses_host(region: str, *, fips: bool = False) -> str:
    if not region or not all(c.isalnum() or c == "-" for c in region):
        raise ConfigurationError("REGION", f"{region!r} is not an AWS region name")
    return f"email-smtp{'-fips' if fips else ''}.{region}.amazonaws.com"


def mode_for_port(port: int) -> PortMode | None:
    if port in STARTTLS_PORTS:
        return PortMode.STARTTLS
    if port in TLS_WRAPPER_PORTS:
        return PortMode.TLS
    return None


def resolve_endpoint(
    *,
    region: str = "us-east-1",
    host: str | None = None,
    port: int = DEFAULT_PORT,
    mode: PortMode | str | None = None,
    fips: bool = False,
    tls_server_name: str | None = None,
) -> Endpoint:
    """Validate host, port and mode together, once, and return the endpoint.

    An SES host only answers on its five ports; a custom host (local sandbox, proxy) may
    use any port but then needs an explicit mode.
    """
    if not 0 < port < 65536:
        raise ConfigurationError("PORT", f"{port} is not a TCP port")
    resolved_host = host or ses_host(region, fips=fips)
    is_ses = resolved_host.endswith(SES_HOST_SUFFIX)
    port_mode = mode_for_port(port)
    if is_ses and port_mode is None:
        raise ConfigurationError(
            "PORT",
            f"SES answers on 25, 587, 2587 (STARTTLS) or 465, 2465 (TLS Wrapper), not {port}",
        )
    if mode is not None:
        try:
            chosen = PortMode(mode)
        except ValueError:
            raise ConfigurationError(
                "MODE", f"{mode!r} is not a port mode (use 'starttls' or 'tls')"
            ) from None
    elif port_mode is not None:
        chosen = port_mode
    else:
        raise ConfigurationError(
            "MODE", f"port {port} is not a standard SES port; set MODE to 'starttls' or 'tls'"
        )
    if is_ses and port_mode is not None and chosen is not port_mode:
        raise ConfigurationError(
            "MODE", f"port {port} of SES speaks {port_mode.value}, not {chosen.value}"
        )
    if port == 25:
        log.warning("port 25 chosen: EC2 throttles outbound port 25 by default; prefer 587 or 2587")
    return Endpoint(
        host=resolved_host,
        port=port,
        mode=chosen,
        tls_server_name=tls_server_name or resolved_host,
    )


def make_tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Verified TLS >= 1.2 with the system trust store plus ``ca_file`` if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError("CA_FILE", f"cannot load {ca_file}: {exc}") from exc
    return context
