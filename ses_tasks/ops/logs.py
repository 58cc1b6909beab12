"""Structured logging: campaign and message ids on every line, secrets masked everywhere.

Three pieces, usable separately:

* :func:`log_context` sets ``campaign_id``/``message_id`` in context variables; the task layer
  wraps each task body in one. Context variables follow ``run_coroutine_threadsafe`` onto the
  worker's event loop, so lines logged by the delivery code carry the ids too.
* :class:`ContextFilter` copies those ids onto every record (``-`` when unset), so a plain
  format string can use ``%(campaign_id)s``.
* :class:`RedactingFilter` masks known secrets (SMTP password, IAM secret key) and the
  password part of any ``scheme://user:password@host`` URL in the message, its arguments and
  the formatted traceback, before any handler writes them.

``SES_TASKS_LOG_JSON=1`` switches the worker to :class:`JsonFormatter`: one JSON object per
line with ``ts, level, logger, message, campaign_id, message_id, process`` (and ``exc``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import IO, TYPE_CHECKING, Any

from ses_tasks.keys import TRANSACTIONAL

if TYPE_CHECKING:
    from ses_tasks.config import Settings

__all__ = [
    "MASK",
    "ContextFilter",
    "ContextTextFormatter",
    "JsonFormatter",
    "RedactingFilter",
    "configure_logging",
    "current_ids",
    "install_on",
    "log_context",
    "redact_text",
    "secrets_from_settings",
]

MASK = "***"
#: Shown for an id that is not set, so every line has the same columns.
NO_ID = "-"
TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(processName)s %(name)s "
    "[campaign=%(campaign_id)s message=%(message_id)s] %(message)s"
)
#: Secrets shorter than this are not masked by value: masking "a" would mangle every line.
MIN_SECRET_CHARS = 4

_campaign_id: ContextVar[str | None] = ContextVar("ses_tasks_campaign_id", default=None)
_message_id: ContextVar[str | None] = ContextVar("ses_tasks_message_id", default=None)

# scheme://user:password@host -> scheme://user:***@host (user may be empty: redis://:pw@h)
_URL_PASSWORD_RE = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)")


@contextlib.contextmanager
def log_context(*, campaign_id: str | None = None, message_id: str | None = None) -> Iterator[None]:
    """Every line logged inside carries these ids (nested contexts override, then restore)."""
    tokens = []
    if campaign_id is not None:
        tokens.append((_campaign_id, _campaign_id.set(campaign_id)))
    if message_id is not None:
        tokens.append((_message_id, _message_id.set(message_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_ids() -> tuple[str | None, str | None]:
    """``(campaign_id, message_id)`` of the current context, else of the running Celery task.

    The task fallback covers Celery's own lines about a task ("received", "succeeded in"),
    which it logs outside the task body but while the task's request is current.
    """
    campaign_id, message_id = _campaign_id.get(), _message_id.get()
    if campaign_id is None and message_id is None and "celery" in sys.modules:
        return _celery_task_ids()
    return campaign_id, message_id


#: Task names as in ``ses_tasks.queue.app`` (not imported: it builds a Celery app at import).
_BATCH_TASK = "ses_tasks.send_batch"
_MESSAGE_TASK = "ses_tasks.send_message"


def _celery_task_ids() -> tuple[str | None, str | None]:
    try:
        from celery._state import get_current_task

        task = get_current_task()
        if task is None:
            return None, None
        args = task.request.args or ()
        if task.name == _BATCH_TASK and args:
            return str(args[0]), None
        if task.name == _MESSAGE_TASK and args:
            return TRANSACTIONAL, str(args[0])
    except Exception:  # logging must never fail because of this lookup
        pass
    return None, None


class ContextFilter(logging.Filter):
    """Adds ``campaign_id`` and ``message_id`` to every record (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        campaign_id, message_id = current_ids()
        if not getattr(record, "campaign_id", None):
            record.campaign_id = campaign_id or NO_ID
        if not getattr(record, "message_id", None):
            record.message_id = message_id or NO_ID
        return True


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask URL passwords and every given secret in ``text``."""
    text = _URL_PASSWORD_RE.sub(lambda m: m.group("head") + MASK, text)
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_CHARS and secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Masks secrets in a record before any handler formats it.

    The message is rendered once (``msg % args``), masked, and stored back with no args, so a
    secret passed as an argument is caught too. Tracebacks are formatted and masked here,
    because exception messages (a redis URL in a connection error) are where secrets leak.
    """

    def __init__(self, secrets: Iterable[str] = (), name: str = "") -> None:
        super().__init__(name)
        # Longest first: a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted(set(self.secrets) | {s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the raw text, still masked
            message = str(record.msg)
        record.msg = redact_text(message, self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.secrets)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ids come from :class:`ContextFilter` (or the context)."""

    def format(self, record: logging.LogRecord) -> str:
        campaign_id, message_id = current_ids()
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "campaign_id": _id(getattr(record, "campaign_id", None) or campaign_id),
            "message_id": _id(getattr(record, "message_id", None) or message_id),
            "process": record.process,
            "process_name": record.processName,
        }
        task_id = getattr(record, "task_id", None)
        if task_id and task_id != "???":
            data["task_id"] = task_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return json.dumps(data, default=str, ensure_ascii=False)


class ContextTextFormatter(logging.Formatter):
    """Wraps a text formatter (Celery's) and appends ``[campaign=... message=...]`` to the
    first line of records logged inside a :func:`log_context`."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter(logging.BASIC_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        campaign_id = _id(getattr(record, "campaign_id", None)) or current_ids()[0]
        message_id = _id(getattr(record, "message_id", None)) or current_ids()[1]
        if not campaign_id and not message_id:
            return text
        suffix = f" [campaign={campaign_id or NO_ID} message={message_id or NO_ID}]"
        first, newline, rest = text.partition("\n")
        return first + suffix + newline + rest


def _id(value: str | None) -> str | None:
    return None if value in (None, NO_ID) else value


def secrets_from_settings(settings: Settings) -> list[str]:
    """Every secret a ``Settings`` holds: SMTP password (given or derived), IAM secret key,
    for the unnamed sender and every profile."""
    found: list[str] = []
    for name in settings.profiles:
        with contextlib.suppress(Exception):
            found += secrets_from_settings(settings.for_profile(name))
        with contextlib.suppress(Exception):  # a failover region derives its own password
            failover = settings.failover_for(name)
            if failover is not None:
                found += secrets_from_settings(failover)
    if settings.password is not None:
        found.append(settings.password.get_secret_value())
    if settings.secret_access_key is not None:
        found.append(settings.secret_access_key.get_secret_value())
        with contextlib.suppress(Exception):
            derived = settings.smtp_password()
            if derived:
                found.append(derived)
    return found


def _env_secrets() -> list[str]:
    names = ("SES_TASKS_PASSWORD", "SES_TASKS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")
    found = [os.environ[n] for n in names if os.environ.get(n)]
    for name, value in os.environ.items():  # profiles: SES_TASKS_PROFILES__<P>__PASSWORD...
        upper = name.upper()
        if (
            upper.startswith("SES_TASKS_PROFILES__")
            and upper.endswith(("__PASSWORD", "__SECRET_ACCESS_KEY"))
            and value
        ):
            found.append(value)
    return found


def json_enabled(settings: Settings | None = None) -> bool:
    if settings is not None and settings.log_json:
        return True
    return os.environ.get("SES_TASKS_LOG_JSON", "").strip().lower() in ("1", "true", "yes", "on")


def install_on(
    handlers: Iterable[logging.Handler],
    *,
    secrets: Iterable[str] = (),
    json_format: bool = False,
) -> None:
    """Add the context and redaction filters to ``handlers`` (once), and the JSON formatter.

    Filters sit on handlers, not loggers, so records propagated from any logger pass them.
    """
    secrets = list(secrets)
    for handler in handlers:
        existing = [f for f in handler.filters if isinstance(f, RedactingFilter)]
        if existing:
            existing[0].add_secrets(secrets)
        else:
            handler.addFilter(ContextFilter())
            handler.addFilter(RedactingFilter(secrets))
        if json_format:
            handler.setFormatter(JsonFormatter())
        elif not isinstance(handler.formatter, JsonFormatter | ContextTextFormatter):
            fmt = handler.formatter
            if fmt is None or "campaign_id" not in (getattr(fmt, "_fmt", None) or ""):
                handler.setFormatter(ContextTextFormatter(fmt))


def configure_logging(
    settings: Settings | None = None,
    *,
    level: int | str = logging.INFO,
    json_format: bool | None = None,
    stream: IO[str] | None = None,
    logger: logging.Logger | None = None,
) -> logging.Handler:
    """Give ``logger`` (the root logger by default) one handler with ids and redaction.

    For processes that do not run under Celery (scripts, web apps). JSON when
    ``json_format`` is true, or ``SES_TASKS_LOG_JSON``/``settings.log_json`` say so.
    """
    target = logger or logging.getLogger()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    secrets = _env_secrets() + (secrets_from_settings(settings) if settings else [])
    use_json = json_enabled(settings) if json_format is None else json_format
    install_on([handler], secrets=secrets, json_format=use_json)
    target.addHandler(handler)
    target.setLevel(level)
    return handler


def celery_after_setup_logger(logger: logging.Logger | None = None, **_: Any) -> None:
    """``after_setup_logger``/``after_setup_task_logger`` handler: filters and JSON on the
    handlers Celery installed, secrets from the worker's settings."""
    if logger is None:
        return
    secrets = _env_secrets()
    try:
        from ses_tasks.config import load_settings

        secrets += secrets_from_settings(load_settings())
    except Exception:  # bad settings are reported elsewhere; still mask what we know
        pass
    install_on(logger.handlers, secrets=secrets, json_format=json_enabled())
