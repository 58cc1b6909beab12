"""The sandbox against real clients (aiosmtplib, smtplib) over real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import pytest

from ses_tasks.sandbox import (
    SES_MESSAGE_ID_RE,
    Faults,
    Sandbox,
    SandboxConfig,
    SandboxThread,
    main,
    read_jsonl,
    read_messages,
)
from ses_tasks.smtp.endpoint import make_tls_context

T = TypeVar("T")
USER = "AKIAEXAMPLE"
PASSWORD = "secret"
SENDER = "sender@example.com"
RECIPIENT = "rcpt@example.com"
MESSAGE = b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: hi\r\n\r\nHello\r\n"
OK_RE = r"Ok " + SES_MESSAGE_ID_RE.pattern
BANNER_RE = r"220 email-smtp\.amazonaws\.com ESMTP SimpleEmailService-\S+.*"


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def with_sandbox(body: Callable[[Sandbox], Awaitable[T]], **options: Any) -> T:
    async def go() -> T:
        async with Sandbox(SandboxConfig(**options)) as sb:
            return await body(sb)

    return run(go())


async def connect(
    sb: Sandbox, mode: str = "starttls", *, login: bool = True, password: str = PASSWORD
) -> aiosmtplib.SMTP:
    context = make_tls_context(sb.ca_file)
    if mode == "starttls":
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=sb.starttls_port, tls_context=context, start_tls=True
        )
    else:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=sb.tls_port, tls_context=context, use_tls=True
        )
    await client.connect()
    if login:
        await client.login(USER, password)
    return client


async def send(client: aiosmtplib.SMTP, recipients: list[str] | None = None) -> str:
    _, message = await client.sendmail(SENDER, recipients or [RECIPIENT], MESSAGE)
    return message


class Raw:
    """A line-level SMTP client, for exact reply texts and for what aiosmtplib hides."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int | None, *, ca_file: str | None = None) -> Raw:
        assert port is not None
        context = make_tls_context(ca_file) if ca_file else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        return cls(reader, writer)

    async def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = (await self.reader.readline()).decode()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return int(line[:3]), [text[4:] for text in lines]

    async def command(self, line: str) -> tuple[int, list[str]]:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def starttls(self, ca_file: str) -> None:
        code, _ = await self.command("STARTTLS")
        assert code == 220
        await self.writer.start_tls(make_tls_context(ca_file))

    async def login(self) -> None:
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert (await self.command(f"AUTH PLAIN {token}"))[0] == 235

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


