"""Logging out ends a session for every copy of its cookie (revoked in real Redis until it
would have expired); when Redis cannot say, cookies do not authenticate but Bearer does."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from ses_tasks.config import Settings, load_settings
from ses_tasks.dashboard import DashboardAuth, create_app
from ses_tasks.dashboard.security import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    SecurityMiddleware,
    SessionStoreError,
    Signer,
)
from ses_tasks.keys import Keys

from .campaign_support import LOOPBACK, csrf_of

TOKEN = "s3cret-token-0123456789"
HTML = {"Accept": "text/html"}


@pytest.fixture
def settings(key_prefix: str) -> Settings:
    return load_settings(key_prefix=key_prefix, dashboard_token=TOKEN)


def login(c: TestClient) -> str:
    """Logs ``c`` in through the form; its session cookie."""
    csrf = csrf_of(c.get("/login").text)
    done = c.post("/login", data={"csrf_token": csrf, "token": TOKEN}, follow_redirects=False)
    assert done.status_code == 303
    return done.cookies[SESSION_COOKIE]


def as_holder(c: TestClient, cookie: str, method: str, path: str, **kwargs: Any) -> Any:
    """``path`` with only ``cookie`` (the jar emptied first): whoever holds a copy of it."""
    c.cookies.clear()
    headers = {"Cookie": f"{SESSION_COOKIE}={cookie}", **kwargs.pop("headers", {})}
    return c.request(method, path, headers=headers, follow_redirects=False, **kwargs)


def test_logout_revokes_every_copy_of_the_cookie(
    settings: Settings, redis_client: redis.Redis
) -> None:
    app = create_app(settings=settings)
    signer: Signer = app.state.dash.signer
    with TestClient(app, base_url=LOOPBACK) as c:
        cookie = login(c)
        session = signer.load(cookie)
        assert session is not None and session.authenticated
        key = Keys(settings.key_prefix).dashboard_revoked(session.sid)
        csrf = csrf_of(as_holder(c, cookie, "GET", "/", headers=HTML).text)
        assert as_holder(c, cookie, "GET", "/api/campaigns").status_code == 200
        assert not redis_client.exists(key)

        out = as_holder(c, cookie, "POST", "/logout", data={"csrf_token": csrf})
        assert out.status_code == 303
        assert redis_client.get(key) == b"1"
        assert SESSION_MAX_AGE_S - 60 < redis_client.ttl(key) <= SESSION_MAX_AGE_S

        # the copy someone kept
        assert as_holder(c, cookie, "GET", "/api/campaigns").status_code == 401
        page = as_holder(c, cookie, "GET", "/", headers=HTML)
        assert page.status_code == 401
        assert page.cookies[SESSION_COOKIE] != cookie  # replaced by a fresh, anonymous one
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert as_holder(c, cookie, "GET", "/api/campaigns", headers=bearer).status_code == 200

        c.cookies.clear()
        again = login(c)  # a new session, not revoked
        assert as_holder(c, again, "GET", "/api/campaigns").status_code == 200


class DeadRedis:
    """A port that refuses connections (bound, never listening)."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@pytest.fixture
def dead_redis_url() -> Iterator[str]:
    with DeadRedis() as url:
        yield url


def test_redis_unreachable_fails_closed_for_cookies(key_prefix: str, dead_redis_url: str) -> None:
    settings = load_settings(key_prefix=key_prefix, dashboard_token=TOKEN, redis_url=dead_redis_url)
    app = create_app(settings=settings)
    with TestClient(app, base_url=LOOPBACK) as c:
        cookie = login(c)  # the form needs no Redis
        assert as_holder(c, cookie, "GET", "/api/campaigns").status_code == 401
        page = as_holder(c, cookie, "GET", "/", headers=HTML)
        assert page.status_code == 401
        assert SESSION_COOKIE not in page.cookies  # kept: good again once Redis answers
        # Logout cannot be recorded now: refused, the cookie kept, nothing pretends it ended.
        csrf = csrf_of(page.text)
        out = as_holder(c, cookie, "POST", "/logout", data={"csrf_token": csrf})
        assert out.status_code == 401 and SESSION_COOKIE not in out.cookies
    with pytest.raises(SessionStoreError) as err:
        asyncio.run(app.state.dash.is_revoked("x"))
    assert isinstance(err.value, ConnectionError)
    assert "redis://" not in str(err.value)


def test_logout_says_so_when_it_cannot_be_recorded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis gone between the request's check and the logout: 503, the cookie kept, so the
    user tries again rather than believing the session ended."""
    app = create_app(settings=settings)

    async def unreachable(session: object) -> None:
        raise SessionStoreError("cannot end the session: ConnectionError")

    with TestClient(app, base_url=LOOPBACK) as c:
        cookie = login(c)
        csrf = csrf_of(as_holder(c, cookie, "GET", "/", headers=HTML).text)
        monkeypatch.setattr(app.state.dash, "revoke", unreachable)
        out = as_holder(c, cookie, "POST", "/logout", data={"csrf_token": csrf})
        assert out.status_code == 503 and "try again" in out.text
        assert SESSION_COOKIE not in out.cookies
        assert as_holder(c, cookie, "GET", "/api/campaigns").status_code == 200


# The middleware alone: which requests look the session up --------------------------------------


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def guarded(revoked: object) -> SecurityMiddleware:
    auth = DashboardAuth(token=TOKEN)
    inner = Starlette(
        routes=[
            Route("/login", _ok, methods=["GET"]),
            Route("/page", _ok),
            Route("/static/x.css", _ok),
        ]
    )
    return SecurityMiddleware(inner, auth=auth, signer=Signer(b"k" * 32, auth), revoked=revoked)  # type: ignore[arg-type]


def test_only_authenticated_cookies_are_looked_up() -> None:
    asked: list[str] = []

    async def revoked(sid: str) -> bool:
        asked.append(sid)
        return False

    app = guarded(revoked)
    signer = app.signer
    good = signer.dump(signer.new_session(authenticated=True))
    anonymous = signer.dump(signer.new_session())
    with TestClient(app, base_url=LOOPBACK) as c:
        assert c.get("/page", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        c.cookies.clear()
        c.cookies.set(SESSION_COOKIE, anonymous)
        assert c.get("/page").status_code == 401
        assert asked == []  # no cookie, or one that never logged in: no round trip
        c.cookies.set(SESSION_COOKIE, good)
        assert c.get("/static/x.css").status_code == 200
        assert asked == []  # static files need no session
        assert c.get("/page").status_code == 200
        assert len(asked) == 1


def test_store_down_fails_closed_for_cookies_but_not_bearer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ses_tasks.dashboard")

    async def revoked(sid: str) -> bool:
        raise SessionStoreError("cannot check sessions: ConnectionError")

    app = guarded(revoked)
    cookie = app.signer.dump(app.signer.new_session(authenticated=True))
    with TestClient(app, base_url=LOOPBACK) as c:
        c.cookies.set(SESSION_COOKIE, cookie)
        assert c.get("/page").status_code == 401
        assert c.get("/page").status_code == 401
        assert c.get("/page", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    warnings = [r for r in caplog.records if "until Redis answers" in r.getMessage()]
    assert len(warnings) == 1  # not one per request
