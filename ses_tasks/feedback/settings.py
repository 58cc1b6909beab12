"""Feedback settings (environment prefix ``SES_TASKS_FEEDBACK_``), validated once."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ses_tasks.errors import ConfigurationError

__all__ = ["FeedbackSettings", "load_feedback_settings"]


class FeedbackSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SES_TASKS_FEEDBACK_",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    #: Comma-separated SNS topic ARNs accepted; empty accepts any topic.
    allowed_topic_arns: str = ""
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

    @model_validator(mode="after")
    def _check(self) -> FeedbackSettings:
        if self.replay_ttl_s <= self.max_age_s:
            raise ValueError(
                f"REPLAY_TTL_S ({self.replay_ttl_s}) must exceed MAX_AGE_S ({self.max_age_s}):"
                " a replay could arrive after its id was forgotten"
            )
        return self

    @property
    def topic_arns(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.allowed_topic_arns.split(",") if a.strip())


def load_feedback_settings(**overrides: Any) -> FeedbackSettings:
    """Build settings, turning pydantic's errors into one ``ConfigurationError``."""
    try:
        return FeedbackSettings(**overrides)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise ConfigurationError(f"FEEDBACK_{loc.upper()}", message) from None
