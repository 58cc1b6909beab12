"""A fault-injecting TCP proxy in front of a real ``redis-server``.

The proxy listens on ``127.0.0.1:<free port>`` and runs its own asyncio loop in a
background thread, so synchronous tests drive it through a plain Python API while
clients (the test itself, worker subprocesses, Celery/kombu) connect to ``proxy.url``.

Client -> server traffic is parsed command by command (RESP arrays of bulk strings,
and inline commands). Each command is matched against the rules; unmatched commands
are forwarded untouched (consecutive commands of a pipeline in one write). Server ->
client traffic is split into RESP2/RESP3 replies so that every reply is paired with
the command it answers; a fault answering for Redis (an error) is slotted in at its
command's place, after the replies of the commands before it. Pub/sub messages,
RESP3 pushes and MONITOR output are relayed as they come.

Usage::

    with RedisFaultProxy() as proxy:
        r = redis.Redis.from_url(proxy.url_for(db=0))
        readonly = error("READONLY You can't write against a read only replica.")
        rule = proxy.add_rule("HMGET", readonly)
        with pytest.raises(redis.exceptions.ReadOnlyError):
            r.hmget("h", "a")
        assert rule.fired == 1
        proxy.add_rule(script(LUA), after_forward_close(), nth=2)   # the 2nd run's reply is lost
        proxy.add_rule("LPUSH", error("OOM ..."), for_seconds=3)     # every LPUSH for 3 s
        proxy.add_rule(key_prefix("test-x:"), hang(), count=None)   # until proxy.clear()

Limits: ``CLIENT REPLY OFF|SKIP`` is not understood (the replies would be misattributed);
an error injected inside ``MULTI`` answers that command only (Redis would also abort the
``EXEC``); a RESP2 connection that has subscribed treats any array reply that starts with
a pub/sub kind (``message``, ``subscribe`` ...) as a pushed message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ANY",
    "Action",
    "Injection",
    "Match",
    "RedisFaultProxy",
    "Rule",
    "after_forward_close",
    "close",
    "command",
    "delay",
    "error",
    "hang",
    "key_prefix",
    "nil",
    "reply",
    "script",
]

CRLF = b"\r\n"
READ_SIZE = 1 << 18

ArgsPredicate = Callable[[list[bytes]], bool]


# --------------------------------------------------------------------------- matching


class Match:
    """Which commands a rule applies to: command names (any if none) and a predicate.

    The predicate receives the full argument list as sent, ``args[0]`` being the command
    name (in the client's case) and the rest the arguments, all ``bytes``.
    """

    __slots__ = ("label", "names", "where")

    def __init__(
        self, *names: str, where: ArgsPredicate | None = None, label: str | None = None
    ) -> None:
        self.names: frozenset[bytes] | None = (
            frozenset(n.upper().encode() for n in names) if names else None
        )
        self.where = where
        self.label = label or ("|".join(sorted(names)) if names else "*") + (
            "[where]" if where else ""
        )

    def __call__(self, name: bytes, args: list[bytes]) -> bool:
        """``name`` is the upper-cased command name (``args[0].upper()``)."""
        if self.names is not None and name not in self.names:
            return False
        return self.where is None or bool(self.where(args))

    def __repr__(self) -> str:
        return f"Match({self.label})"


ANY = Match()
"""Every command."""


def command(*names: str, where: ArgsPredicate | None = None) -> Match:
    """Commands named ``names`` (case-insensitive; any command if none), narrowed by ``where``."""
    return Match(*names, where=where)


_SCRIPT_CALLS = (b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO")


def script_keys(args: list[bytes]) -> list[bytes]:
    """The keys of a command: ``KEYS`` of EVAL/EVALSHA/FCALL, else every argument."""
    if args[0].upper() in _SCRIPT_CALLS:
        try:
            numkeys = int(args[2])
        except (IndexError, ValueError):
            return []
        return args[3 : 3 + numkeys]
    return args[1:]


def key_prefix(prefix: str | bytes, *names: str) -> Match:
    """Commands (named ``names``, or any) with a key starting with ``prefix``.

    The keys of EVAL/EVALSHA/FCALL are their ``KEYS``; for any other command every
    argument counts (so a value that happens to start with the prefix matches too).
    """
    raw = prefix.encode() if isinstance(prefix, str) else prefix

    def where(args: list[bytes]) -> bool:
        return any(key.startswith(raw) for key in script_keys(args))

    label = f"key_prefix({raw.decode(errors='replace')!r}{', ' if names else ''}{','.join(names)})"
    return Match(*names, where=where, label=label)


def script(source: str | bytes, *, where: ArgsPredicate | None = None) -> Match:
    """Runs of one Lua script: ``EVALSHA <sha1(source)>`` and ``EVAL <source>`` (and ``_RO``).

    redis-py's ``register_script`` objects send ``EVALSHA`` of the SHA1 of the exact
    source string (UTF-8), then ``SCRIPT LOAD`` + ``EVALSHA`` again on ``NOSCRIPT``.
    """
    src = source.encode() if isinstance(source, str) else source
    sha = hashlib.sha1(src).hexdigest().encode()

    def is_script(args: list[bytes]) -> bool:
        if len(args) < 2:
            return False
        if args[0].upper() in (b"EVALSHA", b"EVALSHA_RO"):
            hit = args[1].lower() == sha
        else:
            hit = args[1] == src
        return hit and (where is None or bool(where(args)))

    return Match(
        "EVAL",
        "EVALSHA",
        "EVAL_RO",
        "EVALSHA_RO",
        where=is_script,
        label=f"script({sha[:10].decode()})",
    )


def _as_match(match: str | Match | ArgsPredicate | None) -> Match:
    if match is None:
        return ANY
    if isinstance(match, Match):
        return match
    if isinstance(match, str):
        return Match(*match.split("|"))
    if callable(match):
        return Match(where=match)
    raise TypeError(f"not a command match: {match!r}")


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    """What to do with a matched command. Build with the helpers below."""

    kind: str
    payload: bytes = b""
    seconds: float = 0.0
    after_forward: bool = False

    def __repr__(self) -> str:
        if self.kind == "reply":
            return f"reply({self.payload[:60]!r})"
        if self.kind == "delay":
            return f"delay({self.seconds})"
        if self.kind == "hang":
            return "hang(after_forward=True)" if self.after_forward else "hang()"
        return f"{self.kind}()"


def reply(raw: bytes) -> Action:
    """Answer with the raw RESP ``raw`` (e.g. ``b"$-1\\r\\n"``) instead of forwarding."""
    if not raw.endswith(CRLF):
        raise ValueError("a RESP reply ends with CRLF")
    return Action("reply", payload=raw)


def nil() -> Action:
    """Answer a null (``$-1`` in RESP2, ``_`` after ``HELLO 3``) instead of forwarding."""
    return Action("nil")


def error(message: str) -> Action:
    """Answer ``-<message>`` instead of forwarding; the first word is the error code.

    redis-py maps NOPERM -> NoPermissionError, READONLY -> ReadOnlyError, OOM ->
    OutOfMemoryError, LOADING -> BusyLoadingError (a ConnectionError: retried by
    redis-py's default Retry), NOSCRIPT -> NoScriptError, others -> ResponseError.
    """
    if "\r" in message or "\n" in message:
        raise ValueError("an error message is one line")
    return Action("reply", payload=b"-" + message.encode() + CRLF)


def close() -> Action:
    """Close the client connection instead of forwarding (after relaying earlier replies)."""
    return Action("close")


def after_forward_close() -> Action:
    """Forward the command, drop its reply and close the connection: it ran, the client
    never hears so (nothing after it in the same write is forwarded).

    Inside ``MULTI`` a command is only queued (and dropped with the connection): match
    ``EXEC`` to lose the reply of a transaction that ran.
    """
    return Action("after_forward_close")


def hang(*, after_forward: bool = False) -> Action:
    """Go silent until the rule is removed (or its ``for_seconds`` window ends) or the client
    disconnects.

    By default the command is held back (not forwarded, nor anything after it on that
    connection): a half-open socket, the client's socket timeout fires. If the client is
    still connected when the rule goes, the command is forwarded and traffic resumes.
    With ``after_forward=True`` the command is forwarded and its reply (and everything
    after it) is held instead: the command ran, the client times out.
    """
    return Action("hang", after_forward=after_forward)


def delay(seconds: float) -> Action:
    """Forward the command ``seconds`` late (later commands of the connection wait too)."""
    return Action("delay", seconds=float(seconds))


# --------------------------------------------------------------------------- rules


_UNSET: Any = object()


@dataclass
class Injection:
    """One fault the proxy injected."""

    rule: Rule
    command: str
    args: list[bytes]
    action: Action
    at: float  # time.monotonic()


class Rule:
    """A match, an action and which matching calls it applies to. Returned by ``add_rule``.

    ``seen`` counts the matching calls since the rule was added, ``fired`` the faults it
    injected. Usable as a context manager (removed on exit).
    """

    def __init__(
        self,
        proxy: RedisFaultProxy,
        match: Match,
        action: Action,
        *,
        nth: int,
        count: int | None,
        until: float | None,
        label: str | None,
    ) -> None:
        if nth < 1:
            raise ValueError("nth is 1-based")
        if count is not None and count < 1:
            raise ValueError("count must be >= 1 (or None: every matching call)")
        self.proxy = proxy
        self.match = match
        self.action = action
        self.nth = nth
        self.count = count
        self.until = until
        self.label = label or f"{match.label} -> {action!r}"
        self.seen = 0
        self.fired = 0
        self.active = True
        # loop-thread state: futures of hangs waiting for the rule to go
        self._released = False
        self._waiters: list[asyncio.Future[None]] = []

    # -- loop thread

    def _hit(self, now: float) -> bool:
        """A matching call: does the rule fire on it?"""
        self.seen += 1
        if not self.active or (self.until is not None and now >= self.until):
            return False
        if self.seen < self.nth:
            return False
        return self.count is None or self.seen < self.nth + self.count

    def _release_future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()
        if self._released:
            fut.set_result(None)
        else:
            self._waiters.append(fut)
        return fut

    def _release(self) -> None:
        self._released = True
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _hold_timeout(self) -> float | None:
        return None if self.until is None else max(0.0, self.until - time.monotonic())

    # -- test thread

    @property
    def done(self) -> bool:
        """No more calls will fire it (removed, window over, or its ``count`` used up)."""
        if not self.active or (self.until is not None and time.monotonic() >= self.until):
            return True
        return self.count is not None and self.seen >= self.nth + self.count - 1

    def remove(self) -> None:
        self.proxy.remove(self)

    def wait_fired(self, n: int = 1, timeout: float = 10.0) -> Rule:
        """Block until the rule has fired ``n`` times; ``TimeoutError`` otherwise."""
        self.proxy._wait(lambda: self.fired >= n, timeout, f"{self.label} fired {n}x")
        return self

    def wait_seen(self, n: int = 1, timeout: float = 10.0) -> Rule:
        self.proxy._wait(lambda: self.seen >= n, timeout, f"{self.label} seen {n}x")
        return self

    def __enter__(self) -> Rule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<Rule {self.label} nth={self.nth} count={self.count} fired={self.fired}>"


# --------------------------------------------------------------------------- RESP


class _ReplyScanner:
    """Splits a server byte stream into complete RESP2/RESP3 replies (resumable)."""

    __slots__ = ("buf", "pos", "stack", "start")

    _BULK = frozenset(b"$!=")  # bulk string, blob error, verbatim string
    _AGG = frozenset(b"*~>")  # array, set, push

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0  # next unparsed byte
        self.start = 0  # start of the reply being parsed
        self.stack: list[int] = []  # elements still expected per open aggregate

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        frames: list[bytes] = []
        pos, start, stack = self.pos, self.start, self.stack
        n = len(buf)
        bulk, agg = self._BULK, self._AGG
        while pos < n:
            eol = buf.find(CRLF, pos)
            if eol < 0:
                break
            t = buf[pos]
            if t in bulk:
                length = int(buf[pos + 1 : eol])
                end = eol + 2 if length < 0 else eol + 4 + length
                if end > n:
                    break
            elif t in agg or t == 37 or t == 124:  # aggregate, '%' map, '|' attribute
                length = int(buf[pos + 1 : eol])
                if t == 37:
                    length *= 2
                elif t == 124:
                    length = 2 * length + 1  # the attribute map, then the value it annotates
                if length > 0:
                    stack.append(length)
                    pos = eol + 2
                    continue
                end = eol + 2
            else:  # + - : _ , # ( one-line types
                end = eol + 2
            pos = end
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            else:
                frames.append(bytes(buf[start:pos]))
                start = pos
        if start:
            del buf[:start]
            pos -= start
            start = 0
        self.pos, self.start = pos, start
        return frames


class _ProtocolError(Exception):
    pass


def _parse_command(buf: bytearray, pos: int) -> tuple[list[bytes], int] | None:
    """One client command at ``pos``: ``(args, end)``, or None if incomplete."""
    n = len(buf)
    if buf[pos] == 42:  # '*': array of bulk strings
        eol = buf.find(CRLF, pos)
        if eol < 0:
            return None
        try:
            count = int(buf[pos + 1 : eol])
        except ValueError as exc:
            raise _ProtocolError(bytes(buf[pos:eol])) from exc
        p = eol + 2
        args: list[bytes] = []
        for _ in range(count):
            if p >= n:
                return None
            if buf[p] != 36:  # '$'
                raise _ProtocolError(bytes(buf[p : p + 20]))
            eol = buf.find(CRLF, p)
            if eol < 0:
                return None
            start = eol + 2
            end = start + int(buf[p + 1 : eol])
            if end + 2 > n:
                return None
            args.append(bytes(buf[start:end]))
            p = end + 2
        return args, p
    eol = buf.find(b"\n", pos)  # inline command
    if eol < 0:
        return None
    return bytes(buf[pos:eol]).split(), eol + 1


# command -> (which subscription set, adds?)
_SUBSCRIBE_FAMILY = {
    b"SUBSCRIBE": (0, True),
    b"UNSUBSCRIBE": (0, False),
    b"PSUBSCRIBE": (1, True),
    b"PUNSUBSCRIBE": (1, False),
    b"SSUBSCRIBE": (2, True),
    b"SUNSUBSCRIBE": (2, False),
}
_MESSAGE_KINDS = frozenset((b"message", b"pmessage", b"smessage"))
_SUBSCRIBE_KINDS = frozenset(
    (
        b"subscribe",
        b"psubscribe",
        b"ssubscribe",
        b"unsubscribe",
        b"punsubscribe",
        b"sunsubscribe",
    )
)


def _first_bulk(frame: bytes) -> bytes | None:
    """The first element of an array reply if it is a bulk string."""
    eol = frame.find(CRLF)
    p = eol + 2
    if p >= len(frame) or frame[p] != 36:
        return None
    eol = frame.find(CRLF, p)
    try:
        length = int(frame[p + 1 : eol])
    except ValueError:
        return None
    return frame[eol + 2 : eol + 2 + length] if length >= 0 else None


# --------------------------------------------------------------------------- connections

# entries of _Conn.pending, one per reply the client is owed, in command order
_FWD = None  # a forwarded command: relay its reply
_SYN = 1  # (_SYN, bytes): answer for Redis
_CLOSE = 2  # (_CLOSE, None): close the connection here
_DROP_CLOSE = 3  # (_DROP_CLOSE, rule): forwarded; drop its reply and close
_HOLD = 4  # (_HOLD, rule): forwarded; hold its reply until the rule goes
_PUBSUB = 5  # [_PUBSUB, n]: a forwarded (UN)SUBSCRIBE, n confirmations to go


class _Conn:
    def __init__(
        self,
        proxy: RedisFaultProxy,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        u_reader: asyncio.StreamReader,
        u_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        self.c_reader, self.c_writer = c_reader, c_writer
        self.u_reader, self.u_writer = u_reader, u_writer
        self.pending: collections.deque[Any] = collections.deque()
        self.inbuf = bytearray()
        self.closed = False
        self.closed_fut: asyncio.Future[None] = self.loop.create_future()
        self.pubsub = False  # sent a (P|S)(UN)SUBSCRIBE: array replies may be pushes
        self.subscribed: tuple[set[bytes], ...] = (set(), set(), set())  # channels, patterns, shard
        self.raw = False  # MONITOR or unparsable traffic: replies are not paired
        self.resp3 = False  # HELLO 3 seen: the client expects RESP3 (for nil())
        self.unparsable = False  # server traffic is relayed as a byte stream
        self.draining = False  # a fault ends the connection: forward nothing more

    async def run(self) -> None:
        tasks = [
            asyncio.ensure_future(self._client_loop()),
            asyncio.ensure_future(self._server_loop()),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.closed_fut.done():
            self.closed_fut.set_result(None)
        for writer in (self.c_writer, self.u_writer):
            with contextlib.suppress(Exception):
                writer.close()

    # -- client -> server

    async def _client_loop(self) -> None:
        try:
            while not self.closed:
                data = await self.c_reader.read(READ_SIZE)
                if not data:
                    break
                self.inbuf += data
                await self._process()
        except (ConnectionError, OSError):
            pass
        except Exception as exc:
            self.proxy._internal_error(exc)
        finally:
            self.close()

    async def _process(self) -> None:
        buf = self.inbuf
        pos = 0
        out = bytearray()
        proxy = self.proxy
        pending = self.pending
        while pos < len(buf) and not self.closed:
            if self.draining:
                pos = len(buf)
                break
            try:
                parsed = _parse_command(buf, pos)
            except _ProtocolError:
                # not RESP we understand: pass everything through as a stream from now on
                self.raw = True
                out += buf[pos:]
                pos = len(buf)
                break
            if parsed is None:
                break
            args, end = parsed
            raw = buf[pos:end]
            pos = end
            if not args:  # empty inline line or *0: Redis ignores it, so do we
                continue
            name = args[0].upper()
            rule = proxy._on_command(name, args)
            if rule is None:
                out += raw
                self._expect_reply(name, args)
                continue
            action = rule.action
            kind = action.kind
            if kind == "reply":
                self._answer((_SYN, action.payload))
            elif kind == "nil":
                self._answer((_SYN, b"_\r\n" if self.resp3 else b"$-1\r\n"))
            elif kind == "close":
                self.draining = True
                self._answer((_CLOSE, None))
            elif kind == "after_forward_close":
                self.draining = True
                out += raw
                if self.raw or name in _SUBSCRIBE_FAMILY or name == b"MONITOR":
                    # no single reply to wait for: close once it is sent
                    self._flush_upstream(out)
                    with contextlib.suppress(Exception):
                        await self.u_writer.drain()
                    self.close()
                else:
                    pending.append((_DROP_CLOSE, rule))
            elif kind == "hang" and action.after_forward:
                out += raw
                if self.raw or name in _SUBSCRIBE_FAMILY or name == b"MONITOR":
                    self._expect_reply(name, args)
                else:
                    pending.append((_HOLD, rule))
            else:  # hang / delay: hold the command (and the rest) back, then forward it
                self._flush_upstream(out)
                if kind == "hang":
                    proceed = await self._client_wait(rule, rule._hold_timeout())
                else:
                    proceed = await self._client_wait(None, action.seconds)
                if not proceed:
                    return
                out += raw
                self._expect_reply(name, args)
        if pos:
            del buf[:pos]
        self._flush_upstream(out)
        if not self.closed:
            await self.u_writer.drain()

    def _expect_reply(self, name: bytes, args: list[bytes]) -> None:
        """Note the reply(ies) a forwarded command will get."""
        if self.raw:
            return
        if name in _SUBSCRIBE_FAMILY:
            # one reply per channel (per subscribed one for a bare UNSUBSCRIBE), tracked
            # as Redis will see it; messages pushed meanwhile are not replies
            self.pubsub = True
            which, adds = _SUBSCRIBE_FAMILY[name]
            subscribed = self.subscribed[which]
            targets = args[1:]
            if adds:
                subscribed.update(targets)
                expected = max(1, len(targets))
            elif targets:
                subscribed.difference_update(targets)
                expected = len(targets)
            else:
                expected = max(1, len(subscribed))
                subscribed.clear()
            self.pending.append([_PUBSUB, expected])
        elif name == b"MONITOR":
            self.raw = True  # a stream from now on
        else:
            if name == b"RESET":
                for subscribed in self.subscribed:
                    subscribed.clear()
                self.resp3 = False
            elif name == b"HELLO" and len(args) > 1 and args[1] in (b"2", b"3"):
                self.resp3 = args[1] == b"3"
            self.pending.append(_FWD)

    def _flush_upstream(self, out: bytearray) -> None:
        if out and not self.closed:
            self.u_writer.write(bytes(out))
            out.clear()

    def _answer(self, entry: tuple[int, Any]) -> None:
        """A reply the proxy makes up: now, or after the replies the client still awaits."""
        if self.pending:
            self.pending.append(entry)
        elif entry[0] == _SYN:
            self.c_writer.write(entry[1])
        else:
            self.close()

    async def _client_wait(self, rule: Rule | None, timeout: float | None) -> bool:
        """Wait for ``rule`` to go (or ``timeout``) while watching the client for EOF.

        Bytes the client sends meanwhile are queued in ``inbuf``. False if the
        connection closed.
        """
        loop = self.loop
        deadline = None if timeout is None else loop.time() + timeout
        released = rule._release_future(loop) if rule is not None else None
        read: asyncio.Future[bytes] | None = None
        try:
            while not self.closed:
                if released is not None and released.done():
                    return True
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return True
                if read is None:
                    read = asyncio.ensure_future(self.c_reader.read(READ_SIZE))
                waiting: set[asyncio.Future[Any]] = {read, self.closed_fut}
                if released is not None:
                    waiting.add(released)
                await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if read.done():
                    data = read.result()
                    read = None
                    if not data:
                        self.close()
                        return False
                    self.inbuf += data
            return False
        finally:
            if released is not None and not released.done():
                released.cancel()
            if read is not None:
                read.cancel()
                await asyncio.wait({read})
                if not read.cancelled() and read.exception() is None:
                    data = read.result()
                    if data:
                        self.inbuf += data
                    else:
                        self.close()

    # -- server -> client

    async def _server_loop(self) -> None:
        scanner = _ReplyScanner()
        pending = self.pending
        writer = self.c_writer
        try:
            while not self.closed:
                data = await self.u_reader.read(READ_SIZE)
                if not data:
                    break
                if self.unparsable:
                    writer.write(data)
                    await writer.drain()
                    continue
                try:
                    frames = scanner.feed(data)
                except ValueError:
                    # not RESP we understand: stop pairing, relay as a stream
                    self.raw = self.unparsable = True
                    writer.write(bytes(scanner.buf) if scanner.buf else data)
                    scanner.buf.clear()
                    pending.clear()
                    continue
                out = bytearray()
                for frame in frames:
                    if self.closed:
                        return
                    if not pending:
                        out += frame
                        continue
                    entry = pending[0]
                    t = frame[0]
                    if self.raw:
                        out += frame
                        continue
                    if t == 62 or (t == 42 and self.pubsub):  # a push, or a pub/sub array?
                        kind = (_first_bulk(frame) or b"").lower()
                        if kind in _SUBSCRIBE_KINDS:
                            if entry.__class__ is not list:  # unexpected: relay it as is
                                out += frame
                                continue
                            if entry[1] > 1:  # more confirmations to come
                                entry[1] -= 1
                                out += frame
                                continue
                        elif t == 62 or kind in _MESSAGE_KINDS:
                            out += frame
                            continue
                    elif entry.__class__ is list and t != 45:  # '-': the (UN)SUBSCRIBE failed
                        out += frame  # something unsolicited
                        continue
                    if entry is not _FWD and entry.__class__ is tuple:
                        kind, rule = entry
                        if kind == _DROP_CLOSE:
                            writer.write(bytes(out))
                            self.close()
                            return
                        if kind == _HOLD:
                            writer.write(bytes(out))
                            out = bytearray()
                            if not await self._server_hold(rule):
                                return
                    pending.popleft()
                    out += frame
                    while pending and pending[0].__class__ is tuple and pending[0][0] <= _CLOSE:
                        kind, payload = pending.popleft()
                        if kind == _SYN:
                            out += payload
                        else:
                            writer.write(bytes(out))
                            self.close()
                            return
                if out:
                    writer.write(bytes(out))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception as exc:
            self.proxy._internal_error(exc)
        finally:
            self.close()

    async def _server_hold(self, rule: Rule) -> bool:
        released = rule._release_future(self.loop)
        try:
            await asyncio.wait(
                {released, self.closed_fut},
                timeout=rule._hold_timeout(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            released.cancel()
        return not self.closed


# --------------------------------------------------------------------------- proxy


@dataclass
class _Stats:
    counts: collections.Counter[bytes] = field(default_factory=collections.Counter)
    history: list[tuple[bytes, list[bytes]]] = field(default_factory=list)
    injected: list[Injection] = field(default_factory=list)


class RedisFaultProxy:
    """A fault-injecting Redis proxy on ``host:port`` (a free port by default).

    ``record=True`` keeps every command's arguments so that ``calls()`` and ``commands()``
    can match predicates (``script()``, ``key_prefix()``...) after the fact; with
    ``record=False`` only per-name counts are kept (cheaper for long benchmarks).
    """

    def __init__(
        self,
        upstream: tuple[str, int] = ("127.0.0.1", 6379),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.record = record
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._rules: tuple[Rule, ...] = ()
        self._stats = _Stats()
        self._conns: set[_Conn] = set()
        self._accepted = 0
        self._refusing = False
        self.errors: list[BaseException] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle

    def start(self) -> RedisFaultProxy:
        """Listen (on the port of the previous run after a ``stop()``) and return self."""
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="redis-fault-proxy", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close every connection and stop listening. ``start()`` again reuses the port."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> RedisFaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(
                    self._handle, self.host, self.port, reuse_address=True, backlog=512
                )
            )
        except BaseException as exc:
            failure.append(exc)
            loop.close()
            ready.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.close()
        for rule in self._rules:
            rule._release()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        if self._refusing:
            c_writer.close()
            return
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        conn = _Conn(self, c_reader, c_writer, u_reader, u_writer)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the proxy's loop and wait for it."""
        loop = self._loop
        if loop is None:
            return fn()

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)

    # -- addresses

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def url(self) -> str:
        """``redis://host:port/0``"""
        return self.url_for(db=0)

    def url_for(
        self,
        db: int | str = 0,
        *,
        scheme: str = "redis",
        username: str | None = None,
        password: str | None = None,
        query: str = "",
    ) -> str:
        """This proxy's URL with the caller's db number (and credentials / query string)."""
        if self._thread is None:
            raise RuntimeError("start the proxy first")
        auth = ""
        if username or password:
            auth = f"{username or ''}{':' + password if password else ''}@"
        return f"{scheme}://{auth}{self.host}:{self.port}/{db}" + (f"?{query}" if query else "")

    def url_like(self, url: str) -> str:
        """``url`` (e.g. the project's REDIS_URL) with its host and port replaced by the proxy's."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth + '@' if auth else ''}{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- rules

    def add_rule(
        self,
        match: str | Match | ArgsPredicate,
        action: Action,
        *,
        nth: int = 1,
        count: int | None = _UNSET,
        for_seconds: float | None = None,
        label: str | None = None,
    ) -> Rule:
        """Inject ``action`` on matching commands, counted from now.

        - ``match``: a command name (``"EVALSHA"``, ``"GET|MGET"``), a ``Match`` (``command``,
          ``script``, ``key_prefix``) or a predicate on the argument list.
        - ``nth``/``count``: fire on matching calls ``nth`` .. ``nth+count-1`` (1-based);
          ``count=None``: every matching call from the ``nth`` on until removed.
        - ``for_seconds``: only within that many seconds from now (``count`` then defaults
          to ``None``: every matching call in the window).

        Rules are checked in the order they were added; every matching rule counts the
        call, the first one due fires.
        """
        if count is _UNSET:
            count = None if for_seconds is not None else 1
        until = None if for_seconds is None else time.monotonic() + for_seconds
        rule = Rule(self, _as_match(match), action, nth=nth, count=count, until=until, label=label)
        with self._lock:
            self._rules = (*self._rules, rule)
        return rule

    def remove(self, rule: Rule) -> None:
        """Remove a rule; commands it holds (``hang``) go on."""
        with self._lock:
            self._rules = tuple(r for r in self._rules if r is not rule)
            rule.active = False
        self._release(rule)

    def clear(self) -> None:
        """Remove every rule (counters and ``injected`` are kept; see ``reset_stats``)."""
        with self._lock:
            rules, self._rules = self._rules, ()
            for rule in rules:
                rule.active = False
        for rule in rules:
            self._release(rule)

    def _release(self, rule: Rule) -> None:
        loop = self._loop
        if loop is None:
            rule._release()
        else:
            with contextlib.suppress(RuntimeError):  # loop closing
                loop.call_soon_threadsafe(rule._release)

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules)

    # -- connections

    @property
    def connections(self) -> int:
        """Client connections open right now."""
        return len(self._conns)

    @property
    def accepted(self) -> int:
        """Client connections accepted since the proxy was created."""
        return self._accepted

    def disconnect_all(self) -> int:
        """Close every open client connection (as a Redis restart would). Returns how many."""

        def drop() -> int:
            conns = list(self._conns)
            for conn in conns:
                conn.close()
            return len(conns)

        return int(self._call(drop))

    def refuse_connections(self, refuse: bool = True) -> None:
        """Accept and at once close new connections (existing ones are left alone)."""
        self._refusing = refuse

    def wait_connections(self, n: int = 0, timeout: float = 10.0) -> None:
        """Block until exactly ``n`` client connections are open."""
        self._poll(lambda: self.connections == n, timeout, f"{n} open connections")

    # -- loop-thread hooks

    def _on_command(self, name: bytes, args: list[bytes]) -> Rule | None:
        """Count a command; the rule that fires on it, if any."""
        stats = self._stats
        if self.record:
            with self._lock:
                stats.counts[name] += 1
                stats.history.append((name, args))
        else:
            with self._lock:
                stats.counts[name] += 1
        rules = self._rules
        if not rules:
            return None
        now = time.monotonic()
        chosen = None
        for rule in rules:
            try:
                hit = rule.match(name, args)
            except Exception as exc:  # a broken predicate must not kill the connection
                self._internal_error(exc)
                hit = False
            if hit and rule._hit(now) and chosen is None:
                chosen = rule
        if chosen is not None:
            with self._cond:
                chosen.fired += 1
                stats.injected.append(
                    Injection(chosen, name.decode(errors="replace"), args, chosen.action, now)
                )
                self._cond.notify_all()
        return chosen

    def _internal_error(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)

    # -- observations

    def calls(self, match: str | Match | ArgsPredicate | None = None) -> int:
        """How many commands matching ``match`` (all if None) the proxy has seen, those a
        fault answered included (not those dropped after a ``close``/``after_forward_close``
        in the same write)."""
        m = _as_match(match)
        with self._lock:
            counts = self._stats.counts
            if m.where is None:
                if m.names is None:
                    return sum(counts.values())
                return sum(counts[n] for n in m.names)
            if not self.record:
                raise RuntimeError("calls() with a predicate needs RedisFaultProxy(record=True)")
            history = list(self._stats.history)
        return sum(1 for name, args in history if m(name, args))

    def commands(self, match: str | Match | ArgsPredicate | None = None) -> list[list[bytes]]:
        """The argument lists of the commands seen that match (``record=True`` only)."""
        if not self.record:
            raise RuntimeError("commands() needs RedisFaultProxy(record=True)")
        m = _as_match(match)
        with self._lock:
            history = list(self._stats.history)
        return [args for name, args in history if m(name, args)]

    @property
    def injected(self) -> list[Injection]:
        """Every fault injected so far, in order."""
        with self._lock:
            return list(self._stats.injected)

    def injected_count(self, rule: Rule | None = None) -> int:
        with self._lock:
            return sum(1 for i in self._stats.injected if rule is None or i.rule is rule)

    def reset_stats(self) -> None:
        """Forget counts, history and injections (rules keep their own ``seen``/``fired``)."""
        with self._lock:
            self._stats = _Stats()

    def wait_calls(
        self, match: str | Match | ArgsPredicate | None, n: int, timeout: float = 10.0
    ) -> None:
        """Block until at least ``n`` matching commands have been seen."""
        self._poll(lambda: self.calls(match) >= n, timeout, f"{n} calls of {match!r}")

    def wait_injected(self, n: int = 1, timeout: float = 10.0) -> None:
        """Block until at least ``n`` faults have been injected (any rule)."""
        self._wait(lambda: len(self._stats.injected) >= n, timeout, f"{n} injections")

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    @staticmethod
    def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.005)

    def __repr__(self) -> str:
        state = f"{self.host}:{self.port}" if self._thread else "stopped"
        return f"<RedisFaultProxy {state} -> {self.upstream[0]}:{self.upstream[1]}>"
