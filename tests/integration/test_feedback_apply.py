"""Feedback applied to real Redis: correlation, counters, suppression, auto-pause, the HTTP
handler's refusals (no state change), the ASGI app, batch ingest, the CLI and the views."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from ses_tasks.feedback import FeedbackApp, FeedbackApplier, FeedbackHandler, parse_event
from ses_tasks.feedback.cli import feedback, suppress_export
from ses_tasks.feedback.settings import FeedbackSettings
from ses_tasks.feedback.sns import SnsVerifier
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner
from ses_tasks.sandbox import new_ses_message_id
from ses_tasks.states import CampaignState, MessageState
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import COUNTERS, StatusStore, Transition

from ..conftest import REDIS_URL, env_vars

FIXTURES = Path(__file__).parent.parent / "fixtures" / "feedback"


def example(name: str, ses_id: str, email: str | None = None) -> dict[str, Any]:
    """An AWS example notification, re-addressed to one of our messages."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    data["mail"]["messageId"] = ses_id
    if email is not None:
        data["mail"]["destination"] = [email]
        for section, field in (
            ("bounce", "bouncedRecipients"),
            ("complaint", "complainedRecipients"),
            ("deliveryDelay", "delayedRecipients"),
        ):
            if section in data:
                for r in data[section][field]:
                    r["emailAddress"] = email
        if "delivery" in data:
            data["delivery"]["recipients"] = [email]
    return data


def sent_campaign(store: StatusStore, campaign_id: str, n: int) -> dict[str, tuple[str, str]]:
    """A campaign whose ``n`` messages were sent; returns email -> (message id, SES id)."""
    store.create_campaign(campaign_id)
    store.add_queued(campaign_id, n)
    items = [(f"{campaign_id}.{i}", f"u{i}@example.com", False) for i in range(n)]
    store.claim(campaign_id, items, lease_s=60, token="t")
    sent = {email: (mid, new_ses_message_id()) for mid, email, _ in items}
    store.finish(
        campaign_id,
        [
            Transition(mid, MessageState.SENT, 250, "Ok", ses_message_id=ses)
            for mid, ses in sent.values()
        ],
    )
    store.finish_enqueue(campaign_id)
    return sent


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = client.type(key)
        if kind == b"hash":
            out[key] = client.hgetall(key)
        elif kind == b"string":
            out[key] = client.get(key)
        elif kind == b"set":
            out[key] = client.smembers(key)
        elif kind == b"zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = kind
    return out


@pytest.fixture
def signer() -> SnsTestSigner:
    return SnsTestSigner()


@pytest.fixture
def env(redis_client, key_prefix, signer):
    settings = FeedbackSettings(min_sample=20, transient_suppress_after=3)
    store = StatusStore(redis_client, key_prefix=key_prefix)
    applier = FeedbackApplier(redis_client, key_prefix=key_prefix, settings=settings, store=store)
    handler = FeedbackHandler(
        applier=applier,
        verifier=SnsVerifier(fetcher=signer.fetcher, allowed_topic_arns=[DEFAULT_TOPIC_ARN]),
        replay_ttl_s=600,
    )
    return store, applier, handler


def test_permanent_bounce_is_recorded_suppressed_and_counted_once(env, redis_client, key_prefix):
    store, applier, _ = env
    sent = sent_campaign(store, "fb1", 5)
    mid, ses = sent["u1@example.com"]
    event = parse_event(example("notification_bounce_dsn", ses, "u1@example.com"))

    result = applier.apply(event)
    assert result.status == "applied"
    assert (result.message_id, result.campaign_id) == (mid, "fb1")
    assert result.suppressed == ("u1@example.com",)
    record = applier.message_feedback(mid)
    assert record is not None
    assert record.feedback == "bounced" and record.feedback_at is not None
    assert (record.bounce_type, record.bounce_subtype) == ("Permanent", "General")
    assert record.diagnostic == "smtp; 550 5.1.1 <jane@example.com>... User"
    entry = SuppressionList(redis_client, key_prefix=key_prefix).get("U1@example.com")
    assert entry is not None and entry.source == "feedback"
    assert entry.reason == "bounce: Permanent/General: smtp; 550 5.1.1 <jane@example.com>... User"

    assert applier.apply(event).status == "duplicate"
    status = applier.feedback_status("fb1")
    assert status.counts["bounced"] == 1 and status.counts["hard_bounced"] == 1
    assert status.sent == 5 and status.bounce_rate == pytest.approx(0.2)
    campaign = store.campaign_status("fb1")
    assert campaign.counts["sent"] == 5
    assert sum(campaign.counts[name] for name in COUNTERS) == campaign.total == 5
    assert store.message_status(mid).state is MessageState.SENT


