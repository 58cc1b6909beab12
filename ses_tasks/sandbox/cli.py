"""``ses-tasks sandbox`` / ``python -m ses_tasks.sandbox``: run the sandbox until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from ses_tasks.errors import SesTasksError
from ses_tasks.sandbox.config import SandboxConfig
from ses_tasks.sandbox.faults import Faults
from ses_tasks.sandbox.server import Sandbox

__all__ = ["PASSWORD_ENV", "build_parser", "main"]

PASSWORD_ENV = "SES_TASKS_SANDBOX_PASSWORD"
DEFAULT_STARTTLS_PORT = 2587
DEFAULT_TLS_PORT = 2465
#: A long-running sandbox keeps this many messages in memory; the store keeps them all.
CLI_MEMORY_MESSAGES = 10_000


def _port(text: str) -> int | None:
    if text.lower() in {"none", "off", "-"}:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (or 'none')") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ses-tasks sandbox",
        description="Local SES-compatible SMTP endpoint (STARTTLS and TLS Wrapper, AUTH, "
        "SES replies, injectable faults).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--starttls-port", type=_port, default=DEFAULT_STARTTLS_PORT, help="0 = any, none = off")
    add("--tls-port", type=_port, default=DEFAULT_TLS_PORT, help="0 = any, none = off")
    add("--username", default="AKIAEXAMPLE")
    add("--password", default=None, help=f"or set {PASSWORD_ENV}")
    add("--cert-dir", default=None, help="where ca.pem is written (reused if present)")
    add("--store", default=None, help="JSONL file of accepted messages")
    add("--events", default=None, help="JSONL file of connection events")
    add("--latency-ms", type=float, default=0.0)
    add("--no-keep-data", action="store_true", help="record ids and sizes, not message bytes")
    add("--no-starttls-advert", action="store_true", help="a broken server: never offer STARTTLS")
    add("--throttle-rate", type=float, default=0.0)
    add("--daily-quota", type=int, default=None)
    add("--temp-fail-rate", type=float, default=0.0)
    add("--drop-after-data-rate", type=float, default=0.0)
    add("--max-messages-per-session", type=int, default=None)
    add("--idle-timeout", type=float, default=None, help="seconds")
    add(
        "--drop-after-data-accepts",
        action="store_true",
        help="dropped connections still deliver the message (SES may have it)",
    )
    add(
        "--reject-recipient",
        action="append",
        default=[],
        metavar="ADDR",
        help="answer 554 'Email address is not verified' for this address (repeatable)",
    )
    add(
        "--deny-sender",
        action="append",
        default=[],
        metavar="IDENTITY",
        help="answer 554 'not authorized to perform ses:SendRawEmail on resource "
        "...:identity/IDENTITY' for mail from this address or domain (repeatable)",
    )
    add(
        "--deny-sender-at",
        choices=("data", "mail"),
        default="data",
        help="when --deny-sender answers: after DATA (as SES does) or at MAIL FROM",
    )
    add("--auth-fail", action="store_true", help="answer every AUTH with 535")
    add("--account-paused", action="store_true", help="554 Sending paused after every DATA")
    add("--seed", type=int, default=0)
    add("--ready-file", default=None, help="JSON with ports, CA file and pid, once listening")
    return parser


def _config(args: argparse.Namespace) -> SandboxConfig:
    password = args.password or os.environ.get(PASSWORD_ENV)
    if not password:
        raise SystemExit(f"ses-tasks sandbox: error: give --password or set {PASSWORD_ENV}")
    faults = Faults(
        throttle_rate=args.throttle_rate,
        daily_quota=args.daily_quota,
        temp_fail_rate=args.temp_fail_rate,
        drop_after_data_rate=args.drop_after_data_rate,
        max_messages_per_session=args.max_messages_per_session,
        idle_timeout_s=args.idle_timeout,
        drop_after_data_accepts=args.drop_after_data_accepts,
        reject_recipients=frozenset(a.lower() for a in args.reject_recipient),
        deny_senders=frozenset(a.lower() for a in args.deny_sender),
        deny_senders_at=args.deny_sender_at,
        auth_fail=args.auth_fail,
        account_paused=args.account_paused,
        seed=args.seed,
    )
    return SandboxConfig(
        host=args.host,
        starttls_port=args.starttls_port,
        tls_port=args.tls_port,
        username=args.username,
        password=password,
        cert_dir=args.cert_dir,
        store_path=args.store,
        events_path=args.events,
        latency_ms=args.latency_ms,
        advertise_starttls=not args.no_starttls_advert,
        keep_data=not args.no_keep_data,
        faults=faults,
        max_messages_in_memory=CLI_MEMORY_MESSAGES,
    )


def _write_ready_file(path: str, sandbox: Sandbox) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    payload = {
        "starttls_port": sandbox.starttls_port,
        "tls_port": sandbox.tls_port,
        "ca_file": sandbox.ca_file,
        "host": sandbox.config.host,
        "pid": os.getpid(),
    }
    partial.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(partial, target)  # readers never see half a file


async def _serve(config: SandboxConfig, ready_file: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Sandbox(config) as sandbox:
            if ready_file:
                _write_ready_file(ready_file, sandbox)
            print(
                f"ses-tasks sandbox: STARTTLS port {sandbox.starttls_port}, "
                f"TLS Wrapper port {sandbox.tls_port}, on {config.host}; "
                f"trust {sandbox.ca_file}",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
            stats = sandbox.stats
            print(
                f"ses-tasks sandbox: stopping after {stats.connections_opened} connections, "
                f"{stats.messages_accepted} messages accepted",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox until SIGTERM or SIGINT; 0 on a clean stop."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        config = _config(args)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return int(exc.code or 0)
    except SesTasksError as exc:
        print(f"ses-tasks sandbox: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, args.ready_file))
    except SesTasksError as exc:
        print(f"ses-tasks sandbox: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ses-tasks sandbox: error: {exc}", file=sys.stderr)
        return 1
    return 0
