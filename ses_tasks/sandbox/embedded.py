"""Run the whole system on one machine: Redis, the sandbox endpoint and worker processes.

Used by ``ses-tasks demo``, the end-to-end tests and the benchmarks, so all three exercise
the production code paths: real processes, a real Redis protocol server, real TLS. When no
``redis-server`` is installed, fakeredis's TCP server stands in for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

__all__ = [
    "EmbeddedRedis",
    "SandboxProcess",
    "WorkerProcess",
    "free_port",
    "wait_for",
]

SANDBOX_USERNAME = "AKIASANDBOXEXAMPLE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], *, timeout_s: float, interval_s: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what or condition}")
        time.sleep(interval_s)


class EmbeddedRedis:
    """A private Redis for the demo: ``redis-server`` if installed, else fakeredis over TCP."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.kind = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmbeddedRedis:
        binary = shutil.which("redis-server")
        if binary:
            self.kind = "redis-server"
            self._process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            from fakeredis import TcpFakeServer

            self.kind = "fakeredis"
            self._server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            self._thread.start()
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, timeout_s=15, what="the embedded Redis to answer")
        client.close()
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class SandboxProcess:
    """The SES-compatible endpoint in its own process (``python -m ses_tasks.sandbox``)."""

    workdir: Path
    password: str = "sandbox-password"
    args: list[str] = field(default_factory=list)
    starttls_port: int = 0
    tls_port: int = 0
    ca_file: str = ""
    store_path: Path | None = None
    events_path: Path | None = None
    #: Where the sandbox's own log lines go (None: inherit stderr).
    log_path: Path | None = None
    #: Keep a JSONL store of accepted messages and an event log (off for benchmarks).
    record: bool = True
    _process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, *, timeout_s: float = 30) -> SandboxProcess:
        ready = self.workdir / f"sandbox-ready-{os.getpid()}-{time.monotonic_ns()}.json"
        recording: list[str] = []
        if self.record:
            self.store_path = self.store_path or self.workdir / "sandbox-messages.jsonl"
            self.events_path = self.events_path or self.workdir / "sandbox-events.jsonl"
            recording = ["--store", str(self.store_path), "--events", str(self.events_path)]
        env = dict(os.environ, SES_TASKS_SANDBOX_PASSWORD=self.password)
        cmd = [
            sys.executable,
            "-m",
            "ses_tasks.sandbox",
            "--host",
            "127.0.0.1",
            "--starttls-port",
            str(self.starttls_port),
            "--tls-port",
            str(self.tls_port),
            "--username",
            SANDBOX_USERNAME,
            "--cert-dir",
            str(self.workdir / "certs"),
            *recording,
            "--ready-file",
            str(ready),
            *self.args,
        ]
        log = self.log_path.open("ab") if self.log_path is not None else None
        try:
            self._process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        finally:
            if log is not None:
                log.close()

        def is_ready() -> dict[str, Any] | None:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"sandbox exited with {self._process.returncode}")
            try:
                return json.loads(ready.read_text()) if ready.exists() else None
            except json.JSONDecodeError:
                return None

        info = wait_for(is_ready, timeout_s=timeout_s, what="the sandbox to listen")
        self.starttls_port = int(info["starttls_port"])
        self.tls_port = int(info["tls_port"])
        self.ca_file = str(info["ca_file"])
        return self

    def settings_env(self, mode: str = "tls") -> dict[str, str]:
        """Environment that points ses-tasks at this sandbox."""
        port = self.tls_port if mode == "tls" else self.starttls_port
        return {
            "SES_TASKS_HOST": "localhost",
            "SES_TASKS_PORT": str(port),
            "SES_TASKS_MODE": mode,
            "SES_TASKS_CA_FILE": self.ca_file,
            "SES_TASKS_USERNAME": SANDBOX_USERNAME,
            "SES_TASKS_PASSWORD": self.password,
        }

    def accepted(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.store_path)

    def events(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.events_path)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def _read_jsonl(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    out = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
    return out


@dataclass
class WorkerProcess:
    """``ses-tasks worker`` in a subprocess with the given environment.

    The process tree: ``pid`` is ``ses-tasks worker``, the supervisor; its child,
    ``main_pid()``, is Celery's main process (it holds the broker connection and the
    unacknowledged tasks, and is restarted by the supervisor if it dies); that one's
    children, ``child_pids()``, are the prefork pool's processes. Killing the supervisor
    kills the whole tree (Linux).
    """

    env: Mapping[str, str]
    mode: str = "tls"
    concurrency: int = 2
    queues: str = "all"
    name: str = ""
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None
    _log: Any = None

    def start(self) -> WorkerProcess:
        name = self.name or f"w{time.monotonic_ns()}"
        cmd = [
            sys.executable,
            "-m",
            "ses_tasks.ops.cli",
            "worker",
            "--mode",
            self.mode,
            "--concurrency",
            str(self.concurrency),
            "--queues",
            self.queues,
            "--name",
            f"{name}@%h",
            *self.extra_args,
        ]
        self._log = self.log_path.open("ab") if self.log_path is not None else subprocess.DEVNULL
        self._process = subprocess.Popen(
            cmd,
            env={**os.environ, **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def main_pid(self) -> int | None:
        """Celery's main process (the supervisor's child), if it is running."""
        children = _children(self.pid)
        return children[0] if children else None

    def child_pids(self) -> list[int]:
        """The prefork pool's processes (Linux: read from /proc)."""
        main = self.main_pid()
        return _children(main) if main is not None else []

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, *, timeout_s: float = 30) -> int | None:
        """Warm shutdown (SIGTERM): current tasks finish, connections QUIT."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self._process.returncode


def _children(pid: int) -> list[int]:
    """Child processes of ``pid``, from every thread's ``children`` file (Linux)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


@contextlib.contextmanager
def temporary_workdir(prefix: str = "ses-tasks-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
