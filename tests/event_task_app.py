"""An application's own Celery app for the tests: its task receives ses-tasks delivery
events published with ``SES_TASKS_EVENT_TASK`` (run as ``celery -A tests.event_task_app``).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from tests.event_hooks import record

TASK_NAME = "myapp.handle_ses_event"

app = Celery("myapp", broker=os.environ.get("EVENT_APP_BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_default_queue=os.environ.get("EVENT_APP_QUEUE", "celery"),
    accept_content=["json"],
    worker_hijack_root_logger=False,
)


@app.task(name=TASK_NAME)
def handle_ses_event(event: dict[str, Any]) -> None:
    record({**event, "handled_by": "celery"})
