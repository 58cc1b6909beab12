"""Workers read the Django project's ``SES_TASKS`` dict, so web and workers share one config.

The Django backend reads ``settings.SES_TASKS`` in the web process; workers read only the
``SES_TASKS_*`` environment. ``ses-tasks worker --django-settings mysite.settings`` loads
the project's settings and exports the dict as that environment before the worker (and its
child processes) start, with the same precedence as the backend: the dict wins over the
environment, and the worker's own options (``--mode``) win over both.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ses_tasks.config import ENV_PREFIX
from ses_tasks.errors import ConfigurationError

__all__ = ["export_django_settings"]


def _env_value(value: Any) -> str:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    getter = getattr(value, "get_secret_value", None)  # a SecretStr someone put in
    return str(getter() if callable(getter) else value)


def export_django_settings(module: str) -> list[str]:
    """Load ``module`` as Django settings; export its ``SES_TASKS`` dict; return the names."""
    os.environ["DJANGO_SETTINGS_MODULE"] = module
    try:
        import django
        from django.conf import settings
    except ImportError:
        raise ConfigurationError(
            "django_settings", "Django is not installed: pip install 'ses-tasks[django]'"
        ) from None
    try:
        django.setup()
        options = getattr(settings, "SES_TASKS", None) or {}
    except ImportError as exc:
        raise ConfigurationError("django_settings", f"cannot import {module!r}: {exc}") from None
    if not isinstance(options, dict):
        raise ConfigurationError("SES_TASKS", "must be a dict of setting names to values")
    names = []
    for key, value in options.items():
        name = f"{ENV_PREFIX}{str(key).upper()}"
        os.environ[name] = _env_value(value)
        names.append(name)
    return names
