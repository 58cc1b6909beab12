"""Signed SNS messages for tests: a private RSA key, its certificate "hosted" at an SNS URL.

``SnsTestSigner().fetcher`` stands in for the network: pass it to ``SnsVerifier`` (or
``FeedbackHandler.from_settings(fetcher=...)``) with ``DEFAULT_TOPIC_ARN`` allowed, and every
message the signer builds verifies, exactly as one signed by Amazon SNS would.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from ses_tasks.feedback.sns import (
    NOTIFICATION,
    SUBSCRIPTION_CONFIRMATION,
    SnsVerificationError,
    canonical_string,
)

__all__ = ["DEFAULT_CERT_URL", "DEFAULT_TOPIC_ARN", "SnsTestSigner"]

#: The canonical shape SNS uses: ``SimpleNotificationService-<hex>.pem`` on an SNS host.
DEFAULT_CERT_URL = (
    "https://sns.us-east-1.amazonaws.com/"
    "SimpleNotificationService-00000000000000000000000000007e57.pem"
)
DEFAULT_TOPIC_ARN = "arn:aws:sns:us-east-1:123456789012:ses-feedback"


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class SnsTestSigner:
    def __init__(self, *, cert_url: str = DEFAULT_CERT_URL, key_bits: int = 2048) -> None:
        self.cert_url = cert_url
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        #: Extra URLs the fake network answers (a certificate at another URL, SubscribeURLs).
        self.hosted: dict[str, bytes] = {cert_url: self.cert_pem}
        #: Every URL fetched, in order: tests assert caching and confirmations on it.
        self.fetched: list[str] = []

    def fetcher(self, url: str) -> bytes:
        self.fetched.append(url)
        try:
            return self.hosted[url]
        except KeyError:
            shown = url.split("?", 1)[0]  # a SubscribeURL's query holds the token
            raise SnsVerificationError(f"cannot fetch {shown}: 404 (test network)") from None

    def sign(self, envelope: dict[str, Any], *, version: str = "1") -> dict[str, Any]:
        """Set SignatureVersion and Signature over the canonical string, in place."""
        envelope["SignatureVersion"] = version
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(canonical_string(envelope), padding.PKCS1v15(), algorithm)
        envelope["Signature"] = base64.b64encode(signature).decode()
        return envelope

    def notification(
        self,
        message: Mapping[str, Any] | str,
        *,
        topic_arn: str = DEFAULT_TOPIC_ARN,
        message_id: str | None = None,
        timestamp: str | None = None,
        subject: str | None = None,
        version: str = "1",
        cert_url: str | None = None,
    ) -> dict[str, Any]:
        """A signed SNS Notification envelope carrying ``message`` (JSON-encoded if a dict)."""
        envelope: dict[str, Any] = {
            "Type": NOTIFICATION,
            "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": topic_arn,
            "Message": message if isinstance(message, str) else json.dumps(message),
            "Timestamp": timestamp or _now_iso(),
            "SigningCertURL": cert_url or self.cert_url,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
        }
        if subject is not None:
            envelope["Subject"] = subject
        return self.sign(envelope, version=version)

    def subscription_confirmation(
        self,
        *,
        topic_arn: str = DEFAULT_TOPIC_ARN,
        subscribe_url: str | None = None,
        version: str = "1",
    ) -> dict[str, Any]:
        token = uuid.uuid4().hex * 2
        url = subscribe_url or (
            "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
            f"&TopicArn={topic_arn}&Token={token}"
        )
        self.hosted.setdefault(url, b"<ConfirmSubscriptionResponse/>")
        envelope: dict[str, Any] = {
            "Type": SUBSCRIPTION_CONFIRMATION,
            "MessageId": str(uuid.uuid4()),
            "Token": token,
            "TopicArn": topic_arn,
            "Message": f"You have chosen to subscribe to the topic {topic_arn}.",
            "SubscribeURL": url,
            "Timestamp": _now_iso(),
            "SigningCertURL": self.cert_url,
        }
        return self.sign(envelope, version=version)
