"""A dependency-free ASGI app for SNS HTTP(S) subscriptions.

Mount it under any ASGI server (uvicorn, hypercorn, daphne) or run it with
``ses-tasks feedback serve``. ``POST`` anywhere delivers an SNS message; ``GET /health``
answers ``ok``. The synchronous handler runs in a worker thread, so the event loop is never
blocked by Redis or a certificate fetch. The app refuses to be created without a topic
allow-list (``SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS``): anyone's SNS topic could post.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ses_tasks.feedback.handler import FeedbackHandler, HttpResponse
from ses_tasks.feedback.settings import FeedbackSettings, load_feedback_settings
from ses_tasks.ops import metrics

__all__ = ["ASGIApp", "FeedbackApp", "create_app"]

log = logging.getLogger("ses_tasks.feedback")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class FeedbackApp:
    """``handler`` may be given, or built on first use by ``factory`` or from
    ``feedback_settings`` (the environment by default).

    Raises ``ConfigurationError`` at once when the handler or the settings have no topic
    allow-list (nor the development flag); a ``factory``'s handler is checked when built.
    """

    def __init__(
        self,
        handler: FeedbackHandler | None = None,
        *,
        factory: Callable[[], FeedbackHandler] | None = None,
        feedback_settings: FeedbackSettings | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._check_factory = False
        if handler is not None:
            handler.require_topic_policy()
        elif factory is not None:
            self._check_factory = True
        else:
            fb = feedback_settings or load_feedback_settings()
            fb.require_topic_policy()
            factory = functools.partial(FeedbackHandler.from_settings, feedback_settings=fb)
        self._handler = handler
        self._factory = factory
        self.max_body_bytes = max_body_bytes

    @property
    def handler(self) -> FeedbackHandler:
        if self._handler is None:
            assert self._factory is not None
            handler = self._factory()
            if self._check_factory:
                handler.require_topic_policy()
            self._handler = handler
        return self._handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        if method == "GET" and scope.get("path") == "/health":
            await _respond(send, HttpResponse(200, "ok"))
            return
        if method != "POST":
            await _respond(send, HttpResponse(405, "POST an SNS message"), allow="POST")
            return
        body = await self._read_body(receive)
        if body is None:
            metrics.feedback_refused("body_too_large")
            log.warning("feedback refused: request body over %d bytes", self.max_body_bytes)
            await _respond(send, HttpResponse(413, "body too large"))
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        try:
            response = await asyncio.to_thread(self.handler.handle_http, body, headers)
        except Exception:
            log.exception("feedback handler failed; SNS will retry")
            response = HttpResponse(500, "internal error")
        await _respond(send, response)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await asyncio.to_thread(lambda: self.handler)
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, response: HttpResponse, **extra_headers: str) -> None:
    body = response.json_bytes()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in extra_headers.items()),
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(
    handler: FeedbackHandler | None = None, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FeedbackApp:
    """The ASGI app; without ``handler`` it is built from the environment on first use (the
    topic allow-list is checked now, so a misconfigured app fails at import, not per request).
    """
    return FeedbackApp(handler, max_body_bytes=max_body_bytes)
