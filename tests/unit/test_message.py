"""MessageSpec validation, render_message, and equivalence with the ``email`` package."""

from __future__ import annotations

import email
import email.policy
import email.utils
import itertools
import json
import re
from typing import Any

import pytest

from ses_tasks import mime
from ses_tasks.errors import ValidationError
from ses_tasks.message.spec import (
    DEFAULT_MAX_BYTES,
    MAX_RECIPIENTS,
    Alternative,
    Attachment,
    CampaignTemplate,
    MessageSpec,
    RenderedMessage,
    parse_address,
    render_message,
    to_email_message,
)

SENDER = "sender@example.com"
ADDRESS_HEADERS = ("from", "to", "cc", "reply-to")
IGNORED_HEADERS = ("date", "content-type", "content-transfer-encoding", "mime-version")


def spec(**overrides: Any) -> MessageSpec:
    fields: dict[str, Any] = {
        "from_": SENDER,
        "to": ["rcpt@example.com"],
        "subject": "Hello",
        "text": "Hi there\n",
    }
    fields.update(overrides)
    return MessageSpec(**fields)


def refused(field: str, fragment: str, **overrides: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        render_message(spec(**overrides))
    assert info.value.field == field, str(info.value)
    assert fragment in info.value.problem, str(info.value)
    return info.value


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def summary(data: bytes) -> dict[str, Any]:
    """What a reader sees: decoded headers (Date aside) and decoded leaf parts."""
    msg = parse(data)
    headers: dict[str, Any] = {}
    for name in {key.lower() for key in msg}:
        if name in IGNORED_HEADERS:
            continue
        value = msg[name]
        if name in ADDRESS_HEADERS:
            headers[name] = [(a.display_name, a.addr_spec) for a in value.addresses]
        else:
            headers[name] = str(value)
    parts = [
        (part.get_content_type(), part.get_filename(), part.get_content())
        for part in msg.walk()
        if not part.is_multipart()
    ]
    structure = [part.get_content_type() for part in msg.walk()]
    return {"headers": headers, "parts": parts, "structure": structure}


def assert_wire_format(data: bytes) -> None:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert data.isascii(), "8-bit data"
    assert max(len(line) for line in data.split(b"\r\n")) <= mime.MAX_LINE_OCTETS


def normalized_body(text: str) -> str:
    """How the email package (and we) store text: CRLF line ends, a final line break."""
    # bytes.splitlines: CR, LF and CRLF end a line (not U+2028 and friends).
    return "".join(line.decode() + "\r\n" for line in text.encode().splitlines()) or "\r\n"


# --------------------------------------------------------------------------- addresses


def test_idn_domain_becomes_punycode_in_envelope_and_headers() -> None:
    rendered = render_message(
        spec(from_="Büro <office@bücher.de>", to=["user@bücher.de"], cc=["c@ÉCOLE.fr"])
    )
    assert rendered.envelope_from == "office@xn--bcher-kva.de"
    assert rendered.recipients == ["user@xn--bcher-kva.de", "c@xn--cole-9oa.fr"]
    msg = parse(rendered.data)
    assert msg["To"].addresses[0].addr_spec == "user@xn--bcher-kva.de"
    assert msg["From"].addresses[0].display_name == "Büro"
    assert b"@xn--bcher-kva.de>" in rendered.data
    assert_wire_format(rendered.data)


def test_non_ascii_local_part_is_refused() -> None:
    refused("to[1]", "non-ASCII characters before the @", to=["ok@example.com", "jörg@example.com"])
    refused("from", "non-ASCII", from_="jörg@example.com")


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("from", {"from_": "not-an-address"}),
        ("to[2]", {"to": ["a@example.com", "b@example.com", "c@@example.com"]}),
        ("cc[0]", {"cc": ["nobody"]}),
        ("bcc[0]", {"bcc": ["x@localhost"]}),
        ("reply_to[0]", {"reply_to": ["Name <broken>"]}),
        ("to[0]", {"to": ["a..b@example.com"]}),
        ("to[0]", {"to": [""]}),
    ],
)
def test_bad_address_names_the_field(field: str, overrides: dict[str, Any]) -> None:
    error = refused(field, "", **overrides)
    assert error.problem


def test_display_names_are_encoded_and_parse_back() -> None:
    names = ["Plain Name", "Doe, John", 'Say "hi"', "Jöhn Dœ", "日本語の名前", "spaced out"]
    quoted = [f'"{n}"' if "," in n or '"' in n else n for n in names]
    quoted[5] = '"  spaced \t  out "'
    quoted[2] = '"Say \\"hi\\""'
    rendered = render_message(
        spec(
            from_=f"{quoted[3]} <news@example.com>",
            to=[f"{q} <u{i}@example.com>" for i, q in enumerate(quoted)],
            reply_to=[f"{quoted[4]} <reply@example.com>"],
        )
    )
    msg = parse(rendered.data)
    assert [a.display_name for a in msg["To"].addresses] == names
    assert msg["From"].addresses[0].display_name == "Jöhn Dœ"
    assert msg["Reply-To"].addresses[0].display_name == "日本語の名前"
    assert rendered.recipients == [f"u{i}@example.com" for i in range(len(names))]
    assert_wire_format(rendered.data)


