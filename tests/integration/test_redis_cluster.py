"""The status store, rate limiter and quota on a real 3-node Redis Cluster.

``ses_tasks/keys.py`` promises that every key of one campaign carries the ``{campaign id}``
hash tag and that every Lua script receives every key it touches in KEYS; the limiter and
quota keys carry the ``{account}`` tag. A real cluster checks both promises: a key outside
the script's slot fails with "Lua script attempted to access a non local key", a
multi-key command or transaction across slots with CROSSSLOT. Campaigns used here are
chosen so that they live on different nodes. Every script the package registers here is
also wrapped in ``KEY_GUARD_LUA``, which refuses a key not passed in KEYS even when it
shares the slot (a cluster alone would accept that).

The producer's ``pipeline(transaction=True)`` needs redis-py >= 6.1 on a cluster (older
versions refuse transactional cluster pipelines outright).

The cluster (three ``redis-server --cluster-enabled yes`` processes joined by
``redis-cli --cluster create``) is started once for the module; see ``tests/cluster_support``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import key_slot

from ses_tasks.config import Settings
from ses_tasks.errors import CampaignError
from ses_tasks.feedback import FeedbackApplier, parse_event
from ses_tasks.keys import TRANSACTIONAL, Keys
from ses_tasks.limits.quota import DailyQuota
from ses_tasks.limits.ratelimit import FleetRateLimiter, Priority
from ses_tasks.message.spec import CampaignTemplate
from ses_tasks.produce.campaigns import CampaignProducer
from ses_tasks.states import CampaignState, ClaimDecision, MessageState
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import (
    COUNTERS,
    AsyncStatusStore,
    CampaignStatus,
    LedgerEntry,
    Settlement,
    StatusStore,
    Transition,
    _Base,
)
from ses_tasks.worker.delivery import BatchItem, BatchJob

from ..cluster_support import CLUSTER_SLOTS, LocalCluster, redis_server_path

pytestmark = pytest.mark.timeout(120)

FEEDBACK_FIXTURES = Path(__file__).parent.parent / "fixtures" / "feedback"
LEASE_S = 30.0
#: Far in the future: nothing becomes due by itself while a test runs.
REDELIVER_AFTER_S = 3600.0


#: Prepended to every script the package registers in these tests: a local ``redis`` that
#: shadows the global one and refuses any command on a key the caller did not pass in KEYS.
#: A real cluster only refuses keys of *another* slot; this also catches an undeclared key
#: that happens to share the campaign's hash tag (fine on one cluster node, wrong by the
#: scripting contract, and refused by proxies and stricter servers).
KEY_GUARD_LUA = """
local __redis = redis
local __declared = {}
for _, k in ipairs(KEYS) do __declared[k] = true end
local __NO_KEYS = {time = true}
local __ALL_KEYS = {del = true, exists = true, unlink = true, touch = true, mget = true}
local __FIRST_KEY = {}
for _, c in ipairs({'expire', 'pexpire', 'pttl', 'ttl', 'get', 'set', 'incr', 'incrby',
    'hdel', 'hexists', 'hget', 'hgetall', 'hincrby', 'hlen', 'hmget', 'hset', 'hsetnx',
    'lindex', 'llen', 'lpop', 'lrange', 'rpush', 'lpush', 'sadd', 'srem', 'sismember',
    'scard', 'zadd', 'zrem', 'zrangebyscore', 'zrange', 'zcard', 'zscore', 'zpopmin'}) do
  __FIRST_KEY[c] = true
end
local function __guard(cmd, ...)
  local name, args, keys = string.lower(cmd), {...}, nil
  if __NO_KEYS[name] then keys = {}
  elseif __ALL_KEYS[name] then keys = args
  elseif __FIRST_KEY[name] then keys = {args[1]}
  else error('key guard: unclassified command ' .. cmd) end
  for _, k in ipairs(keys) do
    if not __declared[k] then
      error('key guard: ' .. cmd .. ' on a key not in KEYS: ' .. tostring(k))
    end
  end
