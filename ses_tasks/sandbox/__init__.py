"""A local SES-compatible SMTP endpoint for tests, benchmarks and demos.

Both SES port modes (STARTTLS and TLS Wrapper) with a private CA, AUTH PLAIN/LOGIN only
after TLS, SES's reply texts and message ids, and faults to inject (throttling, quota,
dropped connections, session limits, idle timeouts, ...).
"""

from __future__ import annotations

from ses_tasks.sandbox.certs import SERVER_NAMES
from ses_tasks.sandbox.cli import main
from ses_tasks.sandbox.config import SES_HOSTNAME, SandboxConfig, SandboxStats, SessionRecord
from ses_tasks.sandbox.faults import Faults
from ses_tasks.sandbox.protocol import SES_MESSAGE_ID_RE, new_ses_message_id
from ses_tasks.sandbox.server import Sandbox, SandboxThread
from ses_tasks.sandbox.store import AcceptedMessage, read_jsonl, read_messages

__all__ = [
    "SERVER_NAMES",
    "SES_HOSTNAME",
    "SES_MESSAGE_ID_RE",
    "AcceptedMessage",
    "Faults",
    "Sandbox",
    "SandboxConfig",
    "SandboxStats",
    "SandboxThread",
    "SessionRecord",
    "main",
    "new_ses_message_id",
    "read_jsonl",
    "read_messages",
]
