"""Feedback settings (environment prefix ``SES_TASKS_FEEDBACK_``), validated once."""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ses_tasks.errors import ConfigurationError

__all__ = [
    "ALLOWED_TOPIC_ARNS_ENV",
    "ALLOW_ANY_TOPIC_ENV",
    "ENV_PREFIX",
    "FeedbackSettings",
    "load_feedback_settings",
    "missing_topic_policy",
    "warn_any_topic",
]

log = logging.getLogger("ses_tasks.feedback")

ENV_PREFIX = "SES_TASKS_FEEDBACK_"
ALLOWED_TOPIC_ARNS_ENV = f"{ENV_PREFIX}ALLOWED_TOPIC_ARNS"
ALLOW_ANY_TOPIC_ENV = f"{ENV_PREFIX}ALLOW_ANY_TOPIC"
#: ``arn:<partition>:sns:<region>:<12-digit account>:<topic name>`` (FIFO names end ``.fifo``).
_TOPIC_ARN_RE = re.compile(
    r"arn:aws(?:-cn|-us-gov|-iso[a-z-]*)?:sns:[a-z]{2}(?:-[a-z]+)+-\d+:\d{12}:[A-Za-z0-9_-]{1,256}"
    r"(?:\.fifo)?"
)


def missing_topic_policy() -> ConfigurationError:
    """The error for an HTTP receiver with no topic allow-list: SNS signs every account's
    messages with the same regional certificate, so only the TopicArn says they are ours."""
    return ConfigurationError(
        ALLOWED_TOPIC_ARNS_ENV,
        "set the SNS topic ARN(s) SES publishes to (comma-separated): a valid signature only"
        " proves the message came from SNS, not from your topic. For local development only,"
        f" {ALLOW_ANY_TOPIC_ENV}=true accepts any topic.",
    )


def warn_any_topic() -> None:
    """The start-up warning of the development flag: it lets anyone's topic suppress."""
    log.warning(
        "%s is on: feedback from ANY SNS topic is accepted, including other AWS accounts'"
        " topics (which can then suppress addresses). For development only.",
        ALLOW_ANY_TOPIC_ENV,
    )


class FeedbackSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    #: Comma-separated SNS topic ARNs accepted. Required by the HTTP receivers (``feedback
    #: serve``, the ASGI app, the Django/Flask views): empty refuses every topic.
    allowed_topic_arns: str = ""
    #: Development only: accept any topic (anyone's SNS topic can then post feedback).
    allow_any_topic: bool = False
    #: Suppress addresses from bounces/complaints whose SES message id we never sent (another
    #: sender on the account, or records past retention). Off: such events are only counted.
    suppress_uncorrelated: bool = False
    #: SNS messages with an older ``Timestamp`` are refused (replays of captured traffic).
    max_age_s: float = Field(default=3600.0, gt=0)
    #: How long handled SNS MessageIds are remembered; must outlast ``max_age_s``.
    replay_ttl_s: int = Field(default=2 * 86400, ge=60)
    #: Timeout for fetching a signing certificate or a SubscribeURL.
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    #: Pause a campaign whose bounce rate (bounced / sent) reaches this (SES reviews at 5%).
    bounce_pause_rate: float = Field(default=0.05, gt=0, le=1)
    #: Pause a campaign whose complaint rate reaches this (SES reviews at 0.1%).
    complaint_pause_rate: float = Field(default=0.001, gt=0, le=1)
    #: Rates are not judged before this many messages of the campaign were sent.
    min_sample: int = Field(default=100, ge=1)
    #: Suppress an address after this many transient bounces within ``transient_window_s``;
    #: 0 never suppresses on transient bounces.
    transient_suppress_after: int = Field(default=3, ge=0)
    transient_window_s: float = Field(default=7 * 86400.0, gt=0)
    #: ``ses-tasks feedback serve`` listens here.
    host: str = "127.0.0.1"
    port: int = Field(default=8025, ge=0, le=65535)
    #: Largest request body accepted (SNS messages are at most 256 KiB plus the envelope).
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    @field_validator("allowed_topic_arns")
    @classmethod
    def _check_arns(cls, value: str) -> str:
        for arn in (a.strip() for a in value.split(",")):
            if arn and not _TOPIC_ARN_RE.fullmatch(arn):
                shown = arn if len(arn) <= 120 else arn[:120] + "..."
                raise ValueError(
                    f"{shown!r} is not an SNS topic ARN"
                    " (arn:aws:sns:<region>:<account id>:<topic name>)"
                )
        return value

    @model_validator(mode="after")
    def _check(self) -> FeedbackSettings:
        if self.replay_ttl_s <= self.max_age_s:
            raise ConfigurationError(
                f"{ENV_PREFIX}REPLAY_TTL_S",
                f"{self.replay_ttl_s} must exceed {ENV_PREFIX}MAX_AGE_S ({self.max_age_s}):"
                " a replay could arrive after its id was forgotten",
            )
        if self.allow_any_topic and self.topic_arns:
            raise ConfigurationError(
                ALLOW_ANY_TOPIC_ENV,
                f"cannot be combined with {ALLOWED_TOPIC_ARNS_ENV}: unset one of them",
            )
        return self

    @property
    def topic_arns(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.allowed_topic_arns.split(",") if a.strip())

    def require_topic_policy(self) -> None:
        """Raise ``ConfigurationError`` unless an allow-list or ``allow_any_topic`` is set (and
        warn on the latter); every HTTP receiver calls this once before it starts."""
        if not self.topic_arns and not self.allow_any_topic:
            raise missing_topic_policy()
        if self.allow_any_topic:
            warn_any_topic()


def load_feedback_settings(**overrides: Any) -> FeedbackSettings:
    """Build settings, turning pydantic's errors into one ``ConfigurationError``."""
    try:
        return FeedbackSettings(**overrides)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        err = (first.get("ctx") or {}).get("error")
        if isinstance(err, ConfigurationError):
            raise ConfigurationError(err.setting, err.problem) from None
        loc = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise ConfigurationError(f"{ENV_PREFIX}{loc.upper()}", message) from None
