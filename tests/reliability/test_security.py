"""Secrets stay secret, untrusted payloads are refused, TLS policy holds, Redis auth works.

The leak test runs a real pipeline (worker processes at DEBUG, Redis broker and results)
and then reads back everything it left behind.
"""

from __future__ import annotations

import base64
import os
import pickle
import re
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from ses_tasks.config import Settings, load_settings
from ses_tasks.errors import (
    ConfigurationError,
    DeliveryError,
    TLSPolicyError,
    TransientDeliveryError,
)
from ses_tasks.ops.direct import probe
from ses_tasks.queue.app import BATCH_TASK, bulk_queue
from ses_tasks.sandbox import SandboxConfig, SandboxThread
from ses_tasks.sandbox.embedded import (
    SANDBOX_USERNAME,
    SandboxProcess,
    WorkerProcess,
    free_port,
    wait_for,
)
from ses_tasks.smtp.credentials import smtp_password
from ses_tasks.smtp.endpoint import PortMode, make_tls_context

from ..conftest import REDIS_URL, Pipeline, settings_from_env
from .support import PrivateRedis, adds_up

SMTP_SECRET = "Smtp-Pa55w0rd-" + uuid.uuid4().hex  # distinctive: any hit is a leak
IAM_SECRET = "wJalrXUtnFEMI/K7MDENG/" + uuid.uuid4().hex
SES_REGION = "eu-west-1"


def _dump(client: redis.Redis, key: bytes) -> bytes:
    kind = client.type(key)
    if kind == b"string":
        return client.get(key) or b""
    if kind == b"hash":
        return b" ".join(k + b"=" + v for k, v in client.hgetall(key).items())
    if kind == b"list":
        return b" ".join(client.lrange(key, 0, -1))
    if kind == b"set":
        return b" ".join(client.smembers(key))
    if kind == b"zset":
        return b" ".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
    return b""


def _forms(secret: str) -> list[bytes]:
    """The secret as it could appear: raw, base64 (AUTH LOGIN), inside AUTH PLAIN."""
    raw = secret.encode()
    plain = base64.b64encode(b"\0" + SANDBOX_USERNAME.encode() + b"\0" + raw)
    return [raw, base64.b64encode(raw), plain]


def _start(tmp_path: Path, key_prefix: str, *, password: str, env: dict[str, str]) -> Pipeline:
    sandbox = SandboxProcess(tmp_path, password=password).start()
    base = {k: v for k, v in sandbox.settings_env("starttls").items() if k != "SES_TASKS_PASSWORD"}
    base |= {
        "SES_TASKS_REDIS_URL": REDIS_URL,
        "SES_TASKS_BROKER_URL": REDIS_URL,
        "SES_TASKS_KEY_PREFIX": key_prefix,
        "SES_TASKS_MAX_SEND_RATE": "1000",
        "SES_TASKS_POOL_SIZE": "2",
        "SES_TASKS_BATCH_SIZE": "20",
        **env,
    }
    return Pipeline(tmp_path, sandbox, base)


def _stop(pipeline: Pipeline) -> None:
    for worker in pipeline.workers:
        worker.stop(timeout_s=20)
    pipeline.sandbox.stop()


