"""The dashboard's ASGI app: ``create_app()`` for ``ses-tasks dashboard`` or any ASGI server.

Pages come from ``ses_tasks.dashboard.pages.<name>``, each exposing ``routes()``; they reach
Redis, settings and templates through ``request.app.state.dash`` (``DashboardContext``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import redis
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ses_tasks.config import Settings, load_settings
from ses_tasks.dashboard.security import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    DashboardAuth,
    FailureLimiter,
    SecurityMiddleware,
    Session,
    SessionStoreError,
    Signer,
    client_address,
    csrf_token,
    note_failure,
    session_of,
    too_many_response,
)
from ses_tasks.keys import Keys
from ses_tasks.store.connections import async_redis

if TYPE_CHECKING:
    from ses_tasks.feedback.settings import FeedbackSettings
    from ses_tasks.produce.client import SesTasks

__all__ = ["PAGE_MODULES", "DashboardContext", "create_app", "dash"]

log = logging.getLogger("ses_tasks.dashboard")

HERE = Path(__file__).parent
#: Page modules, in navigation order; each exposes ``routes() -> list[BaseRoute]``.
PAGE_MODULES = ("campaigns", "suppression", "limits", "workers")
NAV = (
    ("campaigns", "Campaigns", "/"),
    ("suppression", "Suppression", "/suppression"),
    ("limits", "Limits", "/limits"),
    ("workers", "Workers", "/workers"),
)


@dataclass
class DashboardContext:
    """What every page needs, on ``app.state.dash``."""

    settings: Settings
    keys: Keys
    templates: Jinja2Templates
    auth: DashboardAuth
    signer: Signer
    read_only: bool = False
    limiter: FailureLimiter = field(default_factory=FailureLimiter)
    _redis: aioredis.Redis | None = field(default=None, repr=False)
    _client: SesTasks | None = field(default=None, repr=False)
    _feedback: FeedbackSettings | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def redis(self) -> aioredis.Redis:
        """The app's asyncio client: opened by the lifespan, or on first use when mounted
        in an app that does not run ours."""
        if self._redis is None:
            self._redis = async_redis(self.settings.redis_url, settings=self.settings)
        return self._redis

    async def is_revoked(self, sid: str) -> bool:
        """Whether session ``sid`` was logged out (one ``EXISTS``)."""
        try:
            return bool(await self.redis.exists(self.keys.dashboard_revoked(sid)))
        except (redis.RedisError, OSError) as exc:
            raise SessionStoreError(f"cannot check sessions: {type(exc).__name__}") from exc

    async def revoke(self, session: Session) -> None:
        """Ends ``session`` for every copy of its cookie, until it would have expired."""
        remaining_s = session.issued + SESSION_MAX_AGE_S - int(time.time())
        if remaining_s <= 0:
            return
        try:
            await self.redis.set(self.keys.dashboard_revoked(session.sid), "1", ex=remaining_s)
        except (redis.RedisError, OSError) as exc:
            raise SessionStoreError(f"cannot end the session: {type(exc).__name__}") from exc

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()
        sync = self._client
        if sync is not None and "redis" in sync.__dict__:
            sync.redis.close()

    @property
    def client(self) -> SesTasks:
        """The synchronous API the CLI uses, for actions (call it in a worker thread)."""
        with self._lock:
            if self._client is None:  # built as the CLI builds it: the same publish policy
                from ses_tasks.ops.cli import CLI_PUBLISH_RETRY_POLICY
                from ses_tasks.produce.client import SesTasks
                from ses_tasks.queue.app import create_app as create_celery_app

                celery = create_celery_app(self.settings)
                celery.conf.update(task_publish_retry_policy=dict(CLI_PUBLISH_RETRY_POLICY))
                self._client = SesTasks(self.settings, celery_app=celery)
            return self._client

    @property
    def feedback_settings(self) -> FeedbackSettings:
        """Pause thresholds for bounce and complaint rates (``SES_TASKS_FEEDBACK_*``)."""
        if self._feedback is None:
            from ses_tasks.feedback.settings import load_feedback_settings

            self._feedback = load_feedback_settings()
        return self._feedback


def dash(request: Request) -> DashboardContext:
    context: DashboardContext = request.app.state.dash
    return context


def root(request: Request) -> str:
    """The mount point ('' when the dashboard is the whole app): prefix for every link."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _template_context(request: Request) -> dict[str, Any]:
    context = dash(request)
    session = session_of(request)
    return {
        "csrf_token": csrf_token(request),
        "read_only": context.read_only,
        "root": root(request),
        "nav": NAV,
        "logged_in": bool(context.auth.configured and session and session.authenticated),
    }


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = _utc
    return Jinja2Templates(env=env, context_processors=[_template_context])


def _utc(t: float | None) -> str:
    """Unix seconds as ``2025-06-01 09:00:00 UTC``."""
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t)))


# Login ------------------------------------------------------------------------------------


