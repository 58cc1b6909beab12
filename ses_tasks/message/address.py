"""The two forms of an addr-spec: the one we send, and the one we compare.

``ascii_addr_spec`` is the sending form: checked by email-validator, the domain as
IDNA/Punycode ASCII (lower case), the local part as given (SES needs 7-bit addresses, so a
non-ASCII local part is refused). ``canonical_address`` is that, lower-cased whole: the one
key every comparison uses (suppression list, transient-bounce counts), so ``User@Bücher.example``,
``user@bücher.example`` and ``user@xn--bcher-kva.example`` (the form SES reports) are one
address. Local parts are case-sensitive by RFC 5321, but mailbox providers treat them as
case-insensitive, and for suppression a false match (not mailing ``Bob@`` because ``bob@``
bounced) is the safe side to err on. Sending keeps the original case.
"""

from __future__ import annotations

import re
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

from ses_tasks.errors import ValidationError

__all__ = ["NAME_ADDR_RE", "ascii_addr_spec", "ascii_domain", "canonical_address"]

#: ``Name <addr>`` (the name possibly quoted): group 1 the name, group 2 the addr-spec.
NAME_ADDR_RE = re.compile(r"(.*?)\s*<([^<>]*)>\s*")

#: A dot-atom local part of the most common characters: email-validator accepts it as is.
_SIMPLE_LOCAL_RE = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*")
_MAX_LOCAL_CHARS = 64
_MAX_ADDRESS_CHARS = 254


@lru_cache(maxsize=4096)
def _check(addr: str) -> str:
    """ASCII addr-spec, or raise ValueError with the reason (cached: senders repeat)."""
    try:
        result = validate_email(addr, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    if not result.local_part.isascii():
        raise ValueError(
            "non-ASCII characters before the @ are refused (SES needs 7-bit addresses)"
        )
    return f"{result.local_part}@{result.ascii_domain}"


def ascii_domain(domain: str) -> str:
    """``domain`` as lower-case IDNA ASCII, or ValueError (cached per domain)."""
    return _check("postmaster@" + domain).partition("@")[2]


def ascii_addr_spec(addr: str) -> str:
    """The sending form of a bare ``addr``, or ValueError with the reason.

    A campaign's recipients are mostly unique but share a few domains; a plain local part
    needs no normalisation, so only the (cached) domain check remains. Anything else, and
    every failure, goes through the full check so errors read the same.
    """
    local, at, domain = addr.rpartition("@")
    if at and len(local) <= _MAX_LOCAL_CHARS and _SIMPLE_LOCAL_RE.fullmatch(local):
        try:
            spec = f"{local}@{ascii_domain(domain)}"
        except ValueError:
            return _check(addr)
        if len(spec) <= _MAX_ADDRESS_CHARS:
            return spec
    return _check(addr)


def canonical_address(addr: str, field: str = "email") -> str:
    """The comparison key of an address: its addr-spec (a ``Name <...>`` wrapper, as
    recipient rows may have, is dropped) in :func:`ascii_addr_spec` form, lower-cased.

    Raises :class:`ValidationError` on ``field`` when ``addr`` is not a valid address.
    """
    if not isinstance(addr, str):
        raise ValidationError(field, "must be a string")
    spec = addr.strip()
    match = NAME_ADDR_RE.fullmatch(spec)
    if match is not None:
        spec = match.group(2).strip()
    try:
        return ascii_addr_spec(spec).lower()
    except ValueError as exc:
        raise ValidationError(field, f"{addr!r}: {exc}") from None