@pytest.mark.parametrize("credential", ["password-file", "iam-secret"])
def test_secrets_never_reach_logs_redis_broker_or_results(
    tmp_path: Path, key_prefix: str, redis_client: redis.Redis, credential: str
):
    if credential == "password-file":
        secret_file = tmp_path / "smtp-password"
        secret_file.write_text(SMTP_SECRET + "\n")
        password, env = SMTP_SECRET, {"SES_TASKS_PASSWORD_FILE": str(secret_file)}
        secrets = _forms(SMTP_SECRET)
    else:
        password = smtp_password(IAM_SECRET, SES_REGION)
        env = {"SES_TASKS_SECRET_ACCESS_KEY": IAM_SECRET, "SES_TASKS_REGION": SES_REGION}
        secrets = [*_forms(IAM_SECRET), *_forms(password)]
    pipeline = _start(tmp_path, key_prefix, password=password, env=env)
    try:
        worker = WorkerProcess(
            env=pipeline.env,
            mode="starttls",
            concurrency=2,
            log_path=tmp_path / "worker.log",
            extra_args=["--loglevel", "DEBUG"],
        ).start()
        pipeline.workers.append(worker)
        client = pipeline.client
        status = client.send_campaign(
            from_="news@example.com",
            subject="Hi {{ email }}",
            text="Hello",
            recipients=[f"s{i}@example.com" for i in range(60)],
            campaign_id="secret-campaign",
        )
        single = client.send_email(
            from_="app@example.com", to=["one@example.com"], subject="Reset", text="code"
        )
        assert single.get(timeout=60)["state"] == "sent"
        final = pipeline.wait_done(status.id)
        assert final.counts["sent"] == 60 and adds_up(final)
        # A failed login is logged too: it must not carry what was tried.
        assert client.settings.smtp_password() == password
        worker.stop(timeout_s=30)

        logs = worker.log_path.read_bytes() if worker.log_path else b""
        assert b"DEBUG" in logs and b"succeeded" in logs, "the log must have been captured"
        task_ids = set(re.findall(rb"send_batch\[([0-9a-f-]{36})\]", logs))
        assert task_ids
        keys = list(redis_client.scan_iter(match=f"{key_prefix}:*"))
        meta = [b"celery-task-meta-" + t for t in task_ids]
        meta.append(f"celery-task-meta-{single.message_id}".encode())
        assert any(redis_client.exists(k) for k in meta), "task results must be there to search"
        broker_keys = [k for k in keys if b":broker:" in k]
        assert broker_keys, "broker keys must be there to search"
        values = {k: _dump(redis_client, k) for k in [*keys, *meta]}
        settings_text = repr(client.settings).encode() + str(client.settings).encode()
        for form in secrets:
            assert form not in logs, f"secret found in the worker log ({credential})"
            for key, value in values.items():
                assert form not in key and form not in value, f"secret in Redis key {key!r}"
            assert form not in settings_text
    finally:
        _stop(pipeline)
        for task_id in locals().get("task_ids", set()):
            redis_client.delete(b"celery-task-meta-" + task_id)


def test_pickle_payload_is_refused_and_nothing_runs_or_is_sent(
    tmp_path: Path, key_prefix: str, make_pipeline: Any
):
    pipeline = make_pipeline("tls")
    worker = pipeline.start_worker(concurrency=1)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    client = pipeline.client
    client.store.create_campaign("pickled", template={"from": "a@example.com"})
    item = [0, "victim@example.com", {"x": Exploit()}, 0]
    assert b"system" in pickle.dumps(item)
    client.app.send_task(
        BATCH_TASK,
        args=("pickled", [item]),
        queue=bulk_queue(PortMode.TLS),
        serializer="pickle",
    )
    logs = wait_for(
        lambda: "untrusted content of type pickle" in (t := pipeline.worker_logs()) and t,
        timeout_s=30,
        what="the worker to refuse the pickle payload",
    )
    assert "ContentDisallowed" in logs
    # The worker goes on serving JSON tasks after refusing it.
    done = client.send_campaign(
        from_="a@example.com", subject="s", text="t", recipients=["ok@example.com"]
    )
    assert pipeline.wait_done(done.id).counts["sent"] == 1
    assert worker.alive()
    assert not marker.exists(), "the pickle payload was deserialised"
    rcpts = {r for m in pipeline.accepted(at_least=1) for r in m["rcpt_tos"]}
    assert rcpts == {"ok@example.com"}


def test_wrong_ca_pauses_the_campaign_and_sends_nothing(make_pipeline, tmp_path: Path):
    unrelated = tmp_path / "unrelated-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(unrelated))
    pipeline = make_pipeline("tls", SES_TASKS_CA_FILE=str(unrelated))
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    client.send_campaign(
        from_="a@example.com",
        subject="s",
        text="t",
        recipients=[f"ca{i}@example.com" for i in range(30)],
        campaign_id="wrong-ca",
    )

    def paused() -> Any:
        s = client.campaign_status("wrong-ca")
        return s if s.state.value == "paused" and s.counts["deferred"] == 30 else None

    status = wait_for(paused, timeout_s=60, what="the campaign paused by the TLS failure")
    assert "certificate verify failed" in status.reason, status.reason
    assert status.counts["sent"] == 0 and status.counts["failed"] == 0
    pipeline.sandbox.stop()
    assert pipeline.sandbox.accepted() == []
    assert not [e for e in pipeline.sandbox.events() if e["event"] == "auth"]


