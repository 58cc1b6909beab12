"""Delivery events from SES feedback, against real Redis with real SNS signing: each applied
event reaches the hooks once with its message's metadata (an SNS redelivery or a second
copy of the same SES event fires nothing), as a plain hook, a Django signal and a Flask
(blinker) signal; and metadata is validated and kept by the client."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from ses_tasks import events as delivery_events
from ses_tasks.config import load_settings
from ses_tasks.errors import ValidationError
from ses_tasks.events import EventDispatcher, EventObserver
from ses_tasks.feedback import FeedbackApplier, FeedbackHandler
from ses_tasks.feedback.settings import FeedbackSettings
from ses_tasks.feedback.sns import SnsVerifier
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner
from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.limits.ratelimit import Priority
from ses_tasks.produce.client import SesTasks
from ses_tasks.sandbox import new_ses_message_id
from ses_tasks.states import MessageState
from ses_tasks.store.tracking import StatusStore, Transition
from ses_tasks.worker.delivery import BatchItem, BatchJob

from ..conftest import REDIS_URL
from .test_feedback_apply import example

#: (fixture, the event type it becomes)
FEEDBACK = [
    ("event_delivery", "delivered"),
    ("notification_bounce_dsn", "bounced"),
    ("notification_complaint", "complained"),
    ("event_delivery_delay", "delayed"),
    ("event_reject", "rejected"),
]
CAMPAIGN_META = {"newsletter": "spring", "ids": [1, 2]}
SINGLE_META = {"user_id": 42}


def sent_messages(store: StatusStore, redis_client: Any, n: int) -> list[tuple[str, str, str]]:
    """``n`` sent campaign messages (campaign metadata) and one sent single message with its
    own metadata; [(message id, SES id, email)]."""
    store.create_campaign("evts", meta={"metadata": delivery_events.encode_metadata(CAMPAIGN_META)})
    store.add_queued("evts", n)
    items = [(f"evts.{i}", f"u{i}@example.com", False) for i in range(n)]
    store.claim("evts", items, lease_s=60, token="t")
    out = [(mid, new_ses_message_id(), email) for mid, email, _ in items]
    store.finish("evts", [Transition(m, MessageState.SENT, 250, "Ok", s) for m, s, _ in out])
    store.finish_enqueue("evts")
    single = f"{TRANSACTIONAL}.abc123"
    store.claim(TRANSACTIONAL, [(single, "one@example.com", False)], lease_s=60, token="t")
    redis_client.hset(
        store.keys.message(single), "metadata", delivery_events.encode_metadata(SINGLE_META)
    )
    ses = new_ses_message_id()
    store.finish(TRANSACTIONAL, [Transition(single, MessageState.SENT, 250, "Ok", ses)])
    return [*out, (single, ses, "one@example.com")]


@pytest.fixture
def collected() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def wired(redis_client, key_prefix, collected):
    """A store, a signed-SNS handler and an applier whose events go to ``collected``."""
    signer = SnsTestSigner()
    dispatcher = EventDispatcher([("collect", collected.append)])
    store = StatusStore(redis_client, key_prefix=key_prefix)
    applier = FeedbackApplier(
        redis_client,
        key_prefix=key_prefix,
        settings=FeedbackSettings(min_sample=1000),
        store=store,
        events=dispatcher,
    )
    handler = FeedbackHandler(
        applier=applier,
        verifier=SnsVerifier(fetcher=signer.fetcher, allowed_topic_arns=[DEFAULT_TOPIC_ARN]),
        replay_ttl_s=600,
    )
    return store, handler, signer, dispatcher


def post(handler: FeedbackHandler, signer: SnsTestSigner, body: dict[str, Any]) -> str:
    envelope = signer.notification(body)
    response = handler.handle_http(json.dumps(envelope).encode())
    assert response.status == 200, response
    return str(json.loads(response.json_bytes())["result"])


def feed_everything(
    store: StatusStore, redis_client: Any, handler: FeedbackHandler, signer: SnsTestSigner
) -> dict[str, tuple[str, str]]:
    """Each feedback type, applied twice over signed SNS (two SNS messages, same SES event)
    and once more as the very same SNS message; returns type -> (message id, email)."""
    messages = sent_messages(store, redis_client, len(FEEDBACK))
    expected: dict[str, tuple[str, str]] = {}
    for (fixture, type_), (mid, ses, email) in zip(FEEDBACK, messages, strict=False):
        body = example(fixture, ses, email)
        assert post(handler, signer, body) == "applied"
        assert post(handler, signer, body) == "duplicate"
        envelope = signer.notification(body)
        for _ in range(2):  # SNS delivering one message twice
            handler.handle_http(json.dumps(envelope).encode())
        expected[type_] = (mid, email)
    # The single message (own metadata): a bounce.
    single, ses, email = messages[-1]
    assert post(handler, signer, example("notification_bounce_dsn", ses, email)) == "applied"
    assert post(handler, signer, example("notification_bounce_dsn", ses, email)) == "duplicate"
    expected["single"] = (single, email)
    return expected


def check_feedback_events(got: list[dict[str, Any]], expected: dict[str, tuple[str, str]]) -> None:
    assert len(got) == len(FEEDBACK) + 1, [e["type"] for e in got]
    by_mid = {e["message_id"]: e for e in got}
    assert len(by_mid) == len(got)  # once per message
    for _, type_ in FEEDBACK:
        mid, email = expected[type_]
        event = by_mid[mid]
        assert event["type"] == type_
        assert event["campaign_id"] == "evts"
        assert event["metadata"] == CAMPAIGN_META
        assert event["ses_message_id"]
        assert isinstance(event["at"], float)
        if type_ != "rejected":
            assert event["recipient"] == email
        json.dumps(event)  # JSON-safe
    single_mid, _ = expected["single"]
    single = by_mid[single_mid]
    assert single["type"] == "bounced" and single["metadata"] == SINGLE_META
    assert single["campaign_id"] == TRANSACTIONAL


def test_each_feedback_type_reaches_the_hook_once_with_metadata(wired, redis_client, collected):
    store, handler, signer, dispatcher = wired
    expected = feed_everything(store, redis_client, handler, signer)
    assert dispatcher.flush(10)
    check_feedback_events(collected, expected)
    bounced = next(e for e in collected if e["message_id"] == expected["bounced"][0])
    details = bounced["details"]
    assert (details["bounce_type"], details["bounce_subtype"]) == ("Permanent", "General")
    assert details["permanent"] is True
    assert details["recipients"][0]["diagnostic_code"].startswith("smtp; 550 5.1.1")
    assert details["suppressed"] == [expected["bounced"][1]]
    complained = next(e for e in collected if e["type"] == "complained")
    assert complained["details"]["complaint_type"] == "abuse"
    delayed = next(e for e in collected if e["type"] == "delayed")
    assert delayed["details"]["delay_type"] == "TransientCommunicationFailure"
    rejected = next(e for e in collected if e["type"] == "rejected")
    assert rejected["details"] == {"reason": "Bad content"}


def test_hooks_named_in_the_settings_get_feedback_events(
    redis_client, key_prefix, tmp_path, monkeypatch
):
    from ..event_hooks import EVENTS_FILE_ENV, read_events

    events_file = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_FILE_ENV, str(events_file))
    settings = load_settings(
        redis_url=REDIS_URL, event_hooks="tests.event_hooks.record", key_prefix=key_prefix
    )
    dispatcher = delivery_events.configure(settings)
    try:
        store = StatusStore(redis_client, key_prefix=key_prefix)
        applier = FeedbackApplier(redis_client, key_prefix=key_prefix, store=store)
        (mid, ses, email), *_ = sent_messages(store, redis_client, 1)
        from ses_tasks.feedback import parse_event

        event = parse_event(example("notification_bounce_dsn", ses, email))
        assert applier.apply(event).status == "applied"
        assert applier.apply(event).status == "duplicate"
        assert dispatcher.flush(10)
        (got,) = read_events(events_file)
        assert (got["type"], got["message_id"], got["metadata"]) == ("bounced", mid, CAMPAIGN_META)
    finally:
        delivery_events.configure(events=EventDispatcher())


def test_a_failing_hook_is_counted_and_the_next_hook_still_runs(redis_client, key_prefix):
    pytest.importorskip("prometheus_client")
    from prometheus_client import REGISTRY

    def failures() -> float:
        value = REGISTRY.get_sample_value("ses_tasks_event_hook_failures_total", {"hook": "boom"})
        return value or 0.0

    got: list[dict[str, Any]] = []

    def boom(event: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    dispatcher = EventDispatcher([("boom", boom), ("collect", got.append)])
    store = StatusStore(redis_client, key_prefix=key_prefix)
    applier = FeedbackApplier(redis_client, key_prefix=key_prefix, store=store, events=dispatcher)
    (_mid, ses, email), *_ = sent_messages(store, redis_client, 1)
    from ses_tasks.feedback import parse_event

    before = failures()
    result = applier.apply(parse_event(example("event_delivery", ses, email)))
    assert result.status == "applied"
    assert dispatcher.flush(10)
    assert [e["type"] for e in got] == ["delivered"]
    assert failures() == before + 1 and dispatcher.failures == 1


def test_a_full_queue_drops_and_counts_without_blocking():
    import threading
    import time

    release = threading.Event()
    got: list[str] = []

    def slow(event: dict[str, Any]) -> None:
        release.wait(10)
        got.append(event["message_id"])

    dispatcher = EventDispatcher([("slow", slow)], queue_size=2)
    started = time.monotonic()
    accepted = [
        dispatcher.emit(delivery_events.make_event("sent", message_id=f"c.{i}")) for i in range(6)
    ]
    assert time.monotonic() - started < 1.0  # never waits for the slow hook
    assert accepted[:2] == [True, True] and not all(accepted)
    assert dispatcher.dropped == accepted.count(False) >= 3
    release.set()
    assert dispatcher.flush(10)
    assert len(got) == accepted.count(True)


# Worker events through the observer, in this process -----------------------------------


def worker_events(
    redis_client: Any, key_prefix: str, dispatcher: EventDispatcher
) -> list[tuple[str, str]]:
    """The observer hook as the delivery path calls it; returns [(type, message id)]."""
    from ses_tasks.states import ClaimDecision
    from ses_tasks.store.tracking import Claim

    store = StatusStore(redis_client, key_prefix=key_prefix)
    store.create_campaign("obs", meta={"metadata": json.dumps(CAMPAIGN_META)})
    dispatcher._metadata = delivery_events.MetadataLookup(redis_client, store.keys)
    job = BatchJob(
        "obs",
        tuple(BatchItem(i, f"u{i}@example.com") for i in range(5)),
        priority=Priority.BULK,
    )
    observer = EventObserver(dispatcher)
    observer.transitions_recorded(
        job,
        [
            Transition("obs.0", MessageState.SENT, 250, "Ok", "ses-0"),
            Transition("obs.1", MessageState.FAILED, 554, "refused"),
            Transition("obs.2", MessageState.UNKNOWN, 0, "connection lost"),
            Transition("obs.3", MessageState.RETRYING, 451, "later"),  # no event
        ],
    )
    observer.claims_recorded(
        job,
        [
            Claim("obs.4", ClaimDecision.SUPPRESSED),
            Claim("obs.3", ClaimDecision.GO),
        ],
    )
    return [("sent", "obs.0"), ("failed", "obs.1"), ("unknown", "obs.2"), ("suppressed", "obs.4")]


def test_worker_observer_builds_events_with_campaign_metadata(redis_client, key_prefix):
    got: list[dict[str, Any]] = []
    dispatcher = EventDispatcher([("collect", got.append)])
    expected = worker_events(redis_client, key_prefix, dispatcher)
    assert dispatcher.flush(10)
    assert [(e["type"], e["message_id"]) for e in got] == expected
    assert all(e["metadata"] == CAMPAIGN_META for e in got)
    assert got[0]["ses_message_id"] == "ses-0" and got[0]["recipient"] == "u0@example.com"
    assert got[1]["details"] == {"code": 554, "reason": "refused"}


# Django ------------------------------------------------------------------------------------


def _django() -> Any:
    django = pytest.importorskip("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            EMAIL_BACKEND="ses_tasks.integrations.django.EmailBackend",
            DEFAULT_FROM_EMAIL="Site <site@example.com>",
            INSTALLED_APPS=[],
            USE_TZ=True,
            SECRET_KEY="test-only",
        )
        django.setup()
    return django


def _receivers(
    signals: Any, connect: Callable[[Any, Callable[..., None]], None]
) -> tuple[dict[str, list[dict[str, Any]]], list[Any]]:
    by_signal: dict[str, list[dict[str, Any]]] = {}
    keep: list[Any] = []
    for name in signals:

        def receiver(sender: Any, event: dict[str, Any], _name: str = name, **_: Any) -> None:
            by_signal.setdefault(_name, []).append(event)

        keep.append(receiver)
        connect(getattr(signals, name), receiver)
    return by_signal, keep


def test_django_signals_get_every_event_once(redis_client, key_prefix):
    _django()
    from ses_tasks.integrations.django import EmailBackend, send_signals, signals

    senders: list[Any] = []

    def connect(signal: Any, receiver: Callable[..., None]) -> None:
        signal.connect(receiver, weak=False)

    by_signal, keep = _receivers(signals, connect)

    def remember_sender(sender: Any, **_: Any) -> None:
        senders.append(sender)

    signals.bounced.connect(remember_sender, weak=False)
    try:
        _every_event_through(send_signals, redis_client, key_prefix, by_signal)
        assert senders and set(senders) == {EmailBackend}
    finally:
        for name in signals:
            for receiver in keep:
                getattr(signals, name).disconnect(receiver)
        signals.bounced.disconnect(remember_sender)


def test_django_receiver_errors_are_hook_failures_and_others_still_run():
    _django()
    from ses_tasks.integrations.django import send_signals, signals

    got: list[str] = []

    def broken(sender: Any, event: dict[str, Any], **_: Any) -> None:
        raise ValueError("broken receiver")

    def fine(sender: Any, event: dict[str, Any], **_: Any) -> None:
        got.append(event["type"])

    signals.bounced.connect(broken, weak=False)
    signals.delivery_event.connect(fine, weak=False)
    try:
        dispatcher = EventDispatcher([("django", send_signals)])
        dispatcher.emit(delivery_events.make_event("bounced", message_id="c.1"))
        assert dispatcher.flush(10)
        assert got == ["bounced"] and dispatcher.failures == 1
    finally:
        signals.bounced.disconnect(broken)
        signals.delivery_event.disconnect(fine)


# Flask -------------------------------------------------------------------------------------


def test_flask_signals_get_every_event_once_in_the_app_context(redis_client, key_prefix):
    pytest.importorskip("flask")
    from flask import Flask, current_app

    from ses_tasks.integrations.flask import SesTasksFlask, send_signals, signals

    app = Flask("events-test")
    app.config["SES_TASKS"] = {"redis_url": REDIS_URL, "key_prefix": key_prefix}
    SesTasksFlask(app)
    apps: list[str] = []

    def connect(signal: Any, receiver: Callable[..., None]) -> None:
        signal.connect(receiver, weak=False)

    by_signal, keep = _receivers(signals, connect)

    def in_context(sender: Any, event: dict[str, Any], **_: Any) -> None:
        apps.append(current_app.name)
        assert sender is app

    signals.bounced.connect(in_context, weak=False)
    try:
        _every_event_through(send_signals, redis_client, key_prefix, by_signal)
        assert apps and set(apps) == {"events-test"}
    finally:
        for name in signals:
            for receiver in keep:
                getattr(signals, name).disconnect(receiver)
        signals.bounced.disconnect(in_context)


def _every_event_through(
    hook: Callable[[dict[str, Any]], None],
    redis_client: Any,
    key_prefix: str,
    by_signal: dict[str, list[dict[str, Any]]],
) -> None:
    """Worker events (observer) and feedback events (signed SNS, each applied twice)
    through ``hook``; each type's signal gets its events once, delivery_event all."""
    dispatcher = EventDispatcher([("signals", hook)])
    expected = worker_events(redis_client, key_prefix, dispatcher)
    signer = SnsTestSigner()
    store = StatusStore(redis_client, key_prefix=key_prefix)
    applier = FeedbackApplier(
        redis_client,
        key_prefix=key_prefix,
        settings=FeedbackSettings(min_sample=1000),
        store=store,
        events=dispatcher,
    )
    handler = FeedbackHandler(
        applier=applier,
        verifier=SnsVerifier(fetcher=signer.fetcher, allowed_topic_arns=[DEFAULT_TOPIC_ARN]),
        replay_ttl_s=600,
    )
    feedback = feed_everything(store, redis_client, handler, signer)
    assert dispatcher.flush(10)
    assert dispatcher.failures == 0
    for type_, mid in expected:
        assert [e["message_id"] for e in by_signal[type_]] == [mid]
    for _, type_ in FEEDBACK:
        (event,) = [e for e in by_signal[type_] if e["campaign_id"] == "evts"][:1]
        assert event["message_id"] == feedback[type_][0]
    assert len(by_signal["bounced"]) == 2  # the campaign message's and the single one's
    for type_ in ("delivered", "complained", "delayed", "rejected"):
        assert len(by_signal[type_]) == 1
    everything = by_signal["delivery_event"]
    assert len(everything) == len(expected) + len(FEEDBACK) + 1
    check_feedback_events([e for e in everything if e["campaign_id"] != "obs"], feedback)


