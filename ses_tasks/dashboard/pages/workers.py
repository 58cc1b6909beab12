"""Workers: the worker processes that heartbeat, their queues and SMTP pool connections.

Read from what each process writes at every heartbeat (``ses_tasks.worker.heartbeat``): a
process silent for three beats no longer counts for the dispatcher and is shown stale; one
silent for ``heartbeat.KEEP_S`` is gone. A clean stop removes its row at once.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ses_tasks.dashboard.admin_queries import STALE_AFTER_S, WorkerRow, worker_rows
from ses_tasks.dashboard.app import dash
from ses_tasks.queue.app import bulk_queue, transactional_queue
from ses_tasks.smtp.endpoint import PortMode
from ses_tasks.worker.heartbeat import KEEP_S

__all__ = ["routes"]


#: Our queue names and the lane each feeds (names depend on the port mode).
LANES = {
    **{bulk_queue(mode): "bulk" for mode in PortMode},
    **{transactional_queue(mode): "transactional" for mode in PortMode},
}


def _lanes(row: WorkerRow) -> str:
    """The lanes its queues feed: ``bulk, transactional``."""
    if row.info is None:
        return ""
    return ", ".join(sorted({LANES[q] for q in row.info.queues if q in LANES}))


def _pool(row: WorkerRow) -> str:
    """``default: 1 in use, 2 idle of 4`` per profile (and waiting callers when any)."""
    if row.info is None:
        return "unknown"
    parts = []
    for p in row.info.pools:
        text = f"{p.profile or 'default'}: {p.in_use} in use, {p.idle} idle of {p.size}"
        if p.waiting:
            text += f", {p.waiting} waiting"
        parts.append(text)
    return "; ".join(parts) or "none"


async def workers_page(request: Request) -> Response:
    context = dash(request)
    rows = await worker_rows(context.redis, context.keys)
    return context.templates.TemplateResponse(
        request,
        "workers.html",
        {
            "rows": rows,
            "alive": sum(1 for r in rows if not r.stale),
            "pool": _pool,
            "lanes": _lanes,
            "stale_after_s": STALE_AFTER_S,
            "keep_min": int(KEEP_S // 60),
        },
    )


def routes() -> list[BaseRoute]:
    return [Route("/workers", workers_page, methods=["GET"], name="workers")]
