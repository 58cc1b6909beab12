"""Run an ASGI app under uvicorn with the limits a public endpoint needs.

``ses-tasks feedback serve`` and ``ses-tasks dashboard`` both serve through :func:`serve`.
uvicorn on its own never times out a client that is slow to send its request: its keep-alive
timer runs only between requests, so a connection that sends half its headers, half its body
or nothing at all stays open forever, and enough of them exhaust the process's file
descriptors. Here:

- a request's headers must be complete within ``read_deadline_s`` of the connection opening
  (or of the previous response on a kept-alive connection), else the connection is closed
  (:class:`DeadlineH11Protocol`);
- its body must arrive within ``read_deadline_s`` (time the app spends waiting for it), else
  the request is answered 408 and the connection closed (:class:`BodyDeadlineMiddleware`);
- a TLS handshake must finish within ``read_deadline_s`` too (asyncio's default is 60 s,
  and a connection still in its handshake is not yet one the cap above can count);
- a connection beyond ``max_connections`` is answered 503 and closed at once;
- an unfinished request head is buffered up to :data:`MAX_HEADER_BYTES` (then uvicorn
  answers 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ses_tasks.errors import ConfigurationError, SesTasksError

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_HEADER_BYTES",
    "READ_DEADLINE_S",
    "SHUTDOWN_GRACE_S",
    "BodyDeadlineMiddleware",
    "DeadlineH11Protocol",
    "build_server",
    "serve",
]

#: Headers must be complete this long after the connection opens (or the previous response
#: ends); the body this long after the headers.
READ_DEADLINE_S = 30.0
#: Connections (and requests in flight) beyond this many are answered 503.
MAX_CONNECTIONS = 1000
#: An unfinished request head (request line and headers) over this is answered 400 (h11's
#: buffer cap, uvicorn's default made explicit).
MAX_HEADER_BYTES = 16 * 1024
#: How long a stop (SIGTERM, Ctrl-C) waits for requests in flight before cancelling them.
SHUTDOWN_GRACE_S = 15
#: Request paths in the access log are cut to this many characters, like logged SNS values.
_LOGGED_PATH_CHARS = 80

_SERVICE_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 20\r\nconnection: close\r\n\r\nService Unavailable\n"
)
_TIMEOUT_BODY = b'{"result": "request timeout"}'


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head, and a connection cap
    enforced when a connection opens (uvicorn checks it only once a request has arrived).

    The deadline is armed when the connection opens and when a response ends, and disarmed
    when a request's headers are complete (uvicorn then starts a new request cycle). Requests
    being handled are not timed: their bodies are :class:`BodyDeadlineMiddleware`'s."""

    read_deadline_s: float = READ_DEADLINE_S
    max_connections: int = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("Exceeded the connection limit (%d).", self.max_connections)
            transport.write(_SERVICE_UNAVAILABLE)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # for the next request, or the rest of a body the app left unread
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.read_deadline_s, self._expired)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expired(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def _protocol_class(read_deadline_s: float, max_connections: int) -> type[DeadlineH11Protocol]:
    limits = {"read_deadline_s": read_deadline_s, "max_connections": max_connections}
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), limits)


class BodyDeadlineMiddleware:
    """ASGI middleware: a request whose body takes longer than ``deadline_s`` to arrive is
    answered 408 (``Connection: close``).

    Only time the app spends waiting in ``receive()`` for the body counts against the client
    (an app busy before it reads is not the client's fault); past the budget the app is
    cancelled. Once the body is complete, ``receive()`` is not timed (an app may wait there
    for the client to disconnect)."""

    def __init__(self, app: Any, *, deadline_s: float = READ_DEADLINE_S) -> None:
        self.app = app
        self.deadline_s = deadline_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        budget_s = self.deadline_s
        body_done = False
        started = False
        waiting = asyncio.timeout(None)

        async def timed_receive() -> Any:
            nonlocal body_done, budget_s
            if body_done:
                return await receive()
            start = loop.time()
            waiting.reschedule(start + budget_s)
            try:
                message = await receive()
            finally:
                budget_s -= loop.time() - start
                if not waiting.expired():
                    waiting.reschedule(None)
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            async with waiting:
                await self.app(scope, timed_receive, tracked_send)
        except TimeoutError:
            if not waiting.expired():
                raise  # the app's own
            if not started:  # else uvicorn closes the connection on the unfinished response
                await self._answer_408(send)

    async def _answer_408(self, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 408,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_TIMEOUT_BODY)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _TIMEOUT_BODY})


