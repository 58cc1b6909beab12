"""Browser fixtures: one headless Chromium per module, the dashboard as a real process,
and screenshots (``docs/dashboard-<page>.png`` only when ``SES_TASKS_SCREENSHOTS=1``)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx
import pytest

from ses_tasks.sandbox.embedded import free_port, wait_for

if TYPE_CHECKING:  # selenium is imported by the tests, which skip without it
    from selenium.webdriver.remote.webdriver import WebDriver

    from tests.browser.support import Dashboard

#: Where ``SES_TASKS_SCREENSHOTS=1`` writes the screenshots the docs show.
DOCS = Path(__file__).resolve().parents[2] / "docs"
#: How long the dashboard may take to answer after its process starts.
START_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One browser per module (starting Chromium costs a second or two of a shared CPU)."""
    from tests.browser.support import new_driver

    driver = new_driver()
    yield driver
    driver.quit()


class StartDashboard(Protocol):
    def __call__(
        self, env: Mapping[str, str], *args: str, token: str | None = None, **extra_env: str
    ) -> Dashboard: ...


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[StartDashboard]:
    """Start ``ses-tasks dashboard`` on a free port with a test's ``SES_TASKS_*`` env.

    ``env`` is a pipeline's environment (key prefix, Redis URL, endpoint), so the dashboard
    reads the same store the workers write. A token is always configured (generated unless
    given); extra CLI ``args`` (``--read-only``) and env pass through. Waits until the
    server answers, and stops it at the end of the test.
    """
    from tests.browser.support import Dashboard

    started: list[Dashboard] = []

    def start(
        env: Mapping[str, str], *args: str, token: str | None = None, **extra_env: str
    ) -> Dashboard:
        port = free_port()
        token = token or secrets.token_urlsafe(24)
        log_path = tmp_path / f"dashboard-{len(started)}.log"
        cmd = [
            sys.executable,
            "-m",
            "ses_tasks.ops.cli",
            "dashboard",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                cmd,
                env={**os.environ, **env, "SES_TASKS_DASHBOARD_TOKEN": token, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        board = Dashboard(f"http://127.0.0.1:{port}", token, process, log_path, list(args))
        started.append(board)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"ses-tasks dashboard exited with {process.returncode}:\n{board.log()}"
                )
            try:
                return httpx.get(board.page("/login"), timeout=2).status_code < 500
            except httpx.TransportError:
                return False

        wait_for(answers, timeout_s=START_TIMEOUT_S, interval_s=0.1, what="the dashboard to answer")
        return board

    yield start
    for board in started:
        board.stop()


class Screenshot(Protocol):
    def __call__(self, driver: WebDriver, page: str) -> Path: ...


@pytest.fixture
def screenshot(tmp_path: Path) -> Screenshot:
    """Save a page's screenshot: ``docs/dashboard-<page>.png`` only with
    ``SES_TASKS_SCREENSHOTS=1`` (regenerating the docs), else under ``tmp_path`` (CI stays
    clean)."""
    to_docs = os.environ.get("SES_TASKS_SCREENSHOTS") == "1"

    def save(driver: WebDriver, page: str) -> Path:
        path = (DOCS if to_docs else tmp_path) / f"dashboard-{page}.png"
        # The whole page, not just the window: the failures table sits below the chart.
        # The window is taller than the page's viewport by the browser's own bars.
        bars = 900 - int(driver.execute_script("return window.innerHeight"))
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(1280, max(900, min(height + bars, 3000)))
        try:
            assert driver.save_screenshot(str(path)), f"screenshot of {page} not written"
        finally:
            driver.set_window_size(1280, 900)
        return path

    return save
