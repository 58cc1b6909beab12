"""The CLI's contract, run as a user runs it (subprocesses): exit statuses, one-line errors
on stderr and never a traceback, help on every command and option, and ``--json`` printing
exactly one JSON document on stdout.

Exit status: 0 success; 1 a runtime failure (Redis or the broker unreachable or refusing,
an SMTP error, a store failure, a campaign that does not exist or cannot be changed in its
state, an unexpected error); 2 a usage error (bad option or argument, invalid input file
or field, invalid configuration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from ses_tasks.ops import cli
from ses_tasks.ops.cli import main

from ..conftest import REDIS_URL, write_csv
from .test_cli import run

#: Ports nothing listens on: connections are refused at once.
CLOSED_REDIS = "redis://127.0.0.1:1/0"
CLOSED_AMQP = "amqp://guest:guest@127.0.0.1:1//"
#: An unreachable broker or Redis must end well before an app-level retry would (~11 s of
#: pauses for publishing): generous for a loaded CI machine, far below minutes.
UNREACHABLE_BOUND_S = 45

SEND = ["send", "--from", "a@example.com", "--to", "b@example.com", "--subject", "Hi"]
SEND_TEXT = [*SEND, "--text", "{body}"]
CAMPAIGN = ["campaign", "send", "--from", "news@example.com", "--subject", "Hi {{ name }}"]


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]
    code: int
    phrase: str
    env: dict[str, str] = field(default_factory=dict)
    #: "redis": real Redis as store and broker, a private key prefix; "pipeline": plus the
    #: sandbox endpoint (the SMTP settings point at it).
    needs: str = "redis"
    #: Remove these variables from the environment (after ``env``).
    unset: tuple[str, ...] = ()
    stdout_empty: bool = True
    #: A usage error click reports itself: its usage line, a hint and "Error: ...".
    click_usage: bool = False


CASES = [
    # 0: success --------------------------------------------------------------------------
    Case("send-enqueues", SEND_TEXT, 0, "", stdout_empty=False),
    Case("suppress-list", ["suppress", "list", "--json"], 0, "", stdout_empty=False),
    Case("check", ["check"], 0, "", needs="pipeline", stdout_empty=False),
    Case("help", ["--help"], 0, "", stdout_empty=False),
    # 1: runtime failures -----------------------------------------------------------------
    Case(
        "redis-unreachable-list",
        ["campaign", "list"],
        1,
        "check SES_TASKS_REDIS_URL",
        env={"SES_TASKS_REDIS_URL": CLOSED_REDIS},
    ),
    Case(
        "redis-unreachable-status-json",
        ["campaign", "status", "c1", "--json"],
        1,
        "cannot reach Redis",
        env={"SES_TASKS_REDIS_URL": CLOSED_REDIS},
    ),
    Case(
        "redis-unreachable-suppress",
        ["suppress", "list"],
        1,
        "cannot reach Redis",
        env={"SES_TASKS_REDIS_URL": CLOSED_REDIS},
    ),
    Case(
        "redis-unreachable-send",
        SEND_TEXT,
        1,
        "cannot reach Redis",
        env={"SES_TASKS_REDIS_URL": CLOSED_REDIS},
    ),
    Case(
        "redis-unreachable-limits",
        ["limits", "--json"],
        1,
        "check SES_TASKS_REDIS_URL",
        env={"SES_TASKS_REDIS_URL": CLOSED_REDIS},
    ),
    Case("feedback-status-missing", ["feedback", "status", "nope"], 1, "no campaign 'nope'"),
    Case(
        "redis-error-reply",  # not a connection error: SELECT of a database Redis lacks
        ["suppress", "list"],
        1,
        "Redis refused a command (ResponseError",
        env={"SES_TASKS_REDIS_URL": REDIS_URL.rsplit("/", 1)[0] + "/99999"},
    ),
    Case(
        "broker-unreachable-redis",
        SEND_TEXT,
        1,
        "cannot reach the broker",
        env={"SES_TASKS_BROKER_URL": CLOSED_REDIS},
    ),
    Case(
        "broker-unreachable-amqp",
        [*SEND_TEXT, "--json"],
        1,
        "nothing was enqueued",
        env={"SES_TASKS_BROKER_URL": CLOSED_AMQP},
    ),
    Case("campaign-missing", ["campaign", "status", "nope"], 1, "no campaign 'nope'"),
    Case("campaign-missing-json", ["campaign", "status", "nope", "--json"], 1, "no campaign"),
    Case("campaign-missing-pause", ["campaign", "pause", "nope"], 1, "no campaign 'nope'"),
    Case("campaign-missing-failures", ["campaign", "failures", "nope"], 1, "no campaign"),
    Case(
        "smtp-error",
        [*SEND_TEXT, "--direct"],
        1,
        "535",
        env={"SES_TASKS_PASSWORD": "wrong"},
        needs="pipeline",
    ),
    Case(
        "check-without-credentials",
        ["check"],
        1,
        "did not authenticate",
        env={"SES_TASKS_USERNAME": "", "SES_TASKS_PASSWORD": ""},
        needs="pipeline",
        stdout_empty=False,  # the report, then the error
    ),
    # 2: usage errors ---------------------------------------------------------------------
    Case("unknown-option", ["send", "--bogus"], 2, "No such option", click_usage=True),
    Case("unknown-command", ["sendd"], 2, "No such command", click_usage=True),
    Case(
        "missing-option", ["send", "--to", "b@example.com"], 2, "Missing option", click_usage=True
    ),
    Case("bad-loglevel", ["worker", "--loglevel", "foo"], 2, "--loglevel", click_usage=True),
    Case("bad-concurrency", ["worker", "--concurrency", "0"], 2, "--concurrency", click_usage=True),
    Case("bad-weight-type", ["campaign", "weight", "c1", "heavy"], 2, "WEIGHT", click_usage=True),
    Case(
        "invalid-recipient",
        ["send", "--from", "a@example.com", "--to", "not-an-address", "--subject", "Hi"],
        2,
        "to[0]",
    ),
    Case(
        # validated before the broker is even tried
        "invalid-recipient-broker-down",
        ["send", "--from", "a@example.com", "--to", "not-an-address", "--subject", "Hi"],
        2,
        "to[0]",
        env={"SES_TASKS_BROKER_URL": CLOSED_REDIS},
    ),
    Case("unreadable-body", [*SEND, "--text", "/nonexistent/body.txt"], 2, "--text: cannot read"),
    Case(
        "recipients-without-email",
        [*CAMPAIGN, "--text", "{body}", "--recipients", "{noemail}"],
        2,
        "recipients: no 'email' column",
    ),
    Case("bad-tag", [*CAMPAIGN, "--recipients", "{recipients}", "--tag", "x"], 2, "--tag"),
    Case("send-at-naive", [*SEND_TEXT, "--at", "2030-01-01T09:00:00"], 2, "--at"),
    Case(
        "campaign-at-unparsable",
        [*CAMPAIGN, "--recipients", "{recipients}", "--at", "tomorrow"],
        2,
        "--at",
    ),
    Case(
        "resume-without-id",
        [*CAMPAIGN, "--recipients", "{recipients}", "--resume"],
        2,
        "--id",
        click_usage=True,
    ),
    Case("bad-profile", [*SEND_TEXT, "--profile", "nope"], 2, "profile"),
    Case("bad-configuration", ["campaign", "list"], 2, "999", env={"SES_TASKS_PORT": "999"}),
    Case("no-secret", ["smtp-password", "--region", "eu-west-1"], 2, "secret"),
]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "body.txt").write_text("Hello {{ name }}")
    return {
        "body": str(tmp_path / "body.txt"),
        "recipients": str(write_csv(tmp_path / "r.csv", [{"email": "r@example.com", "name": "R"}])),
        "noemail": str(write_csv(tmp_path / "n.csv", [{"name": "A", "city": "B"}])),
    }


def case_env(case: Case, key_prefix: str, make_pipeline: Any) -> dict[str, str]:
    if case.needs == "pipeline":
        base = dict(make_pipeline("tls").env)
    else:
        base = {
            "SES_TASKS_REDIS_URL": REDIS_URL,
            "SES_TASKS_BROKER_URL": REDIS_URL,
            "SES_TASKS_KEY_PREFIX": key_prefix,
            "SES_TASKS_HOST": "localhost",
            "SES_TASKS_PORT": "2465",
        }
    base.update(case.env)
    for name in case.unset:
        base.pop(name, None)
    return base


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_exit_status_and_one_line(case: Case, key_prefix, make_pipeline, files, monkeypatch):
    for name in ("SES_TASKS_DEBUG", "SES_TASKS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    env = case_env(case, key_prefix, make_pipeline)
    args = [a.format(**files) if a.startswith("{") else a for a in case.args]
    started = time.monotonic()
    result = run(args, env=env, stdin="", timeout=UNREACHABLE_BOUND_S + 60)
    elapsed = time.monotonic() - started
    assert result.returncode == case.code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert case.phrase in result.stderr
    if case.code and case.stdout_empty:
        assert result.stdout == ""
    if case.click_usage:
        assert result.stderr.startswith("Usage: ses-tasks ")
        assert case.phrase in result.stderr.splitlines()[-1]
    elif case.code:
        assert result.stderr.startswith("ses-tasks: error: ")
        assert len(result.stderr.splitlines()) == 1, result.stderr
    if "unreachable" in case.id:
        assert elapsed < UNREACHABLE_BOUND_S, f"{elapsed:.1f} s"


def test_campaign_in_a_state_that_forbids_the_change_exits_1(key_prefix, files):
    env = {
        "SES_TASKS_REDIS_URL": REDIS_URL,
        "SES_TASKS_BROKER_URL": REDIS_URL,
        "SES_TASKS_KEY_PREFIX": key_prefix,
        "SES_TASKS_HOST": "localhost",
        "SES_TASKS_PORT": "2465",
    }
    common = [*CAMPAIGN, "--text", files["body"], "--recipients", files["recipients"]]
    sent = run([*common, "--id", "c-state"], env=env)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "c-state"
    for args, phrase in (
        (["campaign", "resume", "c-state"], "not paused"),  # running, not paused
        ([*common, "--id", "c-state"], "already exists"),
    ):
        result = run(args, env=env)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith("ses-tasks: error: ") and phrase in result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


FAULT = """
import sys
import ses_tasks.ops.cli as cli