class _AccessLogFilter(logging.Filter):
    """uvicorn's access line without the query string (a URL may carry a token) and with the
    path cut short: nothing a client sends can put a secret or a flood in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path = args[2].partition("?")[0]
            if len(path) > _LOGGED_PATH_CHARS:
                path = path[:_LOGGED_PATH_CHARS] + "..."
            record.args = (args[0], args[1], path, args[3], args[4])
        return True


class _Server(uvicorn.Server):
    """A ``uvicorn.Server`` that announces each address it listens on (with the port chosen
    for port 0: tests read it) and ends cleanly on SIGTERM as on Ctrl-C. uvicorn re-raises
    the signal after its graceful shutdown, which would end the process by SIGTERM or as
    "interrupted" (130); here the shutdown is the end, and the command exits 0."""

    def __init__(
        self,
        config: uvicorn.Config,
        announce: Callable[[str], None] | None,
        handshake_timeout_s: float = READ_DEADLINE_S,
    ) -> None:
        super().__init__(config)
        self._announce = announce
        self._handshake_timeout_s = handshake_timeout_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        create_server = loop.create_server
        timeout_s = self._handshake_timeout_s

        async def with_handshake_deadline(*args: Any, **kwargs: Any) -> asyncio.Server:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", timeout_s)
            return await create_server(*args, **kwargs)

        # uvicorn calls ``loop.create_server`` without a handshake timeout; shadow it on
        # this (stdlib, ``loop="asyncio"``) loop for the duration of the start only.
        loop.create_server = with_handshake_deadline  # type: ignore[method-assign]
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server
        if not self.started or self._announce is None:
            return
        scheme = "https" if self.config.is_ssl else "http"
        for server in self.servers:
            for sock in server.sockets:
                address, port = sock.getsockname()[:2]
                shown = f"[{address}]" if ":" in address else address
                self._announce(f"{scheme}://{shown}:{port}/")

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def build_server(
    app: Any,
    *,
    host: str,
    port: int,
    announce: Callable[[str], None] | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: int = logging.INFO,
    lifespan: Literal["auto", "on", "off"] = "on",
    read_deadline_s: float = READ_DEADLINE_S,
    max_connections: int = MAX_CONNECTIONS,
    shutdown_grace_s: int = SHUTDOWN_GRACE_S,
) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the limits above, loaded but not started.

    ``announce`` is called with each ``http(s)://address:port/`` once listening. uvicorn
    logs through the ``uvicorn.*`` loggers at ``log_level`` into the process's logging set-up
    (no handlers of its own), its access lines without query strings. Raises
    ``ConfigurationError`` if the TLS certificate or key cannot be loaded."""
    if read_deadline_s <= 0:
        raise ValueError(f"read_deadline_s: must be positive, got {read_deadline_s!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections: must be at least 1, got {max_connections!r}")
    config = uvicorn.Config(
        BodyDeadlineMiddleware(app, deadline_s=read_deadline_s),
        host=host,
        port=port,
        http=_protocol_class(read_deadline_s, max_connections),
        lifespan=lifespan,
        ws="none",  # nothing served here speaks WebSocket
        loop="asyncio",  # the stdlib loop: ``_Server.startup`` sets its handshake timeout
        log_config=None,  # the process's own logging
        log_level=log_level,
        server_header=False,
        # uvicorn answers 503 once connections or tasks reach its limit (``>=``); ours are
        # refused above ``max_connections`` (``>``): the same count either way.
        limit_concurrency=max_connections + 1,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=shutdown_grace_s,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _AccessLogFilter) for f in access_log.filters):
        access_log.addFilter(_AccessLogFilter())
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            "--ssl-certfile", f"cannot load the certificate and key: {exc}"
        ) from None
    return _Server(config, announce, handshake_timeout_s=read_deadline_s)


def serve(app: Any, *, name: str, host: str, port: int, **options: Any) -> None:
    """Serve ``app`` until SIGTERM or Ctrl-C (then finish requests in flight, for up to
    ``shutdown_grace_s``, and return). ``options`` are :func:`build_server`'s.

    Raises ``ConfigurationError`` for TLS files that cannot be loaded and ``SesTasksError``
    (``the <name> did not start on host:port``) when it cannot start, e.g. the port is
    taken: uvicorn logs the cause first."""
    server = build_server(app, host=host, port=port, **options)
    _raise_open_files_limit()
    try:
        server.run()
    except SystemExit as exc:
        if exc.code != uvicorn.config.STARTUP_FAILURE:
            raise
        raise SesTasksError(
            f"the {name} did not start on {host}:{port} (see the error above)"
        ) from None


def _raise_open_files_limit() -> None:
    """Up to the hard limit: the connection cap, not a 1024-descriptor default, should be
    what refuses a flood of connections."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
