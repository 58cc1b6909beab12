"""CampaignTemplate: compile once, render per recipient, sandboxed and injection-proof."""

from __future__ import annotations

import email
import email.policy
import json
import timeit
from typing import Any

import pytest

from ses_tasks import mime
from ses_tasks.errors import ValidationError
from ses_tasks.message.spec import (
    Attachment,
    CampaignTemplate,
    MessageSpec,
    RenderedMessage,
    to_email_message,
)

TEXT = (
    "Hello {{ first_name }},\n\nYour code is {{ code }}.\n"
    "{% for i in items %}- {{ i }}\n{% endfor %}"
)
HTML = "<p>Hello {{ first_name }}</p>\n<ul>{% for i in items %}<li>{{ i }}</li>{% endfor %}</ul>\n"
VARS: dict[str, object] = {"first_name": "Alice", "code": 42, "items": ["a", "b"], "token": "t1"}


def template(**overrides: Any) -> CampaignTemplate:
    fields: dict[str, Any] = {
        "from_": "News <news@example.com>",
        "subject": "Hi {{ first_name }}",
        "text": TEXT,
        "html": HTML,
    }
    fields.update(overrides)
    return CampaignTemplate(**fields)


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def bodies(data: bytes) -> list[str]:
    return [p.get_content() for p in parse(data).walk() if not p.is_multipart()]


def crlf(text: str) -> str:
    # bytes.splitlines: CR, LF and CRLF end a line (not U+2028 and friends).
    return "".join(line.decode() + "\r\n" for line in text.encode().splitlines()) or "\r\n"


def refused_at_render(field: str, fragment: str, tpl: CampaignTemplate, **variables: Any) -> None:
    with pytest.raises(ValidationError) as info:
        tpl.render("alice@example.com", {**VARS, **variables})
    assert info.value.field == field, str(info.value)
    assert fragment in info.value.problem, str(info.value)


def refused_at_compile(field: str, fragment: str, **overrides: Any) -> None:
    with pytest.raises(ValidationError) as info:
        template(**overrides)
    assert info.value.field == field, str(info.value)
    assert fragment in info.value.problem, str(info.value)


# --------------------------------------------------------------------------- rendering


def test_render_fills_in_one_recipient() -> None:
    rendered = template().render("Alice <alice@bücher.de>", VARS, message_id="m1")
    assert isinstance(rendered, RenderedMessage)
    assert rendered.envelope_from == "news@example.com"
    assert rendered.recipients == ["alice@xn--bcher-kva.de"]
    assert rendered.message_id == "<m1@example.com>"
    msg = parse(rendered.data)
    assert msg["Subject"] == "Hi Alice"
    assert msg["To"].addresses[0].display_name == "Alice"
    assert msg["Message-ID"] == "<m1@example.com>"
    assert bodies(rendered.data) == [
        crlf("Hello Alice,\n\nYour code is 42.\n- a\n- b\n"),
        crlf("<p>Hello Alice</p>\n<ul><li>a</li><li>b</li></ul>\n"),
    ]
    assert b"\n" not in rendered.data.replace(b"\r\n", b"")


def test_html_is_autoescaped_text_and_subject_are_not() -> None:
    rendered = template().render("a@example.com", {**VARS, "first_name": "<b>&Bob</b>"})
    text, html = bodies(rendered.data)
    assert "Hello <b>&Bob</b>," in text
    assert "Hello &lt;b&gt;&amp;Bob&lt;/b&gt;" in html
    assert parse(rendered.data)["Subject"] == "Hi <b>&Bob</b>"


def test_email_variable_defaults_to_recipient() -> None:
    tpl = template(subject="static", text="to {{ email }}", html=None)
    assert bodies(tpl.render("x@example.com", {}).data) == [crlf("to x@example.com")]
    assert bodies(tpl.render("x@example.com", {"email": "other"}).data) == [crlf("to other")]


