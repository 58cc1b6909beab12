"""One handler behind every way feedback arrives: ASGI, Django, Flask and batch ingest.

An HTTP POST is trusted only after ``SnsVerifier`` accepts it, and only from an allowed SNS
topic (receivers refuse to start without an allow-list); an SNS MessageId is handled once
(``SET NX`` with a TTL), so SNS retries and replays change nothing. Every refusal is one
WARNING log line (untrusted values clipped), one count of ``ses_tasks_feedback_refused_total``,
and leaves Redis untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ses_tasks.config import Settings, load_settings
from ses_tasks.errors import ValidationError
from ses_tasks.feedback.apply import ApplyResult, FeedbackApplier
from ses_tasks.feedback.events import ParseError, parse_event, unwrap
from ses_tasks.feedback.settings import FeedbackSettings, load_feedback_settings
from ses_tasks.feedback.sns import (
    NOTIFICATION,
    SUBSCRIPTION_CONFIRMATION,
    Fetcher,
    SnsVerificationError,
    SnsVerifier,
    clip,
    is_sns_envelope,
)
from ses_tasks.ops import metrics
from ses_tasks.store.connections import sync_redis

__all__ = ["FeedbackHandler", "HttpResponse", "IngestReport"]

log = logging.getLogger("ses_tasks.feedback")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: str

    def json_bytes(self) -> bytes:
        return json.dumps({"result": self.body}).encode()


@dataclass
class IngestReport:
    lines: int = 0
    applied: int = 0
    duplicates: int = 0
    uncorrelated: int = 0
    invalid: int = 0
    ignored: int = 0
    suppressed: int = 0
    #: The first problems, as ``line N: why``.
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "applied": self.applied,
            "duplicates": self.duplicates,
            "uncorrelated": self.uncorrelated,
            "invalid": self.invalid,
            "ignored": self.ignored,
            "suppressed": self.suppressed,
            "errors": self.errors,
        }


_MAX_REPORTED_ERRORS = 20


class FeedbackHandler:
    def __init__(
        self,
        *,
        applier: FeedbackApplier,
        verifier: SnsVerifier,
        replay_ttl_s: int = 2 * 86400,
    ) -> None:
        self.applier = applier
        self.verifier = verifier
        self.replay_ttl_s = replay_ttl_s

    @classmethod
    def from_settings(
        cls,
        settings: Settings | None = None,
        feedback_settings: FeedbackSettings | None = None,
        *,
        client: redis.Redis | None = None,
        fetcher: Fetcher | None = None,
    ) -> FeedbackHandler:
        settings = settings or load_settings()
        fb = feedback_settings or load_feedback_settings()
        client = client or sync_redis(settings.redis_url, settings=settings)
        applier = FeedbackApplier(client, key_prefix=settings.key_prefix, settings=fb)
        verifier = SnsVerifier(
            fetcher=fetcher,
            allowed_topic_arns=fb.topic_arns,
            allow_any_topic=fb.allow_any_topic,
            max_age_s=fb.max_age_s,
            fetch_timeout_s=fb.fetch_timeout_s,
        )
        return cls(applier=applier, verifier=verifier, replay_ttl_s=fb.replay_ttl_s)

    def __repr__(self) -> str:
        return f"<FeedbackHandler {self.verifier!r}>"

    @property
    def redis(self) -> redis.Redis:
        return self.applier.redis

    def require_topic_policy(self) -> None:
        """Raise ``ConfigurationError`` unless the verifier has a topic allow-list (or the
        development flag): every HTTP receiver calls this before it serves."""
        self.verifier.require_topic_policy()

    # HTTP --------------------------------------------------------------------------------

    def handle_http(self, body: bytes, headers: Mapping[str, str] | None = None) -> HttpResponse:
        """Handle one SNS HTTP POST body. 2xx tells SNS not to retry; 403 means refused; 503
        (the signing certificate could not be fetched now) asks SNS to retry later."""
        try:
            envelope = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            metrics.feedback_refused("not_json")
            log.warning("feedback refused: request body is not JSON")
            return HttpResponse(400, "body is not JSON")
        if not isinstance(envelope, dict) or not is_sns_envelope(envelope):
            metrics.feedback_refused("not_sns")
            log.warning("feedback refused: not an SNS message (raw notifications need ingest)")
            return HttpResponse(400, "not an SNS message")
        header_type = (headers or {}).get("x-amz-sns-message-type")
        if header_type and header_type != envelope.get("Type"):
            metrics.feedback_refused("header_mismatch")
            log.warning(
                "feedback refused: x-amz-sns-message-type %s does not match Type %s",
                clip(header_type),
                clip(envelope.get("Type")),
            )
            return HttpResponse(400, "message type header mismatch")
        try:
            outcome = self.handle_envelope(envelope)
        except SnsVerificationError as exc:
            log.warning("feedback refused: %s", exc)
            if exc.retryable:
                return HttpResponse(503, "retry later")
            return HttpResponse(403, "refused")
        if outcome == "confirm-failed":
            return HttpResponse(502, outcome)
        return HttpResponse(200, outcome)

    def handle_envelope(self, envelope: Mapping[str, Any], *, check_age: bool = True) -> str:
        """Verify and act on one SNS envelope; returns what happened (for logs and tests).

        Raises ``SnsVerificationError`` when the envelope is refused.
        """
        message = self.verifier.verify(envelope, check_age=check_age)
        if message.type == SUBSCRIPTION_CONFIRMATION:
            try:
                self.verifier.confirm_subscription(message)
            except SnsVerificationError as exc:
                metrics.feedback_refused("confirm")
                log.warning("cannot confirm the subscription to %s: %s", message.topic_arn, exc)
                return "confirm-failed"
            return "confirmed"
        if message.type != NOTIFICATION:
            log.info("SNS %s for %s", message.type, message.topic_arn)
            return message.type
        seen_key = self.applier.keys.feedback_seen(message.message_id)
        if not self.redis.set(seen_key, "1", nx=True, ex=self.replay_ttl_s):
            log.warning(
                "feedback refused: SNS MessageId %s was already handled (replay or retry)",
                message.message_id,
            )
            return "duplicate"
        try:
            result = self._apply_text(message.message)
        except ParseError as exc:
            log.warning("malformed SES notification in SNS message %s: %s", message.message_id, exc)
            return "invalid"
        except Exception:
            self.redis.delete(seen_key)  # let SNS's retry try again
            raise
        return result.status

    def _apply_text(self, text: str) -> ApplyResult:
        return self.applier.apply(parse_event(text))

    # Batch ingest -----------------------------------------------------------------------

    def ingest(self, path: str | Path, *, verify: bool = False) -> IngestReport:
        """Apply notifications saved one JSON object a line (SNS envelopes from an SQS queue,
        or raw SES notifications from SQS with raw delivery or a log).

        Saved files are the operator's own data: envelopes are checked for signature and topic
        only with ``verify=True`` (their age is not checked: saved messages are old by nature),
        which needs the topic allow-list like the HTTP receivers.
        """
        try:
            with Path(path).open(encoding="utf-8") as handle:
                return self.ingest_lines(handle, verify=verify)
        except OSError as exc:
            raise ValidationError("file", f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValidationError("file", f"{path} is not UTF-8 text") from None

    def ingest_lines(self, lines: Iterable[str], *, verify: bool = False) -> IngestReport:
        if verify:
            self.require_topic_policy()
        report = IngestReport()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            report.lines += 1
            try:
                status, suppressed = self._ingest_one(line, verify)
            except (ParseError, SnsVerificationError) as exc:
                report.invalid += 1
                if len(report.errors) < _MAX_REPORTED_ERRORS:
                    report.errors.append(f"line {number}: {exc}")
                continue
            report.suppressed += suppressed
            if status == "applied":
                report.applied += 1
            elif status == "duplicate":
                report.duplicates += 1
            elif status == "uncorrelated":
                report.uncorrelated += 1
            else:
                report.ignored += 1
        return report

    def _ingest_one(self, line: str, verify: bool) -> tuple[str, int]:
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise ParseError("line", f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ParseError("line", "expected a JSON object")
        if is_sns_envelope(data):
            if verify:
                self.verifier.verify(data, check_age=False)
            if data.get("Type") != NOTIFICATION:
                return "ignored", 0
        envelope, notification = unwrap(data)
        seen_key = None
        if envelope is not None:
            seen_key = self.applier.keys.feedback_seen(str(envelope["MessageId"]))
            if self.redis.exists(seen_key):
                return "duplicate", 0
        result = self.applier.apply(parse_event(notification))
        if seen_key is not None:
            self.redis.set(seen_key, "1", ex=self.replay_ttl_s)
        return result.status, len(result.suppressed)
