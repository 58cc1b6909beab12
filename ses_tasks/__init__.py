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

__all__ = [
    "CampaignError",
    "CampaignState",
    "ConfigurationError",
    "DeliveryError",
    "EndpointFatalError",
    "MessageState",
    "Outcome",
    "PermanentDeliveryError",
    "SesTasksError",
    "TransientDeliveryError",
    "ValidationError",
    "__version__",
]
