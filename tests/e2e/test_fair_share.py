"""Campaigns side by side on one fleet: fair share by weight, through real workers.

The invariants: a small campaign started behind a big one gets its share of the rate at
once (not after the big one's backlog), weights split the sends while both run, single
messages keep their priority, and every recipient is sent exactly once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.store.tracking import COUNTERS

TEMPLATE = dict(from_="news@example.com", subject="Hi", text="x")


def _recipients(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def _adds_up(status) -> bool:
    return sum(status.counts[n] for n in COUNTERS) == status.total


def _once_each(pipeline, expected: int) -> Counter:
    delivered = Counter(r for m in pipeline.accepted(at_least=expected) for r in m["rcpt_tos"])
    assert len(delivered) == expected and max(delivered.values()) == 1
    return delivered


def test_a_small_campaign_behind_a_big_one_finishes_in_its_fair_share(make_pipeline):
    rate = 50.0
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE=str(rate))
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    client.send_campaign(recipients=_recipients("a", 1500), campaign_id="big", **TEMPLATE)
    wait_for(lambda: client.campaign_status("big").counts["sent"] >= 5 * rate, timeout_s=60)

    alone_s = _latency(client, "alone@example.com")  # one campaign saturates the rate

    started = time.time()
    client.send_campaign(recipients=_recipients("b", 50), campaign_id="small", **TEMPLATE)
    during_s = _latency(client, "during@example.com")  # two campaigns share it
    small = pipeline.wait_done("small", timeout_s=60)
    assert small.counts["sent"] == 50 and _adds_up(small)
    big = pipeline.wait_done("big", timeout_s=120)
    assert big.counts["sent"] == 1500 and _adds_up(big)

    accepted = pipeline.accepted(at_least=1552)
    b_times = sorted(m["received_at"] for m in accepted if m["rcpt_tos"][0].startswith("b"))
    fair_share_s = 50 / (rate / 2)  # an even split of the rate
    first_s, last_s = b_times[0] - started, b_times[-1] - started
    print(f"small: first send {first_s:.2f} s, done {last_s:.2f} s, fair {fair_share_s:.1f} s")
    assert first_s < 2.0
    assert last_s < 3 * fair_share_s
    assert during_s < max(1.0, 3 * alone_s), (alone_s, during_s)
    _once_each(pipeline, 1552)


def test_weights_split_the_rate(make_pipeline):
    rate = 100.0
    pipeline = make_pipeline("starttls", SES_TASKS_MAX_SEND_RATE=str(rate))
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    threads = [
        threading.Thread(
            target=client.send_campaign,
            kwargs=dict(recipients=_recipients(p, 900), campaign_id=cid, weight=w, **TEMPLATE),
        )
        for p, cid, w in (("h", "heavy", 3.0), ("l", "light", 1.0))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for cid in ("heavy", "light"):
        status = pipeline.wait_done(cid, timeout_s=120)
        assert status.counts["sent"] == 900 and _adds_up(status)
    accepted = pipeline.accepted(at_least=1800)
    times = {
        p: sorted(m["received_at"] for m in accepted if m["rcpt_tos"][0].startswith(p))
        for p in "hl"
    }
    # While both send (after the first second's burst, before the heavy one ends):
    lo = max(times["h"][0], times["l"][0]) + 1.0
    hi = min(times["h"][-1], times["l"][-1]) - 0.5
    assert hi - lo > 4.0, (lo, hi)
    heavy = sum(lo <= t < hi for t in times["h"])
    light = sum(lo <= t < hi for t in times["l"])
    print(f"weights 3:1 -> sends {heavy}:{light} = {heavy / light:.2f} over {hi - lo:.1f} s")
    assert 3 * 0.85 <= heavy / light <= 3 * 1.15
    _once_each(pipeline, 1800)


def _latency(client, to: str) -> float:
    """Seconds from enqueueing a transactional message to its final record."""
    start = time.monotonic()
    result = client.send_email(from_="app@example.com", to=[to], subject="s", text="t")
    assert result.get(timeout=30)["state"] == "sent"
    return time.monotonic() - start
