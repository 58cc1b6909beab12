"""The dashboard in headless Chromium, against real workers, the sandbox and Redis.

What a user sees: live progress without a reload, the chart, failure reasons, pause and
resume from the buttons, the suppression list, the login wall, and that hostile recipient
data stays text. ``SES_TASKS_SCREENSHOTS=1`` writes the pages to ``docs/dashboard-*.png``.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

if not os.environ.get("CI"):  # in CI the test extra is installed: a missing one must fail
    pytest.importorskip("selenium", reason="selenium is not installed (the test extra)")

from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec

from ses_tasks.sandbox.embedded import WorkerProcess
from ses_tasks.store.tracking import CampaignState
from tests.browser.support import Dashboard, diagnostics, new_driver, wait, wait_page

#: The sandbox answers these with SES's 554 "Email address is not verified".
REJECTED = ["refused0@example.com", "refused1@example.com", "refused2@example.com"]
XSS_EMAIL = "hostile@example.com"
XSS_NAME = "<script>alert(1)</script>"
REJECT_TEXT = "Email address is not verified"
#: Low enough that the campaign is still running when the browser looks.
SLOW_RATE = "50"


def _sandbox_args(addresses: list[str]) -> list[str]:
    return [arg for address in addresses for arg in ("--reject-recipient", address)]


def _recipients(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"email": f"{prefix}{i}@example.com", "name": f"Reader {i}"} for i in range(n)]


def _css(driver: WebDriver | WebElement, selector: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, selector)


def _all(driver: WebDriver | WebElement, selector: str) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, selector)


def _text_has(selector: str, expected: str) -> Any:
    """Condition: the element's text, stripped and lower-cased, contains ``expected``."""

    def check(driver: WebDriver) -> bool:
        found = _all(driver, selector)
        return bool(found) and expected in found[0].text.strip().lower()

    return check


def _number(text: str) -> int:
    return int(text.strip().replace(",", "").replace("\u202f", "").replace(" ", ""))


def _click(driver: WebDriver, form_selector: str) -> None:
    """Submit an action form with its button, then wait for the 303 back to a page."""
    button = wait(driver).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, f"{form_selector} button[type=submit]"))
    )
    old_main = _css(driver, "main#page")
    button.click()
    wait(driver).until(ec.staleness_of(old_main), f"the page after {form_selector}")
    wait_page(driver)


@pytest.fixture
def pages(browser: WebDriver) -> Iterator[WebDriver]:
    """The module's browser, with nothing left open from the previous test."""
    yield browser
    browser.get("about:blank")


