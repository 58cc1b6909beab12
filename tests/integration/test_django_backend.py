"""Django EMAIL_BACKEND through a real worker to the sandbox."""

from __future__ import annotations

import email
import email.policy
import re
from email.mime.image import MIMEImage
from email.mime.text import MIMEText

import pytest

django = pytest.importorskip("django")
from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(
        EMAIL_BACKEND="ses_tasks.integrations.django.EmailBackend",
        DEFAULT_FROM_EMAIL="Site <site@example.com>",
        INSTALLED_APPS=[],
        USE_TZ=True,
        SECRET_KEY="test-only",  # AdminEmailHandler's error report needs one
    )
    django.setup()

from django.core import mail  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from ses_tasks.errors import ValidationError  # noqa: E402
from ses_tasks.integrations.django import EmailBackend, message_fields  # noqa: E402
from ses_tasks.message.spec import MessageSpec  # noqa: E402


def ses_tasks_setting(env: dict[str, str]) -> dict[str, str]:
    """The pipeline's environment as a Django ``SES_TASKS`` dict (lower-case keys)."""
    return {k.removeprefix("SES_TASKS_").lower(): v for k, v in env.items()}


def parse(accepted: dict) -> email.message.EmailMessage:
    return email.message_from_string(accepted["data"], policy=email.policy.default)


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
INVITE = (
    "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\n"
    "UID:42@example.com\r\nSUMMARY:Planning ☕\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)


def image(
    content_id: str | None, disposition: str | None = None, filename: str | None = None
) -> MIMEImage:
    """The usual Django recipe for an inline image (``<img src="cid:...">``)."""
    part = MIMEImage(PNG, "png")
    if content_id is not None:
        part.add_header("Content-ID", content_id)
    if disposition is not None:
        params = {} if filename is None else {"filename": filename}
        part.add_header("Content-Disposition", disposition, **params)
    return part


def tree(part: email.message.EmailMessage):
    if part.is_multipart():
        return (part.get_content_type(), [tree(child) for child in part.iter_parts()])
    return part.get_content_type()


def test_multi_alternatives_with_attachments_arrive_intact(make_pipeline):
    pipeline = make_pipeline("starttls")
    pipeline.start_worker(concurrency=1, queues="transactional")
    message = mail.EmailMultiAlternatives(
        subject="Your invoice №42",
        body="Plain text invoice",
        from_email="Billing <billing@example.com>",
        to=["customer@example.com"],
        cc=["accounts@example.com"],
        bcc=["archive@example.com"],
        reply_to=["support@example.com"],
        headers={"X-Invoice": "42", "Message-ID": "<ignored@example.com>"},
    )
    message.attach_alternative("<p>HTML <b>invoice</b></p>", "text/html")
    message.attach("invoice.csv", "item,price\nwidget,3\n", "text/csv")
    message.attach("logo.bin", b"\x00\x01\x02binary", None)
    note = MIMEText("a MIME part", "plain")
    note.add_header("Content-Disposition", "attachment", filename="note.txt")
    message.attach(note)

    with override_settings(SES_TASKS=ses_tasks_setting(pipeline.env)):
        connection = mail.get_connection()
        assert isinstance(connection, EmailBackend)
        assert connection.send_messages([message]) == 1
    record = message.ses_tasks_result.get(timeout=60)
    assert record["state"] == "sent"

    (accepted,) = pipeline.accepted(at_least=1)
    assert sorted(accepted["rcpt_tos"]) == [
        "accounts@example.com",
        "archive@example.com",
        "customer@example.com",
    ]
    parsed = parse(accepted)
    assert parsed["Subject"] == "Your invoice №42"
    assert parsed["Cc"] == "accounts@example.com"
    assert parsed["Bcc"] is None
    assert parsed["Reply-To"] == "support@example.com"
    assert parsed["X-Invoice"] == "42"
    assert parsed.get_body(("plain",)).get_content().strip() == "Plain text invoice"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>HTML <b>invoice</b></p>"
    attachments = {p.get_filename(): p for p in parsed.iter_attachments()}
    assert set(attachments) == {"invoice.csv", "logo.bin", "note.txt"}
    assert attachments["invoice.csv"].get_content_type() == "text/csv"
    assert attachments["invoice.csv"].get_payload(decode=True) == b"item,price\nwidget,3\n"
    assert attachments["logo.bin"].get_content_type() == "application/octet-stream"
    assert attachments["logo.bin"].get_payload(decode=True) == b"\x00\x01\x02binary"
    assert attachments["note.txt"].get_payload(decode=True) == b"a MIME part"


def test_send_mail_shortcut_and_html_message(make_pipeline):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1, queues="transactional")
    with override_settings(SES_TASKS=ses_tasks_setting(pipeline.env)):
        count = mail.send_mail(
            "Welcome",
            "Hello there",
            None,  # DEFAULT_FROM_EMAIL
            ["new@example.com"],
            html_message="<h1>Hello there</h1>",
        )
        # Settings from SES_TASKS override the environment; one client per distinct dict.
        client = EmailBackend().client
        assert client is EmailBackend().client
        assert client.settings.key_prefix == pipeline.env["SES_TASKS_KEY_PREFIX"]
    assert count == 1
    (accepted,) = pipeline.accepted(at_least=1)
    parsed = parse(accepted)
    assert accepted["rcpt_tos"] == ["new@example.com"]
    assert parsed["From"] == "Site <site@example.com>"
    assert parsed["Subject"] == "Welcome"
    assert parsed.get_body(("html",)).get_content().strip() == "<h1>Hello there</h1>"


