"""ses-tasks end to end: a campaign enqueued, sent by real worker processes, all ``sent``.

Throughput is measured from the call that enqueues the campaign to the moment its status
says every message is final; worker CPU is read from /proc for every worker process (the
Celery main process and its pool children) before and after the run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from ses_tasks.config import Settings
from ses_tasks.produce.client import SesTasks

from .common import (
    HTML,
    SENDER,
    SUBJECT,
    TEXT,
    LeanSandbox,
    Workers,
    delete_prefix,
    new_prefix,
    note,
    pipeline_env,
)


def settings_from_env(env: dict[str, str]) -> Settings:
    fields: dict[str, Any] = {k.removeprefix("SES_TASKS_").lower(): v for k, v in env.items()}
    return Settings(**fields)


def batch_size_for(pool_size: int) -> int:
    """Ten messages per connection: per-batch costs (claim, finish, Celery) are amortised
    and the batch's last round (connections waiting for the slowest) is a tenth of it."""
    return max(50, min(500, 10 * pool_size))


class Ours:
    """ses-tasks workers for one configuration, reused across runs."""

    def __init__(
        self,
        sandbox: LeanSandbox,
        *,
        redis_url: str,
        workdir: Path,
        connections: int,
        processes: int,
        queues: str = "all",
        **extra_env: str,
    ) -> None:
        self.prefix = new_prefix("ours")
        pool_size = max(1, connections // processes)
        self.env = pipeline_env(
            sandbox,
            redis_url=redis_url,
            prefix=self.prefix,
            pool_size=pool_size,
            batch_size=batch_size_for(pool_size),
            **extra_env,
        )
        self.sandbox = sandbox
        self.redis = redis.Redis.from_url(redis_url)
        self.client = SesTasks(settings_from_env(self.env))
        self.workers = Workers(self.env, workdir, processes=processes, queues=queues)
        self.runs = 0

    def start(self) -> Ours:
        self.workers.start()
        try:
            self.workers.wait_ready()
            # Warm every process: pools are opened at process start; a first campaign
            # loads Celery, scripts and code paths.
            self.run(200, quiet=True)
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, count: int, *, quiet: bool = False) -> dict[str, Any]:
        self.runs += 1
        campaign_id = f"bench-{self.runs}-{time.monotonic_ns() % 10**9}"
        rows = [{"email": f"user{i}@example.com", "name": f"User {i}"} for i in range(count)]
        cpu0 = self.workers.cpu_s()
        sandbox_cpu0 = self.sandbox.cpu_s()
        started = time.perf_counter()
        self.client.send_campaign(
            from_=SENDER,
            subject=SUBJECT,
            text=TEXT,
            html=HTML,
            recipients=rows,
            campaign_id=campaign_id,
        )
        enqueued_s = time.perf_counter() - started
        deadline = time.monotonic() + 600
        while True:
            status = self.client.campaign_status(campaign_id)
            if status.done:
                break
            if time.monotonic() > deadline:
                note(self.workers.log_tail())
                raise TimeoutError(f"campaign {campaign_id} did not finish: {status.to_dict()}")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = self.workers.cpu_s() - cpu0
        sandbox_cpu = self.sandbox.cpu_s() - sandbox_cpu0
        sent = status.counts.get("sent", 0)
        if sent != count and not quiet:
            note(f"warning: {count - sent} of {count} not sent: {status.to_dict()}")
        return {
            "sent": sent,
            "elapsed_s": elapsed,
            "enqueue_s": enqueued_s,
            "msgs_per_s": sent / elapsed,
            "cpu_s_per_1000": 1000 * cpu / max(1, sent),
            "sandbox_cpu_s_per_1000": 1000 * sandbox_cpu / max(1, sent),
        }

    def stop(self) -> None:
        self.workers.stop()
        delete_prefix(self.redis, self.prefix)
        self.redis.close()
