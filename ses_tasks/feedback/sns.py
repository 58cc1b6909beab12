"""Amazon SNS message verification: nothing from an HTTP POST is trusted before this.

Follows the SNS developer guide: the string to sign is built from a fixed list of fields per
message type, SignatureVersion 1 is SHA1withRSA and 2 is SHA256withRSA. SNS signs every
account's messages with the same regional certificate, so a valid signature only proves the
message came from SNS: the ``TopicArn`` allow-list is what makes it *ours*.

A forged body must cost nothing but parsing: MessageId, Type, TopicArn (allow-list) and
Timestamp (freshness) are checked before the signing certificate is fetched, the certificate
URL must have the canonical shape ``https://sns.<region>.amazonaws.com[.cn]/
SimpleNotificationService-<hex>.pem``, new certificates are fetched at most a few times a
minute, and the key cache is a small LRU. The fetcher is injectable, so tests sign with their
own certificate and never touch the network.
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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ses_tasks.errors import SesTasksError
from ses_tasks.feedback.settings import missing_topic_policy, warn_any_topic
from ses_tasks.ops import metrics

__all__ = [
    "CERT_CACHE_SIZE",
    "DEFAULT_FETCH_TIMEOUT_S",
    "FAILED_FETCH_TTL_S",
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
    "clip",
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
#: Public keys kept per process. SNS uses one certificate per region at a time (a few during
#: a rotation), so a small LRU holds every real one and forged URLs cannot grow it.
CERT_CACHE_SIZE = 16
#: A certificate URL whose fetch failed is not fetched again for this long (a forged URL
#: costs one fetch, not one per post). There is no overall fetch budget: forged posts could
#: spend it and block a genuine new certificate (after a start or an SNS rotation).
FAILED_FETCH_TTL_S = 600.0
#: Failed certificate URLs remembered per process.
FAILED_FETCH_CACHE_SIZE = 256
#: A Timestamp this far in the future is refused (SNS stamps its own clock; allows for skew).
MAX_FUTURE_SKEW_S = 900.0
#: SNS MessageIds are UUIDs; anything much longer is not from SNS.
MAX_MESSAGE_ID_CHARS = 128
#: Attacker-controlled values are shown at most this long in errors and logs.
CLIP_CHARS = 80

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
_SNS_HOST_RE = re.compile(
    r"sns\.(?:[a-z]{2}(?:-[a-z]+)+-\d+\.amazonaws\.com|cn-[a-z]+-\d+\.amazonaws\.com\.cn)"
)
_CERT_PATH_RE = re.compile(r"/SimpleNotificationService-[0-9a-fA-F]{1,64}\.pem")
#: Refusals SNS should retry (5xx): the certificate could not be had right now.
_RETRYABLE = frozenset({"cert_fetch"})

#: ``fetch(url) -> body``: how certificates and SubscribeURLs are retrieved.
Fetcher = Callable[[str], bytes]


def clip(value: Any, limit: int = CLIP_CHARS) -> str:
    """``repr`` of an untrusted value, cut to ``limit`` characters: logs stay one short line."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        return repr(text[:limit]) + f"...({len(text)} chars)"
    return repr(text)


class SnsVerificationError(SesTasksError, ValueError):
    """An SNS message was refused; ``reason`` says why, in words for the log, and ``code``
    is the short ``reason`` label of the refusal counter."""

    def __init__(self, reason: str, message_id: str = "", *, code: str = "malformed") -> None:
        self.reason = reason
        self.message_id = message_id
        self.code = code
        super().__init__(reason, message_id)

    @property
    def retryable(self) -> bool:
        """True when the message may be fine and SNS should try again (answer 5xx)."""
        return self.code in _RETRYABLE

    def __str__(self) -> str:
        if self.message_id:
            return f"{self.reason} (MessageId {clip(self.message_id)})"
        return self.reason


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
        raise SnsVerificationError(f"unknown SNS message Type {clip(kind)}", code="type")
    parts = []
    for name in names:
        value = envelope.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str):
            raise SnsVerificationError(f"missing or non-string field {name}")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


