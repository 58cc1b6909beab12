"""``ses-tasks feedback serve`` as an operator runs it: it will not start without a topic
allow-list, starts with one, and starts with the development flag only after a warning."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from ses_tasks.feedback.settings import ALLOW_ANY_TOPIC_ENV, ALLOWED_TOPIC_ARNS_ENV
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner

from ..conftest import REDIS_URL

CLI = [sys.executable, "-m", "ses_tasks.ops.cli", "feedback", "serve", "--port", "0"]
FOREIGN_TOPIC = "arn:aws:sns:us-east-1:999999999999:someone-elses-topic"


def environment(key_prefix: str, **feedback: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SES_TASKS_FEEDBACK_")}
    env.update(SES_TASKS_REDIS_URL=REDIS_URL, SES_TASKS_KEY_PREFIX=key_prefix, **feedback)
    return env


@contextmanager
def serving(env: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """Start the server; yield its URL and the log lines written before it listened."""
    process = subprocess.Popen(CLI, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stderr, selectors.EVENT_READ)
        lines: list[str] = []
        deadline = time.monotonic() + 30
        url = None
        while url is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and selector.select(remaining), f"no start: {lines}"
            line = process.stderr.readline()
            assert line, f"exited {process.wait()}: {lines}"
            lines.append(line)
            match = re.search(r"listening on (http://\S+/)", line)
            url = match.group(1) if match else None
        yield url, lines
    finally:
        process.terminate()
        process.wait(timeout=10)


def post(url: str, envelope: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(envelope).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serve_refuses_to_start_without_an_allow_list(key_prefix):
    result = subprocess.run(
        CLI, env=environment(key_prefix), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "ses-tasks: error: SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS: set the SNS topic ARN(s)"
    )
    assert ALLOW_ANY_TOPIC_ENV in result.stderr


def test_serve_starts_with_an_allow_list_and_refuses_foreign_topics(key_prefix):
    env = environment(key_prefix, **{ALLOWED_TOPIC_ARNS_ENV: DEFAULT_TOPIC_ARN})
    with serving(env) as (url, lines):
        assert not any("WARNING" in line for line in lines)
        with urllib.request.urlopen(url + "health", timeout=10) as response:
            assert response.status == 200
        # refused on its topic alone: the real network fetcher is never reached
        envelope = SnsTestSigner().notification("{}", topic_arn=FOREIGN_TOPIC)
        assert post(url, envelope) == 403


def test_serve_starts_with_the_development_flag_after_a_warning(key_prefix):
    with serving(environment(key_prefix, **{ALLOW_ANY_TOPIC_ENV: "true"})) as (url, lines):
        warnings = [line for line in lines if "WARNING" in line]
        assert len(warnings) == 1 and ALLOW_ANY_TOPIC_ENV in warnings[0]
        with urllib.request.urlopen(url + "health", timeout=10) as response:
            assert response.status == 200
