"""Pause, resume, cancel, retry-failed and endpoint failures, through real workers."""

from __future__ import annotations

from collections import Counter

import pytest

from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.store.tracking import COUNTERS


def _recipients(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def _adds_up(status) -> bool:
    return sum(status.counts[n] for n in COUNTERS) == status.total


def test_pause_parks_messages_and_resume_completes(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE="150")
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=_recipients("p", 900),
        campaign_id="pausing",
    )
    wait_for(lambda: client.campaign_status("pausing").counts["sent"] >= 100, timeout_s=60)
    assert client.pause("pausing") is True

    def settled():
        s = client.campaign_status("pausing")
        return s if s.counts["sending"] == 0 and client.store.in_flight("pausing") == 0 else None

    paused = wait_for(settled, timeout_s=60, what="workers to park the campaign")
    assert paused.state.value == "paused"
    # Batches on the wire were parked (deferred); the rest were never handed out: still
    # stored, so pause took effect within a batch.
    assert paused.counts["queued"] > 0
    assert paused.counts["sent"] < 900
    assert _adds_up(paused)
    sent_while_paused = paused.counts["sent"]
    # Nothing more goes out while paused.
    assert client.campaign_status("pausing").counts["sent"] == sent_while_paused

    requeued = client.resume("pausing")
    assert requeued == paused.counts["deferred"]
    final = pipeline.wait_done("pausing")
    assert final.counts["sent"] == 900 and _adds_up(final)
    delivered = Counter(r for m in pipeline.accepted(at_least=900) for r in m["rcpt_tos"])
    assert max(delivered.values()) == 1 and len(delivered) == 900


def test_cancel_ends_every_unsent_message_cancelled(make_pipeline):
    pipeline = make_pipeline("starttls", SES_TASKS_MAX_SEND_RATE="150")
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=_recipients("c", 900),
        campaign_id="cancelling",
    )
    wait_for(lambda: client.campaign_status("cancelling").counts["sent"] >= 50, timeout_s=60)
    client.cancel("cancelling")

    def settled():
        s = client.campaign_status("cancelling")
        return s if s.open == 0 else None

    final = wait_for(settled, timeout_s=60, what="every message final")
    assert final.state.value == "cancelled"
    assert final.counts["cancelled"] > 0
    assert final.counts["sent"] + final.counts["cancelled"] == 900
    assert _adds_up(final)
    assert len(pipeline.accepted(at_least=final.counts["sent"])) == final.counts["sent"]


def test_bad_credentials_pause_the_campaign_and_leave_messages_deferred(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_PASSWORD="wrong-password")
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=_recipients("f", 120),
        campaign_id="fatal",
    )

    def settled():
        s = client.campaign_status("fatal")
        c = s.counts
        parked_or_stored = c["deferred"] > 0 and c["deferred"] + c["queued"] == 120
        return s if s.state.value == "paused" and parked_or_stored else None

    # Batches handed out are parked (deferred); those never handed out stay stored.
    status = wait_for(settled, timeout_s=60, what="the campaign paused, nothing sent")
    assert "535" in status.reason and "Authentication" in status.reason
    assert status.counts["failed"] == 0 and _adds_up(status)
    auth_attempts = wait_for(
        lambda: [e for e in pipeline.sandbox.events() if e.get("event") == "auth"],
        timeout_s=10,
    )
    # The pool stops after the first refusals (at most one per pool connection) instead of
    # failing 120 messages one by one.
    assert 1 <= len(auth_attempts) <= 4
    assert not any(e["ok"] for e in auth_attempts)


