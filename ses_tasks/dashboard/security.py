"""Who may use the dashboard, and what every response carries.

Rules (docs in ``create_app``):

- Without credentials configured (``SES_TASKS_DASHBOARD_TOKEN``, or ``..._USER`` and
  ``..._PASSWORD``, each also from ``*_FILE``) nobody logs in, and the dashboard answers
  only requests addressed to a loopback name (``Host: 127.0.0.1``, ``localhost``, ``[::1]``):
  a page on another site that rebinds its DNS name to 127.0.0.1 gets 403, not our pages.
  ``check_bind`` refuses to serve on any other address without credentials, or with a
  token shorter than ``MIN_TOKEN_CHARS``.
- With credentials, every request needs them, on every address: ``Authorization: Bearer``,
  HTTP basic, or the session cookie the login form sets. ``/static`` and ``/login`` are open.
  A session ended by logout is revoked in Redis (``Keys.dashboard_revoked``); a request
  with a session cookie costs one ``EXISTS``, and when Redis cannot answer it the cookie
  does not authenticate (fail closed; Bearer and basic still work).
- Failed authentications (login form, Bearer, basic) are logged at WARNING on
  ``ses_tasks.dashboard`` (the client address, never what was sent) and counted by a
  ``FailureLimiter``: past its limits, requests not authenticated by a session get 429.
- Bodies are capped before they are read: ``MAX_ANONYMOUS_BYTES`` for anyone not
  authenticated (the login form; other content types get 415), ``MAX_FORM_BYTES`` after.
  A ``Content-Length`` over the cap is refused unread; a chunked body once the cap is passed.
- Every state-changing request (anything but GET/HEAD/OPTIONS) carries ``csrf_token`` (a
  form field or the ``X-CSRF-Token`` header): an HMAC of this app's secret and the session
  id, so a token is only good with its own session cookie. Its ``Origin`` (else its
  ``Referer``), when sent, must name this host. Read-only mode refuses them all (403).
  A request carrying ``Authorization: Bearer`` needs no CSRF token: a browser never adds
  that header by itself, so a forged cross-site request cannot carry it (HTTP basic it
  does replay, so basic-authenticated posts still need the token).
- Every response carries a strict Content-Security-Policy (no inline script or style) and
  ``nosniff``/``same-origin`` headers.

Paths under ``exempt_prefixes`` (the SNS endpoint) skip all of this but the headers: SNS
authenticates itself by signature.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ses_tasks.errors import ConfigurationError, SesTasksError

if TYPE_CHECKING:
    from ses_tasks.config import Settings

__all__ = [
    "CSP",
    "MAX_ANONYMOUS_BYTES",
    "MAX_FORM_BYTES",
    "MIN_TOKEN_CHARS",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "SESSION_MAX_AGE_S",
    "DashboardAuth",
    "FailureLimiter",
    "SecurityMiddleware",
    "Session",
    "SessionStoreError",
    "Signer",
    "check_bind",
    "client_address",
    "csrf_token",
    "is_loopback",
    "note_failure",
    "route_path",
    "session_of",
    "too_many_response",
]

log = logging.getLogger("ses_tasks.dashboard")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
)
SESSION_COOKIE = "ses_tasks_dashboard"
#: A login lasts this long (the cookie and its signed issue time).
SESSION_MAX_AGE_S = 12 * 3600
#: Largest body of an authenticated state-changing request (read whole to find its token).
MAX_FORM_BYTES = 5 * 1024 * 1024
#: Largest body from anyone not authenticated (a login form is a few hundred bytes): nobody
#: without credentials makes the dashboard hold more than this per request.
MAX_ANONYMOUS_BYTES = 16 * 1024
#: The shortest ``SES_TASKS_DASHBOARD_TOKEN`` accepted when serving beyond loopback.
MIN_TOKEN_CHARS = 16
#: Failed authentications one client address may make in ``PER_CLIENT_WINDOW_S``...
PER_CLIENT_FAILURES = 10
PER_CLIENT_WINDOW_S = 300.0
#: ... and all clients together in ``GLOBAL_WINDOW_S``, before 429.
GLOBAL_FAILURES = 100
GLOBAL_WINDOW_S = 60.0
#: Content types of a body from someone not authenticated (the login form's).
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
#: Paths that need no session at all: no revocation lookup for them.
STATIC_PREFIX = "/static/"
#: At most one warning this often while Redis cannot say whether a session was revoked.
STORE_WARNING_INTERVAL_S = 60.0
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Scope key holding the request's ``Session``.
SCOPE_KEY = "ses_tasks.dashboard.session"
_CREDENTIAL_SETTINGS = (
    "SES_TASKS_DASHBOARD_TOKEN (or SES_TASKS_DASHBOARD_TOKEN_FILE), or "
    "SES_TASKS_DASHBOARD_USER and SES_TASKS_DASHBOARD_PASSWORD (or their *_FILE)"
)


def _eq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@dataclass(frozen=True)
class DashboardAuth:
    """The credentials a request must present; none configured means loopback only."""

    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ConfigurationError(
                "SES_TASKS_DASHBOARD_USER", "a dashboard user needs a password, and back"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> DashboardAuth:
        token, password = settings.dashboard_token, settings.dashboard_password
        return cls(
            token=token.get_secret_value() if token is not None else None,
            user=settings.dashboard_user,
            password=password.get_secret_value() if password is not None else None,
        )

    @property
    def configured(self) -> bool:
        return self.token is not None or self.user is not None

    @property
    def basic(self) -> bool:
        return self.user is not None

    def fingerprint(self) -> bytes:
        """Changes when any credential does: signed sessions die with the old ones."""
        raw = "\0".join(x or "" for x in (self.token, self.user, self.password))
        return hashlib.sha256(raw.encode("utf-8")).digest()

    def check_token(self, value: str) -> bool:
        return self.token is not None and _eq(value, self.token)

    def check_user(self, user: str, password: str) -> bool:
        if self.user is None or self.password is None:
            return False
        # Both compared, always: the time taken says nothing about which one was wrong.
        return _eq(user, self.user) & _eq(password, self.password)

    def check_header(self, value: str | None) -> bool:
        """An ``Authorization`` header: ``Bearer <token>`` or ``Basic <user:password>``."""
        if not value:
            return False
        scheme, _, credentials = value.strip().partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == "bearer":
            return self.check_token(credentials)
        if scheme == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return False
            user, sep, password = decoded.partition(":")
            return bool(sep) and self.check_user(user, password)
        return False


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` and ``localhost`` (a port or brackets may follow/surround)."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: DashboardAuth) -> None:
    """Refuse to serve beyond this machine without credentials, or with a token short
    enough to guess (ConfigurationError)."""
    if is_loopback(host):
        return
    if not auth.configured:
        raise ConfigurationError(
            "SES_TASKS_DASHBOARD_TOKEN",
            f"the dashboard binds to {host}, beyond this machine, and no credentials are "
            f"configured: set {_CREDENTIAL_SETTINGS}, or bind to 127.0.0.1",
        )
    if auth.token is not None and len(auth.token) < MIN_TOKEN_CHARS:
        raise ConfigurationError(
            "SES_TASKS_DASHBOARD_TOKEN",
            f"the dashboard binds to {host}, beyond this machine, and its token has "
            f"{len(auth.token)} characters: use at least {MIN_TOKEN_CHARS} "
            "(e.g. `openssl rand -hex 24`), or bind to 127.0.0.1",
        )


class SessionStoreError(SesTasksError, ConnectionError):
    """Redis could not say whether a session was revoked (or record that it is)."""


class FailureLimiter:
    """Failed authentications counted in this process, per client address and in total.

    A client with ``per_client`` failures within ``per_client_window_s``, or everybody once
    there were ``total`` failures within ``total_window_s``, must wait (``retry_after_s``)
    until the oldest of them leaves its window: at most ``per_client`` guesses per window
    from one address, ``total`` from all. Memory is bounded: each address keeps its last
    ``per_client`` times, and addresses with none left in the window are dropped.
    ``clock`` (monotonic seconds) is for tests. Not thread-safe: call it from one event loop.
    """

    def __init__(
        self,
        *,
        per_client: int = PER_CLIENT_FAILURES,
        per_client_window_s: float = PER_CLIENT_WINDOW_S,
        total: int = GLOBAL_FAILURES,
        total_window_s: float = GLOBAL_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("per_client", per_client),
            ("per_client_window_s", per_client_window_s),
            ("total", total),
            ("total_window_s", total_window_s),
        ):
            if not value > 0:
                raise ConfigurationError(name, f"must be positive, not {value}")
        self.per_client = per_client
        self.per_client_window_s = float(per_client_window_s)
        self.total = total
        self.total_window_s = float(total_window_s)
        self._clock = clock
        self._clients: dict[str, deque[float]] = {}
        self._all: deque[float] = deque(maxlen=total)
        self._prune_at = 1024

    def __repr__(self) -> str:
        return (
            f"<FailureLimiter clients={len(self._clients)} "
            f"failures_in_window={self._recent(self._all, self.total_window_s)}>"
        )

    def _recent(self, times: deque[float], window_s: float) -> int:
        now = self._clock()
        return sum(1 for t in times if now - t < window_s)

    def retry_after_s(self, client: str) -> float:
        """Seconds ``client`` must wait before its credentials are looked at; 0: now."""
        return max(self.global_wait_s(), self.client_wait_s(client))

    def global_wait_s(self) -> float:
        if len(self._all) < self.total:
            return 0.0
        return max(self._all[0] + self.total_window_s - self._clock(), 0.0)

    def client_wait_s(self, client: str) -> float:
        times = self._clients.get(client)
        if times is None or len(times) < self.per_client:
            return 0.0
        return max(times[0] + self.per_client_window_s - self._clock(), 0.0)

    def failed(self, client: str) -> str | None:
        """Counts one failure of ``client``. Who must wait because of it, if anybody newly
        must: ``"client"`` or ``"everybody"``; else None."""
        before = (self.client_wait_s(client) > 0, self.global_wait_s() > 0)
        now = self._clock()
        self._all.append(now)
        times = self._clients.get(client)
        if times is None:
            if len(self._clients) >= self._prune_at:
                self._prune(now)
            times = self._clients[client] = deque(maxlen=self.per_client)
        times.append(now)
        if self.global_wait_s() > 0 and not before[1]:
            return "everybody"
        if self.client_wait_s(client) > 0 and not before[0]:
            return "client"
        return None

    def _prune(self, now: float) -> None:
        """Drops addresses whose failures all left the window (amortised: the next prune
        waits until the table doubles)."""
        horizon = now - self.per_client_window_s
        self._clients = {k: v for k, v in self._clients.items() if v[-1] > horizon}
        self._prune_at = max(1024, 2 * len(self._clients))


def too_many_response(wait_s: float) -> PlainTextResponse:
    """429 with ``Retry-After``: credentials were not looked at."""
    seconds = max(math.ceil(wait_s), 1)
    return PlainTextResponse(
        f"too many failed logins: try again in {seconds} s",
        status_code=429,
        headers={"Retry-After": str(seconds)},
    )


def note_failure(limiter: FailureLimiter, client: str, how: str) -> None:
    """A failed authentication: counted, and logged once at WARNING without what was sent
    (``how``: ``login form``, ``bearer``, ``basic``)."""
    locked = limiter.failed(client)
    log.warning("dashboard: failed authentication (%s) from %s", how, client)
    if locked is not None:
        if locked == "client":
            who, wait_s = client, limiter.client_wait_s(client)
        else:
            who, wait_s = "every client without a session", limiter.global_wait_s()
        log.warning(
            "dashboard: too many failed authentications: %s refused (429) for %d s",
            who,
            math.ceil(wait_s),
        )


def client_address(scope: Scope) -> str:
    """The peer's address (the client's, behind a proxy uvicorn trusts for it)."""
    peer = scope.get("client")
    return str(peer[0]) if peer else "unknown"


@dataclass(frozen=True, slots=True)
class Session:
    """The signed cookie's content: an id (for CSRF tokens) and whether it logged in."""

    sid: str
    authenticated: bool = False
    issued: int = 0
    #: Made for this request: the response sets the cookie.
    new: bool = False
    csrf: str = ""