def test_each_example_type_updates_its_counter_and_rank(env):
    store, applier, _ = env
    sent = sent_campaign(store, "fb2", 6)
    (m0, s0), (m1, s1), (m2, s2) = (sent[f"u{i}@example.com"] for i in range(3))
    for name in ("event_delivery", "event_delivery_delay"):
        assert applier.apply(parse_event(example(name, s0, "u0@example.com"))).status == "applied"
    record = applier.message_feedback(m0)
    assert record.feedback == "delivered"  # a later delay does not hide the delivery
    assert record.delay_type == "TransientCommunicationFailure"
    assert record.seen == {"delivered", "delayed"}
    applier.apply(parse_event(example("notification_complaint", s0, "u0@example.com")))
    assert applier.message_feedback(m0).feedback == "complained"
    assert applier.message_feedback(m0).complaint_type == "abuse"
    applier.apply(parse_event(example("event_reject", s1)))
    assert applier.message_feedback(m1).reject_reason == "Bad content"
    applier.apply(parse_event(example("event_delivery", s2, "u2@example.com")))
    applier.apply(parse_event(example("event_bounce", s2, "u2@example.com")))
    assert applier.message_feedback(m2).feedback == "bounced"
    counts = applier.feedback_status("fb2").to_dict()
    assert {
        k: counts[k] for k in ("delivered", "delayed", "complained", "rejected", "bounced")
    } == {
        "delivered": 2,
        "delayed": 1,
        "complained": 1,
        "rejected": 1,
        "bounced": 1,
    }


def test_complaint_suppresses_with_feedback_type(env, redis_client, key_prefix):
    store, applier, _ = env
    sent = sent_campaign(store, "fb3", 3)
    _, ses = sent["u2@example.com"]
    result = applier.apply(parse_event(example("event_complaint", ses, "u2@example.com")))
    assert result.suppressed == ("u2@example.com",)
    entry = SuppressionList(redis_client, key_prefix=key_prefix).get("u2@example.com")
    assert entry.reason == "complaint: abuse"


def test_an_unparsable_address_in_a_complaint_is_skipped_not_fatal(env, redis_client, key_prefix):
    """SNS would redeliver a notification we fail on for ever: skip the bad address only."""
    store, applier, _ = env
    sent = sent_campaign(store, "fb3b", 3)
    _, ses = sent["u1@example.com"]
    data = example("event_complaint", ses, "u1@example.com")
    data["complaint"]["complainedRecipients"].insert(0, {"emailAddress": "not an address"})
    result = applier.apply(parse_event(data))
    assert result.suppressed == ("u1@example.com",)
    assert SuppressionList(redis_client, key_prefix=key_prefix).contains("U1@Example.com")


def test_events_are_counted_by_type_and_status(env):
    prometheus_client = pytest.importorskip("prometheus_client")

    def count(event_type: str, status: str) -> float:
        value = prometheus_client.REGISTRY.get_sample_value(
            "ses_tasks_feedback_events_total", {"type": event_type, "status": status}
        )
        return value or 0.0

    store, applier, _ = env
    sent = sent_campaign(store, "fb3c", 2)
    _, ses = sent["u1@example.com"]
    before = count("complaint", "applied"), count("complaint", "duplicate")
    event = parse_event(example("event_complaint", ses, "u1@example.com"))
    applier.apply(event)
    applier.apply(event)
    assert (count("complaint", "applied"), count("complaint", "duplicate")) == (
        before[0] + 1,
        before[1] + 1,
    )


