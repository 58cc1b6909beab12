"""Warm, bounded pool of authenticated SMTP connections to one SES endpoint.

Shaped like httpcore's pool: the pool's state is a list of connections, a stack of idle
ones and a FIFO of waiters; state changes happen in small synchronous methods, network
I/O happens outside them, and goodbyes (QUIT) are shielded from cancellation. A
connection's slot is held until its QUIT finishes, so the server never sees more than
``size`` connections from one pool.

Delivery outcomes are results, not exceptions: :meth:`SmtpPool.send` returns a
:class:`~ses_tasks.smtp.replies.SendResult` for anything the server or the network does.

Fatal cool-down: a ``FATAL`` result (bad credentials, TLS policy, IAM denial naming no
identity, paused account) means every other message would fail the same way, so for
``fatal_cooldown_s`` (30 s by default) the pool answers every send with that same result
without touching the server. Pending and new sends get it at once; after the cool-down the
next send tries again. A refusal of one sending identity (``SendResult.identity``: an IAM
denial on ``identity/x@example.com``, an unverified sender) is ``PERMANENT``, not
``FATAL``: it starts no cool-down, and sends from other identities go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX

from ses_tasks.errors import ConfigurationError
from ses_tasks.smtp.connection import (
    ConnectionInfo,
    ConnectionState,
    SmtpConnection,
    encode_payload,
)
from ses_tasks.smtp.endpoint import Endpoint
from ses_tasks.smtp.replies import SendResult, to_error
from ses_tasks.states import Outcome

__all__ = [
    "DEFAULT_FATAL_COOLDOWN_S",
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_MESSAGES_PER_CONNECTION",
    "DEFAULT_POOL_SIZE",
    "PoolStats",
    "SmtpPool",
]

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE: Final = 10
DEFAULT_MIN_SIZE: Final = 1
#: SES ends sessions after ~350 messages (observed); recycle well before.
DEFAULT_MAX_MESSAGES_PER_CONNECTION: Final = 300
DEFAULT_MAX_AGE_S: Final = 300.0
#: SES closes connections after ~10 s of silence; check anything idle for half that.
DEFAULT_IDLE_CHECK_S: Final = 5.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
DEFAULT_SEND_TIMEOUT_S: Final = 60.0
DEFAULT_FATAL_COOLDOWN_S: Final = 30.0
#: How long close() waits for a stray QUIT task before giving up on it.
QUIT_WAIT_S: Final = 5.0

_POOL_CLOSED: Final = SendResult(
    Outcome.TRANSIENT, 0, "pool closed before the message was sent", reconnect=True
)


class _PoolClosedError(Exception):
    """Wakes waiters when the pool closes; never leaves this module."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of the pool's counters (cumulative) and gauges (now)."""

    #: Connection attempts made (successful or not).
    opened: int
    #: Connections gone (QUIT, dropped, failed to open).
    closed: int
    #: Connections retired for age or message count.
    recycled: int
    #: Connections replaced because they failed (421, lost, failed NOOP) and resends.
    reconnects: int
    #: Calls to send() that reached the pool.
    sends: int
    in_use: int
    idle: int
    waiting: int

    def __str__(self) -> str:
        return (
            f"opened={self.opened} closed={self.closed} recycled={self.recycled} "
            f"reconnects={self.reconnects} sends={self.sends} in_use={self.in_use} "
            f"idle={self.idle} waiting={self.waiting}"
        )


