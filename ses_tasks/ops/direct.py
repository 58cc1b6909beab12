"""One-off operations that talk to SES (or Redis) directly, without the queue."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, is_dataclass
from typing import Any

from ses_tasks.config import Settings
from ses_tasks.message.spec import MessageSpec, render_message
from ses_tasks.smtp.endpoint import make_tls_context
from ses_tasks.smtp.pool import SmtpPool
from ses_tasks.smtp.replies import SendResult, to_error
from ses_tasks.states import Outcome
from ses_tasks.store.connections import async_redis

__all__ = ["limits_status", "probe", "send_direct"]


def _pool(settings: Settings, size: int = 1) -> SmtpPool:
    return SmtpPool(
        settings.endpoint,
        tls_context=make_tls_context(settings.ca_file),
        username=settings.username,
        password=settings.smtp_password(),
        size=size,
        min_size=0,
        connect_timeout_s=settings.connect_timeout,
        send_timeout_s=settings.send_timeout,
    )


def send_direct(settings: Settings, fields: dict[str, Any]) -> SendResult:
    """Validate, render and send one message now; raises a ``DeliveryError`` if not sent."""
    fields = {k: v for k, v in fields.items() if v not in (None, [], ())}
    fields.setdefault("configuration_set", settings.configuration_set)
    spec = MessageSpec.model_validate(fields)
    rendered = render_message(spec, max_bytes=settings.max_message_bytes)

    async def run() -> SendResult:
        pool = _pool(settings)
        try:
            return await pool.send(rendered.envelope_from, rendered.recipients, rendered.data)
        finally:
            await pool.close()

    result = asyncio.run(run())
    if result.outcome is not Outcome.SENT:
        raise to_error(result)
    return result


def probe(settings: Settings) -> dict[str, Any]:
    async def run() -> Any:
        pool = _pool(settings)
        try:
            return await pool.probe()
        finally:
            await pool.close()

    info = asyncio.run(run())
    data = asdict(info) if is_dataclass(info) and not isinstance(info, type) else dict(info)
    return {"endpoint": settings.endpoint.key, **data}


def effective_rates(settings: Settings) -> dict[str, float]:
    """Each sender profile's send rate now (configured, lowered after throttles)."""
    data = limits_status(settings, with_campaigns=False)
    return {name: float(p["rate"]["effective_rate_per_s"]) for name, p in data["profiles"].items()}


def limits_status(settings: Settings, *, with_campaigns: bool = True) -> dict[str, Any]:
    """Rate limiter and 24-hour quota of every sender profile ('' is the unnamed one)."""
    from ses_tasks.worker.lanes import make_limiter, make_quota

    async def one(client: Any, name: str) -> dict[str, Any]:
        s = settings.for_profile(name)
        limiter, quota = make_limiter(client, s, name), make_quota(client, s, name)
        rate = await limiter.status()
        used = await quota.status()
        return {
            "endpoint": s.endpoint.key,
            "rate": asdict(rate) if is_dataclass(rate) else rate,
            "quota": asdict(used) if is_dataclass(used) else used,
        }

    async def run() -> dict[str, Any]:
        client = async_redis(settings.redis_url, settings=settings)
        try:
            profiles = {name: await one(client, name) for name in ["", *settings.profiles]}
        finally:
            await client.aclose()
        default = profiles[""]
        return {"rate": default["rate"], "quota": default["quota"], "profiles": profiles}

    data = asyncio.run(run())
    if not with_campaigns:
        return data
    from ses_tasks.produce.client import SesTasks

    client = SesTasks(settings)
    paused = []
    for cid in client.store.list_campaigns(200):
        status = client.store.campaign_status(cid)
        if status.state.value == "paused":
            paused.append({"id": cid, "reason": status.reason})
    data["paused_campaigns"] = paused
    return data
