"""SMTP to SES: reply classification and a warm connection pool."""

from __future__ import annotations

from ses_tasks.smtp.connection import ConnectionInfo, ConnectionState
from ses_tasks.smtp.pool import PoolStats, SmtpPool
from ses_tasks.smtp.replies import (
    SendResult,
    classify_exception,
    classify_reply,
    parse_ses_message_id,
    to_error,
)

__all__ = [
    "ConnectionInfo",
    "ConnectionState",
    "PoolStats",
    "SendResult",
    "SmtpPool",
    "classify_exception",
    "classify_reply",
    "parse_ses_message_id",
    "to_error",
]
