"""The dispatcher's pieces: the fair allocation (pure), its Redis script and the limiter's
per-campaign share gate, on fakeredis."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis

from ses_tasks.limits.ratelimit import FleetRateLimiter, Priority
from ses_tasks.states import CampaignState
from ses_tasks.store.tracking import (
    AsyncStatusStore,
    DispatchReply,
    LedgerEntry,
    Settlement,
    StatusStore,
)
from ses_tasks.worker.dispatcher import allocate, rate_shares

RUNNING, PAUSED = CampaignState.RUNNING, CampaignState.PAUSED


def camp(cid: str, in_flight: int, backlog: int, weight: float = 1.0, state=RUNNING, profile=""):
    return DispatchReply(cid, state, in_flight, backlog, weight, backlog * 10, profile)


# allocate: weighted max-min fairness over the free slots --------------------------------


def test_a_new_campaign_gets_the_next_free_slots():
    grants = allocate([camp("big", 3, 1000), camp("new", 0, 5)], window=4)
    assert grants == {"big": 0, "new": 1}


def test_a_small_weight_is_never_starved_even_by_a_full_window():
    # Weight 10:1 with a window of 8: max-min alone would give b nothing, ever.
    grants = allocate([camp("a", 8, 100, 10.0), camp("b", 0, 100, 1.0)], window=8)
    assert grants == {"a": 0, "b": 1}  # b's share of the rate then comes from the limiter
    assert allocate([camp("old", 1, 9), camp("new", 0, 9)], window=1) == {"old": 0, "new": 1}


def test_free_slots_go_by_weight():
    grants = allocate([camp("a", 0, 100, 3.0), camp("b", 0, 100, 1.0)], window=8)
    assert grants == {"a": 6, "b": 2}


def test_an_even_split_converges_from_any_start():
    # The big campaign holds every slot; as its batches settle the slots alternate.
    in_flight = {"big": 8, "small": 0}
    for _ in range(8):
        in_flight["big"] -= 1  # one of big's batches settles
        grants = allocate(
            [camp("big", in_flight["big"], 1000), camp("small", in_flight["small"], 1000)], 8
        )
        for cid, n in grants.items():
            in_flight[cid] += n
    assert in_flight == {"big": 4, "small": 4}


def test_allocation_respects_backlog_pause_and_a_full_window():
    assert allocate([camp("a", 0, 2), camp("b", 0, 100)], window=10) == {"a": 2, "b": 8}
    assert allocate([camp("p", 0, 100, state=PAUSED), camp("b", 0, 100)], 3) == {
        "p": 0,
        "b": 3,
    }
    assert allocate([camp("a", 5, 100), camp("b", 5, 100)], window=10) == {"a": 0, "b": 0}
    # Cancelled campaigns take their batches, to record them cancelled.
    cancelled = camp("c", 0, 3, state=CampaignState.CANCELLED)
    assert allocate([cancelled], window=10) == {"c": 3}


def test_rate_shares_only_split_between_campaigns_sending_with_one_profile():
    assert rate_shares([camp("a", 2, 10)]) == {"": {}}
    assert rate_shares([camp("a", 2, 10), camp("b", 0, 10)]) == {"": {}}  # b has no slot yet
    shares = rate_shares([camp("a", 2, 10, 3.0), camp("b", 1, 0, 1.0)])
    assert shares == {"": {"a": 0.75, "b": 0.25}}
    assert rate_shares([camp("a", 2, 10), camp("p", 1, 10, state=PAUSED)]) == {"": {}}
    # Each profile has its own rate: campaigns of two profiles do not split anything.
    two = rate_shares([camp("a", 2, 10), camp("e", 2, 10, profile="eu")])
    assert two == {"": {}, "eu": {}}
    three = rate_shares(
        [camp("a", 2, 10), camp("e", 2, 10, profile="eu"), camp("f", 1, 1, profile="eu")]
    )
    assert three == {"": {}, "eu": {"e": 0.5, "f": 0.5}}


# The dispatch script ---------------------------------------------------------------------


def stores() -> tuple[StatusStore, AsyncStatusStore]:
    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t")
    return sync, AsyncStatusStore(fakeredis.FakeAsyncRedis(server=server), key_prefix="t")


def stored_campaign(sync: StatusStore, cid: str, batches: int) -> None:
    sync.create_campaign(cid)
    pipe = sync.redis.pipeline(transaction=True)
    sync.add_queued(cid, batches * 2, pipe)
    for b in range(batches):
        items = [[2 * b, f"r{2 * b}@x.test", {}, 0], [2 * b + 1, f"r{2 * b + 1}@x.test", {}, 0]]
        sync.store_batch(cid, LedgerEntry(f"b{2 * b}", {"items": items}), 2 * b, pipe)
    pipe.execute()
    sync.finish_enqueue(cid)


def dispatch(store: AsyncStatusStore, cid: str, take: int) -> DispatchReply:
    return asyncio.run(store.dispatch(cid, take, unclaimed_after_s=60))


def test_dispatch_takes_stored_batches_in_order_and_counts_credits():
    sync, store = stores()
    stored_campaign(sync, "c1", 5)
    assert sync.in_flight("c1") == 0
    first = dispatch(store, "c1", 2)
    assert [e.batch_id for e in first.taken] == ["b0", "b2"]
    assert (first.in_flight, first.backlog, first.open) == (2, 3, 10)
    assert first.taken[0].payload["items"][0][1] == "r0@x.test"
    # Taken batches are due for the sweeper (a lost publish is no loss); stored ones not.
    due = {k.decode() for k in sync.redis.zrange(sync.keys.due("c1"), 0, -1)}
    assert due == {"b0", "b2"}
    assert sync.in_flight("c1") == 2
    # Settling b0 frees its credit.
    sync.finish("c1", [], settle=Settlement(done_batch="b0"))
    again = dispatch(store, "c1", 0)
    assert (again.in_flight, again.backlog, again.taken) == (1, 3, [])


def test_a_paused_campaign_takes_nothing_and_a_missing_one_is_dropped():
    sync, store = stores()
    stored_campaign(sync, "c1", 3)
    sync.pause("c1")
    paused = dispatch(store, "c1", 3)
    assert paused.taken == [] and paused.backlog == 3 and paused.state is PAUSED
    sync.redis.delete(sync.keys.campaign("c1"))
    gone = dispatch(store, "c1", 3)
    assert gone.state is None and gone.taken == []
    assert sync.redis.zcard(sync.keys.backlog("c1")) == 0


def test_storing_a_batch_twice_keeps_one_backlog_entry():
    sync, _ = stores()
    stored_campaign(sync, "c1", 2)
    stored_campaign_again = sync.redis.pipeline(transaction=True)
    sync.store_batch("c1", LedgerEntry("b0", {"items": []}), 0, stored_campaign_again)
    stored_campaign_again.execute()
    assert sync.backlog_size("c1") == 2


# The limiter's share gate ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now_us = 1_700_000_000_000_000

    def __call__(self) -> int:
        return self.now_us

    async def sleep(self, seconds: float) -> None:
        self.now_us += round(seconds * 1e6)


def limiter(clock: Clock) -> FleetRateLimiter:
    lim = FleetRateLimiter(fakeredis.FakeAsyncRedis(), rate_per_s=100.0, burst=10.0)
    lim._now_us = clock
    lim._sleep = clock.sleep
    return lim


def sending_time(lim: FleetRateLimiter, clock: Clock, campaign: str, n: int, **kw: Any) -> float:
    async def main() -> float:
        start = clock.now_us
        for _ in range(n // 10):
            await lim.acquire(10, campaign=campaign, **kw)
        return (clock.now_us - start) / 1e6

    return asyncio.run(main())


def test_a_campaign_with_half_the_rate_sends_at_half_the_rate():
    clock = Clock()
    lim = limiter(clock)
    asyncio.run(lim.set_shares({"a": 0.5, "b": 0.5}))
    took = sending_time(lim, clock, "a", 500)
    assert 9.7 < took < 10.1  # 500 at 50/s, less the burst (alone: 5 s)
    # Campaigns without a share, and transactional mail, are not gated.
    assert sending_time(lim, clock, "other", 500) < 5.1
    assert sending_time(lim, clock, "a", 500, priority=Priority.TRANSACTIONAL) < 5.1


def test_stale_shares_hold_nobody_back():
    clock = Clock()
    lim = limiter(clock)
    asyncio.run(lim.set_shares({"a": 0.5, "b": 0.5}))
    clock.now_us += 11_000_000  # the dispatcher died 11 s ago
    assert sending_time(lim, clock, "a", 500) < 5.1  # the whole rate
    asyncio.run(lim.set_shares({}))  # and clearing removes the campaign fields
    fields = asyncio.run(lim._redis.hkeys(lim.key))
    assert not [f for f in fields if f.startswith((b"s:", b"c:"))]


# A whole round, on fakeredis -------------------------------------------------------------


class FakeRuntime:
    """What the dispatcher uses of a worker process: Redis, the store, lanes, settings."""

    def __init__(self, server: fakeredis.FakeServer, **settings: Any) -> None:
        from ses_tasks.config import Settings
        from ses_tasks.worker.lanes import Lane

        self.settings = Settings(host="localhost", port=465, key_prefix="t", **settings)
        self.redis = fakeredis.FakeAsyncRedis(server=server)
        self.store = AsyncStatusStore(self.redis, key_prefix="t")
        self.token = "proc-1"
        self.bulk_capacity = 2
        self.consumed_queues: tuple[str, ...] = ()
        self.lanes = {
            name: Lane(name, self.settings.for_profile(name), self.redis, None)
            for name in ["", *self.settings.profiles]
        }
        self.limiter = self.lanes[""].limiter


def round_with(rt: FakeRuntime) -> list[Any]:
    from ses_tasks.worker.dispatcher import Dispatcher

    published: list[Any] = []

    async def main() -> None:
        dispatcher = Dispatcher(rt, published.append)  # type: ignore[arg-type]
        await dispatcher._heartbeat()
        await dispatcher.round()

    asyncio.run(main())
    return published


def test_a_round_fills_the_window_fairly_and_splits_the_rate():
    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t")
    stored_campaign(sync, "big", 10)
    rt = FakeRuntime(server)
    first = round_with(rt)  # one worker process of capacity 2: a window of 2
    assert [(j.campaign_id, j.batch_id) for j in first] == [("big", "b0"), ("big", "b2")]
    stored_campaign(sync, "new", 3)
    second = round_with(rt)  # the window is full, but a newcomer starts at once
    assert [(j.campaign_id, j.batch_id) for j in second] == [("new", "b0")]
    shares = asyncio.run(rt.redis.hgetall(rt.limiter.key))
    assert shares[b"s:big"] == shares[b"s:new"] == b"0.5"
    # Settling frees credits; the free slot goes to the campaign furthest below its share
    # (big: none in flight now, new: one).
    sync.finish("big", [], settle=Settlement(done_batch="b0"))
    sync.finish("big", [], settle=Settlement(done_batch="b2"))
    third = round_with(rt)
    assert [(j.campaign_id, j.batch_id) for j in third] == [("big", "b4")]


def test_a_profile_with_its_quota_used_up_gets_no_batches():
    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t")
    rt = FakeRuntime(server, profiles={"eu": {"max_24h_send": 10}})
    sync.create_campaign("eu1", meta={"profile": "eu"})
    pipe = sync.redis.pipeline(transaction=True)
    sync.store_batch("eu1", LedgerEntry("b0", {"items": [], "profile": "eu"}), 0, pipe)
    pipe.execute()
    stored_campaign(sync, "home", 2)
    asyncio.run(rt.lanes["eu"].quota.try_consume(10))  # the day's quota, all used
    published = round_with(rt)
    assert {j.campaign_id for j in published} == {"home"}
    assert sync.backlog_size("eu1") == 1


def test_a_yield_request_stops_one_batch_of_that_campaign_once():
    from ses_tasks.limits.ratelimit import YieldRequested

    clock = Clock()
    lim = limiter(clock)

    async def main() -> None:
        await lim.request_yield("big")
        await lim.acquire(10, campaign="other")  # another campaign: not asked
        await lim.acquire(10, campaign="big", priority=Priority.TRANSACTIONAL)  # never
        try:
            await lim.acquire(10, campaign="big")
        except YieldRequested:
            pass
        else:
            raise AssertionError("the yield request was not delivered")
        await lim.acquire(10, campaign="big")  # once: the next one goes on

    asyncio.run(main())


def test_a_newcomer_past_a_full_window_asks_the_biggest_campaign_to_make_room():
    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t")
    stored_campaign(sync, "big", 10)
    rt = FakeRuntime(server)
    round_with(rt)  # big fills the window of 2
    stored_campaign(sync, "new", 3)
    assert [j.campaign_id for j in round_with(rt)] == ["new"]
    fields = asyncio.run(rt.redis.hgetall(rt.limiter.key))
    assert b"y:big" in fields and b"y:new" not in fields


def test_a_yield_request_nobody_answers_in_time_is_dropped():
    clock = Clock()
    lim = limiter(clock)

    async def main() -> None:
        await lim.request_yield("big")
        clock.now_us += 6_000_000  # no batch of big asked for tokens within 5 s
        await lim.acquire(10, campaign="big")  # not stopped: the request is stale
        assert b"y:big" not in await lim._redis.hgetall(lim.key)

    asyncio.run(main())
