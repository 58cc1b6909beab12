"""Limits on who has not authenticated: failed logins counted per address and in total (429
with Retry-After, on a fake clock), each failure logged once without the secret, and small
body caps enforced before the body is read (Content-Length, chunked, content type)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from ses_tasks.config import Settings, load_settings
from ses_tasks.dashboard import DashboardAuth, create_app
from ses_tasks.dashboard.security import (
    MAX_ANONYMOUS_BYTES,
    SESSION_COOKIE,
    FailureLimiter,
    SecurityMiddleware,
    Signer,
)
from ses_tasks.sandbox.embedded import free_port, wait_for

from .campaign_support import LOOPBACK, csrf_of

TOKEN = "s3cret-token-0123456789"
GUESSER = "203.0.113.5"
START_TIMEOUT_S = 15.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(key_prefix: str) -> Settings:
    return load_settings(key_prefix=key_prefix, dashboard_token=TOKEN)


@pytest.fixture
def dashboard_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="ses_tasks.dashboard")
    return caplog


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Peers:
    """One app, requests from any client address (``X-Test-Peer``), each with only the
    cookie it is given: one event loop for the app's Redis client, many clients."""

    def __init__(self, c: TestClient) -> None:
        self.c = c

    def request(
        self, method: str, path: str, peer: str, *, cookie: str | None = None, **kwargs: Any
    ) -> httpx2.Response:
        self.c.cookies.clear()
        headers = {"X-Test-Peer": peer, **kwargs.pop("headers", {})}
        if cookie is not None:
            headers["Cookie"] = f"{SESSION_COOKIE}={cookie}"
        return self.c.request(method, path, headers=headers, follow_redirects=False, **kwargs)

    def get(self, path: str, peer: str, **kwargs: Any) -> httpx2.Response:
        return self.request("GET", path, peer, **kwargs)

    def login_form(self, peer: str) -> tuple[str, str]:
        """A fresh session's (cookie, CSRF token), from the login page."""
        page = self.get("/login", peer)
        return page.cookies[SESSION_COOKIE], csrf_of(page.text)

    def login(self, peer: str, token: str = TOKEN) -> httpx2.Response:
        cookie, csrf = self.login_form(peer)
        data = {"csrf_token": csrf, "token": token}
        return self.request("POST", "/login", peer, cookie=cookie, data=data)

    def session(self, peer: str) -> str:
        done = self.login(peer)
        assert done.status_code == 303
        return done.cookies[SESSION_COOKIE]


def _peer_from_header(app: Any) -> Any:
    async def addressed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-test-peer":
                    scope = {**scope, "client": (value.decode(), 40000)}
        await app(scope, receive, send)

    return addressed


@contextlib.contextmanager
def peers(app: Any) -> Iterator[Peers]:
    with TestClient(_peer_from_header(app), base_url=LOOPBACK) as c:
        yield Peers(c)


# The limiter ----------------------------------------------------------------------------------


def test_limiter_per_client_window(clock: FakeClock) -> None:
    limiter = FailureLimiter(clock=clock)
    for _ in range(9):
        assert limiter.failed("a") is None
    assert limiter.retry_after_s("a") == 0
    clock.now += 100
    assert limiter.failed("a") == "client"  # the 10th within 5 minutes
    assert limiter.retry_after_s("a") == 200  # until the first leaves the window
    assert limiter.retry_after_s("b") == 0  # others are not affected
    clock.now += 200
    assert limiter.retry_after_s("a") == 0
    assert limiter.failed("a") is None  # 9 of them left the window


def test_limiter_global_window(clock: FakeClock) -> None:
    limiter = FailureLimiter(clock=clock)
    for i in range(99):
        assert limiter.failed(f"10.0.0.{i}") is None
    assert limiter.failed("10.0.1.0") == "everybody"
    assert limiter.retry_after_s("192.0.2.1") == 60
    clock.now += 60
    assert limiter.retry_after_s("192.0.2.1") == 0


