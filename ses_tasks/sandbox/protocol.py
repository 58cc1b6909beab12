"""One SMTP session speaking like SES, on top of aiosmtpd's ``SMTP`` protocol.

aiosmtpd does the parsing, STARTTLS upgrade, AUTH exchanges and DATA framing; this
subclass changes what SES does differently: the EHLO lines, the reply wording, AUTH only
after TLS (in both modes), refusals after DATA, latency before every reply, and the
per-session bookkeeping.
"""

from __future__ import annotations

import asyncio
import hmac
import random
import re
import secrets
import ssl
import string
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from ses_tasks.sandbox.config import SES_HOSTNAME, SandboxConfig, SandboxStats, SessionRecord
from ses_tasks.sandbox.faults import (
    AUTH_FAILED_REPLY,
    AUTH_OK_REPLY,
    AUTH_REQUIRED_REPLY,
    IDLE_TIMEOUT_REPLY,
    MESSAGE_TOO_LONG_REPLY,
    SESSION_LIMIT_REPLY,
    STARTTLS_FIRST_REPLY,
    Faults,
    denied_identity,
    iam_denied_reply,
    invalid_address_reply,
    judge_message,
    should_drop,
)
from ses_tasks.sandbox.store import AcceptedMessage, JsonlWriter
from ses_tasks.smtp.endpoint import PortMode

__all__ = ["SES_MESSAGE_ID_RE", "Runtime", "SesSMTP", "new_ses_message_id"]

#: ``0107017033dbb64d-be13a01e-dbf1-44b7-b876-3622165dacc1-000000``
SES_MESSAGE_ID_RE = re.compile(
    r"[0-9a-f]{16}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-000000"
)
#: A session nobody configured an idle timeout for still ends, like aiosmtpd's default.
SESSION_TIMEOUT_S = 300.0
#: Commands SES answers before STARTTLS on the STARTTLS ports.
ALLOWED_BEFORE_STARTTLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "QUIT"})
#: aiosmtpd's wording -> SES's wording, for replies aiosmtpd builds itself.
SES_WORDING = {
    "250 OK": "250 Ok",
    "552 Error: message size exceeds fixed maximum message size": MESSAGE_TOO_LONG_REPLY,
    "552 Error: Too much mail data": MESSAGE_TOO_LONG_REPLY,
    "530 5.7.0 Authentication required": AUTH_REQUIRED_REPLY,
}
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS_RE = re.compile(rf"{_LOCAL}@(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?")
#: ``<local@domain> params``: the common case, parsed without the email package (hot path).
_SIMPLE_PATH_RE = re.compile(r"\s*<([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+)>(.*)\Z")
_MAX_LOCAL = 64
_MAX_ADDRESS = 254


def new_ses_message_id() -> str:
    """16 hex digits (``0100`` + milliseconds), a UUID, ``-000000``: SES's shape."""
    millis = time.time_ns() // 1_000_000
    return f"{(0x0100 << 48) | millis:016x}-{uuid.uuid4()}-000000"


def is_valid_address(address: str) -> bool:
    """ASCII ``local@domain.tld`` as SES accepts it (IDN domains must come as Punycode)."""
    if len(address) > _MAX_ADDRESS or not address.isascii():
        return False
    if _ADDRESS_RE.fullmatch(address) is None:
        return False
    return len(address.rpartition("@")[0]) <= _MAX_LOCAL


def _banner_ident() -> str:
    alphabet = string.ascii_uppercase + string.digits
    tag = "".join(secrets.choice(alphabet) for _ in range(9))
    token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(20))
    return f"ESMTP SimpleEmailService-d-{tag} {token}"