end
local redis = setmetatable({
  call = function(cmd, ...) __guard(cmd, ...); return __redis.call(cmd, ...) end,
  pcall = function(cmd, ...) __guard(cmd, ...); return __redis.pcall(cmd, ...) end,
}, {__index = __redis})
"""


def guard_scripts(client: Any) -> Any:
    """Make ``client.register_script`` prepend ``KEY_GUARD_LUA``; returns the client."""
    register = client.register_script
    client.register_script = lambda script: register(KEY_GUARD_LUA + script)
    return client


# Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed")
    with LocalCluster(3, node_timeout_ms=2000) as running:
        yield running


@pytest.fixture
def rc(cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    client = guard_scripts(cluster.client())
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    return f"ct-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(rc: redis.RedisCluster, prefix: str) -> StatusStore:
    return StatusStore(rc, key_prefix=prefix, retention_s=3600, redeliver_after_s=REDELIVER_AFTER_S)


@contextlib.asynccontextmanager
async def async_store(cluster: LocalCluster, prefix: str) -> AsyncIterator[AsyncStatusStore]:
    client = guard_scripts(cluster.async_client())
    try:
        yield AsyncStatusStore(
            client, key_prefix=prefix, retention_s=3600, redeliver_after_s=REDELIVER_AFTER_S
        )
    finally:
        await client.aclose()


# Helpers ----------------------------------------------------------------------------------


def node_of(client: redis.RedisCluster, key: str) -> str:
    return str(client.get_node_from_key(key).name)


def spread_ids(client: redis.RedisCluster, keys: Keys, stem: str, count: int) -> list[str]:
    """``count`` campaign ids whose keys live on ``count`` different nodes."""
    by_node: dict[str, str] = {}
    for i in range(10_000):
        cid = f"{stem}-{i}"
        by_node.setdefault(node_of(client, keys.campaign(cid)), cid)
        if len(by_node) == count:
            return list(by_node.values())
    raise AssertionError(f"no {count} campaign ids on {count} nodes")


def accounts_on_nodes(client: redis.RedisCluster, prefix: str, count: int) -> list[str]:
    by_node: dict[str, str] = {}
    for i in range(10_000):
        account = f"acct-{i}"
        by_node.setdefault(node_of(client, f"{prefix}:rate:{{{account}}}"), account)
        if len(by_node) == count:
            return list(by_node.values())
    raise AssertionError(f"no {count} accounts on {count} nodes")


def exec_calls(cluster: LocalCluster, client: redis.RedisCluster, key: str) -> int:
    """EXEC commands the node owning ``key`` has run (its INFO commandstats)."""
    with cluster.node_client(client.get_node_from_key(key).port) as node:
        stats = node.info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


def assert_guarded(*scripts: Any) -> None:
    for script in scripts:
        assert script.script.startswith(KEY_GUARD_LUA)


def assert_adds_up(status: CampaignStatus) -> None:
    assert sum(status.counts[name] for name in COUNTERS) == status.total, status.to_dict()
    assert all(status.counts[name] >= 0 for name in COUNTERS), status.to_dict()


def nonzero(status: CampaignStatus) -> dict[str, int]:
    return {k: v for k, v in status.counts.items() if v}


def items_of(job: BatchJob, suppressed: Sequence[int] = ()) -> list[tuple[str, str, bool]]:
    return [(job.message_id(i), i.email, i.seq in suppressed) for i in job.items]


def batch(campaign_id: str, seqs: range, batch_id: str | None = None) -> BatchJob:
    items = tuple(BatchItem(seq, f"u{seq}@example.com", {"n": seq}) for seq in seqs)
    return BatchJob(campaign_id, items, batch_id or f"b{seqs.start}")


def produce(store: StatusStore, campaign_id: str, jobs: Sequence[BatchJob], bad: int = 0) -> None:
    """What ``CampaignProducer._flush`` does: one MULTI/EXEC per batch on a cluster pipeline."""
    for job in jobs:
        pipe = store.redis.pipeline(transaction=True)
        store.add_queued(campaign_id, len(job.items) + bad, pipe)
        store.register_batch(campaign_id, LedgerEntry(job.batch_id, job.payload()), pipe)
        pipe.execute()
        bad = 0


class StubCelery:
    """Records ``send_task`` calls in place of a broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append((name, kwargs))


# The cluster and the key layout -----------------------------------------------------------


def test_cluster_is_three_primaries_covering_every_slot(
    cluster: LocalCluster, rc: redis.RedisCluster
) -> None:
    for port in cluster.ports:
        info = cluster.cluster_info(port)
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == str(CLUSTER_SLOTS)
        assert info["cluster_known_nodes"] == "3"
    assert len(rc.get_primaries()) == 3


def test_the_key_guard_refuses_a_key_not_in_keys(rc: redis.RedisCluster) -> None:
    ok = rc.register_script("redis.call('SET', KEYS[1], 'v'); return redis.call('GET', KEYS[1])")
    assert ok(keys=["guard{x}"]) == b"v"
    sneaky = rc.register_script("return redis.call('GET', 'other{x}')")  # same slot
    with pytest.raises(redis.ResponseError, match="key guard"):
        sneaky(keys=["guard{x}"])
    unknown = rc.register_script("return redis.call('SUNIONSTORE', KEYS[1], KEYS[1])")
    with pytest.raises(redis.ResponseError, match="unclassified"):
        unknown(keys=["guard{x}"])


