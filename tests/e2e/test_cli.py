"""The command line, run as a user runs it: subprocesses, exit codes, stdout/stderr."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import write_csv

CLI = [sys.executable, "-m", "ses_tasks.ops.cli"]


def run(
    args: list[str],
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smtp_password_reads_the_secret_from_stdin_not_argv():
    result = run(["smtp-password", "--region", "eu-central-1"], stdin="some+secret+key\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "BMXhUYlu5Z3gSXVQORxlVa7XPaz91aGWdfHxvkOZdWZ2"


def test_smtp_password_from_environment():
    result = run(
        ["smtp-password", "--region", "us-west-1"],
        env={"SES_TASKS_SECRET_ACCESS_KEY": "another+secret+key"},
    )
    assert result.stdout.strip() == "BKVmjjMDFk/qqw8EROW99bjCS65PF8WKvK5bSr4Y6EqF"


def test_configuration_error_is_one_line_without_traceback():
    result = run(["campaign", "status", "x"], env={"SES_TASKS_PORT": "999"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ses-tasks: error: PORT: SES answers on 25, 587, 2587 (STARTTLS) or 465, 2465 "
        "(TLS Wrapper), not 999"
    )
    assert "Traceback" not in result.stderr


def test_unknown_campaign_is_a_clear_error(key_prefix):
    result = run(["campaign", "status", "nope", "--json"], env={"SES_TASKS_KEY_PREFIX": key_prefix})
    assert result.returncode == 1  # a runtime failure (CampaignError), not a usage error
    assert result.stdout == ""
    assert "no campaign 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_campaign_send_wait_json_status_and_failures(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("starttls")
    pipeline.start_worker(concurrency=2)
    rows = [{"email": f"r{i}@example.com", "name": f"R{i}"} for i in range(40)]
    rows.append({"email": "not-an-address", "name": "bad"})
    rows.append({"email": "nameless@example.com", "name": ""})
    recipients = write_csv(tmp_path / "r.csv", rows)
    (tmp_path / "body.txt").write_text("Hi {{ name }}")
    send = run(
        [
            "campaign",
            "send",
            "--from",
            "news@example.com",
            "--subject",
            "Hello {{ name }}",
            "--text",
            str(tmp_path / "body.txt"),
            "--recipients",
            str(recipients),
            "--id",
            "cli-1",
            "--wait",
            "--json",
        ],
        env=pipeline.env,
    )
    assert send.returncode == 0, send.stderr
    final = json.loads(send.stdout)
    assert final["id"] == "cli-1"
    assert final["total"] == 42
    assert final["sent"] == 41 and final["failed"] == 1
    status = run(["campaign", "status", "cli-1", "--json"], env=pipeline.env)
    data = json.loads(status.stdout)
    for key in (
        "id",
        "state",
        "total",
        "queued",
        "sending",
        "sent",
        "retrying",
        "deferred",
        "failed",
        "suppressed",
        "unknown",
        "cancelled",
    ):
        assert key in data
    assert data["state"] == "completed"
    failures = run(["campaign", "failures", "cli-1"], env=pipeline.env)
    table = list(csv.DictReader(io.StringIO(failures.stdout)))
    assert [(r["email"], r["state"]) for r in table] == [("not-an-address", "failed")]
    assert "to" in table[0]["reason"] or "address" in table[0]["reason"]


def test_suppress_add_list_remove(key_prefix):
    env = {"SES_TASKS_KEY_PREFIX": key_prefix}
    assert run(["suppress", "add", "A@Example.com", "b@example.com"], env=env).returncode == 0
    listed = run(["suppress", "list"], env=env).stdout.splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == ["a@example.com", "b@example.com"]
    assert run(["suppress", "remove", "a@example.com"], env=env).stdout.strip() == "1 removed"
    listed = run(["suppress", "list"], env=env).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["b@example.com"]


@pytest.mark.slow
def test_demo_runs_without_a_redis_server_on_the_path(tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    result = subprocess.run(
        [sys.executable, "-m", "ses_tasks.ops.cli", "demo", "--recipients", "300", "--json"],
        env={**os.environ, "PATH": str(bindir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["redis"] == "fakeredis"
    assert report["counts"] == {"sent": 300}
    assert report["accepted_by_endpoint"] == 300
    assert report["connections_used"] <= 8


def test_check_reports_tls_and_extensions_without_sending(make_pipeline):
    pipeline = make_pipeline("starttls")
    result = run(["check", "--json"], env=pipeline.env)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["mode"] == "starttls"
    assert info["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert info["authenticated"] is True
    assert "AUTH" in {k.upper() for k in info["extensions"]}
    assert pipeline.sandbox.accepted() == []


def test_check_without_credentials_exits_1_and_says_why(make_pipeline):
    pipeline = make_pipeline("tls")
    env = {
        k: v
        for k, v in pipeline.env.items()
        if k not in ("SES_TASKS_USERNAME", "SES_TASKS_PASSWORD")
    }
    env.update(SES_TASKS_USERNAME="", SES_TASKS_PASSWORD="")
    result = run(["check"], env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "did not authenticate" in result.stderr
    assert "Traceback" not in result.stderr


def test_send_direct_prints_the_ses_message_id(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("tls")
    (tmp_path / "t.txt").write_text("hello")
    result = run(
        [
            "send",
            "--direct",
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
            "--subject",
            "Hi",
            "--text",
            str(tmp_path / "t.txt"),
        ],
        env=pipeline.env,
    )
    assert result.returncode == 0, result.stderr
    accepted = pipeline.accepted(at_least=1)
    assert result.stdout.strip() == accepted[0]["ses_message_id"]


def test_send_direct_with_wrong_password_is_one_clear_line(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("tls", SES_TASKS_PASSWORD="wrong")
    (tmp_path / "t.txt").write_text("hello")
    result = run(
        [
            "send",
            "--direct",
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
            "--subject",
            "Hi",
            "--text",
            str(tmp_path / "t.txt"),
        ],
        env=pipeline.env,
    )
    assert result.returncode == 1  # an SMTP failure is a runtime failure
    assert result.stderr.startswith("ses-tasks: error: 535 Authentication Credentials Invalid")
    assert "wrong" not in result.stderr and "Traceback" not in result.stderr


def test_send_rejects_header_injection_before_enqueueing(key_prefix, tmp_path: Path):
    (tmp_path / "t.txt").write_text("hello")
    result = run(
        [
            "send",
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
            "--subject",
            "Hi\r\nBcc: victim@example.com",
            "--text",
            str(tmp_path / "t.txt"),
        ],
        env={"SES_TASKS_KEY_PREFIX": key_prefix},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("ses-tasks: error: subject:")
    assert "Traceback" not in result.stderr


def test_limits_shows_rate_quota_and_paused_campaigns(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_MAX_24H_SEND="1000", SES_TASKS_MAX_SEND_RATE="50")
    client = pipeline.client
    client.send_campaign(
        from_="a@example.com",
        subject="s",
        text="t",
        recipients=["x@example.com"],
        campaign_id="held",
    )
    client.pause("held")
    result = run(["limits", "--json"], env=pipeline.env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rate"]["configured_rate_per_s"] == 50
    assert data["rate"]["effective_rate_per_s"] == 50
    assert data["quota"]["limit"] == 1000 and data["quota"]["used"] == 0
    assert data["paused_campaigns"] == [{"id": "held", "reason": "paused by user"}]


def test_campaign_send_wait_stops_when_the_endpoint_pauses_the_campaign(make_pipeline, tmp_path):
    pipeline = make_pipeline("tls", SES_TASKS_PASSWORD="wrong")
    pipeline.start_worker(concurrency=1)
    recipients = write_csv(tmp_path / "r.csv", [{"email": f"w{i}@example.com"} for i in range(30)])
    (tmp_path / "body.txt").write_text("x")
    result = run(
        [
            "campaign",
            "send",
            "--from",
            "a@example.com",
            "--subject",
            "s",
            "--text",
            str(tmp_path / "body.txt"),
            "--recipients",
            str(recipients),
            "--id",
            "paused-wait",
            "--wait",
            "--json",
        ],
        env=pipeline.env,
        timeout=120,
    )
    assert result.returncode == 1
    status = json.loads(result.stdout)
    assert status["state"] == "paused" and status["deferred"] == 30
    assert result.stderr.strip().startswith("ses-tasks: error: campaign paused-wait is paused:")
    assert "535" in result.stderr


def test_campaign_list_shows_weight_share_and_eta_and_weight_changes_it(
    make_pipeline, tmp_path: Path
):
    """No workers: both campaigns stay stored, so their shares and ETAs are steady."""
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE="20")
    recipients = write_csv(tmp_path / "r.csv", [{"email": f"r{i}@example.com"} for i in range(300)])
    (tmp_path / "body.txt").write_text("Hi")
    common = ["--from", "news@example.com", "--subject", "Hi", "--text", str(tmp_path / "body.txt")]
    for cid, weight in (("heavy", "3"), ("light", "1")):
        sent = run(
            [
                "campaign",
                "send",
                *common,
                "--recipients",
                str(recipients),
                "--id",
                cid,
                "--weight",
                weight,
            ],
            env=pipeline.env,
        )
        assert sent.returncode == 0, sent.stderr
    listed = run(["campaign", "list", "--json"], env=pipeline.env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"heavy", "light"}
    assert (rows["heavy"]["weight"], rows["heavy"]["share"]) == (3.0, 0.75)
    assert rows["light"]["share"] == 0.25 and rows["light"]["rate_per_s"] == 5.0
    assert rows["light"]["eta_s"] == 60.0  # 300 open at 5/s
    assert rows["heavy"]["eta_s"] == 20.0 and rows["heavy"]["stored_batches"] == 6
    table = run(["campaign", "list"], env=pipeline.env)
    assert "heavy" in table.stdout and "75%" in table.stdout and "60 s" in table.stdout
    assert run(["campaign", "weight", "light", "3"], env=pipeline.env).returncode == 0
    status = json.loads(run(["campaign", "status", "light", "--json"], env=pipeline.env).stdout)
    assert (status["weight"], status["share"], status["eta_s"]) == (3.0, 0.5, 30.0)
    bad = run(["campaign", "weight", "light", "0"], env=pipeline.env)
    assert bad.returncode != 0 and "weight" in bad.stderr and "Traceback" not in bad.stderr
    unknown = run(
        ["campaign", "send", *common, "--recipients", str(recipients), "--profile", "nope"],
        env=pipeline.env,
    )
    assert unknown.returncode != 0 and "profile" in unknown.stderr
    assert "Traceback" not in unknown.stderr