def test_limiter_forgets_addresses_outside_the_window(clock: FakeClock) -> None:
    """Memory stays bounded however many addresses guess."""
    limiter = FailureLimiter(clock=clock, total=10**6)
    for i in range(1024):
        limiter.failed(f"10.{i // 256}.{i % 256}.1")
    assert "clients=1024" in repr(limiter)
    clock.now += 301
    limiter.failed("192.0.2.1")
    assert "clients=1 " in repr(limiter)


def test_limiter_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="per_client"):
        FailureLimiter(per_client=0)


# In the app -----------------------------------------------------------------------------------


def test_guessed_bearer_tokens_from_one_address_get_429(
    settings: Settings, clock: FakeClock, dashboard_log: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings=settings, limiter=FailureLimiter(clock=clock))
    with peers(app) as p:
        session = p.session(GUESSER)  # logged in before the guessing, from the same address
        guesses = [p.get("/api/campaigns", GUESSER, headers=bearer(f"guess{i}")) for i in range(10)]
        assert [r.status_code for r in guesses] == [401] * 10
        refused = p.get("/api/campaigns", GUESSER, headers=bearer(TOKEN))
        assert refused.status_code == 429  # not even the right token is looked at
        assert refused.headers["retry-after"] == "300"
        assert "content-security-policy" in refused.headers
        assert p.get("/api/campaigns", GUESSER, cookie=session).status_code == 200
        assert p.get("/api/campaigns", "198.51.100.7", headers=bearer(TOKEN)).status_code == 200
        clock.now += 299
        again = p.get("/api/campaigns", GUESSER, headers=bearer(TOKEN))
        assert (again.status_code, again.headers["retry-after"]) == (429, "1")
        clock.now += 1
        assert p.get("/api/campaigns", GUESSER, headers=bearer(TOKEN)).status_code == 200

    failures = [r for r in dashboard_log.records if "failed authentication (" in r.getMessage()]
    assert len(failures) == 10
    assert all(r.levelno == logging.WARNING and r.name == "ses_tasks.dashboard" for r in failures)
    assert all(GUESSER in r.getMessage() and "bearer" in r.getMessage() for r in failures)
    assert [r for r in dashboard_log.records if "refused (429) for 300 s" in r.getMessage()]
    assert "guess" not in dashboard_log.text and TOKEN not in dashboard_log.text


def test_login_form_failures_count_and_lock_the_form(
    settings: Settings, clock: FakeClock, dashboard_log: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings=settings, limiter=FailureLimiter(clock=clock))
    with peers(app) as p:
        cookie, csrf = p.login_form(GUESSER)
        for i in range(10):
            data = {"csrf_token": csrf, "token": f"guess-{i}"}
            assert p.request("POST", "/login", GUESSER, cookie=cookie, data=data).status_code == 401
        right = p.request(
            "POST", "/login", GUESSER, cookie=cookie, data={"csrf_token": csrf, "token": TOKEN}
        )
        assert right.status_code == 429
        assert SESSION_COOKIE not in right.cookies  # no session for it
        assert p.get("/", GUESSER, headers={"Accept": "text/html"}).status_code == 429
        assert p.login("198.51.100.7").status_code == 303  # other addresses log in
    messages = [r.getMessage() for r in dashboard_log.records]
    assert sum("failed authentication (login form) from " + GUESSER in m for m in messages) == 10
    assert "guess-" not in dashboard_log.text


