"""The suppression list's feedback extensions and its canonical keys, on fakeredis."""

from __future__ import annotations

import asyncio
import io
import json

import fakeredis
import pytest

from ses_tasks.errors import ValidationError
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import AsyncStatusStore


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


# One canonical key (Punycode domain, lower case), whichever form is given ----------------

UNICODE = "user@bücher.example"
PUNYCODE = "user@xn--bcher-kva.example"


def store_suppressed(suppression: SuppressionList, emails: list[str]) -> list[bool]:
    """The claim path's lookup (AsyncStatusStore.suppressed) on the same fake server."""
    server = suppression.redis.connection_pool.connection_kwargs["server"]
    store = AsyncStatusStore(fakeredis.FakeAsyncRedis(server=server), key_prefix="t")
    return asyncio.run(store.suppressed(emails))


@pytest.fixture
def shared() -> SuppressionList:
    return SuppressionList(fakeredis.FakeRedis(server=fakeredis.FakeServer()), key_prefix="t")


#: One address: as SES reports it, as rows and users write it, mixed case.
FORMS = [PUNYCODE, UNICODE, "User@BÜCHER.Example", "USER@XN--BCHER-KVA.EXAMPLE"]


@pytest.mark.parametrize("listed", FORMS)
def test_an_idn_address_is_suppressed_in_every_form(shared, listed):
    assert shared.add([listed], reason="bounce", source="feedback", overwrite=False) == 1
    assert [e.email for e in shared] == [PUNYCODE]
    assert all(shared.contains(form) for form in FORMS)
    assert shared.get("user@Bücher.example").reason == "bounce"
    assert store_suppressed(shared, [*FORMS, "other@bücher.example"]) == [True] * 4 + [False]
    assert shared.add(FORMS, source="feedback", overwrite=False) == 0  # already listed
    assert shared.remove([FORMS[2]]) == 1
    assert store_suppressed(shared, FORMS) == [False] * 4


def test_transient_bounces_of_one_idn_address_count_together(suppression):
    count = suppression.record_transient
    assert count(UNICODE, "e1", window_s=100, now=1000) == 1
    assert count(PUNYCODE, "e2", window_s=100, now=1001) == 2
    assert count("User@BÜCHER.example", "e3", window_s=100, now=1002) == 3
    suppression.remove([PUNYCODE])
    assert count(UNICODE, "e4", window_s=100, now=1003) == 1


def test_entries_written_before_keys_were_canonical_still_suppress(shared):
    old = json.dumps({"reason": "bounce: old", "at": 5, "source": "feedback"})
    shared.redis.hset(shared.key, UNICODE, old)  # lower-cased, unicode domain
    assert shared.contains(PUNYCODE) and shared.get("User@Bücher.example").reason == "bounce: old"
    assert store_suppressed(shared, [PUNYCODE, UNICODE]) == [True, True]
    # Adding again keeps the first entry (not new) and moves it to the canonical key.
    assert shared.add([PUNYCODE], reason="later", source="feedback", overwrite=False) == 0
    assert [(e.email, e.reason) for e in shared] == [(PUNYCODE, "bounce: old")]
    assert shared.get(UNICODE).email == PUNYCODE
    shared.redis.hset(shared.key, UNICODE, old)
    assert shared.remove([PUNYCODE]) == 1 and len(shared) == 0


def test_an_invalid_address_is_refused_naming_it_and_nothing_is_written(suppression):
    with pytest.raises(ValidationError, match=r"emails\[1\]: 'not-an-address'"):
        suppression.add(["ok@example.com", "not-an-address"])
    assert len(suppression) == 0
    with pytest.raises(ValidationError, match="email: 'nope@'"):
        suppression.contains("nope@")


def test_the_claim_lookup_never_raises_on_an_invalid_recipient(shared):
    shared.add([PUNYCODE])
    assert store_suppressed(shared, ["not-an-address", UNICODE]) == [False, True]