def test_parse_address_strict_mode_refuses_display_name() -> None:
    with pytest.raises(ValidationError, match="bare address"):
        parse_address("Name <a@example.com>", "x", allow_display_name=False)
    assert parse_address("A@Example.COM", "x").addr_spec == "A@example.com"


# --------------------------------------------------------------------------- injection


@pytest.mark.parametrize("bad", ["a\r\nBcc: evil@example.com", "a\nb", "a\rb", "a\x00b"])
def test_cr_lf_nul_refused_in_subject(bad: str) -> None:
    error = refused("subject", "", subject=bad)
    assert "CR or LF" in error.problem or "NUL" in error.problem


def test_control_characters_refused_in_subject() -> None:
    refused("subject", "U+000B", subject="a\x0bb")


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("from", {"from_": "Evil\r\nBcc: x@example.com <a@example.com>"}),
        ("to[0]", {"to": ["a@example.com\r\nBcc: x@example.com"]}),
        ("headers.X-Foo", {"headers": {"X-Foo": "bar\r\nBcc: x@example.com"}}),
        ("headers.X-Foo\r\nBcc", {"headers": {"X-Foo\r\nBcc": "x"}}),
        (
            "attachments[0].filename",
            {"attachments": [{"filename": "a\r\n.txt", "content_b64": "YQ=="}]},
        ),
        ("list_unsubscribe_url", {"list_unsubscribe_url": "https://x.example.com/\r\nBcc: x"}),
        ("list_unsubscribe_mailto", {"list_unsubscribe_mailto": "u@example.com\nBcc: x"}),
    ],
)
def test_cr_lf_refused_in_every_header_source(field: str, overrides: dict[str, Any]) -> None:
    refused(field, "CR or LF", **overrides)


def test_tag_with_newline_is_refused() -> None:
    refused("tags.campaign", "tag values", tags={"campaign": "a\r\nb"})


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize("name", ["X Foo", "X:Foo", "Xé", ""])
def test_invalid_header_names(name: str) -> None:
    refused(f"headers.{name}", "not a valid header name", headers={name: "v"})


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "to",
        "CC",
        "Bcc",
        "Subject",
        "Message-ID",
        "Date",
        "MIME-Version",
        "Content-Type",
        "content-transfer-encoding",
        "Content-Disposition",
        "X-SES-CONFIGURATION-SET",
        "x-ses-message-tags",
        "X-SES-SOURCE-ARN",
        "Reply-To",
        "List-Unsubscribe",
    ],
)
def test_reserved_headers_cannot_be_set(name: str) -> None:
    refused(f"headers.{name}", "set by ses-tasks", headers={name: "x"})


def test_duplicate_header_names_ignoring_case_refused() -> None:
    refused("headers.x-foo", "given twice", headers={"X-Foo": "a", "x-foo": "b"})


def test_extra_headers_are_rendered_and_encoded() -> None:
    long_value = " ".join(["word"] * 60)
    rendered = render_message(
        spec(headers={"X-Campaign": "spring", "X-Note": "Grüße", "X-Long": long_value})
    )
    msg = parse(rendered.data)
    assert msg["X-Campaign"] == "spring"
    assert msg["X-Note"] == "Grüße"
    assert msg["X-Long"] == long_value
    assert_wire_format(rendered.data)
    assert max(len(line) for line in rendered.data.split(b"\r\n")) <= mime.FOLD_COLUMNS


# --------------------------------------------------------------------------- limits


def test_fifty_recipients_accepted_fifty_one_refused() -> None:
    addrs = [f"u{i}@example.com" for i in range(MAX_RECIPIENTS + 1)]
    rendered = render_message(spec(to=addrs[:20], cc=addrs[20:40], bcc=addrs[40:50]))
    assert rendered.recipients == addrs[:50]
    error = refused("to", "51 recipients", to=addrs[:20], cc=addrs[20:40], bcc=addrs[40:])
    assert "at most 50" in error.problem


def test_zero_recipients_refused() -> None:
    refused("to", "at least one recipient", to=[])


def test_bcc_only_in_envelope() -> None:
    rendered = render_message(spec(to=["a@example.com"], bcc=["hidden@example.com"]))
    assert "hidden@example.com" in rendered.recipients
    assert b"hidden" not in rendered.data
    assert parse(rendered.data)["Bcc"] is None


def test_oversized_message_refused_with_sizes() -> None:
    with pytest.raises(ValidationError) as info:
        render_message(spec(text="x" * 5000), max_bytes=2000)
    assert info.value.field == "message"
    assert "over the limit of 2,000 bytes" in info.value.problem
    assert re.search(r"is [\d,]+ bytes", info.value.problem)


def test_oversized_attachment_refused() -> None:
    attachment = Attachment.from_bytes("big.bin", b"\0" * 3000)
    with pytest.raises(ValidationError) as info:
        render_message(spec(attachments=[attachment]), max_bytes=3000)
    assert info.value.field == "attachments[0]"
    assert "'big.bin'" in info.value.problem and "3,000 bytes" in info.value.problem


