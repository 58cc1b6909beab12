"""The dashboard app against real Redis: who may use it (credentials, loopback, login),
CSRF, the headers of every response, escaping of recipient text, read-only mode."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from ses_tasks.config import Settings, load_settings
from ses_tasks.dashboard import DashboardAuth, check_bind, create_app
from ses_tasks.dashboard.security import CSP
from ses_tasks.errors import ConfigurationError
from ses_tasks.ops.cli import main
from ses_tasks.produce.client import SesTasks
from ses_tasks.states import CampaignState, MessageState

from ..conftest import env_vars
from .campaign_support import LOOPBACK, csrf_of, dom, record, stored_items

XSS = "<script>alert(1)</script>"
HTML = {"Accept": "text/html"}


@pytest.fixture
def settings(key_prefix: str) -> Settings:
    return Settings(key_prefix=key_prefix)


@pytest.fixture
def client(settings: Settings) -> Iterator[SesTasks]:
    ses = SesTasks(settings)
    yield ses
    ses.redis.close()


@pytest.fixture
def campaign(client: SesTasks) -> str:
    """A campaign of 4 whose first 2 recipients failed; subject, names and reasons hostile."""
    client.send_campaign(
        from_="news@example.com",
        subject=XSS,
        text="Hello {{ name }}",
        recipients=[{"email": f"u{i}@example.com", "name": f"{XSS} {i}"} for i in range(4)],
        campaign_id="c1",
    )
    items = stored_items(client, "c1")
    record(client, "c1", items[:2], MessageState.FAILED, code=550, reason=XSS)
    return "c1"


def http(app: object, **kwargs: object) -> TestClient:
    return TestClient(app, base_url=LOOPBACK, **kwargs)  # type: ignore[arg-type]


# Who may use it -----------------------------------------------------------------------------


def test_no_credentials_on_localhost_needs_no_login(settings: Settings, campaign: str) -> None:
    with http(create_app(settings=settings)) as c:
        page = c.get("/", headers=HTML)
        assert page.status_code == 200
        row = dom(page.text).find("tr", data_campaign=campaign)
        assert row.find(cls="state").text == "running"
        assert c.get(f"/campaigns/{campaign}").status_code == 200
        assert c.get("/login", follow_redirects=False).status_code == 303  # no login needed


def test_no_credentials_refuses_other_host_names(settings: Settings) -> None:
    """A page whose DNS name was rebound to 127.0.0.1 sends its own name as Host."""
    with TestClient(create_app(settings=settings), base_url="http://evil.example:8025") as c:
        response = c.get("/")
        assert response.status_code == 403
        assert response.headers["content-security-policy"] == CSP
    with TestClient(create_app(settings=settings), base_url="http://localhost:8025") as c:
        assert c.get("/").status_code == 200


def test_bind_beyond_loopback_needs_credentials() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, DashboardAuth())
    with pytest.raises(ConfigurationError) as err:
        check_bind("0.0.0.0", DashboardAuth())
    assert "SES_TASKS_DASHBOARD_TOKEN" in str(err.value)
    assert "SES_TASKS_DASHBOARD_USER" in str(err.value)
    check_bind("0.0.0.0", DashboardAuth(token="t" * 16))
    check_bind("0.0.0.0", DashboardAuth(user="ops", password="pw"))


def test_bind_beyond_loopback_refuses_a_short_token() -> None:
    """A short token is guessable even at 10 guesses per address per 5 minutes."""
    check_bind("127.0.0.1", DashboardAuth(token="t0ken"))  # this machine only: allowed
    with pytest.raises(ConfigurationError) as err:
        check_bind("0.0.0.0", DashboardAuth(token="t" * 15))
    assert err.value.setting == "SES_TASKS_DASHBOARD_TOKEN"
    assert "16" in str(err.value) and "t" * 15 not in str(err.value)


def test_cli_refuses_public_bind_without_credentials(key_prefix: str) -> None:
    with env_vars(SES_TASKS_KEY_PREFIX=key_prefix):
        result = CliRunner().invoke(main, ["dashboard", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    assert "SES_TASKS_DASHBOARD_TOKEN" in result.output


def test_token_required_on_every_bind_when_set(key_prefix: str, campaign: str) -> None:
    settings = load_settings(key_prefix=key_prefix, dashboard_token="s3cret-token")
    with http(create_app(settings=settings)) as c:
        page = c.get("/", headers=HTML)
        assert page.status_code == 401
        login = dom(page.text)
        assert login.find("main").attrs["data-page"] == "login"
        assert login.find("form", id="login").find("input", name="token")
        assert c.get("/api/campaigns").status_code == 401
        wrong = c.get("/", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = c.get("/", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        assert dom(ok.text).find("tr", data_campaign=campaign)
        assert c.get("/static/dashboard.css").status_code == 200  # open


def test_basic_auth(key_prefix: str) -> None:
    settings = load_settings(key_prefix=key_prefix, dashboard_user="ops", dashboard_password="pw!")
    good = base64.b64encode(b"ops:pw!").decode()
    bad = base64.b64encode(b"ops:nope").decode()
    with http(create_app(settings=settings)) as c:
        refused = c.get("/api/campaigns")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        assert c.get("/", headers={"Authorization": f"Basic {bad}"}).status_code == 401
        assert c.get("/", headers={"Authorization": f"Basic {good}"}).status_code == 200


def test_login_form_sets_a_strict_session_cookie(key_prefix: str) -> None:
    settings = load_settings(key_prefix=key_prefix, dashboard_token="s3cret-token")
    with http(create_app(settings=settings)) as c:
        form = c.get("/login", headers=HTML)
        assert form.status_code == 200
        token = csrf_of(form.text)
        wrong = c.post("/login", data={"csrf_token": token, "token": "guess"})
        assert wrong.status_code == 401
        done = c.post(
            "/login",
            data={"csrf_token": token, "token": "s3cret-token", "next": "//evil.example/"},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert done.headers["location"] == "/"  # never another site
        cookie = done.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert c.get("/", headers=HTML).status_code == 200  # the session cookie suffices


def test_credentials_from_files_and_masked(tmp_path: Path, key_prefix: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    with env_vars(SES_TASKS_KEY_PREFIX=key_prefix, SES_TASKS_DASHBOARD_TOKEN_FILE=str(token_file)):
        settings = load_settings()
    assert settings.dashboard_token is not None
    assert settings.dashboard_token.get_secret_value() == "from-a-file"
    assert "from-a-file" not in repr(settings)
    assert "from-a-file" not in repr(DashboardAuth.from_settings(settings))
    with pytest.raises(ConfigurationError) as err:
        load_settings(dashboard_user="ops")
    assert "SES_TASKS_DASHBOARD_PASSWORD" in str(err.value)


# CSRF ---------------------------------------------------------------------------------------


def test_actions_need_a_csrf_token_and_same_origin(
    settings: Settings, client: SesTasks, campaign: str
) -> None:
    with http(create_app(settings=settings)) as c:
        page = c.get(f"/campaigns/{campaign}")
        token = csrf_of(page.text)
        url = f"/campaigns/{campaign}/pause"
        assert c.post(url, data={}).status_code == 403
        assert c.post(url, data={"csrf_token": "0" * 64}).status_code == 403
        cross = c.post(url, data={"csrf_token": token}, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403
        cross_referer = c.post(
            url, data={"csrf_token": token}, headers={"Referer": "http://evil.example/x"}
        )
        assert cross_referer.status_code == 403
        assert client.campaign_status(campaign).state is CampaignState.RUNNING
        done = c.post(
            url,
            data={"csrf_token": token},
            headers={"Origin": LOOPBACK},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert done.headers["location"].startswith(f"/campaigns/{campaign}?")
    assert client.campaign_status(campaign).state is CampaignState.PAUSED


def test_a_token_is_only_good_with_its_own_session(settings: Settings, campaign: str) -> None:
    with http(create_app(settings=settings)) as c:
        token = csrf_of(c.get(f"/campaigns/{campaign}").text)
        c.cookies.clear()
        c.get("/")  # another session
        refused = c.post(f"/campaigns/{campaign}/pause", data={"csrf_token": token})
        assert refused.status_code == 403


def test_a_bearer_token_posts_without_csrf_but_basic_auth_does_not(
    key_prefix: str, client: SesTasks, campaign: str
) -> None:
    """A browser never adds ``Authorization: Bearer`` by itself; it does replay basic auth."""
    settings = load_settings(
        key_prefix=key_prefix,
        dashboard_token="s3cret-token",
        dashboard_user="ops",
        dashboard_password="pw!",
    )
    basic = base64.b64encode(b"ops:pw!").decode()
    url = f"/campaigns/{campaign}/pause"
    with http(create_app(settings=settings)) as c:
        refused = c.post(url, headers={"Authorization": f"Basic {basic}"})
        assert refused.status_code == 403
        assert client.campaign_status(campaign).state is CampaignState.RUNNING
        cross = c.post(
            url, headers={"Authorization": "Bearer s3cret-token", "Origin": "http://evil.example"}
        )
        assert cross.status_code == 403
        wrong = c.post(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        done = c.post(url, headers={"Authorization": "Bearer s3cret-token"}, follow_redirects=False)
        assert done.status_code == 303
    assert client.campaign_status(campaign).state is CampaignState.PAUSED


# Headers, escaping, read-only -----------------------------------------------------------------


def test_strict_headers_on_every_response(settings: Settings, campaign: str) -> None:
    with http(create_app(settings=settings)) as c:
        responses = [
            c.get("/"),
            c.get(f"/campaigns/{campaign}"),
            c.get(f"/campaigns/{campaign}/failures.csv"),
            c.get("/api/campaigns"),
            c.get(f"/api/campaigns/{campaign}"),
            c.get("/static/dashboard.js"),
            c.get("/campaigns/nope"),
            c.get("/no/such/page"),
            c.post(f"/campaigns/{campaign}/pause"),
            c.get("/login", follow_redirects=False),
        ]
    for response in responses:
        assert response.headers["content-security-policy"] == CSP, response.url
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
    assert [r.status_code for r in responses[6:9]] == [404, 404, 403]


def test_no_inline_script_or_style(settings: Settings, campaign: str) -> None:
    with http(create_app(settings=settings)) as c:
        for path in ("/", f"/campaigns/{campaign}", "/campaigns/nope"):
            page = dom(c.get(path).text)
            assert all("src" in s.attrs and not s.text.strip() for s in page.find_all("script"))
            assert not page.find_all("style")
            assert not [n for n in page.iter() if "style" in n.attrs]
            assert not [n for n in page.iter() if any(a.startswith("on") for a in n.attrs)]


def test_recipient_text_is_escaped(settings: Settings, campaign: str) -> None:
    with http(create_app(settings=settings)) as c:
        pages = [c.get("/").text, c.get(f"/campaigns/{campaign}").text]
    for html in pages:
        assert XSS not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    failures = dom(pages[1]).find("table", id="failures")
    rows = failures.find("tbody").find_all("tr")
    assert len(rows) == 2
    for row in rows:
        assert row.find("td", cls="reason").text == XSS  # shown as text
        assert row.find("td", cls="name").text.startswith(XSS)
        assert row.find("td", cls="code").text == "550"


def test_read_only_hides_and_refuses_actions(
    settings: Settings, client: SesTasks, campaign: str
) -> None:
    with http(create_app(settings=settings, read_only=True)) as c:
        page = c.get(f"/campaigns/{campaign}")
        tree = dom(page.text)
        for cls in ("action-pause", "action-resume", "action-cancel", "action-retry"):
            assert not tree.find_all("form", cls=cls)
        token = c.cookies  # a session exists; its token would not help
        assert token
        for action in ("pause", "resume", "cancel", "retry-failed"):
            refused = c.post(f"/campaigns/{campaign}/{action}", data={"csrf_token": "x"})
            assert refused.status_code == 403
    assert client.campaign_status(campaign).state is CampaignState.RUNNING


def test_feedback_mount_is_outside_dashboard_auth(key_prefix: str) -> None:
    """SNS posts come from AWS with the public host name and no dashboard credentials."""
    settings = load_settings(key_prefix=key_prefix, dashboard_token="s3cret-token")
    with env_vars(SES_TASKS_FEEDBACK_ALLOW_ANY_TOPIC="true"):
        app = create_app(settings=settings, feedback=True)
    with TestClient(app, base_url="https://feedback.example.com") as c:
        health = c.get("/sns/health")
        assert health.status_code == 200
        assert health.headers["content-security-policy"] == CSP
        assert c.get("/").status_code == 401  # the dashboard itself still needs the token


def test_feedback_at_the_documented_url_without_a_redirect(key_prefix: str) -> None:
    """``POST /sns`` (what the CLI prints and the docs subscribe) reaches the handler: no
    307 to ``/sns/`` built from a ``Host`` the client chose."""
    settings = load_settings(key_prefix=key_prefix, dashboard_token="s3cret-token")
    with env_vars(SES_TASKS_FEEDBACK_ALLOW_ANY_TOPIC="true"):
        app = create_app(settings=settings, feedback=True)
    with TestClient(app, base_url="https://evil.example") as c:
        for path in ("/sns", "/sns/"):
            response = c.post(path, content=b"not json", follow_redirects=False)
            assert "location" not in response.headers, path
            # the handler's own refusal: it read the body
            assert (response.status_code, response.json()) == (400, {"result": "body is not JSON"})
            assert response.headers["content-security-policy"] == CSP
        assert c.get("/sns", follow_redirects=False).status_code == 405  # POST only, no redirect


def test_cli_refuses_public_bind_with_a_short_token(key_prefix: str) -> None:
    with env_vars(SES_TASKS_KEY_PREFIX=key_prefix, SES_TASKS_DASHBOARD_TOKEN="short-token"):
        result = CliRunner().invoke(main, ["dashboard", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    assert "SES_TASKS_DASHBOARD_TOKEN" in result.output and "16" in result.output
    assert "short-token" not in result.output
