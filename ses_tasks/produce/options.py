"""Per-call options of ``send_email`` and ``send_campaign``, checked before anything is stored.

``send_at``: a time zone-aware ``datetime`` or an ISO-8601 string with an offset
(``2025-06-01T09:00:00+02:00``, ``...Z``). A naive time is refused (it means a different
instant on every host); a time already past means now; a time further ahead than the
store keeps records (``RETENTION_S``) is refused, since the shared ledger keys it waits in
could expire before it comes due.

``priority``: ``transactional`` (default for ``send_email``) or ``bulk``, the two lanes of
the fleet's rate limiter.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from ses_tasks.errors import ValidationError
from ses_tasks.limits.ratelimit import Priority

__all__ = ["check_priority", "check_profile_name", "format_epoch", "parse_send_at"]

_AT_EXAMPLE = "e.g. '2025-06-01T09:00:00+02:00' or '2025-06-01T07:00:00Z'"


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} days" if days >= 1 else f"{seconds:g} s"


def format_epoch(epoch_s: float) -> str:
    """An instant as ISO-8601 UTC with a ``Z`` (seconds precision), for messages and output."""
    return datetime.fromtimestamp(round(epoch_s), tz=UTC).isoformat().replace("+00:00", "Z")


def parse_send_at(
    value: datetime | str | None, *, retention_s: float, now: float | None = None
) -> int | None:
    """When to send, as Unix time in ms; None for now (no value, or a time already past).

    Raises ``ValidationError`` naming ``send_at`` for a naive time, a string that is not
    ISO-8601, another type, or a time more than ``retention_s`` ahead.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(
                "send_at", f"{value!r} is not an ISO-8601 time with an offset ({_AT_EXAMPLE})"
            ) from None
    elif isinstance(value, datetime):
        at = value
    else:
        raise ValidationError(
            "send_at",
            "must be a time zone-aware datetime or an ISO-8601 string with an offset, not "
            f"{type(value).__name__}",
        )
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValidationError(
            "send_at",
            f"{value!s} has no time zone: give an offset ({_AT_EXAMPLE}) or an aware "
            "datetime (datetime(..., tzinfo=timezone.utc))",
        )
    epoch = at.timestamp()
    current = time.time() if now is None else now
    if epoch <= current:
        return None
    ahead = epoch - current
    if ahead > retention_s:
        raise ValidationError(
            "send_at",
            f"{format_epoch(epoch)} is {_days(round(ahead))} ahead; at most "
            f"{_days(retention_s)} ahead (SES_TASKS_RETENTION_S={int(retention_s)}: records "
            "are kept that long)",
        )
    return int(epoch * 1000)


def check_priority(value: Priority | str) -> Priority:
    """``transactional`` or ``bulk`` (case-insensitive), else ``ValidationError`` naming it."""
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        try:
            return Priority(value.strip().lower())
        except ValueError:
            pass
    choices = " or ".join(repr(p.value) for p in Priority)
    raise ValidationError("priority", f"must be {choices}, not {value!r}")


def check_profile_name(value: Any) -> str:
    """A profile name is a string ('' is the unnamed default); its existence is checked by
    the settings (``Settings.for_profile``)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationError(
            "profile", f"must be a profile name (a string), not {type(value).__name__}"
        )
    return value
