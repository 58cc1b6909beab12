"""One campaign through every kind of Redis outage in a row, with one worker.

The store and broker Redis (AOF, fsync always) first refuses every write for a few seconds
(an ACL change: NOPERM; ``READONLY`` during a failover takes the same path), then hits
``maxmemory`` for a few seconds (OOM), then is killed -9 and restarted. The campaign must
complete with each recipient delivered exactly once, and the worker must be the same
process throughout: no Celery restart, no lost or doubled mail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from ses_tasks.errors import CampaignError
from ses_tasks.sandbox.embedded import wait_for

from .support import PrivateRedis, adds_up, delivered

pytestmark = pytest.mark.slow

TOTAL = 1500
OUTAGE_S = 3.0


def _sent(client: Any, campaign_id: str) -> int:
    try:
        return int(client.campaign_status(campaign_id).counts["sent"])
    except (redis.RedisError, CampaignError):
        return 0


def _for_a_while(start: Callable[[], Any], stop: Callable[[], Any], seconds: float) -> None:
    start()
    try:
        deadline = time.monotonic() + seconds
        # The outage lasts a fixed time on purpose: this is the fault, not a synchronisation.
        while time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop()


def test_write_errors_then_maxmemory_then_kill_9_one_campaign_completes_once(
    make_pipeline: Any, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path / "redis", appendonly=True).start()
    admin = redis.Redis.from_url(server.url)
    try:
        pipeline = make_pipeline(
            "tls",
            SES_TASKS_REDIS_URL=server.url,
            SES_TASKS_BROKER_URL=server.url,
            SES_TASKS_MAX_SEND_RATE="150",
            SES_TASKS_CLAIM_LEASE_S="30",
            SES_TASKS_STORE_RETRY_S="20",
            SES_TASKS_REDIS_SOCKET_TIMEOUT_S="2",
            SES_TASKS_SWEEP_INTERVAL_S="1",
        )
        worker = pipeline.start_worker(concurrency=1)
        main_pid = wait_for(worker.main_pid, timeout_s=30, what="Celery's main process")
        client = pipeline.client
        client.send_campaign(
            from_="news@example.com",
            subject="Hi",
            text="Hello {{ email }}",
            recipients=[f"o{i}@example.com" for i in range(TOTAL)],
            campaign_id="outages",
        )
        marks = []
        wait_for(lambda: _sent(client, "outages") >= 200, timeout_s=60, what="first sends")

        # 1. Every write refused (NOPERM) for a few seconds.
        _for_a_while(
            lambda: admin.execute_command("ACL", "SETUSER", "default", "-@write"),
            lambda: admin.execute_command("ACL", "SETUSER", "default", "+@all"),
            OUTAGE_S,
        )
        marks.append(_sent(client, "outages"))
        wait_for(lambda: _sent(client, "outages") >= marks[-1] + 150, timeout_s=60, what="sends")

        # 2. maxmemory reached (OOM on every write) for a few seconds.
        used = int(admin.info("memory")["used_memory"])
        _for_a_while(
            lambda: admin.config_set("maxmemory", str(max(1, used // 2))),
            lambda: admin.config_set("maxmemory", "0"),
            OUTAGE_S,
        )
        marks.append(_sent(client, "outages"))
        wait_for(lambda: _sent(client, "outages") >= marks[-1] + 150, timeout_s=60, what="sends")

        # 3. kill -9 and restart on the same port (AOF: nothing acknowledged is lost).
        server.kill()
        server.start()
        marks.append(_sent(client, "outages"))
        assert marks[-1] < TOTAL, "the campaign ended before the last fault: slow it down"

        final = pipeline.wait_done("outages", timeout_s=180)
        assert final.counts["sent"] == TOTAL and adds_up(final), final.to_dict()
        pipeline.sandbox.stop()
        counts = delivered(pipeline.sandbox.accepted())
        assert set(counts) == {f"o{i}@example.com" for i in range(TOTAL)}
        twice = {r: n for r, n in counts.items() if n > 1}
        assert not twice, f"sent twice by a live worker: {twice}"
        assert worker.alive() and worker.main_pid() == main_pid, "the worker was restarted"
        assert client.store.ledger_size("outages") == 0
    finally:
        admin.close()
        server.stop()
