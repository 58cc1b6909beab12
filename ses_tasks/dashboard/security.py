"""Who may use the dashboard, and what every response carries.

Rules (docs in ``create_app``):

- Without credentials configured (``SES_TASKS_DASHBOARD_TOKEN``, or ``..._USER`` and
  ``..._PASSWORD``, each also from ``*_FILE``) nobody logs in, and the dashboard answers
  only requests addressed to a loopback name (``Host: 127.0.0.1``, ``localhost``, ``[::1]``):
  a page on another site that rebinds its DNS name to 127.0.0.1 gets 403, not our pages.
  ``check_bind`` refuses to serve on any other address without credentials.
- With credentials, every request needs them, on every address: ``Authorization: Bearer``,
  HTTP basic, or the session cookie the login form sets. ``/static`` and ``/login`` are open.
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
import hashlib
import hmac
import ipaddress
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ses_tasks.errors import ConfigurationError

if TYPE_CHECKING:
    from ses_tasks.config import Settings

__all__ = [
    "CSP",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "DashboardAuth",
    "SecurityMiddleware",
    "Session",
    "Signer",
    "check_bind",
    "csrf_token",
    "is_loopback",
    "route_path",
    "session_of",
]

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
#: Largest body a state-changing request may have (it is read whole to find its token).
MAX_FORM_BYTES = 5 * 1024 * 1024
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
    """Refuse to serve beyond this machine without credentials (ConfigurationError)."""
    if not auth.configured and not is_loopback(host):
        raise ConfigurationError(
            "SES_TASKS_DASHBOARD_TOKEN",
            f"the dashboard binds to {host}, beyond this machine, and no credentials are "
            f"configured: set {_CREDENTIAL_SETTINGS}, or bind to 127.0.0.1",
        )


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
    ctype = content_type.split(";", 1)[0].strip().lower()
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


class SecurityMiddleware:
    """Authentication, CSRF, host check, read-only and headers, for every request."""

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
    ) -> None:
        self.app = app
        self.auth = auth
        self.signer = signer
        self.read_only = read_only
        self.login_page = login_page
        self.open_prefixes = tuple(open_prefixes)
        self.exempt_prefixes = tuple(exempt_prefixes)
        self.max_form_bytes = max_form_bytes

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
        session = self.signer.load(_cookie(headers, SESSION_COOKIE))
        if session is None:
            session = self.signer.new_session()
        scope[SCOPE_KEY] = session
        authenticated = (
            not self.auth.configured
            or session.authenticated
            or self.auth.check_header(headers.get("authorization"))
        )
        wrapped = self._sender(send, session, started, scope)
        by_bearer = self.auth.configured and self._bearer(headers.get("authorization"))
        if not authenticated and not self._under(path, self.open_prefixes):
            await self._unauthorized(scope, receive, wrapped, headers)
            return
        if scope.get("method", "GET") not in SAFE_METHODS:
            replay = await self._check_post(
                scope, receive, wrapped, headers, path, session, by_bearer=by_bearer
            )
            if replay is None:
                return
            receive = replay
        await self.app(scope, receive, wrapped)

    async def _check_post(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        path: str,
        session: Session,
        *,
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
        body = await _read_body(receive, self.max_form_bytes)
        if body is None:
            await self._deny(scope, receive, send, 413, "request body too large")
            return None
        token = headers.get(CSRF_HEADER) or await _form_token(
            scope, body, headers.get("content-type", "")
        )
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

    def _bearer(self, value: str | None) -> bool:
        scheme, _, _ = (value or "").strip().partition(" ")
        return scheme.lower() == "bearer" and self.auth.check_header(value)

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
