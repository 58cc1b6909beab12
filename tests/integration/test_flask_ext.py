"""Flask extension and the example app, through a real worker to the sandbox."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

flask = pytest.importorskip("flask")

from ses_tasks.errors import ConfigurationError  # noqa: E402
from ses_tasks.integrations.flask import SesTasksFlask  # noqa: E402
from ses_tasks.sandbox.embedded import wait_for  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flask_app" / "app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_example_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ses_tasks_config(env: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix("SES_TASKS_").lower(): v for k, v in env.items()}


def test_example_signup_sends_through_a_worker(make_pipeline):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1, queues="transactional")
    example = load_example()
    app = example.create_app({"SES_TASKS": ses_tasks_config(pipeline.env)})
    assert app.extensions["ses_tasks"] is example.ses
    client = app.test_client()

    response = client.post("/signup", data={"email": "new.user@example.com"})
    assert response.status_code == 202
    message_id = response.get_json()["message_id"]

    def sent() -> bool:
        status = client.get(f"/messages/{message_id}")
        return status.status_code == 200 and status.get_json()["state"] == "sent"

    wait_for(sent, timeout_s=60, interval_s=0.1, what="the welcome email to be sent")
    (accepted,) = pipeline.accepted(at_least=1)
    assert accepted["rcpt_tos"] == ["new.user@example.com"]
    assert "Subject: Welcome aboard" in accepted["data"]
    # Same address again: the idempotency key makes it the same message, sent once.
    again = client.post("/signup", data={"email": "new.user@example.com"})
    assert again.get_json()["message_id"] == message_id


def test_example_rejects_a_bad_address_with_400(make_pipeline):
    pipeline = make_pipeline("tls")
    app = load_example().create_app({"SES_TASKS": ses_tasks_config(pipeline.env)})
    response = app.test_client().post("/signup", data={"email": "not-an-address"})
    assert response.status_code == 400
    assert response.get_json()["field"] == "to[0]"


def test_settings_come_from_app_config_per_app(make_pipeline):
    pipeline = make_pipeline("tls")
    ext = SesTasksFlask()
    first, second = flask.Flask("first"), flask.Flask("second")
    first.config["SES_TASKS"] = {**ses_tasks_config(pipeline.env), "key_prefix": "one"}
    second.config["SES_TASKS"] = {**ses_tasks_config(pipeline.env), "KEY_PREFIX": "two"}
    ext.init_app(first)
    ext.init_app(second)
    with first.app_context():
        assert ext.client.settings.key_prefix == "one"
    with second.app_context():
        assert ext.client.settings.key_prefix == "two"
    assert first.extensions["ses_tasks"] is ext is second.extensions["ses_tasks"]


def test_bad_config_fails_at_init_and_missing_init_is_explained():
    app = flask.Flask("bad")
    app.config["SES_TASKS"] = {"port": "not-a-port"}
    with pytest.raises(ConfigurationError) as info:
        SesTasksFlask(app)
    assert info.value.setting == "PORT"
    with pytest.raises(ConfigurationError, match="init_app"):
        SesTasksFlask().client  # noqa: B018


def test_json_request_with_an_inline_image_and_a_calendar_invite(make_pipeline):
    """The new message fields as plain JSON, from a request through a worker to SES."""
    import base64
    import email
    import email.policy

    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1, queues="transactional")
    app = flask.Flask("json_mail")
    app.config["SES_TASKS"] = ses_tasks_config(pipeline.env)
    ext = SesTasksFlask(app)

    @app.post("/mail")
    def send() -> dict[str, str]:
        return {"message_id": ext.send_email(**flask.request.get_json()).message_id}

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    invite = "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nEND:VCALENDAR\r\n"
    payload = {
        "from": "team@example.com",
        "to": ["guest@example.com"],
        "subject": "Invite",
        "text": "You are invited",
        "html": '<img src="cid:logo@example.com">',
        "alternatives": [
            {
                "content_type": "text/calendar",
                "content": invite,
                "params": {"method": "REQUEST"},
                "after_html": True,
            }
        ],
        "attachments": [
            {
                "content_type": "image/png",
                "content_b64": base64.b64encode(png).decode(),
                "content_id": "<logo@example.com>",
                "inline": True,
            }
        ],
    }
    response = app.test_client().post("/mail", json=payload)
    assert response.status_code == 200, response.get_data(as_text=True)
    message_id = response.get_json()["message_id"]

    def sent() -> bool:
        record = ext.client.message_status(message_id)
        return record is not None and record.state.value == "sent"

    with app.app_context():
        wait_for(sent, timeout_s=60, interval_s=0.1, what="the invite to be sent")
    (accepted,) = pipeline.accepted(at_least=1)
    parsed = email.message_from_string(accepted["data"], policy=email.policy.default)
    types = [p.get_content_type() for p in parsed.walk()]
    assert types == [
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "text/calendar",
    ]
    [logo] = [p for p in parsed.walk() if p["Content-ID"] == "<logo@example.com>"]
    assert logo.get_payload(decode=True) == png
    [calendar] = [p for p in parsed.walk() if p.get_content_type() == "text/calendar"]
    assert calendar.get_content() == invite and calendar.get_param("method") == "REQUEST"