def test_render_matches_email_package_reference() -> None:
    tpl = template(
        from_="Jöhn Dœ <news@bücher.de>",
        subject="Grüße, {{ first_name }}! " + "lange Betreffzeile " * 5,
        reply_to=["Support <support@example.com>"],
        headers={"X-Campaign": "spring"},
        attachments=[
            Attachment.from_bytes("terms.pdf", b"%PDF-1.4", content_type="application/pdf")
        ],
        configuration_set="cs",
        tags={"campaign": "c1"},
        list_unsubscribe_url="https://example.com/u/{{ token }}",
        list_unsubscribe_mailto="unsub@example.com",
    )
    variables = {**VARS, "first_name": "Zoë"}
    fast = tpl.render("Zoë <zoe@example.com>", variables, message_id="id1").data
    spec = MessageSpec(
        from_="Jöhn Dœ <news@bücher.de>",
        to=["Zoë <zoe@example.com>"],
        subject="Grüße, Zoë! " + "lange Betreffzeile " * 5,
        text="Hello Zoë,\n\nYour code is 42.\n- a\n- b\n",
        html="<p>Hello Zoë</p>\n<ul><li>a</li><li>b</li></ul>\n",
        reply_to=["Support <support@example.com>"],
        headers={"X-Campaign": "spring"},
        attachments=[
            Attachment.from_bytes("terms.pdf", b"%PDF-1.4", content_type="application/pdf")
        ],
        configuration_set="cs",
        tags={"campaign": "c1"},
        list_unsubscribe_url="https://example.com/u/t1",
        list_unsubscribe_mailto="unsub@example.com",
    )
    reference = to_email_message(spec, message_id="id1").as_bytes()
    ours, theirs = parse(fast), parse(reference)
    for name in (
        "Subject",
        "Message-ID",
        "X-Campaign",
        "X-SES-CONFIGURATION-SET",
        "X-SES-MESSAGE-TAGS",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    ):
        assert ours[name] == theirs[name], name
    for name in ("From", "To", "Reply-To"):
        assert [(a.display_name, a.addr_spec) for a in ours[name].addresses] == [
            (a.display_name, a.addr_spec) for a in theirs[name].addresses
        ]
    assert [p.get_content_type() for p in ours.walk()] == [
        p.get_content_type() for p in theirs.walk()
    ]
    assert [p.get_content() for p in ours.walk() if not p.is_multipart()] == [
        p.get_content() for p in theirs.walk() if not p.is_multipart()
    ]
    assert next(iter(ours.iter_attachments())).get_filename() == "terms.pdf"


def test_templated_from_and_unsubscribe() -> None:
    tpl = template(
        from_="{{ rep }} <{{ rep_addr }}>",
        list_unsubscribe_url="https://example.com/u/{{ token }}",
        list_unsubscribe_mailto="mailto:unsub+{{ token }}@example.com",
    )
    rendered = tpl.render("a@example.com", {**VARS, "rep": "Rep Ü", "rep_addr": "rep@bücher.de"})
    assert rendered.envelope_from == "rep@xn--bcher-kva.de"
    msg = parse(rendered.data)
    assert msg["From"].addresses[0].display_name == "Rep Ü"
    assert msg["List-Unsubscribe"] == "<https://example.com/u/t1>, <mailto:unsub+t1@example.com>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert rendered.message_id.endswith("@xn--bcher-kva.de>")


def test_constant_parts_need_no_template_syntax() -> None:
    tpl = template(subject="Static subject", text="Static {text}\n", html=None)
    rendered = tpl.render("a@example.com", {})
    assert parse(rendered.data)["Subject"] == "Static subject"
    assert bodies(rendered.data) == [crlf("Static {text}\n")]


def test_message_id_domain_option() -> None:
    tpl = template(message_id_domain="mail.bücher.de")
    assert tpl.render("a@example.com", VARS).message_id.endswith("@mail.xn--bcher-kva.de>")
    with pytest.raises(ValidationError) as info:
        tpl.render("a@example.com", VARS, message_id="bad id")
    assert info.value.field == "message_id"


# --------------------------------------------------------------------------- refusals


def test_subject_injection_through_variable_is_refused() -> None:
    tpl = template()
    refused_at_render("template.subject", "CR or LF", tpl, first_name="x\r\nBcc: evil@example.com")
    refused_at_render("template.subject", "CR or LF", tpl, first_name="x\nBcc: e@example.com")