def test_retry_failed_requeues_permanent_failures(make_pipeline):
    pipeline = make_pipeline(
        "tls",
        sandbox_args=[
            "--reject-recipient",
            "bad1@example.com",
            "--reject-recipient",
            "bad2@example.com",
        ],
    )
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    recipients = [*_recipients("ok", 20), "bad1@example.com", "bad2@example.com"]
    client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=recipients,
        campaign_id="retrying",
    )
    first = pipeline.wait_done("retrying")
    assert first.counts["failed"] == 2 and first.counts["sent"] == 20
    failures = sorted((r.email, r.code) for r in client.failures("retrying"))
    assert failures == [("bad1@example.com", 554), ("bad2@example.com", 554)]
    assert client.retry_failed("retrying") == 2
    again = pipeline.wait_done("retrying")
    assert again.counts["failed"] == 2 and again.counts["sent"] == 20 and _adds_up(again)
    attempts = [client.message_status(f"retrying.{i}").attempts for i in (20, 21)]
    assert attempts == [2, 2]


def _dies_after(rows, n):
    for i, row in enumerate(rows):
        if i == n:
            raise RuntimeError("producer killed")
        yield row


def test_interrupted_enqueue_resumes_without_loss_or_duplicates(make_pipeline):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    rows = [{"email": f"res{i}@example.com", "n": i} for i in range(530)]
    rows[77] = {"email": "", "n": 77}  # a bad row before the break
    options = dict(from_="news@example.com", subject="Hi {{ n }}", text="n={{ n }}")
    with pytest.raises(RuntimeError, match="producer killed"):
        client.send_campaign(recipients=_dies_after(rows, 260), campaign_id="resumed", **options)
    interrupted = client.campaign_status("resumed")
    assert interrupted.state.value == "enqueueing" and interrupted.total <= 260
    final = client.send_campaign(recipients=rows, campaign_id="resumed", resume=True, **options)
    assert final.total == 530
    done = pipeline.wait_done("resumed")
    assert done.counts["sent"] == 529 and done.counts["failed"] == 1 and _adds_up(done)
    delivered = Counter(r for m in pipeline.accepted(at_least=529) for r in m["rcpt_tos"])
    assert len(delivered) == 529 and max(delivered.values()) == 1


def test_store_failure_mid_enqueue_is_resumable(make_pipeline, monkeypatch):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from ses_tasks.errors import SesTasksError

    pipeline = make_pipeline("starttls")
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    store = client.store
    real_pipeline = store.redis.pipeline
    calls = {"n": 0}

    def flaky_pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        if kwargs.get("transaction", True):
            calls["n"] += 1
            if calls["n"] == 4:  # the third batch's MULTI (the first is the campaign's)

                def refuse(*_a, **_k):
                    raise RedisConnectionError("Redis went away")

                pipe.execute = refuse
        return pipe

    monkeypatch.setattr(store.redis, "pipeline", flaky_pipeline)
    recipients = _recipients("br", 300)
    options = dict(from_="news@example.com", subject="Hi", text="x")
    with pytest.raises(SesTasksError, match="--resume --id refused"):
        client.send_campaign(recipients=recipients, campaign_id="refused", **options)
    monkeypatch.setattr(store.redis, "pipeline", real_pipeline)
    client.send_campaign(recipients=recipients, campaign_id="refused", resume=True, **options)
    done = pipeline.wait_done("refused")
    assert done.total == 300 and done.counts["sent"] == 300 and _adds_up(done)
    delivered = Counter(r for m in pipeline.accepted(at_least=300) for r in m["rcpt_tos"])
    assert len(delivered) == 300 and max(delivered.values()) == 1


def test_resume_refuses_a_different_template(make_pipeline):
    from ses_tasks.errors import CampaignError

    pipeline = make_pipeline("tls")
    client = pipeline.client
    client.send_campaign(
        from_="a@example.com",
        subject="One",
        text="x",
        recipients=_recipients("t", 3),
        campaign_id="tmpl",
    )
    with pytest.raises(CampaignError, match="already fully enqueued"):
        client.send_campaign(
            from_="a@example.com",
            subject="One",
            text="x",
            recipients=_recipients("t", 3),
            campaign_id="tmpl",
            resume=True,
        )
    client.store.redis.hset(client.store.keys.campaign("tmpl"), "enqueued_all", 0)
    with pytest.raises(CampaignError, match="another template"):
        client.send_campaign(
            from_="a@example.com",
            subject="Two",
            text="x",
            recipients=_recipients("t", 3),
            campaign_id="tmpl",
            resume=True,
        )