def _split_sns_url(url: Any, what: str, code: str) -> Any:
    """Parse ``url`` and check what every SNS URL shares: https, an SNS host, no credentials,
    no port. Control characters are refused first (``urlsplit`` would silently drop some)."""
    if not isinstance(url, str) or not url:
        raise SnsVerificationError(f"missing {what}", code=code)
    if len(url) > 2048 or not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise SnsVerificationError(f"{what} {clip(url)} is not a plain URL", code=code)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SnsVerificationError(f"{what} {clip(url)} is not a valid URL", code=code) from None
    if parts.scheme != "https":
        raise SnsVerificationError(
            f"{what} must be https, got {clip(parts.scheme or 'no')} scheme", code=code
        )
    if "@" in parts.netloc or port is not None or ":" in parts.netloc:
        raise SnsVerificationError(f"{what} has credentials or a port: refused", code=code)
    host = parts.netloc.lower()
    if not _SNS_HOST_RE.fullmatch(host):
        raise SnsVerificationError(
            f"{what} host {clip(host)} is not sns.<region>.amazonaws.com[.cn]", code=code
        )
    if parts.fragment or "#" in url:
        raise SnsVerificationError(f"{what} has a fragment: refused", code=code)
    return parts


def _check_same_region(cert_url: str, topic_arn: str) -> None:
    """SNS signs with its own region's certificate: any other region's URL is forged."""
    host = urlsplit(cert_url).netloc.lower()
    region = host.split(".")[1] if host.count(".") >= 2 else ""
    parts = topic_arn.split(":")
    if len(parts) < 6 or parts[3] != region:
        raise SnsVerificationError(
            f"SigningCertURL region {clip(region)} is not the TopicArn's region", code="cert_url"
        )


def check_cert_url(url: Any) -> str:
    """Refuse a SigningCertURL unless it is exactly
    ``https://sns.<region>.amazonaws.com[.cn]/SimpleNotificationService-<hex>.pem``."""
    parts = _split_sns_url(url, "SigningCertURL", "cert_url")
    if parts.query or "?" in url:
        raise SnsVerificationError("SigningCertURL has a query string: refused", code="cert_url")
    if not _CERT_PATH_RE.fullmatch(parts.path):
        raise SnsVerificationError(
            f"SigningCertURL path {clip(parts.path)} is not /SimpleNotificationService-<hex>.pem",
            code="cert_url",
        )
    return str(url)


def check_subscribe_url(url: Any, topic_arn: str | None = None) -> str:
    """Refuse a SubscribeURL that is not an SNS ``ConfirmSubscription`` call (for
    ``topic_arn``, when given): confirming fetches it, so it must not point anywhere else."""
    parts = _split_sns_url(url, "SubscribeURL", "confirm")
    if parts.path not in ("", "/"):
        raise SnsVerificationError("SubscribeURL has a path: refused", code="confirm")
    query = parse_qs(parts.query)
    if query.get("Action") != ["ConfirmSubscription"]:
        raise SnsVerificationError(
            "SubscribeURL is not Action=ConfirmSubscription: refused", code="confirm"
        )
    if topic_arn is not None and query.get("TopicArn") != [topic_arn]:
        raise SnsVerificationError(
            "SubscribeURL names another TopicArn than the message: refused", code="confirm"
        )
    return str(url)


