"""SNS signature verification with a test certificate served by an injected fetcher."""

from __future__ import annotations

import json
import time

import pytest

from ses_tasks.feedback.sns import (
    SnsVerificationError,
    SnsVerifier,
    canonical_string,
    check_cert_url,
    check_subscribe_url,
)
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner


@pytest.fixture(scope="module")
def signer() -> SnsTestSigner:
    return SnsTestSigner()


def verifier(signer: SnsTestSigner, **kwargs) -> SnsVerifier:
    kwargs.setdefault("allowed_topic_arns", [DEFAULT_TOPIC_ARN])
    return SnsVerifier(fetcher=signer.fetcher, **kwargs)


@pytest.mark.parametrize("version", ["1", "2"])
def test_signed_notification_verifies_in_both_versions(signer, version):
    envelope = signer.notification({"notificationType": "Delivery"}, version=version)
    message = verifier(signer).verify(envelope)
    assert message.type == "Notification"
    assert message.message_id == envelope["MessageId"]
    assert json.loads(message.message) == {"notificationType": "Delivery"}


def test_subject_is_part_of_the_signed_string(signer):
    envelope = signer.notification("body", subject="Amazon SES Email Event Notification")
    assert b"Subject\nAmazon SES Email Event Notification\n" in canonical_string(envelope)
    verifier(signer).verify(envelope)
    envelope["Subject"] = "changed"
    with pytest.raises(SnsVerificationError, match="does not match"):
        verifier(signer).verify(envelope)


def test_canonical_string_follows_the_documented_field_order():
    envelope = {
        "Type": "Notification",
        "MessageId": "m",
        "TopicArn": "t",
        "Message": "hello",
        "Timestamp": "2012-04-26T20:45:04.751Z",
        "UnsubscribeURL": "https://example",
    }
    assert canonical_string(envelope) == (
        b"Message\nhello\nMessageId\nm\nTimestamp\n2012-04-26T20:45:04.751Z\n"
        b"TopicArn\nt\nType\nNotification\n"
    )
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "m",
        "Token": "tok",
        "TopicArn": "t",
        "Message": "sub",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?x",
        "Timestamp": "2012-04-26T20:45:04.751Z",
    }
    assert canonical_string(confirmation) == (
        b"Message\nsub\nMessageId\nm\nSubscribeURL\nhttps://sns.us-east-1.amazonaws.com/?x\n"
        b"Timestamp\n2012-04-26T20:45:04.751Z\nToken\ntok\nTopicArn\nt\n"
        b"Type\nSubscriptionConfirmation\n"
    )


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda e: e.update(Message=e["Message"].replace("Bounce", "Delivery")), "does not match"),
        (lambda e: e.update(TopicArn=e["TopicArn"] + "x"), "not allowed"),
        (lambda e: e.pop("Signature"), "unsigned"),
        (lambda e: e.update(Signature=""), "unsigned"),
        (lambda e: e.update(Signature="not base64!"), "base64"),
        (lambda e: e.update(SignatureVersion="3"), "SignatureVersion"),
        (lambda e: e.pop("SignatureVersion"), "SignatureVersion"),
        (lambda e: e.update(Type="Unknown"), "Type"),
        (lambda e: e.pop("MessageId"), "MessageId"),
        (
            lambda e: e.update(SigningCertURL=e["SigningCertURL"].replace("https", "http")),
            "https",
        ),
        (
            lambda e: e.update(SigningCertURL="https://sns.us-east-1.evil.com/cert.pem"),
            "host",
        ),
        (
            lambda e: e.update(
                SigningCertURL="https://sns.us-east-1.amazonaws.com.evil.com/cert.pem"
            ),
            "host",
        ),
        (
            lambda e: e.update(SigningCertURL="https://evil.com@sns.us-east-1.amazonaws.com/a.pem"),
            "credentials",
        ),
        (
            lambda e: e.update(SigningCertURL="https://sns.us-east-1.amazonaws.com/other.pem"),
            "SimpleNotificationService-<hex>.pem",
        ),
        (
            lambda e: e.update(
                SigningCertURL="https://sns.us-east-1.amazonaws.com/SimpleNotificationService-ab.pem"
            ),
            "cannot fetch",
        ),
    ],
)
def test_tampered_or_unsafe_messages_are_refused(signer, mutate, reason):
    envelope = signer.notification({"notificationType": "Bounce"}, version="2")
    mutate(envelope)
    with pytest.raises(SnsVerificationError, match=reason):
        verifier(signer).verify(envelope)


