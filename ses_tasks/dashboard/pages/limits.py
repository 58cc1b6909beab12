"""Limits: each sender profile's configured and effective rate, its 24-hour quota, the
last AIMD rate changes, and the paused campaigns with their reasons.

Rates come from the limiter's own status script (which applies any recovery due, as the
next send would), so the page shows what the fleet sends at now, not a copy.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ses_tasks.dashboard.admin_queries import account_rows, paused_campaigns, recent_rate_changes
from ses_tasks.dashboard.app import dash

__all__ = ["routes"]


def _stamp(epoch_s: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_s)) if epoch_s else ""


def _rate(per_s: float | None) -> str:
    return "" if per_s is None else f"{per_s:.2f}/s"


async def limits_page(request: Request) -> Response:
    context = dash(request)
    accounts, changes, paused = await asyncio.gather(
        account_rows(context.redis, context.settings),
        recent_rate_changes(context.redis, context.settings),
        paused_campaigns(context.redis, context.keys),
    )
    return context.templates.TemplateResponse(
        request,
        "limits.html",
        {
            "accounts": accounts,
            "changes": changes,
            "paused": paused,
            "stamp": _stamp,
            "rate": _rate,
        },
    )


def routes() -> list[BaseRoute]:
    return [Route("/limits", limits_page, methods=["GET"], name="limits")]
