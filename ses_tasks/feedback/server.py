"""A small HTTP/1.1 server for the feedback ASGI app, so ``feedback serve`` needs no extra
dependency. One request per connection, ``Content-Length`` bodies only: what SNS sends.
Put TLS and a public address in front of it (a load balancer or reverse proxy); for larger
deployments mount ``FeedbackApp`` in uvicorn or hypercorn instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from http import HTTPStatus
from typing import Any

from ses_tasks.feedback.asgi import ASGIApp, FeedbackApp

__all__ = ["ServerThread", "serve"]

log = logging.getLogger("ses_tasks.feedback")

MAX_HEADER_BYTES = 16 * 1024
READ_TIMEOUT_S = 30.0


async def _handle(
    app: ASGIApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_body: int
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        return
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        await _simple(writer, 400)
        return
    headers: list[tuple[bytes, bytes]] = []
    length = 0
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers.append((name.encode("latin-1"), value.encode("latin-1")))
        if name == "content-length":
            try:
                length = int(value)
            except ValueError:
                await _simple(writer, 400)
                return
        elif name == "transfer-encoding":
            await _simple(writer, 411)
            return
    if length > max_body:
        await _simple(writer, 413)
        return
    try:
        body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT_S)
    except (asyncio.IncompleteReadError, TimeoutError):
        return
    path, _, query = target.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method.upper(),
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": headers,
        "client": writer.get_extra_info("peername"),
        "server": writer.get_extra_info("sockname"),
        "scheme": "http",
    }
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if sent_body:
            return {"type": "http.disconnect"}
        sent_body = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
            out = [f"HTTP/1.1 {status} {reason}".encode()]
            out += [k + b": " + v for k, v in message.get("headers", [])]
            out.append(b"connection: close")
            writer.write(b"\r\n".join(out) + b"\r\n\r\n")
        elif message["type"] == "http.response.body":
            writer.write(message.get("body", b""))
            await writer.drain()

    await app(scope, receive, send)


async def _simple(writer: asyncio.StreamWriter, status: int) -> None:
    writer.write(
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
        + b"content-length: 0\r\nconnection: close\r\n\r\n"
    )
    await writer.drain()


async def serve(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 8025,
    max_body_bytes: int = 1024 * 1024,
    started: asyncio.Future[int] | None = None,
) -> None:
    """Serve ``app`` until cancelled; ``started`` gets the bound port (useful with port 0).

    A ``FeedbackApp``'s handler is built before listening, so a missing topic allow-list or
    bad Redis settings stop the server at start, not at the first SNS POST.
    """
    if isinstance(app, FeedbackApp):
        await asyncio.to_thread(lambda: app.handler)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _handle(app, reader, writer, max_body_bytes)
        except Exception:
            log.exception("feedback server: request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(on_connection, host, port, limit=MAX_HEADER_BYTES)
    bound = server.sockets[0].getsockname()[1]
    log.info("feedback receiver listening on http://%s:%d/", host, bound)
    if started is not None:
        started.set_result(bound)
    async with server:
        await server.serve_forever()


class ServerThread:
    """``serve`` on its own thread and event loop: for tests and embedding."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self, *, timeout_s: float = 10.0) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="feedback-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("feedback server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        started: asyncio.Future[int] = loop.create_future()

        def on_started(future: asyncio.Future[int]) -> None:
            if not future.cancelled() and future.exception() is None:
                self.port = future.result()
            self._ready.set()

        started.add_done_callback(on_started)
        self._task = loop.create_task(
            serve(self.app, host=self.host, port=self.port, started=started)
        )
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
