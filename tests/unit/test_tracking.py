"""The status store's transitions, on fakeredis (the Lua scripts run under lupa)."""

from __future__ import annotations

import asyncio
import json

import fakeredis
import pytest

from ses_tasks.errors import CampaignError
from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.states import CampaignState, ClaimDecision, MessageState
from ses_tasks.store.tracking import (
    COUNTERS,
    AsyncStatusStore,
    LedgerEntry,
    Settlement,
    StatusStore,
    Transition,
)


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
    reply = store.claim("c1", items, lease_s=60, token="w1")
    assert reply.campaign_state is CampaignState.RUNNING
    assert [c.decision for c in reply.claims] == ["go", "go", "go"]
    assert counts(store, "c1") == {"sending": 3}
    store.finish("c1", [Transition("c1.0", MessageState.SENT, 250, "", "ses-0")])
    assert counts(store, "c1") == {"sending": 2, "sent": 1}
    record = store.message_status("c1.0")
    assert record.ses_message_id == "ses-0" and record.attempts == 1


def test_sent_is_never_sent_again_nor_downgraded(store):
    items = make(store, n=1)
    store.claim("c1", items, lease_s=60, token="w1")
    store.finish("c1", [Transition("c1.0", MessageState.SENT, 250, "", "ses-0")])
    claims = store.claim("c1", items, lease_s=60, token="w2").claims
    assert claims[0].decision is ClaimDecision.SKIP
    assert claims[0].skipped_state is MessageState.SENT
    store.finish("c1", [Transition("c1.0", MessageState.FAILED, 554, "late")], requeue=True)
    assert store.message_status("c1.0").state is MessageState.SENT
    assert counts(store, "c1") == {"sent": 1}


def test_live_lease_of_another_worker_is_busy_and_expired_lease_recovers(store):
    items = make(store, n=1)
    store.claim("c1", items, lease_s=60, token="w1")
    claims = store.claim("c1", items, lease_s=60, token="w2").claims
    assert claims[0].decision == "busy" and 0 < claims[0].retry_after_s <= 60
    store.redis.hset(store.keys.message("c1.0"), "lease_until", 0)  # w1 died: lease ran out

    def taken_over():
        claims = store.claim("c1", items, lease_s=60, token="w3").claims
        return claims[0] if claims[0].decision != "busy" else None

    claim = wait_for(taken_over, timeout_s=5, interval_s=0.001)
    assert claim.recovered
    assert store.message_status("c1.0").recovered


def test_suppressed_and_cancelled_and_paused_claims(store):
    items = make(store, n=3)
    items[1] = (items[1][0], items[1][1], True)
    claims = store.claim("c1", items[:2], lease_s=60, token="w").claims
    assert [c.decision for c in claims] == ["go", "suppressed"]
    store.pause("c1")
    claims = store.claim("c1", items[2:], lease_s=60, token="w").claims
    assert claims[0].decision == "paused"
    store.cancel("c1")
    claims = store.claim("c1", items[2:], lease_s=60, token="w").claims
    assert claims[0].decision == "cancelled"
    assert counts(store, "c1") == {"sending": 1, "suppressed": 1, "cancelled": 1}


def test_completion_when_last_message_is_final(store):
    items = make(store, n=2)
    store.claim("c1", items, lease_s=60, token="w")
    assert store.finish("c1", [Transition("c1.0", MessageState.SENT)]) is CampaignState.RUNNING
    failed = Transition("c1.1", MessageState.FAILED, 554, "no")
    assert store.finish("c1", [failed]) is CampaignState.COMPLETED
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
    (entry,) = store.resume("c1")
    assert entry.payload == {"items": [[0, "a@example.com", {}, 0]], "message_ids": ["c1.0"]}
    assert store.redis.hget(store.keys.batches("c1"), entry.batch_id) is not None
    assert store.campaign_status("c1").state.value == "running"
    with pytest.raises(CampaignError, match="not paused"):
        store.resume("c1")