def test_invalid_message_raises_unless_fail_silently(make_pipeline):
    pipeline = make_pipeline("tls")
    bad = mail.EmailMessage("Hi", "body", "site@example.com", ["not an address"])
    good = mail.EmailMessage("Hi", "body", "site@example.com", ["ok@example.com"])
    with override_settings(SES_TASKS=ses_tasks_setting(pipeline.env)):
        with pytest.raises(ValidationError) as info:
            EmailBackend().send_messages([bad])
        assert info.value.field == "to[0]"
        assert EmailBackend(fail_silently=True).send_messages([bad, good]) == 1
        assert mail.send_mail("Hi", "b", None, ["nope"], fail_silently=True) == 0
    assert pipeline.client.message_status(good.ses_tasks_result.message_id) is not None


def test_html_body_and_header_mapping():
    message = mail.EmailMessage(
        "Subject",
        "<p>html body</p>",
        "a@example.com",
        ["b@example.com"],
        headers={
            "Reply-To": "r1@example.com, r2@example.com",
            "X-SES-CONFIGURATION-SET": "transactional",
            "X-SES-MESSAGE-TAGS": "kind=receipt, app=shop",
            "Date": "ignored",
        },
    )
    message.content_subtype = "html"
    fields = message_fields(message)
    assert fields["html"] == "<p>html body</p>" and "text" not in fields
    assert fields["reply_to"] == ["r1@example.com", "r2@example.com"]
    assert fields["configuration_set"] == "transactional"
    assert fields["tags"] == {"kind": "receipt", "app": "shop"}
    assert "headers" not in fields


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda m: m.extra_headers.update({"To": "x@example.com"}), "headers.To"),
        (lambda m: m.attach_alternative("x", "multipart/mixed"), "alternatives[0]"),
        (lambda m: m.attach_alternative("x", "message/rfc822"), "alternatives[0]"),
        (lambda m: m.attach_alternative(b"%PDF", "application/pdf"), "alternatives[0]"),
        (lambda m: m.attach_alternative("more text", "text/plain"), "alternatives[0]"),
        (
            lambda m: [m.attach_alternative(f"<p>{i}</p>", "text/html") for i in (1, 2)],
            "alternatives[1]",
        ),
        (
            lambda m: [m.attach_alternative("x", "text/calendar") for _ in (1, 2)],
            "alternatives[1].content_type",
        ),
        (lambda m: m.attach(MIMEText("inline")), "attachments[0]"),
        (lambda m: m.attach(image("two words")), "attachments[0].content_id"),
        (
            lambda m: m.attach(image("<a@b>\r\nBcc: x@example.com")),
            "attachments[0].content_id",
        ),
    ],
)
def test_unsupported_parts_are_refused_by_name(build, field):
    message = mail.EmailMultiAlternatives("S", "b", "a@example.com", ["b@example.com"])
    build(message)
    with pytest.raises(ValidationError) as info:
        MessageSpec.model_validate(message_fields(message))  # what send_email runs
    assert info.value.field == field


def test_mail_admins_and_admin_email_handler_with_the_default_server_email(caplog):
    """Django's SERVER_EMAIL defaults to root@localhost, which SES cannot send from:
    mail_admins says so, and AdminEmailHandler (silent) logs why instead of dropping."""
    import logging

    from django.utils.log import AdminEmailHandler

    with override_settings(
        ADMINS=[("Ops", "ops@example.com")],
        SERVER_EMAIL="root@localhost",
        SES_TASKS={"host": "localhost", "port": 465},
    ):
        with pytest.raises(ValidationError, match="SERVER_EMAIL"):
            mail.mail_admins("disk full", "the disk is full")
        caplog.set_level(logging.WARNING, logger="ses_tasks.integrations.django")
        record = logging.LogRecord("app", logging.ERROR, __file__, 1, "boom", None, None)
        AdminEmailHandler().emit(record)
    [warning] = [r for r in caplog.records if "not sent" in r.getMessage()]
    assert "root@localhost" in warning.getMessage() and "SERVER_EMAIL" in warning.getMessage()


