"""``ses-tasks feedback serve`` as a real process under uvicorn: a signed notification posted to
it is recorded, its access log carries no query string, HTTPS with --ssl-certfile/--ssl-keyfile,
a clean exit 0 on SIGTERM and SIGINT, exit 1 when the port is taken.

The process is the real CLI; only its network fetcher is replaced (by ``SCRIPT``) with one that
"hosts" the test signer's certificate at ``DEFAULT_CERT_URL``, as ``SnsTestSigner`` does in
process: SNS's certificate host cannot be reached from a test.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ses_tasks.feedback import FeedbackApplier
from ses_tasks.feedback.settings import ALLOWED_TOPIC_ARNS_ENV
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import StatusStore

from ..conftest import REDIS_URL
from ..integration.test_feedback_apply import example, sent_campaign

SCRIPT = """
import os
from ses_tasks.feedback import sns
from ses_tasks.feedback.testing import DEFAULT_CERT_URL
with open(os.environ["TEST_SNS_CERT_PEM"], "rb") as handle:
    PEM = handle.read()
def urllib_fetcher(*, timeout_s=10.0):
    def fetch(url):
        if url != DEFAULT_CERT_URL:
            raise sns.SnsVerificationError("not on the test network", code="cert_fetch")
        return PEM
    return fetch
sns.urllib_fetcher = urllib_fetcher
from ses_tasks.ops.cli import main
main(prog_name="ses-tasks")
"""
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    lines: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Send ``sig``; return the exit status and every stderr line."""
        self.process.send_signal(sig)
        _, rest = self.process.communicate(timeout=STOP_TIMEOUT_S)
        return self.process.returncode, "".join(self.lines) + rest.decode()


def environment(key_prefix: str, tmp_path: Path, signer: SnsTestSigner, **extra: str) -> dict:
    pem = tmp_path / "sns-cert.pem"
    pem.write_bytes(signer.cert_pem)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SES_TASKS_FEEDBACK_")}
    env.update(
        SES_TASKS_REDIS_URL=REDIS_URL,
        SES_TASKS_KEY_PREFIX=key_prefix,
        TEST_SNS_CERT_PEM=str(pem),
        **{ALLOWED_TOPIC_ARNS_ENV: DEFAULT_TOPIC_ARN},
        **extra,
    )
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", SCRIPT, "feedback", "serve", *args]


@contextmanager
def serving(env: dict[str, str], *args: str) -> Iterator[Served]:
    """Start ``feedback serve --port 0 ARGS``; yield once it logged where it listens."""
    process = subprocess.Popen(command("--port", "0", *args), env=env, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        fd = process.stderr.fileno()
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        received = b""
        deadline = time.monotonic() + START_TIMEOUT_S
        match = None
        while match is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and selector.select(remaining), f"no start: {received!r}"
            chunk = os.read(fd, 65536)  # unbuffered: a later line is not hidden in a buffer
            assert chunk, f"exited {process.wait()}: {received!r}"
            received += chunk
            match = re.search(r"listening on (https?://\S+/)", received.decode())
        selector.close()
        yield Served(process, match.group(1), [received.decode()])
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=STOP_TIMEOUT_S)


def test_serve_records_a_signed_notification_and_stops_on_sigterm(
    redis_client, key_prefix, tmp_path
):
    signer = SnsTestSigner()
    store = StatusStore(redis_client, key_prefix=key_prefix)
    sent = sent_campaign(store, "serve1", 3)
    mid, ses = sent["u1@example.com"]
    envelope = signer.notification(example("notification_bounce_dsn", ses, "u1@example.com"))
    body = json.dumps(envelope).encode()
    headers = {"x-amz-sns-message-type": "Notification"}
    cap = 4096
    assert len(body) < cap  # under the cap the settings set
    env = environment(key_prefix, tmp_path, signer, SES_TASKS_FEEDBACK_MAX_BODY_BYTES=str(cap))

    with serving(env) as served:
        url = served.url
        assert url.startswith("http://127.0.0.1:")
        # A subscription URL may carry a token in its query: it must not reach the log.
        response = httpx.post(url + "?token=s3cr3t-t0ken", content=body, headers=headers)
        assert (response.status_code, response.json()) == (200, {"result": "applied"})
        response = httpx.post(url + "sns", content=body, headers=headers)
        assert (response.status_code, response.json()) == (200, {"result": "duplicate"})
        assert httpx.post(url, content=b"x" * (cap + 1)).status_code == 413
        assert httpx.get(url + "health").json() == {"result": "ok"}
        status, log = served.stop(signal.SIGTERM)

    applier = FeedbackApplier(redis_client, key_prefix=key_prefix)
    record = applier.message_feedback(mid)
    assert record is not None and record.feedback == "bounced"
    assert applier.feedback_status("serve1").counts["hard_bounced"] == 1
    assert SuppressionList(redis_client, key_prefix=key_prefix).contains("u1@example.com")
    assert status == 0, log
    assert "feedback receiver stopped" in log
    assert '"POST / HTTP/1.1" 200' in log  # the access log, without its query string
    assert '"POST /sns HTTP/1.1" 200' in log
    assert "s3cr3t" not in log and "t0ken" not in log


def test_serve_stops_cleanly_on_ctrl_c(key_prefix, tmp_path):
    with serving(environment(key_prefix, tmp_path, SnsTestSigner())) as served:
        assert httpx.get(served.url + "health").status_code == 200
        status, log = served.stop(signal.SIGINT)
    assert status == 0, log
    assert "feedback receiver stopped" in log and "interrupted" not in log


def test_serve_over_https(key_prefix, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    env = environment(key_prefix, tmp_path, SnsTestSigner())

    with serving(env, "--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile)) as served:
        assert served.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        response = httpx.get(served.url + "health", verify=context)
        assert (response.status_code, response.json()) == (200, {"result": "ok"})
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
            httpx.get(served.url.replace("https://", "http://") + "health")
        status, log = served.stop()
    assert status == 0, log


def test_serve_exits_1_when_the_port_is_taken(key_prefix, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            command("--port", str(port)),
            env=environment(key_prefix, tmp_path, SnsTestSigner()),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert (
        f"ses-tasks: error: the feedback receiver did not start on 127.0.0.1:{port}"
        in result.stderr
    )


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--ssl-keyfile", "{junk}"], "--ssl-keyfile needs --ssl-certfile"),
        (
            ["--ssl-certfile", "{junk}"],
            "ses-tasks: error: --ssl-certfile: cannot load the certificate and key: ",
        ),
        (["--ssl-certfile", "{missing}"], "Invalid value for '--ssl-certfile'"),
    ],
)
def test_serve_refuses_bad_tls_options(key_prefix, tmp_path, options, error):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a PEM file")
    paths = {"junk": str(junk), "missing": str(tmp_path / "missing.pem")}
    result = subprocess.run(
        command("--port", "0", *(option.format(**paths) for option in options)),
        env=environment(key_prefix, tmp_path, SnsTestSigner()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert error in result.stderr
    assert "listening on" not in result.stderr