class Signer:
    """HMACs with this app's secret: session cookies and CSRF tokens."""

    def __init__(self, secret: bytes | None, auth: DashboardAuth) -> None:
        base = secret or secrets.token_bytes(32)
        self._key = hmac.new(base, b"session" + auth.fingerprint(), hashlib.sha256).digest()

    def _mac(self, purpose: str, value: str) -> str:
        msg = f"{purpose}\0{value}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def csrf(self, sid: str) -> str:
        return self._mac("csrf", sid)

    def new_session(self, *, authenticated: bool = False) -> Session:
        sid = secrets.token_urlsafe(18)
        return Session(sid, authenticated, int(time.time()), True, self.csrf(sid))

    def dump(self, session: Session) -> str:
        body = f"{session.sid}.{int(session.authenticated)}.{session.issued}"
        return f"{body}.{self._mac('session', body)}"

    def load(self, raw: str | None, *, now: float | None = None) -> Session | None:
        if not raw or raw.count(".") != 3:
            return None
        body, _, mac = raw.rpartition(".")
        if not _eq(mac, self._mac("session", body)):
            return None
        sid, auth, issued = body.split(".")
        try:
            issued_s = int(issued)
        except ValueError:
            return None
        if (now or time.time()) - issued_s > SESSION_MAX_AGE_S:
            return None
        return Session(sid, auth == "1", issued_s, False, self.csrf(sid))

    def cookie(self, session: Session, *, secure: bool, path: str = "/") -> str:
        """A ``Set-Cookie`` value: HttpOnly, SameSite=Strict, Secure over HTTPS."""
        parts = [
            f"{SESSION_COOKIE}={self.dump(session)}",
            f"Path={path or '/'}",
            f"Max-Age={SESSION_MAX_AGE_S}",
            "HttpOnly",
            "SameSite=Strict",
        ]
        if secure:
            parts.append("Secure")
        return "; ".join(parts)


