"""The workers page: live worker processes with their queues and pool connections, from
the heartbeats they write; silent ones marked stale, cleanly stopped ones gone."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import redis

from ses_tasks.keys import Keys
from ses_tasks.queue.app import bulk_queue, transactional_queue
from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.smtp.endpoint import PortMode

from .admin_support import Node, dashboard, page


def _workers(main: Node) -> dict[str, Node]:
    table = main.one("table", id="workers")
    return {tr.attrs["data-worker"]: tr for tr in table.select("tr") if "data-worker" in tr.attrs}


def test_a_running_worker_is_listed_with_its_queues_and_pool(make_pipeline: Any) -> None:
    pipeline = make_pipeline("tls")
    worker = pipeline.start_worker(concurrency=1, queues="all")
    host = socket.gethostname()
    prefix = pipeline.env["SES_TASKS_KEY_PREFIX"]
    with dashboard(prefix) as client:

        def listed() -> dict[str, Node] | None:
            rows = _workers(page(client, "/workers", "workers"))
            return rows or None

        rows = wait_for(listed, timeout_s=60, interval_s=0.2, what="the worker's heartbeat row")
        assert len(rows) == 1  # one pool process
        key, row = next(iter(rows.items()))
        node = key.partition("/")[0]
        assert node.startswith("w") and node.endswith(f"@{host}")  # the Celery node name
        assert "stale" not in row.classes
        assert row.cell("node") == node
        assert row.cell("host") == host
        assert int(row.cell("pid")) in worker.child_pids()
        queues = row.cell("queues").split(", ")
        assert sorted(queues) == sorted(
            [bulk_queue(PortMode.TLS), transactional_queue(PortMode.TLS)]
        )
        assert row.cell("lanes") == "bulk, transactional"
        assert row.cell("pool").startswith("default: ") and "of 4" in row.cell("pool")
        seen = float(row.one("td", cls="seen").attrs["data-seconds"])
        assert 0 <= seen < 3 * 2.0

        worker.stop(timeout_s=30)  # a clean stop removes the row at once
        assert _workers(page(client, "/workers", "workers")) == {}


def test_silent_workers_are_marked_stale(redis_client: redis.Redis, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    now_ms = int(time.time() * 1000)

    def beat(token: str, age_s: float, *, counted: bool, node: str) -> None:
        at_ms = now_ms - int(age_s * 1000)
        redis_client.zadd(keys.workers_seen(), {token: at_ms})
        if counted:  # the dispatcher's window still counts it
            redis_client.zadd(keys.workers(), {f"{token}|2": at_ms + 6000})
        info = {
            "node": node,
            "host": "box",
            "pid": 7,
            "queues": ["q<script>"],
            "capacity": 2,
            "pools": [{"profile": "", "size": 4, "in_use": 1, "idle": 2, "waiting": 0}],
        }
        redis_client.set(keys.worker_info(token), json.dumps(info))

    beat("1-aaaa", 0.5, counted=True, node="alive@box")
    beat("2-bbbb", 40, counted=False, node="dead@box")
    with dashboard(key_prefix) as client:
        response = client.get("/workers")
        main = page(client, "/workers", "workers")
    rows = _workers(main)
    assert list(rows) == ["alive@box/1-aaaa", "dead@box/2-bbbb"]  # live ones first
    alive, dead = rows["alive@box/1-aaaa"], rows["dead@box/2-bbbb"]
    assert "stale" not in alive.classes and "stale" in dead.classes
    assert float(dead.one("td", cls="seen").attrs["data-seconds"]) >= 40
    assert alive.cell("pool") == "default: 1 in use, 2 idle of 4"
    assert alive.cell("queues") == "q<script>"  # text, escaped in the HTML
    assert "q<script>" not in response.text and "q&lt;script&gt;" in response.text
    assert main.one(id="workers-alive").text == "1"


def test_no_heartbeat_says_so(key_prefix: str) -> None:
    with dashboard(key_prefix) as client:
        main = page(client, "/workers", "workers")
    assert _workers(main) == {}
    assert main.one(id="no-workers")
