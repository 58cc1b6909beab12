"""Event hooks for the tests, importable by worker processes (``tests.event_hooks.record``).

``record`` appends each event as one JSON line to the file ``SES_TASKS_TEST_EVENTS_FILE``
names (one short ``write`` in append mode: lines of several processes never interleave).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

EVENTS_FILE_ENV = "SES_TASKS_TEST_EVENTS_FILE"


def record(event: dict[str, Any]) -> None:
    line = json.dumps(event, sort_keys=True) + "\n"
    with open(os.environ[EVENTS_FILE_ENV], "a", encoding="utf-8") as handle:
        handle.write(line)


def explode(event: dict[str, Any]) -> None:
    raise RuntimeError(f"this hook fails on purpose ({event['type']})")


not_callable = 42


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