def test_the_default_server_email_is_named_loudly_and_logged_when_silent(caplog):
    import logging

    message = mail.EmailMessage("disk full", "body", "root@localhost", ["ops@example.com"])
    backend = EmailBackend(ses_tasks={"host": "localhost", "port": 465})
    with override_settings(SERVER_EMAIL="root@localhost"):
        with pytest.raises(ValidationError) as raised:
            backend.send_messages([message])
        assert raised.value.field == "from"
        assert "SERVER_EMAIL" in str(raised.value) and "verified in SES" in str(raised.value)

        caplog.set_level(logging.WARNING, logger="ses_tasks.integrations.django")
        silent = EmailBackend(fail_silently=True, ses_tasks={"host": "localhost", "port": 465})
        assert silent.send_messages([message]) == 0
    [record] = [r for r in caplog.records if "not sent" in r.getMessage()]
    assert "SERVER_EMAIL" in record.getMessage() and "disk full" in record.getMessage()


def test_inline_images_and_extra_alternatives_are_converted():
    message = mail.EmailMultiAlternatives("S", "text", "a@example.com", ["b@example.com"])
    message.attach_alternative("<html amp4email></html>", "text/x-amp-html")
    message.attach_alternative('<img src="cid:logo@example.com">', "text/html")
    message.attach_alternative(INVITE, 'text/calendar; method="REQUEST"; charset=utf-8')
    message.attach(image("<logo@example.com>", "inline"))  # no filename
    message.attach(image("<named>", "inline", filename="logo.png"))
    message.attach(image("<bare>"))  # a Content-ID and no disposition: inline too
    message.attach(image("<kept@example.com>", "attachment", filename="photo.png"))
    fields = message_fields(message)
    assert fields["text"] == "text" and fields["html"] == '<img src="cid:logo@example.com">'
    assert [(a.content_type, a.params, a.after_html) for a in fields["alternatives"]] == [
        ("text/x-amp-html", {}, False),
        ("text/calendar", {"method": "REQUEST"}, True),
    ]
    attachments = fields["attachments"]
    assert [(a.filename, a.content_id, a.inline) for a in attachments] == [
        (None, "logo@example.com", True),
        ("logo.png", "named", True),
        (None, "bare", True),
        ("photo.png", "kept@example.com", False),
    ]
    assert all(a.content == PNG and a.content_type == "image/png" for a in attachments)


def test_html_body_with_a_text_alternative_puts_text_first():
    message = mail.EmailMultiAlternatives("S", "<p>html</p>", "a@example.com", ["b@example.com"])
    message.content_subtype = "html"
    message.attach_alternative("plain", "text/plain")
    message.attach_alternative(INVITE, "text/calendar")
    fields = message_fields(message)
    assert (fields["text"], fields["html"]) == ("plain", "<p>html</p>")
    (calendar,) = fields["alternatives"]
    assert calendar.after_html  # Django's order: the html body came first


def test_inline_image_and_calendar_invite_arrive_intact(make_pipeline):
    pipeline = make_pipeline("starttls")
    pipeline.start_worker(concurrency=1, queues="transactional")
    html = '<p>Our logo: <img src="cid:logo@example.com"></p>'
    message = mail.EmailMultiAlternatives(
        subject="Planning",
        body="You are invited",
        from_email="Team <team@example.com>",
        to=["guest@example.com"],
    )
    message.attach_alternative(html, "text/html")
    message.attach_alternative(INVITE, "text/calendar; method=REQUEST")
    message.attach(image("<logo@example.com>", "inline"))
    message.attach("agenda.txt", "1. coffee\n", "text/plain")

    with override_settings(SES_TASKS=ses_tasks_setting(pipeline.env)):
        assert mail.get_connection().send_messages([message]) == 1
    assert message.ses_tasks_result.get(timeout=60)["state"] == "sent"

    (accepted,) = pipeline.accepted(at_least=1)
    parsed = parse(accepted)
    assert tree(parsed) == (
        "multipart/mixed",
        [
            (
                "multipart/alternative",
                [
                    "text/plain",
                    ("multipart/related", ["text/html", "image/png"]),
                    "text/calendar",
                ],
            ),
            "text/plain",
        ],
    )
    received_html = parsed.get_body(("related",)).get_body(("html",)).get_content()
    (cid,) = re.findall(r'src="cid:([^"]+)"', received_html)
    [logo] = [p for p in parsed.walk() if p["Content-ID"] == f"<{cid}>"]
    assert logo.get_content_type() == "image/png"
    assert logo.get_content_disposition() == "inline"
    assert logo.get_payload(decode=True) == PNG
    [calendar] = [p for p in parsed.walk() if p.get_content_type() == "text/calendar"]
    assert calendar.get_param("method") == "REQUEST"
    assert calendar.get_content() == INVITE
    (agenda,) = parsed.iter_attachments()
    assert agenda.get_filename() == "agenda.txt"
    assert agenda.get_payload(decode=True) == b"1. coffee\n"


def test_message_metadata_travels_like_anymail():
    message = mail.EmailMessage("Hi", "body", "site@example.com", ["u@example.com"])
    message.metadata = {"user_id": 42}  # type: ignore[attr-defined]
    assert message_fields(message)["metadata"] == {"user_id": 42}
    assert "metadata" not in message_fields(
        mail.EmailMessage("Hi", "body", "site@example.com", ["u@example.com"])
    )