def test_every_key_of_a_campaign_and_of_an_account_is_in_one_slot(prefix: str) -> None:
    keys = Keys(prefix)
    base = _Base(key_prefix=prefix)  # the key and argument builders both stores use
    for cid in ("c1", "camp-2", "c20260101-120000-abcdef", TRANSACTIONAL):
        mids = [f"{cid}.{n}" for n in range(5)]
        slot = key_slot(keys.campaign(cid).encode())
        names = [
            keys.campaign(cid),
            keys.template(cid),
            keys.not_sent(cid),
            keys.parked(cid),
            keys.batches(cid),
            keys.due(cid),
            *(keys.message(mid) for mid in mids),
        ]
        names += base._claim_args(cid, [(m, "e", False) for m in mids], 1, "t", "b")[0]
        names += base._finish_args(
            cid,
            [Transition(mids[0], MessageState.SENT)],
            False,
            Settlement(release=mids[1:3], done_batch="b"),
        )[0]
        names += base._park_args(cid, {}, mids, "r", "t")[0]
        names += base._control_args(cid, "pause", "", "user")[0]
        assert {key_slot(n.encode()) for n in names} == {slot}, cid
    for account in ("us-east-1", "acct:1", "a@b"):
        rate_key = f"{prefix}:rate:{{{account}}}"
        quota_key = f"{prefix}:quota:{{{account}}}"
        assert key_slot(rate_key.encode()) == key_slot(quota_key.encode())


def test_campaigns_used_here_live_on_different_nodes(
    rc: redis.RedisCluster, store: StatusStore
) -> None:
    ids = spread_ids(rc, store.keys, "c", 3)
    nodes = {node_of(rc, store.keys.campaign(cid)) for cid in ids}
    assert len(nodes) == 3
    assert node_of(rc, store.keys.campaign(TRANSACTIONAL)) in nodes


# The producer ------------------------------------------------------------------------------


def test_producer_pipeline_is_one_transaction_on_the_campaign_slot(
    cluster: LocalCluster, rc: redis.RedisCluster, store: StatusStore
) -> None:
    for cid in spread_ids(rc, store.keys, "p", 3):
        store.create_campaign(cid, template={"subject": "hi"}, meta={"from": "a@example.com"})
        with pytest.raises(CampaignError):
            store.create_campaign(cid)
        execs = exec_calls(cluster, rc, store.keys.campaign(cid))
        produce(store, cid, [batch(cid, range(0, 4)), batch(cid, range(4, 7))])
        pipe = rc.pipeline(transaction=True)
        store.add_queued(cid, 0, pipe)
        store.register_batch(cid, LedgerEntry("b-empty", {"items": []}), pipe)
        replies = pipe.execute()
        assert len(replies) == 6
        # Each pipeline really ran as MULTI/EXEC on the node owning the campaign.
        assert exec_calls(cluster, rc, store.keys.campaign(cid)) == execs + 3
        assert store.ledger_size(cid) == 3
        status = store.campaign_status(cid)
        assert status.total == 7 and status.counts["queued"] == 7
        assert status.state is CampaignState.ENQUEUEING
        assert status.meta["from"] == "a@example.com"
        assert store.template(cid) == {"subject": "hi"}
        assert_adds_up(status)
        store.set_enqueued_upto(cid, 7)
        assert store.enqueued_upto(cid) == 7
        status = store.finish_enqueue(cid)
        assert status.state is CampaignState.RUNNING and status.enqueued_all
    assert set(store.list_campaigns()) >= set(spread_ids(rc, store.keys, "p", 3))


