"""SMTP passwords for SES, derived from an IAM secret access key (version 4)."""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["smtp_password"]

_DATE = "11111111"
_SERVICE = "ses"
_TERMINAL = "aws4_request"
_MESSAGE = "SendRawEmail"
_VERSION = b"\x04"


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def smtp_password(secret_access_key: str, region: str) -> str:
    """The 44-character SMTP password for ``region``. SMTP credentials are per region."""
    if not secret_access_key:
        raise ValueError("secret_access_key is empty")
    if not region:
        raise ValueError("region is empty")
    key = _sign(("AWS4" + secret_access_key).encode("utf-8"), _DATE)
    for part in (region, _SERVICE, _TERMINAL, _MESSAGE):
        key = _sign(key, part)
    return base64.b64encode(_VERSION + key).decode("ascii")
