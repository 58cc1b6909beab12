"""ses-tasks: bulk and transactional email through Amazon SES SMTP with Celery."""

from __future__ import annotations

from ses_tasks._moved import install as _install_moved
from ses_tasks.errors import (
    CampaignError,
    ConfigurationError,
    DeliveryError,
    EndpointFatalError,
    PermanentDeliveryError,
    SesTasksError,
    TransientDeliveryError,
    ValidationError,
)
from ses_tasks.states import CampaignState, MessageState, Outcome

__version__ = "0.1.0"
_install_moved()  # the old flat module paths keep working

_LAZY = {
    "SesTasks": ("ses_tasks.produce.client", "SesTasks"),
    "MessageResult": ("ses_tasks.produce.client", "MessageResult"),
    "MessageSpec": ("ses_tasks.message.spec", "MessageSpec"),
    "Attachment": ("ses_tasks.message.spec", "Attachment"),
    "CampaignTemplate": ("ses_tasks.message.spec", "CampaignTemplate"),
    "Settings": ("ses_tasks.config", "Settings"),
}


def __getattr__(name: str) -> object:
    """Import the heavier parts (Celery, Jinja2) only when they are used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ses_tasks' has no attribute {name!r}")


__all__ = [
    "Attachment",
    "CampaignError",
    "CampaignState",
    "CampaignTemplate",
    "ConfigurationError",
    "DeliveryError",
    "EndpointFatalError",
    "MessageResult",
    "MessageSpec",
    "MessageState",
    "Outcome",
    "PermanentDeliveryError",
    "SesTasks",
    "SesTasksError",
    "Settings",
    "TransientDeliveryError",
    "ValidationError",
    "__version__",
]