def test_live_progress_chart_and_failure_reasons(
    make_pipeline: Any, dashboard: Any, pages: WebDriver, screenshot: Any
) -> None:
    pipeline = make_pipeline(
        "tls",
        sandbox_args=_sandbox_args([*REJECTED, XSS_EMAIL]),
        SES_TASKS_MAX_SEND_RATE=SLOW_RATE,
    )
    client = pipeline.client
    recipients = _recipients("live", 296)
    for i, address in enumerate(REJECTED):
        recipients.insert(50 * (i + 1), {"email": address, "name": f"Refused {i}"})
    recipients.insert(120, {"email": XSS_EMAIL, "name": XSS_NAME})
    total = len(recipients)
    # Another campaign, scheduled for tomorrow: listed at 0%, never sent here.
    client.send_campaign(
        from_="news@example.com",
        subject="Weekly digest",
        text="x",
        recipients=_recipients("digest", 20),
        campaign_id="digest",
        send_at=datetime.now(UTC) + timedelta(days=1),
    )
    # Stored now, sent once a worker runs: the page below is loaded before any progress.
    client.send_campaign(
        from_="news@example.com",
        subject="Hello {{ name }}",
        text="Hi {{ name }}",
        recipients=recipients,
        campaign_id="live",
    )
    board: Dashboard = dashboard(pipeline.env)
    board.login(pages, "/")
    with diagnostics(board, pages):
        wait_page(pages, "campaigns")
        row = 'table#campaigns tr[data-campaign="live"]'
        bar = wait(pages).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, f"{row} progress.progress"))
        )
        assert bar.get_attribute("max") == "100"
        assert float(bar.get_attribute("value") or 0) < 100
        pages.execute_script("window.__notReloaded = true;")

        pipeline.start_worker(concurrency=2)

        def complete(driver: WebDriver) -> bool:
            progress = _all(driver, f"{row} progress.progress")
            percent = _all(driver, f"{row} .percent")
            return (
                bool(progress and percent)
                and float(progress[0].get_attribute("value") or 0) == 100
                and percent[0].text.strip() == "100%"
            )

        wait(pages, 90).until(complete, "the progress bar to reach 100% live")
        assert pages.execute_script("return window.__notReloaded === true;"), "page reloaded"
        final = pipeline.wait_done("live")
        assert final.counts["sent"] == total - len(REJECTED) - 1
        assert final.counts["failed"] == len(REJECTED) + 1
        wait(pages).until(_text_has(f"{row} .state", "completed"))
        sent, _, of = _css(pages, f"{row} .sent").text.partition("/")  # "sent/total"
        assert (_number(sent), _number(of)) == (final.counts["sent"], total)
        assert _css(pages, 'tr[data-campaign="digest"] .percent').text.strip() == "0%"
        screenshot(pages, "campaigns")

        pages.get(board.page("/campaigns/live"))
        wait_page(pages, "campaign")
        points = wait(pages).until(
            lambda d: _all(d, "svg#chart circle.point"), "points on the chart"
        )
        assert len(points) > 0
        assert _css(pages, "#percent").text.strip() == "100%"
        assert _number(_css(pages, "#counts [data-state=sent]").text) == final.counts["sent"]
        _css(pages, "#rates #bounce-rate")
        _css(pages, "#rates #complaint-rate")
        assert _css(pages, "a#failures-csv").get_attribute("href")

        # Rendered with the page once every outcome is recorded (the table is not live).
        failures = _all(pages, "table#failures tbody tr")
        assert _css(pages, "#failures-total").text.strip() == str(len(REJECTED) + 1)
        by_email = {_css(r, "td.email").text.strip(): r for r in failures}
        assert set(by_email) == {*REJECTED, XSS_EMAIL}
        for address, failure in by_email.items():
            assert _css(failure, "td.code").text.strip() == "554"
            reason = _css(failure, "td.reason").text
            assert REJECT_TEXT in reason and address in reason
        assert _css(by_email[REJECTED[0]], "td.name").text.strip() == "Refused 0"

        # The hostile name is text: shown literally, no element made of it, nothing ran.
        assert _css(by_email[XSS_EMAIL], "td.name").text == XSS_NAME
        assert _all(pages, "table#failures script") == []
        assert not pages.execute_script(
            "return [...document.scripts].some(s => s.textContent.includes('alert(1)'));"
        )
        with pytest.raises(NoAlertPresentException):
            pages.switch_to.alert  # noqa: B018 - the property raises when no alert is open
        screenshot(pages, "campaign")


