"""The SNS lock-down without Redis: the topic allow-list, checks that run before any
certificate fetch, the canonical certificate URL of the topic's region, the bounded key
cache and failed-fetch memory, the refusal counter, and the settings that switch it on.

Every envelope is really signed (RSA key and certificate from ``cryptography``, the string to
sign SNS documents), so each refusal is owed to the check under test, not to a bad signature:
remove the check and the message would verify.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ses_tasks.errors import ConfigurationError
from ses_tasks.feedback import sns
from ses_tasks.feedback.settings import (
    ALLOW_ANY_TOPIC_ENV,
    ALLOWED_TOPIC_ARNS_ENV,
    FeedbackSettings,
    load_feedback_settings,
)
from ses_tasks.feedback.sns import (
    CERT_CACHE_SIZE,
    SnsMessage,
    SnsVerificationError,
    SnsVerifier,
    check_cert_url,
)
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner
from ses_tasks.ops.metrics import FEEDBACK_REFUSAL_REASONS

prometheus_client = pytest.importorskip("prometheus_client")

#: Another AWS account's topic. SNS signs its messages with the very same regional
#: certificate as ours, which is what the signer stands for here.
FOREIGN_TOPIC = "arn:aws:sns:us-east-1:999999999999:someone-elses-topic"
CERT_BASE = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-"
FEEDBACK_ENV = (
    ALLOWED_TOPIC_ARNS_ENV,
    ALLOW_ANY_TOPIC_ENV,
    "SES_TASKS_FEEDBACK_SUPPRESS_UNCORRELATED",
)


def refused(reason: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "ses_tasks_feedback_refused_total", {"reason": reason}
    )
    return value or 0.0


class RecordingFetcher:
    """The signer's fake network, recording every URL asked for."""

    def __init__(self, signer: SnsTestSigner) -> None:
        self.signer = signer
        self.calls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        return self.signer.fetcher(url)


@pytest.fixture(scope="module")
def signer() -> SnsTestSigner:
    return SnsTestSigner()


@pytest.fixture
def fetcher(signer: SnsTestSigner) -> RecordingFetcher:
    return RecordingFetcher(signer)


@pytest.fixture
def verifier(fetcher: RecordingFetcher) -> SnsVerifier:
    return SnsVerifier(fetcher=fetcher, allowed_topic_arns=[DEFAULT_TOPIC_ARN])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in FEEDBACK_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# Refused before any fetch -------------------------------------------------------------------


def test_a_genuinely_signed_message_from_a_foreign_topic_is_refused_without_a_fetch(
    signer, fetcher, verifier
):
    envelope = signer.notification({"notificationType": "Complaint"}, topic_arn=FOREIGN_TOPIC)
    SnsVerifier(fetcher=signer.fetcher, allow_any_topic=True).verify(envelope)  # it is valid
    before = refused("topic")
    with pytest.raises(SnsVerificationError, match="not allowed") as info:
        verifier.verify(envelope)
    assert info.value.code == "topic" and not info.value.retryable
    assert fetcher.calls == []
    assert verifier.cached_certificates == 0
    assert refused("topic") == before + 1


def test_a_forged_signature_from_a_foreign_topic_costs_no_fetch(signer, fetcher, verifier):
    envelope = signer.notification("x", topic_arn=FOREIGN_TOPIC)
    envelope["Signature"] = "QUFBQQ=="  # base64, but nobody's signature
    envelope["SigningCertURL"] = CERT_BASE + "0123456789abcdef.pem"  # canonical, uncached
    with pytest.raises(SnsVerificationError, match="not allowed"):
        verifier.verify(envelope)
    assert fetcher.calls == []


def test_without_an_allow_list_every_topic_is_refused_before_a_fetch(signer, fetcher):
    empty = SnsVerifier(fetcher=fetcher)
    for topic in (DEFAULT_TOPIC_ARN, FOREIGN_TOPIC):
        with pytest.raises(SnsVerificationError, match="no topic is"):
            empty.verify(signer.notification("x", topic_arn=topic))
    assert fetcher.calls == []


def test_the_development_flag_accepts_any_topic(signer, fetcher):
    anything = SnsVerifier(fetcher=fetcher, allow_any_topic=True)
    message = anything.verify(signer.notification("x", topic_arn=FOREIGN_TOPIC))
    assert message.topic_arn == FOREIGN_TOPIC
    assert "topics=any" in repr(anything)


