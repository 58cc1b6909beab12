"""SmtpPool against the local SES sandbox, over real TLS in both port modes."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from ses_tasks.errors import ConfigurationError, EndpointFatalError, TLSPolicyError
from ses_tasks.sandbox import Faults, Sandbox, SandboxConfig
from ses_tasks.smtp import SendResult, SmtpPool, to_error
from ses_tasks.smtp.endpoint import Endpoint, PortMode, make_tls_context, resolve_endpoint
from ses_tasks.smtp.replies import NO_STARTTLS_REASON
from ses_tasks.states import Outcome

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
USERNAME = "AKIAEXAMPLE"
PASSWORD = "s3cret-never-printed"
SENDER = "sender@example.com"
RCPT = "rcpt@example.com"
BODY = b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
MODES = [PortMode.STARTTLS, PortMode.TLS]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def sandbox(**overrides: Any) -> Sandbox:
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "starttls_port": 0,
        "tls_port": 0,
        "username": USERNAME,
        "password": PASSWORD,
        "latency_ms": 0,
        "advertise_starttls": True,
        "faults": Faults(),
    }
    config.update(overrides)
    return Sandbox(SandboxConfig(**config))


def endpoint_for(sb: Sandbox, mode: PortMode, **kw: Any) -> Endpoint:
    port = sb.starttls_port if mode is PortMode.STARTTLS else sb.tls_port
    assert port is not None
    return resolve_endpoint(host=kw.pop("host", "localhost"), port=port, mode=mode, **kw)


def make_pool(sb: Sandbox, mode: PortMode, **kw: Any) -> SmtpPool:
    endpoint = kw.pop("endpoint", None) or endpoint_for(sb, mode)
    kw.setdefault("tls_context", make_tls_context(ca_file=sb.ca_file))
    kw.setdefault("username", USERNAME)
    kw.setdefault("password", PASSWORD)
    kw.setdefault("connect_timeout_s", 5.0)
    kw.setdefault("send_timeout_s", 5.0)
    return SmtpPool(endpoint, **kw)


@asynccontextmanager
async def pool_on(sb: Sandbox, mode: PortMode, **kw: Any):  # type: ignore[no-untyped-def]
    pool = make_pool(sb, mode, **kw)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


def messages(n: int) -> list[tuple[str, list[str], bytes]]:
    return [(SENDER, [f"r{i}@example.com"], BODY) for i in range(n)]


def outcomes(results: list[SendResult]) -> dict[Outcome, int]:
    counts: dict[Outcome, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    return counts


async def wait_for(predicate: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


def with_sandbox(
    body: Callable[[Sandbox], Awaitable[None]], **overrides: Any
) -> Callable[[], None]:
    async def main() -> None:
        async with sandbox(**overrides) as sb:
            await body(sb)

    return lambda: run(main())


# -- sending -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_send_returns_sent_with_the_id_the_server_recorded(mode: PortMode) -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, mode) as pool:
            result = await pool.send(SENDER, [RCPT, "cc@example.com"], BODY)
        assert result.outcome is Outcome.SENT
        assert result.code == 250
        [accepted] = sb.messages
        assert result.ses_message_id == accepted.ses_message_id
        assert accepted.mail_from == SENDER
        assert accepted.rcpt_tos == [RCPT, "cc@example.com"]
        assert accepted.data is not None and b"hello" in accepted.data
        [session] = sb.sessions
        assert session.tls_version in ("TLSv1.2", "TLSv1.3")
        if mode is PortMode.STARTTLS:
            assert session.commands[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]
        else:
            assert session.commands[:2] == ["EHLO", "AUTH"]
        assert session.commands[-1] == "QUIT"

    with_sandbox(body)()


def test_dot_stuffing_and_bare_newlines_reach_the_server_intact() -> None:
    async def body(sb: Sandbox) -> None:
        data = b"Subject: dots\n\n.leading dot\n..two\nend"
        async with pool_on(sb, PortMode.STARTTLS) as pool:
            result = await pool.send(SENDER, [RCPT], data)
        assert result.outcome is Outcome.SENT
        assert sb.messages[0].data == b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nend\r\n"

    with_sandbox(body)()


def test_tls_mode_dialing_an_ip_verifies_the_tls_server_name() -> None:
    async def body(sb: Sandbox) -> None:
        for mode in MODES:
            endpoint = endpoint_for(sb, mode, host="127.0.0.1", tls_server_name="localhost")
            async with pool_on(sb, mode, endpoint=endpoint) as pool:
                assert (await pool.send(SENDER, [RCPT], BODY)).outcome is Outcome.SENT
            wrong = endpoint_for(sb, mode, tls_server_name="mail.example.org")
            async with pool_on(sb, mode, endpoint=wrong, min_size=0) as pool:
                result = await pool.send(SENDER, [RCPT], BODY)
            assert result.outcome is Outcome.FATAL
            assert result.reason.startswith("certificate verify failed: Hostname mismatch")
        assert len(sb.messages) == 2
        assert sb.stats.auth_ok == 2

    with_sandbox(body)()


# -- TLS policy and credentials ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_untrusted_certificate_is_fatal_with_a_clear_reason(mode: PortMode, tmp_path: Path) -> None:
    stranger = trustme.CA()
    ca_file = tmp_path / "other-ca.pem"
    stranger.cert_pem.write_to_path(str(ca_file))

    async def body(sb: Sandbox) -> None:
        context = make_tls_context(ca_file=str(ca_file))
        async with pool_on(sb, mode, tls_context=context, min_size=0) as pool:
            result = await pool.send(SENDER, [RCPT], BODY)
        assert result.outcome is Outcome.FATAL
        assert result.code == 0
        assert result.reason.startswith("certificate verify failed: ")
        assert "issuer" in result.reason
        assert isinstance(to_error(result), TLSPolicyError)
        assert sb.stats.auth_ok + sb.stats.auth_failed == 0
        assert all("AUTH" not in s.commands for s in sb.sessions)
        assert sb.messages == []

    with_sandbox(body)()


def test_server_without_starttls_is_fatal_and_never_sees_auth() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, min_size=0) as pool:
            first = await pool.send(SENDER, [RCPT], BODY)
            second = await pool.send(SENDER, [RCPT], BODY)
        assert first.outcome is Outcome.FATAL
        assert first.reason == NO_STARTTLS_REASON
        assert isinstance(to_error(first), TLSPolicyError)
        assert second == first  # the cool-down answers without reconnecting
        [session] = sb.sessions
        assert session.commands == ["EHLO", "QUIT"]
        assert sb.stats.auth_ok + sb.stats.auth_failed == 0

    with_sandbox(body, advertise_starttls=False)()


@pytest.mark.parametrize("mode", MODES)
def test_bad_credentials_are_fatal_and_do_not_hammer_the_server(mode: PortMode) -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, mode, size=4, min_size=0, password="wrong") as pool:
            results = await pool.send_many(messages(40))
            assert pool.fatal is not None
            assert PASSWORD not in repr(pool)
        assert outcomes(results) == {Outcome.FATAL: 40}
        assert results[0].code == 535
        assert results[0].reason == "Authentication Credentials Invalid"
        assert type(to_error(results[0])) is EndpointFatalError
        # At most one attempt per slot that was already connecting when the first failed.
        assert 1 <= sb.stats.auth_failed <= 4
        assert sb.stats.connections_opened == sb.stats.auth_failed

    with_sandbox(body)()


def test_fatal_cool_down_ends_and_sending_resumes() -> None:
    async def body(sb: Sandbox) -> None:
        sb.faults.auth_fail = True
        async with pool_on(sb, PortMode.STARTTLS, min_size=0, fatal_cooldown_s=0.3) as pool:
            assert (await pool.send(SENDER, [RCPT], BODY)).outcome is Outcome.FATAL
            opened = sb.stats.connections_opened
            assert (await pool.send(SENDER, [RCPT], BODY)).outcome is Outcome.FATAL
            assert sb.stats.connections_opened == opened  # answered from the cool-down
            sb.faults.auth_fail = False
            await wait_for(lambda: pool.fatal is None)
            result = await pool.send(SENDER, [RCPT], BODY)
        assert result.outcome is Outcome.SENT
        assert len(sb.messages) == 1

    with_sandbox(body)()


def test_account_paused_is_fatal_for_the_whole_pool() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.TLS, size=2) as pool:
            results = await pool.send_many(messages(10))
        assert outcomes(results) == {Outcome.FATAL: 10}
        assert "Sending paused" in results[0].reason
        assert sb.stats.messages_refused <= 2

    with_sandbox(body, faults=Faults(account_paused=True))()


@pytest.mark.parametrize("stage", ["mail", "data"])
def test_a_denied_sender_identity_is_not_fatal_for_the_pool(stage: str) -> None:
    """IAM denies ``denied@example.com`` (at MAIL FROM or after DATA): only its mail fails."""

    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, size=1) as pool:
            denied = await pool.send("denied@example.com", [RCPT], BODY)
            assert pool.fatal is None  # no cool-down
            other = await pool.send(SENDER, [RCPT], BODY)
            sb.faults.deny_senders = frozenset()
            sb.faults.reject_recipients = frozenset({"unverified@example.com"})
            unverified = await pool.send("unverified@example.com", [RCPT], BODY)
            again = await pool.send(SENDER, [RCPT], BODY)
            assert pool.fatal is None and pool.stats.opened == 1  # one connection throughout
        assert (denied.outcome, denied.code) == (Outcome.PERMANENT, 554)
        assert denied.identity == "denied@example.com"
        assert "not authorized to perform 'ses:SendRawEmail'" in denied.reason
        assert (unverified.outcome, unverified.identity) == (
            Outcome.PERMANENT,
            "unverified@example.com",
        )
        assert other.outcome is again.outcome is Outcome.SENT
        assert [m.mail_from for m in sb.messages] == [SENDER, SENDER]
        refused = ["MAIL", "RSET"] if stage == "mail" else ["MAIL", "RCPT", "DATA", "RSET"]
        [session] = sb.sessions
        assert session.commands[4 : 4 + len(refused)] == refused  # after EHLO..AUTH

    faults = Faults(deny_senders=frozenset({"denied@example.com"}), deny_senders_at=stage)
    with_sandbox(body, faults=faults)()


def test_without_credentials_no_auth_is_sent_but_tls_still_is() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, username=None, password=None) as pool:
            result = await pool.send(SENDER, [RCPT], BODY)
        # The sandbox, like SES, wants AUTH: 530 is a configuration error.
        assert (result.outcome, result.code) == (Outcome.FATAL, 530)
        [session] = sb.sessions
        assert session.commands[:3] == ["EHLO", "STARTTLS", "EHLO"]
        assert "AUTH" not in session.commands

    with_sandbox(body)()


# -- the pool's lifecycle ----------------------------------------------------------------


def test_500_messages_over_4_connections_recycled_every_100() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, size=4, max_messages_per_connection=100) as pool:
            results = await pool.send_many(messages(500))
            stats = pool.stats
        assert outcomes(results) == {Outcome.SENT: 500}
        assert sorted(r.ses_message_id or "" for r in results) == sorted(
            m.ses_message_id for m in sb.messages
        )
        assert [m.rcpt_tos[0] for m in sb.messages].count("r499@example.com") == 1
        assert sb.stats.max_concurrent_connections <= 4
        assert sb.stats.connections_opened == stats.opened
        full = sum(1 for s in sb.sessions if s.messages == 100)
        assert stats.recycled == full
        assert math.ceil(500 / 100) <= stats.opened <= 4 + stats.recycled
        assert all(s.messages <= 100 for s in sb.sessions)
        assert stats.reconnects == 0
        assert stats.sends == 500
        assert sb.stats.quits == sb.stats.connections_opened  # every one said goodbye

    with_sandbox(body)()


def test_results_come_back_in_input_order() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.TLS, size=3) as pool:
            batch = messages(30)
            batch[7] = (SENDER, ["not-an-address"], BODY)
            results = await pool.send_many(batch)
        assert [r.outcome for r in results].count(Outcome.SENT) == 29
        assert (results[7].outcome, results[7].code) == (Outcome.PERMANENT, 553)
        by_id = {m.ses_message_id: m.rcpt_tos[0] for m in sb.messages}
        for index, result in enumerate(results):
            if index != 7:
                assert by_id[result.ses_message_id or ""] == f"r{index}@example.com"

    with_sandbox(body)()


def test_refused_messages_are_reset_and_the_connection_reused() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, size=1) as pool:
            bad_rcpt = await pool.send(SENDER, [RCPT, "user@invalid_domain"], BODY)
            unverified = await pool.send(SENDER, ["unverified@example.com"], BODY)
            good = await pool.send(SENDER, [RCPT], BODY)
            assert pool.stats.opened == 1
        assert (bad_rcpt.outcome, bad_rcpt.code) == (Outcome.PERMANENT, 553)
        assert (unverified.outcome, unverified.code) == (Outcome.PERMANENT, 554)
        assert "not verified" in unverified.reason
        assert good.outcome is Outcome.SENT
        [session] = sb.sessions
        assert session.commands[4:] == [
            "MAIL", "RCPT", "RCPT", "RSET",
            "MAIL", "RCPT", "DATA", "RSET",
            "MAIL", "RCPT", "DATA", "QUIT",
        ]  # fmt: skip

    with_sandbox(body, faults=Faults(reject_recipients=frozenset({"unverified@example.com"})))()


def test_unsendable_addresses_are_refused_before_anything_is_sent() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, min_size=0) as pool:
            non_ascii = await pool.send(SENDER, ["jöe@example.com"], BODY)
            spaces = await pool.send("bad sender@example.com", [RCPT], BODY)
            nobody = await pool.send(SENDER, [], BODY)
        assert non_ascii.outcome is Outcome.PERMANENT
        assert "ASCII" in non_ascii.reason
        assert spaces.outcome is Outcome.PERMANENT
        assert "not permitted" in spaces.reason
        assert (nobody.outcome, nobody.reason) == (Outcome.PERMANENT, "message has no recipients")
        assert sb.stats.connections_opened == 0

    with_sandbox(body)()


def test_session_limit_421_is_retried_on_a_new_connection() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.TLS, size=2) as pool:
            results = await pool.send_many(messages(50))
            stats = pool.stats
        assert outcomes(results) == {Outcome.SENT: 50}
        assert len(sb.messages) == 50  # no duplicates
        assert sorted(m.rcpt_tos[0] for m in sb.messages) == sorted(
            f"r{i}@example.com" for i in range(50)
        )
        assert sb.stats.session_limit_closes >= 50 // 7 - 1
        assert stats.reconnects == sb.stats.session_limit_closes
        assert all(s.messages <= 7 for s in sb.sessions)
        assert sb.stats.max_concurrent_connections <= 2

    with_sandbox(body, faults=Faults(max_messages_per_session=7))()


def test_drop_after_data_is_unknown_and_not_resent() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS) as pool:
            lost = await pool.send(SENDER, [RCPT], BODY)
            sb.faults.drop_after_data_rate = 0.0
            after = await pool.send(SENDER, [RCPT], BODY)
            assert pool.stats.opened == 2
        assert lost.outcome is Outcome.UNKNOWN
        assert lost.ses_message_id is None
        assert "SES may have accepted it" in lost.reason
        assert sb.stats.dropped_after_data == 1  # one attempt: not resent
        assert after.outcome is Outcome.SENT
        assert len(sb.messages) == 1

    with_sandbox(body, faults=Faults(drop_after_data_rate=1.0))()


def test_idle_connection_is_noop_checked_before_reuse() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, size=1, idle_check_s=0.0) as pool:
            for _ in range(2):
                assert (await pool.send(SENDER, [RCPT], BODY)).outcome is Outcome.SENT
            assert pool.stats.opened == 1
        [session] = sb.sessions
        assert session.commands[4:] == [
            "NOOP", "MAIL", "RCPT", "DATA", "NOOP", "MAIL", "RCPT", "DATA", "QUIT",
        ]  # fmt: skip

    with_sandbox(body)()


def test_connection_past_the_server_idle_timeout_is_replaced_transparently() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.TLS, size=1, idle_check_s=0.05) as pool:
            assert (await pool.send(SENDER, [RCPT], BODY)).outcome is Outcome.SENT
            await sb.wait_until(lambda: sb.stats.idle_timeouts == 1 and sb.sessions[0].closed)
            result = await pool.send(SENDER, [RCPT], BODY)
            stats = pool.stats
        assert result.outcome is Outcome.SENT
        assert (stats.opened, stats.reconnects) == (2, 1)
        first, second = sb.sessions
        assert (first.messages, second.messages) == (1, 1)
        assert len(sb.messages) == 2

    with_sandbox(body, faults=Faults(idle_timeout_s=0.2))()


def test_cancelled_send_drops_its_connection() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, size=1) as pool:
            await wait_for(lambda: pool.stats.idle == 1)
            sb.latency_ms = 300
            task = asyncio.create_task(pool.send(SENDER, [RCPT], BODY))
            await wait_for(lambda: "MAIL" in sb.sessions[0].commands)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.stats.closed == 1 and pool.stats.in_use == 0
            sb.latency_ms = 0
            result = await pool.send(SENDER, [RCPT], BODY)
        assert result.outcome is Outcome.SENT
        assert len(sb.sessions) == 2 and sb.sessions[1].messages == 1

    with_sandbox(body)()


def test_waiters_queue_for_the_single_connection() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.STARTTLS, size=1) as pool:
            await wait_for(lambda: pool.stats.idle == 1)
            sb.latency_ms = 20
            tasks = [asyncio.create_task(pool.send(*m)) for m in messages(5)]
            await wait_for(lambda: pool.stats.waiting == 4)
            assert "waiting=4" in repr(pool)
            results = await asyncio.gather(*tasks)
        assert outcomes(results) == {Outcome.SENT: 5}
        # FIFO: waiters are served in the order they came.
        assert [m.rcpt_tos[0] for m in sb.messages] == [f"r{i}@example.com" for i in range(5)]
        assert sb.stats.max_concurrent_connections == 1

    with_sandbox(body)()


def test_close_sends_quit_on_every_connection_and_is_idempotent() -> None:
    async def body(sb: Sandbox) -> None:
        pool = make_pool(sb, PortMode.STARTTLS, size=4)
        await pool.start()
        await pool.send_many(messages(40))
        assert pool.stats.idle == 4
        await pool.close()
        await pool.close()
        assert repr(pool).endswith("idle=0 busy=0 waiting=0 opened=4 closed=4>")
        await sb.wait_until(lambda: sb.stats.concurrent_connections == 0)
        assert len(sb.sessions) == 4
        assert all(s.commands[-1] == "QUIT" for s in sb.sessions)
        assert sb.stats.quits == 4
        with pytest.raises(RuntimeError, match="closed"):
            await pool.send(SENDER, [RCPT], BODY)

    with_sandbox(body)()


def test_close_while_sends_wait_returns_transient_for_the_waiters() -> None:
    async def body(sb: Sandbox) -> None:
        pool = make_pool(sb, PortMode.STARTTLS, size=1)
        await pool.start()
        sb.latency_ms = 50
        tasks = [asyncio.create_task(pool.send(*m)) for m in messages(3)]
        await wait_for(lambda: pool.stats.waiting == 2)
        await pool.close()
        results = await asyncio.gather(*tasks)
        assert results[0].outcome is Outcome.SENT  # the one in flight finished
        assert [r.outcome for r in results[1:]] == [Outcome.TRANSIENT, Outcome.TRANSIENT]
        assert "pool closed" in results[1].reason
        await sb.wait_until(lambda: sb.stats.concurrent_connections == 0)
        assert sb.sessions[0].commands[-1] == "QUIT"

    with_sandbox(body)()


def test_warm_start_opens_min_size_connections_in_the_background() -> None:
    async def body(sb: Sandbox) -> None:
        async with pool_on(sb, PortMode.TLS, size=5, min_size=3) as pool:
            await wait_for(lambda: pool.stats.idle == 3)
            assert repr(pool) == (
                f"<SmtpPool tls://localhost:{sb.tls_port} idle=3 busy=0 waiting=0 "
                "opened=3 closed=0>"
            )
            assert sb.stats.auth_ok == 3
            assert PASSWORD not in repr(pool) and PASSWORD not in str(pool.stats)

    with_sandbox(body)()


# -- probe -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_probe_reports_tls_and_extensions(mode: PortMode) -> None:
    async def body(sb: Sandbox) -> None:
        pool = make_pool(sb, mode)
        info = await pool.probe()
        await pool.close()
        assert info.mode == mode.value
        assert info.tls_version in ("TLSv1.2", "TLSv1.3")
        assert info.cipher
        assert info.peer_certificate_subject and "trustme" in info.peer_certificate_subject
        assert {"auth", "8bitmime", "size"} <= set(info.extensions)
        assert "starttls" not in info.extensions  # read again after TLS
        assert "login" in info.auth_methods
        assert info.authenticated
        assert "SimpleEmailService" in info.banner
        assert PASSWORD not in repr(info)
        [session] = sb.sessions
        assert "AUTH" in session.commands and "MAIL" not in session.commands
        assert session.commands[-1] == "QUIT"

    with_sandbox(body)()


def test_probe_raises_the_matching_error() -> None:
    async def body(sb: Sandbox) -> None:
        pool = make_pool(sb, PortMode.STARTTLS)
        with pytest.raises(TLSPolicyError, match="STARTTLS"):
            await pool.probe()

    with_sandbox(body, advertise_starttls=False)()


# -- misuse ------------------------------------------------------------------------------


def test_misuse_raises_instead_of_returning_a_result() -> None:
    endpoint = resolve_endpoint(host="localhost", port=2587, mode="starttls")
    context = make_tls_context()
    with pytest.raises(ConfigurationError, match="POOL_SIZE"):
        SmtpPool(endpoint, tls_context=context, username=None, password=None, size=0)
    with pytest.raises(ConfigurationError, match="together"):
        SmtpPool(endpoint, tls_context=context, username=USERNAME, password=None)
    pool = SmtpPool(endpoint, tls_context=context, username=USERNAME, password=PASSWORD)
    assert PASSWORD not in repr(pool)
    with pytest.raises(TypeError, match="sequence"):
        run(pool.send(SENDER, RCPT, BODY))
