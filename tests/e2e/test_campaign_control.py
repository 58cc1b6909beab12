"""Pause, resume, cancel, retry-failed and endpoint failures, through real workers."""

from __future__ import annotations

from collections import Counter

from ses_tasks.embedded import wait_for
from ses_tasks.tracking import COUNTERS


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
        return s if s.counts["sending"] == 0 and s.counts["queued"] == 0 else None

    paused = wait_for(settled, timeout_s=60, what="workers to park the campaign")
    assert paused.state.value == "paused"
    assert paused.counts["deferred"] > 0
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
        return s if s.state.value == "paused" and s.counts["deferred"] == 120 else None

    status = wait_for(settled, timeout_s=60, what="the campaign paused with all deferred")
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