class SmtpPool:
    """Up to ``size`` warm connections to ``endpoint``; sends never raise for outcomes.

    ``send_timeout_s`` bounds the wait for each reply during a transaction;
    ``connect_timeout_s`` bounds each step of opening (TCP, greeting, TLS, EHLO, AUTH).
    Use as ``async with SmtpPool(...) as pool`` or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        tls_context: ssl.SSLContext,
        username: str | None,
        password: str | None,
        size: int = DEFAULT_POOL_SIZE,
        min_size: int = DEFAULT_MIN_SIZE,
        max_messages_per_connection: int = DEFAULT_MAX_MESSAGES_PER_CONNECTION,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        idle_check_s: float = DEFAULT_IDLE_CHECK_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        local_hostname: str | None = None,
        fatal_cooldown_s: float = DEFAULT_FATAL_COOLDOWN_S,
    ) -> None:
        if size < 1:
            raise ConfigurationError("POOL_SIZE", f"must be at least 1, not {size}")
        if not 0 <= min_size <= size:
            raise ConfigurationError("POOL_MIN_SIZE", f"must be within 0..{size}, not {min_size}")
        if max_messages_per_connection < 1:
            raise ConfigurationError(
                "MAX_MESSAGES_PER_CONNECTION",
                f"must be at least 1, not {max_messages_per_connection}",
            )
        for setting, value in (
            ("MAX_CONNECTION_AGE", max_age_s),
            ("CONNECT_TIMEOUT", connect_timeout_s),
            ("SEND_TIMEOUT", send_timeout_s),
        ):
            if not value > 0:
                raise ConfigurationError(setting, f"must be positive, not {value}")
        if idle_check_s < 0 or fatal_cooldown_s < 0:
            raise ConfigurationError("POOL", "idle_check_s and fatal_cooldown_s must be >= 0")
        if (username is None) != (password is None):
            raise ConfigurationError("USERNAME", "username and password go together")
        self.endpoint = endpoint
        self._tls_context = tls_context
        self._auth = (username, password) if username is not None and password is not None else None
        self._size = size
        self._min_size = min_size
        self._max_messages = max_messages_per_connection
        self._max_age_s = max_age_s
        self._idle_check_s = idle_check_s
        self._connect_timeout_s = connect_timeout_s
        self._send_timeout_s = send_timeout_s
        self._local_hostname = local_hostname or _default_local_hostname()
        self._fatal_cooldown_s = fatal_cooldown_s

        self._connections: list[SmtpConnection] = []
        self._idle: list[SmtpConnection] = []  # a stack: the most recently used first
        self._waiters: deque[asyncio.Future[SmtpConnection]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warmers: set[asyncio.Task[None]] = set()
        self._fatal: SendResult | None = None
        self._fatal_until = 0.0
        self._warming = 0
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None

        self._opened = 0
        self._closed_count = 0
        self._recycled = 0
        self._reconnects = 0
        self._sends = 0

    # -- public ----------------------------------------------------------------------

    def __repr__(self) -> str:
        idle = len(self._idle)
        return (
            f"<SmtpPool {self.endpoint.key} idle={idle} "
            f"busy={len(self._connections) - idle} waiting={len(self._waiters)} "
            f"opened={self._opened} closed={self._closed_count}>"
        )

    @property
    def stats(self) -> PoolStats:
        idle = len(self._idle)
        return PoolStats(
            opened=self._opened,
            closed=self._closed_count,
            recycled=self._recycled,
            reconnects=self._reconnects,
            sends=self._sends,
            in_use=len(self._connections) - idle,
            idle=idle,
            waiting=len(self._waiters),
        )

    @property
    def fatal(self) -> SendResult | None:
        """The FATAL result every send gets during the cool-down, else None."""
        return self._active_fatal()

    async def __aenter__(self) -> SmtpPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Begin opening ``min_size`` connections in the background; returns at once.

        A failure while warming is logged (and a FATAL one starts the cool-down); sends
        open connections on demand anyway.
        """
        if self._closed:
            raise RuntimeError("pool is closed")
        while len(self._connections) < min(self._min_size, self._size):
            conn = self._new_connection()
            self._warming += 1
            self._spawn(self._warm(conn))

    async def send(self, envelope_from: str, recipients: Sequence[str], data: bytes) -> SendResult:
        """Send one message; the result says what happened. Raises only on misuse.

        A 421 or a connection lost before the data went out is retried once, on another
        connection, before a result is returned. A loss after the data went out returns
        ``UNKNOWN`` and is not resent.
        """
        if self._closed:
            raise RuntimeError("pool is closed")
        if isinstance(recipients, str):
            raise TypeError("recipients must be a sequence of addresses, not one string")
        fatal = self._active_fatal()
        if fatal is not None:
            return fatal
        try:
            mail_from = _envelope_address(envelope_from)
            rcpts = [_envelope_address(r) for r in recipients]
        except ValueError as exc:
            return SendResult(Outcome.PERMANENT, 0, str(exc))
        if not rcpts:
            return SendResult(Outcome.PERMANENT, 0, "message has no recipients")
        payload = encode_payload(data)
        self._sends += 1
        result = await self._attempt(mail_from, rcpts, payload)
        if result.outcome is Outcome.TRANSIENT and result.reconnect and not self._closed:
            self._reconnects += 1
            result = await self._attempt(mail_from, rcpts, payload)
        return result

    async def send_many(
        self, items: Iterable[tuple[str, Sequence[str], bytes]]
    ) -> list[SendResult]:
        """Send many messages over every connection of the pool; results in input order."""
        batch = list(items)
        results: list[SendResult | None] = [None] * len(batch)
        cursor = iter(range(len(batch)))

        async def worker() -> None:
            for index in cursor:
                envelope_from, recipients, data = batch[index]
                results[index] = await self.send(envelope_from, recipients, data)

        workers = min(self._size, len(batch))
        if workers == 1:
            await worker()
        elif workers:
            await asyncio.gather(*(worker() for _ in range(workers)))
        return cast("list[SendResult]", results)

    async def probe(self) -> ConnectionInfo:
        """Open one extra connection (TLS, AUTH), describe it, QUIT. Sends nothing.

        Raises the matching :mod:`ses_tasks.errors` exception (``TLSPolicyError``,
        ``EndpointFatalError``, ``TransientDeliveryError``) when the endpoint is not usable.
        """
        conn = self._make_connection()
        failure = await conn.open()
        if failure is not None:
            raise to_error(failure)
        info = conn.info
        await asyncio.shield(conn.quit())
        if info is None:  # open() always sets it on success
            raise RuntimeError("connection opened without describing itself")
        return info

    async def close(self) -> None:
        """QUIT every connection and stop; idempotent and shielded from cancellation.

        Sends waiting for a connection get a TRANSIENT "pool closed" result; sends in
        flight finish (up to ``send_timeout_s``) and their connections are then QUIT.
        """
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    # -- the sending path ------------------------------------------------------------

    async def _attempt(self, mail_from: bytes, rcpts: list[bytes], payload: bytes) -> SendResult:
        try:
            conn = await self._acquire()
        except _PoolClosedError:
            return _POOL_CLOSED
        try:
            conn = await self._ready(conn)
            if conn.state is ConnectionState.CONNECTING:
                if self._closed:  # handed a slot just before close(): open nothing new
                    return _POOL_CLOSED
                fatal = self._active_fatal()
                if fatal is not None:
                    return fatal
                self._opened += 1
                failure = await conn.open()
                if failure is not None:
                    self._note(failure)
                    return failure
                conn.state = ConnectionState.BUSY
            result = await conn.send(mail_from, rcpts, payload)
            self._note(result)
            return result
        finally:
            await self._release(conn)

    async def _acquire(self) -> SmtpConnection:
        """A connection leased to the caller: idle, or a new slot to open, or wait (FIFO)."""
        if self._closed:
            raise _PoolClosedError
        if self._idle and not self._waiters:
            conn = self._idle.pop()
            conn.state = ConnectionState.BUSY
            return conn
        # A connection being warmed that no waiter has claimed yet will be free sooner
        # than a new one: wait for it rather than open one more.
        if self._warming <= len(self._waiters) and len(self._connections) < self._size:
            return self._new_connection()
        waiter: asyncio.Future[SmtpConnection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection just as we were cancelled: pass it on.
                self._settle(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    async def _ready(self, conn: SmtpConnection) -> SmtpConnection:
        """Vet a reused connection (closed? expired? idle too long?) before a send.

        Any replacement happens synchronously at the end, so a cancellation never leaves
        the caller holding a connection the pool has already swapped out.
        """
        if conn.state is ConnectionState.CONNECTING:
            return conn
        now = time.monotonic()
        if conn.is_closed():  # the server hung up while it sat idle
            conn.abort()
            self._reconnects += 1
        elif conn.has_expired(now):
            self._recycled += 1
            await self._quit_shielded(conn)
        elif conn.needs_check(now):
            if await conn.noop():
                return conn
            self._reconnects += 1
        else:
            return conn
        return self._replace(conn)

    async def _release(self, conn: SmtpConnection) -> None:
        if conn.in_transaction:  # cancelled mid-transaction: protocol state unknown
            conn.abort()
        if not conn.is_closed():
            if self._closed:
                await self._quit_shielded(conn)
            elif conn.has_expired(time.monotonic()):
                self._recycled += 1
                await self._quit_shielded(conn)
        self._settle(conn)

    async def _quit_shielded(self, conn: SmtpConnection) -> None:
        """QUIT while the slot stays taken; if our caller is cancelled, QUIT still ends."""
        task = asyncio.ensure_future(conn.quit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            conn.abort()
            raise

    # -- state changes (synchronous: no await, so no interleaving) ----------------------

    def _make_connection(self) -> SmtpConnection:
        return SmtpConnection(
            self.endpoint,
            tls_context=self._tls_context,
            auth=self._auth,
            local_hostname=self._local_hostname,
            connect_timeout_s=self._connect_timeout_s,
            send_timeout_s=self._send_timeout_s,
            max_messages=self._max_messages,
            max_age_s=self._max_age_s,
            idle_check_s=self._idle_check_s,
        )

    def _new_connection(self) -> SmtpConnection:
        conn = self._make_connection()
        self._connections.append(conn)
        return conn

    def _remove(self, conn: SmtpConnection) -> None:
        try:
            self._connections.remove(conn)
        except ValueError:
            return
        if conn.attempted:
            self._closed_count += 1
        if self._closed and not self._connections and self._drained is not None:
            self._drained.set()

    def _replace(self, conn: SmtpConnection) -> SmtpConnection:
        """Swap a dead connection for a fresh slot in place; the caller keeps the lease."""
        self._remove(conn)
        return self._new_connection()

    def _settle(self, conn: SmtpConnection) -> None:
        """Take a lease back: hand it to the next waiter, park it idle, or free its slot."""
        if conn.is_closed():
            conn.abort()
            self._remove(conn)
            if self._waiters and not self._closed:
                fresh = self._new_connection()
                if not self._hand_over(fresh):
                    self._connections.remove(fresh)
            return
        if not self._hand_over(conn):
            conn.state = ConnectionState.IDLE
            self._idle.append(conn)

    def _hand_over(self, conn: SmtpConnection) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                if conn.state is not ConnectionState.CONNECTING:
                    conn.state = ConnectionState.BUSY
                waiter.set_result(conn)
                return True
        return False

    def _note(self, result: SendResult) -> None:
        if result.outcome is Outcome.FATAL and self._fatal_cooldown_s > 0:
            if self._active_fatal() is None:
                log.warning(
                    "%s: %s; answering sends with this result for %.0f s",
                    self.endpoint.key,
                    result.reason,
                    self._fatal_cooldown_s,
                )
            self._fatal = result
            self._fatal_until = time.monotonic() + self._fatal_cooldown_s

    def _active_fatal(self) -> SendResult | None:
        if self._fatal is None:
            return None
        if time.monotonic() >= self._fatal_until:
            self._fatal = None
            return None
        return self._fatal

    # -- background work -------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        self._warmers.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._warmers.discard)

    async def _warm(self, conn: SmtpConnection) -> None:
        try:
            if self._active_fatal() is not None:
                return
            self._opened += 1
            failure = await conn.open()
            if failure is not None:
                log.warning(
                    "%s: warming a connection failed: %s", self.endpoint.key, failure.reason
                )
                self._note(failure)
            else:
                conn.state = ConnectionState.BUSY
        finally:
            self._warming -= 1
            await self._release(conn)

    async def _close(self) -> None:
        self._closed = True
        self._drained = asyncio.Event()
        for warmer in list(self._warmers):
            warmer.cancel()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_PoolClosedError())
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.state = ConnectionState.BUSY
        await asyncio.gather(*(self._release(conn) for conn in idle))
        if self._connections:
            try:
                await asyncio.wait_for(
                    self._drained.wait(), self._send_timeout_s + self._connect_timeout_s
                )
            except TimeoutError:
                for conn in list(self._connections):
                    conn.abort()
                    self._remove(conn)
        for task in list(self._tasks):
            if not task.done():
                await asyncio.wait({task}, timeout=QUIT_WAIT_S)
        log.debug("closed %r", self)


# A bare ASCII local@domain with nothing to parse: the common case, skips email.utils.
_PLAIN_ADDRESS_RE: Final = re.compile(
    r"[!#-'*+\-/-9=?A-Z^-~]+(?:\.[!#-'*+\-/-9=?A-Z^-~]+)*@[A-Za-z0-9.\-]+"
)


def _envelope_address(address: str) -> bytes:
    """``<addr>`` as 7-bit bytes, refused here (not mid-transaction) if it cannot go."""
    if _PLAIN_ADDRESS_RE.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    try:
        quoted = quote_address(address).encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(
            f"{address!r} is not 7-bit ASCII (use Punycode for the domain; "
            "SES refuses a non-ASCII local part)"
        ) from None
    if quoted == b"<>" and address.strip() not in ("", "<>"):
        raise ValueError(f"{address!r} is not an email address")
    if COMMAND_INJECTION_REGEX.search(quoted):
        raise ValueError(f"{address!r} contains control characters")
    return quoted


def _default_local_hostname() -> str:
    """The EHLO name; gethostname() needs no DNS (unlike getfqdn, aiosmtplib's default)."""
    name = socket.gethostname().strip()
    if not name or any(c.isspace() or ord(c) < 33 or ord(c) > 126 for c in name):
        return "localhost"
    return name
