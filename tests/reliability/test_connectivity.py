"""Workers survive broker and store outages: Redis restarts, Redis refusing writes, a dead
Celery main process; one factory for Redis clients; an app that reads no environment at
import.

The worker tests run ``ses-tasks worker`` (the supervisor, its Celery main process and the
prefork pool) against a private ``redis-server`` they kill, restart and reconfigure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis

from ses_tasks.config import Settings, load_settings, redact_url
from ses_tasks.errors import ConfigurationError
from ses_tasks.queue.app import PUBLISH_RETRY_POLICY, celery_config
from ses_tasks.sandbox.embedded import WorkerProcess, wait_for
from ses_tasks.store.connections import (
    DEFAULT_SOCKET_TIMEOUT_S,
    HEALTH_CHECK_INTERVAL_S,
    SentinelURL,
    async_redis,
    celery_url,
    parse_sentinel_url,
    sync_redis,
)

from ..conftest import REDIS_URL
from .support import PrivateRedis, adds_up

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-pa55"


def _python(code: str, *, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


# The app reads no environment at import ------------------------------------------------------


def test_importing_the_package_reads_no_environment():
    """A worker-only setting that is wrong must not break ``import`` in a web process."""
    result = _python(
        """
        import ses_tasks.integrations.django, ses_tasks.queue.app, ses_tasks.queue.tasks
        from ses_tasks.queue.app import app
        from ses_tasks.errors import ConfigurationError
        assert not app.configured
        try:
            app.conf.broker_url
        except ConfigurationError as exc:
            print("on first use:", exc)
        else:
            raise SystemExit("the bad setting went unnoticed")
        """,
        env={"SES_TASKS_PORT": "1234"},
    )
    assert result.returncode == 0, result.stderr
    assert "on first use: PORT:" in result.stdout


def test_lazy_app_takes_the_broker_from_the_settings_when_first_used():
    result = _python(
        """
        import os
        from ses_tasks.queue.app import app, BATCH_TASK
        import ses_tasks.queue.tasks
        os.environ["SES_TASKS_BROKER_URL"] = "redis://127.0.0.1:6379/3"
        print(app.conf.broker_url, app.conf.task_acks_late)
        app.finalize()
        print(BATCH_TASK in app.tasks)
        """,
        env={"SES_TASKS_BROKER_URL": "redis://127.0.0.1:6379/1"},
    )
    assert result.returncode == 0, result.stderr
    # Read when first used (after the change above), not when imported.
    assert result.stdout.split() == ["redis://127.0.0.1:6379/3", "True", "True"]


# Sentinel URLs ---------------------------------------------------------------------------


def test_sentinel_url_forms():
    one = parse_sentinel_url("sentinel://127.0.0.1:26379/2?master_name=mymaster")
    assert one == SentinelURL(sentinels=(("127.0.0.1", 26379),), master_name="mymaster", db=2)
    many = parse_sentinel_url(
        f"sentinel://app:{SECRET}@10.0.0.1:26379;sentinel://10.0.0.2:26380;"
        "sentinel://10.0.0.3/4?master_name=m1"
    )
    assert many.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (many.db, many.username, many.password, many.master_name) == (4, "app", SECRET, "m1")
    # kombu and Celery read credentials and database from the first URL: every part has them.
    assert many.celery_url() == (
        f"sentinel://app:{SECRET}@10.0.0.1:26379/4;sentinel://app:{SECRET}@10.0.0.2:26380/4;"
        f"sentinel://app:{SECRET}@10.0.0.3:26379/4"
    )
    assert celery_url("redis://h:6379/0") == ("redis://h:6379/0", None)
    assert celery_url("sentinel://h:1/0?master_name=x") == ("sentinel://h:1/0", "x")
    assert SECRET not in repr(many)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"sentinel://:{SECRET}@h:26379/0", "no master name"),
        (f"sentinel://:{SECRET}@h:26379/x?master_name=m", "not a number"),
        (f"sentinel://:{SECRET}@h:port/0?master_name=m", "malformed"),
        (f"sentinel://:{SECRET}@h:1;redis://h:2/0?master_name=m", "every part"),
        (f"sentinel://:{SECRET}@h:1/0;sentinel://h:2/1?master_name=m", "different databases"),
        (f"sentinel://:{SECRET}@h:1/0?master_name=m&ssl=1", "unsupported option(s) ssl"),
    ],
)
def test_bad_sentinel_urls_are_one_clear_error_without_the_password(url: str, problem: str):
    with pytest.raises(ConfigurationError) as info:
        parse_sentinel_url(url, setting="BROKER_URL")
    assert problem in str(info.value) and str(info.value).startswith("BROKER_URL: ")
    assert SECRET not in str(info.value)


def test_settings_repr_redacts_every_sentinel_password():
    url = f"sentinel://u:{SECRET}@h1:1;sentinel://u:{SECRET}@h2:2/0?master_name=m"
    settings = load_settings(broker_url=url, redis_url=url)
    assert SECRET not in repr(settings)
    assert redact_url(url) == "sentinel://u:***@h1:1;sentinel://u:***@h2:2/0?master_name=m"
    assert redact_url(f"redis://u:{SECRET}@h:port/0") == "***"


# One factory for Redis clients ---------------------------------------------------------------


def test_sync_and_async_clients_have_timeouts_keepalive_and_health_checks(key_prefix: str):
    settings = Settings(redis_socket_timeout_s=4.5)
    client = sync_redis(REDIS_URL, settings=settings)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 4.5
    assert kwargs["socket_keepalive"] is True
    assert kwargs["health_check_interval"] == HEALTH_CHECK_INTERVAL_S
    # No retry of a timed-out command (it may have run); one of a dropped connection.
    retry = kwargs["retry"]
    assert retry._retries == 1 and redis.TimeoutError not in retry._supported_errors
    client.set(f"{key_prefix}:k", "v")
    assert client.get(f"{key_prefix}:k") == b"v"
    client.close()
    assert sync_redis(REDIS_URL).connection_pool.connection_kwargs["socket_timeout"] == (
        DEFAULT_SOCKET_TIMEOUT_S
    )

    async def run() -> bytes | None:
        aclient = async_redis(REDIS_URL, settings=settings)
        akwargs = aclient.connection_pool.connection_kwargs
        assert akwargs["socket_timeout"] == 4.5 and akwargs["socket_keepalive"] is True
        try:
            return await aclient.get(f"{key_prefix}:k")
        finally:
            await aclient.aclose()

    assert asyncio.run(run()) == b"v"


def test_acl_and_tls_urls_keep_their_options():
    acl = sync_redis(f"redis://user:{SECRET}@127.0.0.1:6379/3")
    kwargs = acl.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", SECRET, 3)
    assert SECRET not in repr(acl) and SECRET not in repr(acl.connection_pool)
    tls = sync_redis("rediss://127.0.0.1:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem")
    kwargs = tls.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["socket_timeout"] == 10.0
    assert tls.connection_pool.connection_class is redis.SSLConnection
    # The URL wins over our defaults.
    explicit = sync_redis("redis://127.0.0.1:6379/0?socket_timeout=2")
    assert explicit.connection_pool.connection_kwargs["socket_timeout"] == 2.0


# The Celery app's connection settings ---------------------------------------------------------


def test_celery_config_for_a_redis_broker():
    conf = celery_config(Settings(key_prefix="pfx", redis_socket_timeout_s=7))
    options = conf["broker_transport_options"]
    assert options["global_keyprefix"] == "pfx:broker:"
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 7
    assert options["socket_keepalive"] is True and options["retry_on_timeout"] is False
    assert options["health_check_interval"] == HEALTH_CHECK_INTERVAL_S
    assert conf["broker_connection_retry"] and conf["broker_connection_max_retries"] is None
    assert conf["broker_channel_error_retry"] is True
    assert conf["task_publish_retry"] and conf["task_publish_retry_policy"] == PUBLISH_RETRY_POLICY
    assert conf["redis_socket_timeout"] == 7 and conf["redis_socket_keepalive"] is True
    assert conf["redis_backend_health_check_interval"] == HEALTH_CHECK_INTERVAL_S
    assert (
        "redis.exceptions.OutOfMemoryError"
        in (conf["result_backend_transport_options"]["additional_connection_errors"])
    )


def test_celery_config_for_sentinel_and_for_rabbitmq():
    url = f"sentinel://:{SECRET}@127.0.0.1:26379;sentinel://127.0.0.1:26380/1?master_name=main"
    conf = celery_config(Settings(broker_url=url, redis_url=url, key_prefix="pfx"))
    base = f"sentinel://:{SECRET}@127.0.0.1:26379/1;sentinel://:{SECRET}@127.0.0.1:26380/1"
    assert conf["broker_url"] == conf["result_backend"] == base
    for options in conf["broker_transport_options"], conf["result_backend_transport_options"]:
        assert options["master_name"] == "main"
        assert options["sentinel_kwargs"]["socket_timeout"] == 10.0
        assert "password" not in options["sentinel_kwargs"]
    assert conf["broker_transport_options"]["global_keyprefix"] == "pfx:broker:"
    amqp = celery_config(Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    assert amqp["broker_transport_options"] == {"visibility_timeout": 7200}


# kombu: the reconnect bug, at its cause -------------------------------------------------------

# Celery's consumer, on a lost broker connection: collect() then close() the connection
# (celery/worker/consumer/consumer.py, on_connection_error_after_connected), here with the
# channels it has: the task channel with an unacknowledged delivery and a BRPOP pending,
# and the pidbox channel with its auto-delete fanout queue.
KOMBU_SCENARIO = """
import subprocess, sys, time
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

