"""One SMTP connection to SES with an explicit lifecycle.

The pool never pokes at aiosmtplib: it asks a connection small questions
(:meth:`SmtpConnection.is_available`, :meth:`~SmtpConnection.has_expired`,
:meth:`~SmtpConnection.needs_check`) and calls four verbs (``open``, ``send``, ``noop``,
``quit``). A connection whose protocol state is in doubt (timeout, lost sync, 421, an
exception mid-transaction) is closed at once and never reused: a late reply could be
paired with the wrong command.

The transaction is driven command by command rather than through ``sendmail`` so we know
whether the message data had been written when a failure hit: after that point the
outcome is ``UNKNOWN`` (SES may have accepted it), before it the message can be resent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Final

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from ses_tasks.smtp.endpoint import Endpoint, PortMode
from ses_tasks.smtp.replies import (
    NO_STARTTLS_REASON,
    SendResult,
    classify_exception,
    classify_reply,
)
from ses_tasks.states import Outcome

__all__ = ["ConnectionInfo", "ConnectionState", "SmtpConnection", "encode_payload"]

log = logging.getLogger(__name__)

#: TLS versions we refuse even if a caller's context would allow them.
_OLD_TLS: Final = frozenset({"SSLv2", "SSLv3", "TLSv1", "TLSv1.1"})
#: How long a polite QUIT may take before we just drop the socket.
QUIT_TIMEOUT_S: Final = 5.0


class ConnectionState(Enum):
    #: Reserved in the pool; TCP/TLS/AUTH under way or not started yet.
    CONNECTING = "connecting"
    #: Authenticated and waiting in the pool.
    IDLE = "idle"
    #: Leased to exactly one sender.
    BUSY = "busy"
    #: Gone for good; the pool drops it.
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What a connection negotiated; ``ses-tasks check`` prints it. No secrets."""

    endpoint: str
    mode: str
    tls_server_name: str
    tls_version: str | None
    cipher: str | None
    peer_certificate_subject: str | None
    banner: str
    extensions: Mapping[str, str] = field(default_factory=dict)
    auth_methods: tuple[str, ...] = ()
    authenticated: bool = False


