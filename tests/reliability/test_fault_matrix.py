"""The fault matrix: every Redis and broker call site on the send path x every error class.

A real worker process talks to Redis (status store, limiter, quota, broker, results) through
a fault-injecting proxy; the producer and the test read Redis directly. For each row (a call
site, matched on the wire) and column (an error class), one campaign runs while the fault
fires at the first, a middle and the last call of that site. After it, the invariants:

- the campaign completes and its counters add up;
- the endpoint received every recipient exactly once (a live worker never sends twice);
- every message is ``sent``; nothing is left ``sending``; the batch ledger is empty;
- the worker is still running: the same Celery main process.

The endpoint answers some sends with 454 (throttle) and 451 (transient) at random, so the
throttle, quota-release and follow-up publish sites are reached too. A new call site is
one row in ``SITES``.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from ses_tasks.limits.ratelimit import load_lua
from ses_tasks.produce.client import SesTasks
from ses_tasks.sandbox.embedded import SandboxProcess, WorkerProcess, wait_for
from ses_tasks.store.tracking import CLAIM_LUA, COUNTERS, FINISH_LUA
from tests.conftest import REDIS_URL, delete_prefix, settings_from_env
from tests.faults import (
    Action,
    Match,
    RedisFaultProxy,
    after_forward_close,
    close,
    command,
    error,
    hang,
    script,
)

pytestmark = pytest.mark.slow

RECIPIENTS = 60
BATCH_SIZE = 10
SOCKET_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Site:
    name: str
    match: Callable[[str], Match]
    #: Calls of this site in a campaign without faults (measured once, per module).
    needs_failures: bool = False


def _key_endswith(suffix: bytes, *names: str) -> Callable[[str], Match]:
    return lambda prefix: command(
        *names, where=lambda args: len(args) > 1 and bytes(args[1]).endswith(suffix)
    )


def _key_startswith(head: str, *names: str) -> Callable[[str], Match]:
    def make(prefix: str) -> Match:
        want = head.format(prefix=prefix).encode()
        return command(*names, where=lambda args: len(args) > 1 and bytes(args[1]).startswith(want))

    return make


SITES = [
    Site("claim", lambda p: script(CLAIM_LUA)),
    Site("template", _key_endswith(b":template", "GET")),
    Site("suppression", _key_endswith(b":suppressed", "HMGET")),
    Site("quota consume", lambda p: script(load_lua("quota_common.lua", "quota_consume.lua"))),
    Site(
        "quota release",
        lambda p: script(load_lua("quota_common.lua", "quota_release.lua")),
        needs_failures=True,
    ),
    Site(
        "limiter acquire",
        lambda p: script(load_lua("ratelimit_common.lua", "ratelimit_acquire.lua")),
    ),
    Site(
        "limiter throttle",
        lambda p: script(load_lua("ratelimit_common.lua", "ratelimit_throttle.lua")),
        needs_failures=True,
    ),
    Site("finish", lambda p: script(FINISH_LUA)),
    Site("follow-up publish", _key_startswith("{prefix}:broker:", "LPUSH"), needs_failures=True),
    Site("result backend", _key_startswith("celery-task-meta-", "SET", "SETEX", "PUBLISH")),
]

ERRORS: dict[str, Callable[[], Action]] = {
    "connection": close,
    "reply lost": after_forward_close,
    "hung socket": hang,
    "READONLY": lambda: error("READONLY You can't write against a read only replica."),
    "OOM": lambda: error("OOM command not allowed when used memory > 'maxmemory'."),
    "NOPERM": lambda: error("NOPERM this user has no permissions to run the 'evalsha' command"),
    "script error": lambda: error(
        "ERR Error running script (call to f_0): @user_script:1: injected failure"
    ),
}


@dataclass
class Bench:
    workdir: Path
    prefix: str
    proxy: RedisFaultProxy
    sandbox: SandboxProcess
    worker: WorkerProcess
    env: dict[str, str]
    main_pid: int
    counter: Iterator[int]

    @property
    def client(self) -> SesTasks:
        return SesTasks(settings_from_env(self.env))


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    workdir = tmp_path_factory.mktemp("fault-matrix")
    prefix = f"test-fm-{uuid.uuid4().hex[:10]}"
    proxy = RedisFaultProxy().start()
    sandbox = SandboxProcess(
        workdir,
        args=["--throttle-rate", "0.1", "--temp-fail-rate", "0.1", "--seed", "7"],
    ).start()
    env = {
        **sandbox.settings_env("tls"),
        "SES_TASKS_REDIS_URL": REDIS_URL,
        "SES_TASKS_BROKER_URL": REDIS_URL,
        "SES_TASKS_KEY_PREFIX": prefix,
        "SES_TASKS_MAX_SEND_RATE": "2000",
        "SES_TASKS_POOL_SIZE": "4",
        "SES_TASKS_BATCH_SIZE": str(BATCH_SIZE),
        "SES_TASKS_RETRY_BASE_S": "0.1",
        "SES_TASKS_RETRY_MAX_S": "1",
        "SES_TASKS_THROTTLE_RETRY_S": "0.1",
        "SES_TASKS_MAX_ATTEMPTS": "20",
        "SES_TASKS_CLAIM_LEASE_S": "20",
        "SES_TASKS_STORE_RETRY_S": "15",
        "SES_TASKS_SWEEP_INTERVAL_S": "1",
        "SES_TASKS_REDELIVER_AFTER_S": "10",
        "SES_TASKS_VISIBILITY_TIMEOUT_S": "30",
        "SES_TASKS_REDIS_SOCKET_TIMEOUT_S": str(SOCKET_TIMEOUT_S),
    }
    worker_env = {
        **env,
        "SES_TASKS_REDIS_URL": proxy.url_like(REDIS_URL),
        "SES_TASKS_BROKER_URL": proxy.url_like(REDIS_URL),
    }
    worker = WorkerProcess(
        env=worker_env, mode="tls", concurrency=1, log_path=workdir / "worker.log"
    ).start()
    main_pid = wait_for(worker.main_pid, timeout_s=30, what="Celery's main process")
    b = Bench(workdir, prefix, proxy, sandbox, worker, env, main_pid, itertools.count())
    try:
        run_campaign(b)  # warm: connections, templates cached, scripts loaded
        yield b
    finally:
        worker.stop(timeout_s=20)
        sandbox.stop()
        proxy.stop()
        client = redis.Redis.from_url(REDIS_URL)
        delete_prefix(client, prefix)
        client.close()


def run_campaign(b: Bench) -> tuple[str, list[str]]:
    n = next(b.counter)
    campaign_id = f"fm{n}"
    emails = [f"r{i}@m{n}.example.com" for i in range(RECIPIENTS)]
    b.client.send_campaign(
        from_="news@example.com",
        subject="Hello {{ email }}",
        text="Hi",
        recipients=[{"email": e} for e in emails],
        campaign_id=campaign_id,
    )
    return campaign_id, emails


def check_invariants(b: Bench, campaign_id: str, emails: list[str], what: str) -> None:
    client = b.client

    def done() -> Any:
        status = client.campaign_status(campaign_id)
        return status if status.done else None

    try:
        status = wait_for(done, timeout_s=90, interval_s=0.1, what=f"{what}: {campaign_id}")
    except TimeoutError:
        print(client.campaign_status(campaign_id).to_dict())
        print((b.workdir / "worker.log").read_text(errors="replace")[-6000:])
        raise
    assert sum(status.counts[name] for name in COUNTERS) == status.total == len(emails)
    assert status.counts["sent"] == len(emails), (what, status.to_dict())
    domain = emails[0].split("@")[1]

    def all_delivered() -> Counter[str] | None:
        got = Counter(
            r for m in b.sandbox.accepted() for r in m["rcpt_tos"] if r.endswith("@" + domain)
        )
        return got if len(got) == len(emails) else None

    delivered = wait_for(all_delivered, timeout_s=15, what=f"{what}: deliveries")
    twice = {r: c for r, c in delivered.items() if c > 1}
    assert not twice, f"{what}: a live worker sent twice: {twice}"
    assert client.store.ledger_size(campaign_id) == 0, f"{what}: batches left unsettled"
    assert b.worker.alive(), f"{what}: the worker exited"
    assert b.worker.main_pid() == b.main_pid, f"{what}: Celery's main process was restarted"


@pytest.mark.parametrize("error_name", list(ERRORS))
@pytest.mark.parametrize("site", SITES, ids=[s.name for s in SITES])
def test_fault_at_first_middle_and_last_call(bench: Bench, site: Site, error_name: str) -> None:
    proxy = bench.proxy
    match = site.match(bench.prefix)
    proxy.clear()
    proxy.reset_stats()
    # The calls this site makes in a clean campaign, to place "middle" and "last".
    campaign_id, emails = run_campaign(bench)
    check_invariants(bench, campaign_id, emails, f"{site.name} (clean)")
    calls = proxy.calls(match)
    if calls == 0:
        pytest.fail(f"{site.name}: no call seen on the wire in a campaign; fix the row's match")
    positions = sorted({1, max(1, (calls + 1) // 2), calls})
    rules = [
        proxy.add_rule(match, ERRORS[error_name](), nth=nth, label=f"{site.name}@{nth}")
        for nth in positions
    ]
    campaign_id, emails = run_campaign(bench)
    check_invariants(bench, campaign_id, emails, f"{site.name} x {error_name}")
    proxy.clear()
    assert rules[0].fired == 1, f"{site.name} x {error_name}: the first-call fault never fired"
