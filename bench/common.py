"""Shared pieces of the benchmarks: Redis check, a lean sandbox, CPU accounting, output.

Every benchmark prints one JSON line per result on stdout (``emit``); progress goes to
stderr. Keys live under a fresh prefix per run and are deleted at the end.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ses_tasks.sandbox.embedded import SandboxProcess, WorkerProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = os.environ.get("SES_TASKS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SANDBOX_PASSWORD = "bench-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TEXT = (
    "Hello {{ name }},\n\nThis month's news, written for {{ email }}.\n\n"
    + "A line of ordinary newsletter text to give the body a realistic size.\n" * 20
    + "\nUnsubscribe any time.\n"
)
HTML = (
    "<html><body><p>Hello {{ name }},</p>\n"
    + "<p>A line of ordinary newsletter text to give the body a realistic size.</p>\n" * 20
    + "</body></html>\n"
)
SUBJECT = "News for {{ name }}"
SENDER = "News <news@example.com>"


def emit(bench: str, **fields: Any) -> None:
    print(json.dumps({"bench": bench, **fields}, sort_keys=False), flush=True)


def note(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")


def machine() -> dict[str, Any]:
    model = ""
    with suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def check_redis(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"bench: Redis at {url} does not answer ({exc}); start redis-server"
        raise SystemExit(message) from None
    return client


def new_prefix(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:10]}"


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=5000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch = []
    if batch:
        deleted += client.unlink(*batch)
    return deleted


# --------------------------------------------------------------------------- CPU accounting


def _proc_times(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, in seconds (0 if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw.rpartition(")")[2].split()
    # fields[0] is state (field 3); utime is field 14 -> index 11.
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError):
                text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                out += [int(p) for p in text.split()]
    return out


def tree_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds of every process in the trees rooted at ``pids`` (live ones, plus what
    exited children left in cutime/cstime)."""
    total = 0.0
    stack = list(pids)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _proc_times(pid)
        stack += _children(pid)
    return total


class RedisCpu:
    """CPU seconds of the Redis server the benchmark talks to.

    The pid comes from ``INFO server`` (``process_id``). Two readings of the same counter:
    ``INFO cpu`` (``used_cpu_user + used_cpu_sys``: getrusage(RUSAGE_SELF) of the server, to
    the microsecond) and utime + stime from ``/proc/<pid>/stat`` (clock ticks, 10 ms: too
    coarse for a run of a few seconds, kept as a cross-check). ``/proc`` is read only if that
    pid is a ``redis-server`` process here (Redis elsewhere, or in another pid namespace,
    gives None). Redis serves every client, so a reading includes any other client's load
    in the interval; ``Ours``' ``redis_idle_cpu_ms_per_s`` helps to notice it.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pid: int | None = None
        with suppress(redis.RedisError, KeyError, ValueError, TypeError):
            self.pid = int(client.info("server")["process_id"])
        self.proc_ok = self.pid is not None and self._proc_stat() is not None

    def _proc_stat(self) -> float | None:
        try:
            raw = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        name = raw[raw.find("(") + 1 : raw.rfind(")")]
        if not name.startswith("redis"):
            return None
        fields = raw.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def sample(self) -> tuple[float | None, float | None]:
        """(INFO cpu seconds, /proc utime + stime seconds); None where unavailable."""
        info: float | None = None
        with suppress(redis.RedisError, KeyError, ValueError, TypeError):
            cpu = self.client.info("cpu")
            info = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        proc = self._proc_stat() if self.proc_ok else None
        return info, proc


def cpu_delta(
    before: tuple[float | None, float | None], after: tuple[float | None, float | None]
) -> tuple[float | None, float | None]:
    def sub(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    return sub(after[0], before[0]), sub(after[1], before[1])


# --------------------------------------------------------------------------- sandbox


class LeanSandbox(SandboxProcess):
    """The sandbox in its own process, in its fast mode: no message bytes kept, no JSONL
    store or event log, only the per-reply latency asked for."""

    def __init__(self, workdir: Path, latency_ms: float = 0.0) -> None:
        super().__init__(
            workdir,
            password=SANDBOX_PASSWORD,
            args=["--no-keep-data", "--latency-ms", str(latency_ms)],
            # Its start and stop lines, and a traceback should it die mid-case.
            log_path=workdir / f"sandbox-{uuid.uuid4().hex[:6]}.log",
            record=False,
        )
        self.latency_ms = latency_ms

    def cpu_s(self) -> float:
        return tree_cpu_s([self.pid])

    def state(self) -> str:
        code = self._process.poll() if self._process is not None else None
        return "running" if code is None else f"exited with {code}"

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
        except OSError:
            return ""


@contextmanager
def lean_sandbox(workdir: Path, latency_ms: float) -> Iterator[LeanSandbox]:
    sandbox = LeanSandbox(workdir, latency_ms)
    sandbox.start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


# --------------------------------------------------------------------------- our workers


def pipeline_env(
    sandbox: LeanSandbox,
    *,
    redis_url: str,
    prefix: str,
    pool_size: int,
    batch_size: int,
    mode: str = "starttls",
    **extra: str,
) -> dict[str, str]:
    """Our settings for a benchmark: limiter far above what the endpoint can take, every
    connection of the pool warmed at start."""
    return {
        **sandbox.settings_env(mode),
        "SES_TASKS_REDIS_URL": redis_url,
        "SES_TASKS_BROKER_URL": redis_url,
        "SES_TASKS_KEY_PREFIX": prefix,
        "SES_TASKS_MAX_SEND_RATE": "100000",
        "SES_TASKS_POOL_SIZE": str(pool_size),
        "SES_TASKS_POOL_MIN_SIZE": str(pool_size),
        "SES_TASKS_BATCH_SIZE": str(batch_size),
        **extra,
    }


@dataclass
class Workers:
    """One or more ``ses-tasks worker`` processes; CPU read from /proc for the whole tree."""

    env: dict[str, str]
    workdir: Path
    processes: int = 2
    queues: str = "all"
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(self) -> Workers:
        worker = WorkerProcess(
            env=self.env,
            mode=self.env["SES_TASKS_MODE"],
            concurrency=self.processes,
            queues=self.queues,
            log_path=self.workdir / f"worker-{uuid.uuid4().hex[:6]}.log",
            extra_args=["--loglevel", "WARNING"],
        ).start()
        self.workers.append(worker)
        return self

    def wait_ready(self, *, timeout_s: float = 60) -> None:
        wait_for(
            lambda: all(len(w.child_pids()) >= self.processes for w in self.workers),
            timeout_s=timeout_s,
            what="worker pool processes",
        )

    def cpu_s(self) -> float:
        return tree_cpu_s([w.pid for w in self.workers])

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout_s=30)

    def log_tail(self) -> str:
        out = []
        for worker in self.workers:
            if worker.log_path is not None and worker.log_path.exists():
                out.append(worker.log_path.read_text(errors="replace")[-3000:])
        return "\n".join(out)


def env_for_subprocess(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env