def test_campaign_producer_send_on_a_cluster(
    rc: redis.RedisCluster, store: StatusStore, prefix: str
) -> None:
    """The real ``CampaignProducer`` (``_flush`` and all) with a stub broker."""
    settings = Settings(batch_size=3, key_prefix=prefix, username="u", password="p")
    app = StubCelery()
    producer = CampaignProducer(settings, store, app)  # type: ignore[arg-type]
    template = CampaignTemplate(from_="a@example.com", subject="Hi {{ name }}", text="Hello")
    rows: list[Any] = [{"email": f"u{i}@example.com", "name": f"n{i}"} for i in range(7)]
    rows.insert(3, 42)  # a bad row: recorded failed as it is met
    for cid in spread_ids(rc, store.keys, "send", 2):
        app.sent.clear()
        status = producer.send(template, rows, campaign_id=cid)
        assert status.total == 8
        assert status.counts["queued"] == 7 and status.counts["failed"] == 1
        assert status.state is CampaignState.RUNNING and status.enqueued_all
        assert_adds_up(status)
        assert app.sent == []  # stored for the dispatcher, nothing published
        assert store.ledger_size(cid) == 3 and store.backlog_size(cid) == 3
        assert [r.state for r in store.not_sent(cid)] == [MessageState.FAILED]


def test_the_dispatcher_takes_stored_batches_on_a_cluster(
    cluster: LocalCluster, store: StatusStore, rc: redis.RedisCluster, prefix: str
) -> None:
    settings = Settings(batch_size=3, key_prefix=prefix, username="u", password="p")
    producer = CampaignProducer(settings, store, StubCelery())  # type: ignore[arg-type]
    template = CampaignTemplate(from_="a@example.com", subject="Hi", text="Hello")
    ids = spread_ids(rc, store.keys, "disp", 2)
    for cid in ids:
        producer.send(template, [f"u{i}@example.com" for i in range(7)], campaign_id=cid)

    async def take() -> None:
        async with async_store(cluster, prefix) as astore:
            assert_guarded(astore._dispatch)
            for cid in ids:
                reply = await astore.dispatch(cid, 2, unclaimed_after_s=60)
                assert [e.batch_id for e in reply.taken] == ["b0", "b3"]
                assert (reply.in_flight, reply.backlog) == (2, 1)
                await astore.kick_dispatcher()
            assert set(await astore.active_campaigns()) >= set(ids)

    asyncio.run(take())
    for cid in ids:
        assert store.in_flight(cid) == 2 and store.backlog_size(cid) == 1


# The worker's life cycle ------------------------------------------------------------------


def test_bulk_life_cycle_claim_finish_park_resume_complete(
    cluster: LocalCluster, rc: redis.RedisCluster, store: StatusStore, prefix: str
) -> None:
    ids = spread_ids(rc, store.keys, "life", 2)
    for cid in ids:
        asyncio.run(_bulk_life_cycle(cluster, store, prefix, cid))


