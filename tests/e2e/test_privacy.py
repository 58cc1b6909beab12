"""Message bodies leave Redis once no message can be sent with them again.

The check reads every key of the shared Redis (result backend, broker, status store)
after the messages are final, looking for markers that only the bodies carry.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
from typing import Any

import redis

from ses_tasks.sandbox.embedded import wait_for

from ..conftest import REDIS_URL


def _forms(marker: str) -> list[bytes]:
    """The marker as stored: raw, and base64 at each alignment (the Redis transport
    keeps message bodies base64-encoded)."""
    raw = marker.encode()
    forms = [raw]
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw)
        forms.append(encoded[(8 * pad + 5) // 6 : -4])
    return forms


def _keys_holding(client: redis.Redis, needles: list[bytes]) -> list[str]:
    """Every key whose value (any type) contains one of ``needles``."""
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        values: list[Any]
        if kind == b"string":
            values = [client.get(key)]
        elif kind == b"hash":
            values = list(client.hgetall(key).values())
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        else:
            continue
        if any(v is not None and n in v for v in values for n in needles):
            found.append(key.decode(errors="replace"))
    return found


def test_no_body_stays_in_redis_once_messages_are_final(make_pipeline):
    marker = f"body-marker-{secrets.token_hex(8)}"
    pipeline = make_pipeline("tls", sandbox_args=["--reject-recipient", "refused@example.com"])
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    sent = client.send_email(
        from_="app@example.com",
        to=["reset@example.com"],
        subject="Reset",
        text=f"Your reset link: https://example.com/r/{marker}",
    )
    refused = client.send_email(
        from_="app@example.com",
        to=["refused@example.com"],
        subject="Reset",
        text=f"Your reset link: https://example.com/r/{marker}",
    )
    assert sent.get(timeout=60)["state"] == "sent"
    assert refused.get(timeout=60)["state"] == "failed"
    status = client.send_campaign(
        from_="news@example.com",
        subject="News",
        text=f"Hello {{{{ email }}}}, {marker}",
        recipients=[f"p{i}@example.com" for i in range(30)],
        campaign_id="private",
    )
    final = pipeline.wait_done(status.id)
    assert final.counts["sent"] == 30
    accepted = pipeline.accepted(at_least=31)
    assert sum(marker in m["data"] for m in accepted) == 31  # the bodies did go out

    # The failed transactional record keeps its metadata, not its body.
    record = client.message_status(refused.message_id)
    assert record is not None and record.state.value == "failed" and record.row is None
    assert "refused@example.com" in record.email

    with redis.Redis.from_url(REDIS_URL) as r:
        # The broker drops its copy when the task is acknowledged, just after the result.
        holders: list[str] = []

        def clean() -> bool:
            holders[:] = _keys_holding(r, _forms(marker))
            return not holders

        with contextlib.suppress(TimeoutError):  # the assertion below names the keys
            wait_for(clean, timeout_s=10, what="no key holding a body")
    assert holders == [], f"bodies left in Redis: {holders}"


def test_a_campaign_with_failed_messages_keeps_its_template_for_retry_failed(make_pipeline):
    pipeline = make_pipeline("tls", sandbox_args=["--reject-recipient", "bad@example.com"])
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    status = client.send_campaign(
        from_="news@example.com",
        subject="News",
        text="Hello {{ email }}",
        recipients=["good@example.com", "bad@example.com"],
        campaign_id="keeps",
    )
    final = pipeline.wait_done(status.id)
    assert final.counts["sent"] == 1 and final.counts["failed"] == 1
    assert client.store.template("keeps") is not None
    failed = client.message_status("keeps.1")
    assert failed is not None and failed.row is not None  # recipient row, for retry-failed
