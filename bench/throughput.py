"""ses-tasks end to end: a campaign enqueued, sent by real worker processes, all ``sent``.

Throughput is measured from the call that enqueues the campaign to the moment its status
says every message is final; worker CPU is read from /proc for every worker process (the
Celery main process and its pool children) before and after the run.

The send phase: the sandbox's fast mode keeps no per-message record, so it is read from the
campaign status, polled every 20 ms: from the first poll that shows a message ``sent`` to
the poll that shows every message final. Its rate counts only the messages sent in between
(``sent`` at the end minus ``sent`` at that first poll), so the poll lag, alike at both
ends, does not bias it; it leaves out the enqueue, the claim and the first message's round
trips. The I/O floor and nodemailer have exact timestamps and count messages / (first send
to last completion); for a steady flow both are the same rate.

Redis CPU: the server's CPU over the same interval as the worker CPU (``RedisCpu``), which
includes the producer's enqueue and the status polls; ``redis_idle_cpu_ms_per_s`` is Redis's
CPU rate in the 0.5 s before the run (other clients, idle Celery polling).
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
    RedisCpu,
    Workers,
    cpu_delta,
    delete_prefix,
    new_prefix,
    note,
    pipeline_env,
)

#: How often the campaign status is polled during a run.
POLL_S = 0.02
#: How long Redis's background CPU is sampled before each run.
IDLE_SAMPLE_S = 0.5


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


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
        self.redis_cpu = RedisCpu(self.redis)
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
        idle_cpu_ms_per_s = None if quiet else self._redis_idle_cpu_ms_per_s()
        cpu0 = self.workers.cpu_s()
        sandbox_cpu0 = self.sandbox.cpu_s()
        redis_cpu0 = self.redis_cpu.sample()
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
        # The send phase, seen through the campaign status: the first poll that shows a
        # message sent (time and count) to the poll that shows every message final.
        first_sent_at: float | None = None
        first_sent_count = 0
        while True:
            status = self.client.campaign_status(campaign_id)
            polled_at = time.perf_counter()
            if first_sent_at is None and status.counts.get("sent", 0) > 0:
                first_sent_at = polled_at
                first_sent_count = status.counts.get("sent", 0)
            if status.done:
                break
            if time.monotonic() > deadline:
                note(self.workers.log_tail())
                raise TimeoutError(f"campaign {campaign_id} did not finish: {status.to_dict()}")
            time.sleep(POLL_S)
        elapsed = polled_at - started
        cpu = self.workers.cpu_s() - cpu0
        sandbox_cpu = self.sandbox.cpu_s() - sandbox_cpu0
        redis_cpu, redis_cpu_proc = cpu_delta(redis_cpu0, self.redis_cpu.sample())
        sent = status.counts.get("sent", 0)
        if sent != count and not quiet:
            note(f"warning: {count - sent} of {count} not sent: {status.to_dict()}")
        send_phase_s = None if first_sent_at is None else polled_at - first_sent_at
        send_phase_msgs_per_s = (
            (sent - first_sent_count) / send_phase_s if send_phase_s else float("nan")
        )
        per_1000 = 1000 / max(1, sent)
        return {
            "sent": sent,
            "elapsed_s": elapsed,
            "enqueue_s": enqueued_s,
            "msgs_per_s": sent / elapsed,
            "send_phase_s": send_phase_s,
            "send_phase_msgs_per_s": send_phase_msgs_per_s,
            "cpu_s_per_1000": cpu * per_1000,
            "redis_cpu_s_per_1000": _nan_if_none(redis_cpu) * per_1000,
            "redis_cpu_proc_s_per_1000": _nan_if_none(redis_cpu_proc) * per_1000,
            "worker_plus_redis_cpu_s_per_1000": (cpu + _nan_if_none(redis_cpu)) * per_1000,
            "redis_idle_cpu_ms_per_s": _nan_if_none(idle_cpu_ms_per_s),
            "sandbox_cpu_s_per_1000": sandbox_cpu * per_1000,
        }

    def _redis_idle_cpu_ms_per_s(self) -> float | None:
        """Redis CPU while nothing of this benchmark sends (our workers idle), in ms per
        second: the background that the run's Redis CPU also contains."""
        before = self.redis_cpu.sample()
        t0 = time.perf_counter()
        time.sleep(IDLE_SAMPLE_S)
        used = cpu_delta(before, self.redis_cpu.sample())[0]
        return None if used is None else 1000 * used / (time.perf_counter() - t0)

    def stop(self) -> None:
        self.workers.stop()
        delete_prefix(self.redis, self.prefix)
        self.redis.close()