async def _bulk_life_cycle(
    cluster: LocalCluster, store: StatusStore, prefix: str, cid: str
) -> None:
    store.create_campaign(cid)
    first, second = batch(cid, range(0, 5)), batch(cid, range(5, 10))
    produce(store, cid, [first, second], bad=1)
    store.finish(cid, [Transition(f"{cid}.10", MessageState.FAILED, 0, "bad", row=[10, "x"])])
    mid = first.message_id
    async with async_store(cluster, prefix) as astore:
        assert_guarded(store._claim, store._finish, store._control, store._resume)
        assert_guarded(astore._claim, astore._finish, astore._park, astore._renew)
        # Claim the first batch; seq 4 is on the suppression list.
        reply = await astore.claim(
            cid, items_of(first, suppressed=[4]), lease_s=LEASE_S, token="w1", batch_id="b0"
        )
        assert reply.campaign_state is CampaignState.ENQUEUEING
        assert [c.decision for c in reply.claims] == [ClaimDecision.GO] * 4 + [
            ClaimDecision.SUPPRESSED
        ]
        status = store.campaign_status(cid)
        assert nonzero(status) == {"queued": 5, "sending": 4, "suppressed": 1, "failed": 1}
        assert_adds_up(status)
        # A second worker finds them busy; a copy of a settled batch would be stale.
        busy = await astore.claim(
            cid, items_of(first)[:2], lease_s=LEASE_S, token="w2", batch_id="b0"
        )
        assert {c.decision for c in busy.claims} == {ClaimDecision.BUSY}
        held = [mid(i) for i in first.items if i.seq != 4]  # what the worker claimed
        renewed = await astore.renew(cid, held, lease_s=LEASE_S, token="w1", batch_id="b0")
        assert renewed.campaign_state is CampaignState.ENQUEUEING and renewed.lost == []
        stolen = await astore.renew(
            cid, [mid(i) for i in first.items[:4]], lease_s=LEASE_S, token="w2"
        )
        assert stolen.lost == [mid(i) for i in first.items[:4]]
        # Two sent, one failed, one handed back to a follow-up batch; the batch settles.
        follow = batch(cid, range(3, 4), "f3")
        state = await astore.finish(
            cid,
            [
                Transition(mid(first.items[0]), MessageState.SENT, 250, "Ok", f"ses-{cid}-0"),
                Transition(mid(first.items[1]), MessageState.SENT, 250, "Ok", f"ses-{cid}-1"),
                Transition(
                    mid(first.items[2]), MessageState.FAILED, 550, "no", row=[2, "u2@example.com"]
                ),
            ],
            settle=Settlement(
                token="w1",
                release=[mid(first.items[3])],
                done_batch="b0",
                follow_ups=[LedgerEntry("f3", follow.payload())],
            ),
        )
        assert state is CampaignState.ENQUEUEING
        stale = await astore.claim(
            cid, items_of(first)[:1], lease_s=LEASE_S, token="w2", batch_id="b0"
        )
        assert [c.decision for c in stale.claims] == [ClaimDecision.STALE]
        status = store.campaign_status(cid)
        assert nonzero(status) == {"queued": 6, "sent": 2, "failed": 2, "suppressed": 1}
        assert_adds_up(status)
        assert store.ledger_size(cid) == 2  # b5 and f3
        # The SES id index (another slot, written by a non-transactional pipeline).
        assert store.message_id_for_ses_id(f"ses-{cid}-0") == mid(first.items[0])
        assert store.message_id_for_ses_id(f"ses-{cid}-1") == mid(first.items[1])
        record = store.message_status(mid(first.items[0]))
        assert record is not None and record.state is MessageState.SENT
        assert record.ses_message_id == f"ses-{cid}-0" and record.attempts == 1
        unseen = store.message_status(f"{cid}.7")
        assert unseen is not None and unseen.state is MessageState.QUEUED
        assert store.message_status("elsewhere.1") is None
        not_sent = {r.message_id: r.state for r in store.not_sent(cid)}
        assert not_sent == {
            mid(first.items[2]): MessageState.FAILED,
            mid(first.items[4]): MessageState.SUPPRESSED,
            f"{cid}.10": MessageState.FAILED,
        }
        failed = store.message_status(mid(first.items[2]))
        assert failed is not None and failed.row == [2, "u2@example.com"]

        # Pause: the second batch is claimed "paused" and parked; its ledger entry settles.
        assert store.pause(cid) is True
        assert store.pause(cid) is False
        reply = await astore.claim(
            cid, items_of(second), lease_s=LEASE_S, token="w1", batch_id="b5"
        )
        assert reply.campaign_state is CampaignState.PAUSED
        assert {c.decision for c in reply.claims} == {ClaimDecision.PAUSED}
        ids = [mid(i) for i in second.items]
        parked = await astore.park(
            cid, {**second.payload(), "message_ids": ids}, ids, "campaign paused", "w1"
        )
        assert parked is CampaignState.PAUSED
        await astore.finish(cid, [], settle=Settlement(token="w1", done_batch="b5"))
        status = store.campaign_status(cid)
        assert status.state is CampaignState.PAUSED
        assert nonzero(status) == {
            "queued": 1,
            "deferred": 5,
            "sent": 2,
            "failed": 2,
            "suppressed": 1,
        }
        assert_adds_up(status)
        assert store.ledger_size(cid) == 1  # f3

        # Resume: the parked batch moves to the ledger under a new id, to be published.
        entries = store.resume(cid)
        assert len(entries) == 1 and entries[0].payload["message_ids"] == ids
        assert store.campaign_status(cid).state is CampaignState.ENQUEUEING
        assert store.ledger_size(cid) == 2
        with pytest.raises(CampaignError):
            store.resume(cid)
        status = store.finish_enqueue(cid)
        assert status.state is CampaignState.RUNNING
        for entry, job in ((entries[0], second), (LedgerEntry("f3", {}), follow)):
            reply = await astore.claim(
                cid, items_of(job), lease_s=LEASE_S, token="w3", batch_id=entry.batch_id
            )
            assert all(c.go for c in reply.claims), reply
            state = await astore.finish(
                cid,
                [Transition(job.message_id(i), MessageState.SENT, 250, "Ok") for i in job.items],
                settle=Settlement(token="w3", done_batch=entry.batch_id),
            )
        assert state is CampaignState.COMPLETED
        status = store.campaign_status(cid)
        assert status.state is CampaignState.COMPLETED and status.done
        assert nonzero(status) == {"sent": 8, "failed": 2, "suppressed": 1}
        assert status.total == 11
        assert_adds_up(status)
        assert store.ledger_size(cid) == 0
        # The sweeper's list: the completed campaign retires once its ledger is empty.
        assert cid in await astore.active_campaigns()
        assert await astore.retire_if_settled(cid) is True
        assert cid not in await astore.active_campaigns()
        with pytest.raises(CampaignError):
            store.pause(cid)


