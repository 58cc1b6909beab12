"""The SNS feedback receiver as a Starlette app.

``ses-tasks feedback serve`` runs it with uvicorn; any ASGI server can, and a Starlette app can
mount it (``Mount("/sns", app=create_app())``): its routes are relative to where it is mounted.
``POST`` to any path delivers an SNS message; ``GET /health`` answers ``ok``. The synchronous
handler runs in a worker thread, so Redis or a certificate fetch never blocks the event loop.
The app refuses to be created without a topic allow-list
(``SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS``): anyone's SNS topic could post.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ses_tasks.errors import ConfigurationError
from ses_tasks.feedback.handler import FeedbackHandler, HttpResponse
from ses_tasks.feedback.settings import FeedbackSettings, load_feedback_settings
from ses_tasks.ops import metrics

__all__ = ["DEFAULT_MAX_BODY_BYTES", "FeedbackApp", "create_app"]

log = logging.getLogger("ses_tasks.feedback")

#: Largest request body read (SNS messages are at most 256 KiB plus the envelope).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class FeedbackApp(Starlette):
    """``handler`` may be given, or built on first use by ``factory`` or from
    ``feedback_settings`` (the environment by default). ``max_body_bytes`` defaults to the
    settings' ``max_body_bytes`` when they are used, else ``DEFAULT_MAX_BODY_BYTES``.

    Raises ``ConfigurationError`` at once when the handler or the settings have no topic
    allow-list (nor the development flag); a ``factory``'s handler is checked when built: at
    the server's start-up (lifespan), or on the first request where no lifespan runs (a
    mounted app). Bodies over ``max_body_bytes`` are refused with 413 as soon as the
    ``Content-Length`` or the bytes received so far exceed it.
    """

    def __init__(
        self,
        handler: FeedbackHandler | None = None,
        *,
        factory: Callable[[], FeedbackHandler] | None = None,
        feedback_settings: FeedbackSettings | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        if max_body_bytes is not None and max_body_bytes < 1:
            raise ConfigurationError("max_body_bytes", f"must be positive, not {max_body_bytes}")
        self._check_factory = False
        limit = DEFAULT_MAX_BODY_BYTES
        if handler is not None:
            handler.require_topic_policy()
        elif factory is not None:
            self._check_factory = True
        else:
            fb = feedback_settings or load_feedback_settings()
            fb.require_topic_policy()
            factory = functools.partial(FeedbackHandler.from_settings, feedback_settings=fb)
            limit = fb.max_body_bytes
        self._handler = handler
        self._factory = factory
        self._handler_lock = threading.Lock()
        self.max_body_bytes = limit if max_body_bytes is None else max_body_bytes
        super().__init__(
            routes=[
                Route("/health", _health, methods=["GET"], name="health"),
                Route("/{path:path}", self._deliver, methods=["POST"], name="deliver"),
            ],
            exception_handlers={405: _method_not_allowed},
            lifespan=_build_handler_at_startup,
        )

    @property
    def handler(self) -> FeedbackHandler:
        """The handler, built once (thread-safe: first requests may race in worker threads)."""
        if self._handler is None:
            with self._handler_lock:
                if self._handler is None:
                    assert self._factory is not None
                    handler = self._factory()
                    if self._check_factory:
                        handler.require_topic_policy()
                    self._handler = handler
        return self._handler

    async def _deliver(self, request: Request) -> Response:
        try:
            body = await self._read_body(request)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        if body is None:
            metrics.feedback_refused("body_too_large")
            log.warning("feedback refused: request body over %d bytes", self.max_body_bytes)
            return _respond(HttpResponse(413, "body too large"))
        headers = dict(request.headers.items())  # names already lower-case
        try:
            response = await run_in_threadpool(self._handle, body, headers)
        except Exception:
            log.exception("feedback handler failed; SNS will retry")
            response = HttpResponse(500, "internal error")
        return _respond(response)

    def _handle(self, body: bytes, headers: Mapping[str, str]) -> HttpResponse:
        return self.handler.handle_http(body, headers)

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None once it is known to exceed the cap: never buffer more than it."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


async def _health(request: Request) -> Response:
    return _respond(HttpResponse(200, "ok"))


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    """405 in the JSON shape of every other answer, with the router's ``Allow``."""
    allow = getattr(exc, "headers", None) or {"allow": "POST"}
    return _respond(HttpResponse(405, "POST an SNS message"), allow)


def _respond(response: HttpResponse, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        response.json_bytes(),
        status_code=response.status,
        headers=headers,
        media_type="application/json",
    )


@contextlib.asynccontextmanager
async def _build_handler_at_startup(app: Starlette) -> AsyncIterator[None]:
    """A handler that cannot be built (a factory's without an allow-list, bad Redis settings)
    stops the server at start, not at the first SNS POST."""
    assert isinstance(app, FeedbackApp)
    await run_in_threadpool(lambda: app.handler)
    yield


def create_app(
    handler: FeedbackHandler | None = None,
    *,
    feedback_settings: FeedbackSettings | None = None,
    max_body_bytes: int | None = None,
) -> FeedbackApp:
    """The Starlette app; without ``handler`` it is built from ``feedback_settings`` (the
    environment by default) on first use. The topic allow-list is checked now, so a
    misconfigured app fails at import, not per request.
    """
    return FeedbackApp(handler, feedback_settings=feedback_settings, max_body_bytes=max_body_bytes)
