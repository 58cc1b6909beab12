"""Django and Flask views for SNS feedback, wrapping the same ``FeedbackHandler``.

Django (urls.py)::

    from ses_tasks.integrations.feedback_views import django_view
    urlpatterns = [path("ses/feedback/", django_view())]

Flask::

    from ses_tasks.integrations.feedback_views import flask_blueprint
    app.register_blueprint(flask_blueprint(), url_prefix="/ses")   # POST /ses/feedback

The handler is built from the environment on first request unless one is passed. Django and
Flask are imported only when their view is created.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ses_tasks.feedback.handler import FeedbackHandler, HttpResponse

__all__ = ["django_view", "flask_blueprint", "flask_view"]


class _Lazy:
    def __init__(self, handler: FeedbackHandler | None) -> None:
        self._handler = handler
        self._lock = threading.Lock()

    def __call__(self) -> FeedbackHandler:
        if self._handler is None:
            with self._lock:
                if self._handler is None:
                    self._handler = FeedbackHandler.from_settings()
        return self._handler


def _method_not_allowed() -> HttpResponse:
    return HttpResponse(405, "POST an SNS message")


def django_view(handler: FeedbackHandler | None = None) -> Callable[..., Any]:
    """A CSRF-exempt Django view: SNS cannot send a CSRF token, the signature protects it."""
    from django.http import HttpResponse as DjangoResponse
    from django.views.decorators.csrf import csrf_exempt

    get_handler = _Lazy(handler)

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


def flask_view(handler: FeedbackHandler | None = None) -> Callable[[], Any]:
    """A Flask view function; register it with ``methods=["POST"]``."""
    from flask import Response, request

    get_handler = _Lazy(handler)

    def sns_feedback() -> Any:
        if request.method != "POST":
            response = _method_not_allowed()
        else:
            headers = {k.lower(): v for k, v in request.headers.items()}
            response = get_handler().handle_http(request.get_data(cache=False), headers)
        return Response(response.json_bytes(), status=response.status, mimetype="application/json")

    return sns_feedback


def flask_blueprint(
    handler: FeedbackHandler | None = None, *, rule: str = "/feedback", name: str = "ses_feedback"
) -> Any:
    """A blueprint with ``POST <rule>``."""
    from flask import Blueprint

    blueprint = Blueprint(name, __name__)
    blueprint.add_url_rule(rule, "sns_feedback", flask_view(handler), methods=["POST"])
    return blueprint
