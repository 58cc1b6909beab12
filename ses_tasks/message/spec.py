"""The JSON-safe message spec, its validation, and rendering to SMTP DATA bytes.

Two ways in:

* :class:`MessageSpec` + :func:`render_message` for one transactional message. The spec is a
  pydantic model that survives ``model_dump(mode="json", by_alias=True)`` and
  ``MessageSpec.model_validate(d)``, so it can ride in a Celery task or sit in Redis.
* :class:`CampaignTemplate` for bulk sends: compiled once (Jinja2 sandbox, constant headers
  pre-encoded, MIME skeleton built), then :meth:`CampaignTemplate.render` fills in one
  recipient in a fraction of what ``email.message.EmailMessage`` costs.

Every refusal is a :class:`ses_tasks.errors.ValidationError` naming the field (``to[2]``,
``headers.X-Foo``, ``template.subject``); pydantic and Jinja2 errors never leak out.
Addresses must be 7-bit for SES: IDN domains become Punycode, non-ASCII local parts are
refused. :func:`to_email_message` builds the same message with the ``email`` package; it is
the slow reference the fast path is tested against.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.headerregistry import Address as EmailAddress
from email.message import EmailMessage
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import jinja2
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from ses_tasks.errors import ValidationError
from ses_tasks.message import mime
from ses_tasks.message.address import NAME_ADDR_RE, ascii_addr_spec, ascii_domain

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_RECIPIENTS",
    "Address",
    "Alternative",
    "Attachment",
    "CampaignTemplate",
    "MessageSpec",
    "RenderedMessage",
    "parse_address",
    "render_message",
    "to_email_message",
]

#: SES documents 10 MB (older) and 40 MB (quotas page); the smaller one is the safe default.
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
#: SES: at most 50 recipients (To + Cc + Bcc) per message, not adjustable.
MAX_RECIPIENTS = 50
MAX_DISPLAY_NAME_CHARS = 128
MAX_HEADER_NAME_CHARS = 60
MAX_URL_CHARS = 900
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_MESSAGE_ID_CHARS = 128
#: SES: the whole X-SES-MESSAGE-TAGS value is at most 256 characters; 50 tags per message.
MAX_TAGS_HEADER_CHARS = 256
MAX_TAGS = 50
MAX_FILENAME_CHARS = 255
MAX_CONTENT_ID_CHARS = 250
MAX_ALTERNATIVE_PARAMS = 10
MAX_PARAM_VALUE_CHARS = 200
#: Upper bound on a string built by ``*`` or ``**`` in a template (sandbox hardening).
MAX_TEMPLATE_VALUE_CHARS = 1_000_000

#: Headers we write ourselves; ``headers`` may not set them (compared lower-case).
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "message-id",
        "date",
        "mime-version",
        "reply-to",
        "list-unsubscribe",
        "list-unsubscribe-post",
    }
)
RESERVED_HEADER_PREFIXES = ("content-", "x-ses-")

_FIELD_NAME_RE = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ':'
_CONFIG_SET_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TAG_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
_CONTENT_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_MESSAGE_ID_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
#: RFC 5322 msg-id without its angle brackets; the "@right" half is optional because real
#: mail (and Django apps) use ``<logo>`` style Content-IDs.
_CONTENT_ID_RE = re.compile(rf"{_DOT_ATOM}(?:@(?:{_DOT_ATOM}|\[[!-Z^-~]*\]))?")
_PARAM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}")
_PARAM_VALUE_RE = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]*")  # printable, no '"' or '\'
_URL_FORBIDDEN_RE = re.compile(r"[^\x21-\x7e]|[<>,]")
_WSP_RUN_RE = re.compile(r"[ \t]\s*")
_TEMPLATE_MARKERS = ("{{", "{%", "{#")


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True, slots=True)
class Address:
    """A checked address: ``addr_spec`` is 7-bit ASCII (Punycode domain)."""

    display_name: str | None
    addr_spec: str

    @property
    def domain(self) -> str:
        return self.addr_spec.rpartition("@")[2]


def parse_address(value: str, field: str, *, allow_display_name: bool = True) -> Address:
    """``a@b`` or ``Name <a@b>`` -> :class:`Address`, or :class:`ValidationError` on ``field``.

    The display name may be quoted (``"Doe, John" <a@b>``); its blanks are normalised
    (a space or tab and any whitespace after it become one space, as decoders read
    encoded-words; no whitespace at either end).
    """
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    mime.check_header_text(value, field)
    display_name: str | None = None
    addr = value.strip()
    match = NAME_ADDR_RE.fullmatch(addr)
    if match is not None:
        if not allow_display_name:
            raise ValidationError(field, "give a bare address (a@example.com), not a name")
        raw_name, addr = match.group(1).strip(), match.group(2).strip()
        if len(raw_name) >= 2 and raw_name[0] == raw_name[-1] == '"':
            raw_name = re.sub(r"\\(.)", r"\1", raw_name[1:-1])
        # Whitespace runs collapse to one space: decoders (Python's among them) do that to
        # encoded-words anyway, so normalising here keeps every rendering path identical.
        display_name = _WSP_RUN_RE.sub(" ", raw_name).strip() or None
        if display_name is not None and len(display_name) > MAX_DISPLAY_NAME_CHARS:
            raise ValidationError(
                field, f"display name is longer than {MAX_DISPLAY_NAME_CHARS} characters"
            )
    if not addr:
        raise ValidationError(field, "is empty")
    if "<" in addr or ">" in addr:
        raise ValidationError(field, "not a valid email address: unbalanced '<' or '>'")
    try:
        return Address(display_name, ascii_addr_spec(addr))
    except ValueError as exc:
        raise ValidationError(field, str(exc)) from None


# --------------------------------------------------------------------------- rendered


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """What SMTP needs: MAIL FROM, RCPT TO list (Bcc included) and DATA (CRLF lines)."""

    envelope_from: str
    recipients: list[str]
    data: bytes
    message_id: str = ""

    def __repr__(self) -> str:  # the body may be megabytes: keep logs readable
        return (
            f"RenderedMessage(envelope_from={self.envelope_from!r}, "
            f"recipients={self.recipients!r}, message_id={self.message_id!r}, "
            f"size={len(self.data)})"
        )


# --------------------------------------------------------------------------- pydantic


def _loc_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            name = "from" if part == "from_" else str(part)
            path += f".{name}" if path else name
    return path


def _translate(exc: PydanticValidationError) -> ValidationError:
    """The first pydantic error as our ValidationError, with a ``to[2]`` style field path."""
    error = exc.errors(include_url=False)[0]
    path = _loc_path(error["loc"])
    original = (error.get("ctx") or {}).get("error")
    if isinstance(original, ValidationError):
        field = f"{path}.{original.field}" if path else original.field
        return ValidationError(field, original.problem)
    problem = {
        "extra_forbidden": "unknown field",
        "missing": "is required",
    }.get(error["type"], error["msg"])
    if problem.startswith("Value error, "):
        problem = problem[len("Value error, ") :]
    return ValidationError(path or "message", problem)


class _Model(BaseModel):
    """Base model whose construction raises our ValidationError, never pydantic's."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except PydanticValidationError as exc:
            raise _translate(exc) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, **kwargs)
        except PydanticValidationError as exc:
            raise _translate(exc) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Self:
        try:
            return super().model_validate_json(json_data, **kwargs)
        except PydanticValidationError as exc:
            raise _translate(exc) from None