def encode_payload(data: bytes) -> bytes:
    """Message bytes as they go on the wire after ``354``: CRLF, dot-stuffed, terminated.

    Done once per message (not per attempt) so a resend costs no extra copies. Rendered
    messages already have CRLF lines: three counts (C speed) prove it and skip the regex.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf == data.count(b"\r") and data.endswith(b"\r\n"):
        if data.startswith(b".") or b"\n." in data:
            return PERIOD_REGEX.sub(b"..", data) + b".\r\n"
        return data + b".\r\n"
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


class SmtpConnection:
    """A single authenticated TLS session; one transaction at a time."""

    __slots__ = (
        "_auth",
        "_connect_timeout_s",
        "_endpoint",
        "_idle_check_s",
        "_local_hostname",
        "_max_age_s",
        "_max_messages",
        "_send_timeout_s",
        "_smtp",
        "_tls_context",
        "attempted",
        "in_transaction",
        "info",
        "last_used_at",
        "messages",
        "opened_at",
        "state",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        tls_context: ssl.SSLContext,
        auth: tuple[str, str] | None,
        local_hostname: str,
        connect_timeout_s: float,
        send_timeout_s: float,
        max_messages: int,
        max_age_s: float,
        idle_check_s: float,
    ) -> None:
        self._endpoint = endpoint
        self._tls_context = tls_context
        self._auth = auth
        self._local_hostname = local_hostname
        self._connect_timeout_s = connect_timeout_s
        self._send_timeout_s = send_timeout_s
        self._max_messages = max_messages
        self._max_age_s = max_age_s
        self._idle_check_s = idle_check_s
        self._smtp: aiosmtplib.SMTP | None = None
        self.state = ConnectionState.CONNECTING
        self.attempted = False
        self.in_transaction = False
        self.messages = 0
        self.opened_at = 0.0
        self.last_used_at = 0.0
        self.info: ConnectionInfo | None = None

    def __repr__(self) -> str:
        age_s = time.monotonic() - self.opened_at if self.opened_at else 0.0
        return (
            f"<SmtpConnection {self._endpoint.key} {self.state.value} "
            f"messages={self.messages} age_s={age_s:.1f}>"
        )

    # -- questions -------------------------------------------------------------------

    def is_closed(self) -> bool:
        smtp = self._smtp
        return self.state is ConnectionState.CLOSED or smtp is None or not smtp.is_connected

    def is_available(self) -> bool:
        return self.state is ConnectionState.IDLE and not self.is_closed()

    def has_expired(self, now: float) -> bool:
        """Recycle before SES ends the session (message cap) or its balancer moves."""
        return self.messages >= self._max_messages or now - self.opened_at >= self._max_age_s

    def needs_check(self, now: float) -> bool:
        """Idle long enough that SES may have dropped it silently: NOOP before reuse."""
        return now - self.last_used_at >= self._idle_check_s

    # -- verbs -----------------------------------------------------------------------

    async def open(self) -> SendResult | None:
        """Connect, TLS, EHLO, AUTH. None on success, else the failure (connection closed).

        STARTTLS mode refuses to go on when the server does not offer STARTTLS, and no
        mode ever sends AUTH over a connection that is not TLS.
        """
        self.attempted = True
        self.state = ConnectionState.CONNECTING
        endpoint = self._endpoint
        tls_mode = endpoint.mode is PortMode.TLS
        timeout_s = self._connect_timeout_s
        stage = "connect"
        try:
            smtp = await self._make_client(tls_mode)
            greeting = await smtp.connect(timeout=timeout_s)
            stage = "ehlo"
            await smtp.ehlo(timeout=timeout_s)
            if not tls_mode:
                if not smtp.supports_extension("starttls"):
                    await self._quit_quietly()
                    return SendResult(Outcome.FATAL, 0, NO_STARTTLS_REASON, reconnect=True)
                stage = "starttls"
                await smtp.starttls(
                    server_hostname=endpoint.tls_server_name,
                    tls_context=self._tls_context,
                    timeout=timeout_s,
                )
                stage = "ehlo"
                await smtp.ehlo(timeout=timeout_s)
            ssl_object = smtp.get_transport_info("ssl_object")
            if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
                self.abort()
                return SendResult(
                    Outcome.FATAL,
                    0,
                    "TLS handshake failed: connection is not encrypted",
                    reconnect=True,
                )
            version = ssl_object.version()
            if version in _OLD_TLS:
                await self._quit_quietly()
                return SendResult(
                    Outcome.FATAL,
                    0,
                    f"TLS handshake failed: server negotiated {version}; TLS 1.2+ required",
                    reconnect=True,
                )
            if self._auth is not None:
                stage = "auth"
                await self._login(smtp, *self._auth)
        except Exception as exc:
            result = _classify_setup_failure(exc, stage)
            if result.outcome is Outcome.FATAL and self._smtp is not None:
                await self._quit_quietly()
            self.abort()
            return result
        except BaseException:
            self.abort()
            raise
        cipher = ssl_object.cipher()
        self.info = ConnectionInfo(
            endpoint=endpoint.key,
            mode=endpoint.mode.value,
            tls_server_name=endpoint.tls_server_name,
            tls_version=version,
            cipher=cipher[0] if cipher else None,
            peer_certificate_subject=_subject(ssl_object.getpeercert()),
            banner=greeting.message,
            # aiosmtplib reads SES's closing "250 Ok" line as an extension named "ok".
            extensions={k: v for k, v in smtp.esmtp_extensions.items() if k != "ok"},
            auth_methods=tuple(smtp.server_auth_methods),
            authenticated=self._auth is not None,
        )
        self.opened_at = self.last_used_at = time.monotonic()
        self.messages = 0
        log.debug("opened %r (%s, %s)", self, version, self.info.cipher)
        return None

    async def send(self, mail_from: bytes, rcpts: Sequence[bytes], payload: bytes) -> SendResult:
        """One transaction. ``mail_from``/``rcpts`` are ``<addr>`` bytes, ``payload`` from
        :func:`encode_payload`. Never raises except for cancellation."""
        smtp = self._smtp
        if smtp is None:
            return SendResult(Outcome.TRANSIENT, 0, "not connected", reconnect=True)
        timeout_s = self._send_timeout_s
        execute = smtp.execute_command
        # Lets a refusal naming the sender (not verified) be told from one naming a recipient.
        sender = mail_from.decode("ascii", "replace").strip("<>")
        self.in_transaction = True
        data_sent = False
        try:
            reply = await execute(b"MAIL", b"FROM:" + mail_from, timeout=timeout_s)
            if reply.code != 250:
                return await self._refused(reply.code, reply.message, "mail", sender)
            for rcpt in rcpts:
                reply = await execute(b"RCPT", b"TO:" + rcpt, timeout=timeout_s)
                if reply.code != 250 and reply.code != 251:
                    return await self._refused(reply.code, reply.message, "rcpt", sender)
            reply = await execute(b"DATA", timeout=timeout_s)
            if reply.code != 354:
                return await self._refused(reply.code, reply.message, "data", sender)
            protocol = smtp.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            protocol.write(payload)
            data_sent = True
            reply = await protocol.read_response(timeout=timeout_s)
        except Exception as exc:
            self.abort()
            self.in_transaction = False
            return classify_exception(exc, data_sent=data_sent)
        self.messages += 1
        self.last_used_at = time.monotonic()
        result = classify_reply(reply.code, reply.message, stage="eom", sender=sender)
        if result.outcome is Outcome.SENT:
            self.in_transaction = False
        elif result.reconnect:
            self.abort()
        else:
            await self._reset()
        return result

    async def noop(self) -> bool:
        """Is the session still alive? On any doubt the connection is closed."""
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            self.abort()
            return False
        self.in_transaction = True  # a cancelled NOOP leaves its reply in flight
        try:
            reply = await smtp.execute_command(b"NOOP", timeout=self._connect_timeout_s)
        except Exception:
            self.abort()
            return False
        self.in_transaction = False
        if reply.code != 250:
            self.abort()
            return False
        self.last_used_at = time.monotonic()
        return True

    async def quit(self) -> None:
        """Say goodbye (QUIT) if the session is healthy, then close. Never raises."""
        await self._quit_quietly()
        self.abort()

    def abort(self) -> None:
        """Drop the socket now, without QUIT."""
        smtp = self._smtp
        if smtp is not None:
            smtp.close()
        self.state = ConnectionState.CLOSED
        self.in_transaction = False

    # -- internals -------------------------------------------------------------------

    async def _make_client(self, tls_mode: bool) -> aiosmtplib.SMTP:
        endpoint = self._endpoint
        hostname: str = endpoint.host
        port: int | None = endpoint.port
        sock: socket.socket | None = None
        if tls_mode and endpoint.tls_server_name != endpoint.host:
            # aiosmtplib names the TLS peer after the host it dials; to dial one name and
            # verify another (VPC endpoint, tunnel), hand it a connected socket.
            sock = await _connect_socket(endpoint.host, endpoint.port, self._connect_timeout_s)
            hostname, port = endpoint.tls_server_name, None
        smtp = aiosmtplib.SMTP(
            hostname=hostname,
            port=port,
            sock=sock,
            local_hostname=self._local_hostname,
            timeout=self._send_timeout_s,
            tls_context=self._tls_context,
            start_tls=False,
            use_tls=tls_mode,
        )
        self._smtp = smtp
        return smtp

    async def _login(self, smtp: aiosmtplib.SMTP, username: str, password: str) -> None:
        # One method only: aiosmtplib's login() would retry a refused AUTH with every
        # other method, doubling failed attempts against SES for bad credentials.
        methods = smtp.server_auth_methods
        timeout_s = self._connect_timeout_s
        if "login" in methods:
            await smtp.auth_login(username, password, timeout=timeout_s)
        elif "plain" in methods:
            await smtp.auth_plain(username, password, timeout=timeout_s)
        else:
            raise aiosmtplib.SMTPException(
                "No suitable authentication method found (server offers "
                f"{' '.join(methods) or 'no AUTH'})"
            )

    async def _refused(self, code: int, text: str, stage: str, sender: str) -> SendResult:
        """The server refused a command mid-transaction: RSET, or close if in doubt."""
        result = classify_reply(code, text, stage=stage, sender=sender)
        if result.outcome is Outcome.SENT:  # an unexpected success reply: lost sync
            result = SendResult(
                Outcome.TRANSIENT, code, f"unexpected reply at {stage}: {text}", reconnect=True
            )
        if result.reconnect:
            self.abort()
        else:
            await self._reset()
        self.last_used_at = time.monotonic()
        return result

    async def _reset(self) -> None:
        """RSET after a failed transaction, so the next one starts clean; close if it fails."""
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            self.abort()
            return
        try:
            reply = await smtp.execute_command(b"RSET", timeout=self._send_timeout_s)
        except Exception:
            self.abort()
            return
        if reply.code != 250:
            self.abort()
        self.in_transaction = False

    async def _quit_quietly(self) -> None:
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit(timeout=min(self._connect_timeout_s, QUIT_TIMEOUT_S))
        except Exception as exc:
            log.debug("QUIT to %s failed: %s", self._endpoint.key, exc)


def _classify_setup_failure(exc: BaseException, stage: str) -> SendResult:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if isinstance(code, int) and code >= 200 and isinstance(message, str):
        result = classify_reply(code, message, stage=stage)
        if result.outcome is not Outcome.SENT:
            return result
    result = classify_exception(exc, data_sent=False)
    if stage == "connect" and result.outcome is Outcome.TRANSIENT:
        return replace(result, unreachable=True)
    return result


def _subject(cert: object) -> str | None:
    if not isinstance(cert, dict):
        return None
    parts = [f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn]
    return ", ".join(parts) or None


async def _connect_socket(host: str, port: int, timeout_s: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s)
    last: BaseException | None = None
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout_s)
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise aiosmtplib.SMTPConnectError(f"Error connecting to {host} on port {port}: {last}")