def test_transient_bounces_suppress_after_n_in_the_window(env, redis_client, key_prefix):
    store, applier, _ = env
    sent = sent_campaign(store, "fb4", 4)
    suppression = SuppressionList(redis_client, key_prefix=key_prefix)
    results = []
    for i in range(3):
        _, ses = sent[f"u{i}@example.com"]
        data = example("event_bounce", ses, "soft@example.com")
        data["bounce"].update(bounceType="Transient", bounceSubType="MailboxFull")
        event = parse_event(data)
        results.append(applier.apply(event))
        applier.apply(event)  # a duplicate is not a second transient bounce
        if i < 2:
            assert not suppression.contains("soft@example.com")
    assert results[-1].suppressed == ("soft@example.com",)
    entry = suppression.get("soft@example.com")
    assert entry.reason.startswith("bounce: Transient/MailboxFull")
    assert "3 transient bounces" in entry.reason
    assert applier.feedback_status("fb4").counts["hard_bounced"] == 0


def test_uncorrelated_notifications_are_counted_not_errors(env, redis_client, key_prefix):
    _, applier, _ = env
    result = applier.apply(parse_event(example("notification_bounce_dsn", new_ses_message_id())))
    assert result.status == "uncorrelated" and result.suppressed == ()
    assert applier.uncorrelated() == 1
    # not a message we sent: by default it does not touch the suppression list
    assert not SuppressionList(redis_client, key_prefix=key_prefix).contains("jane@example.com")


def test_one_early_bounce_does_not_pause_but_the_rate_over_the_sample_does(env):
    store, applier, _ = env
    sent = sent_campaign(store, "fb5", 10)
    emails = sorted(sent)
    store.redis.hset(store.keys.campaign("fb5"), "state", "running")
    first = applier.apply(parse_event(example("event_bounce", sent[emails[0]][1], emails[0])))
    assert first.paused is None  # 1/10 = 10%, but 10 sent < min_sample 20
    assert store.campaign_status("fb5").state is CampaignState.RUNNING

    more = sent_campaign(store, "fb6", 40)
    store.redis.hset(store.keys.campaign("fb6"), "state", "running")
    emails = sorted(more)
    r1 = applier.apply(parse_event(example("event_bounce", more[emails[0]][1], emails[0])))
    assert r1.paused is None  # 1/40 = 2.5% < 5%
    r2 = applier.apply(parse_event(example("event_bounce", more[emails[1]][1], emails[1])))
    assert r2.paused is not None and "bounce rate 5.00% (2/40 sent)" in r2.paused
    status = store.campaign_status("fb6")
    assert status.state is CampaignState.PAUSED
    assert status.meta["pause_kind"] == "feedback" and status.reason == r2.paused


def test_complaint_rate_pauses(env):
    store, applier, _ = env
    sent = sent_campaign(store, "fb7", 30)
    store.redis.hset(store.keys.campaign("fb7"), "state", "running")
    email = sorted(sent)[0]
    result = applier.apply(parse_event(example("event_complaint", sent[email][1], email)))
    assert result.paused is not None and "complaint rate" in result.paused
    assert store.campaign_status("fb7").state is CampaignState.PAUSED


# The HTTP handler -------------------------------------------------------------------------