def test_single_messages_are_recorded_once_with_their_ledger_entry(store):
    payload = {"items": [["abc", "a@example.com", {}, 0, {"to": ["a@example.com"]}]]}
    assert store.enqueue_one("transactional.abc", "a@example.com", payload) == (
        True,
        MessageState.QUEUED,
        True,
    )
    # The caller's retry (same key) finds it still queued with its entry: publish again.
    assert store.enqueue_one("transactional.abc", "a@example.com", payload) == (
        False,
        MessageState.QUEUED,
        True,
    )
    assert counts(store, "transactional") == {"queued": 1}
    assert store.ledger_size("transactional") == 1


def test_ses_message_id_index_finds_our_message(store):
    items = make(store, n=1)
    store.claim("c1", items, lease_s=60, token="w")
    store.finish("c1", [Transition("c1.0", MessageState.SENT, 250, "", "0107-abc-000000")])
    assert store.message_id_for_ses_id("0107-abc-000000") == "c1.0"
    assert store.message_id_for_ses_id("other") is None


def test_the_same_token_claiming_again_is_a_no_op(store):
    """A claim whose reply was lost is asked again: no attempt spent, not 'recovered'."""
    items = make(store, n=1)
    store.claim("c1", items, lease_s=60, token="w1")
    claims = store.claim("c1", items, lease_s=60, token="w1").claims
    assert claims[0].decision is ClaimDecision.GO
    record = store.message_status("c1.0")
    assert record.attempts == 1 and not record.recovered


def test_finish_leaves_a_message_taken_over_to_its_new_owner_unless_we_sent_it(store):
    items = make(store, n=2)
    store.claim("c1", items, lease_s=60, token="old")
    store.redis.hset(store.keys.message("c1.0"), "lease_token", "new")
    store.redis.hset(store.keys.message("c1.1"), "lease_token", "new")
    store.finish(
        "c1",
        [Transition("c1.0", MessageState.RETRYING), Transition("c1.1", MessageState.SENT)],
        settle=Settlement(token="old"),
    )
    assert store.message_status("c1.0").state is MessageState.SENDING
    assert store.message_status("c1.1").state is MessageState.SENT


def test_settle_hands_back_writes_follow_ups_and_removes_the_batch_in_one_step(store):
    items = make(store, n=3)
    store.register_batch("c1", LedgerEntry("b0", {"items": []}))
    store.claim("c1", items, lease_s=60, token="w", batch_id="b0")
    follow = LedgerEntry("f1", {"items": [[1, "u1@example.com", {}, 1]]}, delay_s=5)
    store.finish(
        "c1",
        [Transition("c1.0", MessageState.SENT), Transition("c1.1", MessageState.RETRYING)],
        settle=Settlement(token="w", release=["c1.2"], done_batch="b0", follow_ups=[follow]),
    )
    assert counts(store, "c1") == {"sent": 1, "retrying": 1, "queued": 1}
    assert store.message_status("c1.2").state is MessageState.QUEUED
    ledger = {k.decode() for k in store.redis.hkeys(store.keys.batches("c1"))}
    assert ledger == {"f1"}
    # A late copy of the settled batch is skipped whole.
    claims = store.claim("c1", items, lease_s=60, token="x", batch_id="b0").claims
    assert {c.decision for c in claims} == {ClaimDecision.STALE}


def test_release_only_touches_our_own_sending_messages(store):
    items = make(store, n=1)
    store.claim("c1", items, lease_s=60, token="a")
    store.finish("c1", [], settle=Settlement(token="b", release=["c1.0"]))
    assert store.message_status("c1.0").state is MessageState.SENDING


def test_park_moves_only_open_messages():
    server = fakeredis.FakeServer()
    store = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t", retention_s=3600)
    items = make(store, n=3)
    store.claim("c1", items, lease_s=60, token="w")
    store.finish(
        "c1",
        [Transition("c1.0", MessageState.SENT), Transition("c1.1", MessageState.FAILED, 5, "x")],
    )
    store.pause("c1")
    astore = AsyncStatusStore(fakeredis.FakeAsyncRedis(server=server), key_prefix="t")
    ids = ["c1.0", "c1.1", "c1.2"]
    state = asyncio.run(astore.park("c1", {"items": [], "message_ids": ids}, ids, "paused", "w"))
    assert state is CampaignState.PAUSED
    assert counts(store, "c1") == {"sent": 1, "failed": 1, "deferred": 1}


