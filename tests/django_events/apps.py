from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class EventsTestConfig(AppConfig):
    name = "tests.django_events"

    def ready(self) -> None:
        from ses_tasks.integrations.django import signals

        from ..event_hooks import record

        def on_event(sender: Any, event: dict[str, Any], **_: Any) -> None:
            record({**event, "via": "django-signal"})

        signals.delivery_event.connect(on_event, weak=False, dispatch_uid="tests-events")
