"""Campaigns: the list, one campaign (counts, chart, feedback rates, failures, actions), the
failures CSV and the JSON the pages poll for live updates.

Actions call the same ``SesTasks`` methods as ``ses-tasks campaign pause|resume|cancel|
retry-failed``, in a worker thread, so they behave exactly as the CLI's.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route

from ses_tasks.dashboard.app import dash, root
from ses_tasks.dashboard.chart import build_chart
from ses_tasks.dashboard.csvsafe import csv_line, in_chunks
from ses_tasks.dashboard.queries import (
    CampaignView,
    FailureRow,
    PageToken,
    campaign_timeline,
    failures_page,
    format_eta,
    format_rate,
    get_campaign,
    iter_failures,
    recent_campaigns,
)
from ses_tasks.errors import CampaignError, ValidationError
from ses_tasks.produce.client import SesTasks
from ses_tasks.store.tracking import COUNTERS

__all__ = ["ACTIONS", "routes"]

#: Pages of history the failures pager remembers for its "previous" link.
MAX_TRAIL = 200
CSV_COLUMNS = ("email", "state", "code", "reason", "message_id", "name")


def _pause(client: SesTasks, campaign_id: str, _: bool) -> int:
    return int(client.pause(campaign_id))


def _resume(client: SesTasks, campaign_id: str, _: bool) -> int:
    return client.resume(campaign_id)


def _cancel(client: SesTasks, campaign_id: str, _: bool) -> int:
    return client.cancel(campaign_id)


def _retry(client: SesTasks, campaign_id: str, include_unknown: bool) -> int:
    return client.retry_failed(campaign_id, include_unknown=include_unknown)


#: Each action and what its result (a count) says; the notice is never text from the URL.
ACTIONS: dict[str, tuple[Callable[[SesTasks, str, bool], int], Callable[[int], str]]] = {
    "pause": (_pause, lambda n: "Paused." if n else "Already paused."),
    "resume": (_resume, lambda n: f"Resumed: {n} deferred messages re-enqueued."),
    "cancel": (_cancel, lambda n: f"Cancelled: {n} parked messages cancelled now."),
    "retry-failed": (_retry, lambda n: f"Retrying: {n} messages re-enqueued."),
}


def _notice(request: Request) -> str:
    done = ACTIONS.get(request.query_params.get("done", ""))
    count = request.query_params.get("n", "")
    if done is None or not count.isdigit() or len(count) > 12:
        return ""
    return done[1](int(count))


def _not_found(request: Request, campaign_id: str) -> Response:
    return dash(request).templates.TemplateResponse(
        request,
        "error.html",
        {"title": "No such campaign", "message": f"There is no campaign {campaign_id!r}."},
        status_code=404,
    )


def _bad_request(request: Request, exc: ValidationError) -> Response:
    return dash(request).templates.TemplateResponse(
        request, "error.html", {"title": "Bad request", "message": str(exc)}, status_code=400
    )


# The list ---------------------------------------------------------------------------------


async def campaigns_page(request: Request) -> Response:
    context = dash(request)
    views = await recent_campaigns(context.redis, context.keys)
    return context.templates.TemplateResponse(
        request,
        "campaigns.html",
        {"views": views, "format_rate": format_rate, "format_eta": format_eta},
    )


async def campaigns_json(request: Request) -> Response:
    context = dash(request)
    views = await recent_campaigns(context.redis, context.keys)
    return JSONResponse({"campaigns": [v.to_json() for v in views]})


# One campaign -----------------------------------------------------------------------------


def _trail(raw: str | None) -> list[PageToken]:
    if not raw:
        return []
    parts = raw.split("_")
    if len(parts) > MAX_TRAIL:
        parts = parts[-MAX_TRAIL:]
    return [PageToken.parse(p, name="trail") for p in parts]


def _pager_href(base: str, start: PageToken | None, trail: list[PageToken]) -> str:
    query: dict[str, str] = {}
    if start is not None and (start.cursor or start.skip):
        query["after"] = str(start)
    if trail:
        query["trail"] = "_".join(str(t) for t in trail[-MAX_TRAIL:])
    return base + ("?" + urllib.parse.urlencode(query) if query else "") + "#failures"


def _thresholds(request: Request) -> dict[str, Any]:
    fb = dash(request).feedback_settings
    return {
        "bounce_threshold": fb.bounce_pause_rate,
        "complaint_threshold": fb.complaint_pause_rate,
        "min_sample": fb.min_sample,
    }


async def _campaign_context(request: Request, view: CampaignView) -> dict[str, Any]:
    context = dash(request)
    start = PageToken.parse(request.query_params.get("after"))
    trail = _trail(request.query_params.get("trail"))
    page = await failures_page(context.redis, context.keys, view.id, start=start)
    points = await campaign_timeline(context.redis, context.keys, view.status)
    base = f"{root(request)}/campaigns/{view.id}"
    next_href = _pager_href(base, page.next, [*trail, start]) if page.next else None
    prev_href = _pager_href(base, trail[-1], trail[:-1]) if trail else None
    if prev_href is None and (start.cursor or start.skip):
        prev_href = _pager_href(base, None, [])  # history cut short: back to the first page
    return {
        "view": view,
        "status": view.status,
        "counters": COUNTERS,
        "chart": build_chart(points),
        "page": page,
        "page_number": len(trail) + 1,
        "next_href": next_href,
        "prev_href": prev_href,
        "rate_text": format_rate(view.rate),
        "eta_text": format_eta(view),
        **_thresholds(request),
    }


async def campaign_page(request: Request) -> Response:
    context = dash(request)
    campaign_id = request.path_params["campaign_id"]
    view = await get_campaign(context.redis, context.keys, campaign_id)
    if view is None:
        return _not_found(request, campaign_id)
    try:
        data = await _campaign_context(request, view)
    except ValidationError as exc:
        return _bad_request(request, exc)
    data["notice"] = _notice(request)
    data["error"] = ""
    return context.templates.TemplateResponse(request, "campaign.html", data)


async def campaign_json(request: Request) -> Response:
    context = dash(request)
    campaign_id = request.path_params["campaign_id"]
    view = await get_campaign(context.redis, context.keys, campaign_id)
    if view is None:
        return JSONResponse({"error": f"no campaign {campaign_id!r}"}, status_code=404)
    points = await campaign_timeline(context.redis, context.keys, view.status)
    failures = int(await context.redis.scard(context.keys.not_sent(campaign_id)))
    return JSONResponse(
        {
            **view.to_json(),
            "chart": build_chart(points).to_json(),
            "failures_total": failures,
            **_thresholds(request),
        }
    )


# Failures CSV -----------------------------------------------------------------------------


def _csv_row(row: FailureRow) -> tuple[Any, ...]:
    r = row.record
    return (r.email or "", r.state.value, r.code or "", r.reason, r.message_id, row.name)


async def failures_csv(request: Request) -> Response:
    """Every message not sent (the columns of ``ses-tasks campaign failures``, then the
    recipient's name), streamed: 500 records in memory at a time."""
    context = dash(request)
    campaign_id = request.path_params["campaign_id"]
    if await get_campaign(context.redis, context.keys, campaign_id) is None:
        return _not_found(request, campaign_id)

    async def lines() -> AsyncIterator[str]:
        yield csv_line(CSV_COLUMNS)
        async for row in iter_failures(context.redis, context.keys, campaign_id):
            yield csv_line(_csv_row(row))

    return StreamingResponse(
        in_chunks(lines()),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{campaign_id}-failures.csv"'},
    )


# Actions ----------------------------------------------------------------------------------


async def campaign_action(request: Request) -> Response:
    """POST (CSRF-checked by the middleware): run the action, then 303 to the campaign."""
    context = dash(request)
    campaign_id = request.path_params["campaign_id"]
    name = request.path_params["action"]
    if name not in ACTIONS:
        return PlainTextResponse("no such action", status_code=404)
    if context.read_only:
        return PlainTextResponse("the dashboard is read-only", status_code=403)
    view = await get_campaign(context.redis, context.keys, campaign_id)
    if view is None:
        return _not_found(request, campaign_id)
    async with request.form() as form:
        include_unknown = form.get("include_unknown") in ("1", "on", "true")
    try:
        count = await run_in_threadpool(
            ACTIONS[name][0], context.client, campaign_id, include_unknown
        )
    except (CampaignError, ValidationError) as exc:
        view = await get_campaign(context.redis, context.keys, campaign_id) or view
        data = await _campaign_context(request, view)
        data.update(notice="", error=str(exc))
        return context.templates.TemplateResponse(request, "campaign.html", data, status_code=409)
    query = urllib.parse.urlencode({"done": name, "n": count})
    return RedirectResponse(f"{root(request)}/campaigns/{campaign_id}?{query}", status_code=303)


def routes() -> list[BaseRoute]:
    return [
        Route("/", campaigns_page, methods=["GET"], name="campaigns"),
        Route("/api/campaigns", campaigns_json, methods=["GET"], name="campaigns_json"),
        Route("/campaigns/{campaign_id}", campaign_page, methods=["GET"], name="campaign"),
        Route("/api/campaigns/{campaign_id}", campaign_json, methods=["GET"], name="campaign_json"),
        Route(
            "/campaigns/{campaign_id}/failures.csv",
            failures_csv,
            methods=["GET"],
            name="failures_csv",
        ),
        Route(
            "/campaigns/{campaign_id}/{action}",
            campaign_action,
            methods=["POST"],
            name="campaign_action",
        ),
    ]