def test_sync_claim_finish_and_cancel_with_parked_batches(
    rc: redis.RedisCluster, store: StatusStore, cluster: LocalCluster, prefix: str
) -> None:
    for cid in spread_ids(rc, store.keys, "cancel", 2):
        store.create_campaign(cid)
        jobs = [batch(cid, range(0, 3)), batch(cid, range(3, 6)), batch(cid, range(6, 9))]
        produce(store, cid, jobs)
        store.finish_enqueue(cid)
        # The synchronous store's claim/finish (the CLI and tests use them).
        reply = store.claim(cid, items_of(jobs[0]), lease_s=LEASE_S, token="s", batch_id="b0")
        assert all(c.go for c in reply.claims)
        store.finish(
            cid,
            [Transition(jobs[0].message_id(jobs[0].items[0]), MessageState.SENT, 250, "Ok", "x")],
            settle=Settlement(
                token="s",
                release=[jobs[0].message_id(i) for i in jobs[0].items[1:]],
                done_batch="b0",
                follow_ups=[LedgerEntry("f1", batch(cid, range(1, 3)).payload())],
            ),
        )
        assert store.message_id_for_ses_id("x") == f"{cid}.0"
        store.pause(cid)

        async def park(cid: str, jobs: list[BatchJob]) -> None:
            async with async_store(cluster, prefix) as astore:
                for job in jobs:
                    ids = [job.message_id(i) for i in job.items]
                    payload = {**job.payload(), "message_ids": ids}
                    assert await astore.park(cid, payload, ids, "paused", "w") is (
                        CampaignState.PAUSED
                    )

        asyncio.run(park(cid, jobs[1:]))
        status = store.campaign_status(cid)
        assert nonzero(status) == {"queued": 2, "deferred": 6, "sent": 1}
        assert store.cancel(cid) == 6  # both parked batches end cancelled now
        assert rc.llen(store.keys.parked(cid)) == 0
        assert store.cancel_parked(cid) == 0
        with pytest.raises(CampaignError):
            store.pause(cid)  # a cancelled campaign cannot be paused
        # The queued ones end cancelled when a worker claims them.
        reply = store.claim(
            cid, items_of(batch(cid, range(1, 3))), lease_s=LEASE_S, token="s", batch_id="f1"
        )
        assert reply.campaign_state is CampaignState.CANCELLED
        assert {c.decision for c in reply.claims} == {ClaimDecision.CANCELLED}
        status = store.campaign_status(cid)
        assert status.state is CampaignState.CANCELLED
        assert nonzero(status) == {"sent": 1, "cancelled": 8}
        assert_adds_up(status)
        assert {r.state for r in store.not_sent(cid)} == {MessageState.CANCELLED}
        assert len(list(store.not_sent(cid))) == 8


# The sweeper's ledger ---------------------------------------------------------------------


def test_ledger_take_due_mark_due_now_and_retire(
    rc: redis.RedisCluster, store: StatusStore, cluster: LocalCluster, prefix: str
) -> None:
    ids = spread_ids(rc, store.keys, "sweep", 3)

    async def sweep() -> None:
        async with async_store(cluster, prefix) as astore:
            for n, cid in enumerate(ids):
                store.create_campaign(cid)
                jobs = [batch(cid, range(0, 2)), batch(cid, range(2, 4))]
                produce(store, cid, jobs)
                state, due = await astore.take_due(cid, limit=10)
                assert state is CampaignState.ENQUEUEING and due == []
                # A failed publish, from the producer (sync) or the sweeper (async).
                if n % 2:
                    store.mark_due_now(cid, ["b0", "no-such-batch"])
                else:
                    await astore.mark_due_now(cid, ["b0", "no-such-batch"])
                state, due = await astore.take_due(cid, limit=10)
                assert [e.batch_id for e in due] == ["b0"]
                assert due[0].payload == jobs[0].payload()
                assert (await astore.take_due(cid, limit=10))[1] == []  # pushed out
                assert rc.zcard(store.keys.due(cid)) == 2  # the unknown id was not added
                assert int(rc.hget(store.keys.campaign(cid), "swept") or 0) == 1
                # Paused: nothing is swept.
                store.pause(cid)
                await astore.mark_due_now(cid, ["b2"])
                assert (await astore.take_due(cid, limit=10)) == (CampaignState.PAUSED, [])
                assert await astore.retire_if_settled(cid) is False
                assert cid in await astore.active_campaigns()
            # A campaign whose record is gone: its ledger is dropped and it retires.
            gone = ids[0]
            rc.delete(store.keys.campaign(gone))
            assert (await astore.take_due(gone, limit=10)) == (None, [])
            assert rc.exists(store.keys.batches(gone), store.keys.due(gone)) == 0
            assert await astore.retire_if_settled(gone) is True
            assert gone not in await astore.active_campaigns()

    asyncio.run(sweep())


