"""Faults the sandbox injects, and the SES replies they produce.

The reply texts are SES's own (see shared/ses-smtp-facts.md), so client code classifying
replies is tested against the words it will meet in production.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ses_tasks.errors import ConfigurationError

__all__ = [
    "ACCOUNT_PAUSED_REPLY",
    "AUTH_FAILED_REPLY",
    "AUTH_OK_REPLY",
    "AUTH_REQUIRED_REPLY",
    "DAILY_QUOTA_REPLY",
    "IDLE_TIMEOUT_REPLY",
    "MESSAGE_TOO_LONG_REPLY",
    "SESSION_LIMIT_REPLY",
    "STARTTLS_FIRST_REPLY",
    "TEMP_FAIL_REPLY",
    "THROTTLE_REPLY",
    "TOO_MANY_RECIPIENTS_REPLY",
    "Faults",
    "denied_identity",
    "iam_denied_reply",
    "invalid_address_reply",
    "judge_message",
    "should_drop",
    "unverified_reply",
]

THROTTLE_REPLY = "454 Throttling failure: Maximum sending rate exceeded"
DAILY_QUOTA_REPLY = "454 Throttling failure: Daily message quota exceeded"
TEMP_FAIL_REPLY = "451 Temporary service failure"
SESSION_LIMIT_REPLY = "421 Connection closed by server. Maximum message count per session reached."
IDLE_TIMEOUT_REPLY = "451 4.4.2 Timeout waiting for data from client."
ACCOUNT_PAUSED_REPLY = (
    "554 Message rejected: Sending paused for this account. "
    "For more information, please check the AWS Management Console."
)
TOO_MANY_RECIPIENTS_REPLY = "554 Transaction failed: Recipient count exceeds 50."
MESSAGE_TOO_LONG_REPLY = "552 Message is too long."
STARTTLS_FIRST_REPLY = "530 Must issue a STARTTLS command first"
AUTH_REQUIRED_REPLY = "530 Authentication required"
AUTH_FAILED_REPLY = "535 Authentication Credentials Invalid"
AUTH_OK_REPLY = "235 Authentication successful."


def invalid_address_reply(address: str) -> str:
    return f"553 <{address}> Invalid email address"


def unverified_reply(address: str, region: str = "US-EAST-1") -> str:
    return (
        "554 Message rejected: Email address is not verified. The following identities "
        f"failed the check in region {region}: {address}"
    )


#: The IAM user the sandbox pretends the SMTP credentials belong to, in denials.
IAM_USER_ARN: Final = "arn:aws:iam::123456789012:user/ses-smtp-user"
DENY_STAGES: Final = ("mail", "data")


def iam_denied_reply(identity: str, region: str = "us-east-1") -> str:
    """SES's answer when the credentials' IAM policy does not allow sending as ``identity``."""
    return (
        f"554 Message rejected: User '{IAM_USER_ARN}' is not authorized to perform "
        f"'ses:SendRawEmail' on resource 'arn:aws:ses:{region}:123456789012:identity/{identity}'"
    )


def _rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(name, f"must be a fraction between 0 and 1, not {value!r}")


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigurationError(name, f"must be positive or None, not {value!r}")


@dataclass(slots=True, kw_only=True)
class Faults:
    """What goes wrong, and how often. Mutable: tests change faults mid-run.

    Random faults draw from one ``random.Random(seed)`` (a draw only when the rate is
    non-zero), so a run with the same seed and traffic refuses the same messages.
    """

    #: Fraction of messages answered ``454 Throttling failure: Maximum sending rate exceeded``.
    throttle_rate: float = 0.0
    #: Accepted recipients after which every message gets the daily-quota 454.
    daily_quota: int | None = None
    #: Fraction answered ``451 Temporary service failure``.
    temp_fail_rate: float = 0.0
    #: Fraction where the connection is cut after the data, before the reply.
    drop_after_data_rate: float = 0.0
    #: With a drop, whether SES had accepted the message anyway (it is then recorded).
    drop_after_data_accepts: bool = False
    #: Accepted messages per session after which MAIL gets the 421 and the session ends.
    max_messages_per_session: int | None = None
    #: Silence after which the server says 451 4.4.2 and closes (SES: about 10 s).
    idle_timeout_s: float | None = None
    #: Every AUTH answered ``535 Authentication Credentials Invalid``.
    auth_fail: bool = False
    #: Every message answered ``554 Message rejected: Sending paused for this account``.
    account_paused: bool = False
    #: Senders or recipients answered ``554 Message rejected: Email address is not verified``.
    reject_recipients: frozenset[str] = frozenset()
    #: Sender identities (addresses, or domains for every address in them) the IAM policy
    #: denies: their mail gets ``554 ... not authorized to perform 'ses:SendRawEmail' on
    #: resource '...:identity/<identity>'``; other senders are unaffected.
    deny_senders: frozenset[str] = frozenset()
    #: When that denial comes: ``"data"`` (after the message, as SES does) or ``"mail"``.
    deny_senders_at: str = "data"
    seed: int = 0

    def __post_init__(self) -> None:
        _rate("throttle_rate", self.throttle_rate)
        _rate("temp_fail_rate", self.temp_fail_rate)
        _rate("drop_after_data_rate", self.drop_after_data_rate)
        _positive("daily_quota", self.daily_quota)
        _positive("max_messages_per_session", self.max_messages_per_session)
        _positive("idle_timeout_s", self.idle_timeout_s)
        self.reject_recipients = frozenset(a.lower() for a in self.reject_recipients)
        self.deny_senders = frozenset(a.lower() for a in self.deny_senders)
        if self.deny_senders_at not in DENY_STAGES:
            raise ConfigurationError(
                "deny_senders_at", f"must be one of {DENY_STAGES}, not {self.deny_senders_at!r}"
            )


def denied_identity(faults: Faults, mail_from: str) -> str | None:
    """The denied identity ``mail_from`` sends as (its address or its domain), or None."""
    if not faults.deny_senders:
        return None
    denied = {a.lower() for a in faults.deny_senders}  # may be set at runtime
    address = mail_from.lower()
    for identity in (address, address.rpartition("@")[2]):
        if identity in denied:
            return identity
    return None


def judge_message(
    faults: Faults,
    rng: random.Random,
    *,
    mail_from: str,
    rcpt_tos: Sequence[str],
    recipients_accepted: int,
    max_recipients: int = 50,
) -> str | None:
    """The reply refusing a message after DATA, or None to accept it.

    Order follows SES: limits and identities first, then account state, then capacity.
    A dropped connection is decided apart (:func:`should_drop`): with
    ``drop_after_data_accepts`` the verdict still says whether SES kept the message.
    """
    if len(rcpt_tos) > max_recipients:
        return TOO_MANY_RECIPIENTS_REPLY.replace("50", str(max_recipients))
    if faults.deny_senders_at == "data":
        identity = denied_identity(faults, mail_from)
        if identity is not None:
            return iam_denied_reply(identity)
    if faults.reject_recipients:
        rejected = {a.lower() for a in faults.reject_recipients}  # may be set at runtime
        for address in (mail_from, *rcpt_tos):
            if address.lower() in rejected:
                return unverified_reply(address)
    if faults.account_paused:
        return ACCOUNT_PAUSED_REPLY
    if faults.throttle_rate and rng.random() < faults.throttle_rate:
        return THROTTLE_REPLY
    if faults.daily_quota is not None and recipients_accepted + len(rcpt_tos) > faults.daily_quota:
        return DAILY_QUOTA_REPLY
    if faults.temp_fail_rate and rng.random() < faults.temp_fail_rate:
        return TEMP_FAIL_REPLY
    return None


def should_drop(faults: Faults, rng: random.Random) -> bool:
    return bool(faults.drop_after_data_rate) and rng.random() < faults.drop_after_data_rate