# -- both modes, SES's greeting and EHLO --------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_send_in_each_mode_returns_ses_message_id(mode: str) -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb, mode)
        reply = await send(client)
        await client.quit()
        assert re.fullmatch(OK_RE, reply), reply
        [message] = sb.messages
        assert reply == f"Ok {message.ses_message_id}"
        assert (message.mail_from, message.rcpt_tos) == (SENDER, [RECIPIENT])
        assert message.data == MESSAGE
        assert message.size == len(MESSAGE)
        assert message.mode.value == mode
        await sb.wait_until(lambda: sb.stats.connections_closed == 1)
        [session] = sb.sessions
        assert session.authed
        assert session.tls_version in {"TLSv1.2", "TLSv1.3"}
        expected = ["EHLO", "STARTTLS", "EHLO"] if mode == "starttls" else ["EHLO"]
        assert session.commands == [*expected, "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
        assert session.messages == 1
        assert sb.stats.messages_per_session == {session.session_id: 1}

    with_sandbox(body)


def test_greeting_and_ehlo_lines_are_ses_lines() -> None:
    async def body(sb: Sandbox) -> None:
        raw = await Raw.open(sb.starttls_port)
        code, banner = await raw.reply()
        assert re.fullmatch(BANNER_RE, f"{code} {banner[0]}")
        code, lines = await raw.command("EHLO client.example")
        assert (code, lines) == (
            250,
            ["email-smtp.amazonaws.com", "8BITMIME", "SIZE 10485760", "STARTTLS", "Ok"],
        )
        await raw.starttls(sb.ca_file)
        code, lines = await raw.command("EHLO client.example")
        assert lines == [
            "email-smtp.amazonaws.com",
            "8BITMIME",
            "SIZE 10485760",
            "AUTH PLAIN LOGIN",
            "Ok",
        ]
        assert (await raw.command("QUIT"))[0] == 221
        await raw.close()

        wrapped = await Raw.open(sb.tls_port, ca_file=sb.ca_file)
        code, banner = await wrapped.reply()
        assert re.fullmatch(BANNER_RE, f"{code} {banner[0]}")
        _, lines = await wrapped.command("EHLO client.example")
        assert "STARTTLS" not in lines and "AUTH PLAIN LOGIN" in lines
        assert not {"PIPELINING", "SMTPUTF8", "CHUNKING"} & set(lines)
        assert await wrapped.command("STARTTLS") == (454, ["TLS not available"])
        await wrapped.close()
        assert sb.stats.replies_by_code[220] == 3  # two banners and "Ready to start TLS"

    with_sandbox(body)


def test_auth_before_starttls_is_refused_and_not_advertised() -> None:
    async def body(sb: Sandbox) -> None:
        raw = await Raw.open(sb.starttls_port)
        await raw.reply()
        _, lines = await raw.command("EHLO client.example")
        assert not any(line.startswith("AUTH") for line in lines)
        refused = (530, ["Must issue a STARTTLS command first"])
        assert await raw.command("AUTH PLAIN AGFiYwBkZWY=") == refused
        assert await raw.command("MAIL FROM:<sender@example.com>") == refused
        await raw.starttls(sb.ca_file)
        await raw.command("EHLO client.example")
        assert await raw.command("MAIL FROM:<sender@example.com>") == (
            530,
            ["Authentication required"],
        )
        await raw.close()
        assert sb.stats.auth_ok == sb.stats.auth_failed == 0

        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sb.starttls_port, start_tls=False)
        await client.connect()
        with pytest.raises(aiosmtplib.SMTPException, match="AUTH extension"):
            await client.login(USER, PASSWORD)
        client.close()

    with_sandbox(body, tls_port=None)


def test_server_without_starttls_advert_gets_no_credentials() -> None:
    async def body(sb: Sandbox) -> None:
        with pytest.raises(aiosmtplib.SMTPException, match="STARTTLS"):
            await connect(sb, "starttls")
        await sb.wait_until(lambda: sb.stats.connections_closed == 1)
        assert "AUTH" not in sb.sessions[0].commands
        assert sb.sessions[0].tls_version is None

        raw = await Raw.open(sb.starttls_port)
        await raw.reply()
        _, lines = await raw.command("EHLO client.example")
        assert "STARTTLS" not in lines
        assert (await raw.command("STARTTLS"))[0] == 454
        await raw.close()

    with_sandbox(body, advertise_starttls=False)


@pytest.mark.parametrize("method", ["plain", "login"])
def test_bad_credentials_get_535(method: str) -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb, "tls", login=False)
        await client.ehlo()
        login = client.auth_plain if method == "plain" else client.auth_login
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await login(USER, "wrong")
        assert (caught.value.code, caught.value.message) == (
            535,
            "Authentication Credentials Invalid",
        )
        response = await login(USER, PASSWORD)
        assert (response.code, response.message) == (235, "Authentication successful.")
        assert (sb.stats.auth_failed, sb.stats.auth_ok) == (1, 1)
        client.close()

    with_sandbox(body)


def test_auth_fail_fault_refuses_good_credentials() -> None:
    async def body(sb: Sandbox) -> None:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await connect(sb, "starttls")
        assert caught.value.code == 535
        sb.faults.auth_fail = False
        client = await connect(sb, "starttls")
        assert (await send(client)).startswith("Ok ")
        client.close()

    with_sandbox(body, faults=Faults(auth_fail=True))


# -- faults --------------------------------------------------------------------------------