class _LoadedWhileReading(FailureLimiter):
    """The middleware's look finds nothing; by the time the body has been read, other
    requests' failures (a concurrent burst) have locked the address."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(per_client=1, clock=clock)
        self.looks = 0

    def retry_after_s(self, client: str) -> float:
        self.looks += 1
        if self.looks == 1:
            self.failed(client)  # lands while this request's body is being read
            return 0.0
        return super().retry_after_s(client)


def test_a_login_whose_address_was_locked_while_its_body_was_read_gets_429(
    settings: Settings, clock: FakeClock
) -> None:
    limiter = _LoadedWhileReading(clock)
    app = create_app(settings=settings, limiter=limiter)
    with peers(app) as p:
        cookie, csrf = p.login_form(GUESSER)
        limiter.looks = 0
        right = p.request(
            "POST", "/login", GUESSER, cookie=cookie, data={"csrf_token": csrf, "token": TOKEN}
        )
    assert right.status_code == 429, right.text
    assert int(right.headers["retry-after"]) > 0
    assert SESSION_COOKIE not in right.cookies
    assert limiter.looks == 2  # the middleware's, then the handler's after reading the form


def test_basic_auth_failures_count(key_prefix: str, clock: FakeClock) -> None:
    settings = load_settings(key_prefix=key_prefix, dashboard_user="ops", dashboard_password="pw!")
    app = create_app(settings=settings, limiter=FailureLimiter(clock=clock))
    good = {"Authorization": "Basic " + base64.b64encode(b"ops:pw!").decode()}
    with peers(app) as p:
        for i in range(10):
            bad = {"Authorization": "Basic " + base64.b64encode(f"ops:{i}".encode()).decode()}
            assert p.get("/api/campaigns", GUESSER, headers=bad).status_code == 401
        assert p.get("/api/campaigns", GUESSER, headers=good).status_code == 429


def test_successes_and_missing_credentials_do_not_count(
    settings: Settings, clock: FakeClock
) -> None:
    app = create_app(settings=settings, limiter=FailureLimiter(clock=clock))
    with peers(app) as p:
        for i in range(9):
            assert p.get("/api/campaigns", GUESSER, headers=bearer(f"g{i}")).status_code == 401
        for _ in range(20):
            assert p.get("/api/campaigns", GUESSER, headers=bearer(TOKEN)).status_code == 200
            assert p.get("/api/campaigns", GUESSER).status_code == 401  # no credentials
        assert p.get("/api/campaigns", GUESSER, headers=bearer("last")).status_code == 401
        assert p.get("/api/campaigns", GUESSER, headers=bearer(TOKEN)).status_code == 429


def test_global_limit_locks_out_everybody_without_a_session(
    settings: Settings, clock: FakeClock, dashboard_log: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings=settings, limiter=FailureLimiter(clock=clock))
    with peers(app) as p:
        session = p.session("192.0.2.200")
        for n in range(20):  # 5 each: no single address reaches its own limit
            for i in range(5):
                guess = bearer(f"g{n}-{i}")
                assert p.get("/api/campaigns", f"192.0.2.{n}", headers=guess).status_code == 401
        refused = p.get("/api/campaigns", "198.51.100.9", headers=bearer(TOKEN))
        assert (refused.status_code, refused.headers["retry-after"]) == (429, "60")
        assert p.get("/api/campaigns", "198.51.100.9", cookie=session).status_code == 200
        clock.now += 60
        assert p.get("/api/campaigns", "198.51.100.9", headers=bearer(TOKEN)).status_code == 200
    assert any("every client without a session" in r.getMessage() for r in dashboard_log.records)


def test_failures_are_shown_by_the_cli_default_logging(
    settings: Settings, dashboard_log: pytest.LogCaptureFixture
) -> None:
    """``ses-tasks`` logs at ERROR by default; the dashboard's WARNINGs must still show."""
    root, logger = logging.getLogger(), logging.getLogger("ses_tasks.dashboard")
    levels = root.level, logger.level
    root.setLevel(logging.ERROR)  # setLevel, not assignment: it clears the loggers' caches
    logger.setLevel(logging.NOTSET)
    try:
        assert not logger.isEnabledFor(logging.WARNING)
        app = create_app(settings=settings)
        assert logger.isEnabledFor(logging.WARNING)
        with peers(app) as p:
            assert p.get("/", GUESSER, headers=bearer("nope")).status_code == 401
        assert any("failed authentication (" in r.getMessage() for r in dashboard_log.records)
    finally:
        root.setLevel(levels[0])
        logger.setLevel(levels[1])


