"""A Flask app that sends a welcome email through ses-tasks.

export SES_TASKS_REDIS_URL=redis://127.0.0.1:6379/0 SES_TASKS_BROKER_URL=$SES_TASKS_REDIS_URL
ses-tasks worker --queues transactional &     # the workers do the sending
flask --app examples/flask_app/app.py run
curl -X POST localhost:5000/signup -d email=new@example.com
curl localhost:5000/messages/<message_id>
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request
from markupsafe import escape

from ses_tasks.errors import ValidationError
from ses_tasks.integrations.flask import SesTasksFlask

ses = SesTasksFlask()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_prefixed_env("FLASK")
    app.config["WELCOME_FROM"] = "Example <hello@example.com>"
    app.config.update(config or {})
    ses.init_app(app)

    @app.post("/signup")
    def signup() -> tuple[dict[str, Any], int]:
        address = request.form.get("email", "")
        try:
            result = ses.send_email(
                from_=app.config["WELCOME_FROM"],
                to=[address],
                subject="Welcome aboard",
                text=f"Hello {address}, thanks for signing up.",
                html=f"<p>Hello {escape(address)}, thanks for signing up.</p>",
                idempotency_key=f"welcome:{address}",
            )
        except ValidationError as exc:
            return {"error": str(exc), "field": exc.field}, 400
        return {"message_id": result.message_id}, 202

    @app.get("/messages/<message_id>")
    def message(message_id: str) -> tuple[dict[str, Any], int]:
        record = ses.message_status(message_id)
        if record is None:
            return {"error": "unknown message"}, 404
        return {"message_id": message_id, "state": record.state.value}, 200

    return app


if __name__ == "__main__":
    create_app().run()