def test_pause_and_resume_from_the_buttons(
    make_pipeline: Any, dashboard: Any, pages: WebDriver, screenshot: Any
) -> None:
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE=SLOW_RATE)
    worker = WorkerProcess(
        env=pipeline.env,
        mode="tls",
        concurrency=2,
        name="browser-w1",
        log_path=pipeline.workdir / "worker-browser.log",
    ).start()
    pipeline.workers.append(worker)  # stopped with the pipeline
    client = pipeline.client
    board: Dashboard = dashboard(pipeline.env)
    board.login(pages, "/")  # before the campaign: only the pause click races it
    total = 400
    client.send_campaign(
        from_="news@example.com",
        subject="Hello",
        text="x",
        recipients=_recipients("pause", total),
        campaign_id="pausable",
    )
    pages.get(board.page("/campaigns/pausable"))
    with diagnostics(board, pages):
        wait_page(pages, "campaign")
        # Paused while it runs: some sent (shown live), far from all (8 s at 50/s).
        wait(pages).until(
            lambda d: _number(_css(d, "#counts [data-state=sent]").text) > 0, "a first send"
        )
        _click(pages, "form.action-pause")
        wait(pages).until(_text_has("#state", "paused"), "#state to show paused")
        assert client.campaign_status("pausable").state is CampaignState.PAUSED

        # While it waits: the limits page, and the worker in the workers page.
        pages.get(board.page("/limits"))
        wait_page(pages, "limits")
        wait(pages).until(lambda d: _all(d, "table#accounts tr[data-account]"), "an account row")
        account = _all(pages, "table#accounts tr[data-account]")[0]
        for cell in ("configured", "effective", "quota-used", "quota-limit"):
            _css(account, f"td.{cell}")
        _css(pages, "table#aimd")
        paused_row = _css(pages, 'table#paused tr[data-campaign="pausable"]')
        assert _css(paused_row, "td.kind").text.strip() == "user"
        _css(paused_row, "td.reason")
        screenshot(pages, "limits")

        pages.get(board.page("/workers"))
        wait_page(pages, "workers")
        mine = "table#workers tr[data-worker^='browser-w1@']"
        wait(pages).until(lambda d: _all(d, mine), "the worker's heartbeat row")
        assert "ses.tls" in _css(pages, f"{mine} td.queues").text.split(", ")
        assert _css(pages, f"{mine} td.pool").text.strip()
        assert _css(pages, f"{mine} td.seen").text.strip()
        screenshot(pages, "workers")

        pages.get(board.page("/campaigns/pausable"))
        wait_page(pages, "campaign")
        paused = client.campaign_status("pausable")
        assert paused.state is CampaignState.PAUSED and paused.counts["sent"] < total
        _click(pages, "form.action-resume")
        wait(pages, 90).until(_text_has("#state", "completed"), "#state to show completed")
        final = pipeline.wait_done("pausable")
        assert final.state is CampaignState.COMPLETED
        assert final.counts["sent"] == total


def test_suppressed_address_is_added_and_found(
    make_pipeline: Any, dashboard: Any, pages: WebDriver, screenshot: Any
) -> None:
    pipeline = make_pipeline("tls")
    client = pipeline.client
    client.suppress(["bounced@example.com"], reason="Permanent bounce: mailbox does not exist")
    client.suppress(["complained@example.com"], reason="Complaint: abuse")
    address = f"added-{secrets.token_hex(4)}@example.com"
    board: Dashboard = dashboard(pipeline.env)
    board.login(pages, "/suppression")
    with diagnostics(board, pages):
        wait_page(pages, "suppression")
        form = _css(pages, "form#suppress-add")
        _css(form, "input[name=email]").send_keys(address)
        _css(form, "input[name=reason]").send_keys("asked by phone to stop")
        _click(pages, "form#suppress-add")
        assert client.suppression.contains(address)

        pages.get(board.page("/suppression"))  # the whole list, then a search narrows it
        wait_page(pages, "suppression")
        listed = {r.get_attribute("data-email") for r in _all(pages, "table#suppressed tbody tr")}
        assert listed == {address, "bounced@example.com", "complained@example.com"}
        screenshot(pages, "suppression")
        search = _css(pages, "form#suppression-search")
        query = _css(search, "input[name=q]")
        query.clear()
        query.send_keys(address)
        old_main = _css(pages, "main#page")
        search.submit()
        wait(pages).until(ec.staleness_of(old_main))
        row = wait(pages).until(
            ec.presence_of_element_located(
                (By.CSS_SELECTOR, f'table#suppressed tbody tr[data-email="{address}"]')
            )
        )
        assert _css(row, "td.email").text.strip() == address
        assert "asked by phone to stop" in _css(row, "td.reason").text
        assert _css(row, "td.added").text.strip()
        # The search narrowed the list: the other entries are not shown.
        assert _all(pages, 'table#suppressed tr[data-email="bounced@example.com"]') == []
        assert _css(pages, "a#suppression-export").get_attribute("href")


