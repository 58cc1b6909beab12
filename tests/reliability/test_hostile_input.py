"""Hostile input through the public API and the CLI: every case refused with its exact reason.

One table per entry point. A refused single message never reaches the queue; a refused
campaign template or recipient file never creates the campaign; bad rows of a good file
are recorded ``failed`` with their reason while the good rows are sent.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from ses_tasks.config import Settings
from ses_tasks.errors import ConfigurationError, ValidationError
from ses_tasks.produce.client import SesTasks

from ..conftest import REDIS_URL
from .support import adds_up

MAX_BYTES = 1_000_000
BASE: dict[str, Any] = {
    "from_": "news@example.com",
    "to": ["a@example.com"],
    "subject": "Hi",
    "text": "Hello",
}
INJECT = "\r\nBcc: evil@example.net"
HEADER_INJECTION = "contains CR or LF (header injection is refused)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# (case id, fields over BASE, the exact error)
SEND_EMAIL_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("subject-crlf", {"subject": "Hi" + INJECT}, f"subject: {HEADER_INJECTION}"),
    ("subject-lf", {"subject": "Hi\nBcc: evil@example.net"}, f"subject: {HEADER_INJECTION}"),
    ("subject-cr", {"subject": "Hi\rBcc: evil@example.net"}, f"subject: {HEADER_INJECTION}"),
    ("from-crlf", {"from_": "news@example.com" + INJECT}, f"from: {HEADER_INJECTION}"),
    (
        "from-display-name-crlf",
        {"from_": "News" + INJECT + " <news@example.com>"},
        f"from: {HEADER_INJECTION}",
    ),
    (
        "header-value-crlf",
        {"headers": {"X-Campaign": "a" + INJECT}},
        f"headers.X-Campaign: {HEADER_INJECTION}",
    ),
    (
        "header-name-crlf",
        {"headers": {"X-A\r\nBcc": "evil@example.net"}},
        f"headers.X-A\r\nBcc: {HEADER_INJECTION}",
    ),
    (
        "header-name-colon",
        {"headers": {"X-A: b": "c"}},
        "headers.X-A: b: is not a valid header name (printable ASCII without spaces or ':')",
    ),
    (
        "header-reserved-bcc",
        {"headers": {"Bcc": "evil@example.net"}},
        "headers.Bcc: is set by ses-tasks; use the matching message field instead",
    ),
    (
        "header-reserved-x-ses",
        {"headers": {"X-SES-SOURCE-ARN": "arn:aws:ses:x"}},
        "headers.X-SES-SOURCE-ARN: is set by ses-tasks; use the matching message field instead",
    ),
    (
        "reply-to-lf",
        {"reply_to": ["a@example.com\nBcc: evil@example.net"]},
        f"reply_to[0]: {HEADER_INJECTION}",
    ),
    (
        "to-invalid",
        {"to": ["not-an-address"]},
        "to[0]: not a valid email address: An email address must have an @-sign.",
    ),
    (
        "to-double-at",
        {"to": ["a@@example.com"]},
        "to[0]: not a valid email address: The part after the @-sign contains invalid "
        "characters: '@'.",
    ),
    (
        "to-non-ascii-local-part",
        {"to": ["josé@example.com"]},
        "to[0]: non-ASCII characters before the @ are refused (SES needs 7-bit addresses)",
    ),
    ("to-nul", {"to": ["a@example.com\x00"]}, "to[0]: contains a NUL character"),
    (
        "to-unbalanced-bracket",
        {"to": ["<a@example.com"]},
        "to[0]: not a valid email address: unbalanced '<' or '>'",
    ),
    (
        "51-recipients",
        {"to": [f"r{i}@example.com" for i in range(51)]},
        "to: 51 recipients (to + cc + bcc); SES accepts at most 50 per message",
    ),
    (
        "51-recipients-to-and-cc",
        {
            "to": [f"r{i}@example.com" for i in range(26)],
            "cc": [f"c{i}@example.com" for i in range(25)],
        },
        "to: 51 recipients (to + cc + bcc); SES accepts at most 50 per message",
    ),
    ("no-recipients", {"to": []}, "to: at least one recipient (to, cc or bcc) is required"),
    (
        "text-lone-surrogate",
        {"text": "bad \ud800 text"},
        "text: contains a lone surrogate (not valid Unicode text)",
    ),
    ("no-body", {"text": None}, "text: a message needs a text or an html body (or both)"),
    (
        "oversized-message",
        {"text": "x" * 1_100_000},
        "message: rendered message is 1,144,264 bytes, over the limit of 1,000,000 bytes",
    ),
    (
        "oversized-attachment",
        {"attachments": [{"filename": "a.bin", "content_b64": _b64(b"x" * 900_000)}]},
        "attachments[0]: 'a.bin' is 1,231,578 bytes once encoded, over the message limit of "
        "1,000,000 bytes",
    ),
    (
        "attachment-path-traversal",
        {"attachments": [{"filename": "../../etc/passwd", "content_b64": "eA=="}]},
        "attachments[0].filename: must be a bare file name, without '/' or '\\'",
    ),
    (
        "attachment-filename-crlf",
        {"attachments": [{"filename": "a\r\n.txt", "content_b64": "eA=="}]},
        f"attachments[0].filename: {HEADER_INJECTION}",
    ),
    (
        "attachment-bad-base64",
        {"attachments": [{"filename": "a.txt", "content_b64": "!!!"}]},
        "attachments[0].content_b64: is not valid base64 (Only base64 data is allowed)",
    ),
    (
        "attachment-multipart",
        {
            "attachments": [
                {"filename": "a.eml", "content_type": "multipart/mixed", "content_b64": "eA=="}
            ]
        },
        "attachments[0].content_type: multipart/* cannot be attached as base64; use application/*",
    ),
    (
        "tag-name",
        {"tags": {"bad tag": "x"}},
        "tags.bad tag: tag names may only contain ASCII letters, digits, '_' and '-'",
    ),
    (
        "tag-value",
        {"tags": {"campaign": "spring sale!"}},
        "tags.campaign: tag values must be 1+ ASCII letters, digits, '_' or '-'",
    ),
    (
        "tag-value-crlf",
        {"tags": {"campaign": "a" + INJECT}},
        "tags.campaign: tag values must be 1+ ASCII letters, digits, '_' or '-'",
    ),
    (
        "configuration-set-name",
        {"configuration_set": "bad set!"},
        "configuration_set: must be 1 to 64 ASCII letters, digits, '_' or '-'",
    ),
    (
        "configuration-set-too-long",
        {"configuration_set": "x" * 65},
        "configuration_set: must be 1 to 64 ASCII letters, digits, '_' or '-'",
    ),
    (
        "unsubscribe-not-https",
        {"list_unsubscribe_url": "http://example.com/u"},
        "list_unsubscribe_url: must be an https:// URL with a host (RFC 8058)",
    ),
    (
        "unsubscribe-crlf",
        {"list_unsubscribe_url": "https://example.com/u" + INJECT},
        f"list_unsubscribe_url: {HEADER_INJECTION}",
    ),
    (
        "idempotency-key-newline",
        {"idempotency_key": "k\n1"},
        "idempotency_key: must be 1 to 128 printable ASCII characters",
    ),
    ("unknown-field", {"bcc_all": True}, "bcc_all: unknown field"),
]


@pytest.fixture
def client(key_prefix: str) -> SesTasks:
    return SesTasks(
        Settings(
            host="localhost",
            port=2465,
            mode="tls",
            redis_url=REDIS_URL,
            broker_url=REDIS_URL,
            key_prefix=key_prefix,
            max_message_bytes=MAX_BYTES,
        )
    )


def _keys(key_prefix: str) -> list[bytes]:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        return list(r.scan_iter(match=f"{key_prefix}:*"))
    finally:
        r.close()


@pytest.mark.parametrize(
    ("fields", "expected"), [c[1:] for c in SEND_EMAIL_CASES], ids=[c[0] for c in SEND_EMAIL_CASES]
)
def test_send_email_refuses_with_the_exact_reason(client, key_prefix, fields, expected):
    with pytest.raises(ValidationError) as info:
        client.send_email(**{**BASE, **fields})
    assert str(info.value) == expected
    assert _keys(key_prefix) == [], "a refused message must not be recorded or enqueued"


def test_idn_domain_is_sent_as_punycode(client):
    spec = client.build_message(**{**BASE, "to": ["user@bücher.example"]})
    from ses_tasks.message.spec import render_message

    assert render_message(spec).recipients == ["user@xn--bcher-kva.example"]


# Campaign templates and recipient files refused before the campaign exists ------------------

TEMPLATE = {"from_": "news@example.com", "subject": "Hi {{ name }}", "text": "Hello {{ name }}"}

CAMPAIGN_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "subject-syntax-error",
        {"subject": "Hi {{ name"},
        "template.subject: line 1: unexpected end of template, expected 'end of print statement'.",
    ),
    (
        "text-syntax-error",
        {"text": "{% for %}"},
        "template.text: line 1: Expected an expression, got 'end of statement block'",
    ),
    ("html-syntax-error", {"html": "<p>{{ name }</p>"}, "template.html: line 1: unexpected '}'"),
    (
        "unknown-filter",
        {"text": "{{ name | nosuchfilter }}"},
        "template.text: line 1: No filter named 'nosuchfilter'.",
    ),
    (
        "template-tag-name",
        {"tags": {"bad tag": "x"}},
        "template.tags.bad tag: tag names may only contain ASCII letters, digits, '_' and '-'",
    ),
    (
        "template-configuration-set",
        {"configuration_set": "bad set!"},
        "template.configuration_set: must be 1 to 64 ASCII letters, digits, '_' or '-'",
    ),
    (
        "template-from-crlf",
        {"from_": "news@example.com" + INJECT},
        f"template.from: {HEADER_INJECTION}",
    ),
]

FILE_CASES: list[tuple[str, str, bytes, str]] = [
    (
        "no-email-column",
        "list.csv",
        b"name,city\nA,B\n",
        "recipients: no 'email' column in the CSV header (found: name, city)",
    ),
    ("empty-file", "list.csv", b"", "recipients: the file is empty"),
    (
        "wrong-suffix",
        "list.txt",
        b"email\na@example.com\n",
        "recipients: list.txt: use a .csv or .jsonl file",
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"), [c[1:] for c in CAMPAIGN_CASES], ids=[c[0] for c in CAMPAIGN_CASES]
)
def test_send_campaign_refuses_a_bad_template(client, key_prefix, fields, expected):
    with pytest.raises(ValidationError) as info:
        client.send_campaign(**{**TEMPLATE, **fields}, recipients=["a@example.com"])
    assert str(info.value) == expected
    assert _keys(key_prefix) == []


@pytest.mark.parametrize(
    ("name", "content", "expected"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_send_campaign_refuses_a_file_that_is_no_recipient_list(
    client, key_prefix, tmp_path, name, content, expected
):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValidationError) as info:
        client.send_campaign(**TEMPLATE, recipients=path, campaign_id="nolist")
    assert str(info.value) == expected
    assert _keys(key_prefix) == []


# Bad rows and sandbox escapes: the campaign goes on for the good rows ----------------------

BIG = "x" * (1024 * 1024 + 10)
#: Rows of one CSV (BOM first), and what each must end as: ("sent", None) or the reason.
CSV_LINES: list[tuple[bytes, str, str | None]] = [
    (b"good0@example.com,Good 0,plain\n", "sent", None),
    (b'"good1@example.com","Multi","line one\nline two"\n', "sent", None),  # quoted newline
    (
        b'inject@example.com,"X\r\nBcc: evil@example.net",n\n',
        "failed",
        f"template.subject: {HEADER_INJECTION}",
    ),
    (
        b"not-an-address,N,n\n",
        "failed",
        "to: not a valid email address: An email address must have an @-sign.",
    ),
    (
        "josé@example.com,N,n\n".encode(),
        "failed",
        "to: non-ASCII characters before the @ are refused (SES needs 7-bit addresses)",
    ),
    ("idn@bücher.example,IDN,n\n".encode(), "sent", None),
    (
        b"big@example.com,Big," + BIG.encode() + b"\n",
        "failed",
        "row 10: field larger than field limit (1048576)",
    ),
    ("latin1@example.com,Jos\xe9,n\n".encode("latin-1"), "failed", "line 11: not valid UTF-8"),
    (b"few@example.com,OnlyName\n", "failed", "row 12: 2 fields, header has 3"),
    (
        b'"crlf@example.com\r\nBcc: evil@example.net",C,n\n',
        "failed",
        "row 14: the email value has invalid characters",
    ),
    (b"good2@example.com,Good 2,last\n", "sent", None),
]
JSONL_LINES: list[tuple[bytes, str, str | None]] = [
    (b'{"email": "j0@example.com", "name": "J"}\n', "sent", None),
    (b"not json\n", "failed", "line 2: not JSON (Expecting value)"),
    (b"[1, 2]\n", "failed", "line 3: expected a JSON object"),
    (b'{"name": "no email"}\n', "failed", "row 4: no value in the 'email' column"),
    (b'{"email": "j4@example.com"}\n', "failed", "template.subject: 'name' is undefined"),
    # A variable is data, never a template: this goes out literally.
    (b'{"email": "j5@example.com", "name": "{{ 7 * 7 }}"}\n', "sent", None),
    (
        '{"email": "j6@example.com", "name": "Jos\xe9"}\n'.encode("latin-1"),
        "failed",
        "line 7: not valid UTF-8",
    ),
]
ESCAPES: list[tuple[str, str]] = [
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe."),
    (
        "{{ ().__class__.__bases__[0].__subclasses__() }}",
        "access to attribute '__class__' of 'tuple' object is unsafe.",
    ),
    (
        "{{ self.__init__.__globals__ }}",
        "access to attribute '__init__' of 'TemplateReference' object is unsafe.",
    ),
    (
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "access to attribute '__init__' of 'type' object is unsafe.",
    ),
    (
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "access to attribute '__globals__' of 'function' object is unsafe.",
    ),
    (
        "{% set x = joiner.__init__.__globals__ %}{{ x }}",
        "access to attribute '__init__' of 'type' object is unsafe.",
    ),
    (
        "{{ name.__class__.__base__.__subclasses__() }}",
        "access to attribute '__class__' of 'str' object is unsafe.",
    ),
    (
        "{{ name.format.__globals__ }}",
        "access to attribute '__globals__' of 'function' object is unsafe.",
    ),
    ("{{ config.items() }}", "'config' is undefined"),
    ("{{ 'x' * 100000000 }}", "repeated value too large"),
    ("{{ 9 ** 99999 }}", "exponent too large"),
    (
        "{{ range(10**9)|list|length }}",
        "OverflowError: Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).",
    ),
]


def _outcomes(client: SesTasks, campaign_id: str, expected: list[tuple[str, str | None]]) -> None:
    status = client.campaign_status(campaign_id)
    assert status.total == len(expected) and adds_up(status), status.to_dict()
    for seq, (state, reason) in enumerate(expected):
        record = client.message_status(f"{campaign_id}.{seq}")
        assert record is not None
        assert record.state.value == state, (seq, record)
        if reason is not None:
            assert record.reason == reason, (seq, record)
    failures = {r.message_id: r.reason for r in client.failures(campaign_id)}
    assert failures == {
        f"{campaign_id}.{seq}": reason
        for seq, (state, reason) in enumerate(expected)
        if state != "sent"
    }


def test_bad_rows_fail_with_their_reason_and_good_rows_are_sent(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    csv_path = tmp_path / "list.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfemail,name,note\n" + b"".join(r[0] for r in CSV_LINES))
    jsonl_path = tmp_path / "list.jsonl"
    jsonl_path.write_bytes(b"".join(r[0] for r in JSONL_LINES))
    for campaign_id, path in (("rows-csv", csv_path), ("rows-jsonl", jsonl_path)):
        client.send_campaign(
            from_="news@example.com",
            subject="Hi {{ name }}",
            text="Hello {{ name }}: {{ note | default('') }}",
            recipients=path,
            campaign_id=campaign_id,
        )
    for i, (source, _) in enumerate(ESCAPES):
        client.send_campaign(
            from_="news@example.com",
            subject="Escape",
            text=source,
            recipients=[{"email": f"esc{i}@example.com", "name": "N"}],
            campaign_id=f"escape-{i}",
        )
    pipeline.wait_done("rows-csv")
    pipeline.wait_done("rows-jsonl")
    _outcomes(client, "rows-csv", [(s, r) for _, s, r in CSV_LINES])
    _outcomes(client, "rows-jsonl", [(s, r) for _, s, r in JSONL_LINES])
    for i, (_, reason) in enumerate(ESCAPES):
        pipeline.wait_done(f"escape-{i}")
        _outcomes(client, f"escape-{i}", [("failed", f"template.text: {reason}")])
    sent = sum(1 for _, s, _ in CSV_LINES + JSONL_LINES if s == "sent")
    accepted = pipeline.accepted(at_least=sent)
    by_rcpt = {m["rcpt_tos"][0]: m for m in accepted}
    assert set(by_rcpt) == {
        "good0@example.com",
        "good1@example.com",
        "idn@xn--bcher-kva.example",
        "good2@example.com",
        "j0@example.com",
        "j5@example.com",
    }
    assert "Subject: Hi {{ 7 * 7 }}" in by_rcpt["j5@example.com"]["data"]
    assert "Bcc" not in "".join(m["data"] for m in accepted)
    assert pipeline.workers[0].alive(), "nothing crashes"


# The CLI: exit status 2 and one line on stderr ----------------------------------------------

CAMPAIGN = ["campaign", "send", "--from", "a@example.com"]
CLI_CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    (
        "send-subject-crlf",
        ["send", "--from", "a@example.com", "--to", "b@example.com", "--subject", "Hi" + INJECT],
        {},
        f"subject: {HEADER_INJECTION}",
    ),
    (
        "send-51-recipients",
        ["send", "--from", "a@example.com", "--subject", "Hi"]
        + [arg for i in range(51) for arg in ("--to", f"r{i}@example.com")],
        {},
        "to: 51 recipients (to + cc + bcc); SES accepts at most 50 per message",
    ),
    (
        "send-non-ascii-local-part",
        ["send", "--from", "a@example.com", "--to", "josé@example.com", "--subject", "Hi"],
        {},
        "to[0]: non-ASCII characters before the @ are refused (SES needs 7-bit addresses)",
    ),
    (
        "campaign-no-email-column",
        [*CAMPAIGN, "--subject", "Hi", "--recipients", "@noemail"],
        {},
        "recipients: no 'email' column in the CSV header (found: name, city)",
    ),
    (
        "campaign-empty-file",
        [*CAMPAIGN, "--subject", "Hi", "--recipients", "@empty"],
        {},
        "recipients: the file is empty",
    ),
    (
        "campaign-template-syntax",
        [*CAMPAIGN, "--subject", "Hi {{ name", "--recipients", "@good"],
        {},
        "template.subject: line 1: unexpected end of template, expected 'end of print "
        "statement'.",
    ),
    (
        "campaign-bad-tag",
        [
            "campaign", "send", "--from", "a@example.com", "--subject", "Hi",
            "--recipients", "@good", "--tag", "bad tag=x",
        ],
        {},
        "template.tags.bad tag: tag names may only contain ASCII letters, digits, '_' and '-'",
    ),
    (
        "configuration-set-setting",
        ["campaign", "status", "x"],
        {"SES_TASKS_CONFIGURATION_SET": "bad set!"},
        "CONFIGURATION_SET: a configuration set name is 1-64 ASCII letters, digits, '_' or '-'",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "expected"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_refuses_with_one_line(tmp_path, key_prefix, args, env, expected):
    files = {
        "noemail": (tmp_path / "noemail.csv", b"name,city\nA,B\n"),
        "empty": (tmp_path / "empty.csv", b""),
        "good": (tmp_path / "good.csv", b"email,name\na@example.com,A\n"),
    }
    for path, content in files.values():
        path.write_bytes(content)
    (tmp_path / "body.txt").write_text("Hello")
    argv = [str(files[a[1:]][0]) if a in ("@noemail", "@empty", "@good") else a for a in args]
    if argv[0] == "send" or argv[:2] == ["campaign", "send"]:
        argv += ["--text", str(tmp_path / "body.txt")]
    result = subprocess.run(
        [sys.executable, "-m", "ses_tasks.ops.cli", *argv],
        env={
            **os.environ,
            "SES_TASKS_REDIS_URL": REDIS_URL,
            "SES_TASKS_BROKER_URL": REDIS_URL,
            "SES_TASKS_KEY_PREFIX": key_prefix,
            "SES_TASKS_HOST": "localhost",
            "SES_TASKS_PORT": "2465",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"ses-tasks: error: {expected}\n"
    assert result.stdout == ""
    assert _keys(key_prefix) == []


def test_configuration_set_setting_is_refused_by_settings():
    from ses_tasks.config import load_settings

    with pytest.raises(ConfigurationError) as info:
        load_settings(configuration_set="bad\r\nBcc: x")
    assert str(info.value) == (
        "CONFIGURATION_SET: a configuration set name is 1-64 ASCII letters, digits, '_' or '-'"
    )
