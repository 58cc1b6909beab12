"""The suppression list: search, add, remove, export.

Reads page the list's hash (``admin_queries.suppression_page``); adding and removing call
the same ``SuppressionList`` methods as ``ses-tasks suppress`` (in a worker thread), so an
address is stored in its canonical form and legacy entries are found and moved as there.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ses_tasks.dashboard.admin_queries import iter_suppressed, suppression_page
from ses_tasks.dashboard.app import dash, root
from ses_tasks.dashboard.csvsafe import csv_line, in_chunks
from ses_tasks.errors import ValidationError
from ses_tasks.message.address import canonical_address
from ses_tasks.store.suppression import EXPORT_FIELDS, SuppressionEntry

__all__ = ["MAX_QUERY_CHARS", "MAX_REASON_CHARS", "routes"]

#: Longest search accepted (an address is at most 254 characters).
MAX_QUERY_CHARS = 320
#: Longest reason stored from the form.
MAX_REASON_CHARS = 500
DEFAULT_REASON = "added from the dashboard"


def _stamp(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_s)) if epoch_s else ""


def _href(request: Request, **query: str) -> str:
    query = {k: v for k, v in query.items() if v}
    return f"{root(request)}/suppression" + ("?" + urllib.parse.urlencode(query) if query else "")


def _cursor(raw: str | None) -> int:
    if not raw:
        return 0
    if not raw.isdigit() or len(raw) > 20:
        raise ValidationError("after", "must be a page cursor from a 'next' link")
    return int(raw)


def _query(raw: str | None) -> str:
    q = (raw or "").strip()
    if len(q) > MAX_QUERY_CHARS:
        raise ValidationError("q", f"at most {MAX_QUERY_CHARS} characters")
    return q


async def _render(
    request: Request,
    *,
    q: str = "",
    cursor: int = 0,
    error: str = "",
    notice: str = "",
    form: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    context = dash(request)
    page = await suppression_page(context.redis, context.keys, q=q, cursor=cursor)
    next_href = (
        _href(request, q=q, after=str(page.next_cursor)) if page.next_cursor is not None else None
    )
    return context.templates.TemplateResponse(
        request,
        "suppression.html",
        {
            "q": q,
            "page": page,
            "first_page": cursor == 0,
            "first_href": _href(request, q=q),
            "next_href": next_href,
            "stamp": _stamp,
            "error": error,
            "notice": notice,
            "form": form or {"email": "", "reason": ""},
            "max_reason": MAX_REASON_CHARS,
        },
        status_code=status_code,
    )


async def suppression_get(request: Request) -> Response:
    try:
        q = _query(request.query_params.get("q"))
        cursor = _cursor(request.query_params.get("after"))
    except ValidationError as exc:
        return await _render(request, error=str(exc), status_code=400)
    done = request.query_params.get("done")
    added = _shown_address(q)
    removed = _shown_address(request.query_params.get("email", "")[:MAX_QUERY_CHARS])
    notice = {
        "add": f"Suppressed {added or 'the address'}.",
        "remove": f"Removed {removed or 'the address'} from the list.",
        "absent": f"{removed or 'The address'} was not on the list.",
    }.get(done or "", "")
    return await _render(request, q=q, cursor=cursor, notice=notice)


def _shown_address(value: str | None) -> str | None:
    """``value`` if it is an address in canonical form (what the add and remove redirects
    carry), else None: a notice never repeats other text from a URL, which anyone can craft
    ("Removed support@bank.example - your account is locked, call ...")."""
    if not value:
        return None
    try:
        return value if canonical_address(value, "email") == value else None
    except ValidationError:
        return None


def _refuse_read_only(request: Request) -> Response | None:
    if dash(request).read_only:
        return PlainTextResponse("the dashboard is read-only", status_code=403)
    return None


async def suppression_add(request: Request) -> Response:
    """POST (CSRF-checked by the middleware): suppress one address, then 303 to it."""
    if (refused := _refuse_read_only(request)) is not None:
        return refused
    async with request.form() as data:
        email = str(data.get("email") or "").strip()
        reason = " ".join(str(data.get("reason") or "").split())
    form = {"email": email, "reason": reason}
    try:
        if not email:
            raise ValidationError("email", "enter the address to suppress")
        name = canonical_address(email, "email")
        if len(reason) > MAX_REASON_CHARS:
            raise ValidationError("reason", f"at most {MAX_REASON_CHARS} characters")
    except ValidationError as exc:
        return await _render(request, error=str(exc), form=form, status_code=400)
    client = dash(request).client
    await run_in_threadpool(
        lambda: client.suppression.add([name], reason=reason or DEFAULT_REASON, source="user")
    )
    return RedirectResponse(_href(request, q=name, done="add"), status_code=303)


async def suppression_remove(request: Request) -> Response:
    """POST (CSRF-checked by the middleware): unsuppress one address, then 303 back."""
    if (refused := _refuse_read_only(request)) is not None:
        return refused
    async with request.form() as data:
        email = str(data.get("email") or "").strip()
        q = str(data.get("q") or "").strip()[:MAX_QUERY_CHARS]
    try:
        if not email:
            raise ValidationError("email", "name the address to remove")
        name = canonical_address(email, "email")
    except ValidationError as exc:
        return await _render(request, q=q, error=str(exc), status_code=400)
    client = dash(request).client
    removed = await run_in_threadpool(lambda: client.suppression.remove([email]))
    done = "remove" if removed else "absent"
    return RedirectResponse(_href(request, q=q, done=done, email=name), status_code=303)


def _csv_row(entry: SuppressionEntry) -> tuple[Any, ...]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.added_at))
    return (entry.email, entry.reason, entry.source, stamp)


async def suppression_csv(request: Request) -> Response:
    """The whole list (the columns of ``ses-tasks suppress export``), streamed in hash order."""
    context = dash(request)

    async def lines() -> AsyncIterator[str]:
        yield csv_line(EXPORT_FIELDS)
        async for entry in iter_suppressed(context.redis, context.keys):
            yield csv_line(_csv_row(entry))

    return StreamingResponse(
        in_chunks(lines()),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="suppression.csv"'},
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/suppression", suppression_get, methods=["GET"], name="suppression"),
        Route("/suppression.csv", suppression_csv, methods=["GET"], name="suppression_csv"),
        Route("/suppression/add", suppression_add, methods=["POST"], name="suppression_add"),
        Route(
            "/suppression/remove", suppression_remove, methods=["POST"], name="suppression_remove"
        ),
    ]
