"""Shutdown while a fleet loop is publishing: nothing it took waits out a long timeout.

The sweeper takes a past-due ledger entry (pushing its due time out by REDELIVER_AFTER_S)
and publishes it; when the process stops mid-publish (the broker is down, kombu retries),
the entry must be due again at once, so the next sweeper publishes it now, not in 2 hours.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import redis

from ses_tasks.config import Settings
from ses_tasks.store.tracking import StatusStore
from ses_tasks.worker import runtime as runtime_module
from ses_tasks.worker.delivery import BatchItem, BatchJob
from ses_tasks.worker.runtime import WorkerRuntime

from ..conftest import REDIS_URL


def test_a_sweeper_stopped_mid_publish_leaves_its_batch_due_now(monkeypatch):
    monkeypatch.setattr(runtime_module, "FLEET_STOP_S", 1.0)
    prefix = f"handover-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(REDIS_URL)
    settings = Settings(
        redis_url=REDIS_URL,
        key_prefix=prefix,
        host="127.0.0.1",
        port=1,
        mode="starttls",
        username="u",
        password="p",
        sweep_interval_s=0.2,
    )
    store = StatusStore(r, key_prefix=prefix, retention_s=3600)
    keys = store.keys
    store.create_campaign("c1", template={"from": "a@example.com", "subject": "s", "text": "t"})
    job = BatchJob("c1", (BatchItem(0, "x@example.com"),), "b0")
    r.hset(keys.batches("c1"), "b0", json.dumps(job.payload()))
    r.zadd(keys.due("c1"), {"b0": 0})  # past due: its worker died
    r.zadd(keys.active(), {"c1": 0})
    publishing = threading.Event()
    release = threading.Event()

    def publish(_: BatchJob) -> None:  # the broker is down: kombu keeps retrying
        publishing.set()
        release.wait(30)
        raise ConnectionError("broker down")

    rt = WorkerRuntime(settings)
    try:
        rt.start_fleet_loops(publish)
        assert publishing.wait(10), "the sweeper never took the batch"
        # Taken: due only after REDELIVER_AFTER_S now, unless the handover works.
        assert r.zscore(keys.due("c1"), "b0") / 1000 - time.time() > 600
        started = time.monotonic()
        rt.close()  # SIGTERM arrives
        assert time.monotonic() - started < 15
        due_in = r.zscore(keys.due("c1"), "b0") / 1000 - time.time()
        assert due_in < 5, f"taken, never published, and due only in {due_in:.0f} s"
    finally:
        release.set()
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)
