"""SMTP replies and client errors -> one :class:`~ses_tasks.states.Outcome` each.

Every later decision (retry, slow the fleet, pause the account, record "unknown") hangs
off this table, so it is the only place that reads SES reply texts. The facts behind it
are in ``ses-smtp-facts.md``; texts are matched case-insensitively on short, stable
fragments because SES appends request ids and links to several of them.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Final, Literal

from ses_tasks.errors import (
    DeliveryError,
    EndpointFatalError,
    PermanentDeliveryError,
    QuotaExceededError,
    ThrottledError,
    TLSPolicyError,
    TransientDeliveryError,
    UnknownOutcomeError,
)
from ses_tasks.states import Outcome

__all__ = [
    "STAGES",
    "TLS_REASON_PREFIXES",
    "SendResult",
    "Stage",
    "classify_exception",
    "classify_reply",
    "parse_ses_message_id",
    "refused_identity",
    "to_error",
]

Stage = Literal["connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "eom"]
STAGES: Final = ("connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "eom")
#: Stages that set a connection up: a refusal there is about the endpoint, not a message.
SETUP_STAGES: Final = frozenset({"connect", "ehlo", "starttls", "auth"})

#: Reasons that start with one of these are TLS policy failures (``to_error`` ->
#: :class:`TLSPolicyError`); the pool and :func:`classify_exception` produce them.
TLS_REASON_PREFIXES: Final = (
    "certificate verify failed",
    "server did not offer STARTTLS",
    "TLS handshake failed",
)
NO_STARTTLS_REASON: Final = "server did not offer STARTTLS; refusing to authenticate in clear"

# "Ok 0107017033dbb64d-be13a01e-dbf1-44b7-b876-3622165dacc1-000000": 16 hex, a UUID,
# a 6-digit suffix. Matched loosely (any hex run with dashes) so a format tweak on the
# SES side still yields the id rather than silently dropping it.
_SES_ID_RE: Final = re.compile(
    r"\b[0-9a-f]{16}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-[0-9]{6}\b",
    re.IGNORECASE,
)
# Fallback: whatever token follows "Ok", so a format change on the SES side (or another
# relay) still yields an id to store rather than silently dropping it.
_OK_TOKEN_RE: Final = re.compile(r"\bok\s+<?([^\s<>]+)>?", re.IGNORECASE)
# An SES identity resource in an IAM denial, in any partition (aws, aws-us-gov, aws-cn):
# "... on resource 'arn:aws:ses:us-east-1:123456789012:identity/x@example.com'".
_IDENTITY_ARN_RE: Final = re.compile(
    r"arn:aws[a-z-]*:ses:[^\s'\"]*?:identity/([^\s'\"<>,;()\[\]`]+)", re.IGNORECASE
)
# The identities listed after "Email address is not verified. The following identities
# failed the check in region US-EAST-1: a@example.com, example.org".
_LISTED_IDENTITY_RE: Final = re.compile(r"[^\s'\"<>,;:()\[\]`]+")


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one SMTP transaction (or of its failure).

    ``reason`` is the server's text or the client error, never a credential.
    ``reconnect`` means the connection it happened on must be dropped, not reused.
    ``unreachable`` means no connection could be opened at all (refused, timed out, no
    route): nothing was said to the endpoint, so another endpoint may take the message.
    ``identity`` names the sending identity (the From / MAIL FROM address or its domain)
    SES refused: an IAM denial on that identity's resource, or "Email address is not
    verified" naming the sender. The outcome is then ``PERMANENT`` (for this message),
    never ``FATAL``: every message from that identity would be refused the same way, but
    other identities on the same connection, pool and account are fine, so only the
    senders using it stop (see ``ses_tasks.worker.delivery``).
    """

    outcome: Outcome
    code: int
    reason: str
    ses_message_id: str | None = None
    reconnect: bool = False
    unreachable: bool = False
    identity: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SENT


def parse_ses_message_id(text: str) -> str | None:
    """The SES message id from the reply to the end of data, or None if there is none."""
    strict = _SES_ID_RE.search(text)
    if strict is not None:
        return strict.group(0)
    loose = _OK_TOKEN_RE.search(text)
    return loose.group(1) if loose is not None else None


