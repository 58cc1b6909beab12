"""The sandbox: both SES port modes on one event loop, or on a thread for sync code."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ses_tasks.errors import ConfigurationError
from ses_tasks.sandbox.certs import SandboxCertificates, ensure_certificates, server_tls_context
from ses_tasks.sandbox.config import SandboxConfig, SandboxStats, SessionRecord
from ses_tasks.sandbox.faults import Faults
from ses_tasks.sandbox.protocol import Hooks, Runtime, SesSMTP
from ses_tasks.sandbox.store import AcceptedMessage, JsonlWriter
from ses_tasks.smtp.endpoint import Endpoint, PortMode

__all__ = ["Sandbox", "SandboxThread"]

DEFAULT_WAIT_S = 5.0
_POLL_S = 0.005


class Sandbox:
    """A local SES-compatible SMTP endpoint. ``async with Sandbox(config) as sb: ...``.

    Listens on the running loop. Everything it saw is readable while it runs:
    ``messages``, ``stats``, ``sessions``; ``faults`` and ``latency_ms`` may be changed
    at any time and apply to the next reply.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        #: A copy, so changing it at runtime leaves the config reusable.
        self.faults: Faults = dataclasses.replace(self.config.faults)
        self._runtime: Runtime | None = None
        self._servers: dict[PortMode, asyncio.Server] = {}
        self._ports: dict[PortMode, int] = {}
        self._certs: SandboxCertificates | None = None
        self._temp_dir: str | None = None
        self._flusher: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runtime is not None:
            raise RuntimeError("sandbox already started")
        cfg = self.config
        cert_dir = cfg.cert_dir
        if cert_dir is None:
            self._temp_dir = cert_dir = tempfile.mkdtemp(prefix="ses-sandbox-")
        self._certs = certs = ensure_certificates(cert_dir)
        tls = server_tls_context(
            certs, min_version=cfg.tls_min_version, max_version=cfg.tls_max_version
        )
        store = JsonlWriter(cfg.store_path, batch_lines=1) if cfg.store_path is not None else None
        events = JsonlWriter(cfg.events_path) if cfg.events_path is not None else None
        runtime = Runtime(cfg, self.faults, store=store, events=events)
        self._runtime = runtime
        hooks = Hooks(runtime)
        loop = asyncio.get_running_loop()

        def factory(mode: PortMode) -> Callable[[], SesSMTP]:
            return lambda: SesSMTP(runtime, hooks, mode=mode, tls_context=tls, loop=loop)

        wanted = [(PortMode.STARTTLS, cfg.starttls_port, None), (PortMode.TLS, cfg.tls_port, tls)]
        try:
            for mode, port, wrap in wanted:
                if port is None:
                    continue
                server = await loop.create_server(factory(mode), cfg.host, port, ssl=wrap)
                self._servers[mode] = server
                self._ports[mode] = server.sockets[0].getsockname()[1]
        except OSError as exc:
            await self.stop()
            raise ConfigurationError("port", f"cannot listen on {cfg.host}: {exc}") from exc
        self._flusher = loop.create_task(self._flush_periodically())

    async def stop(self) -> None:
        """Stop listening, cut open sessions, flush the store. Safe to call twice."""
        for server in self._servers.values():
            server.close()
        runtime = self._runtime
        if runtime is not None:
            for session in list(runtime.active):
                session.abort()
        for server in self._servers.values():
            await server.wait_closed()
        self._servers.clear()
        if runtime is not None:
            with contextlib.suppress(TimeoutError):
                await self.wait_until(lambda: not runtime.active, timeout_s=2.0)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if runtime is not None:
            for writer in (runtime.store, runtime.events):
                if writer is not None:
                    writer.close()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval_s)
            self.flush()

    def flush(self) -> None:
        """Write buffered store and event lines now."""
        runtime = self._runtime
        if runtime is not None:
            for writer in (runtime.store, runtime.events):
                if writer is not None:
                    writer.flush()

    async def wait_until(
        self, predicate: Callable[[], object], *, timeout_s: float = DEFAULT_WAIT_S
    ) -> None:
        """Poll ``predicate`` (e.g. ``lambda: sb.stats.connections_closed == 2``)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout_s} s")
            await asyncio.sleep(_POLL_S)

    # -- what callers read --------------------------------------------------------------

    def _started(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("sandbox not started")
        return self._runtime

    @property
    def starttls_port(self) -> int | None:
        return self._ports.get(PortMode.STARTTLS)

    @property
    def tls_port(self) -> int | None:
        return self._ports.get(PortMode.TLS)

    def port(self, mode: PortMode | str) -> int:
        port = self._ports.get(PortMode(mode))
        if port is None:
            raise ConfigurationError("mode", f"this sandbox does not serve {PortMode(mode)}")
        return port

    def endpoint(self, mode: PortMode | str) -> Endpoint:
        """Where a client connects for ``mode``; trust :attr:`ca_file` on top of the system."""
        host = self.config.host
        return Endpoint(host=host, port=self.port(mode), mode=PortMode(mode), tls_server_name=host)

    @property
    def ca_file(self) -> str:
        if self._certs is None:
            raise RuntimeError("sandbox not started")
        return self._certs.ca_file

    @property
    def cert_dir(self) -> Path:
        return Path(self.ca_file).parent

    @property
    def messages(self) -> list[AcceptedMessage]:
        return self._started().messages

    @property
    def stats(self) -> SandboxStats:
        return self._started().stats

    @property
    def sessions(self) -> list[SessionRecord]:
        return self._started().sessions

    @property
    def latency_ms(self) -> float:
        return self._runtime.latency_s * 1000.0 if self._runtime else self.config.latency_ms

    @latency_ms.setter
    def latency_ms(self, value: float) -> None:
        if value < 0:
            raise ConfigurationError("latency_ms", "must be >= 0")
        self._started().latency_s = value / 1000.0

    def __repr__(self) -> str:
        if self._runtime is None:
            return "<Sandbox not started>"
        stats = self._runtime.stats
        return (
            f"<Sandbox starttls={self.starttls_port} tls={self.tls_port} "
            f"open={stats.concurrent_connections} accepted={stats.messages_accepted}>"
        )


class SandboxThread:
    """The same sandbox on its own event loop in a daemon thread, for synchronous code."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.sandbox = Sandbox(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, *, timeout_s: float = 10.0) -> SandboxThread:
        """Return once both listeners accept connections (or raise why they could not)."""
        if self._thread is not None:
            raise RuntimeError("sandbox thread already started")
        self._thread = threading.Thread(target=self._run, name="ses-sandbox", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"sandbox did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self.sandbox.start())
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self.sandbox.stop())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def stop(self, *, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_until(
        self, predicate: Callable[[], object], *, timeout_s: float = DEFAULT_WAIT_S
    ) -> None:
        """Poll ``predicate`` from the calling thread until true; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout_s} s")
            time.sleep(_POLL_S)

    def flush(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            done = threading.Event()

            def run() -> None:
                self.sandbox.flush()
                done.set()

            loop.call_soon_threadsafe(run)
            done.wait(5.0)
        else:
            self.sandbox.flush()

    @property
    def config(self) -> SandboxConfig:
        return self.sandbox.config

    @property
    def faults(self) -> Faults:
        return self.sandbox.faults

    @property
    def starttls_port(self) -> int | None:
        return self.sandbox.starttls_port

    @property
    def tls_port(self) -> int | None:
        return self.sandbox.tls_port

    def port(self, mode: PortMode | str) -> int:
        return self.sandbox.port(mode)

    def endpoint(self, mode: PortMode | str) -> Endpoint:
        return self.sandbox.endpoint(mode)

    @property
    def ca_file(self) -> str:
        return self.sandbox.ca_file

    @property
    def messages(self) -> list[AcceptedMessage]:
        return self.sandbox.messages

    @property
    def stats(self) -> SandboxStats:
        return self.sandbox.stats

    @property
    def sessions(self) -> list[SessionRecord]:
        return self.sandbox.sessions

    @property
    def latency_ms(self) -> float:
        return self.sandbox.latency_ms

    @latency_ms.setter
    def latency_ms(self, value: float) -> None:
        self.sandbox.latency_ms = value

    def __repr__(self) -> str:
        return f"<SandboxThread {self.sandbox!r}>"