def test_transactional_enqueue_one_claim_finish(
    rc: redis.RedisCluster, store: StatusStore, cluster: LocalCluster, prefix: str
) -> None:
    mids = [f"{TRANSACTIONAL}.{uuid.uuid4().hex}" for _ in range(3)]
    for m in mids:
        assert store.enqueue_one(m, "t@example.com", {"spec": m}) == (
            True,
            MessageState.QUEUED,
            True,
        )
    assert store.enqueue_one(mids[0], "t@example.com", {"spec": "x"}) == (
        False,
        MessageState.QUEUED,
        True,
    )
    status = store.campaign_status(TRANSACTIONAL)
    assert status.state is CampaignState.RUNNING
    assert nonzero(status) == {"queued": 3} and status.total == 3
    assert store.ledger_size(TRANSACTIONAL) == 3

    async def deliver() -> None:
        async with async_store(cluster, prefix) as astore:
            assert TRANSACTIONAL in await astore.active_campaigns()
            await astore.mark_due_now(TRANSACTIONAL, [mids[2]])
            state, due = await astore.take_due(TRANSACTIONAL, limit=5)
            assert state is CampaignState.RUNNING
            assert [(e.batch_id, e.payload) for e in due] == [(mids[2], {"spec": mids[2]})]
            for n, m in enumerate(mids):
                reply = await astore.claim(
                    TRANSACTIONAL,
                    [(m, "t@example.com", False)],
                    lease_s=LEASE_S,
                    token="tx",
                    batch_id=m,
                )
                assert reply.claims[0].go
                outcome = MessageState.SENT if n < 2 else MessageState.DEFERRED
                follow = [] if n < 2 else [LedgerEntry(m, {"spec": m}, 5.0)]
                state = await astore.finish(
                    TRANSACTIONAL,
                    [Transition(m, outcome, 0, "", f"ses-{m}" if n < 2 else None)],
                    settle=Settlement(token="tx", done_batch=m, follow_ups=follow),
                )
                assert state is CampaignState.RUNNING  # the standing campaign never completes
            assert await astore.retire_if_settled(TRANSACTIONAL) is False

    asyncio.run(deliver())
    assert store.enqueue_one(mids[0], "t@example.com", {}) == (False, MessageState.SENT, False)
    assert store.enqueue_one(mids[2], "t@example.com", {}) == (False, MessageState.DEFERRED, True)
    assert store.message_id_for_ses_id(f"ses-{mids[1]}") == mids[1]
    status = store.campaign_status(TRANSACTIONAL)
    assert nonzero(status) == {"sent": 2, "deferred": 1}
    assert_adds_up(status)


def test_transactional_claim_recreates_a_lost_standing_record(
    rc: redis.RedisCluster, store: StatusStore, cluster: LocalCluster, prefix: str
) -> None:
    m = f"{TRANSACTIONAL}.{uuid.uuid4().hex}"

    async def claim() -> None:
        async with async_store(cluster, prefix) as astore:
            reply = await astore.claim(
                TRANSACTIONAL, [(m, "t@example.com", False)], lease_s=LEASE_S, token="t"
            )
            assert reply.campaign_state is CampaignState.RUNNING and reply.claims[0].go

    asyncio.run(claim())
    status = store.campaign_status(TRANSACTIONAL)
    assert nonzero(status) == {"sending": 1} and status.total == 1


def test_async_store_controls_and_reads(
    rc: redis.RedisCluster, store: StatusStore, cluster: LocalCluster, prefix: str
) -> None:
    cid = spread_ids(rc, store.keys, "ctl", 1)[0]
    store.create_campaign(cid, template={"subject": "s"})
    SuppressionList(rc, key_prefix=prefix).add(["no@example.com"], reason="test")

    async def run() -> None:
        async with async_store(cluster, prefix) as astore:
            assert await astore.template(cid) == {"subject": "s"}
            await astore.set_campaign_fields(cid, deferred_reason="quota")
            assert await astore.suppressed(["No@example.com", "yes@example.com"]) == [True, False]
            await astore.pause(cid, "endpoint refused", kind="endpoint")
            assert_guarded(astore._control, astore._take_due)

    asyncio.run(run())
    status = store.campaign_status(cid)
    assert status.state is CampaignState.PAUSED and status.reason == "endpoint refused"
    assert status.meta["pause_kind"] == "endpoint" and status.meta["deferred_reason"] == "quota"


