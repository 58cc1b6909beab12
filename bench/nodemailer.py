"""The nodemailer pool baseline: ``bench/nodemailer_pool.js`` run by Node.js.

nodemailer is installed at bench time with npm into a cache folder under /tmp
(``/tmp/ses-tasks-bench-nodemailer6``, reused across runs; never a Python dependency)
and found through ``NODE_PATH``. Without ``node``, or without ``npm`` and no cached
install, or when the install fails, the case is skipped: ``NodemailerUnavailable`` says why.

Two baselines: ``nodemailer`` as shipped (Nagle's algorithm on: about 40 ms of delayed-ACK
stall per message, see ``nodemailer_pool.js``) and ``nodemailer-nodelay`` (TCP_NODELAY set on
its sockets, as asyncio does for ours and the loops).

Layout: 2 node processes x N/2 pooled connections, as ours (2 worker processes x
``POOL_SIZE`` = N/2) and the loops; see the script's docstring for why. The processes are
started and warmed once per case and reused for each run, like ours' workers; for a run,
each gets ``go <first> <count>`` on stdin, sends its share with 2 x its connections
``sendMail`` calls outstanding, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

from .baselines import SANDBOX_USER, floor_template
from .common import HTML, SANDBOX_PASSWORD, SENDER, SUBJECT, TEXT, LeanSandbox, note

SCRIPT = Path(__file__).resolve().parent / "nodemailer_pool.js"
NODEMAILER_SPEC = "nodemailer@6"
CACHE_DIR = Path(tempfile.gettempdir()) / "ses-tasks-bench-nodemailer6"
INSTALL_TIMEOUT_S = 300
#: Each node process warms V8 with this many messages over a throwaway pool of this many
#: connections before its first run (see ``Nodemailer``).
WARM_MESSAGES = 1000
WARM_CONNECTIONS = 50


class NodemailerUnavailable(Exception):
    """Why the nodemailer case cannot run here."""


def _installed(prefix: Path) -> bool:
    return (prefix / "node_modules" / "nodemailer" / "package.json").is_file()


def ensure_nodemailer(cache_dir: Path = CACHE_DIR) -> tuple[str, Path]:
    """(path of ``node``, the ``node_modules`` folder holding nodemailer)."""
    node = shutil.which("node")
    if node is None:
        raise NodemailerUnavailable("node not found on PATH")
    if _installed(cache_dir):
        return node, cache_dir / "node_modules"
    npm = shutil.which("npm")
    if npm is None:
        raise NodemailerUnavailable(f"npm not found on PATH and no install in {cache_dir}")
    # Install next to the cache folder, then rename: a failed or concurrent install never
    # leaves a half-filled cache behind.
    staging = Path(tempfile.mkdtemp(prefix=cache_dir.name + "-", dir=cache_dir.parent))
    note(f"installing {NODEMAILER_SPEC} into {cache_dir} (npm)")
    try:
        proc = subprocess.run(
            [npm, "install", "--prefix", str(staging), NODEMAILER_SPEC, "--no-audit",
             "--no-fund", "--no-save", "--loglevel", "error"],
            capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        shutil.rmtree(staging, ignore_errors=True)
        raise NodemailerUnavailable(
            f"npm install {NODEMAILER_SPEC} timed out after {INSTALL_TIMEOUT_S} s"
        ) from None
    if proc.returncode != 0 or not _installed(staging):
        shutil.rmtree(staging, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip()[-500:]
        raise NodemailerUnavailable(f"npm install {NODEMAILER_SPEC} failed: {tail}")
    try:
        staging.rename(cache_dir)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
        if not _installed(cache_dir):
            raise
    return node, cache_dir / "node_modules"


def floor_message_bytes() -> int:
    """Size of one I/O floor message (user0), to compare with what nodemailer builds."""
    from .baselines import PLACEHOLDER

    return len(floor_template().replace(PLACEHOLDER, b"user0@example.com"))


class Nodemailer:
    """``processes`` node processes with ``connections / processes`` pooled connections
    each, started once per case and reused for every run (as ours' workers are).

    Warm-up, before the first run: each process sends ``WARM_MESSAGES`` through a throwaway
    pool of ``WARM_CONNECTIONS`` connections (V8 compiles nodemailer's paths; a few seconds),
    then 2 x its connections messages through the measured pool, which opens every
    connection. Without it the first runs measure V8's interpreter and baseline tiers:
    about 2 ms of CPU per message at 20 ms latency and 10 connections against 1.2 to 1.5 ms
    warm. V8 keeps optimising beyond that (0.9 to 1.2 ms after ~6,000 messages in one
    trial), so at small runs this CPU leans, if anything, against nodemailer.
    """

    def __init__(
        self,
        sandbox: LeanSandbox,
        *,
        connections: int,
        processes: int,
        workdir: Path,
        nodelay: bool = False,
    ) -> None:
        self.sandbox = sandbox
        self.per_conn = max(1, connections // processes)
        self.processes = processes
        self.workdir = workdir
        self.nodelay = nodelay
        self.procs: list[subprocess.Popen[str]] = []

    def start(self) -> Nodemailer:
        node, node_modules = ensure_nodemailer()
        env = dict(os.environ, NODE_PATH=str(node_modules))
        try:
            for index in range(self.processes):
                config = {
                    "host": "127.0.0.1",
                    "servername": "localhost",
                    "port": self.sandbox.starttls_port,
                    "ca_file": self.sandbox.ca_file,
                    "user": SANDBOX_USER,
                    "password": SANDBOX_PASSWORD,
                    "from": SENDER,
                    "subject": SUBJECT,
                    "text": TEXT,
                    "html": HTML,
                    "connections": self.per_conn,
                    "first": 1_000_000 * (index + 1),
                    "in_flight": 2 * self.per_conn,
                    "nodelay": self.nodelay,
                    "warm_messages": WARM_MESSAGES,
                    "warm_connections": WARM_CONNECTIONS,
                }
                path = self.workdir / f"nodemailer-{uuid.uuid4().hex[:8]}.json"
                path.write_text(json.dumps(config), encoding="utf-8")
                self.procs.append(
                    subprocess.Popen(
                        [node, str(SCRIPT), str(path)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        env=env,
                    )
                )
            for proc in self.procs:
                line = proc.stdout.readline() if proc.stdout else ""
                if line.strip() != "ready":
                    rest = proc.stdout.read() if proc.stdout else ""
                    raise RuntimeError(f"nodemailer did not start: {(line + rest)[-2000:]}")
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, count: int) -> dict[str, Any]:
        """``count`` timed messages in all; the same result keys as ``run_loop``."""
        per_count = count // self.processes
        sandbox_cpu0 = self.sandbox.cpu_s()
        for index, proc in enumerate(self.procs):
            assert proc.stdin is not None
            proc.stdin.write(f"go {index * per_count} {per_count}\n")
            proc.stdin.flush()
        results = []
        for proc in self.procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                raise RuntimeError(f"nodemailer process exited with {proc.wait()}")
            result = json.loads(line)
            if "error" in result:
                raise RuntimeError(f"nodemailer process failed: {result['error']}")
            results.append(result)
        sandbox_cpu = self.sandbox.cpu_s() - sandbox_cpu0
        sent = sum(int(r["messages"]) for r in results)
        errors = sum(int(r["errors"]) for r in results)
        if errors:
            first = next(r["first_error"] for r in results if r["errors"])
            note(f"warning: nodemailer: {errors} sends failed, first: {first}")
        elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
        cpu_s = sum(float(r["cpu_s"]) for r in results)
        return {
            "sent": sent,
            "elapsed_s": elapsed,
            "msgs_per_s": sent / elapsed,
            "cpu_s_per_1000": 1000 * cpu_s / max(1, sent),
            "sandbox_cpu_s_per_1000": 1000 * sandbox_cpu / max(1, sent),
            "errors": errors,
            "message_bytes": results[0].get("message_bytes"),
            "connections_open": sum(int(r.get("connections_open") or 0) for r in results),
            "nodemailer_version": results[0].get("nodemailer_version"),
        }

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin is not None:
                with suppress(OSError):
                    proc.stdin.close()  # EOF: the script closes its pool (QUIT) and exits
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []
