"""`ses-tasks worker --django-settings`: the workers read the project's SES_TASKS dict."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ses_tasks.sandbox.embedded import WorkerProcess

pytest.importorskip("django")


def test_a_worker_configured_only_by_django_settings_sends(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("tls")
    options = {k.removeprefix("SES_TASKS_").lower(): v for k, v in pipeline.env.items()}
    project = tmp_path / "project"
    project.mkdir()
    (project / "shop_settings.py").write_text(
        f"SECRET_KEY = 'test-only'\nINSTALLED_APPS = []\nSES_TASKS = {options!r}\n"
    )
    # Nothing of ses-tasks in the worker's environment: only the Django settings module.
    bare = {k: "" for k in os.environ if k.startswith("SES_TASKS_")}
    worker = WorkerProcess(
        env={
            **bare,
            "PYTHONPATH": os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")]),
        },
        mode="tls",
        concurrency=1,
        queues="transactional",
        log_path=tmp_path / "worker-django.log",
        extra_args=["--django-settings", "shop_settings"],
    ).start()
    pipeline.workers.append(worker)
    result = pipeline.client.send_email(
        from_="shop@example.com", to=["buyer@example.com"], subject="Receipt", text="Thanks"
    )
    assert result.get(timeout=60)["state"] == "sent"
    assert [m["rcpt_tos"] for m in pipeline.accepted(at_least=1)] == [["buyer@example.com"]]
    log = (tmp_path / "worker-django.log").read_text()
    assert "settings from shop_settings" in log and "SES_TASKS_KEY_PREFIX" in log
    assert pipeline.env["SES_TASKS_PASSWORD"] not in log  # names only, never values


def test_an_unknown_settings_module_is_a_usage_error(tmp_path: Path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ses_tasks.ops.cli", "worker", "--django-settings", "no_such_mod"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "no_such_mod" in result.stderr and "Traceback" not in result.stderr