def test_from_and_unsubscribe_injection_refused() -> None:
    tpl = template(
        from_="{{ rep }} <news@example.com>", list_unsubscribe_url="https://e.com/{{ t }}"
    )
    refused_at_render("template.from", "CR or LF", tpl, rep="x\r\nBcc: e@example.com", t="1")
    refused_at_render("template.list_unsubscribe_url", "CR or LF", tpl, rep="r", t="\r\nBcc: x")
    refused_at_render("template.list_unsubscribe_url", "percent-encode", tpl, rep="r", t="a b")


def test_newlines_in_body_variables_stay_in_the_body() -> None:
    rendered = template().render("a@example.com", {**VARS, "code": "x\r\nBcc: e@x.com"})
    assert parse(rendered.data)["Bcc"] is None
    assert "Bcc: e@x.com" in bodies(rendered.data)[0]


def test_undefined_variable() -> None:
    tpl = template()
    variables = {k: v for k, v in VARS.items() if k != "first_name"}
    with pytest.raises(ValidationError) as info:
        tpl.render("a@example.com", variables)
    assert info.value.field == "template.subject"
    assert info.value.problem == "'first_name' is undefined"
    text_only = template(subject="static", html=None)
    with pytest.raises(ValidationError) as info:
        text_only.render("a@example.com", variables)
    assert (info.value.field, info.value.problem) == ("template.text", "'first_name' is undefined")


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ lipsum.__globals__['os'] }}",
    ],
)
@pytest.mark.parametrize("part", ["text", "html", "subject"])
def test_sandbox_escapes_are_refused(expression: str, part: str) -> None:
    tpl = template(**{part: expression})
    with pytest.raises(ValidationError) as info:
        tpl.render("a@example.com", VARS)
    assert info.value.field == f"template.{part}"
    assert "unsafe" in info.value.problem or "undefined" in info.value.problem


def test_memory_bombs_are_refused() -> None:
    refused_at_render("template.text", "too large", template(text="{{ 'a' * 10**9 }}"))
    refused_at_render("template.text", "too large", template(text="{{ 9 ** 99999 }}"))


def test_other_template_exceptions_become_validation_errors() -> None:
    refused_at_render("template.text", "ZeroDivisionError", template(text="{{ 1 / 0 }}"))
    refused_at_render("template.html", "", template(html="{{ code + 'x' }}"))


def test_variables_must_be_a_mapping() -> None:
    with pytest.raises(ValidationError) as info:
        template().render("a@example.com", ["not", "a", "mapping"])  # type: ignore[arg-type]
    assert info.value.field == "variables"


def test_bad_recipient_address() -> None:
    tpl = template()
    with pytest.raises(ValidationError) as info:
        tpl.render("not-an-address", VARS)
    assert info.value.field == "to" and "not a valid email address" in info.value.problem
    with pytest.raises(ValidationError) as info:
        tpl.render("jörg@example.com", VARS)
    assert info.value.field == "to" and "non-ASCII" in info.value.problem
    with pytest.raises(ValidationError) as info:
        tpl.render("a@example.com\r\nBcc: x@example.com", VARS)
    assert info.value.field == "to" and "CR or LF" in info.value.problem


def test_oversized_rendering_refused() -> None:
    tpl = template(max_bytes=5000)
    tpl.render("a@example.com", VARS)
    refused_at_render("message", "over the limit of 5,000 bytes", tpl, items=["x" * 100] * 50)


def test_oversized_attachment_refused_at_compile() -> None:
    big = Attachment.from_bytes("big.bin", b"\0" * 4000)
    refused_at_compile(
        "template.attachments", "over the message limit", attachments=[big], max_bytes=4000
    )


