"""The SNS lock-down against real Redis: foreign topics change nothing, subscriptions are
confirmed only for allowed topics, uncorrelated events do not suppress unless asked, and every
HTTP receiver (ASGI app, under uvicorn, CLI, Django and Flask views) refuses to start without a
topic allow-list, naming the setting, and starts with the development flag."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

import pytest
from click.testing import CliRunner

from ses_tasks.errors import ConfigurationError
from ses_tasks.feedback import FeedbackApp, FeedbackApplier, FeedbackHandler, create_app
from ses_tasks.feedback.cli import feedback
from ses_tasks.feedback.settings import (
    ALLOW_ANY_TOPIC_ENV,
    ALLOWED_TOPIC_ARNS_ENV,
    FeedbackSettings,
)
from ses_tasks.feedback.sns import SnsVerifier
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner
from ses_tasks.sandbox import new_ses_message_id
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import StatusStore

from ..conftest import REDIS_URL
from .test_feedback_apply import asgi_call, example, sent_campaign, snapshot
from .test_feedback_http import running

prometheus_client = pytest.importorskip("prometheus_client")

FOREIGN_TOPIC = "arn:aws:sns:us-east-1:999999999999:someone-elses-topic"
SUPPRESS_UNCORRELATED_ENV = "SES_TASKS_FEEDBACK_SUPPRESS_UNCORRELATED"


def refused(reason: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "ses_tasks_feedback_refused_total", {"reason": reason}
    )
    return value or 0.0


class RecordingFetcher:
    def __init__(self, signer: SnsTestSigner) -> None:
        self.signer = signer
        self.calls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        return self.signer.fetcher(url)


@pytest.fixture
def signer() -> SnsTestSigner:
    return SnsTestSigner()


@pytest.fixture
def fetcher(signer: SnsTestSigner) -> RecordingFetcher:
    return RecordingFetcher(signer)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, key_prefix: str) -> pytest.MonkeyPatch:
    """No feedback settings from the outside; Redis and key prefix of this test."""
    for name in (ALLOWED_TOPIC_ARNS_ENV, ALLOW_ANY_TOPIC_ENV, SUPPRESS_UNCORRELATED_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SES_TASKS_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SES_TASKS_KEY_PREFIX", key_prefix)
    return monkeypatch


def make_handler(redis_client, key_prefix, fetcher, **feedback: Any) -> FeedbackHandler:
    settings = FeedbackSettings(**feedback)
    applier = FeedbackApplier(redis_client, key_prefix=key_prefix, settings=settings)
    verifier = SnsVerifier(
        fetcher=fetcher,
        allowed_topic_arns=settings.topic_arns,
        allow_any_topic=settings.allow_any_topic,
    )
    return FeedbackHandler(applier=applier, verifier=verifier, replay_ttl_s=600)


@pytest.fixture
def handler(redis_client, key_prefix, fetcher, clean_env) -> FeedbackHandler:
    return make_handler(redis_client, key_prefix, fetcher, allowed_topic_arns=DEFAULT_TOPIC_ARN)


def post(handler: FeedbackHandler, envelope: dict[str, Any]) -> tuple[int, str]:
    response = handler.handle_http(
        json.dumps(envelope).encode(), {"x-amz-sns-message-type": envelope["Type"]}
    )
    return response.status, response.body


# Foreign topics -----------------------------------------------------------------------------


def test_a_complaint_from_a_foreign_topic_suppresses_nothing_and_costs_no_fetch(
    handler, signer, fetcher, redis_client, key_prefix, caplog
):
    store = StatusStore(redis_client, key_prefix=key_prefix)
    sent = sent_campaign(store, "lock1", 3)
    _, ses = sent["u1@example.com"]
    complaint = example("event_complaint", ses, "u1@example.com")
    before = snapshot(redis_client, key_prefix)
    counted = refused("topic")
    caplog.set_level(logging.WARNING, logger="ses_tasks.feedback")

    # signed with the very certificate SNS uses for every account in the region
    assert post(handler, signer.notification(complaint, topic_arn=FOREIGN_TOPIC)) == (
        403,
        "refused",
    )
    assert fetcher.calls == []
    assert snapshot(redis_client, key_prefix) == before
    assert not SuppressionList(redis_client, key_prefix=key_prefix).contains("u1@example.com")
    assert refused("topic") == counted + 1
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "feedback refused: TopicArn 'arn:aws:sns:"
    ]

    # the same complaint from our topic is applied
    assert post(handler, signer.notification(complaint)) == (200, "applied")
    assert SuppressionList(redis_client, key_prefix=key_prefix).contains("u1@example.com")


def test_a_subscription_confirmation_from_a_foreign_topic_is_not_confirmed(
    handler, signer, fetcher, redis_client, key_prefix
):
    before = snapshot(redis_client, key_prefix)
    foreign = signer.subscription_confirmation(topic_arn=FOREIGN_TOPIC)
    assert post(handler, foreign) == (403, "refused")
    assert fetcher.calls == []  # neither the certificate nor the SubscribeURL
    ours = signer.subscription_confirmation()
    assert post(handler, ours) == (200, "confirmed")
    assert fetcher.calls == [signer.cert_url, ours["SubscribeURL"]]
    assert foreign["SubscribeURL"] not in fetcher.calls
    assert snapshot(redis_client, key_prefix) == before


def test_a_certificate_that_cannot_be_fetched_asks_sns_to_retry(
    handler, signer, redis_client, key_prefix
):
    before = snapshot(redis_client, key_prefix)
    url = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abcdef.pem"  # 404
    assert post(handler, signer.notification("{}", cert_url=url)) == (503, "retry later")
    assert snapshot(redis_client, key_prefix) == before


# Uncorrelated events ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture", ["event_complaint", "notification_bounce_dsn"], ids=["complaint", "bounce"]
)
def test_an_uncorrelated_event_does_not_suppress_by_default(
    redis_client, key_prefix, signer, fetcher, clean_env, fixture
):
    handler = make_handler(redis_client, key_prefix, fetcher, allowed_topic_arns=DEFAULT_TOPIC_ARN)
    event = example(fixture, new_ses_message_id(), "stranger@example.com")
    assert post(handler, signer.notification(event)) == (200, "uncorrelated")
    assert handler.applier.uncorrelated() == 1
    suppression = SuppressionList(redis_client, key_prefix=key_prefix)
    assert not suppression.contains("stranger@example.com")
    assert list(suppression) == []


@pytest.mark.parametrize(
    "fixture", ["event_complaint", "notification_bounce_dsn"], ids=["complaint", "bounce"]
)
def test_an_uncorrelated_event_suppresses_when_asked(
    redis_client, key_prefix, signer, fetcher, clean_env, fixture
):
    clean_env.setenv(SUPPRESS_UNCORRELATED_ENV, "true")
    handler = make_handler(redis_client, key_prefix, fetcher, allowed_topic_arns=DEFAULT_TOPIC_ARN)
    assert handler.applier.settings.suppress_uncorrelated
    event = example(fixture, new_ses_message_id(), "stranger@example.com")
    assert post(handler, signer.notification(event)) == (200, "uncorrelated")
    assert handler.applier.uncorrelated() == 1
    entry = SuppressionList(redis_client, key_prefix=key_prefix).get("stranger@example.com")
    assert entry is not None and entry.source == "feedback"


def test_ingest_does_not_suppress_uncorrelated_events_either(
    handler, redis_client, key_prefix, tmp_path
):
    path = tmp_path / "saved.jsonl"
    event = example("event_complaint", new_ses_message_id(), "stranger@example.com")
    path.write_text(json.dumps(event) + "\n")
    report = handler.ingest(path)
    assert (report.uncorrelated, report.suppressed) == (1, 0)
    assert not SuppressionList(redis_client, key_prefix=key_prefix).contains("stranger@example.com")


# Receivers refuse to start without an allow-list --------------------------------------------


def assert_names_the_setting(error: ConfigurationError) -> None:
    assert error.setting == ALLOWED_TOPIC_ARNS_ENV
    assert str(error).startswith("SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS: ")
    assert ALLOW_ANY_TOPIC_ENV in str(error)


def test_the_asgi_app_refuses_to_start_without_an_allow_list(
    redis_client, key_prefix, fetcher, clean_env
):
    open_handler = make_handler(redis_client, key_prefix, fetcher)
    with pytest.raises(ConfigurationError) as info:
        FeedbackApp(open_handler)
    assert_names_the_setting(info.value)
    with pytest.raises(ConfigurationError) as info:
        create_app()  # from the environment, which has none
    assert_names_the_setting(info.value)
    app = FeedbackApp(factory=lambda: open_handler)  # a factory's handler: checked when built
    with pytest.raises(ConfigurationError):
        app.handler  # noqa: B018


def test_the_asgi_app_starts_with_the_allow_list_or_the_development_flag(
    redis_client, key_prefix, signer, fetcher, clean_env, caplog
):
    caplog.set_level(logging.WARNING, logger="ses_tasks.feedback")
    clean_env.setenv(ALLOWED_TOPIC_ARNS_ENV, DEFAULT_TOPIC_ARN)
    assert asgi_call(create_app(), "GET", "/health") == (200, {"result": "ok"})
    assert caplog.records == []

    clean_env.delenv(ALLOWED_TOPIC_ARNS_ENV)
    clean_env.setenv(ALLOW_ANY_TOPIC_ENV, "true")
    app = create_app()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert ALLOW_ANY_TOPIC_ENV in caplog.records[0].getMessage()
    assert asgi_call(app, "GET", "/health") == (200, {"result": "ok"})

    any_topic = make_handler(redis_client, key_prefix, fetcher, allow_any_topic=True)
    app = FeedbackApp(any_topic)
    assert len(caplog.records) == 2  # warned once more, for this handler
    envelope = signer.notification(
        example("event_delivery", new_ses_message_id()), topic_arn=FOREIGN_TOPIC
    )
    assert asgi_call(app, "POST", "/", json.dumps(envelope).encode()) == (
        200,
        {"result": "uncorrelated"},
    )


def test_uvicorn_refuses_to_start_without_an_allow_list(
    redis_client, key_prefix, signer, fetcher, clean_env, caplog
):
    open_handler = make_handler(redis_client, key_prefix, fetcher)
    app = FeedbackApp(factory=lambda: open_handler)
    with pytest.raises(RuntimeError, match="stopped before listening"), running(app):
        pass
    assert ALLOWED_TOPIC_ARNS_ENV in caplog.text  # the lifespan's failure, logged by uvicorn

    any_topic = make_handler(redis_client, key_prefix, fetcher, allow_any_topic=True)
    with running(FeedbackApp(factory=lambda: any_topic)) as url:
        with urllib.request.urlopen(url + "health", timeout=10) as response:
            assert response.status == 200
        envelope = signer.notification(
            example("event_delivery", new_ses_message_id()), topic_arn=FOREIGN_TOPIC
        )
        request = urllib.request.Request(url, data=json.dumps(envelope).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == {"result": "uncorrelated"}


def test_the_cli_refuses_to_serve_or_verify_without_an_allow_list(clean_env, tmp_path):
    runner = CliRunner()
    result = runner.invoke(feedback, ["serve", "--port", "0"])
    assert result.exit_code == 2
    assert "ses-tasks: error: SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS: " in result.output
    path = tmp_path / "saved.jsonl"
    path.write_text("")
    result = runner.invoke(feedback, ["ingest", "--verify", str(path)])
    assert result.exit_code == 2
    assert "SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS" in result.output
    assert runner.invoke(feedback, ["ingest", str(path)]).exit_code == 0  # no verify: no need


def test_the_cli_names_a_malformed_topic_arn(clean_env):
    clean_env.setenv(ALLOWED_TOPIC_ARNS_ENV, "my-topic")
    result = CliRunner().invoke(feedback, ["serve", "--port", "0"])
    assert result.exit_code == 2
    assert "SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS: 'my-topic' is not an SNS topic ARN" in (
        result.output
    )


def test_the_flask_views_refuse_to_start_without_an_allow_list(
    redis_client, key_prefix, signer, fetcher, clean_env
):
    from flask import Flask

    from ses_tasks.integrations.feedback_views import flask_blueprint, flask_view

    open_handler = make_handler(redis_client, key_prefix, fetcher)
    for build in (
        lambda: flask_blueprint(open_handler),
        lambda: flask_view(open_handler),
        lambda: flask_blueprint(),
        lambda: flask_view(),
    ):
        with pytest.raises(ConfigurationError) as info:
            build()
        assert_names_the_setting(info.value)

    clean_env.setenv(ALLOW_ANY_TOPIC_ENV, "true")
    flask_blueprint()  # from the environment: starts with the flag
    any_topic = make_handler(redis_client, key_prefix, fetcher, allow_any_topic=True)
    app = Flask(__name__)
    app.register_blueprint(flask_blueprint(any_topic), url_prefix="/ses")
    envelope = signer.notification(
        example("event_delivery", new_ses_message_id()), topic_arn=FOREIGN_TOPIC
    )
    response = app.test_client().post("/ses/feedback", data=json.dumps(envelope))
    assert (response.status_code, response.json) == (200, {"result": "uncorrelated"})


def test_the_django_view_refuses_to_start_without_an_allow_list(
    redis_client, key_prefix, signer, fetcher, clean_env
):
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"])
        django.setup()
    from django.test import RequestFactory

    from ses_tasks.integrations.feedback_views import django_view

    open_handler = make_handler(redis_client, key_prefix, fetcher)
    with pytest.raises(ConfigurationError) as info:
        django_view(open_handler)
    assert_names_the_setting(info.value)
    with pytest.raises(ConfigurationError) as info:
        django_view()
    assert_names_the_setting(info.value)

    clean_env.setenv(ALLOW_ANY_TOPIC_ENV, "true")
    assert django_view()(RequestFactory().get("/ses/")).status_code == 405
    clean_env.delenv(ALLOW_ANY_TOPIC_ENV)
    ours = make_handler(redis_client, key_prefix, fetcher, allowed_topic_arns=DEFAULT_TOPIC_ARN)
    view = django_view(ours)
    factory = RequestFactory()
    for topic, status in ((FOREIGN_TOPIC, 403), (DEFAULT_TOPIC_ARN, 200)):
        envelope = signer.notification(
            example("event_complaint", new_ses_message_id()), topic_arn=topic
        )
        response = view(factory.post("/ses/", data=json.dumps(envelope), content_type="text/plain"))
        assert response.status_code == status


def test_a_url_error_in_the_default_fetcher_does_not_log_the_token():
    from ses_tasks.feedback.sns import SnsVerificationError, urllib_fetcher

    fetch = urllib_fetcher(timeout_s=0.5)
    with pytest.raises(SnsVerificationError) as info:
        fetch("https://127.0.0.1:1/?Action=ConfirmSubscription&Token=secret-token")
    assert "secret-token" not in str(info.value)
    assert info.value.retryable