def route_path(scope: Scope) -> str:
    """The path inside this app (a mount point in ``root_path`` removed)."""
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def session_of(request: Request) -> Session | None:
    session = request.scope.get(SCOPE_KEY)
    return session if isinstance(session, Session) else None


def csrf_token(request: Request) -> str:
    """The token a form of this request's page must send back."""
    session = session_of(request)
    return session.csrf if session is not None else ""


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


def _same_origin(value: str, host: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return False
    return bool(parts.scheme in ("http", "https") and parts.netloc) and _eq(
        parts.netloc.lower(), host.lower()
    )


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _form_token(scope: Scope, body: bytes, content_type: str) -> str:
    ctype = _media_type(content_type)
    if ctype == "application/x-www-form-urlencoded":
        values = urllib.parse.parse_qs(body.decode("latin-1"), max_num_fields=1000)
        return (values.get(CSRF_FIELD) or [""])[0]
    if ctype == "multipart/form-data":
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, replay)
        try:
            async with request.form() as form:
                value = form.get(CSRF_FIELD)
                return value if isinstance(value, str) else ""
        except Exception:  # a malformed form has no token: refused below
            return ""
    return ""


LoginResponder = Callable[[Request], Awaitable[Response]]
#: Whether a session id was revoked (logged out); raises ``SessionStoreError``.
RevocationCheck = Callable[[str], Awaitable[bool]]


