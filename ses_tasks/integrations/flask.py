"""Flask extension: one ``SesTasks`` client per app, configured from ``app.config``.

    ses = SesTasksFlask()
    def create_app():
        app = Flask(__name__)
        app.config["SES_TASKS"] = {"region": "eu-west-1"}   # optional; env is the fallback
        ses.init_app(app)
        return app

    @app.post("/signup")
    def signup():
        result = ses.send_email(from_="hi@example.com", to=[...], subject="Welcome", text="...")
        return {"message_id": result.message_id}

``SES_TASKS`` keys are our setting names in lower case (``redis_url``, ``max_send_rate``);
the ``SES_TASKS_*`` environment fills in the rest. Sends are enqueued, not delivered, so a
request never waits on SMTP.

Delivery events (sent, bounced, complained ...) arrive as blinker signals
(``ses_tasks.integrations.flask.signals``) with the hook ``send_signals`` in
``SES_TASKS_EVENT_HOOKS``; see ``docs/events.md``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from blinker import Namespace
from flask import Flask, current_app, has_app_context

from ses_tasks.config import Settings, load_settings
from ses_tasks.errors import ConfigurationError
from ses_tasks.events import EVENT_TYPES
from ses_tasks.produce.client import MessageResult, SesTasks
from ses_tasks.store.tracking import CampaignStatus, MessageRecord

__all__ = ["EXTENSION_KEY", "SesTasksFlask", "send_signals", "signals"]

EXTENSION_KEY = "ses_tasks"

log = logging.getLogger(__name__)


class SesTasksFlask:
    """The extension; ``app.extensions["ses_tasks"]`` is this object after ``init_app``."""

    def __init__(self, app: Flask | None = None, *, settings: Settings | None = None) -> None:
        self._settings = settings
        self._app = app
        self._clients: WeakKeyDictionary[Flask, SesTasks] = WeakKeyDictionary()
        self._lock = threading.Lock()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate settings now (fail at start-up, not on the first request)."""
        options = {str(k).lower(): v for k, v in (app.config.get("SES_TASKS") or {}).items()}
        settings = self._settings or load_settings(**options)
        with self._lock:
            self._clients[app] = SesTasks(settings)
        app.extensions[EXTENSION_KEY] = self
        global _events_app
        _events_app = weakref.ref(app)  # send_signals runs receivers in its app context

    @property
    def client(self) -> SesTasks:
        """The client of the current app (or of the app given to the constructor)."""
        app: Any = current_app._get_current_object() if has_app_context() else self._app  # type: ignore[attr-defined]
        if app is None:
            raise ConfigurationError("SES_TASKS", "no Flask app: call init_app() first")
        client = self._clients.get(app)
        if client is None:
            raise ConfigurationError("SES_TASKS", f"init_app() was not called for {app.name!r}")
        return client

    def send_email(self, **fields: Any) -> MessageResult:
        """Validate (``ValidationError``) and enqueue one message; see ``SesTasks.send_email``."""
        return self.client.send_email(**fields)

    def send_campaign(
        self,
        *,
        from_: str,
        subject: str,
        recipients: str | Path | Iterable[Any],
        **options: Any,
    ) -> CampaignStatus:
        return self.client.send_campaign(
            from_=from_, subject=subject, recipients=recipients, **options
        )

    def message_status(self, message_id: str) -> MessageRecord | None:
        return self.client.message_status(message_id)

    def campaign_status(self, campaign_id: str) -> CampaignStatus:
        return self.client.campaign_status(campaign_id)


# Delivery events as blinker signals ------------------------------------------------------

_namespace = Namespace()
#: The app of the last ``init_app``: ``send_signals`` runs receivers in its app context.
_events_app: weakref.ref[Flask] | None = None


class _Signals:
    """One blinker signal per event type (``signals.bounced`` ...) and the catch-all
    ``signals.delivery_event``, named ``ses-tasks.<type>`` in ``signals.namespace``.
    Receivers get ``sender`` (the Flask app, or None without one) and ``event``."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self.types = EVENT_TYPES
        self.sent = namespace.signal("ses-tasks.sent")
        self.failed = namespace.signal("ses-tasks.failed")
        self.unknown = namespace.signal("ses-tasks.unknown")
        self.suppressed = namespace.signal("ses-tasks.suppressed")
        self.delivered = namespace.signal("ses-tasks.delivered")
        self.bounced = namespace.signal("ses-tasks.bounced")
        self.complained = namespace.signal("ses-tasks.complained")
        self.delayed = namespace.signal("ses-tasks.delayed")
        self.rejected = namespace.signal("ses-tasks.rejected")
        self.delivery_event = namespace.signal("ses-tasks.delivery_event")

    def __iter__(self) -> Any:
        return iter((*self.types, "delivery_event"))


signals = _Signals(_namespace)


def send_signals(event: dict[str, Any]) -> None:
    """The event hook that sends ``event`` on ``signals.<type>`` and ``delivery_event``,
    inside the app context of the app ``init_app`` was last called with (so receivers may
    use ``current_app`` and the app's database session). Every receiver runs even if one
    raises; the first error is raised afterwards (logged and counted as a hook failure)."""
    app = _events_app() if _events_app is not None else None
    errors: list[Exception] = []
    with app.app_context() if app is not None else contextlib.nullcontext():
        for name in (str(event.get("type")), "delivery_event"):
            signal = getattr(signals, name) if name in signals else None
            if signal is None:
                continue
            for receiver in list(signal.receivers_for(app)):
                try:
                    receiver(app, event=event)
                except Exception as exc:
                    log.error("signal %s receiver %r failed: %r", name, receiver, exc)
                    errors.append(exc)
    if errors:
        raise errors[0]