@pytest.mark.parametrize(
    "age",
    [timedelta(hours=2), timedelta(days=400), -timedelta(hours=1)],
    ids=["two-hours-old", "a-year-old", "an-hour-ahead"],
)
def test_stale_or_future_timestamps_are_refused_before_a_fetch(signer, fetcher, verifier, age):
    envelope = signer.notification("x", timestamp=iso(datetime.now(UTC) - age))
    before = refused("timestamp")
    with pytest.raises(SnsVerificationError, match=r"old|future") as info:
        verifier.verify(envelope)
    assert info.value.code == "timestamp"
    assert fetcher.calls == []
    assert refused("timestamp") == before + 1
    # the same message verifies once age is not checked (batch ingest): only the age was wrong
    assert verifier.verify(envelope, check_age=False).message_id == envelope["MessageId"]


def test_an_unknown_type_is_refused_before_a_fetch(signer, fetcher, verifier):
    envelope = signer.notification("x")
    envelope["Type"] = "Notification\nTopicArn"
    with pytest.raises(SnsVerificationError, match="Type") as info:
        verifier.verify(envelope)
    assert info.value.code == "type"
    assert "\n" not in str(info.value)
    assert fetcher.calls == []


def test_an_oversized_message_id_is_refused_before_a_fetch(signer, fetcher, verifier):
    envelope = signer.notification("x", message_id="m" * 5000)
    with pytest.raises(SnsVerificationError, match="MessageId longer"):
        verifier.verify(envelope)
    assert fetcher.calls == []


# The certificate URL ------------------------------------------------------------------------

BAD_CERT_URLS = [
    ("query", CERT_BASE + "abc.pem?x=1"),
    ("empty query", CERT_BASE + "abc.pem?"),
    ("fragment", CERT_BASE + "abc.pem#part"),
    ("empty fragment", CERT_BASE + "abc.pem#"),
    ("http", "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"),
    ("other host", "https://evil.example/SimpleNotificationService-abc.pem"),
    (
        "suffix host",
        "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-abc.pem",
    ),
    ("other service", "https://sqs.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"),
    ("no region", "https://sns.amazonaws.com/SimpleNotificationService-abc.pem"),
    (
        "cn suffix, not a cn region",
        "https://sns.us-east-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
    ),
    ("trailing dot", "https://sns.us-east-1.amazonaws.com./SimpleNotificationService-abc.pem"),
    ("port 443", "https://sns.us-east-1.amazonaws.com:443/SimpleNotificationService-abc.pem"),
    ("port", "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-abc.pem"),
    ("userinfo", "https://user@sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"),
    ("user:password", "https://u:p@sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"),
    ("not .pem", CERT_BASE + "abc.txt"),
    ("any .pem", "https://sns.us-east-1.amazonaws.com/cert.pem"),
    ("subdirectory", "https://sns.us-east-1.amazonaws.com/x/SimpleNotificationService-abc.pem"),
    ("double slash", "https://sns.us-east-1.amazonaws.com//SimpleNotificationService-abc.pem"),
    ("trailing slash", CERT_BASE + "abc.pem/"),
    ("not hex", CERT_BASE + "xyz.pem"),
    ("escaped", CERT_BASE + "abc%2e.pem"),
    ("dot segments", CERT_BASE + "abc/../SimpleNotificationService-abc.pem"),
    ("newline", CERT_BASE + "ab\nc.pem"),
    ("tab", CERT_BASE + "ab\tc.pem"),
    ("no hex", CERT_BASE + ".pem"),
]


@pytest.mark.parametrize(("why", "url"), BAD_CERT_URLS, ids=[w for w, _ in BAD_CERT_URLS])
def test_non_canonical_certificate_urls_are_refused_without_a_fetch(
    signer, fetcher, verifier, why, url
):
    signer.hosted[url] = signer.cert_pem  # the URL would answer with the right certificate
    envelope = signer.notification({"notificationType": "Bounce"}, cert_url=url, version="2")
    before = refused("cert_url")
    with pytest.raises(SnsVerificationError, match="SigningCertURL") as info:
        verifier.verify(envelope)
    assert info.value.code == "cert_url"
    assert fetcher.calls == []
    assert refused("cert_url") == before + 1
    with pytest.raises(SnsVerificationError):
        check_cert_url(url)


