"""Structured logging: ids on every line, JSON option, secrets masked."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import uuid
from collections.abc import Iterator

import pytest

from ses_tasks.config import Settings
from ses_tasks.ops.logs import (
    MASK,
    ContextTextFormatter,
    configure_logging,
    install_on,
    log_context,
    redact_text,
    secrets_from_settings,
)
from ses_tasks.smtp.credentials import smtp_password

PASSWORD = "BPaSsWoRd+smtp/SECRET123="
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger (no propagation) whose handler output we can read."""
    log = logging.getLogger(f"test.logs.{uuid.uuid4().hex}")
    log.propagate = False
    stream = io.StringIO()
    yield log, stream
    for handler in list(log.handlers):
        log.removeHandler(handler)


def test_password_and_url_passwords_are_masked(logger):
    log, stream = logger
    settings = Settings(password=PASSWORD, redis_url="redis://:redispw@cache:6379/0")
    configure_logging(settings, logger=log, stream=stream, json_format=False)

    log.warning("login with %s failed", PASSWORD)
    log.info("broker at amqp://user:brokerpw@rabbit:5672// and %s", settings.redis_url)
    log.error("inline %s password " + PASSWORD, "x")
    out = stream.getvalue()

    assert PASSWORD not in out
    assert "brokerpw" not in out and "redispw" not in out
    assert "amqp://user:***@rabbit:5672//" in out
    assert "redis://:***@cache:6379/0" in out
    assert out.count(MASK) == 4


def test_secret_key_and_derived_smtp_password_are_masked(logger):
    log, stream = logger
    settings = Settings(secret_access_key=SECRET_KEY, region="eu-west-1")
    derived = smtp_password(SECRET_KEY, "eu-west-1")
    assert set(secrets_from_settings(settings)) == {SECRET_KEY, derived}
    configure_logging(settings, logger=log, stream=stream, json_format=True)

    log.info("key=%s password=%s", SECRET_KEY, derived)
    line = json.loads(stream.getvalue())
    assert line["message"] == f"key={MASK} password={MASK}"


def test_secrets_in_tracebacks_are_masked(logger):
    log, stream = logger
    configure_logging(Settings(password=PASSWORD), logger=log, stream=stream, json_format=True)
    try:
        raise ConnectionError(f"AUTH failed for redis://admin:{PASSWORD}@db:6379")
    except ConnectionError:
        log.exception("cannot connect")
    line = json.loads(stream.getvalue())
    assert "ConnectionError" in line["exc"]
    assert PASSWORD not in line["exc"]
    assert "redis://admin:***@db:6379" in line["exc"]


def test_json_lines_carry_ids_from_the_context(logger):
    log, stream = logger
    configure_logging(logger=log, stream=stream, json_format=True)
    log.info("outside")
    with log_context(campaign_id="spring-sale"):
        log.info("batch start")
        with log_context(message_id="spring-sale.7"):
            log.info("sent")
        log.info("batch end")
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]

    assert [(x["message"], x["campaign_id"], x["message_id"]) for x in lines] == [
        ("outside", None, None),
        ("batch start", "spring-sale", None),
        ("sent", "spring-sale", "spring-sale.7"),
        ("batch end", "spring-sale", None),
    ]
    assert all(x["level"] == "INFO" and x["logger"] == log.name for x in lines)
    assert lines[0]["ts"].endswith("Z")


def test_ids_follow_coroutines_onto_the_worker_loop_thread(logger):
    """The worker runs coroutines on a loop thread via run_coroutine_threadsafe."""
    log, stream = logger
    configure_logging(logger=log, stream=stream, json_format=True)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def deliver() -> None:
        log.info("on the loop")

    try:
        with log_context(campaign_id="c1", message_id="c1.0"):
            asyncio.run_coroutine_threadsafe(deliver(), loop).result(timeout=5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
    line = json.loads(stream.getvalue())
    assert (line["campaign_id"], line["message_id"]) == ("c1", "c1.0")


def test_text_mode_has_ids_on_every_line(logger):
    log, stream = logger
    configure_logging(logger=log, stream=stream, json_format=False)
    with log_context(campaign_id="c9", message_id="c9.1"):
        log.info("hello")
    log.info("bye")
    first, second = stream.getvalue().splitlines()
    assert "[campaign=c9 message=c9.1] hello" in first
    assert "[campaign=- message=-] bye" in second


def test_install_on_wraps_a_foreign_formatter_once(logger):
    """Celery's handlers: keep its format, append the ids, add filters only once."""
    log, stream = logger
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    log.addHandler(handler)
    install_on([handler], secrets=[PASSWORD])
    install_on([handler], secrets=["another-secret"])
    assert isinstance(handler.formatter, ContextTextFormatter)
    assert len(handler.filters) == 2

    with log_context(campaign_id="c2"):
        log.warning("pw %s and another-secret", PASSWORD)
    assert stream.getvalue() == f"[WARNING] pw {MASK} and {MASK} [campaign=c2 message=-]\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:p%40ss@h/1", "rediss://user:***@h/1"),
        ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("see http://example.com:8080/path", "see http://example.com:8080/path"),
        ("two: redis://a:b@h1 amqp://c:d@h2", "two: redis://a:***@h1 amqp://c:***@h2"),
    ],
)
def test_redact_text_urls(text, expected):
    assert redact_text(text) == expected


def test_short_secrets_are_not_masked_by_value():
    """A one-character 'secret' would otherwise mangle every line."""
    assert redact_text("a b c", ["a"]) == "a b c"
    assert redact_text("token abcd", ["abcd"]) == f"token {MASK}"


def test_ids_of_the_running_celery_task_when_no_context(logger):
    """Celery logs "Task ... succeeded" outside the task body, with the request current."""
    from celery import Celery

    app = Celery("logs-test", set_as_current=False)

    @app.task(name="ses_tasks.send_batch", bind=True)
    def send_batch(self, campaign_id, items):
        return None

    @app.task(name="ses_tasks.send_message", bind=True)
    def send_message(self, message_id, spec, failures=0):
        return None

    log, stream = logger
    configure_logging(logger=log, stream=stream, json_format=True)
    from celery._state import _task_stack

    for task, args in ((send_batch, ("camp-1", [])), (send_message, ("transactional.ab", {}))):
        task.push_request(args=args)
        _task_stack.push(task)
        try:
            log.info("inside %s", task.name)
        finally:
            _task_stack.pop()
            task.pop_request()
    log.info("after")
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["campaign_id"], x["message_id"]) for x in lines] == [
        ("camp-1", None),
        ("transactional", "transactional.ab"),
        (None, None),
    ]
