"""The fleet rate limit, throttling, the 24-hour quota and transactional priority, end to end."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import redis.asyncio as aioredis

from ses_tasks.limits.quota import DailyQuota
from ses_tasks.limits.ratelimit import FleetRateLimiter
from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.store.tracking import COUNTERS

from ..conftest import REDIS_URL


def _limiter_status(settings):
    async def run():
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            limiter = FleetRateLimiter(
                client,
                key_prefix=settings.key_prefix,
                rate_per_s=settings.max_send_rate,
                burst=settings.burst,
            )
            return await limiter.status()
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_throttling_backs_off_and_recovers_and_nothing_fails(make_pipeline):
    pipeline = make_pipeline(
        "starttls",
        sandbox_args=["--throttle-rate", "0.1", "--seed", "7"],
        SES_TASKS_MAX_SEND_RATE="400",
    )
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    status = client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=[f"th{i}@example.com" for i in range(600)],
        campaign_id="throttled",
    )
    lowered = wait_for(
        lambda: (s := _limiter_status(pipeline.settings)).effective_rate_per_s < 400 and s,
        timeout_s=60,
        interval_s=0.05,
        what="the fleet rate to drop after a 454",
    )
    assert lowered.last_change_reason == "throttle"
    final = pipeline.wait_done(status.id, timeout_s=120)
    assert final.counts["sent"] == 600
    assert final.counts["failed"] == 0
    assert sum(final.counts[n] for n in COUNTERS) == final.total
    delivered = Counter(r for m in pipeline.accepted(at_least=600) for r in m["rcpt_tos"])
    assert len(delivered) == 600 and max(delivered.values()) == 1
    recovered = wait_for(
        lambda: (s := _limiter_status(pipeline.settings)).effective_rate_per_s >= 400 and s,
        timeout_s=60,
        interval_s=0.2,
        what="the fleet rate to recover",
    )
    assert recovered.last_change_reason == "recover"


def test_quota_runs_out_mid_campaign_defers_then_completes(make_pipeline):
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_MAX_24H_SEND="150",
        SES_TASKS_QUOTA_WINDOW_S="4",
        SES_TASKS_MAX_SEND_RATE="1000",
    )
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    status = client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=[f"q{i}@example.com" for i in range(400)],
        campaign_id="quota",
    )
    deferred = wait_for(
        lambda: (s := client.campaign_status("quota")).counts["deferred"] > 0 and s,
        timeout_s=30,
        interval_s=0.05,
        what="messages deferred by the quota",
    )
    assert deferred.counts["failed"] == 0
    assert deferred.counts["sent"] <= 150
    assert "quota" in deferred.meta.get("deferred_reason", "")
    final = pipeline.wait_done(status.id, timeout_s=120)
    assert final.counts["sent"] == 400 and final.counts["failed"] == 0
    accepted = pipeline.accepted(at_least=400)
    # The quota is counted when a send starts and the endpoint stamps it when it arrives, so
    # allow for that lag (0.5 s here): no window of 4 - 0.5 s holds more than the quota.
    times = sorted(m["received_at"] for m in accepted)
    worst = max(sum(1 for t in times if start <= t < start + 3.5) for start in times)
    assert worst <= 150


def test_ses_daily_quota_reply_defers_instead_of_failing(make_pipeline):
    pipeline = make_pipeline(
        "starttls",
        sandbox_args=["--daily-quota", "100"],
        SES_TASKS_QUOTA_WINDOW_S="3",
    )
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=[f"d{i}@example.com" for i in range(160)],
        campaign_id="sesquota",
    )

    def settled():
        s = client.campaign_status("sesquota")
        return (
            s
            if s.counts["sent"] == 100 and s.counts["deferred"] + s.counts["retrying"] > 0
            else None
        )

    status = wait_for(settled, timeout_s=30, interval_s=0.05, what="quota deferral")
    assert status.counts["failed"] == 0

    async def quota_status():
        c = aioredis.Redis.from_url(REDIS_URL)
        try:
            return await DailyQuota(
                c, key_prefix=pipeline.settings.key_prefix, limit=None, window_s=3
            ).status()
        finally:
            await c.aclose()

    assert asyncio.run(quota_status()).exhausted_until is not None


def test_transactional_send_is_fast_while_a_campaign_saturates_the_rate(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE="200", SES_TASKS_RATE_BURST="20")
    pipeline.start_worker(concurrency=2, queues="bulk")
    pipeline.start_worker(concurrency=1, queues="transactional")
    client = pipeline.client
    warm = client.send_email(
        from_="app@example.com", to=["warm@example.com"], subject="w", text="w"
    )
    assert warm.get(timeout=60)["state"] == "sent"
    client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=[f"sat{i}@example.com" for i in range(2000)],
        campaign_id="saturating",
    )
    wait_for(lambda: client.campaign_status("saturating").counts["sent"] >= 300, timeout_s=60)
    latencies = []
    for i in range(5):
        started = time.monotonic()
        result = client.send_email(
            from_="app@example.com", to=[f"reset{i}@example.com"], subject="Reset", text="code"
        )
        assert result.get(timeout=30)["state"] == "sent"
        latencies.append(time.monotonic() - started)
    assert client.campaign_status("saturating").open > 0, "the campaign must still be running"
    assert max(latencies) < 1.0, latencies
    client.cancel("saturating")
