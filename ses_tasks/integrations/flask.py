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
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from flask import Flask, current_app, has_app_context

from ses_tasks.config import Settings, load_settings
from ses_tasks.errors import ConfigurationError
from ses_tasks.produce.client import MessageResult, SesTasks
from ses_tasks.store.tracking import CampaignStatus, MessageRecord

__all__ = ["EXTENSION_KEY", "SesTasksFlask"]

EXTENSION_KEY = "ses_tasks"


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