def test_default_limit_is_ten_megabytes() -> None:
    assert DEFAULT_MAX_BYTES == 10 * 1024 * 1024
    big = Attachment.from_bytes("big.bin", b"\1" * (8 * 1024 * 1024))
    with pytest.raises(ValidationError, match="attachments\\[0\\]"):
        render_message(spec(attachments=[big]))


# --------------------------------------------------------------------------- fields


def test_text_or_html_required() -> None:
    refused("text", "text or an html body", text=None, html=None)


def test_lone_surrogate_refused() -> None:
    refused("text", "lone surrogate", text="a\ud800b")
    refused("subject", "lone surrogate", subject="a\udfffb")


@pytest.mark.parametrize("name", ["ok_name-1", "A" * 64])
def test_valid_configuration_set(name: str) -> None:
    rendered = render_message(spec(configuration_set=name))
    assert parse(rendered.data)["X-SES-CONFIGURATION-SET"] == name


@pytest.mark.parametrize("name", ["", "A" * 65, "has space", "dot.ted", "ünï"])
def test_invalid_configuration_set(name: str) -> None:
    refused("configuration_set", "1 to 64 ASCII letters", configuration_set=name)


def test_tags_rendered_as_one_header() -> None:
    rendered = render_message(spec(tags={"campaign": "spring-2025", "kind": "news_letter"}))
    assert parse(rendered.data)["X-SES-MESSAGE-TAGS"] == "campaign=spring-2025, kind=news_letter"


@pytest.mark.parametrize(
    ("tags", "field", "fragment"),
    [
        ({"has space": "v"}, "tags.has space", "tag names"),
        ({"ok": "dot.ted"}, "tags.ok", "tag values"),
        ({"ok": ""}, "tags.ok", "tag values"),
        ({"näme": "v"}, "tags.näme", "tag names"),
        ({f"t{i}": "v" * 20 for i in range(12)}, "tags", "SES allows 256"),
        ({f"t{i}": "v" for i in range(51)}, "tags", "more than 50"),
    ],
)
def test_invalid_tags(tags: dict[str, str], field: str, fragment: str) -> None:
    refused(field, fragment, tags=tags)


def test_list_unsubscribe_with_one_click_post() -> None:
    rendered = render_message(
        spec(
            list_unsubscribe_url="https://example.com/u?t=abc%2C1",
            list_unsubscribe_mailto="mailto:unsub@bücher.de?subject=unsubscribe",
        )
    )
    msg = parse(rendered.data)
    assert msg["List-Unsubscribe"] == (
        "<https://example.com/u?t=abc%2C1>, <mailto:unsub@xn--bcher-kva.de?subject=unsubscribe>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_mailto_only_has_no_one_click_post() -> None:
    msg = parse(render_message(spec(list_unsubscribe_mailto="unsub@example.com")).data)
    assert msg["List-Unsubscribe"] == "<mailto:unsub@example.com>"
    assert msg["List-Unsubscribe-Post"] is None


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://example.com/u", "https://"),
        ("https:///path", "https://"),
        ("https://example.com/a b", "percent-encode"),
        ("https://example.com/a,b", "percent-encode"),
        ("https://example.com/ü", "percent-encode"),
        ("https://example.com/" + "a" * 1000, "longer than"),
        ("https://example.com/?a==?q?x?=", "RFC 2047"),
    ],
)
def test_invalid_unsubscribe_url(url: str, fragment: str) -> None:
    refused("list_unsubscribe_url", fragment, list_unsubscribe_url=url)


def test_invalid_unsubscribe_mailto() -> None:
    refused("list_unsubscribe_mailto", "not a valid email address", list_unsubscribe_mailto="x")


@pytest.mark.parametrize("key", ["", "k" * 129, "tab\there", "ünï"])
def test_invalid_idempotency_key(key: str) -> None:
    refused("idempotency_key", "printable ASCII", idempotency_key=key)


def test_valid_idempotency_key_is_kept_in_json_not_in_mime() -> None:
    message = spec(idempotency_key="order-42 / mail #1" + "k" * 100)
    assert MessageSpec.model_validate(message.model_dump(mode="json", by_alias=True)) == message
    assert b"order-42" not in render_message(message).data


@pytest.mark.parametrize(
    ("attachment", "field", "fragment"),
    [
        ({"filename": "a/b.txt", "content_b64": "YQ=="}, "filename", "bare file name"),
        ({"filename": "  ", "content_b64": "YQ=="}, "filename", "is empty"),
        ({"filename": "a.txt", "content_b64": "not base64!"}, "content_b64", "not valid base64"),
        (
            {"filename": "a.txt", "content_type": "text", "content_b64": "YQ=="},
            "content_type",
            "type/subtype",
        ),
        (
            {"filename": "a.txt", "content_type": "text/plain; charset=x", "content_b64": "YQ=="},
            "content_type",
            "no parameters",
        ),
        (
            {"filename": "a.eml", "content_type": "message/rfc822", "content_b64": "YQ=="},
            "content_type",
            "cannot be attached",
        ),
        ({"filename": "a.txt"}, "content_b64", "is required"),
    ],
)
def test_invalid_attachments(attachment: dict[str, Any], field: str, fragment: str) -> None:
    refused(f"attachments[0].{field}", fragment, attachments=[attachment])


