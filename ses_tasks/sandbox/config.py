"""Sandbox configuration and the records it keeps about sessions and traffic."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from ses_tasks.errors import ConfigurationError
from ses_tasks.sandbox.faults import Faults
from ses_tasks.smtp.endpoint import PortMode

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_RECIPIENTS",
    "SES_HOSTNAME",
    "SandboxConfig",
    "SandboxStats",
    "SessionRecord",
]

#: The name SES greets with, whatever the region.
SES_HOSTNAME = "email-smtp.amazonaws.com"
DEFAULT_MAX_MESSAGE_BYTES = 10_485_760
DEFAULT_MAX_RECIPIENTS = 50


def _port(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value < 65536:
        raise ConfigurationError(name, f"{value} is not a TCP port (0 = any free port)")


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxConfig:
    """How one sandbox listens and behaves. Ports: None = mode off, 0 = ephemeral."""

    host: str = "127.0.0.1"
    starttls_port: int | None = 0
    tls_port: int | None = 0
    username: str = "AKIAEXAMPLE"
    password: str = field(default="secret", repr=False)
    #: Where ``ca.pem``, ``server.pem`` and ``server.key`` live; None = a temporary dir.
    cert_dir: str | Path | None = None
    #: Append-only JSONL of accepted messages; None = memory only.
    store_path: str | Path | None = None
    #: JSONL of connection events (connect, starttls, auth, disconnect, ...); None = off.
    events_path: str | Path | None = None
    #: Delay before every reply (greeting and EHLO included): the network round trip.
    latency_ms: float = 0.0
    #: False models a broken server that never offers STARTTLS.
    advertise_starttls: bool = True
    tls_min_version: ssl.TLSVersion | None = None
    tls_max_version: ssl.TLSVersion | None = None
    #: False keeps only ids, sizes and recipients (benchmarks).
    keep_data: bool = True
    faults: Faults = field(default_factory=Faults)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    #: Keep at most this many accepted messages in memory (oldest dropped); None = all.
    max_messages_in_memory: int | None = None
    #: How often buffered store and event lines reach the disk.
    flush_interval_s: float = 0.2

    def __post_init__(self) -> None:
        _port("starttls_port", self.starttls_port)
        _port("tls_port", self.tls_port)
        if self.starttls_port is None and self.tls_port is None:
            raise ConfigurationError("ports", "serve at least one of STARTTLS and TLS Wrapper")
        if not self.username or not self.password:
            raise ConfigurationError("credentials", "username and password are required")
        if self.latency_ms < 0:
            raise ConfigurationError("latency_ms", "must be >= 0")
        if self.max_message_bytes <= 0 or self.max_recipients <= 0:
            raise ConfigurationError("limits", "max_message_bytes and max_recipients must be > 0")
        if self.max_messages_in_memory is not None and self.max_messages_in_memory < 0:
            raise ConfigurationError("max_messages_in_memory", "must be >= 0 or None")
        if self.flush_interval_s <= 0:
            raise ConfigurationError("flush_interval_s", "must be > 0")


@dataclass(slots=True)
class SessionRecord:
    """One client connection, as the sandbox saw it."""

    session_id: str
    mode: PortMode
    peer: str = ""
    #: ``TLSv1.3`` and so on; None while the session is in clear text.
    tls_version: str | None = None
    authed: bool = False
    #: Command verbs in order, e.g. EHLO STARTTLS EHLO AUTH MAIL RCPT DATA QUIT.
    commands: list[str] = field(default_factory=list)
    #: Messages accepted in this session.
    messages: int = 0
    opened_at: float = 0.0
    closed_at: float | None = None

    @property
    def closed(self) -> bool:
        return self.closed_at is not None


@dataclass(slots=True)
class SandboxStats:
    """Counters over the sandbox's life; tests assert on them."""

    connections_opened: int = 0
    connections_closed: int = 0
    concurrent_connections: int = 0
    max_concurrent_connections: int = 0
    starttls_upgrades: int = 0
    auth_ok: int = 0
    auth_failed: int = 0
    messages_accepted: int = 0
    recipients_accepted: int = 0
    bytes_accepted: int = 0
    #: Messages answered with a 4xx/5xx after DATA.
    messages_refused: int = 0
    dropped_after_data: int = 0
    idle_timeouts: int = 0
    session_limit_closes: int = 0
    quits: int = 0
    #: Every reply sent, by code (a multi-line reply counts once).
    replies_by_code: dict[int, int] = field(default_factory=dict)
    #: Accepted messages per session id.
    messages_per_session: dict[str, int] = field(default_factory=dict)