def test_throttle_fault_then_toggled_off_mid_run() -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb)
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(client)
        assert (caught.value.code, caught.value.message) == (
            454,
            "Throttling failure: Maximum sending rate exceeded",
        )
        assert sb.messages == []
        sb.faults.throttle_rate = 0.0
        assert (await send(client)).startswith("Ok ")  # same connection still usable
        assert sb.stats.messages_refused == 1 and sb.stats.messages_accepted == 1
        client.close()

    with_sandbox(body, faults=Faults(throttle_rate=1.0))


def test_daily_quota_counts_recipients() -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb)
        await send(client, ["a@example.com", "b@example.com"])
        await send(client, ["c@example.com"])
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(client, ["d@example.com"])
        assert (caught.value.code, caught.value.message) == (
            454,
            "Throttling failure: Daily message quota exceeded",
        )
        assert sb.stats.recipients_accepted == 3
        client.close()

    with_sandbox(body, faults=Faults(daily_quota=3))


def test_temp_fail_fault() -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb, "tls")
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(client)
        assert (caught.value.code, caught.value.message) == (451, "Temporary service failure")
        client.close()

    with_sandbox(body, faults=Faults(temp_fail_rate=1.0))


@pytest.mark.parametrize("accepts", [False, True])
def test_drop_after_data_closes_without_reply(accepts: bool) -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await send(client)
        await sb.wait_until(lambda: sb.stats.connections_closed == 1)
        assert sb.stats.dropped_after_data == 1
        assert len(sb.messages) == (1 if accepts else 0)
        # greeting, EHLO, STARTTLS, EHLO, AUTH, MAIL, RCPT, 354: nothing after the data
        assert sb.stats.replies_by_code == {220: 2, 250: 4, 235: 1, 354: 1}

    with_sandbox(body, faults=Faults(drop_after_data_rate=1.0, drop_after_data_accepts=accepts))


def test_session_limit_421_then_close() -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb)
        await send(client)
        await send(client)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
            await send(client)
        assert caught.value.code == 421
        assert caught.value.message == (
            "Connection closed by server. Maximum message count per session reached."
        )
        await sb.wait_until(lambda: sb.stats.connections_closed == 1)
        assert sb.stats.session_limit_closes == 1
        assert sb.sessions[0].messages == 2
        again = await connect(sb)  # a new session starts counting afresh
        await send(again)
        again.close()

    with_sandbox(body, faults=Faults(max_messages_per_session=2))


def test_idle_timeout_says_451_and_closes() -> None:
    async def body(sb: Sandbox) -> None:
        raw = await Raw.open(sb.tls_port, ca_file=sb.ca_file)
        await raw.reply()
        await raw.command("EHLO client.example")
        await raw.login()
        started = time.monotonic()
        code, lines = await raw.reply()  # unsolicited
        elapsed = time.monotonic() - started
        assert (code, lines) == (451, ["4.4.2 Timeout waiting for data from client."])
        assert elapsed >= 0.25
        assert await raw.reader.read() == b""
        await sb.wait_until(lambda: sb.stats.connections_closed == 1)
        assert sb.stats.idle_timeouts == 1
        await raw.close()

    with_sandbox(body, faults=Faults(idle_timeout_s=0.3))


def test_account_paused_and_unverified_addresses() -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb)
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(client, ["Blocked@Example.com"])
        assert caught.value.code == 554
        assert caught.value.message.startswith("Message rejected: Email address is not verified.")
        assert "Blocked@Example.com" in caught.value.message
        sb.faults.account_paused = True
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(client)
        assert caught.value.code == 554
        assert caught.value.message.startswith("Message rejected: Sending paused for this account.")
        assert sb.messages == []
        client.close()

    with_sandbox(body, faults=Faults(reject_recipients=frozenset({"blocked@example.com"})))


def test_random_faults_are_deterministic_per_seed() -> None:
    async def pattern(sb: Sandbox) -> list[int]:
        client = await connect(sb)
        codes = []
        for _ in range(20):
            try:
                await send(client)
                codes.append(250)
            except aiosmtplib.SMTPDataError as exc:
                codes.append(exc.code)
        client.close()
        return codes

    faults = dict(throttle_rate=0.3, temp_fail_rate=0.3, seed=7)
    first = with_sandbox(pattern, faults=Faults(**faults))  # type: ignore[arg-type]
    second = with_sandbox(pattern, faults=Faults(**faults))  # type: ignore[arg-type]
    assert first == second
    assert {250, 451, 454} == set(first)


