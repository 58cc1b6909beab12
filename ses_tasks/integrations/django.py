"""Django ``EMAIL_BACKEND`` that enqueues mail for the ses-tasks workers.

    EMAIL_BACKEND = "ses_tasks.integrations.django.EmailBackend"
    SES_TASKS = {"region": "eu-west-1", "redis_url": "redis://cache:6379/0"}  # optional

``SES_TASKS`` keys are our setting names in lower case (``SES_TASKS_REDIS_URL`` ->
``redis_url``); anything not given there comes from the ``SES_TASKS_*`` environment.
``send_messages`` returns how many messages were enqueued, not delivered: delivery happens
in the workers, and each message's handle is left on it as ``message.ses_tasks_result``
(a Celery ``AsyncResult`` whose id is the message id).

Delivery events (sent, bounced, complained ...) arrive as Django signals
(``ses_tasks.integrations.django.signals``) with the hook ``send_signals`` in
``SES_TASKS_EVENT_HOOKS``; see ``docs/events.md``.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import threading
from collections.abc import Sequence
from email.message import MIMEPart
from email.mime.base import MIMEBase
from typing import Any

from django.conf import settings as django_settings
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend

from ses_tasks.config import load_settings
from ses_tasks.errors import SesTasksError, ValidationError
from ses_tasks.message.spec import Alternative, Attachment
from ses_tasks.produce.client import SesTasks

__all__ = ["EmailBackend", "message_fields", "send_signals", "signals"]

DEFAULT_ATTACHMENT_TYPE = "application/octet-stream"
#: Headers Django lets callers override that ses-tasks writes itself; dropped silently.
GENERATED_HEADERS = frozenset({"message-id", "date", "mime-version"})
#: Headers that would change recipients or sender only in the header, not the envelope.
ADDRESS_HEADERS = frozenset({"from", "to", "cc", "bcc"})

log = logging.getLogger(__name__)

_clients: dict[str, SesTasks] = {}
_clients_lock = threading.Lock()


def _client_for(options: dict[str, Any]) -> SesTasks:
    """One client per distinct ``SES_TASKS`` dict: Django builds a backend per send_mail()."""
    key = json.dumps(options, sort_keys=True, default=str)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = SesTasks(load_settings(**options))
            _clients[key] = client
        return client


def _header_addresses(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _attachment(item: Any, index: int) -> Attachment:
    field = f"attachments[{index}]"
    try:
        if isinstance(item, (MIMEBase, MIMEPart)):
            return _mime_attachment(item, field)
        try:
            filename, content, mimetype = item
        except (TypeError, ValueError):
            raise ValidationError(field, "expected (filename, content, mimetype)") from None
        if not filename:
            raise ValidationError(field, "needs a filename")
        if isinstance(content, EmailMessage):
            raise ValidationError(field, "attached emails (message/rfc822) are not supported")
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        if not mimetype:
            mimetype = mimetypes.guess_type(filename)[0] or DEFAULT_ATTACHMENT_TYPE
        content_type = str(mimetype).split(";", 1)[0].strip()
        return Attachment.from_bytes(str(filename), data, content_type=content_type)
    except ValidationError as exc:
        if exc.field == field or exc.field.startswith(field + "."):
            raise
        raise ValidationError(f"{field}.{exc.field}", exc.problem) from None


def _mime_attachment(item: MIMEBase | MIMEPart, field: str) -> Attachment:
    """A MIME part given to ``attach()``: an attachment, or an inline part (``cid:``).

    A part with a ``Content-ID`` and no ``Content-Disposition: attachment`` is inline: it
    goes into ``multipart/related`` with the html body, as mail readers expect.
    """
    filename = item.get_filename()
    raw_cid = item.get("Content-ID")
    content_id = None if raw_cid is None else str(raw_cid).strip()
    disposition = item.get_content_disposition()
    if not filename and not content_id:
        raise ValidationError(
            field, "a MIME part needs a filename or a Content-ID (for an inline image)"
        )
    payload = item.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise ValidationError(field, f"{item.get_content_type()} parts cannot be attached")
    inline = disposition == "inline" or (disposition is None and content_id is not None)
    return Attachment.from_bytes(
        filename or None,
        payload,
        content_type=item.get_content_type(),
        content_id=content_id,
        inline=inline,
    )


def _alternative_type(mimetype: str) -> tuple[str, dict[str, str]]:
    """``"text/calendar; method=REQUEST"`` -> ``("text/calendar", {"method": "REQUEST"})``.

    The charset parameter is dropped: ses-tasks always sends text as UTF-8.
    """
    content_type, *raw_params = str(mimetype).split(";")
    params: dict[str, str] = {}
    for raw in raw_params:
        name, _, value = raw.partition("=")
        name, value = name.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name and name.lower() != "charset":
            params[name] = value
    return content_type.strip().lower(), params


def _add_alternatives(message: EmailMessage, fields: dict[str, Any]) -> None:
    """Django's alternatives, in Django's order, as ``html``/``text``/``alternatives``.

    One text/plain and one text/html body at most (the text/plain part always goes
    first); other text/* types keep their place relative to the html part.
    """
    extra: list[Alternative] = []
    for index, alternative in enumerate(getattr(message, "alternatives", None) or []):
        field = f"alternatives[{index}]"
        content, mimetype = alternative[0], alternative[1]
        content_type, params = _alternative_type(mimetype)
        major = content_type.partition("/")[0]
        if major in ("multipart", "message"):
            raise ValidationError(
                field,
                f"{content_type} cannot be carried as an alternative (send one body per type)",
            )
        if major != "text":
            raise ValidationError(
                field,
                f"only text/* alternatives (text/html, text/calendar, ...) are supported, "
                f"not {content_type}; attach other content instead",
            )
        if isinstance(content, bytes):
            try:
                content = content.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationError(field, "bytes content must be UTF-8 text") from None
        if content_type in ("text/plain", "text/html"):
            key = "text" if content_type == "text/plain" else "html"
            if fields.get(key) is not None:
                raise ValidationError(
                    field,
                    f"a second {content_type} body is ambiguous (the message already has one)",
                )
            fields[key] = str(content)
            continue
        try:
            extra.append(
                Alternative(
                    content_type=content_type,
                    content=str(content),
                    params=params,
                    after_html=fields.get("html") is not None,
                )
            )
        except ValidationError as exc:
            raise ValidationError(f"{field}.{exc.field}", exc.problem) from None
    if extra:
        fields["alternatives"] = extra


def message_fields(message: EmailMessage) -> dict[str, Any]:
    """A Django ``EmailMessage``/``EmailMultiAlternatives`` as ``SesTasks.send_email`` fields.

    Raises ``ValidationError`` for what SES mail from ses-tasks cannot carry: non-text,
    multipart or message alternatives, a second text/plain or text/html alternative, MIME
    parts with neither a filename nor a Content-ID, attached emails.
    """
    fields: dict[str, Any] = {
        "from": message.from_email or django_settings.DEFAULT_FROM_EMAIL,
        "to": list(message.to),
        "cc": list(message.cc),
        "bcc": list(message.bcc),
        "reply_to": list(message.reply_to),
        "subject": str(message.subject),
    }
    body = str(message.body) if message.body else None
    if message.content_subtype == "html":
        fields["html"] = body
    else:
        fields["text"] = body
    _add_alternatives(message, fields)
    if fields.get("text") is None and fields.get("html") is None:
        fields["text"] = ""

    headers: dict[str, str] = {}
    tags: dict[str, str] = {}
    for name, value in (message.extra_headers or {}).items():
        lower = name.lower()
        if lower in GENERATED_HEADERS:
            continue
        if lower == "reply-to":
            if not fields["reply_to"]:
                fields["reply_to"] = _header_addresses(str(value))
            continue
        if lower in ADDRESS_HEADERS:
            raise ValidationError(
                f"headers.{name}", "set from_email/to/cc/bcc instead (the envelope must match)"
            )
        if lower == "x-ses-configuration-set":
            fields["configuration_set"] = str(value)
        elif lower == "x-ses-message-tags":
            for pair in str(value).split(","):
                tag, _, tag_value = pair.strip().partition("=")
                tags[tag.strip()] = tag_value.strip()
        else:
            headers[name] = str(value)
    if headers:
        fields["headers"] = headers
    if tags:
        fields["tags"] = tags
    if message.attachments:
        fields["attachments"] = [_attachment(a, i) for i, a in enumerate(message.attachments)]
    # `message.metadata = {...}` (as with django-anymail) comes back in delivery events.
    metadata = getattr(message, "metadata", None)
    if metadata is not None:
        fields["metadata"] = metadata
    return fields


class EmailBackend(BaseEmailBackend):
    """Enqueues each message on the transactional queue; the workers send it through SES."""

    def __init__(
        self, fail_silently: bool = False, *, client: SesTasks | None = None, **kwargs: Any
    ) -> None:
        super().__init__(fail_silently=fail_silently)
        self._client = client
        self._options = {k.lower(): v for k, v in (kwargs.pop("ses_tasks", None) or {}).items()}

    @property
    def client(self) -> SesTasks:
        if self._client is None:
            options = {
                str(k).lower(): v
                for k, v in (getattr(django_settings, "SES_TASKS", None) or {}).items()
            }
            self._client = _client_for({**options, **self._options})
        return self._client

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        if not email_messages:
            return 0
        try:
            client = self.client
        except SesTasksError:
            if self.fail_silently:
                return 0
            raise
        sent = 0
        for message in email_messages:
            if not message.recipients():
                continue
            try:
                try:
                    result = client.send_email(**message_fields(message))
                except ValidationError as exc:
                    raise _explained(exc, message) from None
                except SesTasksError:
                    raise
                except Exception as exc:  # the broker or Redis is unreachable
                    raise SesTasksError(
                        f"cannot enqueue the message ({type(exc).__name__}); "
                        "check SES_TASKS_BROKER_URL and SES_TASKS_REDIS_URL"
                    ) from exc
            except SesTasksError as exc:
                if not self.fail_silently:
                    raise
                # Django's mail_admins/AdminEmailHandler send with fail_silently=True: say
                # why the mail was dropped rather than drop it without a word.
                log.warning(
                    "email %r to %d recipients not sent: %s",
                    str(message.subject)[:80],
                    len(message.recipients()),
                    exc,
                )
                continue
            message.ses_tasks_result = result  # type: ignore[attr-defined]
            sent += 1
        return sent


def _explained(exc: ValidationError, message: EmailMessage) -> ValidationError:
    """Name Django's placeholder senders: SES only sends from verified identities."""
    sender = str(message.from_email or django_settings.DEFAULT_FROM_EMAIL)
    if exc.field == "from" and sender.rsplit("@", 1)[-1].lower().rstrip(">") == "localhost":
        setting = (
            "SERVER_EMAIL"
            if sender == getattr(django_settings, "SERVER_EMAIL", "")
            else ("DEFAULT_FROM_EMAIL")
        )
        return ValidationError(
            "from",
            f"{sender!r} is Django's default {setting}; set {setting} to an address or "
            "domain verified in SES",
        )
    return exc


# Delivery events as Django signals --------------------------------------------------------
#
# SES_TASKS_EVENT_HOOKS=ses_tasks.integrations.django.send_signals (in the web process that
# receives SES feedback and in the workers, with DJANGO_SETTINGS_MODULE set: the worker sets
# Django up before importing the hooks, so receivers connected in AppConfig.ready() are
# there). Each event is sent on its type's signal, then on ``delivery_event``:
#
#     from ses_tasks.integrations.django import signals
#
#     @receiver(signals.bounced)
#     def on_bounce(sender, event, **kwargs):
#         Subscriber.objects.filter(pk=event["metadata"].get("subscriber_id")).update(
#             bounced=True)


class _Signals:
    """One ``django.dispatch.Signal`` per event type (``signals.bounced`` ...) and the
    catch-all ``signals.delivery_event``; receivers get ``sender`` (the ``EmailBackend``
    class) and ``event`` (the event dict, see ``ses_tasks.events``)."""

    def __init__(self) -> None:
        from django.dispatch import Signal

        from ses_tasks.events import EVENT_TYPES

        self.types = EVENT_TYPES
        self.sent = Signal()
        self.failed = Signal()
        self.unknown = Signal()
        self.suppressed = Signal()
        self.delivered = Signal()
        self.bounced = Signal()
        self.complained = Signal()
        self.delayed = Signal()
        self.rejected = Signal()
        self.delivery_event = Signal()

    def __iter__(self) -> Any:
        return iter((*self.types, "delivery_event"))


signals = _Signals()


def send_signals(event: dict[str, Any]) -> None:
    """The event hook that sends ``event`` on ``signals.<type>`` and ``delivery_event``.

    Every receiver runs even if one raises; the first error is raised afterwards, so the
    hook failure is logged and counted (``ses_tasks_event_hook_failures_total``). Database
    connections past their age are closed around it, as Django does around a request.
    """
    from django.db import close_old_connections

    errors: list[Exception] = []
    with_db = django_settings.configured
    if with_db:
        close_old_connections()
    try:
        for name in (str(event.get("type")), "delivery_event"):
            signal = getattr(signals, name, None) if name in signals else None
            if signal is None:
                continue
            for receiver, result in signal.send_robust(sender=EmailBackend, event=event):
                if isinstance(result, Exception):
                    log.error(
                        "signal %s receiver %r failed on %s: %r",
                        name,
                        receiver,
                        event.get("message_id"),
                        result,
                    )
                    errors.append(result)
    finally:
        if with_db:
            close_old_connections()
    if errors:
        raise errors[0]
