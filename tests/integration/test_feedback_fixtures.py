"""AWS's documented example notifications, correlated to messages actually sent.

A small campaign goes through real worker processes and the local SES endpoint; the SES
message ids the endpoint answered with replace the examples' ``mail.messageId``; the
examples arrive signed (SignatureVersion 1 and 2) through the feedback handler.
"""

from __future__ import annotations

import json
from pathlib import Path

from ses_tasks.feedback import FeedbackHandler
from ses_tasks.feedback.settings import FeedbackSettings
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner
from ses_tasks.sandbox import SES_MESSAGE_ID_RE
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import COUNTERS

from ..conftest import write_csv
from .test_feedback_apply import example

EXAMPLES = [
    # (fixture, expected feedback, suppressed?)
    ("notification_bounce_dsn", "bounced", True),
    ("notification_bounce_no_dsn", "bounced", True),
    ("notification_complaint", "complained", True),
    ("notification_delivery", "delivered", False),
    ("event_bounce", "bounced", True),
    ("event_complaint", "complained", True),
    ("event_delivery", "delivered", False),
    ("event_delivery_delay", "delayed", False),
    ("event_reject", "rejected", False),
]


def test_documented_examples_correlate_to_sent_messages(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1)
    rows = [{"email": f"reader{i}@example.com"} for i in range(len(EXAMPLES))]
    status = pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hello",
        text="Hi {{ email }}",
        recipients=write_csv(tmp_path / "list.csv", rows),
        campaign_id="fb-examples",
    )
    final = pipeline.wait_done(status.id, timeout_s=60)
    assert final.counts["sent"] == len(EXAMPLES)

    signer = SnsTestSigner()
    handler = FeedbackHandler.from_settings(
        pipeline.settings,
        FeedbackSettings(min_sample=1000, allowed_topic_arns=DEFAULT_TOPIC_ARN),
        fetcher=signer.fetcher,
    )
    client = pipeline.client
    for seq, (name, expected, suppress) in enumerate(EXAMPLES):
        record = client.message_status(f"{status.id}.{seq}")
        assert record is not None and SES_MESSAGE_ID_RE.fullmatch(record.ses_message_id)
        body = example(name, record.ses_message_id, record.email)
        envelope = signer.notification(body, version="2" if seq % 2 else "1")
        response = handler.handle_http(json.dumps(envelope).encode())
        assert (response.status, response.body) == (200, "applied"), name
        feedback = handler.applier.message_feedback(record.message_id)
        assert feedback is not None and feedback.feedback == expected, name
        assert client.suppression.contains(record.email) is suppress, name

    bounce = handler.applier.message_feedback(f"{status.id}.0")
    assert (bounce.bounce_type, bounce.bounce_subtype) == ("Permanent", "General")
    assert bounce.diagnostic == "smtp; 550 5.1.1 <jane@example.com>... User"
    counts = handler.applier.feedback_status(status.id).to_dict()
    assert {
        k: counts[k] for k in ("bounced", "complained", "delivered", "delayed", "rejected")
    } == {
        "bounced": 3,
        "complained": 2,
        "delivered": 2,
        "delayed": 1,
        "rejected": 1,
    }
    after = client.campaign_status(status.id)
    assert after.counts["sent"] == len(EXAMPLES)  # feedback never moves per-state counters
    assert sum(after.counts[n] for n in COUNTERS) == after.total
    entries = {
        e.email: e for e in SuppressionList(client.redis, key_prefix=pipeline.settings.key_prefix)
    }
    assert entries["reader2@example.com"].reason == "complaint: abuse"
    assert entries["reader4@example.com"].reason == (
        "bounce: Permanent/General: smtp; 550 5.1.1 user unknown"
    )
