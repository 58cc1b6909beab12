"""ses-tasks: bulk and transactional email through Amazon SES SMTP with Celery."""

from __future__ import annotations

from .errors import (
    CampaignError,
    ConfigurationError,
    DeliveryError,
    EndpointFatalError,
    PermanentDeliveryError,
    SesTasksError,
    TransientDeliveryError,
    ValidationError,
)
from .states import CampaignState, MessageState, Outcome

__version__ = "0.1.0"

_LAZY = {
    "SesTasks": ("ses_tasks.client", "SesTasks"),
    "MessageResult": ("ses_tasks.client", "MessageResult"),
    "MessageSpec": ("ses_tasks.message", "MessageSpec"),
    "Attachment": ("ses_tasks.message", "Attachment"),
    "CampaignTemplate": ("ses_tasks.message", "CampaignTemplate"),
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