#: ``from`` is a keyword: Python callers write ``from_=``, JSON says ``"from"``.
_FROM_ALIASES = AliasChoices("from", "from_")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _content_type(value: str) -> tuple[str, str]:
    """Lower-case ``(major, minor)`` of a bare ``type/subtype``, or ValidationError."""
    major, _, minor = value.partition("/")
    if not (_CONTENT_TYPE_RE.fullmatch(major) and _CONTENT_TYPE_RE.fullmatch(minor)):
        raise ValidationError(
            "content_type", "must be 'type/subtype' (e.g. application/pdf), no parameters"
        )
    return major.lower(), minor.lower()


def _strip_angle_brackets(value: Any) -> Any:
    """``<id@host>`` -> ``id@host``: Content-IDs are stored without their brackets."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == "<" and value[-1] == ">":
        return value[1:-1]
    return value


class Attachment(_Model):
    """A small file carried inline, base64 in JSON (re-encoded for MIME at render time).

    ``content_id`` (without angle brackets; ``<x@y>`` is accepted and stored as ``x@y``)
    writes ``Content-ID: <x@y>``. ``inline`` writes ``Content-Disposition: inline``; an
    inline part with a ``content_id`` is placed in ``multipart/related`` with the html
    body, where ``<img src="cid:x@y">`` shows it. Only inline parts may go without a
    ``filename``.
    """

    filename: str | None = None
    content_type: str = "application/octet-stream"
    content_b64: str
    content_id: str | None = None
    inline: bool = False

    _brackets = field_validator("content_id", mode="before")(_strip_angle_brackets)

    @classmethod
    def from_bytes(
        cls,
        filename: str | None,
        content: bytes,
        *,
        content_type: str = "application/octet-stream",
        content_id: str | None = None,
        inline: bool = False,
    ) -> Attachment:
        return cls(
            filename=filename,
            content_type=content_type,
            content_b64=base64.b64encode(content).decode("ascii"),
            content_id=content_id,
            inline=inline,
        )

    @property
    def content(self) -> bytes:
        return binascii.a2b_base64(self.content_b64)

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Leave the newer fields out unless used: workers of the previous release refuse
        # unknown fields, and a plain attachment then stays readable by them.
        data: dict[str, Any] = handler(self)
        if self.content_id is None:
            data.pop("content_id", None)
        if not self.inline:
            data.pop("inline", None)
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        name = self.filename
        if name is None:
            if not self.inline:
                raise ValidationError(
                    "filename", "is required (only an inline part may go without one)"
                )
        else:
            if not name.strip():
                raise ValidationError("filename", "is empty")
            mime.check_header_text(name, "filename")
            if len(name) > MAX_FILENAME_CHARS:
                raise ValidationError("filename", f"is longer than {MAX_FILENAME_CHARS} characters")
            if "/" in name or "\\" in name:
                raise ValidationError("filename", "must be a bare file name, without '/' or '\\'")
        major, _minor = _content_type(self.content_type)
        if major in ("multipart", "message"):
            raise ValidationError(
                "content_type", f"{major}/* cannot be attached as base64; use application/*"
            )
        if self.content_id is not None:
            _check_content_id(self.content_id)
        try:
            binascii.a2b_base64(self.content_b64, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise ValidationError("content_b64", f"is not valid base64 ({exc})") from None
        return self


def _check_content_id(value: str) -> None:
    mime.check_header_text(value, "content_id")
    if len(value) > MAX_CONTENT_ID_CHARS or not _CONTENT_ID_RE.fullmatch(value):
        raise ValidationError(
            "content_id",
            f"must be a message id such as logo@example.com (1 to {MAX_CONTENT_ID_CHARS} "
            "ASCII characters: letters, digits, dots and !#$%&'*+/=?^_`{|}~-, at most one '@'; "
            "no spaces, and '<' '>' only around the whole id)",
        )


class Alternative(_Model):
    """An extra ``text/*`` part of ``multipart/alternative`` (text/calendar, AMP, ...).

    ``text`` and ``html`` stay the text/plain and text/html parts; these come between
    them, in the order given, so the html part stays the last (preferred, RFC 2046 5.1.4)
    unless ``after_html`` places one after it (calendar invites: text, html, calendar).
    ``params`` are extra Content-Type parameters (``{"method": "REQUEST"}``); the charset
    is always utf-8.
    """

    content_type: str
    content: str
    params: dict[str, str] = Field(default_factory=dict)
    after_html: bool = False

    @model_validator(mode="after")
    def _check(self) -> Self:
        major, minor = _content_type(self.content_type)
        if major in ("multipart", "message"):
            raise ValidationError(
                "content_type", f"{major}/* cannot be an alternative; send one text/* body"
            )
        if major != "text":
            raise ValidationError(
                "content_type",
                f"only text/* alternatives are supported, not {self.content_type} "
                "(send other content as an attachment)",
            )
        if minor in ("plain", "html"):
            raise ValidationError(
                "content_type", f"text/{minor} is the message's {_BODY_FIELDS[minor]} field"
            )
        if len(self.params) > MAX_ALTERNATIVE_PARAMS:
            raise ValidationError("params", f"more than {MAX_ALTERNATIVE_PARAMS} parameters")
        seen: set[str] = set()
        for name, value in self.params.items():
            field = f"params.{name}"
            mime.check_header_text(name, field)
            if not _PARAM_NAME_RE.fullmatch(name):
                raise ValidationError(
                    field, "parameter names are ASCII letters, digits and !#$&^_.+-"
                )
            if name.lower() == "charset":
                raise ValidationError(field, "the charset is always utf-8")
            if name.lower() in seen:
                raise ValidationError(field, "is given twice (parameter names ignore case)")
            seen.add(name.lower())
            mime.check_header_text(value, field)
            if len(value) > MAX_PARAM_VALUE_CHARS or not _PARAM_VALUE_RE.fullmatch(value):
                raise ValidationError(
                    field,
                    f"values are at most {MAX_PARAM_VALUE_CHARS} printable ASCII characters, "
                    "without '\"' or '\\'",
                )
        mime.check_unicode(self.content, "content")
        return self


_BODY_FIELDS = {"plain": "text", "html": "html"}


class MessageSpec(_Model):
    """One message, JSON-safe. Build with field names (``from_=``) or aliases (``"from"``)."""

    from_: str = Field(validation_alias=_FROM_ALIASES, serialization_alias="from")
    to: list[str] = Field(default_factory=list)
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)
    reply_to: list[str] = Field(default_factory=list)
    subject: str
    text: str | None = None
    html: str | None = None
    alternatives: list[Alternative] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    attachments: list[Attachment] = Field(default_factory=list)
    configuration_set: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    list_unsubscribe_url: str | None = None
    list_unsubscribe_mailto: str | None = None
    idempotency_key: str | None = None

    _as_lists = field_validator("to", "cc", "bcc", "reply_to", mode="before")(_as_list)

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # As for Attachment: a message without alternatives stays readable by the workers
        # of the previous release, which refuse unknown fields.
        data: dict[str, Any] = handler(self)
        if not self.alternatives:
            data.pop("alternatives", None)
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        _prepare(self)
        return self


# --------------------------------------------------------------------------- checks


def _check_recipients_count(total: int) -> None:
    if total == 0:
        raise ValidationError("to", "at least one recipient (to, cc or bcc) is required")
    if total > MAX_RECIPIENTS:
        raise ValidationError(
            "to",
            f"{total} recipients (to + cc + bcc); SES accepts at most {MAX_RECIPIENTS} per message",
        )


def _check_idempotency_key(key: str | None) -> None:
    if key is None:
        return
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not re.fullmatch(r"[\x20-\x7e]+", key):
        raise ValidationError(
            "idempotency_key",
            f"must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters",
        )


def _check_message_id(message_id: str) -> str:
    if len(message_id) > MAX_MESSAGE_ID_CHARS or not _MESSAGE_ID_RE.fullmatch(message_id):
        raise ValidationError(
            "message_id",
            f"must be 1 to {MAX_MESSAGE_ID_CHARS} characters of letters, digits, dots "
            "and !#$%&'*+/=?^_`{|}~- (no '@', '<', '>' or spaces)",
        )
    return message_id


def _ascii_domain(domain: str, field: str) -> str:
    try:
        return ascii_domain(domain)
    except ValueError:
        raise ValidationError(field, f"{domain!r} is not a valid domain name") from None


def _fixed_headers(
    *,
    reply_to: Sequence[Address],
    headers: Mapping[str, str],
    configuration_set: str | None,
    tags: Mapping[str, str],
    field_prefix: str = "",
) -> bytes:
    """Reply-To, MIME-Version, extra headers and X-SES-* lines: what never changes."""
    lines = [mime.address_header("Reply-To", _addresses(reply_to))] if reply_to else []
    lines.append(b"MIME-Version: 1.0\r\n")
    seen: set[str] = set()
    for name, value in headers.items():
        field = f"{field_prefix}headers.{name}"
        mime.check_header_text(name, field)
        if not _FIELD_NAME_RE.fullmatch(name):
            raise ValidationError(
                field, "is not a valid header name (printable ASCII without spaces or ':')"
            )
        if len(name) > MAX_HEADER_NAME_CHARS:
            raise ValidationError(field, f"header name longer than {MAX_HEADER_NAME_CHARS}")
        lower = name.lower()
        if lower in RESERVED_HEADERS or lower.startswith(RESERVED_HEADER_PREFIXES):
            raise ValidationError(
                field, "is set by ses-tasks; use the matching message field instead"
            )
        if lower in seen:
            raise ValidationError(field, "is given twice (header names ignore case)")
        seen.add(lower)
        if not isinstance(value, str):
            raise ValidationError(field, "value must be a string")
        mime.check_header_text(value, field)
        lines.append(mime.unstructured_header(name, value))
    if configuration_set is not None:
        if not _CONFIG_SET_RE.fullmatch(configuration_set):
            raise ValidationError(
                f"{field_prefix}configuration_set",
                "must be 1 to 64 ASCII letters, digits, '_' or '-'",
            )
        lines.append(b"X-SES-CONFIGURATION-SET: " + configuration_set.encode("ascii") + b"\r\n")
    if tags:
        if len(tags) > MAX_TAGS:
            raise ValidationError(f"{field_prefix}tags", f"more than {MAX_TAGS} tags")
        for name, value in tags.items():
            field = f"{field_prefix}tags.{name}"
            if not _TAG_RE.fullmatch(name):
                raise ValidationError(
                    field, "tag names may only contain ASCII letters, digits, '_' and '-'"
                )
            if not isinstance(value, str) or not _TAG_RE.fullmatch(value):
                raise ValidationError(
                    field, "tag values must be 1+ ASCII letters, digits, '_' or '-'"
                )
        value = ", ".join(f"{name}={value}" for name, value in tags.items())
        if len(value) > MAX_TAGS_HEADER_CHARS:
            raise ValidationError(
                f"{field_prefix}tags",
                f"X-SES-MESSAGE-TAGS would be {len(value)} characters; "
                f"SES allows {MAX_TAGS_HEADER_CHARS}",
            )
        lines.append(b"X-SES-MESSAGE-TAGS: " + value.encode("ascii") + b"\r\n")
    return b"".join(lines)


def _unsubscribe_items(url: str | None, mailto: str | None, field_prefix: str = "") -> list[str]:
    """The ``<...>`` entries of List-Unsubscribe, checked."""
    items: list[str] = []
    if url is not None:
        field = f"{field_prefix}list_unsubscribe_url"
        mime.check_header_text(url, field)
        if len(url) > MAX_URL_CHARS:
            raise ValidationError(field, f"is longer than {MAX_URL_CHARS} characters")
        bad = _URL_FORBIDDEN_RE.search(url)
        if bad is not None:
            raise ValidationError(
                field,
                f"contains {bad.group()!r}; percent-encode spaces, commas, '<', '>' and "
                "non-ASCII characters",
            )
        if "=?" in url:
            raise ValidationError(
                field, "contains '=?', which mail readers decode as RFC 2047; write '%3D?'"
            )
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError as exc:
            raise ValidationError(field, f"is not a valid URL ({exc})") from None
        if parts.scheme.lower() != "https" or not host:
            raise ValidationError(field, "must be an https:// URL with a host (RFC 8058)")
        items.append(f"<{url}>")
    if mailto is not None:
        field = f"{field_prefix}list_unsubscribe_mailto"
        mime.check_header_text(mailto, field)
        if len(mailto) > MAX_URL_CHARS:
            raise ValidationError(field, f"is longer than {MAX_URL_CHARS} characters")
        addr, sep, query = mailto.removeprefix("mailto:").partition("?")
        address = parse_address(addr, field, allow_display_name=False)
        bad = _URL_FORBIDDEN_RE.search(query) or re.search(r"=\?", query)
        if bad is not None:
            raise ValidationError(field, f"query contains {bad.group()!r}; percent-encode it")
        items.append(f"<mailto:{address.addr_spec}{sep}{query}>")
    return items


def _unsubscribe_lines(url: str | None, mailto: str | None, field_prefix: str = "") -> bytes:
    """List-Unsubscribe (and RFC 8058 List-Unsubscribe-Post when there is an https URL)."""
    items = _unsubscribe_items(url, mailto, field_prefix)
    if not items:
        return b""
    lines = mime.list_header("List-Unsubscribe", items)
    if url is not None:
        lines += b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    return lines


def _subject_line(subject: str, field: str) -> bytes:
    if not isinstance(subject, str):
        raise ValidationError(field, "must be a string")
    mime.check_header_text(subject, field)
    return mime.unstructured_header("Subject", subject)


@dataclass(slots=True)
class _Prepared:
    sender: Address
    to: list[Address]
    cc: list[Address]
    bcc: list[Address]
    reply_to: list[Address]
    subject_line: bytes
    fixed: bytes
    unsubscribe: bytes
    attachments: list[mime.MimeAttachment]
    alternatives: list[mime.TextAlternative]


def _prepare(spec: MessageSpec) -> _Prepared:
    """Check everything about a spec that does not depend on render options."""
    sender = parse_address(spec.from_, "from")
    to = [parse_address(v, f"to[{i}]") for i, v in enumerate(spec.to)]
    cc = [parse_address(v, f"cc[{i}]") for i, v in enumerate(spec.cc)]
    bcc = [parse_address(v, f"bcc[{i}]") for i, v in enumerate(spec.bcc)]
    _check_recipients_count(len(to) + len(cc) + len(bcc))
    reply_to = [parse_address(v, f"reply_to[{i}]") for i, v in enumerate(spec.reply_to)]
    subject_line = _subject_line(spec.subject, "subject")
    if spec.text is None and spec.html is None:
        raise ValidationError("text", "a message needs a text or an html body (or both)")
    for name in ("text", "html"):
        body = getattr(spec, name)
        if body is not None:
            mime.check_unicode(body, name)
    fixed = _fixed_headers(
        reply_to=reply_to,
        headers=spec.headers,
        configuration_set=spec.configuration_set,
        tags=spec.tags,
    )
    unsubscribe = _unsubscribe_lines(spec.list_unsubscribe_url, spec.list_unsubscribe_mailto)
    _check_idempotency_key(spec.idempotency_key)
    attachments = _mime_attachments(spec.attachments)
    alternatives = _mime_alternatives(spec.alternatives)
    return _Prepared(
        sender, to, cc, bcc, reply_to, subject_line, fixed, unsubscribe, attachments, alternatives
    )


def _mime_attachments(
    attachments: Sequence[Attachment], field_prefix: str = ""
) -> list[mime.MimeAttachment]:
    """The attachments for the MIME writer; a Content-ID may be used once per message."""
    seen: dict[str, int] = {}
    parts: list[mime.MimeAttachment] = []
    for index, a in enumerate(attachments):
        if a.content_id is not None:
            first = seen.setdefault(a.content_id, index)
            if first != index:
                raise ValidationError(
                    f"{field_prefix}attachments[{index}].content_id",
                    f"{a.content_id!r} is already the Content-ID of attachments[{first}]",
                )
        parts.append(
            mime.MimeAttachment(
                a.filename, a.content_type.lower(), a.content, a.content_id, a.inline
            )
        )
    return parts


def _mime_alternatives(alternatives: Sequence[Alternative]) -> list[mime.TextAlternative]:
    """The extra alternatives for the MIME writer; one part per content type."""
    seen: dict[str, int] = {}
    parts: list[mime.TextAlternative] = []
    for index, alt in enumerate(alternatives):
        ctype = alt.content_type.lower()
        first = seen.setdefault(ctype, index)
        if first != index:
            raise ValidationError(
                f"alternatives[{index}].content_type",
                f"{ctype} is already alternatives[{first}]; which one a reader shows is ambiguous",
            )
        params = tuple((name.lower(), value) for name, value in alt.params.items())
        parts.append(mime.TextAlternative(ctype, alt.content, params, alt.after_html))
    return parts


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ValidationError(
            "message",
            f"rendered message is {size:,} bytes, over the limit of {max_bytes:,} bytes",
        )


def _message_id_line(message_id: str | None, domain: str) -> tuple[str, bytes]:
    left = uuid.uuid4().hex if message_id is None else _check_message_id(message_id)
    full = f"<{left}@{domain}>"
    return full, b"Message-ID: " + full.encode("ascii") + b"\r\n"


def _addresses(items: Sequence[Address]) -> list[tuple[str | None, str]]:
    return [(a.display_name, a.addr_spec) for a in items]


# --------------------------------------------------------------------------- render


def render_message(
    spec: MessageSpec,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    message_id_domain: str | None = None,
    message_id: str | None = None,
) -> RenderedMessage:
    """Render one message to SMTP DATA bytes (Bcc only in the envelope, never a header).

    ``message_id``: the left part of ``<left@domain>`` (a fresh UUID if None); the domain is
    ``message_id_domain`` or the sender's. SES replaces Message-ID, but logs and local
    copies keep ours.
    """
    prepared = _prepare(spec)
    for index, part in enumerate(prepared.attachments):
        encoded_size = (len(part.content) + 2) // 3 * 4 * 78 // 76
        if encoded_size > max_bytes:
            name = part.filename or f"<{part.content_id}>"
            raise ValidationError(
                f"attachments[{index}]",
                f"{name!r} is {encoded_size:,} bytes once encoded, "
                f"over the message limit of {max_bytes:,} bytes",
            )
    for index, alternative in enumerate(prepared.alternatives):
        if len(alternative.content) > max_bytes:  # characters: at least as many bytes
            raise ValidationError(
                f"alternatives[{index}]",
                f"{alternative.content_type} is over {max_bytes:,} bytes, the message limit",
            )
    domain = (
        _ascii_domain(message_id_domain, "message_id_domain")
        if message_id_domain is not None
        else prepared.sender.domain
    )
    full_id, id_line = _message_id_line(message_id, domain)
    layout = mime.Layout.build(
        has_text=spec.text is not None,
        has_html=spec.html is not None,
        attachments=prepared.attachments,
        alternatives=prepared.alternatives,
    )
    head = [mime.address_header("From", _addresses([prepared.sender]))]
    if prepared.to:
        head.append(mime.address_header("To", _addresses(prepared.to)))
    if prepared.cc:
        head.append(mime.address_header("Cc", _addresses(prepared.cc)))
    head += [prepared.subject_line, mime.date_line(), id_line, prepared.fixed]
    head.append(prepared.unsubscribe)
    head.append(layout.assemble(spec.text, spec.html))
    data = b"".join(head)
    _check_size(len(data), max_bytes)
    recipients = [a.addr_spec for a in (*prepared.to, *prepared.cc, *prepared.bcc)]
    return RenderedMessage(prepared.sender.addr_spec, recipients, data, full_id)


def to_email_message(
    spec: MessageSpec,
    *,
    message_id_domain: str | None = None,
    message_id: str | None = None,
) -> EmailMessage:
    """The same message built with the ``email`` package (policy SMTP).

    The slow reference implementation: tests compare the fast renderer against it, and
    callers that want an :class:`~email.message.EmailMessage` can have one.
    """
    prepared = _prepare(spec)
    msg = EmailMessage(policy=email.policy.SMTP)

    def addrs(items: Sequence[Address]) -> list[EmailAddress]:
        return [
            EmailAddress(display_name=a.display_name or "", addr_spec=a.addr_spec) for a in items
        ]

    msg["From"] = addrs([prepared.sender])
    if prepared.to:
        msg["To"] = addrs(prepared.to)
    if prepared.cc:
        msg["Cc"] = addrs(prepared.cc)
    msg["Subject"] = spec.subject
    msg["Date"] = email.utils.formatdate(localtime=False)
    domain = (
        _ascii_domain(message_id_domain, "message_id_domain")
        if message_id_domain is not None
        else prepared.sender.domain
    )
    msg["Message-ID"] = _message_id_line(message_id, domain)[0]
    if prepared.reply_to:
        msg["Reply-To"] = addrs(prepared.reply_to)
    for name, value in spec.headers.items():
        msg[name] = value
    if spec.configuration_set is not None:
        msg["X-SES-CONFIGURATION-SET"] = spec.configuration_set
    if spec.tags:
        msg["X-SES-MESSAGE-TAGS"] = ", ".join(f"{k}={v}" for k, v in spec.tags.items())
    items = _unsubscribe_items(spec.list_unsubscribe_url, spec.list_unsubscribe_mailto)
    if items:
        msg["List-Unsubscribe"] = ", ".join(items)
        if spec.list_unsubscribe_url is not None:
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    # The same order as mime.Layout: text, alternatives, html (related), after_html ones.
    has_html = spec.html is not None
    bodies: list[tuple[str, str, dict[str, str]]] = []
    if spec.text is not None:
        bodies.append((spec.text, "plain", {}))
    bodies += [
        (a.content, a.content_type.partition("/")[2], dict(a.params))
        for a in prepared.alternatives
        if not (has_html and a.after_html)
    ]
    html_index = len(bodies)
    if spec.html is not None:
        bodies.append((spec.html, "html", {}))
    bodies += [
        (a.content, a.content_type.partition("/")[2], dict(a.params))
        for a in prepared.alternatives
        if has_html and a.after_html
    ]
    for index, (content, subtype, params) in enumerate(bodies):
        if index == 0:
            msg.set_content(content, subtype=subtype, params=params or None)
        else:
            msg.add_alternative(content, subtype=subtype, params=params or None)
    related = [a for a in prepared.attachments if has_html and a.inline and a.content_id]
    others = [a for a in prepared.attachments if not (has_html and a.inline and a.content_id)]
    if related:
        html_part = list(msg.iter_parts())[html_index] if len(bodies) > 1 else msg
        for a in related:
            maintype, _, subtype = a.content_type.partition("/")
            html_part.add_related(
                a.content,
                maintype=maintype,
                subtype=subtype,
                filename=a.filename,
                cid=f"<{a.content_id}>",
                disposition="inline",
            )
    for a in others:
        maintype, _, subtype = a.content_type.partition("/")
        msg.add_attachment(
            a.content,
            maintype=maintype,
            subtype=subtype,
            filename=a.filename,
            cid=None if a.content_id is None else f"<{a.content_id}>",
            disposition="inline" if a.inline else "attachment",
        )
    return msg


# --------------------------------------------------------------------------- campaigns


class _Sandbox(SandboxedEnvironment):
    """Jinja2 sandbox that also refuses ``'x' * 10**9`` style memory bombs."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(right) > 1000:
                raise SecurityError("exponent too large")
        elif isinstance(left, (str, list, tuple)) and isinstance(right, int):
            if len(left) * right > MAX_TEMPLATE_VALUE_CHARS:
                raise SecurityError("repeated value too large")
        elif (
            isinstance(right, (str, list, tuple))
            and isinstance(left, int)
            and len(right) * left > MAX_TEMPLATE_VALUE_CHARS
        ):
            raise SecurityError("repeated value too large")
        return super().call_binop(context, operator, left, right)


def _environment(*, autoescape: bool) -> _Sandbox:
    return _Sandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        keep_trailing_newline=True,  # bodies must come out exactly as written
        auto_reload=False,
        cache_size=0,
    )


_TEXT_ENV = _environment(autoescape=False)
_HTML_ENV = _environment(autoescape=True)
#: Jinja2's default globals (range, cycler, ...), identical in both environments.
_TEMPLATE_GLOBALS: dict[str, Any] = dict(_TEXT_ENV.globals)


def _is_template(source: str | None) -> bool:
    return source is not None and any(marker in source for marker in _TEMPLATE_MARKERS)


def _compile(env: _Sandbox, source: str, field: str) -> jinja2.Template:
    mime.check_unicode(source, field)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValidationError(field, f"line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise ValidationError(field, str(exc)) from None


def _run(template: jinja2.Template, parent: dict[str, Any], field: str) -> str:
    """Render with ``parent`` (globals + variables, built once per recipient).

    ``Template.render`` would merge the globals into a fresh dict for every part; sharing
    one prepared dict across subject, text and html halves the Jinja2 cost per message.
    """
    try:
        context = template.new_context(parent, shared=True)
        return "".join(template.root_render_func(context))
    except jinja2.TemplateError as exc:
        raise ValidationError(field, str(exc) or type(exc).__name__) from None
    except Exception as exc:  # template code is user input: anything it raises is theirs
        raise ValidationError(field, f"{type(exc).__name__}: {exc}") from None


class _CampaignFields(_Model):
    """The JSON form of a CampaignTemplate (what ``to_dict`` writes and Redis stores)."""

    from_: str = Field(validation_alias=_FROM_ALIASES, serialization_alias="from")
    subject: str
    text: str | None = None
    html: str | None = None
    reply_to: list[str] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    attachments: list[Attachment] = Field(default_factory=list)
    configuration_set: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    list_unsubscribe_url: str | None = None
    list_unsubscribe_mailto: str | None = None
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)
    message_id_domain: str | None = None

    _as_lists = field_validator("reply_to", mode="before")(_as_list)


class CampaignTemplate:
    """A campaign message compiled once and rendered per recipient on the hot path.

    ``subject``, ``text`` and ``from_`` are Jinja2 templates without autoescape; ``html``
    is one with autoescape; ``list_unsubscribe_url`` / ``list_unsubscribe_mailto`` may be
    templates too. Templates run in a sandbox with ``StrictUndefined``: a missing variable
    is an error for that recipient, not an empty string in someone's inbox. The
    ``email`` variable defaults to the recipient address.
    """

    __slots__ = (
        "_fields",
        "_fixed",
        "_from_line",
        "_from_t",
        "_html_t",
        "_layout",
        "_max_bytes",
        "_message_id_domain",
        "_sender",
        "_subject_line",
        "_subject_t",
        "_text_t",
        "_unsub_const",
        "_unsub_mailto_t",
        "_unsub_url_t",
    )

    FORMAT_VERSION: ClassVar[int] = 1

    def __init__(
        self,
        *,
        from_: str,
        subject: str,
        text: str | None = None,
        html: str | None = None,
        reply_to: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        attachments: Sequence[Attachment] = (),
        configuration_set: str | None = None,
        tags: Mapping[str, str] | None = None,
        list_unsubscribe_url: str | None = None,
        list_unsubscribe_mailto: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        message_id_domain: str | None = None,
    ) -> None:
        data = {
            "from": from_,
            "subject": subject,
            "text": text,
            "html": html,
            "reply_to": _as_list(reply_to),
            "headers": {} if headers is None else headers,
            "attachments": attachments,
            "configuration_set": configuration_set,
            "tags": {} if tags is None else tags,
            "list_unsubscribe_url": list_unsubscribe_url,
            "list_unsubscribe_mailto": list_unsubscribe_mailto,
            "max_bytes": max_bytes,
            "message_id_domain": message_id_domain,
        }
        try:
            fields = _CampaignFields.model_validate(data)
        except ValidationError as exc:
            raise ValidationError(f"template.{exc.field}", exc.problem) from None
        self._setup(fields)

    def _setup(self, f: _CampaignFields) -> None:
        self._fields = f
        self._max_bytes = f.max_bytes
        if f.text is None and f.html is None:
            raise ValidationError("template.text", "a campaign needs a text or an html body")
        self._subject_t = self._subject_line = None
        if _is_template(f.subject):
            self._subject_t = _compile(_TEXT_ENV, f.subject, "template.subject")
        else:
            self._subject_line = _subject_line(f.subject, "template.subject")
        self._text_t = None if f.text is None else _compile(_TEXT_ENV, f.text, "template.text")
        self._html_t = None if f.html is None else _compile(_HTML_ENV, f.html, "template.html")
        self._from_t = self._from_line = self._sender = None
        if _is_template(f.from_):
            self._from_t = _compile(_TEXT_ENV, f.from_, "template.from")
        else:
            self._sender = parse_address(f.from_, "template.from")
            self._from_line = mime.address_header("From", _addresses([self._sender]))
        self._message_id_domain = (
            None
            if f.message_id_domain is None
            else _ascii_domain(f.message_id_domain, "template.message_id_domain")
        )
        reply_to = [parse_address(v, f"template.reply_to[{i}]") for i, v in enumerate(f.reply_to)]
        self._fixed = _fixed_headers(
            reply_to=reply_to,
            headers=f.headers,
            configuration_set=f.configuration_set,
            tags=f.tags,
            field_prefix="template.",
        )
        url, mailto = f.list_unsubscribe_url, f.list_unsubscribe_mailto
        self._unsub_url_t = (
            _compile(_TEXT_ENV, url, "template.list_unsubscribe_url")
            if (_is_template(url) and url is not None)
            else None
        )
        self._unsub_mailto_t = (
            _compile(_TEXT_ENV, mailto, "template.list_unsubscribe_mailto")
            if _is_template(mailto) and mailto is not None
            else None
        )
        self._unsub_const = (
            _unsubscribe_lines(url, mailto, "template.")
            if self._unsub_url_t is None and self._unsub_mailto_t is None
            else b""
        )
        attachments = _mime_attachments(f.attachments, "template.")
        self._layout = mime.Layout.build(
            has_text=f.text is not None, has_html=f.html is not None, attachments=attachments
        )
        encoded = len(self._layout.attachment_parts) + len(self._layout.related_parts)
        if encoded > f.max_bytes:
            raise ValidationError(
                "template.attachments",
                f"attachments are {encoded:,} bytes once encoded, "
                f"over the message limit of {f.max_bytes:,} bytes",
            )

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; :meth:`from_dict` rebuilds (and re-validates) the template."""
        data = self._fields.model_dump(mode="json", by_alias=True)
        data["version"] = self.FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CampaignTemplate:
        if not isinstance(data, Mapping):
            raise ValidationError("template", "must be a JSON object")
        payload = dict(data)
        version = payload.pop("version", cls.FORMAT_VERSION)
        if version != cls.FORMAT_VERSION:
            raise ValidationError("template.version", f"unsupported version {version!r}")
        try:
            fields = _CampaignFields.model_validate(payload)
        except ValidationError as exc:
            raise ValidationError(f"template.{exc.field}", exc.problem) from None
        self = cls.__new__(cls)
        self._setup(fields)
        return self

    def __repr__(self) -> str:
        return f"CampaignTemplate(from_={self._fields.from_!r}, subject={self._fields.subject!r})"

    # -- the hot path -------------------------------------------------------------------

    def render(
        self, email: str, variables: Mapping[str, object], *, message_id: str | None = None
    ) -> RenderedMessage:
        """One recipient's message. Raises ValidationError naming the part that failed."""
        recipient = parse_address(email, "to")
        if not isinstance(variables, Mapping):
            raise ValidationError("variables", "must be a mapping of names to values")
        variables = {**_TEMPLATE_GLOBALS, "email": email, **variables}
        if self._from_t is not None:
            sender = parse_address(_run(self._from_t, variables, "template.from"), "template.from")
            from_line = mime.address_header("From", _addresses([sender]))
        else:
            assert self._sender is not None and self._from_line is not None
            sender, from_line = self._sender, self._from_line
        if self._subject_t is not None:
            subject = _run(self._subject_t, variables, "template.subject")
            subject_line = _subject_line(subject, "template.subject")
        else:
            assert self._subject_line is not None
            subject_line = self._subject_line
        text = None if self._text_t is None else _run(self._text_t, variables, "template.text")
        html = None if self._html_t is None else _run(self._html_t, variables, "template.html")
        unsub = self._unsub_const
        if self._unsub_url_t is not None or self._unsub_mailto_t is not None:
            f = self._fields
            url = (
                f.list_unsubscribe_url
                if self._unsub_url_t is None
                else _run(self._unsub_url_t, variables, "template.list_unsubscribe_url")
            )
            mailto = (
                f.list_unsubscribe_mailto
                if self._unsub_mailto_t is None
                else _run(self._unsub_mailto_t, variables, "template.list_unsubscribe_mailto")
            )
            unsub = _unsubscribe_lines(url, mailto, "template.")
        full_id, id_line = _message_id_line(message_id, self._message_id_domain or sender.domain)
        try:
            content = self._layout.assemble(text, html)
        except ValidationError as exc:
            raise ValidationError(f"template.{exc.field}", exc.problem) from None
        data = b"".join(
            (
                from_line,
                mime.address_header("To", ((recipient.display_name, recipient.addr_spec),)),
                subject_line,
                mime.date_line(),
                id_line,
                self._fixed,
                unsub,
                content,
            )
        )
        _check_size(len(data), self._max_bytes)
        return RenderedMessage(sender.addr_spec, [recipient.addr_spec], data, full_id)
