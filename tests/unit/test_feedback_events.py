"""Parsing AWS's documented example notifications, in both shapes, and malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ses_tasks.feedback.events import (
    Bounce,
    Complaint,
    Delivery,
    DeliveryDelay,
    EventKind,
    ParseError,
    Reject,
    parse_event,
    unwrap,
)
from ses_tasks.feedback.testing import SnsTestSigner

FIXTURES = Path(__file__).parent.parent / "fixtures" / "feedback"


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def test_identity_bounce_with_dsn():
    event = parse_event(load("notification_bounce_dsn"))
    assert event.kind is EventKind.BOUNCE and event.shape == "notification"
    assert event.ses_message_id == "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000"
    bounce = event.detail
    assert isinstance(bounce, Bounce)
    assert (bounce.bounce_type, bounce.bounce_subtype) == ("Permanent", "General")
    assert bounce.permanent and not bounce.transient
    assert bounce.recipients[0].email == "jane@example.com"
    assert bounce.recipients[0].status == "5.1.1"
    assert bounce.recipients[0].diagnostic_code == "smtp; 550 5.1.1 <jane@example.com>... User"
    assert bounce.reporting_mta == "dns; email.example.com"
    assert event.recipients == ("jane@example.com",)
    assert event.mail.destination == ("jane@example.com", "mary@example.com", "richard@example.com")


def test_identity_bounce_without_dsn():
    event = parse_event(load("notification_bounce_no_dsn"))
    assert isinstance(event.detail, Bounce)
    assert event.recipients == ("jane@example.com", "richard@example.com")
    assert event.detail.recipients[0].diagnostic_code == ""


def test_identity_complaint():
    event = parse_event(load("notification_complaint"))
    assert event.kind is EventKind.COMPLAINT
    assert isinstance(event.detail, Complaint)
    assert event.detail.recipients == ("richard@example.com",)
    assert event.detail.feedback_type == "abuse"
    assert event.detail.user_agent == "AnyCompany Feedback Loop (V0.01)"


def test_identity_delivery():
    event = parse_event(load("notification_delivery"))
    assert isinstance(event.detail, Delivery)
    assert event.detail.recipients == ("jane@example.com",)
    assert event.detail.processing_time_ms == 546
    assert event.detail.smtp_response == "250 ok:  Message 64111812 accepted"


@pytest.mark.parametrize(
    ("name", "kind", "detail_type"),
    [
        ("event_bounce", EventKind.BOUNCE, Bounce),
        ("event_complaint", EventKind.COMPLAINT, Complaint),
        ("event_delivery", EventKind.DELIVERY, Delivery),
        ("event_delivery_delay", EventKind.DELIVERY_DELAY, DeliveryDelay),
        ("event_reject", EventKind.REJECT, Reject),
    ],
)
def test_configuration_set_events(name, kind, detail_type):
    event = parse_event(load(name))
    assert event.kind is kind and event.shape == "event"
    assert isinstance(event.detail, detail_type)
    assert event.ses_message_id.endswith("-000000")
    assert event.mail.tags["ses:configuration-set"] == ("ConfigSet",)


def test_delivery_delay_and_reject_details():
    delay = parse_event(load("event_delivery_delay")).detail
    assert isinstance(delay, DeliveryDelay)
    assert delay.delay_type == "TransientCommunicationFailure"
    assert delay.recipients[0].status == "4.4.1"
    assert delay.expiration_time == "2020-06-16T00:25:40.914Z"
    reject = parse_event(load("event_reject")).detail
    assert reject == Reject("Bad content")


def test_unknown_fields_are_ignored():
    data = load("event_bounce")
    data["brandNewField"] = {"x": 1}
    data["bounce"]["anotherNewField"] = [1, 2]
    data["mail"]["futureThing"] = True
    assert parse_event(data).detail == parse_event(load("event_bounce")).detail


def test_other_event_types_parse_as_other():
    data = load("event_delivery")
    data["eventType"] = "Open"
    data["open"] = {"ipAddress": "192.0.2.1"}
    event = parse_event(data)
    assert event.kind is EventKind.OTHER and event.type_name == "Open"


def test_json_text_and_bytes_are_accepted():
    text = (FIXTURES / "event_reject.json").read_text()
    assert parse_event(text) == parse_event(text.encode())


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d.pop("eventType"), "notificationType"),
        (lambda d: d.pop("mail"), "mail"),
        (lambda d: d["mail"].pop("messageId"), "mail.messageId"),
        (lambda d: d["mail"].update(messageId=12), "mail.messageId"),
        (lambda d: d.pop("bounce"), "bounce"),
        (lambda d: d["bounce"].pop("bounceType"), "bounce.bounceType"),
        (lambda d: d["bounce"].update(bouncedRecipients={}), "bounce.bouncedRecipients"),
        (
            lambda d: d["bounce"]["bouncedRecipients"][0].pop("emailAddress"),
            "bounce.bouncedRecipients[0].emailAddress",
        ),
        (
            lambda d: d["bounce"]["bouncedRecipients"].append("x@example.com"),
            "bounce.bouncedRecipients[1]",
        ),
        (lambda d: d["mail"].update(destination=[1]), "mail.destination[0]"),
    ],
)
def test_malformed_notifications_raise_parse_error_with_path(mutate, path):
    data = load("event_bounce")
    mutate(data)
    with pytest.raises(ParseError) as info:
        parse_event(data)
    assert info.value.field == path


def test_not_json_and_not_an_object():
    with pytest.raises(ParseError, match="not JSON"):
        parse_event("{nope")
    with pytest.raises(ParseError) as info:
        parse_event([1, 2])
    assert info.value.field == "notification"


def test_unwrap_sns_envelope_and_raw():
    raw = load("notification_complaint")
    assert unwrap(raw) == (None, raw)
    envelope = SnsTestSigner().notification(raw)
    got_envelope, inner = unwrap(envelope)
    assert got_envelope is envelope and inner == raw
