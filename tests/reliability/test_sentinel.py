"""Redis Sentinel: a primary, a replica and a sentinel on 127.0.0.1, then a failover.

URL form (the same for SES_TASKS_BROKER_URL, SES_TASKS_RESULT_BACKEND, SES_TASKS_REDIS_URL):
``sentinel://127.0.0.1:PORT/0?master_name=mymaster`` (see ``ses_tasks.store.connections``).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from ses_tasks.produce.client import SesTasks
from ses_tasks.sandbox.embedded import WorkerProcess, free_port, wait_for
from ses_tasks.store.connections import async_redis, sync_redis

from .support import adds_up, delivered, records, seq_of

MASTER = "mymaster"

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")


class SentinelGroup:
    """A primary, a replica (``--replicaof``) and one sentinel (quorum 1), fast failover."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_port = free_port()
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, db: int = 0) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel_port}/{db}?master_name={MASTER}"

    def _server(self, name: str, *args: str) -> None:
        directory = self.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        self._processes[name] = subprocess.Popen(
            ["redis-server", *args, "--bind", "127.0.0.1", "--dir", str(directory),
             "--logfile", str(directory / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def start(self) -> SentinelGroup:
        self._server("primary", "--port", str(self.primary_port), "--save", "")
        self._server(
            "replica", "--port", str(self.replica_port), "--save", "",
            "--replicaof", "127.0.0.1", str(self.primary_port),
        )  # fmt: skip
        wait_for(self._replicating, timeout_s=30, what="the replica in sync")
        conf = self.workdir / "sentinel" / "sentinel.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f"port {self.sentinel_port}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 3000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self._server("sentinel", str(conf), "--sentinel")
        wait_for(self._watching, timeout_s=30, what="the sentinel to know both nodes")
        return self

    def _answers(self, port: int) -> redis.Redis | None:
        client = self.node(port)
        try:
            client.ping()
        except redis.ConnectionError:
            return None
        return client

    def _replicating(self) -> bool:
        replica = self._answers(self.replica_port)
        if replica is None or self._answers(self.primary_port) is None:
            return False
        return replica.info("replication").get("master_link_status") == "up"

    def _watching(self) -> bool:
        sentinel = self._answers(self.sentinel_port)
        if sentinel is None:
            return False
        try:
            replicas = sentinel.execute_command("SENTINEL", "REPLICAS", MASTER)
        except redis.ResponseError:
            return False
        return self.master_port() == self.primary_port and len(replicas) == 1

    def master_port(self) -> int | None:
        sentinel = self.node(self.sentinel_port)
        try:
            reply = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        except redis.ConnectionError:
            return None
        return int(reply[1]) if reply else None

    def master(self) -> redis.Redis:
        port = self.master_port()
        assert port is not None
        return self.node(port)

    def kill_primary(self) -> None:
        # Whatever was written must be on the replica first (replication is asynchronous).
        assert self.node(self.primary_port).execute_command("WAIT", 1, 5000) == 1
        process = self._processes["primary"]
        process.kill()
        process.wait(timeout=10)

    def wait_failover(self, timeout_s: float = 60) -> None:
        wait_for(
            lambda: (
                self.master_port() == self.replica_port
                and self.node(self.replica_port).info("replication")["role"] == "master"
            ),
            timeout_s=timeout_s,
            what="the sentinel to promote the replica",
        )

    def stop(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Any:
    group = SentinelGroup(tmp_path / "sentinel-group")
    try:
        yield group.start()
    finally:
        group.stop()


def _campaign(pipeline: Any, campaign_id: str, total: int) -> None:
    pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello {{ email }}",
        recipients=[f"{campaign_id}-{i}@example.com" for i in range(total)],
        campaign_id=campaign_id,
    )


def _log(worker: WorkerProcess) -> str:
    assert worker.log_path is not None
    return worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""


# Clients ------------------------------------------------------------------------------------


def test_clients_read_and_write_through_sentinel(sentinel_group: SentinelGroup):
    key = f"sentinel-test:{uuid.uuid4().hex}"
    client = sync_redis(sentinel_group.url(db=2))
    try:
        client.set(key, "v")
        assert client.get(key) == b"v"
    finally:
        client.close()
    # It went to the primary, database 2.
    direct = redis.Redis(port=sentinel_group.primary_port, db=2)
    assert direct.get(key) == b"v"

    async def through_async() -> bytes | None:
        aclient = async_redis(sentinel_group.url(db=2))
        try:
            await aclient.set(f"{key}:async", "w")
            return await aclient.get(key)
        finally:
            await aclient.aclose()

    assert asyncio.run(through_async()) == b"v"
    assert direct.get(f"{key}:async") == b"w"


def test_clients_follow_a_failover(sentinel_group: SentinelGroup):
    client = sync_redis(sentinel_group.url())
    client.set("before", "1")
    sentinel_group.kill_primary()
    sentinel_group.wait_failover()

    def writes() -> bool:
        try:
            return bool(client.set("after", "2"))
        except redis.ConnectionError:
            return False  # the old primary's connection, then the new one

    wait_for(writes, timeout_s=30, what="a write through the new primary")
    new_primary = sentinel_group.node(sentinel_group.replica_port)
    assert new_primary.get("before") == b"1" and new_primary.get("after") == b"2"
    client.close()


def test_status_store_through_sentinel(sentinel_group: SentinelGroup, key_prefix: str):
    """Needs SesTasks.redis built with ``connections.sync_redis`` (client.py)."""
    from ses_tasks.config import load_settings

    client = SesTasks(load_settings(redis_url=sentinel_group.url(), key_prefix=key_prefix))
    client.suppression.add(["bounced@example.com"], reason="test")
    assert [e.email for e in client.suppression] == ["bounced@example.com"]
    (claim,) = client.store.claim(
        "transactional", [("transactional.abc", "a@example.com", False)], lease_s=5, token="t"
    ).claims
    assert claim.go
    assert client.store.campaign_status("transactional").total == 1
    primary = sentinel_group.node(sentinel_group.primary_port)
    assert primary.exists(client.store.keys.campaign("transactional"))


# A worker on a sentinel broker ---------------------------------------------------------------


def _sentinel_pipeline(make_pipeline: Any, group: SentinelGroup, **env: str) -> Any:
    return make_pipeline(
        "tls",
        **{
            "SES_TASKS_BROKER_URL": group.url(),
            "SES_TASKS_RESULT_BACKEND": group.url(),
            "SES_TASKS_MAX_SEND_RATE": "500",
            **env,
        },
    )


def _start_worker(pipeline: Any) -> tuple[WorkerProcess, int]:
    worker = pipeline.start_worker(concurrency=2)
    wait_for(lambda: " ready." in _log(worker), timeout_s=60, what="the worker to be ready")
    main = worker.main_pid()
    assert main is not None
    return worker, main


def test_worker_consumes_from_a_sentinel_broker(sentinel_group: SentinelGroup, make_pipeline):
    """Broker and result backend through the sentinel; the status store on the shared Redis."""
    pipeline = _sentinel_pipeline(make_pipeline, sentinel_group)
    worker, _ = _start_worker(pipeline)
    assert f"sentinel://127.0.0.1:{sentinel_group.sentinel_port}" in _log(worker)
    _campaign(pipeline, "via-sentinel", 120)
    final = pipeline.wait_done("via-sentinel", timeout_s=120)
    assert final.counts["sent"] == 120 and adds_up(final)
    # The broker's keys (with our prefix) and the task results are on the primary.
    primary = sentinel_group.node(sentinel_group.primary_port)
    prefix = pipeline.env["SES_TASKS_KEY_PREFIX"]
    assert list(primary.scan_iter(match=f"{prefix}:broker:*", count=1000))
    assert list(primary.scan_iter(match="celery-task-meta-*", count=1000))


def test_worker_keeps_consuming_through_a_sentinel_failover(
    sentinel_group: SentinelGroup, make_pipeline
):
    pipeline = _sentinel_pipeline(make_pipeline, sentinel_group)
    worker, main = _start_worker(pipeline)
    _campaign(pipeline, "before-failover", 60)
    assert pipeline.wait_done("before-failover", timeout_s=120).counts["sent"] == 60
    sentinel_group.kill_primary()
    sentinel_group.wait_failover()
    # The producer's publish and the worker's consumer both find the new primary.
    _campaign(pipeline, "after-failover", 60)
    final = pipeline.wait_done("after-failover", timeout_s=120)
    assert final.counts["sent"] == 60 and adds_up(final)
    log = _log(worker)
    assert "Connection to broker lost" in log, "the worker must have lived through it"
    assert worker.main_pid() == main and "Unrecoverable" not in log, log[-4000:]
    new_primary = sentinel_group.node(sentinel_group.replica_port)
    prefix = pipeline.env["SES_TASKS_KEY_PREFIX"]
    assert list(new_primary.scan_iter(match=f"{prefix}:broker:*", count=1000))


def test_everything_through_sentinel_survives_a_failover(
    sentinel_group: SentinelGroup, make_pipeline
):
    """Broker, results and the status store all on the sentinel group, then a failover.

    Needs SesTasks.redis (client.py) and WorkerRuntime.redis (workers/runtime.py) built
    with ``ses_tasks.store.connections``.
    """
    pipeline = _sentinel_pipeline(
        make_pipeline, sentinel_group, SES_TASKS_REDIS_URL=sentinel_group.url()
    )
    worker, main = _start_worker(pipeline)
    _campaign(pipeline, "all-before", 60)
    assert pipeline.wait_done("all-before", timeout_s=120).counts["sent"] == 60
    sentinel_group.kill_primary()
    sentinel_group.wait_failover()
    _campaign(pipeline, "all-after", 60)
    final = pipeline.wait_done("all-after", timeout_s=120)
    assert final.counts["sent"] == 60 and adds_up(final)
    assert pipeline.client.campaign_status("all-before").counts["sent"] == 60
    assert worker.main_pid() == main and "Unrecoverable" not in _log(worker)


def test_a_failover_in_the_middle_of_a_campaign(sentinel_group: SentinelGroup, make_pipeline):
    """1,500 recipients, everything on the sentinel group, the primary killed mid-send.

    Replication is asynchronous: writes acknowledged by the old primary after its last
    replication can be lost. What must hold: the campaign completes, every recipient gets
    the message, a second copy only for a message recorded ``recovered``, the same worker.
    """
    total = 1500
    pipeline = _sentinel_pipeline(
        make_pipeline,
        sentinel_group,
        SES_TASKS_REDIS_URL=sentinel_group.url(),
        SES_TASKS_MAX_SEND_RATE="150",
        SES_TASKS_CLAIM_LEASE_S="10",
        SES_TASKS_SWEEP_INTERVAL_S="1",
        SES_TASKS_REDELIVER_AFTER_S="20",
    )
    worker, main = _start_worker(pipeline)
    _campaign(pipeline, "mid-failover", total)
    client = pipeline.client

    def sent() -> int:
        try:
            return int(client.campaign_status("mid-failover").counts["sent"])
        except Exception:
            return 0

    wait_for(lambda: sent() >= 300, timeout_s=60, what="first sends")
    sentinel_group.kill_primary()
    sentinel_group.wait_failover()
    assert sent() < total, "the campaign ended before the failover: slow it down"
    final = pipeline.wait_done("mid-failover", timeout_s=240)
    assert final.counts["sent"] == total and adds_up(final), final.to_dict()
    pipeline.sandbox.stop()
    counts = delivered(pipeline.sandbox.accepted())
    assert len(counts) == total
    by_seq = records(client, "mid-failover", total)
    for email, n in counts.items():
        if n > 1:
            record = by_seq[seq_of(email)]
            assert record is not None and record.recovered, (email, n, record)
    assert worker.main_pid() == main and "Unrecoverable" not in _log(worker)