def fault(**_):
    raise RuntimeError("injected failure")

cli._settings = fault
cli.main(prog_name="ses-tasks")
"""


def test_an_unexpected_error_is_one_line_or_with_debug_the_traceback():
    result = subprocess.run(
        [sys.executable, "-c", FAULT, "limits"],
        env={**os.environ, "SES_TASKS_DEBUG": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "ses-tasks: error: unexpected RuntimeError: injected failure "
        "(set SES_TASKS_DEBUG=1 for the traceback)\n"
    )
    debug = subprocess.run(
        [sys.executable, "-c", FAULT, "limits"],
        env={**os.environ, "SES_TASKS_DEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "RuntimeError: injected failure" in debug.stderr


RACE = """
import ses_tasks.ops.cli as cli

cli._check_broker = lambda client: None  # the broker goes away after the check
cli.main(prog_name="ses-tasks")
"""


def test_a_publish_that_fails_after_the_check_is_recorded_and_bounded(key_prefix, files):
    """The broker answers the check, then is gone: the message is recorded (the workers'
    sweeper publishes it), the CLI says so, and its short retry policy applies."""
    from ses_tasks.config import load_settings

    env = {
        **os.environ,
        "SES_TASKS_REDIS_URL": REDIS_URL,
        "SES_TASKS_BROKER_URL": CLOSED_REDIS,
        "SES_TASKS_KEY_PREFIX": key_prefix,
        "SES_TASKS_HOST": "localhost",
        "SES_TASKS_PORT": "2465",
    }
    args = [*SEND, "--text", files["body"], "--json"]
    result = subprocess.run(
        [sys.executable, "-c", RACE, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    message_id = json.loads(result.stdout)["id"]
    assert result.stderr.startswith(f"ses-tasks: warning: message {message_id} is recorded")
    assert "do not send it again" in result.stderr and "Traceback" not in result.stderr
    client = cli._client(load_settings(redis_url=REDIS_URL, key_prefix=key_prefix))
    assert client.app.conf.task_publish_retry_policy == cli.CLI_PUBLISH_RETRY_POLICY


# help ------------------------------------------------------------------------------------

#: Passes its arguments, --help too, to the sandbox's own parser.
PASSTHROUGH = {"sandbox"}
#: Arguments not named in their command's help (none left).
KNOWN_GAPS: set[tuple[str, str]] = set()


def walk(
    command: click.Command, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            found += walk(sub, (*path, name))
    return found


def test_every_command_option_and_argument_has_help():
    missing = []
    for path, command in walk(main):
        name = " ".join(path)
        if name in PASSTHROUGH:
            continue
        help_text = command.help or ""
        if not help_text.strip():
            missing.append(f"{name or 'ses-tasks'}: no help")
        for param in command.params:
            if isinstance(param, click.Option):
                if not param.hidden and not (param.help or "").strip():
                    missing.append(f"{name}: {param.opts[0]} has no help")
            elif isinstance(param, click.Argument):
                metavar = param.human_readable_name
                if metavar not in help_text and (name, metavar) not in KNOWN_GAPS:
                    missing.append(f"{name}: argument {metavar} is not in the help")
    assert missing == []


def test_every_help_page_renders():
    runner = CliRunner()
    for path, _command in walk(main):
        if " ".join(path) in PASSTHROUGH:
            continue
        result = runner.invoke(main, [*path, "--help"], prog_name="ses-tasks")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: ses-tasks" in result.output


def test_help_epilog_has_the_exit_status_table():
    result = run(["--help"])
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for row in ("Exit status:", "0 success", "1 runtime failure", "2 usage error"):
        assert row in text
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for row in ("| 0 |", "| 1 |", "| 2 |"):
        assert row in readme


# --json ----------------------------------------------------------------------------------

#: Every command with --json, by path; the test below runs each against the pipeline.
JSON_COMMANDS = {
    "send",
    "campaign send",
    "campaign status",
    "campaign list",
    "suppress list",
    "check",
    "limits",
    "demo",  # runs its own pipeline: tests/e2e/test_cli.py (slow)
    "feedback ingest",  # ses_tasks/feedback/cli.py, not changed here
}


def test_json_commands_are_the_known_ones():
    found = {
        " ".join(path)
        for path, command in walk(main)
        if any(isinstance(p, click.Option) and "--json" in p.opts for p in command.params)
    }
    assert found == JSON_COMMANDS


def json_document(result: subprocess.CompletedProcess[str]) -> Any:
    """stdout is exactly one JSON document (json.loads refuses anything after it)."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def test_json_prints_exactly_one_document_on_stdout(make_pipeline, files, tmp_path: Path):
    """With -vv, so that log lines exist: they go to stderr, never into the JSON."""
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=2)
    env = pipeline.env
    recipients = write_csv(
        tmp_path / "many.csv", [{"email": f"j{i}@example.com", "name": f"J{i}"} for i in range(5)]
    )

    def cli_json(*args: str) -> Any:
        return json_document(run(["-vv", *args, "--json"], env=env))

    send = [*SEND, "--text", files["body"]]
    assert set(cli_json(*send)) == {"id"}
    assert cli_json(*send, "--wait")["state"] == "sent"
    assert cli_json(*send, "--direct")["state"] == "sent"
    common = [*CAMPAIGN, "--text", files["body"], "--recipients", str(recipients)]
    assert cli_json(*common, "--id", "j1") == {"id": "j1", "total": 5, "send_at": None}
    final = cli_json(*common, "--id", "j2", "--wait")
    assert (final["id"], final["state"], final["sent"]) == ("j2", "completed", 5), final
    assert cli_json("campaign", "status", "j2")["state"] == "completed"
    assert isinstance(cli_json("campaign", "list"), list)
    assert {r["id"] for r in cli_json("campaign", "list", "--all")} >= {"j1", "j2"}
    assert run(["suppress", "add", "x@example.com", "y@example.com"], env=env).returncode == 0
    listed = cli_json("suppress", "list")
    assert sorted(e["email"] for e in listed) == ["x@example.com", "y@example.com"]
    assert cli_json("check")["authenticated"] is True
    assert "rate" in cli_json("limits")
