"""Shared fixtures: real Redis with a private key prefix per test, and a process pipeline."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from ses_tasks.config import Settings
from ses_tasks.produce.client import SesTasks
from ses_tasks.sandbox.embedded import SandboxProcess, WorkerProcess, wait_for
from ses_tasks.store.tracking import CampaignStatus

REDIS_URL = os.environ.get("SES_TASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefix(redis_client, prefix)


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings from a test's environment dict (``PROFILES__<P>__<F>`` nested, as in env)."""
    values: dict[str, Any] = {}
    for key, value in env.items():
        name, *nested = key.removeprefix("SES_TASKS_").lower().split("__")
        if nested:
            profile, field_name = nested
            values.setdefault(name, {}).setdefault(profile, {})[field_name] = value
        else:
            values[name] = value
    return Settings(**values)


@dataclass
class Pipeline:
    """The sandbox, a status store and worker processes, wired with one environment."""

    workdir: Path
    sandbox: SandboxProcess
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return settings_from_env(self.env)

    @property
    def client(self) -> SesTasks:
        return SesTasks(self.settings)

    def start_worker(
        self, *, concurrency: int = 2, queues: str = "all", **env: str
    ) -> WorkerProcess:
        worker = WorkerProcess(
            env={**self.env, **env},
            mode=self.env["SES_TASKS_MODE"],
            concurrency=concurrency,
            queues=queues,
            log_path=self.workdir / f"worker-{len(self.workers)}.log",
        ).start()
        self.workers.append(worker)
        return worker

    def wait_done(self, campaign_id: str, *, timeout_s: float = 120) -> CampaignStatus:
        client = self.client

        def done() -> CampaignStatus | None:
            status = client.campaign_status(campaign_id)
            return status if status.done else None

        try:
            return wait_for(done, timeout_s=timeout_s, interval_s=0.1, what=f"{campaign_id}")
        except TimeoutError:
            print(client.campaign_status(campaign_id).to_dict())
            for worker in self.workers:
                if worker.log_path and worker.log_path.exists():
                    print(worker.log_path.read_text()[-5000:])
            raise

    def accepted(self, *, at_least: int, timeout_s: float = 15) -> list[dict[str, Any]]:
        """The sandbox's store once it holds ``at_least`` messages (written before each 250)."""

        def enough() -> list[dict[str, Any]] | None:
            accepted = self.sandbox.accepted()
            return accepted if len(accepted) >= at_least else None

        return wait_for(
            enough,
            timeout_s=timeout_s,
            what=f"{at_least} messages in the sandbox store",
        )

    def worker_logs(self) -> str:
        return "\n".join(
            w.log_path.read_text(errors="replace")
            for w in self.workers
            if w.log_path and w.log_path.exists()
        )


@pytest.fixture
def make_pipeline(tmp_path: Path, key_prefix: str) -> Iterator[Any]:
    pipelines: list[Pipeline] = []

    def make(mode: str = "tls", sandbox_args: list[str] | None = None, **env: str) -> Pipeline:
        sandbox = SandboxProcess(tmp_path, args=sandbox_args or []).start()
        base = {
            **sandbox.settings_env(mode),
            "SES_TASKS_REDIS_URL": REDIS_URL,
            "SES_TASKS_BROKER_URL": REDIS_URL,
            "SES_TASKS_KEY_PREFIX": key_prefix,
            "SES_TASKS_MAX_SEND_RATE": "2000",
            "SES_TASKS_POOL_SIZE": "4",
            "SES_TASKS_BATCH_SIZE": "50",
            "SES_TASKS_RETRY_BASE_S": "0.2",
            "SES_TASKS_RETRY_MAX_S": "2",
            "SES_TASKS_THROTTLE_RETRY_S": "0.2",
            "SES_TASKS_CLAIM_LEASE_S": "5",
            "SES_TASKS_VISIBILITY_TIMEOUT_S": "30",
            **env,
        }
        pipeline = Pipeline(tmp_path, sandbox, base)
        pipelines.append(pipeline)
        return pipeline

    yield make
    for pipeline in pipelines:
        for worker in pipeline.workers:
            worker.stop(timeout_s=20)
        pipeline.sandbox.stop()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@contextlib.contextmanager
def env_vars(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