def test_refused_posts_change_nothing(env, signer, redis_client, key_prefix, caplog):
    store, applier, handler = env
    sent = sent_campaign(store, "fb8", 3)
    _, ses = sent["u0@example.com"]
    bounce = example("notification_bounce_dsn", ses, "u0@example.com")
    before = snapshot(redis_client, key_prefix)

    def post(envelope: dict[str, Any]) -> int:
        return handler.handle_http(json.dumps(envelope).encode()).status

    tampered = signer.notification(bounce)
    tampered["Message"] = tampered["Message"].replace("Permanent", "Transient")
    wrong_host = signer.notification(
        bounce, cert_url="https://sns.us-east-1.amazonaws.com.attacker.net/cert.pem"
    )
    signer.hosted["http://sns.us-east-1.amazonaws.com/cert.pem"] = signer.cert_pem
    plain_http = signer.notification(bounce, cert_url="http://sns.us-east-1.amazonaws.com/cert.pem")
    unsigned = signer.notification(bounce)
    del unsigned["Signature"]
    old = signer.notification(bounce, timestamp="2020-01-01T00:00:00.000Z")
    bad_version = signer.notification(bounce)
    bad_version["SignatureVersion"] = "9"
    forged = SnsTestSigner().notification(bounce)  # right URL, another key

    caplog.set_level(logging.WARNING, logger="ses_tasks.feedback")
    for envelope in (tampered, wrong_host, plain_http, unsigned, old, bad_version, forged):
        assert post(envelope) == 403
    assert handler.handle_http(json.dumps(bounce).encode()).status == 400  # raw, unsigned
    assert handler.handle_http(b"not json").status == 400
    assert snapshot(redis_client, key_prefix) == before
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == 9
    assert all(r.getMessage().startswith("feedback refused") for r in refusals)

    good = signer.notification(bounce, version="2")
    assert post(good) == 200
    after_first = snapshot(redis_client, key_prefix)
    assert after_first != before
    assert handler.handle_envelope(good) == "duplicate"  # replay of the same SNS message
    assert post(good) == 200
    assert snapshot(redis_client, key_prefix) == after_first
    assert applier.feedback_status("fb8").counts["bounced"] == 1


def test_subscription_confirmation_is_confirmed_without_state_change(
    env, signer, redis_client, key_prefix
):
    _, _, handler = env
    before = snapshot(redis_client, key_prefix)
    envelope = signer.subscription_confirmation()
    response = handler.handle_http(
        json.dumps(envelope).encode(), {"x-amz-sns-message-type": "SubscriptionConfirmation"}
    )
    assert (response.status, response.body) == (200, "confirmed")
    assert signer.fetched[-1] == envelope["SubscribeURL"]
    assert snapshot(redis_client, key_prefix) == before


