"""``ses-tasks demo``: the whole pipeline on one machine, with nothing installed but Python.

An embedded Redis (``redis-server`` if present, else fakeredis over TCP) serves as broker and
status store, the sandbox plays SES over real TLS, worker processes send a sample campaign,
and the report shows what happened: counts by state, throughput, connections used.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ses_tasks.config import load_settings
from ses_tasks.ops.progress import wait_progress
from ses_tasks.produce.client import SesTasks
from ses_tasks.sandbox.embedded import (
    EmbeddedRedis,
    SandboxProcess,
    WorkerProcess,
    temporary_workdir,
    wait_for,
)

__all__ = ["run_demo"]

console = Console(stderr=True)

TEXT = "Hello {{ name }},\n\nthis is issue {{ issue }} of the ses-tasks demo newsletter.\n"
HTML = "<p>Hello <b>{{ name }}</b>,</p><p>this is issue {{ issue }} of the demo newsletter.</p>"


def _write_recipients(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("email,name,issue\n")
        for i in range(count):
            handle.write(f"reader{i}@example.com,Reader {i},42\n")


def run_demo(
    *,
    recipients: int = 1000,
    workers: int = 2,
    mode: str = "tls",
    rate: float = 500.0,
    quiet: bool = False,
) -> dict[str, Any]:
    say = (lambda *_: None) if quiet else console.print
    with temporary_workdir("ses-tasks-demo-") as workdir:
        redis_server = EmbeddedRedis(workdir).start()
        sandbox = SandboxProcess(workdir, log_path=workdir / "sandbox.log").start()
        say(f"[green]✓[/] Redis ({redis_server.kind}) on {redis_server.url}")
        say(
            f"[green]✓[/] SES sandbox: STARTTLS on {sandbox.starttls_port}, "
            f"TLS Wrapper on {sandbox.tls_port}, CA {sandbox.ca_file}"
        )
        env = {
            **sandbox.settings_env(mode),
            "SES_TASKS_BROKER_URL": redis_server.url,
            "SES_TASKS_REDIS_URL": redis_server.url,
            "SES_TASKS_MAX_SEND_RATE": str(rate),
            "SES_TASKS_POOL_SIZE": "4",
            "SES_TASKS_BATCH_SIZE": "50",
        }
        worker = WorkerProcess(
            env=env, mode=mode, concurrency=workers, log_path=workdir / "worker.log"
        ).start()
        try:
            previous = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                client = SesTasks(load_settings())
            finally:
                for key, value in previous.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            say(f"[green]✓[/] {workers} worker processes serving ses.{mode}")
            path = workdir / "recipients.csv"
            _write_recipients(path, recipients)
            started = time.monotonic()
            status = client.send_campaign(
                from_="Demo <newsletter@example.com>",
                subject="Issue {{ issue }} for {{ name }}",
                text=TEXT,
                html=HTML,
                recipients=path,
                campaign_id="demo",
            )
            say(f"[green]✓[/] campaign {status.id}: {status.total} recipients enqueued")
            status = wait_progress(client, status.id, quiet=quiet, timeout_s=300)
            elapsed = time.monotonic() - started
            accepted = (
                wait_for(
                    lambda: (a := sandbox.accepted()) and len(a) >= status.counts["sent"] and a,
                    timeout_s=10,
                    what="the sandbox's store",
                )
                if status.counts["sent"]
                else []
            )
        finally:
            worker.stop()
            sandbox.stop()
            redis_server.stop()
        sessions = {m.get("session_id") for m in accepted}
        connects = [e for e in sandbox.events() if e.get("event") == "connect"]
        report = {
            "campaign": status.id,
            "state": status.state.value,
            "total": status.total,
            "counts": {k: v for k, v in status.counts.items() if v},
            "seconds": round(elapsed, 2),
            "messages_per_s": round(status.counts["sent"] / elapsed, 1) if elapsed else None,
            "accepted_by_endpoint": len(accepted),
            "connections_used": len(connects) or len(sessions),
            "redis": redis_server.kind,
            "mode": mode,
        }
        if not quiet:
            table = Table(title="ses-tasks demo", show_header=False)
            for name, shown in report.items():
                table.add_row(name, str(shown))
            Console().print(table)
        return report
