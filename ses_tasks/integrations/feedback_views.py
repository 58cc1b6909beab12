"""Django and Flask views for SNS feedback, wrapping the same ``FeedbackHandler``.

Django (urls.py)::

    from ses_tasks.integrations.feedback_views import django_view
    urlpatterns = [path("ses/feedback/", django_view())]

Flask::

    from ses_tasks.integrations.feedback_views import flask_blueprint
    app.register_blueprint(flask_blueprint(), url_prefix="/ses")   # POST /ses/feedback

The handler is built from the environment on first request unless one is passed; either way
the SNS topic allow-list (``SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS``) is checked when the view
is created, so a receiver that would accept anyone's topic fails at start-up
(``ConfigurationError``). Django and Flask are imported only when their view is created.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from ses_tasks.feedback.handler import FeedbackHandler, HttpResponse
from ses_tasks.feedback.settings import FeedbackSettings, load_feedback_settings

__all__ = ["django_view", "flask_blueprint", "flask_view"]


class _Lazy:
    """The handler, built on first request; the topic policy is checked now, at start-up."""

    def __init__(
        self, handler: FeedbackHandler | None, feedback_settings: FeedbackSettings | None
    ) -> None:
        self._factory: Callable[[], FeedbackHandler] | None = None
        if handler is not None:
            handler.require_topic_policy()
        else:
            fb = feedback_settings or load_feedback_settings()
            fb.require_topic_policy()
            self._factory = functools.partial(FeedbackHandler.from_settings, feedback_settings=fb)
        self._handler = handler
        self._lock = threading.Lock()

    def __call__(self) -> FeedbackHandler:
        if self._handler is None:
            with self._lock:
                if self._handler is None:
                    assert self._factory is not None
                    self._handler = self._factory()
        return self._handler


def _method_not_allowed() -> HttpResponse:
    return HttpResponse(405, "POST an SNS message")


def django_view(
    handler: FeedbackHandler | None = None, *, feedback_settings: FeedbackSettings | None = None
) -> Callable[..., Any]:
    """A CSRF-exempt Django view: SNS cannot send a CSRF token, the signature and the topic
    allow-list protect it. Raises ``ConfigurationError`` without an allow-list."""
    from django.http import HttpResponse as DjangoResponse
    from django.views.decorators.csrf import csrf_exempt

    get_handler = _Lazy(handler, feedback_settings)

    @csrf_exempt
    def sns_feedback(request: Any) -> Any:
        if request.method != "POST":
            response = _method_not_allowed()
        else:
            headers = {k.lower(): v for k, v in request.headers.items()}
            response = get_handler().handle_http(request.body, headers)
        out = DjangoResponse(
            response.json_bytes(), status=response.status, content_type="application/json"
        )
        if response.status == 405:
            out["Allow"] = "POST"
        return out

    return sns_feedback


def flask_view(
    handler: FeedbackHandler | None = None, *, feedback_settings: FeedbackSettings | None = None
) -> Callable[[], Any]:
    """A Flask view function; register it with ``methods=["POST"]``. Raises
    ``ConfigurationError`` without a topic allow-list."""
    from flask import Response, request

    get_handler = _Lazy(handler, feedback_settings)

    def sns_feedback() -> Any:
        if request.method != "POST":
            response = _method_not_allowed()
        else:
            headers = {k.lower(): v for k, v in request.headers.items()}
            response = get_handler().handle_http(request.get_data(cache=False), headers)
        return Response(response.json_bytes(), status=response.status, mimetype="application/json")

    return sns_feedback


def flask_blueprint(
    handler: FeedbackHandler | None = None,
    *,
    rule: str = "/feedback",
    name: str = "ses_feedback",
    feedback_settings: FeedbackSettings | None = None,
) -> Any:
    """A blueprint with ``POST <rule>``; ``ConfigurationError`` without a topic allow-list."""
    from flask import Blueprint

    blueprint = Blueprint(name, __name__)
    view = flask_view(handler, feedback_settings=feedback_settings)
    blueprint.add_url_rule(rule, "sns_feedback", view, methods=["POST"])
    return blueprint
