"""One root exception; each subclass also inherits the matching builtin.

Library errors (aiosmtplib, redis, jinja2, pydantic) are translated at the boundary, so
callers only ever catch these. Every error carries structured fields and never a secret.
"""

from __future__ import annotations

__all__ = [
    "CampaignError",
    "ConfigurationError",
    "DeliveryError",
    "EndpointFatalError",
    "PermanentDeliveryError",
    "QuotaExceededError",
    "SesTasksError",
    "TLSPolicyError",
    "ThrottledError",
    "TransientDeliveryError",
    "UnknownOutcomeError",
    "ValidationError",
]


class SesTasksError(Exception):
    """Root of every error ses-tasks raises on purpose."""


class ConfigurationError(SesTasksError, ValueError):
    """A setting is missing, malformed or inconsistent; fix the configuration."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(setting, problem)

    def __str__(self) -> str:
        return f"{self.setting}: {self.problem}"


class ValidationError(SesTasksError, ValueError):
    """Input (a message, a recipient row, a template) was refused before sending.

    ``field`` names what was wrong (``to[3]``, ``headers.X-Foo``, ``subject``) and
    ``problem`` says why, in words a user can act on.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(field, problem)

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


class CampaignError(SesTasksError, LookupError):
    """A campaign id is unknown, already used, or in a state that forbids the request."""


class DeliveryError(SesTasksError):
    """Sending one message did not succeed. ``code`` is the SMTP code (0 if none)."""

    def __init__(self, code: int, reason: str, recipient: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.recipient = recipient
        super().__init__(code, reason, recipient)

    def __str__(self) -> str:
        head = f"{self.code} {self.reason}" if self.code else self.reason
        return f"{head} (recipient {self.recipient})" if self.recipient else head


class TransientDeliveryError(DeliveryError, ConnectionError):
    """Retry later with backoff (4xx, lost connection before the data went out)."""


class ThrottledError(TransientDeliveryError):
    """SES says the send rate was exceeded: slow the fleet, retry soon."""


class QuotaExceededError(TransientDeliveryError):
    """The rolling 24-hour quota is used up: defer until capacity frees."""


class PermanentDeliveryError(DeliveryError):
    """SES refused this message for good (5xx about the message or its recipient)."""


class EndpointFatalError(DeliveryError):
    """The endpoint cannot send anything (bad credentials, account paused, IAM, TLS)."""


class TLSPolicyError(EndpointFatalError, ConnectionError):
    """The server does not meet our TLS policy (no STARTTLS, bad certificate, TLS < 1.2)."""


class UnknownOutcomeError(DeliveryError, ConnectionError):
    """The connection was lost after the message data went out and before SES replied."""
