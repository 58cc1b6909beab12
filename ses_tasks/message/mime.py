"""Fast RFC 5322 / MIME encoding: the pieces ``message.py`` assembles into SMTP DATA.

Building a message with ``email.message.EmailMessage`` costs milliseconds, mostly in the
``email`` package's header parsing and folding. A campaign sends thousands of messages that
differ only in a few headers and the bodies, so this module encodes those pieces directly
into bytes and leaves everything constant to be encoded once. The ``email`` package stays
the reference: the tests parse our output back with it and compare.

Rules this module keeps: CRLF line endings only; no line over 998 octets (headers are
folded at 78 columns where they can be); 7-bit output (non-ASCII text becomes RFC 2047
encoded-words in headers, RFC 2231 parameters, quoted-printable or base64 in bodies).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import quote

from ses_tasks.errors import ValidationError

__all__ = [
    "CRLF",
    "FOLD_COLUMNS",
    "MAX_LINE_OCTETS",
    "Layout",
    "MimeAttachment",
    "TextAlternative",
    "address_header",
    "check_header_text",
    "check_unicode",
    "date_line",
    "encode_attachment_part",
    "encode_body",
    "format_address",
    "list_header",
    "new_boundary",
    "text_content_type",
    "unstructured_header",
]

CRLF = b"\r\n"
#: RFC 5322 hard limit for a line, CRLF excluded.
MAX_LINE_OCTETS = 998
#: RFC 5322 recommended line length; headers are folded to fit where they can.
FOLD_COLUMNS = 78
#: RFC 2047: an encoded-word is at most 75 characters.
_EW_MAX_CHARS = 75
_EW_OVERHEAD_CHARS = len("=?utf-8?q??=")
#: Plain (unencoded) header words longer than this go into encoded-words, which can split.
_MAX_PLAIN_WORD_CHARS = 900

# Control characters a header may never carry. CR and LF get their own message because they
# are how header injection works; the rest are simply refused.
_HEADER_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_ATOM_PHRASE_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?: [A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*"
)
_PRINTABLE_ASCII_RE = re.compile(r"[\x20-\x7e]*")
_RFC2231_PREFIX = "utf-8''"
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")

# Bytes allowed in a 7bit body besides LF: printable ASCII and TAB.
_7BIT_ALLOWED = bytes(range(0x20, 0x7F)) + b"\t\n"
# Bytes quoted-printable must escape (approximately: all but printable ASCII, TAB, LF).
_QP_LITERAL = bytes(range(0x20, 0x7F)).replace(b"=", b"") + b"\t\n"


def check_header_text(value: str, field: str) -> None:
    """Refuse text that cannot go into a header safely (injection, controls, bad Unicode)."""
    match = _HEADER_CONTROL_RE.search(value)
    if match is not None:
        char = match.group()
        if char in "\r\n":
            raise ValidationError(field, "contains CR or LF (header injection is refused)")
        if char == "\x00":
            raise ValidationError(field, "contains a NUL character")
        raise ValidationError(field, f"contains the control character U+{ord(char):04X}")
    check_unicode(value, field)


def check_unicode(value: str, field: str) -> None:
    """Lone surrogates cannot be encoded as UTF-8; refuse them up front."""
    if not value.isascii() and _SURROGATE_RE.search(value) is not None:
        raise ValidationError(field, "contains a lone surrogate (not valid Unicode text)")


# --------------------------------------------------------------------------- headers


@lru_cache(maxsize=4096)
def _q_char(char: str) -> str:
    if char in _Q_SAFE:
        return char
    if char == " ":
        return "_"
    return "".join(f"={byte:02X}" for byte in char.encode("utf-8"))


def _encoded_words(text: str, first_chars: int, rest_chars: int) -> list[str]:
    """Split ``text`` into RFC 2047 encoded-words, never splitting a character.

    ``first_chars`` / ``rest_chars``: the room for the first and later words (whole words,
    overhead included). Q or B encoding, whichever is shorter, like the ``email`` package.
    """
    q_parts = [_q_char(char) for char in text]
    q_len = sum(map(len, q_parts))
    n_bytes = len(text.encode("utf-8"))
    b_len = (n_bytes + 2) // 3 * 4
    words: list[str] = []
    budget = max(first_chars, 24) - _EW_OVERHEAD_CHARS
    if q_len <= b_len:
        current: list[str] = []
        used = 0
        for part in q_parts:
            if used + len(part) > budget and current:
                words.append("=?utf-8?q?" + "".join(current) + "?=")
                current, used, budget = [], 0, rest_chars - _EW_OVERHEAD_CHARS
            current.append(part)
            used += len(part)
        words.append("=?utf-8?q?" + "".join(current) + "?=")
        return words
    chunk: list[str] = []
    chunk_bytes = 0
    max_bytes = budget // 4 * 3
    for char in text:
        size = len(char.encode("utf-8")) if ord(char) > 0x7F else 1
        if chunk_bytes + size > max_bytes and chunk:
            words.append(_b_word("".join(chunk)))
            chunk, chunk_bytes = [], 0
            max_bytes = (rest_chars - _EW_OVERHEAD_CHARS) // 4 * 3
        chunk.append(char)
        chunk_bytes += size
    words.append(_b_word("".join(chunk)))
    return words


def _b_word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


def _fold_tokens(prefix: str, tokens: Sequence[str]) -> bytes:
    """Join tokens with single spaces, breaking lines before a token past 78 columns."""
    lines: list[str] = []
    current = prefix + tokens[0]
    for token in tokens[1:]:
        if token and len(current) + 1 + len(token) > FOLD_COLUMNS and current.strip():
            lines.append(current)
            current = " " + token
        else:
            current += " " + token
    lines.append(current)
    return "\r\n".join(lines).encode("ascii") + CRLF


def _needs_encoding(value: str) -> bool:
    """Whether unstructured text must become encoded-words to survive a parse back."""
    return (
        not value.isascii()
        or "=?" in value
        or value != value.strip(" \t")
        or (
            len(value) > _MAX_PLAIN_WORD_CHARS
            and max(map(len, value.split(" "))) > _MAX_PLAIN_WORD_CHARS
        )
    )


def unstructured_header(name: str, value: str) -> bytes:
    """``Name: value`` CRLF for free text (Subject, extra headers), folded and encoded.

    The caller has run :func:`check_header_text` on ``value``.
    """
    prefix = name + ": "
    if not _needs_encoding(value):
        if len(prefix) + len(value) <= FOLD_COLUMNS:
            return (prefix + value).encode("ascii") + CRLF
        return _fold_tokens(prefix, value.split(" "))
    words = _encoded_words(value, FOLD_COLUMNS - len(prefix), _EW_MAX_CHARS)
    # Whitespace between adjacent encoded-words is dropped by decoders (RFC 2047 6.2).
    return (prefix + "\r\n ".join(words)).encode("ascii") + CRLF


def _phrase(display_name: str) -> str:
    """A display name as an RFC 5322 phrase that parses back to exactly ``display_name``."""
    if "=?" not in display_name:
        if _ATOM_PHRASE_RE.fullmatch(display_name):
            return display_name
        if len(display_name) <= 200 and _PRINTABLE_ASCII_RE.fullmatch(display_name):
            return '"' + display_name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    # One encoded-word for the whole name: decoders disagree on whitespace between adjacent
    # encoded-words in a phrase (Python keeps it, RFC 2047 drops it), so never split. A very
    # long name exceeds the 75-character advice for encoded-words but stays under 998 octets.
    return _encoded_words(display_name, 10**6, 10**6)[0]


def format_address(display_name: str | None, addr_spec: str) -> str:
    """``addr`` or ``phrase <addr>`` (``addr_spec`` already ASCII)."""
    if not display_name:
        return addr_spec
    return f"{_phrase(display_name)} <{addr_spec}>"


def address_header(name: str, addresses: Iterable[tuple[str | None, str]]) -> bytes:
    """``To: a@b, "Name" <c@d>`` CRLF, folded between addresses and encoded-words."""
    tokens: list[str] = []
    for display_name, addr_spec in addresses:
        if tokens:
            tokens[-1] += ","
        if display_name:
            tokens.append(_phrase(display_name))
            tokens.append(f"<{addr_spec}>")
        else:
            tokens.append(addr_spec)
    return _fold_tokens(name + ": ", tokens)


def list_header(name: str, items: Sequence[str]) -> bytes:
    """``Name: a, b`` CRLF with ASCII items, folded between items."""
    tokens = [item + "," for item in items[:-1]]
    tokens.append(items[-1])
    return _fold_tokens(name + ": ", tokens)


_date_cache: tuple[int, bytes] = (-1, b"")


def date_line(now_s: float | None = None) -> bytes:
    """``Date:`` CRLF in UTC, cached per second (formatting costs more than the lookup)."""
    global _date_cache
    second = int(time.time() if now_s is None else now_s)
    cached = _date_cache
    if cached[0] == second:
        return cached[1]
    text = email.utils.formatdate(second, localtime=False)  # "... -0000"
    line = b"Date: " + text[:-5].encode("ascii") + b"+0000" + CRLF
    _date_cache = (second, line)
    return line


# --------------------------------------------------------------------------- bodies


def encode_body(text: str, field: str) -> tuple[bytes, bytes]:
    """``(cte, body)``: the text as UTF-8, CRLF lines, ending with CRLF.

    Line breaks are normalised like the ``email`` package does (CR, LF and CRLF all end a
    line; a final line break is added). 7bit when the text is printable ASCII with lines of
    at most 998 octets; otherwise quoted-printable or base64, whichever is shorter.
    """
    check_unicode(text, field)
    raw = text.encode("utf-8")
    if b"\r" in raw:
        raw = b"\n".join(raw.splitlines()) + b"\n"
    elif not raw.endswith(b"\n"):
        raw += b"\n"
    if not raw.translate(None, _7BIT_ALLOWED) and (
        len(raw) <= MAX_LINE_OCTETS or max(map(len, raw.split(b"\n"))) <= MAX_LINE_OCTETS
    ):
        return b"7bit", raw.replace(b"\n", b"\r\n")
    escaped = len(raw.translate(None, _QP_LITERAL))
    qp_estimate = len(raw) + 2 * escaped + len(raw) // 75 * 3
    b64_estimate = (len(raw) + 2) // 3 * 4 + len(raw) // 57 * 2
    if qp_estimate <= b64_estimate:
        encoded = binascii.b2a_qp(raw, quotetabs=False, istext=True, header=False)
        return b"quoted-printable", encoded.replace(b"\n", b"\r\n")
    return b"base64", base64.encodebytes(raw.replace(b"\n", b"\r\n")).replace(b"\n", b"\r\n")


class MimeAttachment(NamedTuple):
    """An attachment as the MIME writer takes it (the spec has checked every field).

    ``content_id`` without angle brackets. An ``inline`` part with a ``content_id`` goes
    into ``multipart/related`` with the html body when there is one; every other part is
    a part of ``multipart/mixed`` (``Content-Disposition: inline`` or ``attachment``).
    """

    filename: str | None
    content_type: str
    content: bytes
    content_id: str | None = None
    inline: bool = False


class TextAlternative(NamedTuple):
    """A ``text/*`` part of ``multipart/alternative`` besides text/plain and text/html.

    ``after_html``: placed after the html part (the html part is otherwise the last,
    preferred one); alternatives keep their given order on either side of it.
    """

    content_type: str
    content: str
    params: tuple[tuple[str, str], ...] = ()
    after_html: bool = False


def encode_attachment_part(
    filename: str | None,
    content_type: str,
    content: bytes,
    boundary: bytes,
    *,
    content_id: str | None = None,
    inline: bool = False,
) -> bytes:
    """A complete body part (delimiter line, headers, base64 body) for an attachment.

    ``Content-ID: <content_id>`` when given; ``Content-Disposition`` is ``inline`` or
    ``attachment``, with the filename when there is one.
    """
    body = base64.encodebytes(content).replace(b"\n", b"\r\n")
    cid = b"" if content_id is None else b"Content-ID: <" + content_id.encode("ascii") + b">\r\n"
    return (
        b"--"
        + boundary
        + CRLF
        + b"Content-Type: "
        + content_type.encode("ascii")
        + CRLF
        + b"Content-Transfer-Encoding: base64"
        + CRLF
        + cid
        + _content_disposition(filename, b"inline" if inline else b"attachment")
        + CRLF
        + body
        + CRLF
    )


def _content_disposition(filename: str | None, disposition: bytes = b"attachment") -> bytes:
    if filename is None:
        return b"Content-Disposition: " + disposition + CRLF
    if (
        len(filename) <= 60
        and _PRINTABLE_ASCII_RE.fullmatch(filename)
        and "=?" not in filename
        and filename == filename.strip()
    ):
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        return (
            b"Content-Disposition: "
            + disposition
            + b'; filename="'
            + quoted.encode("ascii")
            + b'"\r\n'
        )
    # RFC 2231: percent-encoded UTF-8, split into numbered sections to keep lines short.
    encoded = quote(filename, safe="!#$&+-.^_`|~")
    chunks: list[str] = []
    while encoded:
        cut = min(60, len(encoded))
        # Never cut inside a %XX escape.
        while cut < len(encoded) and "%" in encoded[max(cut - 2, 0) : cut]:
            cut -= 1
        chunks.append(encoded[:cut])
        encoded = encoded[cut:]
    if len(chunks) == 1:
        params = [f"filename*=utf-8''{chunks[0]}"]
    else:
        params = [
            f"filename*{i}*={_RFC2231_PREFIX if i == 0 else ''}{chunk}"
            for i, chunk in enumerate(chunks)
        ]
    return (
        b"Content-Disposition: "
        + disposition
        + (";\r\n " + ";\r\n ".join(params)).encode("ascii")
        + CRLF
    )


# An RFC 2045 token without "'" and "*": RFC 2231 gives those a meaning that parsers (the
# email package's among them) apply to unquoted values too, so such values are quoted.
_TOKEN_RE = re.compile(r"[!#$%&+\-.^_`|~0-9A-Za-z]+")


def text_content_type(content_type: str, params: Sequence[tuple[str, str]] = ()) -> bytes:
    """``Content-Type: type/subtype; charset="utf-8"; name=value`` CRLF, folded at 78.

    Parameter names and values are checked by the caller (printable ASCII, no ``"`` or
    ``\\``); a value that is not a token is quoted.
    """
    items = ['charset="utf-8"']
    items += [
        f"{name}={value}" if _TOKEN_RE.fullmatch(value) else f'{name}="{value}"'
        for name, value in params
    ]
    tokens = [content_type + ";"] + [item + ";" for item in items[:-1]] + [items[-1]]
    return _fold_tokens("Content-Type: ", tokens)


# --------------------------------------------------------------------------- structure


def new_boundary() -> bytes:
    # "=_" never occurs in quoted-printable or base64 output; 7bit bodies are checked.
    return b"=_" + secrets.token_hex(16).encode("ascii")


_TEXT_TYPE = b'Content-Type: text/plain; charset="utf-8"\r\n'
_HTML_TYPE = b'Content-Type: text/html; charset="utf-8"\r\n'
_CTE = {
    b"7bit": b"Content-Transfer-Encoding: 7bit\r\n",
    b"quoted-printable": b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"base64": b"Content-Transfer-Encoding: base64\r\n",
}

#: An encoded text part: (transfer encoding, body, Content-Type line).
_EncodedText = tuple[bytes, bytes, bytes]


@dataclass(frozen=True, slots=True)
class Layout:
    """The MIME structure of a message, encoded once: boundaries and the fixed parts.

    ``assemble`` adds the per-message bodies. Attachments, inline parts and extra
    alternatives are fixed per layout, which is what lets a campaign encode them once.

    The structure (RFC 2046, RFC 2387), from the inside out:

    * the html body, inside ``multipart/related`` with the inline parts that have a
      Content-ID when there are any (``type="text/html"``, html first);
    * ``multipart/alternative`` when there is more than one of: text/plain (first), the
      extra alternatives (given order), the html block (last unless an alternative says
      ``after_html``);
    * ``multipart/mixed`` around that when there are attachments (and inline parts that
      did not go into ``multipart/related``).

    Without inline parts or extra alternatives ``assemble`` takes the original fast path.
    """

    has_text: bool
    has_html: bool
    mixed_boundary: bytes
    alt_boundary: bytes
    attachment_parts: bytes  # every attachment part, each with its delimiter line
    related_boundary: bytes = b""
    related_parts: bytes = b""  # inline parts referenced by cid:, each with its delimiter
    before_html: tuple[_EncodedText, ...] = ()
    after_html: tuple[_EncodedText, ...] = ()
    nested: bool = False  # inline parts or extra alternatives: not the fast path

    @classmethod
    def build(
        cls,
        *,
        has_text: bool,
        has_html: bool,
        attachments: Sequence[MimeAttachment] = (),
        alternatives: Sequence[TextAlternative] = (),
    ) -> Layout:
        mixed = new_boundary()
        related = [a for a in attachments if has_html and a.inline and a.content_id]
        in_mixed = [a for a in attachments if not (has_html and a.inline and a.content_id)]
        parts = b"".join(_attachment_part(a, mixed) for a in in_mixed)
        related_boundary = new_boundary() if related else b""
        related_parts = b"".join(_attachment_part(a, related_boundary) for a in related)
        before: list[_EncodedText] = []
        after: list[_EncodedText] = []
        for index, alternative in enumerate(alternatives):
            cte, body = encode_body(alternative.content, f"alternatives[{index}].content")
            line = text_content_type(alternative.content_type, alternative.params)
            (after if has_html and alternative.after_html else before).append((cte, body, line))
        layout = cls(
            has_text,
            has_html,
            mixed,
            new_boundary(),
            parts,
            related_boundary,
            related_parts,
            tuple(before),
            tuple(after),
            bool(related or before or after),
        )
        if layout._collides(*layout.before_html, *layout.after_html):
            layout = layout.renew()
        return layout

    def renew(self) -> Layout:
        """The same layout with fresh boundaries (a 7bit body happened to contain one)."""
        while True:
            mixed = new_boundary()
            parts = self.attachment_parts.replace(b"--" + self.mixed_boundary, b"--" + mixed)
            related, related_parts = self.related_boundary, self.related_parts
            if related:
                related = new_boundary()
                related_parts = related_parts.replace(
                    b"--" + self.related_boundary, b"--" + related
                )
            layout = Layout(
                self.has_text,
                self.has_html,
                mixed,
                new_boundary(),
                parts,
                related,
                related_parts,
                self.before_html,
                self.after_html,
                self.nested,
            )
            if not layout._collides(*layout.before_html, *layout.after_html):
                return layout

    def assemble(self, text: str | None, html: str | None) -> bytes:
        """Content headers, blank line and body; starts with ``Content-Type``."""
        text_part = encode_body(text, "text") if self.has_text and text is not None else None
        html_part = encode_body(html, "html") if self.has_html and html is not None else None
        layout = self
        while layout._collides(text_part, html_part):
            layout = layout.renew()
        return layout._assemble(text_part, html_part)

    def _collides(self, *parts: tuple[bytes, ...] | None) -> bool:
        for part in parts:
            if (
                part is not None
                and part[0] == b"7bit"
                and (
                    self.mixed_boundary in part[1]
                    or self.alt_boundary in part[1]
                    or (
                        self.nested
                        and self.related_boundary != b""
                        and self.related_boundary in part[1]
                    )
                )
            ):
                return True
        return False

    def _assemble(
        self, text_part: tuple[bytes, bytes] | None, html_part: tuple[bytes, bytes] | None
    ) -> bytes:
        if self.nested:
            return self._wrap_mixed(self._assemble_nested(text_part, html_part))
        if text_part is not None and html_part is not None:
            alt = self.alt_boundary
            inner = b"".join(
                (
                    b'Content-Type: multipart/alternative;\r\n boundary="',
                    alt,
                    b'"\r\n\r\n--',
                    alt,
                    CRLF,
                    _TEXT_TYPE,
                    _CTE[text_part[0]],
                    CRLF,
                    text_part[1],
                    b"\r\n--",
                    alt,
                    CRLF,
                    _HTML_TYPE,
                    _CTE[html_part[0]],
                    CRLF,
                    html_part[1],
                    b"\r\n--",
                    alt,
                    b"--\r\n",
                )
            )
        elif text_part is not None:
            inner = _TEXT_TYPE + _CTE[text_part[0]] + CRLF + text_part[1]
        elif html_part is not None:
            inner = _HTML_TYPE + _CTE[html_part[0]] + CRLF + html_part[1]
        else:  # pragma: no cover - callers guarantee a body
            raise ValidationError("text", "a message needs a text or an html body")
        return self._wrap_mixed(inner)

    def _assemble_nested(
        self, text_part: tuple[bytes, bytes] | None, html_part: tuple[bytes, bytes] | None
    ) -> bytes:
        """The general case: inline parts and/or extra alternatives."""
        entities: list[bytes] = []
        if text_part is not None:
            entities.append(_TEXT_TYPE + _CTE[text_part[0]] + CRLF + text_part[1])
        entities += [line + _CTE[cte] + CRLF + body for cte, body, line in self.before_html]
        if html_part is not None:
            html = _HTML_TYPE + _CTE[html_part[0]] + CRLF + html_part[1]
            if self.related_parts:
                rel = self.related_boundary
                html = b"".join(
                    (
                        b'Content-Type: multipart/related; type="text/html";\r\n boundary="',
                        rel,
                        b'"\r\n\r\n--',
                        rel,
                        CRLF,
                        html,
                        CRLF,
                        self.related_parts,
                        b"--",
                        rel,
                        b"--\r\n",
                    )
                )
            entities.append(html)
        entities += [line + _CTE[cte] + CRLF + body for cte, body, line in self.after_html]
        if not entities:  # pragma: no cover - callers guarantee a body
            raise ValidationError("text", "a message needs a text or an html body")
        if len(entities) == 1:
            return entities[0]
        alt = self.alt_boundary
        delimiter = b"--" + alt + CRLF
        return b"".join(
            (
                b'Content-Type: multipart/alternative;\r\n boundary="',
                alt,
                b'"\r\n\r\n',
                *(delimiter + entity + CRLF for entity in entities),
                b"--",
                alt,
                b"--\r\n",
            )
        )

    def _wrap_mixed(self, inner: bytes) -> bytes:
        if not self.attachment_parts:
            return inner
        mixed = self.mixed_boundary
        return b"".join(
            (
                b'Content-Type: multipart/mixed;\r\n boundary="',
                mixed,
                b'"\r\n\r\n--',
                mixed,
                CRLF,
                inner,
                CRLF,
                self.attachment_parts,
                b"--",
                mixed,
                b"--\r\n",
            )
        )


def _attachment_part(attachment: MimeAttachment, boundary: bytes) -> bytes:
    return encode_attachment_part(
        attachment.filename,
        attachment.content_type,
        attachment.content,
        boundary,
        content_id=attachment.content_id,
        inline=attachment.inline,
    )