# -- SES limits ----------------------------------------------------------------------------


def test_recipient_limit_size_limit_and_bad_addresses() -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb)
        many = [f"r{i}@example.com" for i in range(51)]
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(client, many)
        assert (caught.value.code, caught.value.message) == (
            554,
            "Transaction failed: Recipient count exceeds 50.",
        )
        assert (await send(client, many[:50])).startswith("Ok ")
        big = MESSAGE + (b"x" * 98 + b"\r\n") * 20
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail(SENDER, [RECIPIENT], big)  # refused at MAIL ... SIZE=
        assert (refused.value.code, refused.value.message) == (552, "Message is too long.")
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as bad:
            await client.sendmail(SENDER, ["not-an-address"], MESSAGE)
        [error] = bad.value.recipients
        assert (error.code, error.message) == (553, "<not-an-address> Invalid email address")
        client.close()

        raw = await Raw.open(sb.tls_port, ca_file=sb.ca_file)
        await raw.reply()
        await raw.command("EHLO client.example")
        await raw.login()
        assert await raw.command("MAIL FROM:<a@@b>") == (553, ["<a@@b> Invalid email address"])
        assert (await raw.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
        assert (await raw.command(f"RCPT TO:<{RECIPIENT}>"))[0] == 250
        assert (await raw.command("DATA"))[0] == 354
        raw.writer.write(big + b".\r\n")  # no SIZE= announced: refused after the data
        assert await raw.reply() == (552, ["Message is too long."])
        await raw.close()
        assert len(sb.messages) == 1

    with_sandbox(body, max_message_bytes=1000)


def test_message_ids_are_unique_and_well_formed() -> None:
    async def body(sb: Sandbox) -> None:
        client = await connect(sb, "tls")
        replies = [await send(client) for _ in range(50)]
        client.close()
        ids = [reply.removeprefix("Ok ") for reply in replies]
        assert len(set(ids)) == 50
        assert all(SES_MESSAGE_ID_RE.fullmatch(i) for i in ids)

    with_sandbox(body, keep_data=False)
    # keep_data=False keeps ids and sizes but no bytes (checked in the store test too)


# -- latency, stats, store -----------------------------------------------------------------


def test_latency_delays_greeting_and_each_reply_once() -> None:
    latency_s = 0.15

    async def body(sb: Sandbox) -> None:
        started = time.monotonic()
        raw = await Raw.open(sb.tls_port, ca_file=sb.ca_file)
        await raw.reply()
        assert time.monotonic() - started >= latency_s
        started = time.monotonic()
        await raw.command("EHLO client.example")
        elapsed = time.monotonic() - started
        assert elapsed >= latency_s
        assert elapsed < 4 * latency_s  # five lines, one reply: one delay
        await raw.close()
        sb.latency_ms = 0
        started = time.monotonic()
        client = await connect(sb, "tls")
        await send(client)
        client.close()
        assert time.monotonic() - started < 4 * latency_s

    with_sandbox(body, latency_ms=latency_s * 1000)


def test_stats_count_connections() -> None:
    async def body(sb: Sandbox) -> None:
        clients = [await connect(sb, mode) for mode in ("starttls", "tls", "tls")]
        assert sb.stats.concurrent_connections == 3
        for client in clients:
            await send(client)
            await client.quit()
        await sb.wait_until(lambda: sb.stats.connections_closed == 3)
        stats = sb.stats
        assert (stats.connections_opened, stats.max_concurrent_connections) == (3, 3)
        assert (stats.quits, stats.auth_ok, stats.messages_accepted) == (3, 3, 3)
        assert stats.starttls_upgrades == 1
        assert stats.replies_by_code[221] == 3
        assert all(s.closed for s in sb.sessions)

    with_sandbox(body)


def test_store_and_events_jsonl(tmp_path: Path) -> None:
    store = tmp_path / "store" / "messages.jsonl"
    events = tmp_path / "events.jsonl"
    eight_bit = MESSAGE + b"caf\xe9 \xff\r\n"

    async def body(sb: Sandbox) -> list[str]:
        client = await connect(sb)
        first = await send(client)
        _, second = await client.sendmail(SENDER, ["x@example.com", "y@example.com"], eight_bit)
        await client.quit()
        await sb.wait_until(lambda: sb.stats.connections_closed == 1)
        return [first.removeprefix("Ok "), second.removeprefix("Ok ")]

    ids = with_sandbox(body, store_path=store, events_path=events)
    stored = read_messages(store)
    assert [m.ses_message_id for m in stored] == ids
    assert stored[0].data == MESSAGE
    assert stored[1].data == eight_bit
    assert stored[1].rcpt_tos == ["x@example.com", "y@example.com"]
    assert stored[1].size == len(eight_bit)
    kinds = [e["event"] for e in read_jsonl(events)]
    assert kinds == ["connect", "starttls", "auth", "disconnect"]
    assert PASSWORD not in events.read_text() and PASSWORD not in store.read_text()

    with_sandbox(body, store_path=store, keep_data=False)  # appends, without bytes
    lines = list(read_jsonl(store))
    assert len(lines) == 4
    assert "data" not in lines[2] and lines[2]["size"] == len(MESSAGE)


def test_old_tls_server_is_refused_by_project_tls_context() -> None:
    async def body(sb: Sandbox) -> None:
        with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError, ConnectionError)):
            await connect(sb, "tls", login=False)

    with_sandbox(body, tls_min_version=ssl.TLSVersion.TLSv1, tls_max_version=ssl.TLSVersion.TLSv1_1)