def _probe_settings(sandbox: SandboxThread, mode: str) -> Settings:
    return Settings(
        host="localhost",
        port=sandbox.port(mode),
        mode=mode,
        ca_file=sandbox.ca_file,
        username="AKIAEXAMPLE",
        password="secret",
    )


@pytest.fixture
def old_tls_sandbox() -> Iterator[SandboxThread]:
    config = SandboxConfig(
        tls_min_version=ssl.TLSVersion.TLSv1, tls_max_version=ssl.TLSVersion.TLSv1_1
    )
    with SandboxThread(config) as sandbox:
        yield sandbox


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_tls_below_1_2_is_refused_before_auth(old_tls_sandbox: SandboxThread, mode: str):
    """The client offers TLS 1.2+ only: no handshake with a TLS 1.0/1.1 server, no AUTH."""
    with pytest.raises(DeliveryError) as info:
        probe(_probe_settings(old_tls_sandbox, mode))
    assert isinstance(info.value, (TLSPolicyError, TransientDeliveryError)), info.value
    sessions = old_tls_sandbox.sessions
    # TLS Wrapper: the handshake fails before any SMTP session exists; STARTTLS: the
    # session stays in clear text and never reaches AUTH.
    assert bool(sessions) is (mode == "starttls")
    assert not any(s.authed or "AUTH" in s.commands for s in sessions)
    assert all(s.tls_version is None for s in sessions)
    assert old_tls_sandbox.stats.auth_ok == old_tls_sandbox.stats.auth_failed == 0
    assert make_tls_context().minimum_version is ssl.TLSVersion.TLSv1_2


@pytest.mark.xfail(
    strict=True,
    reason="a server that only offers TLS < 1.2 ends the handshake with a reset, which the "
    "pool reports as TransientDeliveryError ('Error connecting ...' / 'Connection reset while "
    "upgrading transport'), not TLSPolicyError: campaigns retry it as a network blip until "
    "MAX_ATTEMPTS instead of pausing on a TLS policy failure",
)
@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_tls_below_1_2_is_a_tls_policy_error(old_tls_sandbox: SandboxThread, mode: str):
    with pytest.raises(TLSPolicyError):
        probe(_probe_settings(old_tls_sandbox, mode))


def test_a_server_without_starttls_gets_no_auth():
    with SandboxThread(SandboxConfig(advertise_starttls=False)) as sandbox:
        with pytest.raises(TLSPolicyError) as info:
            probe(_probe_settings(sandbox, "starttls"))
        assert str(info.value) == (
            "server did not offer STARTTLS; refusing to authenticate in clear"
        )
        sandbox.wait_until(lambda: sandbox.sessions and sandbox.sessions[0].closed)
        (session,) = sandbox.sessions
        assert "EHLO" in session.commands
        assert "AUTH" not in session.commands and not session.authed
        assert sandbox.stats.auth_ok == sandbox.stats.auth_failed == 0


# Redis: ACL users and TLS ------------------------------------------------------------------


def _run_small_campaign(tmp_path: Path, key_prefix: str, redis_url: str, campaign_id: str) -> str:
    sandbox = SandboxProcess(tmp_path).start()
    env = {
        **sandbox.settings_env("tls"),
        "SES_TASKS_REDIS_URL": redis_url,
        "SES_TASKS_BROKER_URL": redis_url,
        "SES_TASKS_KEY_PREFIX": key_prefix,
        "SES_TASKS_MAX_SEND_RATE": "500",
        "SES_TASKS_POOL_SIZE": "2",
        "SES_TASKS_BATCH_SIZE": "10",
    }
    pipeline = Pipeline(tmp_path, sandbox, env)
    try:
        pipeline.start_worker(concurrency=1)
        pipeline.client.send_campaign(
            from_="a@example.com",
            subject="s",
            text="t",
            recipients=[f"r{i}@example.com" for i in range(25)],
            campaign_id=campaign_id,
        )
        final = pipeline.wait_done(campaign_id, timeout_s=60)
        assert final.counts["sent"] == 25 and adds_up(final)
        assert len(pipeline.accepted(at_least=25)) == 25
    finally:
        _stop(pipeline)
    return pipeline.worker_logs()