# --------------------------------------------------------------------------- pydantic


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"to": ["a@example.com", 5]}, "to[1]", "valid string"),
        ({"subject": None}, "subject", "valid string"),
        ({"headers": {"X-Foo": 1}}, "headers.X-Foo", "valid string"),
        ({"surprise": 1}, "surprise", "unknown field"),
        ({"attachments": [{"filename": 3, "content_b64": ""}]}, "attachments[0].filename", ""),
    ],
)
def test_pydantic_errors_become_validation_errors(
    data: dict[str, Any], field: str, fragment: str
) -> None:
    payload: dict[str, Any] = {"from": SENDER, "to": ["r@example.com"], "subject": "s", "text": "t"}
    payload.update(data)
    with pytest.raises(ValidationError) as info:
        MessageSpec.model_validate(payload)
    assert info.value.field == field
    assert fragment in info.value.problem
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_fields_named() -> None:
    with pytest.raises(ValidationError) as info:
        MessageSpec.model_validate({"to": ["r@example.com"], "subject": "s", "text": "t"})
    assert (info.value.field, info.value.problem) == ("from", "is required")
    with pytest.raises(ValidationError) as info:
        MessageSpec.model_validate_json('{"from": "a@example.com", "to": "r@example.com"}')
    assert info.value.field == "subject"


def test_json_round_trip() -> None:
    original = spec(
        from_="Jöhn <j@bücher.de>",
        to="single@example.com",
        cc=["c@example.com"],
        bcc=["b@example.com"],
        reply_to=["r@example.com"],
        html="<p>hi</p>",
        headers={"X-A": "b"},
        attachments=[Attachment.from_bytes("a.pdf", b"%PDF", content_type="application/pdf")],
        configuration_set="cs",
        tags={"a": "b"},
        list_unsubscribe_url="https://example.com/u",
        list_unsubscribe_mailto="u@example.com",
        idempotency_key="k1",
    )
    dumped = original.model_dump(mode="json", by_alias=True)
    assert dumped["from"] == "Jöhn <j@bücher.de>" and dumped["to"] == ["single@example.com"]
    rebuilt = MessageSpec.model_validate(json.loads(json.dumps(dumped)))
    assert rebuilt == original
    assert rebuilt.attachments[0].content == b"%PDF"
    assert MessageSpec.model_validate_json(original.model_dump_json(by_alias=True)) == original


# --------------------------------------------------------------------------- rendering


def test_rendered_message_basics() -> None:
    rendered = render_message(spec(), message_id="abc.123")
    assert isinstance(rendered, RenderedMessage)
    assert rendered.envelope_from == SENDER and rendered.recipients == ["rcpt@example.com"]
    assert rendered.message_id == "<abc.123@example.com>"
    msg = parse(rendered.data)
    assert msg["Message-ID"] == "<abc.123@example.com>"
    assert msg["MIME-Version"] == "1.0"
    sent = email.utils.parsedate_to_datetime(msg["Date"])
    offset = sent.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert "size=" in repr(rendered) and "Hi there" not in repr(rendered)
    with pytest.raises(AttributeError):
        rendered.data = b""  # type: ignore[misc]


def test_message_id_defaults_to_uuid_at_sender_domain() -> None:
    first = render_message(spec(from_="a@bücher.de"))
    second = render_message(spec(from_="a@bücher.de"))
    assert re.fullmatch(r"<[0-9a-f]{32}@xn--bcher-kva\.de>", first.message_id)
    assert first.message_id != second.message_id
    custom = render_message(spec(), message_id_domain="mail.bücher.de")
    assert custom.message_id.endswith("@mail.xn--bcher-kva.de>")


