"""The nodemailer pool baseline: ``bench/nodemailer_pool.js`` run by Node.js.

nodemailer is installed at bench time with npm into a cache folder under /tmp
(``/tmp/ses-tasks-bench-nodemailer6``, reused across runs; never a Python dependency)
and found through ``NODE_PATH``. Without ``node``, or without ``npm`` and no cached
install, or when the install fails, the case is skipped: ``NodemailerUnavailable`` says why.

Two baselines: ``nodemailer`` as shipped (Nagle's algorithm on: about 40 ms of delayed-ACK
stall per message, see ``nodemailer_pool.js``) and ``nodemailer-nodelay`` (TCP_NODELAY set on
its sockets, as asyncio does for ours and the loops).

Layout: 2 node processes x N/2 pooled connections, as ours (2 worker processes x
``POOL_SIZE`` = N/2) and the loops; see the script's docstring for why. Each process warms
its pool, prints ``ready``, waits for ``go`` on stdin, sends its share with at least 2 x its
connections ``sendMail`` calls outstanding, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .baselines import SANDBOX_USER, floor_template
from .common import HTML, SANDBOX_PASSWORD, SENDER, SUBJECT, TEXT, LeanSandbox, note

SCRIPT = Path(__file__).resolve().parent / "nodemailer_pool.js"
NODEMAILER_SPEC = "nodemailer@6"
CACHE_DIR = Path(tempfile.gettempdir()) / "ses-tasks-bench-nodemailer6"
INSTALL_TIMEOUT_S = 300


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


def run_nodemailer(
    sandbox: LeanSandbox,
    *,
    connections: int,
    processes: int,
    count: int,
    workdir: Path,
    nodelay: bool = False,
) -> dict[str, Any]:
    """``processes`` node processes with ``connections / processes`` pooled connections
    each, ``count`` timed messages in all; the same result keys as ``run_loop``.
    ``nodelay``: TCP_NODELAY on every socket (nodemailer leaves Nagle on; see the script)."""
    node, node_modules = ensure_nodemailer()
    per_conn = max(1, connections // processes)
    per_count = count // processes
    env = dict(os.environ, NODE_PATH=str(node_modules))
    procs: list[subprocess.Popen[str]] = []
    try:
        for index in range(processes):
            config = {
                "host": "127.0.0.1",
                "servername": "localhost",
                "port": sandbox.starttls_port,
                "ca_file": sandbox.ca_file,
                "user": SANDBOX_USER,
                "password": SANDBOX_PASSWORD,
                "from": SENDER,
                "subject": SUBJECT,
                "text": TEXT,
                "html": HTML,
                "connections": per_conn,
                "first": index * per_count,
                "count": per_count,
                "in_flight": 2 * per_conn,
                "nodelay": nodelay,
            }
            path = workdir / f"nodemailer-{uuid.uuid4().hex[:8]}.json"
            path.write_text(json.dumps(config), encoding="utf-8")
            procs.append(
                subprocess.Popen(
                    [node, str(SCRIPT), str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        for proc in procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "ready":
                rest = proc.stdout.read() if proc.stdout else ""
                raise RuntimeError(f"nodemailer process did not start: {(line + rest)[-2000:]}")
        sandbox_cpu0 = sandbox.cpu_s()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            result = json.loads(out.strip().splitlines()[-1])
            if "error" in result:
                raise RuntimeError(f"nodemailer process failed: {result['error']}")
            results.append(result)
        sandbox_cpu = sandbox.cpu_s() - sandbox_cpu0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
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
