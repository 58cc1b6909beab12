"""``ses_tasks.ops.serve`` under real uvicorn on a free port: slow clients are cut off (partial
headers, a silent connection, a half-sent body), connections over the cap get 503, normal
requests and slow apps are untouched, and both ``feedback serve`` and ``dashboard`` serve
through it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ses_tasks.feedback.settings import ALLOWED_TOPIC_ARNS_ENV
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN
from ses_tasks.ops import serve as serve_module
from ses_tasks.ops.serve import BodyDeadlineMiddleware, build_server
from ses_tasks.sandbox.embedded import wait_for

from ..conftest import REDIS_URL

DEADLINE_S = 1.0
#: How long a test waits for the server to close a connection before failing.
CLOSE_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0


async def echo(request: Request) -> JSONResponse:
    """Reads the whole body; ``?work_s=`` first spends that long on "work" (a slow app)."""
    work_s = float(request.query_params.get("work_s", "0"))
    if work_s:
        await asyncio.sleep(work_s)
    return JSONResponse({"bytes": len(await request.body())})


APP = Starlette(routes=[Route("/", echo, methods=["GET", "POST"])])


@contextmanager
def running(server: Any, thread: threading.Thread) -> Iterator[int]:
    """Start ``thread`` (which runs ``server``); yield the port once it listens; stop it at
    the end."""
    thread.start()
    try:
        wait_for(
            lambda: server.started or not thread.is_alive(),
            timeout_s=START_TIMEOUT_S,
            what="the server to start",
        )
        assert server.started, "the server stopped before listening"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
        assert not thread.is_alive(), "the server did not stop"


@contextmanager
def serving(app: Any = APP, **options: Any) -> Iterator[tuple[int, Any]]:
    options.setdefault("read_deadline_s", DEADLINE_S)
    server = build_server(app, host="127.0.0.1", port=0, log_level=30, **options)
    with running(server, threading.Thread(target=server.run, daemon=True)) as port:
        yield port, server


def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_TIMEOUT_S)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; ``socket.timeout`` if it never does."""
    received = b""
    with sock:
        while chunk := sock.recv(4096):
            received += chunk
    return received


def test_partial_headers_and_silent_connections_are_closed_at_the_deadline() -> None:
    with serving() as (port, _):
        started = time.monotonic()
        partial = connect(port, b"POST / HTTP/1.1\r\nHost: x\r\n")
        silent = connect(port)
        # A kept-alive connection: one full request, then half of the next one's headers.
        kept = connect(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"bytes":0}'):
            chunk = kept.recv(4096)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 "), first
        kept.sendall(b"GET / HTTP/1.1\r\nHo")

        assert read_until_closed(partial) == b""
        assert read_until_closed(silent) == b""
        assert read_until_closed(kept) == b""
        # Closed by the deadline, not at once: the deadline timer can only fire late.
        assert time.monotonic() - started >= DEADLINE_S * 0.9


def test_a_tls_handshake_that_never_starts_is_cut_off_at_the_deadline(tmp_path: Any) -> None:
    """asyncio gives a handshake 60 s and the connection cap cannot count it yet: the read
    deadline applies to it too, and a real client still gets its answer over TLS."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    with serving(ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as (port, _):
        started = time.monotonic()
        silent = connect(port)  # no ClientHello, ever
        assert read_until_closed(silent) == b""
        assert DEADLINE_S * 0.9 <= time.monotonic() - started < CLOSE_TIMEOUT_S
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        verify = ssl.create_default_context(cafile=str(ca_file))
        with httpx.Client(verify=verify, timeout=CLOSE_TIMEOUT_S) as client:
            assert client.get(f"https://127.0.0.1:{port}/").json() == {"bytes": 0}


def test_a_body_that_does_not_arrive_in_time_gets_408() -> None:
    with serving() as (port, _):
        short = connect(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123")
        chunked = connect(
            port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n",
        )
        for sock in (short, chunked):
            answer = read_until_closed(sock)  # and then closed
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"connection: close" in answer.lower()
            assert answer.endswith(b'{"result": "request timeout"}')


def test_normal_requests_and_a_slow_app_are_not_cut_off() -> None:
    with serving() as (port, _):
        base = f"http://127.0.0.1:{port}/"
        with httpx.Client(timeout=CLOSE_TIMEOUT_S) as client:
            assert client.get(base).json() == {"bytes": 0}
            # The app works for twice the deadline before reading: not the client's fault.
            response = client.post(base, params={"work_s": 2 * DEADLINE_S}, content=b"x" * 5000)
            assert (response.status_code, response.json()) == (200, {"bytes": 5000})
            # The same kept-alive connection still serves.
            assert client.post(base, content=b"abc").json() == {"bytes": 3}


def test_connections_over_the_cap_get_503_and_the_cap_frees_up() -> None:
    with serving(max_connections=2) as (port, server):
        held = [connect(port), connect(port)]
        wait_for(
            lambda: len(server.server_state.connections) == 2,
            timeout_s=CLOSE_TIMEOUT_S,
            what="two open connections",
        )
        answer = read_until_closed(connect(port))
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        for sock in held:
            sock.close()
        wait_for(
            lambda: not server.server_state.connections,
            timeout_s=CLOSE_TIMEOUT_S,
            what="the held connections to close",
        )
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=CLOSE_TIMEOUT_S).status_code == 200


def test_an_unfinished_head_over_the_cap_gets_400() -> None:
    with serving() as (port, _):
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * serve_module.MAX_HEADER_BYTES
        answer = read_until_closed(connect(port, head))  # never finished
        assert answer.startswith(b"HTTP/1.1 400 "), answer


def test_bad_limits_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="read_deadline_s"):
        build_server(APP, host="127.0.0.1", port=0, read_deadline_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        build_server(APP, host="127.0.0.1", port=0, max_connections=0)


# The middleware on its own --------------------------------------------------------------------


def drive(app: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``BodyDeadlineMiddleware(app)`` on one request whose body stops after
    ``messages``; return what it sent."""
    sent: list[dict[str, Any]] = []
    pending = list(messages)

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # the client sends nothing more
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    asyncio.run(BodyDeadlineMiddleware(app, deadline_s=0.2)(scope, receive, send))
    return sent