@pytest.mark.parametrize("bad", ["a@b", "has space", "<x>", "", "a..b", "x" * 129])
def test_invalid_message_id(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        render_message(spec(), message_id=bad)
    assert info.value.field == "message_id"


def test_invalid_message_id_domain() -> None:
    with pytest.raises(ValidationError) as info:
        render_message(spec(), message_id_domain="not a domain")
    assert info.value.field == "message_id_domain"


def test_date_is_cached_per_second() -> None:
    first = mime.date_line(1_700_000_000.1)
    assert mime.date_line(1_700_000_000.9) is first
    assert first == b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    assert mime.date_line(1_700_000_001.0) != first


def test_long_lines_are_encoded_not_sent_raw() -> None:
    text = "x" * 5000 + "\nshort\n"
    rendered = render_message(spec(text=text, html="<p>" + "y" * 3000 + "</p>"))
    assert_wire_format(rendered.data)
    parts = summary(rendered.data)["parts"]
    assert parts[0][2] == normalized_body(text)


def test_body_encodings_follow_content() -> None:
    cases = {
        "plain ascii\n": "7bit",
        "Viele Grüße aus München, bis bald.\n" * 3: "quoted-printable",
        "日本語のテキスト" * 10: "base64",
        "nul\x00byte": "quoted-printable",
    }
    for text, cte in cases.items():
        msg = parse(render_message(spec(text=text)).data)
        assert msg["Content-Transfer-Encoding"] == cte, text
        assert msg.get_content() == normalized_body(text)


def test_line_endings_normalised_like_email_package() -> None:
    text = "a\rb\r\nc\nd\x0ce"
    rendered = render_message(spec(text=text))
    reference = to_email_message(spec(text=text)).as_bytes()
    assert (
        parse(rendered.data).get_content()
        == parse(reference).get_content()
        == ("a\r\nb\r\nc\r\nd\x0ce\r\n")
    )


def test_boundary_collision_in_7bit_body_is_avoided() -> None:
    layout = mime.Layout.build(has_text=True, has_html=True)
    evil = f"--{layout.alt_boundary.decode()}\n--{layout.mixed_boundary.decode()}--\n"
    content = layout.assemble(evil, "<p>ok</p>")
    msg = parse(b"MIME-Version: 1.0\r\n" + content)
    parts = [p.get_content() for p in msg.walk() if not p.is_multipart()]
    assert parts == [normalized_body(evil), "<p>ok</p>\r\n"]


# --------------------------------------------------------------------------- equivalence

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
INLINE_ONLY = Attachment.from_bytes(
    None, PNG, content_type="image/png", content_id="only", inline=True
)

LONG_ASCII = "A rather long subject line that certainly exceeds the seventy-eight column limit"
SUBJECTS = [
    "Hello",
    "Grüße aus München",
    LONG_ASCII + " " + LONG_ASCII,
    "Très longue ligne d'objet avec des accents " * 4,
    "日本語の件名" * 20,
    "x =?utf-8?q?looks_encoded?= y",
    "  leading and trailing  ",
    "tab\tinside and  double  spaces",
    "",
    "x" * 1200,
]
MANGLED_BY_EMAIL_PACKAGE = {"x =?utf-8?q?looks_encoded?= y", "  leading and trailing  "}
BODIES: list[dict[str, Any]] = [
    {"text": "Plain text body.\nSecond line.\n"},
    {"text": None, "html": "<p>Only <b>HTML</b> é</p>"},
    {"text": "Grüße\r\nzweite Zeile", "html": "<p>" + "wide " * 400 + "</p>"},
    {
        "text": "日本語の本文です。\n" * 20,
        "html": "<p>ok</p>",
        "attachments": [
            Attachment.from_bytes(
                "report.pdf", bytes(range(256)) * 10, content_type="application/pdf"
            ),
            Attachment.from_bytes("résumé très long nom de fichier " * 3 + ".txt", b"hi"),
        ],
    },
    {
        "text": "See the logo",
        "html": '<p><img src="cid:logo@example.com"> Grüße</p>',
        "alternatives": [
            Alternative(content_type="text/x-amp-html", content="<html ⚡4email>amp</html>"),
            Alternative(
                content_type="text/calendar",
                content="BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n",
                params={"method": "REQUEST"},
                after_html=True,
            ),
        ],
        "attachments": [
            Attachment.from_bytes(
                "logo.png",
                PNG,
                content_type="image/png",
                content_id="logo@example.com",
                inline=True,
            ),
            Attachment.from_bytes(
                None, b"GIF89a", content_type="image/gif", content_id="g", inline=True
            ),
            Attachment.from_bytes("invoice.pdf", b"%PDF-1.4", content_type="application/pdf"),
        ],
    },
    {"text": None, "html": '<img src="cid:only">', "attachments": [INLINE_ONLY]},
]
EXTRAS: list[dict[str, Any]] = [
    {},
    {
        "from_": "Jöhn Dœ <news@bücher.de>",
        "to": ["Plain <a@example.com>", '"Doe, Jane" <b@example.com>']
        + [f"u{i}@example.com" for i in range(10)],
        "cc": ["Ça va <c@example.com>"],
        "reply_to": ["Support <support@example.com>"],
        "headers": {"X-Campaign": "spring", "X-Note": "Grüße " * 30},
        "configuration_set": "cs",
        "tags": {"campaign": "c1"},
        "list_unsubscribe_url": "https://example.com/unsubscribe/" + "t" * 80,
        "list_unsubscribe_mailto": "unsub@example.com",
    },
]


@pytest.mark.parametrize(
    ("subject", "body", "extra"),
    list(itertools.product(SUBJECTS, BODIES, EXTRAS)),
)
def test_fast_renderer_matches_email_package(
    subject: str, body: dict[str, Any], extra: dict[str, Any]
) -> None:
    message = spec(subject=subject, **body, **extra)
    fast = render_message(message, message_id="fixed-id").data
    reference = to_email_message(message, message_id="fixed-id").as_bytes()
    assert_wire_format(fast)
    ours, theirs = summary(fast), summary(reference)
    # The email package drops leading blanks and decodes a literal "=?...?=" in a subject;
    # we keep the subject exactly, so compare it with the input instead.
    assert ours["headers"].pop("subject") == subject
    reference_subject = theirs["headers"].pop("subject")
    if subject not in MANGLED_BY_EMAIL_PACKAGE:
        assert reference_subject == subject
    assert ours == theirs
    assert all(len(line) <= mime.FOLD_COLUMNS for line in _header_block(fast).split(b"\r\n")[:3])


def _header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def test_subject_round_trips_exactly() -> None:
    for subject in SUBJECTS:
        assert parse(render_message(spec(subject=subject)).data)["Subject"] == subject


def test_headers_folded_at_78_columns_when_possible() -> None:
    rendered = render_message(
        spec(subject=LONG_ASCII * 3, to=[f"user{i}@example.com" for i in range(30)])
    )
    for line in _header_block(rendered.data).split(b"\r\n"):
        assert len(line) <= mime.FOLD_COLUMNS, line


# --------------------------------------------------------------------------- inline parts


def tree(part: email.message.EmailMessage) -> Any:
    """The MIME tree as nested ``(content type, [children])`` / content type strings."""
    if part.is_multipart():
        return (part.get_content_type(), [tree(child) for child in part.iter_parts()])
    return part.get_content_type()


def leaves(msg: email.message.EmailMessage) -> list[email.message.EmailMessage]:
    return [p for p in msg.walk() if not p.is_multipart()]


def logo(**overrides: Any) -> Attachment:
    fields: dict[str, Any] = {"content_type": "image/png", "content_id": "logo@example.com"}
    fields.update(inline=True, **overrides)
    return Attachment.from_bytes(fields.pop("filename", None), PNG, **fields)


INVITE = "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nEND:VCALENDAR\r\n"


def test_inline_image_goes_into_related_inside_alternative_inside_mixed() -> None:
    html = '<p>Hi <img src="cid:logo@example.com"></p>'
    rendered = render_message(
        spec(
            text="Hi",
            html=html,
            attachments=[
                Attachment.from_bytes("a.pdf", b"%PDF", content_type="application/pdf"),
                logo(),
            ],
        )
    )
    assert_wire_format(rendered.data)
    msg = parse(rendered.data)
    assert tree(msg) == (
        "multipart/mixed",
        [
            (
                "multipart/alternative",
                ["text/plain", ("multipart/related", ["text/html", "image/png"])],
            ),
            "application/pdf",
        ],
    )
    related = next(p for p in msg.walk() if p.get_content_type() == "multipart/related")
    assert related.get_param("type") == "text/html"
    html_part, image = related.iter_parts()
    assert html_part.get_content() == html + "\r\n"
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content_disposition() == "inline"
    assert image.get_filename() is None
    assert image.get_content() == PNG
    (pdf,) = msg.iter_attachments()
    assert pdf.get_filename() == "a.pdf" and pdf["Content-ID"] is None
    assert pdf.get_content_disposition() == "attachment"


def test_inline_image_with_filename_and_html_only_body() -> None:
    rendered = render_message(
        spec(
            text=None, html='<img src="cid:logo@example.com">', attachments=[logo(filename="l.png")]
        )
    )
    msg = parse(rendered.data)
    assert tree(msg) == ("multipart/related", ["text/html", "image/png"])
    image = leaves(msg)[1]
    assert image.get_filename() == "l.png" and image.get_content_disposition() == "inline"
    assert image["Content-ID"] == "<logo@example.com>"


def test_without_html_an_inline_part_stays_in_mixed_and_a_cid_attachment_keeps_its_id() -> None:
    rendered = render_message(
        spec(
            text="no html",
            attachments=[
                logo(),
                Attachment.from_bytes("x.bin", b"x", content_id="<x@example.com>"),
            ],
        )
    )
    msg = parse(rendered.data)
    assert tree(msg) == ("multipart/mixed", ["text/plain", "image/png", "application/octet-stream"])
    _, image, other = leaves(msg)
    assert (image.get_content_disposition(), image["Content-ID"]) == (
        "inline",
        "<logo@example.com>",
    )
    assert (other.get_content_disposition(), other["Content-ID"]) == (
        "attachment",
        "<x@example.com>",
    )


def test_plain_messages_keep_the_fast_structure() -> None:
    layout = mime.Layout.build(has_text=True, has_html=True)
    assert not layout.related_parts and not layout.before_html and not layout.after_html
    msg = parse(render_message(spec(html="<p>x</p>")).data)
    assert tree(msg) == ("multipart/alternative", ["text/plain", "text/html"])


# --------------------------------------------------------------------------- alternatives


def test_extra_alternatives_keep_their_order_and_html_stays_last() -> None:
    rendered = render_message(
        spec(
            text="plain",
            html="<p>html</p>",
            alternatives=[
                {"content_type": "text/x-amp-html", "content": "<html amp4email></html>"},
                {"content_type": "text/enriched", "content": "<bold>rich</bold>"},
            ],
        )
    )
    msg = parse(rendered.data)
    assert tree(msg) == (
        "multipart/alternative",
        ["text/plain", "text/x-amp-html", "text/enriched", "text/html"],
    )
    assert [p.get_content() for p in leaves(msg)] == [
        "plain\r\n",
        "<html amp4email></html>\r\n",
        "<bold>rich</bold>\r\n",
        "<p>html</p>\r\n",
    ]


def test_calendar_invite_after_html_with_method_and_inline_image() -> None:
    rendered = render_message(
        spec(
            text="Invite",
            html='<img src="cid:logo@example.com">',
            alternatives=[
                Alternative(
                    content_type="text/calendar",
                    content=INVITE,
                    params={"method": "REQUEST", "name": "invite file.ics"},
                    after_html=True,
                )
            ],
            attachments=[logo()],
        )
    )
    assert_wire_format(rendered.data)
    msg = parse(rendered.data)
    assert tree(msg) == (
        "multipart/alternative",
        ["text/plain", ("multipart/related", ["text/html", "image/png"]), "text/calendar"],
    )
    calendar = leaves(msg)[-1]
    assert calendar.get_param("method") == "REQUEST"
    assert calendar.get_param("name") == "invite file.ics"
    assert calendar.get_content_charset() == "utf-8"
    assert calendar.get_content() == INVITE


def test_alternatives_without_html_follow_the_given_order() -> None:
    msg = parse(
        render_message(
            spec(
                alternatives=[
                    Alternative(content_type="text/calendar", content=INVITE, after_html=True),
                    Alternative(content_type="text/enriched", content="x"),
                ]
            )
        ).data
    )
    assert tree(msg) == ("multipart/alternative", ["text/plain", "text/calendar", "text/enriched"])


def test_long_content_type_parameters_are_folded() -> None:
    line = mime.text_content_type("text/calendar", [("method", "REQUEST"), ("x-long", "v" * 70)])
    assert all(len(part) <= mime.FOLD_COLUMNS for part in line.split(b"\r\n"))
    msg = parse(b"MIME-Version: 1.0\r\n" + line + b"\r\nx\r\n")
    assert msg.get_param("x-long") == "v" * 70 and msg.get_param("method") == "REQUEST"


def test_boundary_collisions_with_fixed_parts_are_avoided(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first boundaries drawn are known, and both a fixed alternative and a per-message
    # text body contain them: fresh ones are drawn and every part is re-delimited.
    drawn = iter([b"=_mixed", b"=_related", b"=_alt"])
    real = mime.new_boundary
    monkeypatch.setattr(mime, "new_boundary", lambda: next(drawn, None) or real())
    layout = mime.Layout.build(
        has_text=True,
        has_html=True,
        attachments=[
            mime.MimeAttachment("a.bin", "application/octet-stream", b"file"),
            mime.MimeAttachment(None, "image/png", PNG, "logo", True),
        ],
        alternatives=[mime.TextAlternative("text/calendar", "--=_alt\n--=_related--\n")],
    )
    assert layout.alt_boundary != b"=_alt" and layout.related_boundary != b"=_related"
    evil = f"--{layout.related_boundary.decode()}\n--{layout.mixed_boundary.decode()}--\n"
    content = layout.assemble(evil, "<p>ok</p>")
    msg = parse(b"MIME-Version: 1.0\r\n" + content)
    assert [p.get_content() for p in leaves(msg)] == [
        normalized_body(evil),
        "--=_alt\r\n--=_related--\r\n",
        "<p>ok</p>\r\n",
        PNG,
        b"file",
    ]


# --------------------------------------------------------------------------- new fields


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("<logo@example.com>", "logo@example.com"),
        ("logo@example.com", "logo@example.com"),
        ("image001.png@01D9A1B2.C3D4E5F0", "image001.png@01D9A1B2.C3D4E5F0"),
        ("<part1>", "part1"),
        ("a@[127.0.0.1]", "a@[127.0.0.1]"),
    ],
)
def test_content_id_is_stored_without_angle_brackets(given: str, stored: str) -> None:
    attachment = Attachment.from_bytes(None, b"x", content_id=given, inline=True)
    assert attachment.content_id == stored
    msg = parse(render_message(spec(html="<p>x</p>", attachments=[attachment])).data)
    assert leaves(msg)[-1]["Content-ID"] == f"<{stored}>"