def _redact(url: str) -> str:
    """``url`` without its query: a SubscribeURL's query carries the confirmation token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: only the URL that passed the checks is ever fetched."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def urllib_fetcher(*, timeout_s: float = DEFAULT_FETCH_TIMEOUT_S) -> Fetcher:
    """The default fetcher: HTTPS with certificate verification, a timeout, no redirects."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl.create_default_context()), _NoRedirect()
    )

    def fetch(url: str) -> bytes:
        try:
            with opener.open(url, timeout=timeout_s) as response:
                body: bytes = response.read(MAX_FETCH_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SnsVerificationError(
                f"cannot fetch {_redact(url)}: {clip(str(exc), 200)}", code="cert_fetch"
            ) from exc
        if len(body) > MAX_FETCH_BYTES:
            raise SnsVerificationError(
                f"{_redact(url)}: response larger than {MAX_FETCH_BYTES} bytes", code="cert_fetch"
            )
        return body

    return fetch


def _parse_timestamp(value: Any) -> datetime:
    if not isinstance(value, str):
        raise SnsVerificationError("missing Timestamp")
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise SnsVerificationError(f"Timestamp {clip(value)} is not ISO 8601") from None
    if stamp.tzinfo is None:
        raise SnsVerificationError(f"Timestamp {clip(value)} has no time zone")
    return stamp


class SnsVerifier:
    """Verifies SNS envelopes; one instance per process keeps the certificate cache.

    ``allowed_topic_arns`` empty and ``allow_any_topic`` False refuses every message (fail
    closed): HTTP receivers call :meth:`require_topic_policy` at start to say so up front.
    """

    def __init__(
        self,
        *,
        fetcher: Fetcher | None = None,
        allowed_topic_arns: Iterable[str] = (),
        allow_any_topic: bool = False,
        max_age_s: float = 3600.0,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        cache_size: int = CERT_CACHE_SIZE,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.fetcher = fetcher or urllib_fetcher(timeout_s=fetch_timeout_s)
        self.allowed_topic_arns = frozenset(allowed_topic_arns)
        self.allow_any_topic = allow_any_topic
        self.max_age_s = max_age_s
        self.clock = clock
        self.cache_size = cache_size
        self._keys: OrderedDict[str, rsa.RSAPublicKey] = OrderedDict()
        #: URL -> when its failed fetch may be tried again (monotonic).
        self._failed: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._warned = False

    def __repr__(self) -> str:
        topics = "any" if self.allow_any_topic else str(len(self.allowed_topic_arns))
        return f"<SnsVerifier certificates={len(self._keys)} topics={topics}>"

    @property
    def cached_certificates(self) -> int:
        return len(self._keys)

    def topic_allowed(self, topic_arn: str) -> bool:
        return self.allow_any_topic or topic_arn in self.allowed_topic_arns

    def require_topic_policy(self) -> None:
        """Raise ``ConfigurationError`` without an allow-list or the development flag; warn
        (once) when the flag lets any topic in."""
        if not self.allowed_topic_arns and not self.allow_any_topic:
            raise missing_topic_policy()
        if self.allow_any_topic and not self._warned:
            self._warned = True
            warn_any_topic()

    def verify(self, envelope: Mapping[str, Any], *, check_age: bool = True) -> SnsMessage:
        """Return the verified message or raise ``SnsVerificationError`` (counted by code).

        ``check_age=False`` is for batch ingest of saved messages, which are old by nature.
        """
        message_id = envelope.get("MessageId")
        mid = message_id if isinstance(message_id, str) else ""
        try:
            return self._verify(envelope, mid, check_age)
        except SnsVerificationError as exc:
            metrics.feedback_refused(exc.code)
            if not exc.message_id:
                raise SnsVerificationError(exc.reason, mid, code=exc.code) from exc.__cause__
            raise

    def _verify(self, envelope: Mapping[str, Any], mid: str, check_age: bool) -> SnsMessage:
        # Everything up to the certificate URL is free to check: a forged body ends here.
        if not mid:
            raise SnsVerificationError("missing MessageId")
        if len(mid) > MAX_MESSAGE_ID_CHARS:
            raise SnsVerificationError(f"MessageId longer than {MAX_MESSAGE_ID_CHARS} characters")
        kind = envelope.get("Type")
        if not isinstance(kind, str) or kind not in _SIGNED_FIELDS:
            raise SnsVerificationError(f"unknown SNS message Type {clip(kind)}", code="type")
        topic = envelope.get("TopicArn")
        if not isinstance(topic, str) or not topic:
            raise SnsVerificationError("missing TopicArn")
        if not self.topic_allowed(topic):
            why = "not allowed" if self.allowed_topic_arns else "not allowed (no topic is)"
            raise SnsVerificationError(f"TopicArn {clip(topic)} is {why}", code="topic")
        stamp = _parse_timestamp(envelope.get("Timestamp"))
        if check_age:
            self._check_age(stamp, envelope["Timestamp"])
        signature = envelope.get("Signature")
        if not isinstance(signature, str) or not signature:
            raise SnsVerificationError("unsigned: no Signature", code="signature")
        version = envelope.get("SignatureVersion")
        if not isinstance(version, str) or version not in _HASHES:
            raise SnsVerificationError(
                f"unknown SignatureVersion {clip(version)}", code="signature"
            )
        try:
            raw_signature = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise SnsVerificationError("Signature is not base64", code="signature") from None
        data = canonical_string(envelope)
        cert_url = check_cert_url(envelope.get("SigningCertURL"))
        _check_same_region(cert_url, topic)
        key = self._public_key(cert_url)
        try:
            key.verify(raw_signature, data, padding.PKCS1v15(), _HASHES[version]())
        except InvalidSignature:
            raise SnsVerificationError(
                "signature does not match the message", code="signature"
            ) from None
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

    def _check_age(self, stamp: datetime, shown: str) -> None:
        age_s = self.clock() - stamp.timestamp()
        if age_s > self.max_age_s:
            raise SnsVerificationError(
                f"Timestamp {clip(shown)} is {age_s:.0f} s old (limit {self.max_age_s:.0f} s)",
                code="timestamp",
            )
        if -age_s > MAX_FUTURE_SKEW_S:
            raise SnsVerificationError(
                f"Timestamp {clip(shown)} is {-age_s:.0f} s in the future", code="timestamp"
            )

    def _public_key(self, url: str) -> rsa.RSAPublicKey:
        with self._lock:
            cached = self._keys.get(url)
            if cached is not None:
                self._keys.move_to_end(url)
                return cached
            retry_at = self._failed.get(url)
            if retry_at is not None and time.monotonic() < retry_at:
                raise SnsVerificationError(
                    f"{url}: its certificate could not be fetched a moment ago: not fetched",
                    code="cert_fetch",
                )
        try:
            key = self._fetch_key(url)
        except SnsVerificationError:
            with self._lock:
                self._failed[url] = time.monotonic() + FAILED_FETCH_TTL_S
                self._failed.move_to_end(url)
                while len(self._failed) > FAILED_FETCH_CACHE_SIZE:
                    self._failed.popitem(last=False)
            raise
        with self._lock:
            self._failed.pop(url, None)
            self._keys[url] = key
            self._keys.move_to_end(url)
            while len(self._keys) > self.cache_size:
                self._keys.popitem(last=False)
        return key

    def _fetch_key(self, url: str) -> rsa.RSAPublicKey:
        try:
            pem = self.fetcher(url)
        except SnsVerificationError as exc:
            raise SnsVerificationError(exc.reason, code="cert_fetch") from exc
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise SnsVerificationError(
                f"{url} is not a PEM certificate", code="cert_invalid"
            ) from None
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SnsVerificationError(f"{url}: not an RSA certificate", code="cert_invalid")
        return key

    def confirm_subscription(self, message: SnsMessage) -> None:
        """Confirm a verified SubscriptionConfirmation of an allowed topic by fetching its
        SubscribeURL (which must confirm that same topic)."""
        if message.type != SUBSCRIPTION_CONFIRMATION:
            raise SnsVerificationError(
                f"{message.type} is not a SubscriptionConfirmation", code="type"
            )
        if not self.topic_allowed(message.topic_arn):
            raise SnsVerificationError(
                f"TopicArn {clip(message.topic_arn)} is not allowed: not confirmed", code="topic"
            )
        url = check_subscribe_url(message.subscribe_url, message.topic_arn)
        self.fetcher(url)
        log.info("confirmed SNS subscription to %s", message.topic_arn)