def classify_reply(code: int, text: str, *, stage: str, sender: str | None = None) -> SendResult:
    """Map one SMTP reply, received at ``stage``, to its outcome.

    2xx/3xx are successes (``SENT``; the id is parsed at ``eom``). 4xx are transient,
    5xx permanent for the message, except the SES texts that mean the whole endpoint is
    unusable (credentials, account-wide IAM denial, paused account): those are ``FATAL``.
    A refusal of one sending identity is ``PERMANENT`` with ``identity`` set (see
    :class:`SendResult`): an IAM denial naming an ``identity/...`` resource, or "not
    verified" naming ``sender`` (the MAIL FROM address) or its domain; without ``sender``
    "not verified" is about the message (a sandbox recipient). A refusal while setting up
    a connection is never about a message: 5xx there is ``FATAL`` and any failure drops
    the connection. A reply that is no SMTP reply at all (code < 200) means lost sync;
    after the data went out that leaves the outcome ``UNKNOWN``.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown SMTP stage {stage!r}; expected one of {STAGES}")
    reason = text.strip()
    low = reason.lower()
    setup = stage in SETUP_STAGES

    if 200 <= code < 400:
        message_id = parse_ses_message_id(reason) if stage == "eom" else None
        return SendResult(Outcome.SENT, code, reason, ses_message_id=message_id)

    if code < 200 or code >= 600:
        if stage == "eom":
            return SendResult(Outcome.UNKNOWN, code, reason or "malformed reply", reconnect=True)
        return SendResult(Outcome.TRANSIENT, code, reason or "malformed reply", reconnect=True)

    if 400 <= code < 500:
        if "maximum sending rate exceeded" in low:
            return SendResult(Outcome.THROTTLED, code, reason, reconnect=setup)
        if "daily message quota exceeded" in low:
            return SendResult(Outcome.QUOTA_EXHAUSTED, code, reason, reconnect=setup)
        # 421: the server is closing the channel (too many connections, session message
        # cap, shutting down). 451 4.4.2: it timed us out and is closing too.
        closing = code == 421 or "timeout waiting for data" in low
        return SendResult(Outcome.TRANSIENT, code, reason, reconnect=closing or setup)

    # 5xx
    if setup or _is_fatal_5xx(code, low):
        return SendResult(Outcome.FATAL, code, reason, reconnect=setup)
    identity = refused_identity(reason, sender=sender)
    if identity is not None:
        return SendResult(Outcome.PERMANENT, code, reason, identity=identity)
    if _is_denied(code, low):
        return SendResult(Outcome.FATAL, code, reason)
    return SendResult(Outcome.PERMANENT, code, reason)


def refused_identity(text: str, *, sender: str | None = None) -> str | None:
    """The sending identity a 5xx refusal names, or None if it is not about one.

    - an IAM denial ("not authorized to perform" / "Access denied") whose resource is an
      SES identity (``arn:aws:ses:<region>:<account>:identity/<name>``): that name;
    - "Email address is not verified" listing ``sender`` or its domain: that entry (a
      listed recipient, as in the SES sandbox, is about the message, not the sender).

    Account-wide refusals (paused account, credentials) are checked before this.
    """
    low = text.lower()
    if "not authorized to perform" in low or "access denied" in low:
        match = _IDENTITY_ARN_RE.search(text)
        if match is not None:
            return match.group(1).rstrip(".")
        return None
    if "not verified" in low and sender:
        address = sender.strip().strip("<>").lower()
        domain = address.rpartition("@")[2]
        tail = text[low.index("not verified") :]
        for token in _LISTED_IDENTITY_RE.findall(tail):
            name = token.rstrip(".")
            if name.lower() in (address, domain):
                return name
    return None


def _is_fatal_5xx(code: int, low: str) -> bool:
    """Refusals that stop the whole endpoint whatever the sender: credentials, account."""
    if code in (530, 535):  # STARTTLS/AUTH missing, bad credentials, account not subscribed
        return True
    return code == 554 and ("sending paused" in low or "account is paused" in low)


def _is_denied(code: int, low: str) -> bool:
    """An IAM denial that names no identity: the credentials may send nothing at all."""
    return code == 554 and ("access denied" in low or "not authorized to perform" in low)


def classify_exception(exc: BaseException, *, data_sent: bool) -> SendResult:
    """Map a client-side failure to its outcome.

    ``data_sent`` says whether the message data had been written before the failure:
    a lost connection or a timeout after that point leaves the outcome ``UNKNOWN`` (SES
    may have accepted it), before it the message can safely go again (``TRANSIENT`` with
    ``reconnect``). TLS certificate and policy failures are ``FATAL``.
    """
    if isinstance(exc, DeliveryError):
        return _from_delivery_error(exc)

    cert = _find_in_chain(exc, ssl.SSLCertVerificationError)
    if cert is not None:
        detail = getattr(cert, "verify_message", None) or str(cert)
        return SendResult(Outcome.FATAL, 0, f"certificate verify failed: {detail}", reconnect=True)

    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if isinstance(code, int) and isinstance(message, str) and code > 0:
        stage = _stage_of(exc, data_sent=data_sent)
        sender = getattr(exc, "sender", None)  # aiosmtplib's SMTPSenderRefused has one
        result = classify_reply(
            code, message, stage=stage, sender=sender if isinstance(sender, str) else None
        )
        if result.outcome is Outcome.SENT:  # an "error" carrying a 2xx: lost sync
            return SendResult(Outcome.TRANSIENT, code, result.reason, reconnect=True)
        return result

    text = _describe(exc)
    if isinstance(exc, UnicodeEncodeError):
        return SendResult(
            Outcome.PERMANENT,
            0,
            "address is not 7-bit ASCII (use Punycode for the domain; "
            "a non-ASCII local part cannot be sent through SES)",
        )

    lost = _find_in_chain(exc, ssl.SSLEOFError, ssl.SSLZeroReturnError)
    tls_error = _find_in_chain(exc, ssl.SSLError)
    if tls_error is not None and lost is None and not data_sent:
        return SendResult(
            Outcome.FATAL, 0, f"TLS handshake failed: {_describe(tls_error)}", reconnect=True
        )

    low = text.lower()
    if "starttls extension not supported" in low:
        return SendResult(Outcome.FATAL, 0, NO_STARTTLS_REASON, reconnect=True)
    if "auth extension is not supported" in low or "no suitable authentication" in low:
        return SendResult(
            Outcome.FATAL, 0, f"server refuses authentication: {text}", reconnect=True
        )

    if isinstance(exc, ValueError) and not isinstance(exc, OSError):
        # aiosmtplib refuses control characters in addresses before sending anything.
        return SendResult(Outcome.PERMANENT, 0, text)

    if data_sent:
        return SendResult(
            Outcome.UNKNOWN,
            0,
            f"{text} after the message data was sent; SES may have accepted it",
            reconnect=True,
        )
    return SendResult(Outcome.TRANSIENT, 0, text, reconnect=True)


_ERROR_BY_OUTCOME: Final[dict[Outcome, type[DeliveryError]]] = {
    Outcome.THROTTLED: ThrottledError,
    Outcome.QUOTA_EXHAUSTED: QuotaExceededError,
    Outcome.TRANSIENT: TransientDeliveryError,
    Outcome.PERMANENT: PermanentDeliveryError,
    Outcome.FATAL: EndpointFatalError,
    Outcome.UNKNOWN: UnknownOutcomeError,
}


def to_error(result: SendResult, recipient: str | None = None) -> DeliveryError:
    """The :mod:`ses_tasks.errors` exception matching a failed result (not raised)."""
    if result.outcome is Outcome.SENT:
        raise ValueError("a SENT result is not an error")
    cls = _ERROR_BY_OUTCOME[result.outcome]
    if result.outcome is Outcome.FATAL and result.reason.startswith(TLS_REASON_PREFIXES):
        cls = TLSPolicyError
    return cls(result.code, result.reason, recipient)


def _from_delivery_error(exc: DeliveryError) -> SendResult:
    outcome = next(
        (o for o, cls in _ERROR_BY_OUTCOME.items() if type(exc) is cls),
        None,
    )
    if outcome is None:
        if isinstance(exc, EndpointFatalError):
            outcome = Outcome.FATAL
        elif isinstance(exc, UnknownOutcomeError):
            outcome = Outcome.UNKNOWN
        elif isinstance(exc, PermanentDeliveryError):
            outcome = Outcome.PERMANENT
        else:
            outcome = Outcome.TRANSIENT
    reconnect = outcome in (Outcome.FATAL, Outcome.UNKNOWN) or isinstance(exc, ConnectionError)
    return SendResult(outcome, exc.code, exc.reason, reconnect=reconnect)


def _stage_of(exc: BaseException, *, data_sent: bool) -> str:
    """Guess the stage from aiosmtplib's exception type (it has no stage field)."""
    name = type(exc).__name__
    if name == "SMTPConnectResponseError":
        return "connect"
    if name == "SMTPHeloError":
        return "ehlo"
    if name == "SMTPAuthenticationError":
        return "auth"
    if name == "SMTPSenderRefused":
        return "mail"
    if name in ("SMTPRecipientRefused", "SMTPRecipientsRefused"):
        return "rcpt"
    return "eom" if data_sent else "data"


def _find_in_chain(exc: BaseException, *types: type[BaseException]) -> BaseException | None:
    """aiosmtplib wraps socket and TLS errors; look through ``__cause__``/``__context__``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and isinstance(reason, str) and reason:
        return reason
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = getattr(exc, "message", None) or str(exc)
    return text if text else type(exc).__name__