class SecurityMiddleware:
    """Authentication, rate limits, body caps, CSRF, host check, read-only and headers, for
    every request.

    ``limiter`` counts failed authentications (a new ``FailureLimiter`` by default; share
    one with the login form's handler). ``revoked`` says whether an authenticated session
    cookie was logged out (None: sessions are never revoked).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        auth: DashboardAuth,
        signer: Signer,
        read_only: bool = False,
        login_page: LoginResponder | None = None,
        open_prefixes: Sequence[str] = ("/static/", "/login"),
        exempt_prefixes: Sequence[str] = (),
        max_form_bytes: int = MAX_FORM_BYTES,
        max_anonymous_bytes: int = MAX_ANONYMOUS_BYTES,
        limiter: FailureLimiter | None = None,
        revoked: RevocationCheck | None = None,
    ) -> None:
        self.app = app
        self.auth = auth
        self.signer = signer
        self.read_only = read_only
        self.login_page = login_page
        self.open_prefixes = tuple(open_prefixes)
        self.exempt_prefixes = tuple(exempt_prefixes)
        self.max_form_bytes = max_form_bytes
        self.max_anonymous_bytes = max_anonymous_bytes
        self.limiter = limiter if limiter is not None else FailureLimiter()
        self.revoked = revoked
        self._store_warned_at: float | None = None

    @staticmethod
    def _under(path: str, prefixes: Sequence[str]) -> bool:
        return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            return
        started = time.perf_counter()
        path = route_path(scope)
        if self._under(path, self.exempt_prefixes):
            await self.app(scope, receive, self._sender(send, None, started, scope))
            return
        headers = _headers(scope)
        host = headers.get("host", "")
        if not self.auth.configured and not is_loopback(host):
            denied = self._sender(send, None, started, scope)
            await self._deny(scope, receive, denied, 403, "this dashboard only answers localhost")
            return
        session = await self._session(headers, path)
        scope[SCOPE_KEY] = session
        wrapped = self._sender(send, session, started, scope)
        method: str | None = "open"  # how the request authenticated; None: it did not
        if self.auth.configured:
            method = "session" if session.authenticated else None
        if method is None:
            client = client_address(scope)
            wait_s = self.limiter.retry_after_s(client)
            if wait_s > 0:  # credentials not even looked at: no guess is answered
                await self._too_many(scope, receive, wrapped, wait_s)
                return
            method = self._authorization(headers.get("authorization"), client)
        if method is None and not self._under(path, self.open_prefixes):
            await self._unauthorized(scope, receive, wrapped, headers)
            return
        if scope.get("method", "GET") not in SAFE_METHODS:
            replay = await self._check_post(
                scope,
                receive,
                wrapped,
                headers,
                path,
                session,
                authenticated=method is not None,
                by_bearer=method == "bearer",
            )
            if replay is None:
                return
            receive = replay
        await self.app(scope, receive, wrapped)

    async def _session(self, headers: dict[str, str], path: str) -> Session:
        """The cookie's session; a new one when there is none, or it was revoked. When Redis
        cannot say whether it was, the session stands but does not authenticate."""
        session = self.signer.load(_cookie(headers, SESSION_COOKIE))
        if session is None:
            return self.signer.new_session()
        if (
            not session.authenticated
            or not self.auth.configured
            or self.revoked is None
            or path.startswith(STATIC_PREFIX)
        ):
            return session
        try:
            if await self.revoked(session.sid):
                return self.signer.new_session()  # the response replaces the cookie
        except SessionStoreError as exc:
            now = time.monotonic()
            if self._store_warned_at is None or (
                now - self._store_warned_at >= STORE_WARNING_INTERVAL_S
            ):
                self._store_warned_at = now
                log.warning("dashboard: session cookies refused until Redis answers: %s", exc)
            return dataclasses.replace(session, authenticated=False)
        return session

    def _authorization(self, value: str | None, client: str) -> str | None:
        """``bearer`` or ``basic`` when the ``Authorization`` header is right; a wrong one is
        a failure (counted and logged), none is not."""
        if not value or not value.strip():
            return None
        scheme = value.strip().partition(" ")[0].lower()
        if self.auth.check_header(value):
            return scheme
        note_failure(self.limiter, client, scheme if scheme in ("bearer", "basic") else "other")
        return None

    async def _check_post(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        path: str,
        session: Session,
        *,
        authenticated: bool,
        by_bearer: bool = False,
    ) -> Receive | None:
        """The replayed body of an accepted state-changing request, or None (answered)."""
        if self.read_only and not self._under(path, ("/login", "/logout")):
            await self._deny(scope, receive, send, 403, "the dashboard is read-only")
            return None
        host = headers.get("host", "")
        origin = headers.get("origin")
        referer = headers.get("referer")
        if origin is not None:
            if not _same_origin(origin, host):
                await self._deny(scope, receive, send, 403, "cross-origin request refused")
                return None
        elif referer is not None and not _same_origin(referer, host):
            await self._deny(scope, receive, send, 403, "cross-origin request refused")
            return None
        content_type = headers.get("content-type", "")
        limit = self.max_form_bytes
        if not authenticated:
            limit = self.max_anonymous_bytes
            if _media_type(content_type) not in FORM_TYPES:
                await self._deny(scope, receive, send, 415, "send the login form")
                return None
        declared = headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:  # refused unread
            await self._deny(scope, receive, send, 413, "request body too large")
            return None
        body = await _read_body(receive, limit)
        if body is None:
            await self._deny(scope, receive, send, 413, "request body too large")
            return None
        token = headers.get(CSRF_HEADER) or await _form_token(scope, body, content_type)
        if not by_bearer and (session.new or not token or not _eq(token, session.csrf)):
            await self._deny(scope, receive, send, 403, "missing or invalid CSRF token")
            return None
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # a disconnect, when the client goes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    async def _too_many(self, scope: Scope, receive: Receive, send: Send, wait_s: float) -> None:
        await too_many_response(wait_s)(scope, receive, send)

    async def _unauthorized(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        wants_html = "text/html" in headers.get("accept", "") and scope.get("method") in (
            "GET",
            "HEAD",
        )
        if wants_html and self.login_page is not None:
            response = await self.login_page(Request(scope, receive))
            response.status_code = 401
        else:
            # No Basic challenge for pages: the browser's dialog would hide the login form.
            challenge = 'Basic realm="ses-tasks dashboard"' if self.auth.basic else "Bearer"
            response = PlainTextResponse(
                "authentication required", status_code=401, headers={"WWW-Authenticate": challenge}
            )
        await response(scope, receive, send)

    async def _deny(
        self, scope: Scope, receive: Receive, send: Send, status: int, text: str
    ) -> None:
        await PlainTextResponse(text, status_code=status)(scope, receive, send)

    def _sender(self, send: Send, session: Session | None, started: float, scope: Scope) -> Send:
        secure = scope.get("scheme") == "https"
        cookie_path = scope.get("root_path", "") or "/"

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={elapsed_ms:.1f}".encode()))
                cookie_set = any(
                    k.lower() == b"set-cookie" and v.startswith(SESSION_COOKIE.encode())
                    for k, v in headers
                )
                if session is not None and session.new and not cookie_set:
                    value = self.signer.cookie(session, secure=secure, path=cookie_path)
                    headers.append((b"set-cookie", value.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        return wrapped