def test_a_certificate_on_a_non_sns_host_is_never_fetched(signer):
    fetched = len(signer.fetched)
    envelope = signer.notification("x", cert_url="https://example.com/cert.pem")
    with pytest.raises(SnsVerificationError, match="host"):
        verifier(signer).verify(envelope)
    assert len(signer.fetched) == fetched


def test_signature_by_another_key_is_refused(signer):
    other = SnsTestSigner()  # same URL, different key: the verifier fetches signer's cert
    envelope = other.notification({"notificationType": "Bounce"})
    with pytest.raises(SnsVerificationError, match="does not match"):
        verifier(signer).verify(envelope)


def test_topic_allow_list(signer):
    allowed = verifier(signer, allowed_topic_arns=[DEFAULT_TOPIC_ARN])
    allowed.verify(signer.notification("x"))
    other = signer.notification("x", topic_arn="arn:aws:sns:us-east-1:999999999999:other")
    with pytest.raises(SnsVerificationError, match="not allowed"):
        allowed.verify(other)
    with pytest.raises(SnsVerificationError, match="no topic is"):
        verifier(signer, allowed_topic_arns=[]).verify(other)  # empty allow-list: fail closed
    verifier(signer, allowed_topic_arns=[], allow_any_topic=True).verify(other)  # dev flag


def test_old_timestamps_are_refused_unless_age_is_not_checked(signer):
    old = signer.notification("x", timestamp="2016-01-27T14:59:38.237Z")
    with pytest.raises(SnsVerificationError, match="old"):
        verifier(signer).verify(old)
    assert verifier(signer).verify(old, check_age=False).message_id == old["MessageId"]
    fresh = signer.notification("x")
    late = verifier(signer, max_age_s=60, clock=lambda: time.time() + 120)
    with pytest.raises(SnsVerificationError, match="old"):
        late.verify(fresh)


def test_certificates_are_fetched_once_and_cached(signer):
    v = verifier(signer)
    before = signer.fetched.count(signer.cert_url)
    for _ in range(5):
        v.verify(signer.notification("x"))
    assert signer.fetched.count(signer.cert_url) == before + 1


def test_error_names_the_message_id(signer):
    envelope = signer.notification("x")
    envelope["Message"] = "y"
    with pytest.raises(SnsVerificationError) as info:
        verifier(signer).verify(envelope)
    assert info.value.message_id == envelope["MessageId"]
    assert envelope["MessageId"] in str(info.value)


def test_subscription_confirmation_fetches_the_subscribe_url(signer):
    v = verifier(signer)
    envelope = signer.subscription_confirmation(version="2")
    message = v.verify(envelope)
    assert message.subscribe_url == envelope["SubscribeURL"]
    v.confirm_subscription(message)
    assert signer.fetched[-1] == envelope["SubscribeURL"]


def test_subscribe_url_must_be_https_on_sns(signer):
    envelope = signer.subscription_confirmation(subscribe_url="https://evil.example/confirm")
    v = verifier(signer)
    message = v.verify(envelope)  # signed, but the URL is not SNS's: never fetched
    with pytest.raises(SnsVerificationError, match="host"):
        v.confirm_subscription(message)
    assert "https://evil.example/confirm" not in signer.fetched
    with pytest.raises(SnsVerificationError, match="https"):
        check_subscribe_url("http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription")


@pytest.mark.parametrize(
    "url",
    [
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.eu-central-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-abc.pem",
    ],
)
def test_accepted_certificate_urls(url):
    assert check_cert_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sqs.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-abc.pem",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.txt",
        "ftp://sns.us-east-1.amazonaws.com/x.pem",
        "",
        None,
    ],
)
def test_refused_certificate_urls(url):
    with pytest.raises(SnsVerificationError):
        check_cert_url(url)


def test_repr_holds_no_key_material(signer):
    v = verifier(signer)
    v.verify(signer.notification("x"))
    assert "certificates=1" in repr(v)
    assert "BEGIN" not in repr(v)