port, variant = PORT, VARIANT
if variant == "patched":
    from ses_tasks.store.connections import patch_kombu_redis
    assert patch_kombu_redis()
server = subprocess.Popen(
    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
     "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    probe = redis.Redis(port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    conn = Connection(f"redis://127.0.0.1:{port}/0")
    conn.connect()
    tasks = Queue("tasks", Exchange("tasks"), "tasks")
    Producer(conn.default_channel).publish(
        {"n": 1}, exchange=tasks.exchange, routing_key="tasks", declare=[tasks])
    received = []
    task_consumer = Consumer(
        conn.default_channel, [tasks], callbacks=[lambda body, m: received.append(m)])
    task_consumer.consume()
    pidbox = conn.channel()
    box = Queue("w.pidbox", Exchange("pidbox", type="fanout"), auto_delete=True)
    pidbox_consumer = Consumer(pidbox, [box], no_ack=True)
    pidbox_consumer.consume()
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:  # the first event may be LISTEN's
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
    assert len(received) == 1, received
    try:
        conn.drain_events(timeout=0.3)  # leaves the next BRPOP pending
    except Exception:
        pass
    assert conn.default_channel._in_poll is not None
finally:
    server.kill()
    server.wait()
try:
    conn.collect(socket_timeout=1)
    conn.close()
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
else:
    print("closed")
"""


@pytest.mark.parametrize("variant", ["unpatched", "patched"])
def test_kombu_collect_then_close_with_redis_down(variant: str):
    """The unpatched run shows the upstream bug; if it stops failing, drop the patch."""
    from ses_tasks.sandbox.embedded import free_port

    code = KOMBU_SCENARIO.replace("PORT", str(free_port())).replace("VARIANT", repr(variant))
    result = _python(code)
    assert result.returncode == 0, result.stderr
    if variant == "unpatched":
        assert result.stdout.strip() == (
            "AttributeError: 'NoneType' object has no attribute 'hostname'"
        ), result.stdout
    else:
        assert result.stdout.strip() == "closed", result.stdout


# Workers against a private Redis --------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Any:
    server = PrivateRedis(tmp_path / "redis", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


def _campaign(pipeline: Any, campaign_id: str, total: int) -> None:
    pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello {{ email }}",
        recipients=[f"{campaign_id}-{i}@example.com" for i in range(total)],
        campaign_id=campaign_id,
    )


def _sent(pipeline: Any, campaign_id: str) -> int:
    try:
        return int(pipeline.client.campaign_status(campaign_id).counts["sent"])
    except Exception:
        return 0


def _ready(worker: WorkerProcess, times: int = 1) -> bool:
    assert worker.log_path is not None
    log = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
    return log.count(" ready.") >= times


def _start_worker(pipeline: Any) -> tuple[WorkerProcess, int]:
    worker = pipeline.start_worker(concurrency=2)
    wait_for(lambda: _ready(worker), timeout_s=60, what="the worker to be ready")
    main = worker.main_pid()
    assert main is not None and worker.child_pids(), "supervisor -> celery -> pool"
    return worker, main


def _log(worker: WorkerProcess) -> str:
    assert worker.log_path is not None
    return worker.log_path.read_text(errors="replace")


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "T"


def _met_an_error(worker: WorkerProcess, lost_before: int) -> bool:
    """The consumer met the fault: it reconnects, or (the bug) Celery exits."""
    log = _log(worker)
    return log.count("Connection to broker lost") > lost_before or "Unrecoverable" in log


def _assert_same_worker(worker: WorkerProcess, main: int) -> None:
    log = _log(worker)
    assert worker.alive() and worker.main_pid() == main, log[-4000:]
    assert "Unrecoverable error" not in log and "restarting it in" not in log, log[-4000:]


def test_worker_survives_redis_restarts_with_a_task_in_flight(private_redis, make_pipeline):
    """Reproduces the crash of the bug report deterministically, then checks its fix.

    The broker connection must break first on the pidbox's LISTEN connection while the
    task channel has a BRPOP pending and a batch unacknowledged: with Celery's main
    process stopped, the pub/sub connections are killed, then Redis; the main process
    resumes and sees the LISTEN connection closed first.
    """
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_REDIS_URL=private_redis.url,
        SES_TASKS_BROKER_URL=private_redis.url,
        # One slow batch at a time: a delivery in flight, the second slot waiting on BRPOP.
        SES_TASKS_MAX_SEND_RATE="20",
        SES_TASKS_BATCH_SIZE="200",
    )
    worker, main = _start_worker(pipeline)
    control = redis.Redis.from_url(private_redis.url)
    for cycle in range(3):
        campaign = f"restart{cycle}"
        _campaign(pipeline, campaign, 200)
        wait_for(lambda c=campaign: _sent(pipeline, c) >= 5, timeout_s=60, what="sending")
        lost = _log(worker).count("Connection to broker lost")
        os.kill(main, signal.SIGSTOP)
        try:
            wait_for(lambda: _stopped(main), timeout_s=5, what="celery stopped")
            control.client_kill_filter(_type="pubsub")
            private_redis.kill()
        finally:
            os.kill(main, signal.SIGCONT)
        wait_for(lambda n=lost: _met_an_error(worker, n), timeout_s=30, what="the outage")
        private_redis.start()
        control = redis.Redis.from_url(private_redis.url)
        wait_for(
            lambda c=cycle: _log(worker).count("Connected to redis://") >= c + 2,
            timeout_s=60,
            what="the worker to reconnect",
        )
        _assert_same_worker(worker, main)
    # And it still consumes: a new campaign goes out in full.
    _campaign(pipeline, "after", 20)
    final = pipeline.wait_done("after", timeout_s=120)
    assert final.counts["sent"] == 20 and adds_up(final)
    _assert_same_worker(worker, main)


def test_worker_survives_redis_refusing_writes(private_redis, make_pipeline):
    """NOPERM (an ACL change) for a few seconds mid-campaign: the next BRPOP is refused.

    Before ``broker_channel_error_retry`` the consumer treated the reply as unrecoverable
    and Celery's main process exited ("Unrecoverable error: NoPermissionError").
    """
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_REDIS_URL=private_redis.url,
        SES_TASKS_BROKER_URL=private_redis.url,
        # One slow batch: a slot busy, the other waiting on a BRPOP renewed every second.
        SES_TASKS_MAX_SEND_RATE="20",
        SES_TASKS_BATCH_SIZE="200",
    )
    worker, main = _start_worker(pipeline)
    admin = redis.Redis.from_url(private_redis.url)
    _campaign(pipeline, "busy", 200)
    wait_for(lambda: _sent(pipeline, "busy") >= 5, timeout_s=60, what="sending")
    lost = _log(worker).count("Connection to broker lost")
    admin.execute_command("ACL", "SETUSER", "default", "-@write")
    try:
        wait_for(lambda: _met_an_error(worker, lost), timeout_s=30, what="the refusal")
        assert "NoPermissionError" in _log(worker)
        _assert_same_worker(worker, main)
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+@all")
    _campaign(pipeline, "after", 20)
    final = pipeline.wait_done("after", timeout_s=120)
    assert final.counts["sent"] == 20 and adds_up(final)
    _assert_same_worker(worker, main)


# Moves a message into a queue while Redis refuses writes that need memory.
ALLOW_OOM_MOVE = "#!lua flags=allow-oom\nreturn redis.call('RPOPLPUSH', KEYS[1], KEYS[2])"


def test_worker_survives_redis_out_of_memory(private_redis, make_pipeline):
    """OOM (maxmemory reached, noeviction) when a delivery's bookkeeping is written."""
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_REDIS_URL=private_redis.url,
        SES_TASKS_BROKER_URL=private_redis.url,
    )
    worker, main = _start_worker(pipeline)
    admin = redis.Redis.from_url(private_redis.url)
    broker = f"{pipeline.env['SES_TASKS_KEY_PREFIX']}:broker:"
    # A probe task parked in a queue nobody consumes, moved into the worker's queue
    # once Redis is out of memory: taking it, kombu must record it as unacknowledged.
    pipeline.client.app.send_task("ses_tasks.oom_probe", queue="oom-probe")
    assert admin.llen(f"{broker}oom-probe") == 1
    lost = _log(worker).count("Connection to broker lost")
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set(f"{broker}x", "y")
        admin.eval(ALLOW_OOM_MOVE, 2, f"{broker}oom-probe", f"{broker}ses.tls.transactional")
        wait_for(lambda: _met_an_error(worker, lost), timeout_s=30, what="the refusal")
        assert "OutOfMemoryError" in _log(worker)
        _assert_same_worker(worker, main)
    finally:
        admin.config_set("maxmemory", "0")
    _campaign(pipeline, "after", 20)
    final = pipeline.wait_done("after", timeout_s=120)
    assert final.counts["sent"] == 20 and adds_up(final)
    _assert_same_worker(worker, main)