@pytest.mark.parametrize(
    ("content_id", "fragment"),
    [
        ("logo\r\nBcc: x@example.com", "CR or LF"),
        ("a\nb", "CR or LF"),
        ("two words@example.com", "message id"),
        ("<<a@b>>", "message id"),
        ("<a@b", "message id"),
        ("a@b@c", "message id"),
        ("", "message id"),
        ("<>", "message id"),
        ("a..b@c", "message id"),
        ("ü@example.com", "message id"),
        ("x" * 251, "message id"),
    ],
)
def test_invalid_content_id_names_the_field(content_id: str, fragment: str) -> None:
    attachment = {"content_b64": "YQ==", "content_id": content_id, "inline": True}
    refused("attachments[0].content_id", fragment, attachments=[attachment])


def test_filename_is_required_unless_inline() -> None:
    refused("attachments[0].filename", "is required", attachments=[{"content_b64": "YQ=="}])
    refused(
        "attachments[0].filename",
        "is required",
        attachments=[{"content_b64": "YQ==", "content_id": "a@b"}],
    )
    assert Attachment.model_validate({"content_b64": "YQ==", "inline": True}).filename is None


def test_a_content_id_is_used_once_per_message() -> None:
    refused(
        "attachments[2].content_id",
        "already the Content-ID of attachments[0]",
        html="<p>x</p>",
        attachments=[logo(), Attachment.from_bytes("a.txt", b"a"), logo()],
    )


