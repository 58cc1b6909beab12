"""The suppression list's feedback extensions, on fakeredis."""

from __future__ import annotations

import io
import json

import fakeredis
import pytest

from ses_tasks.store.suppression import SuppressionList


@pytest.fixture
def suppression() -> SuppressionList:
    return SuppressionList(fakeredis.FakeRedis(), key_prefix="t")


def test_add_keeps_reason_source_and_time(suppression):
    assert (
        suppression.add(
            [" Jane@Example.com "], reason="complaint: abuse", source="feedback", at=1000.0
        )
        == 1
    )
    entry = suppression.get("jane@example.com")
    assert entry is not None
    assert (entry.reason, entry.source, entry.added_at) == ("complaint: abuse", "feedback", 1000.0)


def test_feedback_does_not_overwrite_the_first_reason(suppression):
    suppression.add(["a@example.com"], reason="bounce: Permanent/General", source="feedback")
    assert (
        suppression.add(
            ["a@example.com", "b@example.com"],
            reason="complaint: abuse",
            source="feedback",
            overwrite=False,
        )
        == 1
    )
    assert suppression.get("a@example.com").reason == "bounce: Permanent/General"
    assert suppression.get("b@example.com").reason == "complaint: abuse"


def test_entries_written_before_sources_existed_read_as_user(suppression):
    suppression.redis.hset(
        suppression.key, "old@example.com", json.dumps({"reason": "added by user", "at": 5})
    )
    [entry] = list(suppression)
    assert (entry.email, entry.source, entry.added_at) == ("old@example.com", "user", 5.0)


def test_transient_bounces_count_inside_the_window_once_per_event(suppression):
    count = suppression.record_transient
    assert count("s@example.com", "e1", window_s=100, now=1000) == 1
    assert count("s@example.com", "e1", window_s=100, now=1001) == 1  # same event again
    assert count("S@example.com", "e2", window_s=100, now=1050) == 2
    assert count("s@example.com", "e3", window_s=100, now=1120) == 2  # e1 left the window
    suppression.add(["s@example.com"])
    suppression.remove(["s@example.com"])  # removal also forgets the transient history
    assert count("s@example.com", "e4", window_s=100, now=1121) == 1


def test_export_csv(suppression):
    suppression.add(["b@example.com"], reason="complaint: abuse", source="feedback", at=20.0)
    suppression.add(["a@example.com"], reason='bounce: "quoted", comma', at=10.0)
    out = io.StringIO()
    assert suppression.export_csv(out) == 2
    assert out.getvalue().splitlines() == [
        "email,reason,source,added_at",
        'a@example.com,"bounce: ""quoted"", comma",user,1970-01-01T00:00:10Z',
        "b@example.com,complaint: abuse,feedback,1970-01-01T00:00:20Z",
    ]
