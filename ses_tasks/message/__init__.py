"""A message from fields to bytes: validation and templates (``spec``), MIME (``mime``).

Nothing here knows SMTP, Redis or Celery.
"""

from ses_tasks.message.spec import (
    DEFAULT_MAX_BYTES,
    MAX_RECIPIENTS,
    Address,
    Attachment,
    CampaignTemplate,
    MessageSpec,
    RenderedMessage,
    parse_address,
    render_message,
    to_email_message,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_RECIPIENTS",
    "Address",
    "Attachment",
    "CampaignTemplate",
    "MessageSpec",
    "RenderedMessage",
    "parse_address",
    "render_message",
    "to_email_message",
]
