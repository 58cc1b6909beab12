"""The baselines ses-tasks is measured against, run in the same benchmark run.

- ``recipe``: the common recipe (``bench/recipe.py``): a Celery task per message, a fresh
  smtplib connection each time. Real Celery workers (threads pool), same process count
  and same number of concurrent connections as ours.
- ``bare``: a bare asyncio loop over N warm aiosmtplib connections; no queue, no tracking,
  no limiter; each message built with ``email.message.EmailMessage`` and sent with
  ``send_message`` (what most code does).
- ``floor``: the same loop sending pre-rendered bytes with ``sendmail``, only the recipient
  substituted: what SMTP over TLS costs in this stack, and no less.

``python -m bench.baselines loop --kind bare|floor ...`` is one loop process; it prints
``ready`` once its connections are warm, waits for ``go`` on stdin, sends, and prints one
JSON line with its own CPU seconds for the sending phase only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import subprocess
import sys
import time
import uuid
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

from .common import (
    HTML,
    SANDBOX_PASSWORD,
    SENDER,
    TEXT,
    LeanSandbox,
    delete_prefix,
    env_for_subprocess,
    new_prefix,
    note,
    tree_cpu_s,
)

SANDBOX_USER = "AKIASANDBOXEXAMPLE"
PLACEHOLDER = b"placeholder-0000000000@example.com"


def _plain(template: str, name: str, email: str) -> str:
    return template.replace("{{ name }}", name).replace("{{ email }}", email)


def bare_message(seq: int) -> tuple[str, EmailMessage]:
    to = f"user{seq}@example.com"
    name = f"User {seq}"
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = f"News for {name}"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.com>"
    msg.set_content(_plain(TEXT, name, to))
    msg.add_alternative(_plain(HTML, name, to), subtype="html")
    return to, msg


def floor_template() -> bytes:
    _, msg = bare_message(0)
    del msg["To"]
    msg["To"] = PLACEHOLDER.decode()
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


async def _loop(kind: str, connections: int, first: int, count: int, args: Any) -> dict[str, Any]:
    import aiosmtplib

    ctx = ssl.create_default_context(cafile=args.ca_file)
    clients = [
        aiosmtplib.SMTP(
            hostname="localhost",
            port=args.port,
            start_tls=True,
            tls_context=ctx,
            username=SANDBOX_USER,
            password=SANDBOX_PASSWORD,
        )
        for _ in range(connections)
    ]
    await asyncio.gather(*(c.connect() for c in clients))
    template = floor_template() if kind == "floor" else b""
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    cursor = iter(range(first, first + count))
    sent = 0

    async def worker(smtp: aiosmtplib.SMTP) -> None:
        nonlocal sent
        for seq in cursor:
            if kind == "floor":
                to = f"user{seq}@example.com"
                data = template.replace(PLACEHOLDER, to.encode())
                await smtp.sendmail("news@example.com", [to], data)
            else:
                _, msg = bare_message(seq)
                await smtp.send_message(msg)
            sent += 1

    await asyncio.gather(*(worker(c) for c in clients))
    ended = time.time()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)
    return {"sent": sent, "started": started, "ended": ended, "cpu_s": cpu_s}


def run_loop(
    kind: str, sandbox: LeanSandbox, *, connections: int, processes: int, count: int
) -> dict[str, Any]:
    """``processes`` loop processes with ``connections / processes`` connections each."""
    per_conn = max(1, connections // processes)
    per_count = count // processes
    procs = []
    for index in range(processes):
        cmd = [
            sys.executable, "-m", "bench.baselines", "loop", "--kind", kind,
            "--connections", str(per_conn), "--first", str(index * per_count),
            "--count", str(per_count), "--port", str(sandbox.starttls_port),
            "--ca-file", sandbox.ca_file,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env_for_subprocess(),
            )
        )
    for proc in procs:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"{kind} loop did not start: {line!r}")
    sandbox_cpu0 = sandbox.cpu_s()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        results.append(json.loads(out.strip().splitlines()[-1]))
    sandbox_cpu = sandbox.cpu_s() - sandbox_cpu0
    sent = sum(r["sent"] for r in results)
    elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
    cpu_s = sum(r["cpu_s"] for r in results)
    return {
        "sent": sent,
        "elapsed_s": elapsed,
        "msgs_per_s": sent / elapsed,
        "cpu_s_per_1000": 1000 * cpu_s / sent,
        "sandbox_cpu_s_per_1000": 1000 * sandbox_cpu / sent,
    }


class Recipe:
    """The common recipe's Celery workers, started once and reused for several runs."""

    def __init__(
        self, sandbox: LeanSandbox, *, redis_url: str, workdir: Path, connections: int,
        processes: int,
    ) -> None:  # fmt: skip
        import redis

        self.sandbox = sandbox
        self.redis_url = redis_url
        self.prefix = new_prefix("recipe")
        self.redis = redis.Redis.from_url(redis_url)
        self.workdir = workdir
        self.threads = max(1, connections // processes)
        self.processes = processes
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = env_for_subprocess(
            {
                "BENCH_RECIPE_BROKER": redis_url,
                "BENCH_RECIPE_PREFIX": self.prefix,
                "BENCH_RECIPE_HOST": "localhost",
                "BENCH_RECIPE_PORT": str(sandbox.starttls_port),
                "BENCH_RECIPE_CA_FILE": sandbox.ca_file,
                "BENCH_RECIPE_USERNAME": SANDBOX_USER,
                "BENCH_RECIPE_PASSWORD": SANDBOX_PASSWORD,
            }
        )
        # The producer side: a plain Celery app on this run's broker prefix.
        from celery import Celery

        self.app = Celery("bench_recipe_producer", broker=redis_url)
        self.app.conf.update(
            task_serializer="json",
            broker_transport_options={"global_keyprefix": f"{self.prefix}:broker:"},
        )

    def start(self) -> Recipe:
        for index in range(self.processes):
            log = (self.workdir / f"recipe-{index}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable, "-m", "celery", "-A", "bench.recipe", "worker",
                        "-P", "threads", "-c", str(self.threads), "-Q", "recipe",
                        "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
                        "-n", f"recipe{index}-{uuid.uuid4().hex[:6]}@%h",
                    ],
                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            )  # fmt: skip
        # A first round proves the workers consume.
        try:
            self.run(self.threads * self.processes, warmup=True)
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, count: int, *, warmup: bool = False) -> dict[str, Any]:
        done_key = f"{self.prefix}:done"
        self.redis.delete(done_key)
        cpu0 = tree_cpu_s([p.pid for p in self.procs])
        sandbox_cpu0 = self.sandbox.cpu_s()
        text, html = TEXT, HTML
        started = time.time()
        for seq in range(count):
            to = f"user{seq}@example.com"
            name = f"User {seq}"
            self.app.send_task(
                "bench.recipe.send_one",
                args=(SENDER, to, name, _plain(text, name, to), _plain(html, name, to)),
                queue="recipe",
            )
        deadline = time.monotonic() + 600
        while int(self.redis.get(done_key) or 0) < count:
            if time.monotonic() > deadline:
                raise TimeoutError("recipe workers did not finish")
            time.sleep(0.01)
        elapsed = time.time() - started
        cpu = tree_cpu_s([p.pid for p in self.procs]) - cpu0
        sandbox_cpu = self.sandbox.cpu_s() - sandbox_cpu0
        if warmup:
            note(f"recipe workers up ({self.processes} x {self.threads} threads)")
        return {
            "sent": count,
            "elapsed_s": elapsed,
            "msgs_per_s": count / elapsed,
            "cpu_s_per_1000": 1000 * cpu / count,
            "sandbox_cpu_s_per_1000": 1000 * sandbox_cpu / count,
        }

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        delete_prefix(self.redis, self.prefix)
        self.redis.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    loop = sub.add_parser("loop")
    loop.add_argument("--kind", choices=["bare", "floor"], required=True)
    loop.add_argument("--connections", type=int, required=True)
    loop.add_argument("--first", type=int, default=0)
    loop.add_argument("--count", type=int, required=True)
    loop.add_argument("--port", type=int, required=True)
    loop.add_argument("--ca-file", required=True)
    args = parser.parse_args()
    result = asyncio.run(_loop(args.kind, args.connections, args.first, args.count, args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