def test_redis_acl_user_with_password(tmp_path: Path, key_prefix: str, redis_client: redis.Redis):
    user = f"ses-tasks-test-{uuid.uuid4().hex[:8]}"
    secret = "acl-" + uuid.uuid4().hex
    # Only this test's keys (and Celery's result keys), every command but the dangerous ones.
    redis_client.execute_command(
        "ACL", "SETUSER", user, "on", f">{secret}", f"~{key_prefix}:*", "~celery-task-meta-*",
        "&*", "+@all", "-@dangerous", "+info", "+client",
    )  # fmt: skip
    try:
        url = f"redis://{user}:{secret}@127.0.0.1:6379/0"
        limited = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.get("some-other-prefix:key")
        limited.close()
        settings = load_settings(redis_url=url, broker_url=url, key_prefix=key_prefix)
        assert secret not in repr(settings)
        logs = _run_small_campaign(tmp_path, key_prefix, url, "acl")
        assert secret not in logs
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)


def test_redis_acl_wrong_password_is_a_clear_error(key_prefix: str):
    settings = load_settings(
        redis_url="redis://nobody:wrong-pass-123@127.0.0.1:6379/0", key_prefix=key_prefix
    )
    client = redis.Redis.from_url(settings.redis_url)
    with pytest.raises(redis.exceptions.AuthenticationError) as info:
        client.ping()
    assert "wrong-pass-123" not in str(info.value)


def _tls_redis_supported() -> bool:
    binary = shutil.which("redis-server")
    if not binary:
        return False
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return "build" in out  # every build answers; TLS support is checked by starting one


def test_rediss_with_a_private_ca(tmp_path: Path, key_prefix: str):
    if not _tls_redis_supported():
        pytest.skip("redis-server is not installed")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls_port = free_port()
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca_file}"
    server = PrivateRedis(tmp_path / "redis-tls")
    server.port = 0
    try:
        server.start(
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(cert_file),
            "--tls-key-file", str(key_file),
            "--tls-ca-cert-file", str(ca_file),
            "--tls-auth-clients", "no",
            url=url,
        )  # fmt: skip
        # Without our CA the server is not trusted.
        untrusted = redis.Redis.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required")
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            untrusted.ping()
        _run_small_campaign(tmp_path, key_prefix, url, "over-tls")
    finally:
        server.stop()


# Settings: secrets from files, redacted everywhere ------------------------------------------


def test_every_secret_setting_can_come_from_a_file(tmp_path: Path, monkeypatch):
    values = {
        "password": "pw-" + uuid.uuid4().hex,
        "broker_url": "redis://u:broker-secret@127.0.0.1:6379/0",
        "redis_url": "redis://u:store-secret@127.0.0.1:6379/0",
        "result_backend": "redis://u:result-secret@127.0.0.1:6379/0",
    }
    for name, value in values.items():
        path = tmp_path / name
        path.write_text(value + "\n")
        monkeypatch.setenv(f"SES_TASKS_{name.upper()}_FILE", str(path))
    settings = load_settings()
    assert settings.smtp_password() == values["password"]
    assert settings.broker_url == values["broker_url"]
    assert settings.redis_url == values["redis_url"]
    assert settings.result_backend == values["result_backend"]
    text = repr(settings) + str(settings)
    for secret in (values["password"], "broker-secret", "store-secret", "result-secret"):
        assert secret not in text
    monkeypatch.delenv("SES_TASKS_PASSWORD_FILE")
    iam = tmp_path / "iam"
    iam.write_text(IAM_SECRET)
    monkeypatch.setenv("SES_TASKS_SECRET_ACCESS_KEY_FILE", str(iam))
    settings = load_settings(region=SES_REGION)
    assert settings.smtp_password() == smtp_password(IAM_SECRET, SES_REGION)
    assert IAM_SECRET not in repr(settings)


def test_unreadable_secret_file_is_a_configuration_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SES_TASKS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert "password_file: cannot read" in str(info.value)
    assert "No such file or directory" in str(info.value)


def test_settings_repr_redacts_secrets():
    settings = settings_from_env(
        {
            "SES_TASKS_PASSWORD": SMTP_SECRET,
            "SES_TASKS_REDIS_URL": "redis://user:redis-secret@127.0.0.1:6379/0",
            "SES_TASKS_BROKER_URL": "rediss://user:broker-secret@127.0.0.1:6380/0",
        }
    )
    text = repr(settings) + str(settings) + repr(settings.model_dump())
    for secret in (SMTP_SECRET, "redis-secret"):
        assert secret not in repr(settings) and secret not in str(settings)
    assert "redis://user:***@127.0.0.1:6379/0" in text
    assert SMTP_SECRET not in text
