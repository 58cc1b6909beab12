"""SES refusing one sender identity (IAM) stops only that identity's mail; real processes.

The sandbox denies ``denied@example.com`` the way SES does when the credentials' IAM policy
does not cover that identity: ``554 Message rejected: User '...' is not authorized to
perform 'ses:SendRawEmail' on resource 'arn:aws:ses:...:identity/denied@example.com'``,
after DATA (as SES does) or at MAIL FROM. One worker process, one pool:

- campaign A, from the denied identity, ends paused with a reason naming it; nothing of it
  was sent or failed, and its counters add up (every message parked or still stored);
- campaign B, from another address, sent *after* A's refusal on the same worker and pool,
  sends all its mail (a pool-wide cool-down would have paused it too);
- transactional mail from the denied identity is ``deferred`` with the reason and retried
  after RETRY_MAX_S (an IAM denial names the identity even when the policy denies every
  identity, so it must not fail for good), while mail from another address is sent;
- ``ses-tasks campaign status`` shows A's reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.store.tracking import COUNTERS, CampaignStatus, MessageRecord

DENIED = "denied@example.com"
ALLOWED = "news@example.com"
TOTAL = 120  # three batches of 50
CLI = [sys.executable, "-m", "ses_tasks.ops.cli"]


def _adds_up(status: CampaignStatus) -> bool:
    return sum(status.counts[n] for n in COUNTERS) == status.total


def _recipients(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        # Wide enough that the status table does not wrap the reason.
        env={**os.environ, **env, "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("stage", ["data", "mail"])
def test_a_denied_identity_pauses_its_campaign_and_fails_its_mail_only(
    make_pipeline: Any, stage: str
) -> None:
    pipeline = make_pipeline(
        "tls", sandbox_args=["--deny-sender", DENIED, "--deny-sender-at", stage]
    )
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    store = client.store

    # Campaign A, from the denied identity: paused by the first refusals.
    client.send_campaign(
        from_=DENIED, subject="Hi", text="x", recipients=_recipients("a", TOTAL), campaign_id="a"
    )

    def a_settled() -> CampaignStatus | None:
        s = client.campaign_status("a")
        if s.done:  # every message final: refused one by one, not paused
            return s
        if s.state.value != "paused" or s.counts["sending"] or store.in_flight("a"):
            return None
        return s

    try:
        paused = wait_for(a_settled, timeout_s=60, what="campaign A paused and parked")
    except TimeoutError:
        print(client.campaign_status("a").to_dict(), pipeline.worker_logs()[-5000:])
        raise
    assert paused.state.value == "paused", paused.to_dict()
    assert paused.reason.startswith(f"sender identity {DENIED} refused: 554 Message rejected:")
    assert f"identity/{DENIED}" in paused.reason
    assert paused.meta["pause_kind"] == "identity"
    # Nothing sent, nothing failed one by one: parked (deferred) or never handed out.
    assert paused.counts["sent"] == paused.counts["failed"] == 0, paused.to_dict()
    assert paused.counts["deferred"] > 0
    assert paused.counts["deferred"] + paused.counts["queued"] == TOTAL
    assert _adds_up(paused)

    # Now, on the same worker and pool: campaign B and two transactional messages.
    client.send_campaign(
        from_=ALLOWED, subject="Hi", text="x", recipients=_recipients("b", TOTAL), campaign_id="b"
    )
    refused = client.send_email(
        from_=DENIED, to=["t1@example.com"], subject="Receipt", text="x"
    ).message_id
    allowed = client.send_email(
        from_=ALLOWED, to=["t2@example.com"], subject="Receipt", text="x"
    ).message_id

    def b_finished() -> CampaignStatus | None:
        s = client.campaign_status("b")
        return s if s.done or s.state.value == "paused" else None

    final_b = wait_for(b_finished, timeout_s=90, what="campaign B finished or paused")
    assert final_b.state.value == "completed", final_b.to_dict()
    assert final_b.counts["sent"] == TOTAL and _adds_up(final_b)

    def in_state(message_id: str, *states: str) -> MessageRecord | None:
        record = client.message_status(message_id)
        return record if record is not None and record.state.value in states else None

    def final(message_id: str) -> MessageRecord | None:
        return in_state(message_id, "sent", "failed")

    deferred = wait_for(
        lambda: in_state(refused, "deferred"), timeout_s=30, what="the refused message deferred"
    )
    assert deferred.code == 554
    assert deferred.reason.startswith(f"sender identity {DENIED} refused: 554 ")
    sent = wait_for(lambda: final(allowed), timeout_s=30, what="the allowed message final")
    assert sent.state.value == "sent" and sent.ses_message_id

    # The endpoint got B and the allowed message once each, and nothing from the denied
    # identity; A is still paused with every message accounted for.
    accepted = pipeline.accepted(at_least=TOTAL + 1)
    assert DENIED not in {m["mail_from"] for m in accepted}
    delivered = Counter(r for m in accepted for r in m["rcpt_tos"])
    assert set(delivered) == {*_recipients("b", TOTAL), "t2@example.com"}
    assert max(delivered.values()) == 1
    still = client.campaign_status("a")
    assert still.state.value == "paused" and still.counts["sent"] == 0 and _adds_up(still)
    assert still.counts["deferred"] + still.counts["queued"] == TOTAL

    # The operator sees why.
    shown = _cli(["campaign", "status", "a", "--json"], pipeline.env)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "paused" and data["reason"] == paused.reason
    table = _cli(["campaign", "status", "a"], pipeline.env)
    assert table.returncode == 0, table.stderr
    assert f"sender identity {DENIED} refused: 554" in table.stdout
