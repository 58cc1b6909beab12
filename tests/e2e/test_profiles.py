"""Several SES accounts in one fleet: named sender profiles, each with its own pool, rate
limit, quota and AIMD state, through real workers and real sandboxes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest

from ses_tasks.errors import ValidationError
from ses_tasks.sandbox.embedded import SandboxProcess
from ses_tasks.store.tracking import COUNTERS

TEMPLATE = dict(from_="news@example.com", subject="Hi", text="x")


def _recipients(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def _adds_up(status) -> bool:
    return sum(status.counts[n] for n in COUNTERS) == status.total


def _send_side_by_side(client: Any, campaigns: list[tuple[str, str, int, str]]) -> None:
    threads = [
        threading.Thread(
            target=client.send_campaign,
            kwargs=dict(recipients=_recipients(p, n), campaign_id=cid, profile=prof, **TEMPLATE),
        )
        for cid, p, n, prof in campaigns
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _rate(times: list[float], lo: float, hi: float) -> float:
    return sum(lo <= t < hi for t in times) / (hi - lo)


def _times(accepted: list[dict[str, Any]], prefix: str) -> list[float]:
    return sorted(m["received_at"] for m in accepted if m["rcpt_tos"][0].startswith(prefix))


def test_two_profiles_each_hold_their_own_rate(make_pipeline):
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_MAX_SEND_RATE="60",
        SES_TASKS_PROFILES__SLOW__MAX_SEND_RATE="20",
    )
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    _send_side_by_side(client, [("fast", "f", 720, ""), ("slow", "s", 300, "slow")])
    for cid, n in (("fast", 720), ("slow", 300)):
        status = pipeline.wait_done(cid, timeout_s=120)
        assert status.counts["sent"] == n and _adds_up(status)
    assert client.campaign_status("slow").meta["profile"] == "slow"
    accepted = pipeline.accepted(at_least=1020)
    fast, slow = _times(accepted, "f"), _times(accepted, "s")
    lo = max(fast[0], slow[0]) + 1.5  # past the first second's burst
    hi = min(fast[-1], slow[-1]) - 0.5
    assert hi - lo > 5, (lo, hi)
    fast_rate, slow_rate = _rate(fast, lo, hi), _rate(slow, lo, hi)
    print(f"while both run: default {fast_rate:.1f}/s (limit 60), slow {slow_rate:.1f}/s (20)")
    assert 60 * 0.85 <= fast_rate <= 60 * 1.15
    assert 20 * 0.85 <= slow_rate <= 20 * 1.15
    delivered = [r for m in accepted for r in m["rcpt_tos"]]
    assert len(delivered) == len(set(delivered)) == 1020


def test_a_throttled_account_never_slows_another(make_pipeline, tmp_path):
    throttling = SandboxProcess(
        tmp_path,
        args=["--throttle-rate", "0.3", "--seed", "3"],
        store_path=tmp_path / "throttling-messages.jsonl",
        events_path=tmp_path / "throttling-events.jsonl",
    ).start()
    try:
        pipeline = make_pipeline(
            "tls",
            SES_TASKS_MAX_SEND_RATE="50",
            SES_TASKS_PROFILES__BUSY__HOST="localhost",
            SES_TASKS_PROFILES__BUSY__PORT=str(throttling.tls_port),
            SES_TASKS_PROFILES__BUSY__MAX_SEND_RATE="50",
            # Another endpoint: its own credentials (the fleet's are never sent there).
            SES_TASKS_PROFILES__BUSY__USERNAME=throttling.settings_env()["SES_TASKS_USERNAME"],
            SES_TASKS_PROFILES__BUSY__PASSWORD=throttling.password,
        )
        pipeline.start_worker(concurrency=2)
        client = pipeline.client
        _send_side_by_side(client, [("calm", "c", 600, ""), ("busy", "b", 400, "busy")])
        for cid, n in (("calm", 600), ("busy", 400)):
            status = pipeline.wait_done(cid, timeout_s=180)
            assert status.counts["sent"] == n and _adds_up(status)
        calm = _times(pipeline.accepted(at_least=600), "c")
        rate = (len(calm) - 50) / (calm[-1] - calm[0])  # less the first burst
        print(f"calm account: {rate:.1f}/s (limit 50) while the other was throttled")
        assert rate >= 50 * 0.85
        # Only the throttled account slowed down, and `ses-tasks limits` shows both.
        out = subprocess.run(
            [sys.executable, "-m", "ses_tasks.ops.cli", "limits", "--json"],
            env={**os.environ, **pipeline.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        profiles = json.loads(out.stdout)["profiles"]
        assert set(profiles) == {"", "busy"}
        assert profiles[""]["rate"]["effective_rate_per_s"] == 50
        assert profiles["busy"]["rate"]["last_change_reason"] in ("throttle", "recover")
        assert str(throttling.tls_port) in profiles["busy"]["endpoint"]
        busy = [m for m in throttling.accepted() for _ in m["rcpt_tos"]]
        assert len({r for m in throttling.accepted() for r in m["rcpt_tos"]}) == 400 == len(busy)
    finally:
        throttling.stop()


def test_a_profile_fails_over_while_its_endpoint_is_unreachable(make_pipeline):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_PROFILES__EU__HOST="localhost",
        SES_TASKS_PROFILES__EU__PORT=str(closed),
        SES_TASKS_PROFILES__EU__FAILOVER_HOST="localhost",
        SES_TASKS_PROFILES__EU__USERNAME="AKIASANDBOXEXAMPLE",
        SES_TASKS_PROFILES__EU__PASSWORD="sandbox-password",
    )
    pipeline.env["SES_TASKS_PROFILES__EU__FAILOVER_PORT"] = pipeline.env["SES_TASKS_PORT"]
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    client.send_campaign(
        recipients=_recipients("e", 120), campaign_id="eu", profile="eu", **TEMPLATE
    )
    status = pipeline.wait_done("eu", timeout_s=60)
    assert status.counts["sent"] == 120 and _adds_up(status)
    assert "sending through" in pipeline.worker_logs()
    delivered = [r for m in pipeline.accepted(at_least=120) for r in m["rcpt_tos"]]
    assert sorted(delivered) == sorted(_recipients("e", 120))


def test_an_unknown_profile_is_refused_before_anything_is_stored(make_pipeline):
    pipeline = make_pipeline("tls")
    client = pipeline.client
    with pytest.raises(ValidationError, match=r"profile.*'nope'"):
        client.send_campaign(
            recipients=_recipients("u", 3), campaign_id="u", profile="nope", **TEMPLATE
        )
    with pytest.raises(ValidationError, match="profile"):
        client.send_email(
            from_="a@example.com", to=["b@example.com"], subject="s", text="t", profile="nope"
        )
    assert "u" not in client.store.list_campaigns()