@pytest.mark.parametrize(
    ("alternative", "field", "fragment"),
    [
        ({"content_type": "multipart/mixed", "content": "x"}, "content_type", "multipart/*"),
        ({"content_type": "message/rfc822", "content": "x"}, "content_type", "message/*"),
        ({"content_type": "application/ics", "content": "x"}, "content_type", "only text/*"),
        ({"content_type": "text/html", "content": "x"}, "content_type", "html field"),
        ({"content_type": "text/plain", "content": "x"}, "content_type", "text field"),
        ({"content_type": "text/calendar; method=X", "content": "x"}, "content_type", "type/sub"),
        ({"content_type": "text/calendar"}, "content", "is required"),
        (
            {"content_type": "text/calendar", "content": "x", "params": {"charset": "latin-1"}},
            "params.charset",
            "always utf-8",
        ),
        (
            {"content_type": "text/calendar", "content": "x", "params": {"method": 'a"b'}},
            "params.method",
            "printable ASCII",
        ),
        (
            {"content_type": "text/calendar", "content": "x", "params": {"method": "a\r\nb"}},
            "params.method",
            "CR or LF",
        ),
        (
            {"content_type": "text/calendar", "content": "x", "params": {"a b": "c"}},
            "params.a b",
            "parameter names",
        ),
        ({"content_type": "text/calendar", "content": "a\udc00"}, "content", "lone surrogate"),
    ],
)
def test_invalid_alternatives_name_the_field(
    alternative: dict[str, Any], field: str, fragment: str
) -> None:
    ok = {"content_type": "text/enriched", "content": "x"}
    refused(f"alternatives[1].{field}", fragment, alternatives=[ok, alternative])