class Runtime:
    """State every session of one sandbox shares. One event loop, so no locks."""

    def __init__(
        self,
        config: SandboxConfig,
        faults: Faults,
        *,
        store: JsonlWriter | None,
        events: JsonlWriter | None,
    ) -> None:
        self.config = config
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.latency_s = config.latency_ms / 1000.0
        self.stats = SandboxStats()
        self.sessions: list[SessionRecord] = []
        self.messages: list[AcceptedMessage] = []
        self.active: set[SesSMTP] = set()
        self.store = store
        self.events = events
        self.ident = _banner_ident()
        self._username = config.username.encode()
        self._password = config.password.encode()

    def event(self, kind: str, record: SessionRecord, **fields: Any) -> None:
        if self.events is not None:
            self.events.write(
                {"event": kind, "session_id": record.session_id, "at": time.time(), **fields}
            )

    def opened(self, session: SesSMTP) -> None:
        stats = self.stats
        stats.connections_opened += 1
        stats.concurrent_connections += 1
        stats.max_concurrent_connections = max(
            stats.max_concurrent_connections, stats.concurrent_connections
        )
        self.active.add(session)
        self.sessions.append(session.record)
        self.event(
            "connect",
            session.record,
            mode=session.record.mode.value,
            peer=session.record.peer,
            tls_version=session.record.tls_version,
        )

    def closed(self, session: SesSMTP) -> None:
        self.stats.connections_closed += 1
        self.stats.concurrent_connections -= 1
        self.active.discard(session)
        record = session.record
        record.closed_at = time.time()
        self.event("disconnect", record, messages=record.messages, quit="QUIT" in record.commands)

    def count_reply(self, code: int) -> None:
        counts = self.stats.replies_by_code
        counts[code] = counts.get(code, 0) + 1

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            not self.faults.auth_fail
            and isinstance(auth_data, LoginPassword)
            and hmac.compare_digest(auth_data.login, self._username)
            and hmac.compare_digest(auth_data.password, self._password)
        )
        assert isinstance(server, SesSMTP)
        record = server.record
        self.event("auth", record, ok=ok, mechanism=mechanism)
        if not ok:
            self.stats.auth_failed += 1
            return AuthResult(success=False, handled=False, message=AUTH_FAILED_REPLY)
        self.stats.auth_ok += 1
        record.authed = True
        # Keep the user name only: the session must not hold the password.
        return AuthResult(success=True, auth_data=self.config.username, message=AUTH_OK_REPLY)

    def accept(self, record: SessionRecord, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        rcpt_tos = list(envelope.rcpt_tos)
        message = AcceptedMessage(
            ses_message_id=new_ses_message_id(),
            mail_from=envelope.mail_from or "",
            rcpt_tos=rcpt_tos,
            data=bytes(content) if self.config.keep_data else None,
            size=len(content),
            session_id=record.session_id,
            mode=record.mode,
            received_at=time.time(),
        )
        stats = self.stats
        stats.messages_accepted += 1
        stats.recipients_accepted += len(rcpt_tos)
        stats.bytes_accepted += message.size
        record.messages += 1
        stats.messages_per_session[record.session_id] = record.messages
        self.messages.append(message)
        cap = self.config.max_messages_in_memory
        if cap is not None and len(self.messages) > cap:
            del self.messages[: len(self.messages) - cap]
        if self.store is not None:
            self.store.write(message.to_json())
        return message.ses_message_id


class Hooks:
    """aiosmtpd ``handle_*`` hooks: address checks, the session limit, the DATA verdict."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def handle_MAIL(
        self,
        server: SesSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        limit = self.runtime.faults.max_messages_per_session
        if limit is not None and server.record.messages >= limit:
            self.runtime.stats.session_limit_closes += 1
            self.runtime.event("session_limit", server.record, messages=server.record.messages)
            server.close_after_reply()
            return SESSION_LIMIT_REPLY
        if not is_valid_address(address):
            return invalid_address_reply(address)
        if self.runtime.faults.deny_senders_at == "mail":
            identity = denied_identity(self.runtime.faults, address)
            if identity is not None:
                return iam_denied_reply(identity)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 Ok"

    async def handle_RCPT(
        self,
        server: SesSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not is_valid_address(address):
            return invalid_address_reply(address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 Ok"

    async def handle_DATA(self, server: SesSMTP, session: Session, envelope: Envelope) -> str:
        rt = self.runtime
        faults = rt.faults
        drop = should_drop(faults, rt.rng)
        refusal = judge_message(
            faults,
            rt.rng,
            mail_from=envelope.mail_from or "",
            rcpt_tos=envelope.rcpt_tos,
            recipients_accepted=rt.stats.recipients_accepted,
            max_recipients=rt.config.max_recipients,
        )
        message_id = None
        if refusal is None and (not drop or faults.drop_after_data_accepts):
            message_id = rt.accept(server.record, envelope)
        if drop:
            rt.stats.dropped_after_data += 1
            rt.event("drop_after_data", server.record, accepted=message_id is not None)
            server.drop()
            return "451 dropped"  # never sent: the session is gone
        if refusal is not None:
            rt.stats.messages_refused += 1
            return refusal
        return f"250 Ok {message_id}"

    async def handle_RSET(self, server: SesSMTP, session: Session, envelope: Envelope) -> str:
        return "250 Ok"

    async def handle_NOOP(
        self, server: SesSMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        return "250 Ok"


class _Session(Session):
    """aiosmtpd sets the legacy ``login_data`` on every AUTH and logs a warning each time."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class SesSMTP(SMTP):
    """One connection. ``mode`` says which listener accepted it."""

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(
        self,
        runtime: Runtime,
        hooks: Hooks,
        *,
        mode: PortMode,
        tls_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # Set before SMTP.__init__, which inspects the instance.
        self._runtime = runtime
        self._implicit_tls = mode is PortMode.TLS
        self._close_after_reply = False
        self._dropped = False
        self._counted = False
        self.record = SessionRecord(session_id=secrets.token_hex(6), mode=mode)
        super().__init__(
            hooks,
            data_size_limit=runtime.config.max_message_bytes,
            enable_SMTPUTF8=False,
            decode_data=False,
            hostname=SES_HOSTNAME,
            ident=runtime.ident,
            tls_context=None if self._implicit_tls else tls_context,
            require_starttls=False,  # checked in _guarded, which also records the verb
            timeout=SESSION_TIMEOUT_S,
            auth_required=True,
            auth_require_tls=True,
            authenticator=runtime.authenticate,
            loop=loop,
        )
        # aiosmtpd only knows STARTTLS as "TLS"; _guarded enforces TLS before AUTH instead.
        self._auth_require_tls = False
        self._smtp_methods = {
            verb: self._guarded(verb, method) for verb, method in self._smtp_methods.items()
        }

    @property
    def is_tls(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    def close_after_reply(self) -> None:
        self._close_after_reply = True

    def drop(self) -> None:
        """Cut the connection now; nothing more is written."""
        self._dropped = True
        self.abort()

    def abort(self) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        elif transport is not None:
            transport.close()

    def _guarded(
        self, verb: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        commands = self.record.commands

        async def call(arg: str | None) -> None:
            commands.append(verb)
            if verb == "QUIT":
                self._runtime.stats.quits += 1
            elif not self.is_tls and verb not in ALLOWED_BEFORE_STARTTLS:
                await self.push(STARTTLS_FIRST_REPLY)
                return
            await method(arg)

        return call

    def _create_session(self) -> Session:
        return _Session(self.loop)

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrading = self._original_transport is not None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.record.tls_version = ssl_object.version()
        if upgrading:
            self._runtime.stats.starttls_upgrades += 1
            self._runtime.event("starttls", self.record, tls_version=self.record.tls_version)
        else:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and len(peer) >= 2:
                self.record.peer = f"{peer[0]}:{peer[1]}"
            self.record.opened_at = time.time()
            self._counted = True
            self._runtime.opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._runtime.closed(self)
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        idle_s = self._runtime.faults.idle_timeout_s
        super()._reset_timeout(duration or idle_s or SESSION_TIMEOUT_S)

    def _timeout_cb(self) -> None:
        if self.transport is None or self._dropped:
            return
        self._runtime.stats.idle_timeouts += 1
        self._runtime.count_reply(451)
        self._runtime.event("idle_timeout", self.record)
        self._writer.write(IDLE_TIMEOUT_REPLY.encode() + b"\r\n")
        self.transport.close()

    # -- replies --------------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        if self._dropped:
            return
        runtime = self._runtime
        if runtime.latency_s:
            await asyncio.sleep(runtime.latency_s)
            if self._dropped or self.transport is None:
                return
        if isinstance(status, str):
            status = SES_WORDING.get(status, status)
            code = status[:3]
        else:
            code = status[:3].decode("ascii", "replace")
        if code.isdigit():
            runtime.count_reply(int(code))
        await super().push(status)
        if self._close_after_reply and self.transport is not None:
            self.transport.close()
        elif runtime.faults.idle_timeout_s is not None:
            # Idle means silence since our last reply, not since the last command.
            self._reset_timeout()

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if not self.session.authenticated:
            await self.push(AUTH_REQUIRED_REPLY)
            return True
        return False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd answers unparsable addresses itself; hand them to the hooks instead,
        # so the reply is SES's 553 naming the address.
        simple = _SIMPLE_PATH_RE.match(arg)
        if simple is not None:
            return simple.group(1), simple.group(2)
        address, rest = super()._getaddr(arg)
        if address is not None:
            return address, rest
        raw = arg.strip()
        raw = raw[1:].partition(">")[0] if raw.startswith("<") else raw.partition(" ")[0]
        return raw, ""

    # -- commands SES answers differently -------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [
            f"250-{SES_HOSTNAME}",
            "250-8BITMIME",
            f"250-SIZE {self._runtime.config.max_message_bytes}",
        ]
        if self.tls_context is not None and not self.is_tls and self._offers_starttls:
            lines.append("250-STARTTLS")
        if self.is_tls:
            lines.append("250-AUTH PLAIN LOGIN")
        lines.append("250 Ok")
        await self.push("\r\n".join(lines))

    @property
    def _offers_starttls(self) -> bool:
        return self._runtime.config.advertise_starttls

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.is_tls or self.tls_context is None or not self._offers_starttls:
            await self.push("454 TLS not available")
            return
        await super().smtp_STARTTLS(arg)