# The supervisor -------------------------------------------------------------------------------


def test_supervisor_restarts_a_killed_celery_worker(private_redis, make_pipeline):
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_REDIS_URL=private_redis.url,
        SES_TASKS_BROKER_URL=private_redis.url,
    )
    worker, main = _start_worker(pipeline)
    pool = worker.child_pids()
    os.kill(main, signal.SIGKILL)
    new_main = wait_for(
        lambda: (m := worker.main_pid()) not in (None, main) and m,
        timeout_s=30,
        what="a new celery main process",
    )
    assert worker.alive()
    # The old pool died with its parent (Celery's PDEATHSIG), nothing is left behind.
    wait_for(lambda: not any(_exists(pid) for pid in pool), timeout_s=10, what="old pool gone")
    wait_for(lambda: _ready(worker, times=2), timeout_s=60, what="the new worker ready")
    assert f"celery worker (pid {main}) was killed by SIGKILL" in _log(worker)
    _campaign(pipeline, "restarted", 20)
    final = pipeline.wait_done("restarted", timeout_s=120)
    assert final.counts["sent"] == 20
    assert worker.main_pid() == new_main
    # SIGTERM to the supervisor: a warm shutdown of the worker, status 0, nothing left.
    assert worker.stop(timeout_s=60) == 0
    assert not _exists(new_main)


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