@pytest.mark.parametrize(
    "url",
    [
        CERT_BASE + "01d088a6f77103d0fe307c0069e40ed6.pem",
        "https://sns.eu-central-1.amazonaws.com/SimpleNotificationService-ABCDEF0123.pem",
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
        "https://sns.cn-northwest-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
    ],
)
def test_canonical_certificate_urls_are_fetched_and_verify(signer, fetcher, url):
    region = url.split(".")[1]  # each topic is signed by its own region's certificate
    partition = "aws-cn" if region.startswith("cn-") else "aws-us-gov" if "gov" in region else "aws"
    topic = f"arn:{partition}:sns:{region}:123456789012:ses-feedback"
    verifier = SnsVerifier(fetcher=fetcher, allowed_topic_arns=[topic])
    signer.hosted[url] = signer.cert_pem
    verifier.verify(signer.notification("x", cert_url=url, topic_arn=topic))
    assert fetcher.calls == [url]


# The key cache and the fetch budget ---------------------------------------------------------


def test_the_key_cache_is_a_small_lru(signer, fetcher):
    assert CERT_CACHE_SIZE == 16
    verifier = SnsVerifier(fetcher=fetcher, allowed_topic_arns=[DEFAULT_TOPIC_ARN])
    urls = [f"{CERT_BASE}{i:032x}.pem" for i in range(CERT_CACHE_SIZE + 8)]
    for url in urls:
        signer.hosted[url] = signer.cert_pem
    for url in urls:
        verifier.verify(signer.notification("x", cert_url=url))
        verifier.verify(signer.notification("x", cert_url=urls[0]))  # kept in use
    assert verifier.cached_certificates == CERT_CACHE_SIZE
    assert fetcher.calls.count(urls[0]) == 1  # recently used: never evicted
    fetched = len(fetcher.calls)
    verifier.verify(signer.notification("x", cert_url=urls[-1]))
    assert len(fetcher.calls) == fetched  # still cached
    verifier.verify(signer.notification("x", cert_url=urls[1]))
    assert fetcher.calls[-1] == urls[1]  # least recently used: evicted, fetched again
    assert verifier.cached_certificates == CERT_CACHE_SIZE


def test_a_failed_certificate_url_is_not_fetched_again_soon(signer, fetcher, verifier):
    for _ in range(3):
        with pytest.raises(SnsVerificationError) as info:
            verifier.verify(signer.notification("x", cert_url=f"{CERT_BASE}dead.pem"))
        assert info.value.code == "cert_fetch" and info.value.retryable
    assert fetcher.calls == [f"{CERT_BASE}dead.pem"]  # one fetch, not one per post


def test_forged_posts_never_block_a_genuine_new_certificate(signer, fetcher, verifier):
    """No overall fetch budget: many forged URLs, then the genuine one is still fetched."""
    for i in range(50):
        with pytest.raises(SnsVerificationError):
            verifier.verify(signer.notification("x", cert_url=f"{CERT_BASE}{i:x}.pem"))
    genuine = f"{CERT_BASE}feedface.pem"
    signer.hosted[genuine] = signer.cert_pem
    verifier.verify(signer.notification("x", cert_url=genuine))
    assert fetcher.calls[-1] == genuine


def test_a_certificate_of_another_region_is_refused_before_any_fetch(signer, fetcher, verifier):
    other = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem"
    assert ":us-east-1:" in DEFAULT_TOPIC_ARN
    with pytest.raises(SnsVerificationError, match="region") as info:
        verifier.verify(signer.notification("x", cert_url=other))
    assert info.value.code == "cert_url" and fetcher.calls == []


# Subscription confirmations -----------------------------------------------------------------


def test_a_subscription_confirmation_from_a_foreign_topic_is_not_confirmed(
    signer, fetcher, verifier
):
    envelope = signer.subscription_confirmation(topic_arn=FOREIGN_TOPIC)
    with pytest.raises(SnsVerificationError, match="not allowed"):
        verifier.verify(envelope)
    assert fetcher.calls == []  # neither the certificate nor the SubscribeURL
    # even a caller that skips verify() cannot make it confirm a foreign topic
    message = SnsMessage(
        type=sns.SUBSCRIPTION_CONFIRMATION,
        message_id=envelope["MessageId"],
        topic_arn=FOREIGN_TOPIC,
        message=envelope["Message"],
        timestamp=datetime.now(UTC),
        subscribe_url=envelope["SubscribeURL"],
    )
    with pytest.raises(SnsVerificationError, match="not confirmed"):
        verifier.confirm_subscription(message)
    assert fetcher.calls == []


def test_a_subscribe_url_for_another_topic_is_not_fetched(signer, fetcher, verifier):
    url = (
        "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
        f"&TopicArn={FOREIGN_TOPIC}&Token=abc"
    )
    message = verifier.verify(signer.subscription_confirmation(subscribe_url=url))
    with pytest.raises(SnsVerificationError, match="another TopicArn"):
        verifier.confirm_subscription(message)
    assert url not in fetcher.calls