@pytest.mark.parametrize(
    ("part", "source", "fragment"),
    [
        ("subject", "Hi {{ name }", "line 1: unexpected '}'"),
        ("text", "ok\nstill ok\n{% if x %}never closed", "line 3: Unexpected end of template"),
        ("html", "{{ x | no_such_filter }}", "No filter named 'no_such_filter'"),
        ("from_", "{{ a <b@example.com>", "line 1"),
        ("list_unsubscribe_url", "https://e.com/{{ t", "line 1"),
    ],
)
def test_template_syntax_errors(part: str, source: str, fragment: str) -> None:
    field = "template." + part.removesuffix("_")
    with pytest.raises(ValidationError) as info:
        template(**{part: source})
    assert info.value.field == field
    assert fragment in info.value.problem


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"configuration_set": "bad name"}, "template.configuration_set", "1 to 64"),
        ({"tags": {"bad tag": "x"}}, "template.tags.bad tag", "tag names"),
        ({"tags": {"ok": "bad.value"}}, "template.tags.ok", "tag values"),
        ({"headers": {"From": "x@example.com"}}, "template.headers.From", "set by ses-tasks"),
        ({"headers": {"X-Ok": "a\r\nb"}}, "template.headers.X-Ok", "CR or LF"),
        ({"reply_to": ["nope"]}, "template.reply_to[0]", "not a valid email address"),
        ({"from_": "nope"}, "template.from", "not a valid email address"),
        ({"subject": "static\r\nBcc: x"}, "template.subject", "CR or LF"),
        ({"list_unsubscribe_url": "http://e.com/u"}, "template.list_unsubscribe_url", "https"),
        ({"text": None, "html": None}, "template.text", "text or an html body"),
        ({"max_bytes": 0}, "template.max_bytes", "greater than 0"),
        ({"subject": 5}, "template.subject", "valid string"),
        ({"message_id_domain": "no such"}, "template.message_id_domain", "not a valid domain"),
    ],
)
def test_fixed_parts_validated_at_compile(
    overrides: dict[str, Any], field: str, fragment: str
) -> None:
    refused_at_compile(field, fragment, **overrides)


# --------------------------------------------------------------------------- serialisation


def test_dict_round_trip_through_json() -> None:
    tpl = template(
        reply_to=["r@example.com"],
        headers={"X-A": "b"},
        attachments=[Attachment.from_bytes("a.txt", b"hello")],
        configuration_set="cs",
        tags={"campaign": "c1"},
        list_unsubscribe_url="https://example.com/u/{{ token }}",
        list_unsubscribe_mailto="unsub@example.com",
        max_bytes=123_456,
        message_id_domain="example.org",
    )
    data = json.loads(json.dumps(tpl.to_dict()))
    assert data["version"] == 1 and data["from"] == "News <news@example.com>"
    rebuilt = CampaignTemplate.from_dict(data)
    assert rebuilt.to_dict() == tpl.to_dict()
    first = tpl.render("a@example.com", VARS, message_id="same")
    second = rebuilt.render("a@example.com", VARS, message_id="same")
    assert first.recipients == second.recipients and first.message_id == second.message_id
    assert bodies(first.data) == bodies(second.data)
    assert parse(first.data)["List-Unsubscribe"] == parse(second.data)["List-Unsubscribe"]


def test_from_dict_refuses_bad_input() -> None:
    data = template().to_dict()
    with pytest.raises(ValidationError) as info:
        CampaignTemplate.from_dict({**data, "version": 99})
    assert info.value.field == "template.version"
    with pytest.raises(ValidationError) as info:
        CampaignTemplate.from_dict({**data, "subject": "{{ broken"})
    assert info.value.field == "template.subject"
    with pytest.raises(ValidationError) as info:
        CampaignTemplate.from_dict({**data, "unexpected": 1})
    assert (info.value.field, info.value.problem) == ("template.unexpected", "unknown field")
    with pytest.raises(ValidationError) as info:
        CampaignTemplate.from_dict("nope")  # type: ignore[arg-type]
    assert info.value.field == "template"


# --------------------------------------------------------------------------- speed


def test_render_is_fast() -> None:
    """A loose guard (the real number is ~0.05 ms): 1 ms per message would be a regression."""
    tpl = template(text=TEXT * 30, html=HTML * 30)
    runs = 200
    seconds = min(timeit.repeat(lambda: tpl.render("a@example.com", VARS), number=runs, repeat=3))
    assert seconds / runs < 0.001


def test_wire_format_lines() -> None:
    tpl = template(subject="{{ s }}")
    rendered = tpl.render("a@example.com", {**VARS, "s": "Sehr lange Betreffzeile äöü " * 10})
    data = rendered.data
    assert all(len(line) <= mime.FOLD_COLUMNS for line in data.split(b"\r\n\r\n")[0].split(b"\r\n"))
    assert parse(data)["Subject"] == "Sehr lange Betreffzeile äöü " * 10
