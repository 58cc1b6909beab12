"""The status store's transitions, on fakeredis (the Lua scripts run under lupa)."""

from __future__ import annotations

import fakeredis
import pytest

from ses_tasks.embedded import wait_for
from ses_tasks.errors import CampaignError
from ses_tasks.states import MessageState
from ses_tasks.tracking import COUNTERS, StatusStore, Transition


@pytest.fixture
def store() -> StatusStore:
    return StatusStore(fakeredis.FakeRedis(), key_prefix="t", retention_s=3600)


def counts(store: StatusStore, cid: str) -> dict[str, int]:
    status = store.campaign_status(cid)
    assert sum(status.counts[n] for n in COUNTERS) == status.total
    return {k: v for k, v in status.counts.items() if v}


def make(store: StatusStore, cid: str = "c1", n: int = 3) -> list[tuple[str, str, bool]]:
    store.create_campaign(cid, template={"x": 1})
    store.add_queued(cid, n)
    store.finish_enqueue(cid)
    return [(f"{cid}.{i}", f"u{i}@example.com", False) for i in range(n)]


def test_campaign_ids_are_checked_and_unique(store):
    store.create_campaign("ok-1")
    with pytest.raises(CampaignError, match="already exists"):
        store.create_campaign("ok-1")
    with pytest.raises(CampaignError, match="letters, digits"):
        store.create_campaign("bad id!")


def test_unrecorded_campaign_messages_read_as_queued(store):
    make(store)
    record = store.message_status("c1.2")
    assert record is not None and record.state is MessageState.QUEUED
    assert store.message_status("nope.1") is None
    assert store.message_status("garbage") is None


def test_claim_then_sent_moves_counters(store):
    items = make(store)
    state, claims = store.claim("c1", items, lease_s=60, token="w1")
    assert state == "running"
    assert [c.decision for c in claims] == ["go", "go", "go"]
    assert counts(store, "c1") == {"sending": 3}
    store.finish("c1", [Transition("c1.0", MessageState.SENT, 250, "", "ses-0")])
    assert counts(store, "c1") == {"sending": 2, "sent": 1}
    record = store.message_status("c1.0")
    assert record.ses_message_id == "ses-0" and record.attempts == 1


def test_sent_is_never_sent_again_nor_downgraded(store):
    items = make(store, n=1)
    store.claim("c1", items, lease_s=60, token="w1")
    store.finish("c1", [Transition("c1.0", MessageState.SENT, 250, "", "ses-0")])
    _, claims = store.claim("c1", items, lease_s=60, token="w2")
    assert claims[0].decision == "skip:sent"
    store.finish("c1", [Transition("c1.0", MessageState.FAILED, 554, "late")], requeue=True)
    assert store.message_status("c1.0").state is MessageState.SENT
    assert counts(store, "c1") == {"sent": 1}


def test_live_lease_of_another_worker_is_busy_and_expired_lease_recovers(store):
    items = make(store, n=1)
    store.claim("c1", items, lease_s=60, token="w1")
    _, claims = store.claim("c1", items, lease_s=60, token="w2")
    assert claims[0].decision == "busy" and 0 < claims[0].retry_after_s <= 60
    store.claim("c1", items, lease_s=0.001, token="w1")  # the same worker renews, briefly

    def taken_over():
        _, claims = store.claim("c1", items, lease_s=60, token="w3")
        return claims[0] if claims[0].decision != "busy" else None

    claim = wait_for(taken_over, timeout_s=5, interval_s=0.001)
    assert claim.recovered
    assert store.message_status("c1.0").recovered


def test_suppressed_and_cancelled_and_paused_claims(store):
    items = make(store, n=3)
    items[1] = (items[1][0], items[1][1], True)
    _, claims = store.claim("c1", items[:2], lease_s=60, token="w")
    assert [c.decision for c in claims] == ["go", "suppressed"]
    store.pause("c1")
    _, claims = store.claim("c1", items[2:], lease_s=60, token="w")
    assert claims[0].decision == "paused"
    store.cancel("c1")
    _, claims = store.claim("c1", items[2:], lease_s=60, token="w")
    assert claims[0].decision == "cancelled"
    assert counts(store, "c1") == {"sending": 1, "suppressed": 1, "cancelled": 1}


def test_completion_when_last_message_is_final(store):
    items = make(store, n=2)
    store.claim("c1", items, lease_s=60, token="w")
    assert store.finish("c1", [Transition("c1.0", MessageState.SENT)]) == "running"
    assert store.finish("c1", [Transition("c1.1", MessageState.FAILED, 554, "no")]) == "completed"
    status = store.campaign_status("c1")
    assert status.done and status.finished_at is not None


def test_not_sent_index_lists_failures_with_rows(store):
    items = make(store, n=3)
    store.claim("c1", items, lease_s=60, token="w")
    store.finish(
        "c1",
        [
            Transition("c1.0", MessageState.SENT),
            Transition(
                "c1.1", MessageState.FAILED, 553, "bad address", row=[1, "u1@example.com", {}, 0]
            ),
            Transition(
                "c1.2", MessageState.UNKNOWN, 0, "connection lost", row=[2, "u2@example.com", {}, 0]
            ),
        ],
    )
    records = sorted(store.not_sent("c1"), key=lambda r: r.message_id)
    assert [(r.message_id, r.state.value, r.code) for r in records] == [
        ("c1.1", "failed", 553),
        ("c1.2", "unknown", 0),
    ]
    assert records[0].row == [1, "u1@example.com", {}, 0]


def test_resume_returns_parked_batches_once(store):
    make(store, n=2)
    store.pause("c1")
    key = store.keys.parked("c1")
    store.redis.rpush(key, '{"items": [[0, "a@example.com", {}, 0]], "message_ids": ["c1.0"]}')
    parked = store.resume("c1")
    assert parked == [{"items": [[0, "a@example.com", {}, 0]], "message_ids": ["c1.0"]}]
    assert store.campaign_status("c1").state.value == "running"
    with pytest.raises(CampaignError, match="not paused"):
        store.resume("c1")


def test_single_messages_are_recorded_once(store):
    store.ensure_transactional()
    assert store.add_message("transactional.abc", "a@example.com") is True
    assert store.add_message("transactional.abc", "a@example.com") is False
    assert counts(store, "transactional") == {"queued": 1}


def test_ses_message_id_index_finds_our_message(store):
    items = make(store, n=1)
    store.claim("c1", items, lease_s=60, token="w")
    store.finish("c1", [Transition("c1.0", MessageState.SENT, 250, "", "0107-abc-000000")])
    assert store.message_id_for_ses_id("0107-abc-000000") == "c1.0"
    assert store.message_id_for_ses_id("other") is None