# Feedback, suppression -------------------------------------------------------------------


def test_feedback_record_on_a_cluster(
    rc: redis.RedisCluster, store: StatusStore, prefix: str
) -> None:
    applier = FeedbackApplier(rc, key_prefix=prefix, store=store)
    for n, cid in enumerate(spread_ids(rc, store.keys, "fb", 2)):
        store.create_campaign(cid)
        store.add_queued(cid, 1)
        mid, ses = f"{cid}.0", f"ses-fb-{n}-{uuid.uuid4().hex}"
        store.claim(cid, [(mid, f"fb{n}@example.com", False)], lease_s=LEASE_S, token="t")
        store.finish(cid, [Transition(mid, MessageState.SENT, 250, "Ok", ses)])
        data = json.loads((FEEDBACK_FIXTURES / "notification_delivery.json").read_text())
        data["mail"]["messageId"] = ses
        result = applier.apply(parse_event(data))
        assert result.status == "applied" and result.message_id == mid
        assert applier.apply(parse_event(data)).status == "duplicate"
        assert int(rc.hget(store.keys.campaign(cid), "delivered") or 0) == 1


def test_suppression_list_on_a_cluster(rc: redis.RedisCluster, prefix: str) -> None:
    suppression = SuppressionList(rc, key_prefix=prefix)
    assert suppression.add(["A@example.com", "b@example.com"], reason="r", overwrite=False) == 2
    assert suppression.record_transient("c@example.com", "e1", window_s=60) == 1
    assert suppression.contains("a@example.com")
    assert len(suppression) == 2


def test_suppression_remove_on_a_cluster(rc: redis.RedisCluster, prefix: str) -> None:
    suppression = SuppressionList(rc, key_prefix=prefix)
    suppression.add(["a@example.com"], reason="r")
    suppression.record_transient("a@example.com", "e1", window_s=60)
    assert suppression.remove(["a@example.com"]) == 1
    assert not suppression.contains("a@example.com")


# Rate limiter and quota -------------------------------------------------------------------


def test_rate_limiter_and_quota_on_the_async_cluster_client(
    rc: redis.RedisCluster, cluster: LocalCluster, prefix: str
) -> None:
    accounts = accounts_on_nodes(rc, prefix, 2)

    async def run() -> None:
        client = guard_scripts(cluster.async_client())
        try:
            for account in accounts:
                limiter = FleetRateLimiter(
                    client,
                    key_prefix=prefix,
                    account=account,
                    rate_per_s=1000.0,
                    burst=50.0,
                    recover_per_s=0.0,
                    throttle_guard_s=600.0,
                )
                assert_guarded(*limiter._lua.values())
                waited = await limiter.acquire(5)
                assert waited < 1.0
                assert await limiter.acquire(1, priority=Priority.TRANSACTIONAL) < 1.0
                assert await limiter.reserve(2) >= 0.0
                assert await limiter.on_throttle() == pytest.approx(500.0)
                assert await limiter.on_throttle() == pytest.approx(500.0)  # guarded
                status = await limiter.status()
                assert status.effective_rate_per_s == pytest.approx(500.0)
                assert status.last_change_reason == "throttle"
                assert status.previous_rate_per_s == pytest.approx(1000.0)

                quota = DailyQuota(client, key_prefix=prefix, account=account, limit=10)
                assert_guarded(*quota._lua.values())
                granted = await quota.try_consume(4)
                assert granted.granted and granted.used == 4
                refused = await quota.try_consume(7)
                assert not refused.granted and refused.used == 4
                assert await quota.release(3) == 3
                assert (await quota.status()).used == 1
                assert (await quota.try_consume(9)).granted
                assert (await quota.status()).remaining == 0
                assert await quota.mark_exhausted(60.0) == pytest.approx(60.0, abs=1.0)
                exhausted = await quota.status()
                assert exhausted.exhausted_until is not None
                assert not (await quota.try_consume(1)).granted
                # Both keys of the account are in one slot, on the node we picked.
                assert key_slot(limiter.key.encode()) == key_slot(quota.key.encode())
                assert rc.exists(limiter.key, quota.key) == 2
        finally:
            await client.aclose()

    asyncio.run(run())
