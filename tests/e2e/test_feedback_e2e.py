"""End to end: a campaign is sent, SNS posts a bounce and a complaint over HTTP to the
feedback receiver (under uvicorn), the addresses are suppressed, and a second campaign skips
them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from ses_tasks.feedback import FeedbackApp, FeedbackHandler
from ses_tasks.feedback.settings import FeedbackSettings
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner
from ses_tasks.states import CampaignState, MessageState
from ses_tasks.store.tracking import COUNTERS

from ..conftest import write_csv
from ..integration.test_feedback_apply import example
from ..integration.test_feedback_http import running


def post(url: str, envelope: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        url,
        data=json.dumps(envelope).encode(),
        headers={
            "Content-Type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": envelope["Type"],
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())["result"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["result"]


def test_bounces_and_complaints_suppress_the_next_campaign(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("starttls")
    pipeline.start_worker(concurrency=2)
    rows = [{"email": f"member{i}@example.com"} for i in range(20)]
    recipients = write_csv(tmp_path / "list.csv", rows)
    client = pipeline.client
    first = client.send_campaign(
        from_="news@example.com",
        subject="Issue 1",
        text="Hi",
        recipients=recipients,
        campaign_id="fb-e2e-1",
    )
    assert pipeline.wait_done(first.id, timeout_s=60).counts["sent"] == 20

    signer = SnsTestSigner()
    handler = FeedbackHandler.from_settings(
        pipeline.settings,
        FeedbackSettings(min_sample=1000, allowed_topic_arns=DEFAULT_TOPIC_ARN),
        fetcher=signer.fetcher,
    )
    with running(FeedbackApp(handler)) as url:
        confirmation = signer.subscription_confirmation()
        assert post(url, confirmation) == (200, "confirmed")
        bounced = client.message_status(f"{first.id}.3")
        complained = client.message_status(f"{first.id}.7")
        bounce = signer.notification(
            example("notification_bounce_dsn", bounced.ses_message_id, bounced.email)
        )
        complaint = signer.notification(
            example("event_complaint", complained.ses_message_id, complained.email), version="2"
        )
        assert post(url, bounce) == (200, "applied")
        assert post(url, complaint) == (200, "applied")
        assert post(url, bounce) == (200, "duplicate")  # SNS retry / replay
        forged = dict(complaint, Message=complaint["Message"].replace("abuse", "not-spam"))
        assert post(url, forged) == (403, "refused")

    suppressed = {bounced.email, complained.email}
    assert {e.email for e in client.suppression if e.source == "feedback"} == suppressed
    status = handler.applier.feedback_status(first.id)
    assert (status.counts["hard_bounced"], status.counts["complained"]) == (1, 1)
    assert status.bounce_rate == status.complaint_rate == 1 / 20

    second = client.send_campaign(
        from_="news@example.com",
        subject="Issue 2",
        text="Hi again",
        recipients=recipients,
        campaign_id="fb-e2e-2",
    )
    final = pipeline.wait_done(second.id, timeout_s=60)
    assert final.state is CampaignState.COMPLETED
    assert (final.counts["sent"], final.counts["suppressed"]) == (18, 2)
    assert sum(final.counts[n] for n in COUNTERS) == final.total == 20
    for seq in (3, 7):
        record = client.message_status(f"{second.id}.{seq}")
        assert record.state is MessageState.SUPPRESSED and record.email in suppressed

    for worker in pipeline.workers:
        worker.stop()
    pipeline.sandbox.stop()  # flushes the endpoint's store: everything it ever accepted
    accepted = pipeline.sandbox.accepted()
    assert len(accepted) == 38
    delivered = Counter(r for message in accepted for r in message["rcpt_tos"])
    assert all(delivered[email] == 1 for email in suppressed)  # only the first campaign's
    assert all(delivered[row["email"]] == 2 for row in rows if row["email"] not in suppressed)
