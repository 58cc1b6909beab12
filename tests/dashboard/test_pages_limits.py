"""The limits page: configured and effective rate per sender profile, the 24-hour quota,
the last AIMD changes and the paused campaigns, read from real Redis."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from ses_tasks.config import Settings
from ses_tasks.store.tracking import StatusStore
from ses_tasks.worker.lanes import make_limiter, make_quota

from ..conftest import REDIS_URL
from .admin_support import dashboard, page

PROFILES = {"eu": {"region": "eu-west-1", "max_send_rate": 40, "max_24h_send": 1000}}
HOSTILE = "<img src=x onerror=alert(1)> bounce rate 6%"


def _settings(key_prefix: str) -> Settings:
    return Settings(
        redis_url=REDIS_URL,
        key_prefix=key_prefix,
        max_send_rate=20,
        profiles=PROFILES,  # type: ignore[arg-type]
    )


def _throttle_and_count(settings: Settings, profile: str, recipients: int) -> None:
    """What a worker's lane does: SES said 454 once; ``recipients`` were counted."""

    async def main() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            lane = settings.for_profile(profile)
            await make_limiter(client, lane, profile).on_throttle()
            await make_quota(client, lane, profile).try_consume(recipients)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_accounts_show_configured_and_effective_rate_and_quota(key_prefix: str) -> None:
    settings = _settings(key_prefix)
    _throttle_and_count(settings, "eu", 7)
    with dashboard(key_prefix, max_send_rate=20, profiles=PROFILES) as client:
        main = page(client, "/limits", "limits")
    accounts = main.one("table", id="accounts")
    rows = {
        tr.attrs["data-account"]: tr for tr in accounts.select("tr") if "data-account" in tr.attrs
    }
    assert set(rows) == {"default", "profile-eu"}
    eu, home = rows["profile-eu"], rows["default"]
    assert eu.cell("configured") == "40.00/s"
    assert eu.cell("effective") == "20.00/s"  # halved by the throttle
    assert "throttled" in eu.classes
    assert eu.cell("quota-used") == "7"
    assert eu.cell("quota-limit") == "1000"
    assert eu.cell("endpoint") == "eu-west-1"
    assert home.cell("configured") == home.cell("effective") == "20.00/s"
    assert home.cell("quota-used") == "0"
    assert home.cell("quota-limit") == "unlimited"

    changes = main.one("table", id="aimd").select("tr", data_account="profile-eu")
    assert len(changes) == 1
    assert changes[0].cell("old-rate") == "40.00/s"
    assert changes[0].cell("new-rate") == "20.00/s"
    assert "throttle" in changes[0].cell("why")
    assert changes[0].cell("at").endswith("UTC")


def test_paused_campaigns_are_listed_with_their_reasons_escaped(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    store = StatusStore(redis_client, key_prefix=key_prefix)
    for cid in ("running", "held", "auto"):
        store.create_campaign(cid, meta={"subject": f"Subject {cid}", "profile": "eu"})
    store.pause("held", "paused by user")
    store.pause("auto", HOSTILE, kind="feedback")
    with dashboard(key_prefix, profiles=PROFILES) as client:
        response = client.get("/limits")
        main = page(client, "/limits", "limits")
    assert "<img src=x" not in response.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in response.text
    paused = main.one("table", id="paused")
    rows = {
        tr.attrs["data-campaign"]: tr for tr in paused.select("tr") if "data-campaign" in tr.attrs
    }
    assert set(rows) == {"held", "auto"}
    assert rows["auto"].cell("reason") == HOSTILE  # text, not markup
    assert rows["auto"].cell("kind") == "feedback"
    assert rows["held"].cell("reason") == "paused by user"
    assert rows["held"].one("a").attrs["href"] == "/campaigns/held"


def test_no_changes_and_nothing_paused_say_so(key_prefix: str) -> None:
    with dashboard(key_prefix) as client:
        main = page(client, "/limits", "limits")
    assert main.one("table", id="aimd").select("tr", cls="change") == []
    assert main.one(id="no-aimd") and main.one(id="no-paused")
    assert [tr.attrs["data-account"] for tr in main.select("tr") if "data-account" in tr.attrs] == [
        "default"
    ]