def _safe_next(raw: str | None) -> str:
    """A local path to go back to after logging in (never another site)."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return "/"
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme or parts.netloc:
        return "/"
    return raw


async def login_page(request: Request, *, error: str = "", status_code: int = 200) -> Response:
    context = dash(request)
    wanted = request.query_params.get("next")
    if wanted is None and request.url.path != f"{root(request)}/login":
        wanted = request.url.path[len(root(request)) :] or "/"
        if request.url.query:
            wanted += "?" + request.url.query
    return context.templates.TemplateResponse(
        request,
        "login.html",
        {
            "error": error,
            "next": _safe_next(wanted),
            "token_login": context.auth.token is not None,
            "basic_login": context.auth.basic,
        },
        status_code=status_code,
    )


async def login_get(request: Request) -> Response:
    context = dash(request)
    session = session_of(request)
    if not context.auth.configured or (session is not None and session.authenticated):
        return RedirectResponse(root(request) + _safe_next(request.query_params.get("next")), 303)
    return await login_page(request)


async def login_post(request: Request) -> Response:
    """Checks the token (or user and password); a new session id on success (no fixation)."""
    context = dash(request)
    async with request.form() as form:
        token = str(form.get("token") or "")
        user = str(form.get("user") or "")
        password = str(form.get("password") or "")
        wanted = str(form.get("next") or "/")
    client = client_address(request.scope)
    # Again, with no await from here to the count: failures of requests whose bodies were
    # read meanwhile (a burst of concurrent guesses) must stop this one too.
    wait_s = context.limiter.retry_after_s(client) if context.auth.configured else 0.0
    if wait_s > 0:
        return too_many_response(wait_s)
    ok = (token and context.auth.check_token(token)) or (
        user and context.auth.check_user(user, password)
    )
    if not context.auth.configured:
        ok = True
    if not ok:
        note_failure(context.limiter, client, "login form")
        return await login_page(request, error="Wrong credentials.", status_code=401)
    session = context.signer.new_session(authenticated=True)
    response = RedirectResponse(root(request) + _safe_next(wanted), 303)
    cookie = context.signer.cookie(
        session, secure=request.url.scheme == "https", path=root(request) or "/"
    )
    response.headers.append("set-cookie", cookie)
    return response


async def logout(request: Request) -> Response:
    """Revokes the session in Redis, so a copy of its cookie stops working too; when that
    cannot be recorded, says so (503) and keeps the cookie, so the user can try again."""
    context = dash(request)
    session = session_of(request)
    if context.auth.configured and session is not None and session.authenticated:
        try:
            await context.revoke(session)
        except SessionStoreError as exc:
            log.warning("dashboard: logout not recorded: %s", exc)
            return PlainTextResponse(
                "logout failed: the session store (Redis) is unreachable; try again",
                status_code=503,
            )
    response = RedirectResponse(root(request) + "/login", 303)
    response.headers.append(
        "set-cookie",
        f"{SESSION_COOKIE}=; Path={root(request) or '/'}; Max-Age=0; HttpOnly; SameSite=Strict",
    )
    return response


# The app ----------------------------------------------------------------------------------


def _page_routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = []
    for name in PAGE_MODULES:
        try:
            module = importlib.import_module(f"ses_tasks.dashboard.pages.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ses_tasks.dashboard.pages.{name}":
                raise  # a page that is there but broken must not vanish silently
            log.debug("dashboard page %s not installed", name)
            continue
        routes += module.routes()
    return routes


def create_app(
    *,
    settings: Settings | None = None,
    read_only: bool = False,
    auth: DashboardAuth | None = None,
    feedback: bool = False,
    secret_key: bytes | None = None,
    limiter: FailureLimiter | None = None,
) -> Starlette:
    """The dashboard, secure by default.

    ``auth`` defaults to the credentials in ``settings`` (``SES_TASKS_DASHBOARD_TOKEN``, or
    ``..._USER`` and ``..._PASSWORD``); with none, only requests addressed to a loopback
    name are answered (serve it on 127.0.0.1; ``security.check_bind`` refuses otherwise).
    ``read_only`` hides the action forms and refuses their POSTs (403). ``feedback`` mounts
    the SNS endpoint (``ses_tasks.feedback.asgi``) at ``/sns``, outside the dashboard's
    authentication and CSRF checks (SNS messages are verified by signature).
    ``secret_key`` signs sessions and CSRF tokens; by default a random one per process, so
    a restart logs everybody out. ``limiter`` counts failed logins (default: 10 per client
    address in 5 minutes, 100 in all per minute, then 429).

    Failed logins are WARNINGs on ``ses_tasks.dashboard``; when that logger would drop
    them (the CLI's default ERROR level), it is set to WARNING.
    """
    if log.level == logging.NOTSET and not log.isEnabledFor(logging.WARNING):
        log.setLevel(logging.WARNING)
    settings = settings or load_settings()
    auth = auth if auth is not None else DashboardAuth.from_settings(settings)
    signer = Signer(secret_key, auth)
    context = DashboardContext(
        settings=settings,
        keys=Keys(settings.key_prefix),
        templates=make_templates(),
        auth=auth,
        signer=signer,
        read_only=read_only,
        limiter=limiter if limiter is not None else FailureLimiter(),
    )
    exempt: tuple[str, ...] = ()
    routes: list[BaseRoute] = [
        Route("/login", login_get, methods=["GET"], name="login"),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"], name="logout"),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    if feedback:
        from ses_tasks.feedback.asgi import create_app as create_feedback_app

        feedback_app = create_feedback_app()
        # ``/sns`` itself too: a Mount alone answers it with a redirect built from ``Host``.
        routes.append(Route("/sns", endpoint=feedback_app, name="sns-exact"))
        routes.append(Mount("/sns", app=feedback_app, name="sns"))
        exempt = ("/sns",)
    routes += _page_routes()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        context.redis  # noqa: B018 - open the client on this loop
        try:
            yield
        finally:
            await context.close()

    async def unauthorized_page(request: Request) -> Response:
        return await login_page(request, status_code=401)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(
                SecurityMiddleware,
                auth=auth,
                signer=signer,
                read_only=read_only,
                login_page=unauthorized_page,
                exempt_prefixes=exempt,
                limiter=context.limiter,
                revoked=context.is_revoked,
            )
        ],
    )
    app.state.dash = context
    return app
