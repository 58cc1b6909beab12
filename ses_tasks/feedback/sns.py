"""Amazon SNS message verification: nothing from an HTTP POST is trusted before this.

Follows the SNS developer guide: the signing certificate comes only from an HTTPS URL on an
``sns.<region>.amazonaws.com`` host (``.amazonaws.com.cn`` in China), the string to sign is
built from a fixed list of fields per message type, SignatureVersion 1 is SHA1withRSA and 2
is SHA256withRSA. Certificates are fetched once per URL and cached. The fetcher is
injectable, so tests sign with their own certificate and never touch the network.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ses_tasks.errors import SesTasksError

__all__ = [
    "DEFAULT_FETCH_TIMEOUT_S",
    "NOTIFICATION",
    "SUBSCRIPTION_CONFIRMATION",
    "UNSUBSCRIBE_CONFIRMATION",
    "Fetcher",
    "SnsMessage",
    "SnsVerificationError",
    "SnsVerifier",
    "canonical_string",
    "check_cert_url",
    "check_subscribe_url",
    "is_sns_envelope",
    "urllib_fetcher",
]

log = logging.getLogger("ses_tasks.feedback")

NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"
DEFAULT_FETCH_TIMEOUT_S = 10.0
#: Largest certificate or confirmation response read; real ones are a few KiB.
MAX_FETCH_BYTES = 64 * 1024

_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_SIGNED_FIELDS = {
    NOTIFICATION: _NOTIFICATION_FIELDS,
    SUBSCRIPTION_CONFIRMATION: _CONFIRMATION_FIELDS,
    UNSUBSCRIBE_CONFIRMATION: _CONFIRMATION_FIELDS,
}
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
_SNS_HOST_RE = re.compile(r"^sns\.[a-z]{2}(?:-[a-z]+)+-\d+\.amazonaws\.com(?:\.cn)?$")

#: ``fetch(url) -> body``: how certificates and SubscribeURLs are retrieved.
Fetcher = Callable[[str], bytes]


class SnsVerificationError(SesTasksError, ValueError):
    """An SNS message was refused; ``reason`` says why, in words for the log."""

    def __init__(self, reason: str, message_id: str = "") -> None:
        self.reason = reason
        self.message_id = message_id
        super().__init__(reason, message_id)

    def __str__(self) -> str:
        return f"{self.reason} (MessageId {self.message_id})" if self.message_id else self.reason


@dataclass(frozen=True, slots=True)
class SnsMessage:
    """A verified SNS envelope."""

    type: str
    message_id: str
    topic_arn: str
    message: str
    timestamp: datetime
    subject: str | None = None
    subscribe_url: str | None = None
    token: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


def is_sns_envelope(data: Mapping[str, Any]) -> bool:
    return isinstance(data.get("Type"), str) and "MessageId" in data and "Message" in data


def canonical_string(envelope: Mapping[str, Any]) -> bytes:
    """The bytes SNS signed: ``name\\nvalue\\n`` for each signed field, in the documented order."""
    kind = envelope.get("Type")
    names = _SIGNED_FIELDS.get(kind) if isinstance(kind, str) else None
    if names is None:
        raise SnsVerificationError(f"unknown SNS message Type {kind!r}")
    parts = []
    for name in names:
        value = envelope.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str):
            raise SnsVerificationError(f"missing or non-string field {name}")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


def _check_sns_url(url: Any, what: str) -> str:
    if not isinstance(url, str) or not url:
        raise SnsVerificationError(f"missing {what}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SnsVerificationError(f"{what} is not a valid URL") from None
    if parts.scheme != "https":
        raise SnsVerificationError(f"{what} must be https, got {parts.scheme or 'no'} scheme")
    host = (parts.hostname or "").lower()
    if parts.username or parts.password or port not in (None, 443):
        raise SnsVerificationError(f"{what} has credentials or a port: refused")
    if not _SNS_HOST_RE.match(host):
        raise SnsVerificationError(f"{what} host {host!r} is not sns.<region>.amazonaws.com")
    return url


def check_cert_url(url: Any) -> str:
    """Refuse a SigningCertURL that is not an HTTPS ``.pem`` on an SNS host."""
    _check_sns_url(url, "SigningCertURL")
    if not urlsplit(url).path.endswith(".pem"):
        raise SnsVerificationError("SigningCertURL does not name a .pem certificate")
    return str(url)


def check_subscribe_url(url: Any) -> str:
    return _check_sns_url(url, "SubscribeURL")


def urllib_fetcher(*, timeout_s: float = DEFAULT_FETCH_TIMEOUT_S) -> Fetcher:
    """The default fetcher: HTTPS with certificate verification and a timeout."""
    context = ssl.create_default_context()

    def fetch(url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
                body: bytes = response.read(MAX_FETCH_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SnsVerificationError(f"cannot fetch {url}: {exc}") from exc
        if len(body) > MAX_FETCH_BYTES:
            raise SnsVerificationError(f"{url}: response larger than {MAX_FETCH_BYTES} bytes")
        return body

    return fetch


def _parse_timestamp(value: Any) -> datetime:
    if not isinstance(value, str):
        raise SnsVerificationError("missing Timestamp")
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise SnsVerificationError(f"Timestamp {value!r} is not ISO 8601") from None
    if stamp.tzinfo is None:
        raise SnsVerificationError(f"Timestamp {value!r} has no time zone")
    return stamp


class SnsVerifier:
    """Verifies SNS envelopes; one instance per process keeps the certificate cache."""

    def __init__(
        self,
        *,
        fetcher: Fetcher | None = None,
        allowed_topic_arns: Iterable[str] = (),
        max_age_s: float = 3600.0,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fetcher = fetcher or urllib_fetcher(timeout_s=fetch_timeout_s)
        self.allowed_topic_arns = frozenset(allowed_topic_arns)
        self.max_age_s = max_age_s
        self.clock = clock
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SnsVerifier certificates={len(self._keys)} topics={len(self.allowed_topic_arns)}>"

    def verify(self, envelope: Mapping[str, Any], *, check_age: bool = True) -> SnsMessage:
        """Return the verified message or raise ``SnsVerificationError``.

        Cheap checks come first, so a forged message costs no certificate fetch.
        ``check_age=False`` is for batch ingest of saved messages, which are old by nature.
        """
        message_id = envelope.get("MessageId")
        mid = message_id if isinstance(message_id, str) else ""
        try:
            return self._verify(envelope, mid, check_age)
        except SnsVerificationError as exc:
            if not exc.message_id:
                raise SnsVerificationError(exc.reason, mid) from exc.__cause__
            raise

    def _verify(self, envelope: Mapping[str, Any], mid: str, check_age: bool) -> SnsMessage:
        if not mid:
            raise SnsVerificationError("missing MessageId")
        signature = envelope.get("Signature")
        if not isinstance(signature, str) or not signature:
            raise SnsVerificationError("unsigned: no Signature")
        version = envelope.get("SignatureVersion")
        if version not in _HASHES:
            raise SnsVerificationError(f"unknown SignatureVersion {version!r}")
        data = canonical_string(envelope)  # also checks Type and the signed fields
        topic = str(envelope["TopicArn"])
        if self.allowed_topic_arns and topic not in self.allowed_topic_arns:
            raise SnsVerificationError(f"TopicArn {topic} is not allowed")
        cert_url = check_cert_url(envelope.get("SigningCertURL"))
        stamp = _parse_timestamp(envelope.get("Timestamp"))
        if check_age:
            age_s = self.clock() - stamp.timestamp()
            if age_s > self.max_age_s:
                raise SnsVerificationError(
                    f"Timestamp {envelope['Timestamp']} is {age_s:.0f} s old"
                    f" (limit {self.max_age_s:.0f} s)"
                )
        try:
            raw_signature = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise SnsVerificationError("Signature is not base64") from None
        key = self._public_key(cert_url)
        try:
            key.verify(raw_signature, data, padding.PKCS1v15(), _HASHES[str(version)]())
        except InvalidSignature:
            raise SnsVerificationError("signature does not match the message") from None
        kind = str(envelope["Type"])
        return SnsMessage(
            type=kind,
            message_id=mid,
            topic_arn=topic,
            message=str(envelope["Message"]),
            timestamp=stamp,
            subject=envelope.get("Subject") if kind == NOTIFICATION else None,
            subscribe_url=envelope.get("SubscribeURL") if kind != NOTIFICATION else None,
            token=envelope.get("Token") if kind != NOTIFICATION else None,
            raw=envelope,
        )

    def _public_key(self, url: str) -> rsa.RSAPublicKey:
        with self._lock:
            cached = self._keys.get(url)
        if cached is not None:
            return cached
        pem = self.fetcher(url)
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise SnsVerificationError(f"{url} is not a PEM certificate") from None
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SnsVerificationError(f"{url}: not an RSA certificate")
        with self._lock:
            self._keys[url] = key
        return key

    def confirm_subscription(self, message: SnsMessage) -> None:
        """Confirm a verified SubscriptionConfirmation by fetching its SubscribeURL."""
        if message.type != SUBSCRIPTION_CONFIRMATION:
            raise SnsVerificationError(f"{message.type} is not a SubscriptionConfirmation")
        url = check_subscribe_url(message.subscribe_url)
        self.fetcher(url)
        log.info("confirmed SNS subscription to %s", message.topic_arn)