# Metadata on the client --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        (["a"], "JSON object"),
        ("x", "JSON object"),
        ({1: "a"}, "keys must be strings"),
        ({"a": {2: 1}}, "keys must be strings"),
        ({"a": b"bytes"}, "bytes is not a JSON value"),
        ({"a": {1, 2}}, "set is not a JSON value"),
        ({"a": float("nan")}, "not valid JSON"),
        ({"a": "x" * 3000}, "at most 2048"),
    ],
)
def test_metadata_is_checked_before_anything_is_stored(redis_client, key_prefix, metadata, problem):
    client = SesTasks(load_settings(redis_url=REDIS_URL, key_prefix=key_prefix))
    with pytest.raises(ValidationError) as caught:
        client.send_email(
            from_="a@example.com", to=["b@example.com"], subject="s", text="t", metadata=metadata
        )
    assert caught.value.field == "metadata" and problem in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        client.send_campaign(
            from_="a@example.com",
            subject="s",
            text="t",
            recipients=["b@example.com"],
            campaign_id="meta-bad",
            metadata=metadata,
        )
    assert caught.value.field == "metadata"
    assert not list(redis_client.scan_iter(match=f"{key_prefix}:*"))


def test_metadata_at_the_limit_is_accepted_and_kept():
    value = {"k": "x" * (2048 - len('{"k":""}'))}
    assert delivery_events.check_metadata(value) == value
    with pytest.raises(ValidationError):
        delivery_events.check_metadata({"k": value["k"] + "x"})
    assert delivery_events.check_metadata({}) is None
    assert delivery_events.check_metadata(None) is None
    nested = {"a": [1, 2.5, True, None, {"b": "é"}]}
    assert delivery_events.check_metadata(nested) == nested