def asgi_call(app: FeedbackApp, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    sent: list[dict[str, Any]] = []
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_asgi_app(env, signer):
    store, applier, handler = env
    sent = sent_campaign(store, "fb9", 2)
    _, ses = sent["u1@example.com"]
    app = FeedbackApp(handler, max_body_bytes=64 * 1024)
    envelope = signer.notification(example("event_complaint", ses, "u1@example.com"))
    assert asgi_call(app, "POST", "/", json.dumps(envelope).encode()) == (
        200,
        {"result": "applied"},
    )
    assert applier.feedback_status("fb9").counts["complained"] == 1
    assert asgi_call(app, "GET", "/health") == (200, {"result": "ok"})
    assert asgi_call(app, "GET", "/")[0] == 405
    assert asgi_call(app, "POST", "/", b"x" * (65 * 1024))[0] == 413
    envelope["Message"] = envelope["Message"].replace("abuse", "not-spam")
    assert asgi_call(app, "POST", "/", json.dumps(envelope).encode())[0] == 403


# Batch ingest and the CLI -----------------------------------------------------------------


def test_ingest_counts(env, signer, tmp_path, redis_client, key_prefix):
    store, applier, handler = env
    sent = sent_campaign(store, "fb10", 4)
    (_, s0), (_, s1), (_, s2) = (sent[f"u{i}@example.com"] for i in range(3))
    envelope = signer.notification(
        example("notification_bounce_dsn", s0, "u0@example.com"),
        timestamp="2020-01-01T00:00:00.000Z",
    )
    lines = [
        json.dumps(envelope),
        json.dumps(envelope),  # the same SNS message twice
        json.dumps(example("event_complaint", s1, "u1@example.com")),  # raw delivery
        json.dumps(example("event_complaint", s1, "u1@example.com")),  # same event again
        json.dumps(example("event_delivery", s2, "u2@example.com")),
        json.dumps(example("event_delivery", new_ses_message_id())),
        "",
        "{broken",
        json.dumps({"eventType": "Bounce", "mail": {"messageId": s2}}),
        json.dumps(signer.subscription_confirmation()),
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = handler.ingest(path, verify=True)
    assert report.to_dict() | {"errors": len(report.errors)} == {
        "lines": 9,
        "applied": 3,
        "duplicates": 2,
        "uncorrelated": 1,
        "invalid": 2,
        "ignored": 1,
        "suppressed": 2,
        "errors": 2,
    }
    assert report.errors[0].startswith("line 8:")
    assert "line 9: bounce" in report.errors[1]

    again = handler.ingest(path)
    assert (again.applied, again.duplicates) == (0, 5)
    assert applier.feedback_status("fb10").counts["bounced"] == 1


def test_cli_ingest_status_and_export(env, tmp_path, redis_client, key_prefix):
    store, _, _ = env
    sent = sent_campaign(store, "fb11", 3)
    _, ses = sent["u0@example.com"]
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(example("event_bounce", ses, "u0@example.com")) + "\n")
    SuppressionList(redis_client, key_prefix=key_prefix).add(["manual@example.com"])
    runner = CliRunner()
    with env_vars(SES_TASKS_REDIS_URL=REDIS_URL, SES_TASKS_KEY_PREFIX=key_prefix):
        result = runner.invoke(feedback, ["ingest", str(path), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["applied"] == 1
        result = runner.invoke(feedback, ["status", "fb11"])
        assert json.loads(result.output)["hard_bounced"] == 1
        result = runner.invoke(suppress_export, [])
        assert result.exit_code == 0
        missing = runner.invoke(feedback, ["ingest", str(tmp_path / "nope.jsonl")])
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert {r["email"]: r["source"] for r in rows} == {
        "u0@example.com": "feedback",
        "manual@example.com": "user",
    }
    assert next(r for r in rows if r["email"] == "u0@example.com")["reason"].startswith(
        "bounce: Permanent/General: smtp; 550 5.1.1 user unknown"
    )
    assert missing.exit_code == 2 and "cannot read" in missing.output


# Django and Flask -------------------------------------------------------------------------


def test_flask_view(env, signer):
    from flask import Flask

    from ses_tasks.integrations.feedback_views import flask_blueprint

    store, applier, handler = env
    sent = sent_campaign(store, "fb12", 2)
    _, ses = sent["u0@example.com"]
    app = Flask(__name__)
    app.register_blueprint(flask_blueprint(handler), url_prefix="/ses")
    client = app.test_client()
    envelope = signer.notification(example("event_delivery", ses, "u0@example.com"))
    response = client.post("/ses/feedback", data=json.dumps(envelope))
    assert response.status_code == 200 and response.json == {"result": "applied"}
    envelope["Message"] = "{}"
    assert client.post("/ses/feedback", data=json.dumps(envelope)).status_code == 403
    assert applier.feedback_status("fb12").counts["delivered"] == 1


def test_django_view(env, signer):
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
        )
        django.setup()
    from django.test import RequestFactory

    from ses_tasks.integrations.feedback_views import django_view

    store, applier, handler = env
    sent = sent_campaign(store, "fb13", 2)
    _, ses = sent["u1@example.com"]
    view = django_view(handler)
    envelope = signer.notification(example("notification_complaint", ses, "u1@example.com"))
    factory = RequestFactory()
    response = view(
        factory.post("/ses/", data=json.dumps(envelope), content_type="text/plain; charset=UTF-8")
    )
    assert response.status_code == 200
    assert json.loads(response.content) == {"result": "applied"}
    assert view(factory.get("/ses/")).status_code == 405
    assert applier.feedback_status("fb13").counts["complained"] == 1
