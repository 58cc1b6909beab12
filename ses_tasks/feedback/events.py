"""SES notifications, parsed into typed records.

Two shapes carry the same information: identity notifications (``notificationType``) and
configuration-set event publishing (``eventType``). Fields SES may add later are ignored;
a field we need that is missing or of the wrong type raises ``ParseError`` naming its path
(``bounce.bouncedRecipients[0].emailAddress``), so a bad record is reported, not crashed on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ses_tasks.errors import ValidationError
from ses_tasks.feedback.sns import is_sns_envelope

__all__ = [
    "Bounce",
    "BouncedRecipient",
    "Complaint",
    "Delivery",
    "DeliveryDelay",
    "EventKind",
    "Mail",
    "ParseError",
    "Reject",
    "SesEvent",
    "parse_event",
    "parse_json",
]


class ParseError(ValidationError):
    """A notification is malformed; ``field`` is the JSON path of the problem."""


class EventKind(StrEnum):
    DELIVERY = "Delivery"
    BOUNCE = "Bounce"
    COMPLAINT = "Complaint"
    DELIVERY_DELAY = "DeliveryDelay"
    REJECT = "Reject"
    #: Send, Open, Click, Rendering Failure, Subscription: parsed, not acted on.
    OTHER = "Other"


@dataclass(frozen=True, slots=True)
class Mail:
    message_id: str
    timestamp: str = ""
    source: str = ""
    destination: tuple[str, ...] = ()
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BouncedRecipient:
    email: str
    status: str = ""
    action: str = ""
    diagnostic_code: str = ""


@dataclass(frozen=True, slots=True)
class Bounce:
    #: ``Permanent``, ``Transient`` or ``Undetermined``.
    bounce_type: str
    #: ``General``, ``NoEmail``, ``Suppressed``, ``OnAccountSuppressionList``, ``MailboxFull``...
    bounce_subtype: str
    recipients: tuple[BouncedRecipient, ...]
    timestamp: str = ""
    feedback_id: str = ""
    reporting_mta: str = ""

    @property
    def permanent(self) -> bool:
        return self.bounce_type == "Permanent"

    @property
    def transient(self) -> bool:
        return self.bounce_type == "Transient"


@dataclass(frozen=True, slots=True)
class Complaint:
    recipients: tuple[str, ...]
    #: ``abuse``, ``auth-failure``, ``fraud``, ``not-spam``, ``other``, ``virus``, or "".
    feedback_type: str = ""
    timestamp: str = ""
    feedback_id: str = ""
    user_agent: str = ""
    sub_type: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    recipients: tuple[str, ...]
    timestamp: str = ""
    processing_time_ms: int = 0
    smtp_response: str = ""
    reporting_mta: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryDelay:
    delay_type: str
    recipients: tuple[BouncedRecipient, ...]
    timestamp: str = ""
    expiration_time: str = ""
    reporting_mta: str = ""


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str


Detail = Bounce | Complaint | Delivery | DeliveryDelay | Reject | None


@dataclass(frozen=True, slots=True)
class SesEvent:
    kind: EventKind
    mail: Mail
    detail: Detail = None
    #: The type as SES wrote it (``Open`` for ``EventKind.OTHER``).
    type_name: str = ""
    #: ``notification`` (identity, ``notificationType``) or ``event`` (``eventType``).
    shape: str = "notification"

    @property
    def ses_message_id(self) -> str:
        return self.mail.message_id

    @property
    def recipients(self) -> tuple[str, ...]:
        """The addresses this event is about (the bounced, complained, delivered ones)."""
        detail = self.detail
        if isinstance(detail, Bounce | DeliveryDelay):
            return tuple(r.email for r in detail.recipients)
        if isinstance(detail, Complaint | Delivery):
            return detail.recipients
        return self.mail.destination


# ----------------------------------------------------------------------------------------


def _obj(data: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ParseError(path, f"expected an object, got {type(data).__name__}")
    return data


def _str(data: Mapping[str, Any], name: str, path: str, *, required: bool = False) -> str:
    value = data.get(name)
    if value is None:
        if required:
            raise ParseError(f"{path}.{name}", "missing")
        return ""
    if not isinstance(value, str):
        raise ParseError(f"{path}.{name}", f"expected a string, got {type(value).__name__}")
    if required and not value:
        raise ParseError(f"{path}.{name}", "empty")
    return value


def _list(data: Mapping[str, Any], name: str, path: str, *, required: bool = False) -> list[Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise ParseError(f"{path}.{name}", "missing")
        return []
    if not isinstance(value, list):
        raise ParseError(f"{path}.{name}", f"expected a list, got {type(value).__name__}")
    return value


def _strings(data: Mapping[str, Any], name: str, path: str) -> tuple[str, ...]:
    items = _list(data, name, path)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ParseError(f"{path}.{name}[{i}]", "expected a string")
    return tuple(items)


def _recipients(data: Mapping[str, Any], name: str, path: str) -> tuple[BouncedRecipient, ...]:
    out = []
    for i, item in enumerate(_list(data, name, path, required=True)):
        where = f"{path}.{name}[{i}]"
        entry = _obj(item, where)
        out.append(
            BouncedRecipient(
                email=_str(entry, "emailAddress", where, required=True),
                status=_str(entry, "status", where),
                action=_str(entry, "action", where),
                diagnostic_code=_str(entry, "diagnosticCode", where),
            )
        )
    return tuple(out)


def _addresses(data: Mapping[str, Any], name: str, path: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(_list(data, name, path, required=True)):
        if isinstance(item, str):  # Delivery.recipients is a list of strings
            out.append(item)
        else:
            where = f"{path}.{name}[{i}]"
            out.append(_str(_obj(item, where), "emailAddress", where, required=True))
    return tuple(out)


def _mail(data: Any) -> Mail:
    mail = _obj(data, "mail")
    tags: dict[str, tuple[str, ...]] = {}
    raw_tags = mail.get("tags")
    if isinstance(raw_tags, Mapping):
        for name, values in raw_tags.items():
            if isinstance(values, list):
                tags[str(name)] = tuple(str(v) for v in values)
    return Mail(
        message_id=_str(mail, "messageId", "mail", required=True),
        timestamp=_str(mail, "timestamp", "mail"),
        source=_str(mail, "source", "mail"),
        destination=_strings(mail, "destination", "mail"),
        tags=tags,
    )


def _int(data: Mapping[str, Any], name: str, path: str) -> int:
    value = data.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParseError(f"{path}.{name}", "expected a number")
    return int(value)


def _detail(kind: EventKind, data: Mapping[str, Any]) -> Detail:
    if kind is EventKind.BOUNCE:
        b = _obj(data.get("bounce"), "bounce")
        return Bounce(
            bounce_type=_str(b, "bounceType", "bounce", required=True),
            bounce_subtype=_str(b, "bounceSubType", "bounce") or "Undetermined",
            recipients=_recipients(b, "bouncedRecipients", "bounce"),
            timestamp=_str(b, "timestamp", "bounce"),
            feedback_id=_str(b, "feedbackId", "bounce"),
            reporting_mta=_str(b, "reportingMTA", "bounce"),
        )
    if kind is EventKind.COMPLAINT:
        c = _obj(data.get("complaint"), "complaint")
        return Complaint(
            recipients=_addresses(c, "complainedRecipients", "complaint"),
            feedback_type=_str(c, "complaintFeedbackType", "complaint"),
            timestamp=_str(c, "timestamp", "complaint"),
            feedback_id=_str(c, "feedbackId", "complaint"),
            user_agent=_str(c, "userAgent", "complaint"),
            sub_type=_str(c, "complaintSubType", "complaint"),
        )
    if kind is EventKind.DELIVERY:
        d = _obj(data.get("delivery"), "delivery")
        return Delivery(
            recipients=_addresses(d, "recipients", "delivery"),
            timestamp=_str(d, "timestamp", "delivery"),
            processing_time_ms=_int(d, "processingTimeMillis", "delivery"),
            smtp_response=_str(d, "smtpResponse", "delivery"),
            reporting_mta=_str(d, "reportingMTA", "delivery"),
        )
    if kind is EventKind.DELIVERY_DELAY:
        d = _obj(data.get("deliveryDelay"), "deliveryDelay")
        return DeliveryDelay(
            delay_type=_str(d, "delayType", "deliveryDelay", required=True),
            recipients=_recipients(d, "delayedRecipients", "deliveryDelay"),
            timestamp=_str(d, "timestamp", "deliveryDelay"),
            expiration_time=_str(d, "expirationTime", "deliveryDelay"),
            reporting_mta=_str(d, "reportingMTA", "deliveryDelay"),
        )
    if kind is EventKind.REJECT:
        r = _obj(data.get("reject"), "reject")
        return Reject(reason=_str(r, "reason", "reject"))
    return None


def parse_event(data: Any) -> SesEvent:
    """Parse one SES notification (a dict, or its JSON text); raises ``ParseError``."""
    if isinstance(data, str | bytes):
        data = parse_json(data, "notification")
    top = _obj(data, "notification")
    if "eventType" in top:
        shape, type_field = "event", "eventType"
    elif "notificationType" in top:
        shape, type_field = "notification", "notificationType"
    else:
        raise ParseError("notificationType", "missing (neither notificationType nor eventType)")
    type_name = _str(top, type_field, "notification", required=True)
    try:
        kind = EventKind(type_name)
    except ValueError:
        kind = EventKind.OTHER
    if kind is EventKind.OTHER and type_name == "AmazonSnsSubscriptionSucceeded":
        return SesEvent(kind, Mail(message_id=""), None, type_name, shape)
    return SesEvent(kind, _mail(top.get("mail")), _detail(kind, top), type_name, shape)


def parse_json(text: str | bytes, path: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParseError(path, f"not JSON: {exc}") from None


def unwrap(data: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, Any]:
    """Split a saved record into (SNS envelope or None, SES notification)."""
    if is_sns_envelope(data):
        message = data.get("Message")
        if not isinstance(message, str):
            raise ParseError("Message", "expected a JSON string")
        return data, parse_json(message, "Message")
    return None, data