def test_the_same_alternative_type_twice_is_ambiguous() -> None:
    twice = [{"content_type": "text/calendar", "content": "a"}] * 2
    refused("alternatives[1].content_type", "ambiguous", alternatives=twice)


def test_size_limit_counts_inline_parts_and_alternatives() -> None:
    with pytest.raises(ValidationError) as info:
        render_message(spec(html="<p>x</p>", attachments=[logo()]), max_bytes=1000)
    assert info.value.field == "attachments[0]" and "'<logo@example.com>'" in info.value.problem
    big = Alternative(content_type="text/calendar", content="x" * 3000)
    with pytest.raises(ValidationError) as info:
        render_message(spec(alternatives=[big]), max_bytes=2000)
    assert info.value.field == "alternatives[0]"
    # Each part fits, the message does not.
    with pytest.raises(ValidationError) as info:
        render_message(
            spec(alternatives=[Alternative(content_type="text/calendar", content="y" * 1500)]),
            max_bytes=1600,
        )
    assert info.value.field == "message"


def test_new_fields_round_trip_through_json() -> None:
    original = spec(
        html='<img src="cid:logo@example.com">',
        alternatives=[
            Alternative(
                content_type="Text/Calendar",
                content=INVITE,
                params={"method": "REQUEST"},
                after_html=True,
            )
        ],
        attachments=[logo(), Attachment.from_bytes("a.pdf", b"%PDF", content_id="<pdf@x>")],
    )
    dumped = original.model_dump(mode="json", by_alias=True)
    assert dumped["attachments"][0] == {
        "filename": None,
        "content_type": "image/png",
        "content_b64": logo().content_b64,
        "content_id": "logo@example.com",
        "inline": True,
    }
    assert dumped["attachments"][1]["content_id"] == "pdf@x"
    assert dumped["alternatives"] == [
        {
            "content_type": "Text/Calendar",
            "content": INVITE,
            "params": {"method": "REQUEST"},
            "after_html": True,
        }
    ]
    rebuilt = MessageSpec.model_validate(json.loads(json.dumps(dumped)))
    assert rebuilt == original
    assert rebuilt.attachments[0].content == PNG
    assert MessageSpec.model_validate_json(original.model_dump_json(by_alias=True)) == original
    a, b = (render_message(m, message_id="same").data for m in (original, rebuilt))
    assert summary(a) == summary(b)


def test_unused_new_fields_stay_out_of_the_json() -> None:
    """A message without the new features dumps as before (older workers can read it)."""
    dumped = spec(attachments=[Attachment.from_bytes("a.txt", b"a")]).model_dump(
        mode="json", by_alias=True
    )
    assert "alternatives" not in dumped
    assert set(dumped["attachments"][0]) == {"filename", "content_type", "content_b64"}


def test_campaign_with_an_inline_image() -> None:
    template = CampaignTemplate(
        from_="news@example.com",
        subject="Hi {{ name }}",
        text="Hi {{ name }}",
        html='<p>Hi {{ name }} <img src="cid:logo@example.com"></p>',
        attachments=[logo()],
    )
    again = CampaignTemplate.from_dict(json.loads(json.dumps(template.to_dict())))
    for campaign in (template, again):
        msg = parse(campaign.render("r@example.com", {"name": "Ann"}).data)
        assert tree(msg) == (
            "multipart/alternative",
            ["text/plain", ("multipart/related", ["text/html", "image/png"])],
        )
        assert leaves(msg)[-1].get_content() == PNG
    with pytest.raises(ValidationError) as info:
        CampaignTemplate(
            from_="news@example.com", subject="s", html="x", attachments=[logo(), logo()]
        )
    assert info.value.field == "template.attachments[1].content_id"
