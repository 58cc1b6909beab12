"""Property tests: any Unicode input parses back unchanged or is a ValidationError.

Nothing else may escape (no UnicodeEncodeError, no IndexError, no pydantic error), and
whatever renders is 7-bit, CRLF-only, with lines of at most 998 octets.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markupsafe import escape

from ses_tasks import mime
from ses_tasks.errors import ValidationError
from ses_tasks.message.spec import (
    Alternative,
    Attachment,
    CampaignTemplate,
    MessageSpec,
    RenderedMessage,
    render_message,
)

# Derandomized and without an example database so runs are repeatable and the tree stays
# clean; 4,000 random examples per property were also run while developing.
PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Everything Unicode can hold, surrogates included (hypothesis leaves them out by default).
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
WIDE_TEXT = st.one_of(
    ANY_TEXT, st.text(max_size=2000), st.text(alphabet="ab \r\n\t=.-", max_size=200)
)


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def crlf(text: str) -> str:
    # bytes.splitlines: CR, LF and CRLF end a line (not U+2028 and friends).
    return "".join(line.decode() + "\r\n" for line in text.encode().splitlines()) or "\r\n"


def display(name: str) -> str:
    return re.sub(r"[ \t]\s*", " ", name).strip()


def check_wire(data: bytes) -> None:
    assert data.isascii()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= mime.MAX_LINE_OCTETS


def render_or_refuse(build: Callable[[], RenderedMessage]) -> RenderedMessage | None:
    try:
        rendered = build()
    except ValidationError:
        return None
    check_wire(rendered.data)
    return rendered


def leaf_contents(data: bytes) -> list[str]:
    return [p.get_content() for p in parse(data).walk() if not p.is_multipart()]


@PROPERTY_SETTINGS
@given(subject=WIDE_TEXT)
def test_any_subject(subject: str) -> None:
    rendered = render_or_refuse(
        lambda: render_message(
            MessageSpec(from_="a@example.com", to=["b@example.com"], subject=subject, text="x")
        )
    )
    if rendered is not None:
        assert parse(rendered.data)["Subject"] == subject


@PROPERTY_SETTINGS
@given(text=st.one_of(st.none(), WIDE_TEXT), html=st.one_of(st.none(), WIDE_TEXT))
def test_any_bodies(text: str | None, html: str | None) -> None:
    rendered = render_or_refuse(
        lambda: render_message(
            MessageSpec(
                from_="a@example.com", to=["b@example.com"], subject="s", text=text, html=html
            )
        )
    )
    if rendered is None:
        return
    expected = [crlf(body) for body in (text, html) if body is not None]
    assert leaf_contents(rendered.data) == expected


@PROPERTY_SETTINGS
@given(name=ANY_TEXT)
def test_any_display_name(name: str) -> None:
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    rendered = render_or_refuse(
        lambda: render_message(
            MessageSpec(
                from_=f"{quoted} <a@example.com>",
                to=[f"{quoted} <b@example.com>"],
                reply_to=[f"{quoted} <c@example.com>"],
                subject="s",
                text="x",
            )
        )
    )
    if rendered is None:
        return
    msg = parse(rendered.data)
    for header in ("From", "To", "Reply-To"):
        (address,) = msg[header].addresses
        assert address.display_name == display(name)
    assert rendered.envelope_from == "a@example.com"
    assert rendered.recipients == ["b@example.com"]


@PROPERTY_SETTINGS
@given(name=ANY_TEXT)
def test_any_unquoted_display_name(name: str) -> None:
    rendered = render_or_refuse(
        lambda: render_message(
            MessageSpec(
                from_=f"{name} <a@example.com>", to=["b@example.com"], subject="s", text="x"
            )
        )
    )
    if rendered is None:
        return
    (address,) = parse(rendered.data)["From"].addresses
    assert address.addr_spec == "a@example.com"
    stripped = name.strip()
    if not (len(stripped) >= 2 and stripped[0] == stripped[-1] == '"'):  # else: a quoted name
        assert address.display_name == display(stripped)


@PROPERTY_SETTINGS
@given(value=ANY_TEXT, header=st.sampled_from(["X-Note", "Keywords"]))
def test_any_extra_header_value(value: str, header: str) -> None:
    rendered = render_or_refuse(
        lambda: render_message(
            MessageSpec(
                from_="a@example.com",
                to=["b@example.com"],
                subject="s",
                text="x",
                headers={header: value},
            )
        )
    )
    if rendered is not None:
        assert parse(rendered.data)[header] == value


CAMPAIGN = CampaignTemplate(
    from_="{{ v }} <news@example.com>",
    subject="Hi {{ v }}!",
    text="Dear {{ v }},\n{{ v }}\n",
    html="<p>{{ v }}</p>",
    list_unsubscribe_url="https://example.com/u/{{ v }}",
)


@PROPERTY_SETTINGS
@given(value=WIDE_TEXT)
def test_any_campaign_variable(value: str) -> None:
    rendered = render_or_refuse(lambda: CAMPAIGN.render("r@example.com", {"v": value}))
    if rendered is None:
        return
    msg = parse(rendered.data)
    assert msg["Subject"] == f"Hi {value}!"
    assert msg["From"].addresses[0].display_name == display(value)
    assert msg["List-Unsubscribe"] == f"<https://example.com/u/{value}>"
    assert leaf_contents(rendered.data) == [
        crlf(f"Dear {value},\n{value}\n"),
        crlf(f"<p>{escape(value)}</p>"),
    ]


@PROPERTY_SETTINGS
@given(source=ANY_TEXT)
def test_any_template_source_compiles_or_is_refused(source: str) -> None:
    try:
        template = CampaignTemplate(from_="a@example.com", subject=source, text=source, html=source)
    except ValidationError:
        return
    render_or_refuse(lambda: template.render("r@example.com", {}))


# Content-IDs: mostly id-like text, sometimes bracketed, sometimes anything at all.
ID_CHARS = st.characters(codec="ascii", exclude_characters="\x00")
CONTENT_IDS = st.one_of(
    ANY_TEXT,
    st.text(ID_CHARS, min_size=1, max_size=60),
    st.builds(lambda s: f"<{s}>", st.text(ID_CHARS, max_size=60)),
    st.from_regex(r"[a-z0-9.]{1,20}@[a-z0-9.\-\[\]]{1,20}", fullmatch=True),
)


@PROPERTY_SETTINGS
@given(content_id=CONTENT_IDS, content=st.binary(max_size=300), filename=st.none() | ANY_TEXT)
def test_any_inline_part(content_id: str, content: bytes, filename: str | None) -> None:
    """Any Content-ID is refused or arrives as ``<id>`` on an intact inline part."""
    try:
        attachment = Attachment.from_bytes(
            filename, content, content_type="image/png", content_id=content_id, inline=True
        )
    except ValidationError:
        return
    stored = attachment.content_id
    assert stored is not None and "<" not in stored and ">" not in stored
    assert stored == content_id.removeprefix("<").removesuffix(">")
    rebuilt = Attachment.model_validate(attachment.model_dump(mode="json", by_alias=True))
    assert rebuilt == attachment
    rendered = render_or_refuse(
        lambda: render_message(
            MessageSpec(
                from_="a@example.com",
                to=["b@example.com"],
                subject="s",
                text="t",
                html=f'<img src="cid:{stored}">',
                attachments=[rebuilt],
            )
        )
    )
    if rendered is None:
        return
    msg = parse(rendered.data)
    related = next(p for p in msg.walk() if p.get_content_type() == "multipart/related")
    _html, image = related.iter_parts()
    assert image["Content-ID"] == f"<{stored}>"
    assert image.get_payload(decode=True) == content
    # get_filename() strips blanks at either end (the header keeps them).
    assert image.get_filename() == (filename and filename.strip())
    assert image.get_content_disposition() == "inline"


PARAM_VALUES = st.text(st.characters(codec="ascii"), max_size=40)


@PROPERTY_SETTINGS
@given(
    content=WIDE_TEXT,
    method=PARAM_VALUES,
    after_html=st.booleans(),
    html=st.none() | st.just("<p>h</p>"),
)
def test_any_alternative(content: str, method: str, after_html: bool, html: str | None) -> None:
    """Any calendar alternative is refused or arrives intact, in its place, after JSON."""
    try:
        spec = MessageSpec(
            from_="a@example.com",
            to=["b@example.com"],
            subject="s",
            text="t",
            html=html,
            alternatives=[
                Alternative(
                    content_type="text/calendar",
                    content=content,
                    params={"method": method},
                    after_html=after_html,
                )
            ],
        )
    except ValidationError:
        return
    assert MessageSpec.model_validate(spec.model_dump(mode="json", by_alias=True)) == spec
    rendered = render_or_refuse(lambda: render_message(spec))
    if rendered is None:
        return
    parts = [p for p in parse(rendered.data).walk() if not p.is_multipart()]
    types = [p.get_content_type() for p in parts]
    expected = ["text/plain", "text/calendar"]
    if html is not None:
        expected.insert(1 if after_html else 2, "text/html")
    assert types == expected
    calendar = parts[types.index("text/calendar")]
    assert calendar.get_content() == crlf(content)
    assert calendar.get_param("method") == method