SUPERVISED = """
import logging, sys
from ses_tasks.ops.cli import _Supervisor
import ses_tasks.ops.cli as cli
logging.basicConfig(level=logging.INFO, format="%(message)s")
cli.RESTART_BACKOFF_S = (0.05, 0.1)
sys.exit(_Supervisor([sys.executable, "-c", {child!r}]).run())
"""


def test_supervisor_backs_off_and_stops_on_a_clean_exit(tmp_path: Path):
    counter = tmp_path / "runs"
    child = (
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "sys.exit(0 if n == 3 else 1)\n"
    )
    result = _python(SUPERVISED.format(child=child))
    assert result.returncode == 0, result.stderr
    assert counter.read_text() == "3"
    assert result.stderr.count("exited with status 1") == 2
    assert "restart 2)" in result.stderr and "exited cleanly" in result.stderr


def test_supervisor_does_not_restart_a_configuration_error():
    result = _python(SUPERVISED.format(child="import sys; sys.exit(2)"))
    assert result.returncode == 2
    assert "not restarting it" in result.stderr and "restart 1)" not in result.stderr


def test_supervisor_passes_sigterm_on_and_exits_with_the_workers_status(tmp_path: Path):
    ready = tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "while True: time.sleep(1)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED.format(child=child)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(ready.exists, timeout_s=30, what="the child to start")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None and "restart" not in process.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