def test_an_allowed_subscription_is_confirmed(signer, fetcher, verifier):
    envelope = signer.subscription_confirmation()
    verifier.confirm_subscription(verifier.verify(envelope))
    assert fetcher.calls[-1] == envelope["SubscribeURL"]


# Logs and the counter -----------------------------------------------------------------------


def test_refusals_do_not_echo_attacker_content_unbounded(signer, verifier):
    envelope = signer.notification("x", topic_arn="arn:" + "A" * 20000 + "\nforged log line")
    envelope["MessageId"] = "id\r\nforged"
    with pytest.raises(SnsVerificationError) as info:
        verifier.verify(envelope)
    text = str(info.value)
    assert len(text) < 300
    assert "\n" not in text and "\r" not in text
    assert "forged log line" not in text


def test_every_refusal_code_is_a_counter_label():
    source = Path(sns.__file__).read_text()
    codes = set(re.findall(r'code="([a-z_]+)"', source))
    assert codes and codes <= FEEDBACK_REFUSAL_REASONS


# Settings -----------------------------------------------------------------------------------


def test_receivers_need_an_allow_list_and_the_error_names_the_setting(clean_env):
    settings = load_feedback_settings()
    assert settings.topic_arns == frozenset() and not settings.allow_any_topic
    with pytest.raises(ConfigurationError) as info:
        settings.require_topic_policy()
    assert info.value.setting == ALLOWED_TOPIC_ARNS_ENV == "SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS"
    assert ALLOW_ANY_TOPIC_ENV in str(info.value)
    with pytest.raises(ConfigurationError, match=ALLOWED_TOPIC_ARNS_ENV):
        SnsVerifier().require_topic_policy()


def test_settings_read_the_documented_environment_names(clean_env, caplog):
    clean_env.setenv(ALLOWED_TOPIC_ARNS_ENV, f" {DEFAULT_TOPIC_ARN} , {FOREIGN_TOPIC}")
    clean_env.setenv("SES_TASKS_FEEDBACK_SUPPRESS_UNCORRELATED", "true")
    settings = load_feedback_settings()
    assert settings.topic_arns == {DEFAULT_TOPIC_ARN, FOREIGN_TOPIC}
    assert settings.suppress_uncorrelated
    caplog.set_level(logging.WARNING, logger="ses_tasks.feedback")
    settings.require_topic_policy()
    assert not caplog.records  # an allow-list: nothing to warn about

    clean_env.delenv(ALLOWED_TOPIC_ARNS_ENV)
    clean_env.setenv(ALLOW_ANY_TOPIC_ENV, "1")
    settings = load_feedback_settings()
    assert settings.allow_any_topic
    settings.require_topic_policy()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert ALLOW_ANY_TOPIC_ENV in caplog.records[0].getMessage()


def test_defaults_are_locked_down(clean_env):
    settings = FeedbackSettings()
    assert (settings.allowed_topic_arns, settings.allow_any_topic) == ("", False)
    assert settings.suppress_uncorrelated is False


@pytest.mark.parametrize(
    ("env", "setting", "problem"),
    [
        ({ALLOWED_TOPIC_ARNS_ENV: "ses-feedback"}, ALLOWED_TOPIC_ARNS_ENV, "not an SNS topic ARN"),
        (
            {ALLOWED_TOPIC_ARNS_ENV: f"{DEFAULT_TOPIC_ARN},arn:aws:sqs:us-east-1:1:q"},
            ALLOWED_TOPIC_ARNS_ENV,
            "arn:aws:sqs",
        ),
        (
            {ALLOWED_TOPIC_ARNS_ENV: DEFAULT_TOPIC_ARN, ALLOW_ANY_TOPIC_ENV: "true"},
            ALLOW_ANY_TOPIC_ENV,
            "cannot be combined",
        ),
        ({ALLOW_ANY_TOPIC_ENV: "perhaps"}, ALLOW_ANY_TOPIC_ENV, "boolean"),
        (
            {"SES_TASKS_FEEDBACK_SUPPRESS_UNCORRELATED": "perhaps"},
            "SES_TASKS_FEEDBACK_SUPPRESS_UNCORRELATED",
            "boolean",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(clean_env, env, setting, problem):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        load_feedback_settings()
    assert info.value.setting == setting
    assert problem in info.value.problem