# Body caps ------------------------------------------------------------------------------------


async def _ok(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse(f"read {len(body)}")


def guarded() -> SecurityMiddleware:
    auth = DashboardAuth(token=TOKEN)
    inner = Starlette(routes=[Route("/{path:path}", _ok, methods=["GET", "POST"])])
    return SecurityMiddleware(inner, auth=auth, signer=Signer(None, auth))


def call(
    app: SecurityMiddleware, headers: dict[str, str], chunks: Iterator[bytes]
) -> tuple[int, int, int]:
    """POST ``/login`` straight through the ASGI interface: (status, receive calls, bytes
    handed to the app), so a test sees how much of the body was pulled."""
    pulled = [0, 0]
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled[0] += 1
        pulled[1] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/login",
        "raw_path": b"/login",
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "client": (GUESSER, 40000),
        "server": ("127.0.0.1", 8025),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return status[0], pulled[0], pulled[1]


def endless(size: int = 4096) -> Iterator[bytes]:
    while True:
        yield b"a" * size


FORM = {"Host": "127.0.0.1", "Content-Type": "application/x-www-form-urlencoded"}


def test_anonymous_login_body_refused_on_its_content_length_unread() -> None:
    headers = {**FORM, "Content-Length": str(1024 * 1024)}
    assert call(guarded(), headers, endless()) == (413, 0, 0)


def test_anonymous_chunked_body_refused_once_past_the_cap() -> None:
    status, _, pulled = call(guarded(), FORM, endless())
    assert status == 413
    assert MAX_ANONYMOUS_BYTES < pulled <= MAX_ANONYMOUS_BYTES + 4096


def test_anonymous_non_form_body_refused_unread() -> None:
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json"}
    assert call(guarded(), headers, endless()) == (415, 0, 0)


def test_authenticated_requests_keep_the_larger_cap() -> None:
    body = iter([b"a" * (64 * 1024)] * 16)  # 1 MiB, chunked
    status, _, pulled = call(guarded(), {**FORM, **bearer(TOKEN)}, body)
    assert (status, pulled) == (200, 1024 * 1024)


# Under the real CLI and server ----------------------------------------------------------------


@pytest.fixture
def served(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``ses-tasks dashboard`` as run by people (its default logging); (base URL, stderr)."""
    port = free_port()
    log_path = tmp_path / "dashboard.log"
    env = {
        **os.environ,
        "SES_TASKS_KEY_PREFIX": settings.key_prefix,
        "SES_TASKS_DASHBOARD_TOKEN": TOKEN,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ses_tasks.ops.cli", "dashboard", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"dashboard exited {process.returncode}: {log_path.read_text()}")
        try:
            return httpx.get(base + "/login", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, timeout_s=START_TIMEOUT_S, interval_s=0.1, what="the dashboard")
        yield base, log_path
    finally:
        process.terminate()
        process.wait(timeout=START_TIMEOUT_S)


def test_served_dashboard_logs_failures_and_refuses_big_bodies_unread(
    served: tuple[str, Path],
) -> None:
    base, log_path = served
    assert httpx.get(base + "/api/campaigns", headers=bearer("wrong-guess")).status_code == 401
    wait_for(
        lambda: "failed authentication (bearer)" in log_path.read_text(),
        timeout_s=5,
        what="the failure in the log",
    )
    text = log_path.read_text()
    assert (
        "WARNING ses_tasks.dashboard: dashboard: failed authentication (bearer) from 127.0.0.1"
        in text
    )
    assert "wrong-guess" not in text

    # 1 MiB announced, none of it sent: the answer comes anyway.
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 1048576\r\n\r\n"
        )
        assert s.recv(100).startswith(b"HTTP/1.1 413 ")