def test_finish_enqueue_does_not_overwrite_a_pause(store):
    store.create_campaign("c1")
    store.pause("c1")
    assert store.finish_enqueue("c1").state is CampaignState.PAUSED


def test_a_system_pause_never_overwrites_a_cancel(store):
    make(store, n=1)
    store.cancel("c1")
    assert store.pause("c1", "endpoint down", kind="endpoint") is False
    assert store.campaign_status("c1").state is CampaignState.CANCELLED


def test_the_transactional_campaign_can_be_paused_but_not_cancelled(store):
    store.enqueue_one("transactional.a", "a@example.com", {"items": []})
    assert store.pause("transactional") is True
    claims = store.claim(
        "transactional", [("transactional.a", "a@example.com", False)], lease_s=60, token="w"
    ).claims
    assert claims[0].decision is ClaimDecision.PAUSED
    with pytest.raises(CampaignError, match="cannot be cancelled"):
        store.cancel("transactional")


def test_cancel_ends_parked_messages(store):
    items = make(store, n=2)
    store.pause("c1")
    store.redis.rpush(
        store.keys.parked("c1"), json.dumps({"items": [], "message_ids": ["c1.0", "c1.1"]})
    )
    assert store.cancel("c1") == 2
    assert counts(store, "c1") == {"cancelled": 2}
    assert store.campaign_status("c1").state is CampaignState.CANCELLED
    del items


def test_renew_extends_our_leases_and_reports_lost_ones():
    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t", retention_s=3600)
    items = make(sync, n=2)
    sync.claim("c1", items, lease_s=1, token="w")
    sync.redis.hset(sync.keys.message("c1.1"), "lease_token", "thief")
    astore = AsyncStatusStore(fakeredis.FakeAsyncRedis(server=server), key_prefix="t")
    reply = asyncio.run(astore.renew("c1", ["c1.0", "c1.1"], lease_s=60, token="w"))
    assert reply.lost == ["c1.1"] and reply.campaign_state is CampaignState.RUNNING
    lease_until = int(sync.redis.hget(sync.keys.message("c1.0"), "lease_until"))
    assert lease_until > int(sync.redis.hget(sync.keys.message("c1.1"), "lease_until")) + 30_000


def test_take_due_republishes_past_due_entries_once_and_counts_them():
    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t", retention_s=3600)
    make(sync, n=1)
    sync.register_batch("c1", LedgerEntry("b0", {"items": [[0, "u0@example.com", {}, 0]]}))
    sync.register_batch("c1", LedgerEntry("b1", {"items": []}))
    sync.mark_due_now("c1", ["b0"])
    astore = AsyncStatusStore(fakeredis.FakeAsyncRedis(server=server), key_prefix="t")
    _, entries = asyncio.run(astore.take_due("c1", limit=10))
    assert [e.batch_id for e in entries] == ["b0"]
    assert asyncio.run(astore.take_due("c1", limit=10))[1] == []  # due pushed out
    assert sync.redis.hget(sync.keys.campaign("c1"), "swept") == b"1"


def test_a_batch_another_worker_took_over_stays_in_the_ledger(store):
    items = make(store, n=2)
    store.register_batch("c1", LedgerEntry("b0", {"items": []}))
    store.claim("c1", items, lease_s=60, token="a", batch_id="b0")
    store.redis.hset(store.keys.message("c1.1"), "lease_token", "b")  # b took c1.1 over
    store.finish(
        "c1",
        [Transition("c1.0", MessageState.SENT)],
        settle=Settlement(token="a", release=["c1.1"], done_batch="b0"),
    )
    assert {k.decode() for k in store.redis.hkeys(store.keys.batches("c1"))} == {"b0"}
    assert store.message_status("c1.1").state is MessageState.SENDING