# -- sync thread and CLI -------------------------------------------------------------------


def test_sandbox_thread_with_smtplib(tmp_path: Path) -> None:
    config = SandboxConfig(cert_dir=tmp_path / "certs", tls_port=None)
    with SandboxThread(config) as sb:
        assert Path(sb.ca_file) == tmp_path / "certs" / "ca.pem"
        context = make_tls_context(sb.ca_file)
        assert sb.starttls_port is not None
        with smtplib.SMTP("127.0.0.1", sb.starttls_port, timeout=10) as client:
            client.starttls(context=context)
            client.login(USER, PASSWORD)
            refused = client.sendmail(SENDER, [RECIPIENT], MESSAGE)
        assert refused == {}
        sb.wait_until(lambda: sb.stats.connections_closed == 1)
        assert sb.messages[0].data == MESSAGE
        assert sb.tls_port is None
        port = sb.starttls_port
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", port, timeout=2)


def test_cli_main_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.pop("SES_TASKS_SANDBOX_PASSWORD", None)
    assert main(["--starttls-port", "0"]) == 2
    assert "SES_TASKS_SANDBOX_PASSWORD" in capsys.readouterr().err
    assert main(["--throttle-rate", "2", "--password", "x"]) == 2
    assert "throttle_rate" in capsys.readouterr().err


def test_cli_subprocess_ready_file_and_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    store = tmp_path / "store.jsonl"
    env = {**os.environ, "SES_TASKS_SANDBOX_PASSWORD": PASSWORD}
    command = [
        sys.executable, "-m", "ses_tasks.sandbox",
        "--starttls-port", "0", "--tls-port", "0",
        "--cert-dir", str(tmp_path / "certs"), "--store", str(store),
        "--ready-file", str(ready),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "sandbox never became ready"
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        assert info["pid"] == process.pid

        async def body() -> list[str]:
            replies = []
            context = make_tls_context(info["ca_file"])
            for port, implicit in ((info["starttls_port"], False), (info["tls_port"], True)):
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=port,
                    tls_context=context,
                    use_tls=implicit,
                    start_tls=not implicit,
                )
                await client.connect()
                await client.login(USER, PASSWORD)
                replies.append(await send(client))
                await client.quit()
            return replies

        replies = run(body())
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    stored = read_messages(store)
    assert [f"Ok {m.ses_message_id}" for m in stored] == replies
    assert "2 messages accepted" in stderr
    assert PASSWORD not in stderr