def test_requests_without_the_token_are_refused(make_pipeline: Any, dashboard: Any) -> None:
    pipeline = make_pipeline("tls")
    client = pipeline.client
    client.send_campaign(
        from_="news@example.com",
        subject="Hello",
        text="x",
        recipients=_recipients("auth", 3),
        campaign_id="guarded",
    )
    board: Dashboard = dashboard(pipeline.env)

    # Plain HTTP, no token, no cookie: 401, with the login form to get one.
    anonymous = httpx.get(board.page("/"), headers={"Accept": "text/html"})
    assert anonymous.status_code == 401
    assert 'id="login"' in anonymous.text and 'name="token"' in anonymous.text
    assert "content-security-policy" in anonymous.headers
    api = httpx.get(board.page("/campaigns/guarded"))
    assert api.status_code == 401 and 'id="state"' not in api.text
    assert httpx.get(board.page("/"), headers={"Authorization": "Bearer wrong"}).status_code == 401
    refused = httpx.post(board.page("/campaigns/guarded/pause"))
    assert refused.status_code in (401, 403)
    assert client.campaign_status("guarded").state is not CampaignState.PAUSED

    fresh = new_driver()  # its own profile: no cookie from any other test
    try:
        with diagnostics(board, fresh):
            fresh.get(board.page("/campaigns/guarded"))
            assert wait_page(fresh, "login") == "login"
            assert _all(fresh, "form#login input[name=token]")
            assert _all(fresh, "#state") == []
            # A wrong token keeps the wall up.
            _css(fresh, "form#login input[name=token]").send_keys("not-the-token")
            old_main = _css(fresh, "main#page")
            _css(fresh, "form#login").submit()
            wait(fresh).until(ec.staleness_of(old_main))
            assert wait_page(fresh, "login") == "login"

            board.login(fresh, "/campaigns/guarded")
            wait_page(fresh, "campaign")
            cookies = {c["name"]: c["value"] for c in fresh.get_cookies()}
    finally:
        fresh.quit()

    # Logged in (the browser's session cookie) but no CSRF token: 403, nothing paused.
    with httpx.Client(base_url=board.url, cookies=cookies) as http:
        page = http.get("/campaigns/guarded")
        assert page.status_code == 200
        csp = page.headers.get("content-security-policy", "")
        assert "default-src" in csp and "script-src" in csp
        assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";", 1)[0]
        forged = http.post("/campaigns/guarded/pause", headers={"Origin": board.url})
        assert forged.status_code == 403 and "CSRF" in forged.text
        # The page's own token, from another site: refused as well.
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        form = {"csrf_token": token.group(1)}
        elsewhere = {"Origin": "https://attacker.example"}
        assert (
            http.post("/campaigns/guarded/pause", data=form, headers=elsewhere).status_code == 403
        )
        assert client.campaign_status("guarded").state is not CampaignState.PAUSED
        # Token and origin both right: the same request goes through (303 to the page).
        done = http.post("/campaigns/guarded/pause", data=form, headers={"Origin": board.url})
        assert done.status_code == 303
    assert client.campaign_status("guarded").state is CampaignState.PAUSED


def test_read_only_mode_shows_no_action_forms(
    make_pipeline: Any, dashboard: Any, pages: WebDriver
) -> None:
    pipeline = make_pipeline("tls")
    pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hello",
        text="x",
        recipients=_recipients("ro", 3),
        campaign_id="readonly",
    )
    board: Dashboard = dashboard(pipeline.env, "--read-only")
    board.login(pages, "/campaigns/readonly")
    with diagnostics(board, pages):
        wait_page(pages, "campaign")
        _css(pages, "#state")
        for action in ("pause", "resume", "cancel", "retry"):
            assert _all(pages, f"form.action-{action}") == [], action
        assert _all(pages, "form.action") == []
        assert _all(pages, "form.logout")  # logging out is not an action on the data
        pages.get(board.page("/suppression"))
        wait_page(pages, "suppression")
        assert _all(pages, "form#suppress-add") == []
        assert _all(pages, "form.action") == []  # nor "remove" buttons
        _css(pages, "form#suppression-search")  # reading is still allowed
        cookies = {c["name"]: c["value"] for c in pages.get_cookies()}
    # A hand-made post, logged in, is refused too: the forms are not the only guard.
    with httpx.Client(base_url=board.url, cookies=cookies) as http:
        refused = http.post("/campaigns/readonly/pause", headers={"Origin": board.url})
    assert refused.status_code == 403 and "read-only" in refused.text
