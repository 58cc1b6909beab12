"""Helpers shared by the reliability tests: bulk record reads, a private redis-server."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from ses_tasks.produce.client import SesTasks
from ses_tasks.sandbox.embedded import free_port, wait_for
from ses_tasks.store.tracking import COUNTERS, CampaignStatus, MessageRecord, parse_message


def records(client: SesTasks, campaign_id: str, total: int) -> dict[int, MessageRecord | None]:
    """Every message record of a campaign, by sequence number, in one pipeline."""
    store = client.store
    pipe = store.redis.pipeline(transaction=False)
    for seq in range(total):
        pipe.hgetall(store.keys.message(f"{campaign_id}.{seq}"))
    return {
        seq: parse_message(f"{campaign_id}.{seq}", raw)
        for seq, raw in zip(range(total), pipe.execute(), strict=True)
    }


def adds_up(status: CampaignStatus) -> bool:
    return sum(status.counts[name] for name in COUNTERS) == status.total


def delivered(accepted: Iterable[dict[str, Any]]) -> Counter[str]:
    return Counter(r for message in accepted for r in message["rcpt_tos"])


def seq_of(email: str) -> int:
    """``r123@example.com`` -> 123."""
    return int(email.split("@")[0].lstrip("abcdefghijklmnopqrstuvwxyz-"))


class PrivateRedis:
    """A ``redis-server`` of the test's own, on a fixed port so it can be restarted."""

    def __init__(self, workdir: Path, *, appendonly: bool = False, port: int = 0) -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
            *extra,
        ]

    def start(self, *extra: str, url: str | None = None, **client_kw: Any) -> PrivateRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            self.command(*extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(url or self.url, **client_kw)

        def answers() -> bool:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}")
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return False

        wait_for(answers, timeout_s=15, what="the private redis-server to answer")
        client.close()
        return self

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown save."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
