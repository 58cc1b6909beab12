"""The campaign pages against real Redis, campaigns made by the real producer and outcomes
recorded by the store's scripts: the list, counts, chart, failures paged from the not-sent
set, the CSV, the JSON the pages poll, and the actions changing the store."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from html import unescape

import pytest
from starlette.testclient import TestClient

from ses_tasks.config import Settings
from ses_tasks.dashboard import create_app
from ses_tasks.dashboard.queries import PageToken, failures_page
from ses_tasks.produce.client import SesTasks
from ses_tasks.states import CampaignState, MessageState

from .campaign_support import LOOPBACK, Node, csrf_of, dom, record, stored_items

FAILED = 120  # more than two pages of 50


@pytest.fixture
def settings(key_prefix: str) -> Settings:
    return Settings(key_prefix=key_prefix, batch_size=500)


@pytest.fixture
def client(settings: Settings) -> Iterator[SesTasks]:
    ses = SesTasks(settings)
    yield ses
    ses.redis.close()


@pytest.fixture
def big(client: SesTasks) -> str:
    """200 recipients: 60 sent, FAILED failed (code 550, a reason naming each), 20 open."""
    client.send_campaign(
        from_="news@example.com",
        subject="Spring sale",
        text="Hi {{ name }}",
        recipients=[{"email": f"r{i}@example.com", "name": f"Reader {i}"} for i in range(200)],
        campaign_id="big",
    )
    items = stored_items(client, "big")
    record(client, "big", items[:60], MessageState.SENT, code=250, reason="Ok")
    failed = items[60 : 60 + FAILED]
    for start in range(0, FAILED, 40):
        chunk = failed[start : start + 40]
        record(client, "big", chunk, MessageState.FAILED, code=550, reason="mailbox unavailable")
    return "big"


@pytest.fixture
def http(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings=settings), base_url=LOOPBACK) as c:
        yield c


def failure_rows(page: Node) -> dict[str, tuple[str, str, str]]:
    rows = page.find("table", id="failures").find("tbody").find_all("tr")
    return {
        r.find("td", cls="email").text: (
            r.find("td", cls="name").text,
            r.find("td", cls="code").text,
            r.find("td", cls="reason").text,
        )
        for r in rows
    }


def test_list_shows_progress_of_each_campaign(http: TestClient, big: str) -> None:
    page = dom(http.get("/").text)
    assert page.find("main").attrs["data-page"] == "campaigns"
    row = page.find("table", id="campaigns").find("tr", data_campaign=big)
    assert row.find(cls="state").text == "running"
    assert row.find("progress", cls="progress").attrs["value"] == "90"  # 180 of 200 final
    assert row.find(cls="percent").text == "90%"
    assert row.find(cls="sent").text == "60/200"
    assert row.find(cls="rate").text.endswith("/s")
    assert row.find(cls="eta").text
    data = http.get("/api/campaigns").json()["campaigns"]
    assert [c["id"] for c in data] == [big]
    assert (data[0]["percent"], data[0]["sent"], data[0]["total"]) == (90, 60, 200)


def test_campaign_page_counts_chart_and_rates(http: TestClient, big: str) -> None:
    page = dom(http.get(f"/campaigns/{big}").text)
    assert page.find("main").attrs["data-page"] == "campaign"
    assert page.by_id("state").text == "running"
    counts = page.by_id("counts")
    assert counts.find(data_state="sent").text == "60"
    assert counts.find(data_state="failed").text == str(FAILED)
    assert counts.find(data_state="queued").text == "20"
    assert page.find("progress", id="progress").attrs["value"] == "90"
    assert page.by_id("percent").text == "90%"
    chart = page.find("svg", id="chart")
    points = chart.find_all("circle", cls="point")
    assert {p.attrs["class"] for p in points} == {"point sent", "point failed"}
    assert chart.find_all("polyline")
    rates = page.by_id("rates")
    assert rates.find(id="bounce-rate").text == "0.00%"
    assert rates.find(id="bounce-threshold").text == "5.00%"
    assert rates.find(id="complaint-threshold").text == "0.100%"
    assert page.find("a", id="failures-csv").attrs["href"] == f"/campaigns/{big}/failures.csv"
    data = http.get(f"/api/campaigns/{big}").json()
    assert data["counts"]["failed"] == FAILED
    assert data["failures_total"] == FAILED
    assert {p["series"] for p in data["chart"]["points"]} == {"sent", "failed"}


def test_failures_page_from_redis(http: TestClient, big: str, client: SesTasks) -> None:
    first = dom(http.get(f"/campaigns/{big}").text)
    rows1 = failure_rows(first)
    assert len(rows1) == 50
    assert not first.find_all("a", rel="prev")
    second_url = unescape(first.find("a", rel="next").attrs["href"])
    second = dom(http.get(second_url).text)
    rows2 = failure_rows(second)
    assert len(rows2) == 50
    assert not set(rows1) & set(rows2)
    third = dom(http.get(unescape(second.find("a", rel="next").attrs["href"])).text)
    rows3 = failure_rows(third)
    assert len(rows3) == FAILED - 100
    assert not third.find_all("a", rel="next")
    expected = {
        r.email: (r.row[2]["name"], "550", "mailbox unavailable")
        for r in client.failures(big)
        if r.row
    }
    assert {**rows1, **rows2, **rows3} == expected
    back = dom(http.get(unescape(second.find("a", rel="prev").attrs["href"])).text)
    assert failure_rows(back) == rows1


def test_failures_page_reads_only_its_page(settings: Settings, big: str) -> None:
    """A page is one SSCAN walk and one HGETALL per row shown: never the whole set."""
    from ses_tasks.store.connections import async_redis

    keys = SesTasks(settings).store.keys

    async def walk() -> None:
        redis = async_redis(settings.redis_url, settings=settings)
        try:
            page = await failures_page(redis, keys, big, size=10, scan_count=10)
            assert len(page.rows) == 10 and page.next is not None and page.total == FAILED
            pages = [page]
            while (after := pages[-1].next) is not None:
                pages.append(await failures_page(redis, keys, big, start=after, size=10))
            ids = [mid for p in pages for mid in p.ids]
            assert len(ids) == len(set(ids)) == FAILED
            assert all(len(p.ids) == 10 for p in pages[:-1])
            assert PageToken.parse(str(page.next)) == page.next
        finally:
            await redis.aclose()

    asyncio.run(walk())


def test_bad_page_position_is_a_400_naming_it(http: TestClient, big: str) -> None:
    response = http.get(f"/campaigns/{big}?after=x%3Cscript%3E")
    assert response.status_code == 400
    assert "after" in response.text
    assert "<script>" not in response.text


def test_csv_has_every_row(http: TestClient, big: str) -> None:
    response = http.get(f"/campaigns/{big}/failures.csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == FAILED
    assert {r["state"] for r in rows} == {"failed"}
    assert all(r["name"].startswith("Reader ") and r["code"] == "550" for r in rows)
    assert len({r["email"] for r in rows}) == FAILED


def post(http: TestClient, campaign_id: str, action: str, **data: str) -> str:
    token = csrf_of(http.get(f"/campaigns/{campaign_id}").text)
    response = http.post(
        f"/campaigns/{campaign_id}/{action}",
        data={"csrf_token": token, **data},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text[:500]
    location = response.headers["location"]
    assert location.startswith(f"/campaigns/{campaign_id}?")
    return dom(http.get(location).text).by_id("notice").text


def test_actions_change_the_store(http: TestClient, big: str, client: SesTasks) -> None:
    assert post(http, big, "pause") == "Paused."
    assert client.campaign_status(big).state is CampaignState.PAUSED
    assert post(http, big, "resume").startswith("Resumed")
    assert client.campaign_status(big).state is CampaignState.RUNNING
    assert post(http, big, "retry-failed") == f"Retrying: {FAILED} messages re-enqueued."
    status = client.campaign_status(big)
    assert status.counts["failed"] == 0 and status.counts["queued"] == 20 + FAILED
    assert post(http, big, "cancel").startswith("Cancelled")
    assert client.campaign_status(big).state is CampaignState.CANCELLED


def test_refused_action_shows_why(http: TestClient, big: str, client: SesTasks) -> None:
    token = csrf_of(http.get(f"/campaigns/{big}").text)
    response = http.post(f"/campaigns/{big}/resume", data={"csrf_token": token})
    assert response.status_code == 409
    assert "not paused" in dom(response.text).by_id("error").text
    assert client.campaign_status(big).state is CampaignState.RUNNING


def test_unknown_campaign_is_404(http: TestClient) -> None:
    assert http.get("/campaigns/nope").status_code == 404
    assert http.get("/api/campaigns/nope").status_code == 404
    assert http.get("/campaigns/nope/failures.csv").status_code == 404
    assert http.get("/campaigns/..%2F..%2Fetc").status_code == 404


def test_a_campaign_waiting_for_its_send_at_shows_scheduled(
    http: TestClient, client: SesTasks
) -> None:
    from datetime import UTC, datetime, timedelta

    at = datetime.now(UTC) + timedelta(days=1)
    client.send_campaign(
        from_="news@example.com",
        subject="Tomorrow",
        text="Hi",
        recipients=["a@example.com"],
        campaign_id="later",
        send_at=at,
    )
    row = dom(http.get("/").text).find("table", id="campaigns").find("tr", data_campaign="later")
    assert row.find(cls="state").text == "scheduled"
    assert row.find(cls="eta").text == f"starts {at:%Y-%m-%d %H:%M} UTC"
    page = dom(http.get("/campaigns/later").text)
    assert page.by_id("state").text == "scheduled"
    (shown,) = http.get("/api/campaigns").json()["campaigns"]
    assert (shown["state"], shown["stored_state"]) == ("scheduled", "running")


def test_csv_defuses_formulas_split_off_at_semicolons(http: TestClient, client: SesTasks) -> None:
    """Excel in de/fr/nl splits a .csv at ';': no cell may start a formula there either."""
    client.send_campaign(
        from_="news@example.com",
        subject="s",
        text="t",
        recipients=[{"email": "x@example.com", "name": "Bob;@SUM(1+1)"}],
        campaign_id="semi",
    )
    reason = "550 5.1.1 mailbox unavailable;=cmd|' /C calc'!A0"
    record(
        client, "semi", stored_items(client, "semi"), MessageState.FAILED, code=550, reason=reason
    )
    text = http.get("/campaigns/semi/failures.csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["reason"], r["name"]) for r in rows] == [
        (reason.replace(";=", ";'="), "Bob;'@SUM(1+1)")
    ]
    split = [cell for row in csv.reader(io.StringIO(text), delimiter=";") for cell in row]
    assert any(cell.startswith("'=cmd") for cell in split)  # split there, and defused
    assert not [cell for cell in split if cell.lstrip(' "')[:1] in ("=", "+", "-", "@")]
