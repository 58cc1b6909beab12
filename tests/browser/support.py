"""Browser helpers: headless Chromium through Selenium, and the dashboard as a real process.

Chromium and chromedriver come from the system (Debian's ``chromium`` and
``chromium-driver``; ``.ci/install-browser`` installs them in CI). Selenium Manager is never
used: it downloads drivers from the internet. Without a browser the tests skip, except
under ``CI``, where a missing browser is a failure rather than a silently green run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

#: Chromium's binary names, most specific first (Debian: chromium; others: chromium-browser).
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)
#: How long a page may take to show what a test waits for (the machine is shared).
WAIT_S = 30


def _missing(reason: str) -> None:
    """Skip locally; fail in CI, where every test is meant to run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: run .ci/install-browser)")
    pytest.skip(reason)


def _binaries() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        _missing(
            "chromium and chromedriver are not on PATH (apt-get install chromium chromium-driver)"
        )
    assert browser is not None and driver is not None
    return browser, driver


def new_driver() -> WebDriver:
    """A headless Chromium with its own profile: no cookies shared with another driver."""
    browser, driver = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in BROWSER_ARGS:
        options.add_argument(arg)
    # The system driver by path: Selenium Manager would try to download one.
    service = Service(executable_path=driver)
    try:
        chrome = webdriver.Chrome(service=service, options=options)
    except WebDriverException as exc:
        _missing(f"headless Chromium did not start: {exc.msg}")
        raise
    chrome.set_page_load_timeout(WAIT_S)
    return chrome


def wait(driver: WebDriver, timeout_s: float = WAIT_S) -> WebDriverWait:
    """Conditions retried until true; an element replaced mid-check (a navigation, the
    chart redrawn by a live update) just means "look again"."""
    return WebDriverWait(
        driver,
        timeout_s,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )


@dataclass
class Dashboard:
    """A running ``ses-tasks dashboard``: its URL, its token, and how to log a browser in."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def page(self, path: str = "/") -> str:
        return self.url + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def login(self, driver: WebDriver, path: str = "/") -> None:
        """Log in through ``/login`` with the token, then open ``path``.

        Cookies are kept per host, not per port: every test's dashboard is on 127.0.0.1,
        so the browser forgets the previous test's session first.
        """
        driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
        driver.get(self.page("/login"))
        form = wait(driver).until(ec.presence_of_element_located((By.CSS_SELECTOR, "form#login")))
        form.find_element(By.CSS_SELECTOR, "input[name=token]").send_keys(self.token)
        form.submit()
        wait(driver).until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, "main#page").get_attribute("data-page")
                not in (None, "login")
            ),
            "the dashboard to accept the token",
        )
        driver.get(self.page(path))
        wait_page(driver)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_page(driver: WebDriver, name: str | None = None) -> str:
    """Wait until ``main#page`` is there (and is page ``name``); return its ``data-page``."""

    def loaded(d: WebDriver) -> str | None:
        pages = d.find_elements(By.CSS_SELECTOR, "main#page")
        if not pages:
            return None
        page = pages[0].get_attribute("data-page") or ""
        return page if name is None or page == name else None

    return str(wait(driver).until(loaded, f"main#page[data-page={name or '*'}]"))


@contextlib.contextmanager
def diagnostics(board: Dashboard, driver: WebDriver) -> Iterator[None]:
    """Around a test body: on failure, print the page and the dashboard's log."""
    try:
        yield
    except BaseException:
        print("URL:", driver.current_url)
        print(driver.page_source[-4000:])
        print("dashboard log:\n", board.log()[-4000:])
        raise