def test_middleware_answers_408_only_before_the_response_started() -> None:
    async def reader(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("the body never completes")

    sent = drive(reader, [{"type": "http.request", "body": b"ab", "more_body": True}])
    assert [m.get("status") for m in sent] == [408, None]

    async def streamer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await receive()
        raise AssertionError("the body never completes")

    sent = drive(streamer, [])
    assert sent == [{"type": "http.response.start", "status": 200, "headers": []}]


def test_middleware_does_not_time_waits_after_the_body_nor_hide_the_apps_timeouts() -> None:
    async def waits_for_disconnect(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        # Past the body, receive() would only report a disconnect: never timed out.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = drive(waits_for_disconnect, [{"type": "http.request", "body": b""}])
    assert [m.get("status") for m in sent] == [204, None]

    async def own_timeout(scope: Any, receive: Any, send: Any) -> None:
        raise TimeoutError("the app's own")

    with pytest.raises(TimeoutError, match="the app's own"):
        drive(own_timeout, [])


# Both commands serve through it ---------------------------------------------------------------


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Commands build their server with a 1 s read deadline; the list gets each server."""
    built: list[Any] = []
    real = serve_module.build_server

    def build(app: Any, **options: Any) -> Any:
        server = real(app, **{**options, "read_deadline_s": DEADLINE_S})
        built.append(server)
        return server

    monkeypatch.setattr(serve_module, "build_server", build)
    return built


def check_command_server(run: Any, built: list[Any], path: str) -> None:
    """Run a command (``run``) that serves; check it listens with the short deadline."""
    server = Server(built)
    with running(server, threading.Thread(target=run, daemon=True)) as port:
        assert built, "the command did not build its server through ses_tasks.ops.serve"
        url = f"http://127.0.0.1:{port}{path}"
        assert httpx.get(url, timeout=CLOSE_TIMEOUT_S, follow_redirects=True).is_success
        assert read_until_closed(connect(port, b"GET / HTTP/1.1\r\nHost: x\r\n")) == b""


class Server:
    """The server a command built, once it has: what ``running`` needs of it."""

    def __init__(self, built: list[Any]) -> None:
        self._built = built

    @property
    def started(self) -> bool:
        return bool(self._built) and self._built[0].started

    @property
    def servers(self) -> Any:
        return self._built[0].servers

    @property
    def should_exit(self) -> bool:
        return bool(self._built) and self._built[0].should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if self._built:
            self._built[0].should_exit = value


def test_the_dashboard_command_serves_with_the_limits(
    short_deadline: list[Any], key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ses_tasks.ops.cli import dashboard

    monkeypatch.setenv("SES_TASKS_KEY_PREFIX", key_prefix)
    monkeypatch.setenv("SES_TASKS_REDIS_URL", REDIS_URL)
    assert dashboard.callback is not None
    check_command_server(
        lambda: dashboard.callback(  # type: ignore[misc]
            host="127.0.0.1", port=0, read_only=True, with_feedback=False
        ),
        short_deadline,
        "/login",
    )


def test_feedback_serve_serves_with_the_limits(
    short_deadline: list[Any], key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ses_tasks.feedback.cli import serve_command

    monkeypatch.setenv("SES_TASKS_KEY_PREFIX", key_prefix)
    monkeypatch.setenv("SES_TASKS_REDIS_URL", REDIS_URL)
    monkeypatch.setenv(ALLOWED_TOPIC_ARNS_ENV, DEFAULT_TOPIC_ARN)
    assert serve_command.callback is not None
    check_command_server(
        lambda: serve_command.callback(  # type: ignore[misc]
            host="127.0.0.1", port=0, ssl_certfile=None, ssl_keyfile=None
        ),
        short_deadline,
        "/health",
    )
