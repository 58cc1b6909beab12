"""The suppression page: search, add, remove, export, paging, escaping and read-only mode,
against real Redis through the app's own middleware (CSRF, CSP)."""

from __future__ import annotations

import csv
import io
import urllib.parse

import redis

from ses_tasks.dashboard.admin_queries import MAX_SCANS_PER_PAGE, PAGE_SIZE, SCAN_COUNT
from ses_tasks.store.suppression import SuppressionList

from .admin_support import Node, csrf, dashboard, dom, page

XSS = "<script>alert(1)</script>"


def _rows(main: Node) -> dict[str, Node]:
    table = main.one("table", id="suppressed")
    return {tr.attrs["data-email"]: tr for tr in table.select("tr") if "data-email" in tr.attrs}


def test_add_search_and_remove(redis_client: redis.Redis, key_prefix: str) -> None:
    listed = SuppressionList(redis_client, key_prefix=key_prefix)
    listed.add(["other@example.org"], reason="Permanent bounce")
    with dashboard(key_prefix) as client:
        token = csrf(client)
        added = client.post(
            "/suppression/add",
            data={"csrf_token": token, "email": " Alice@Example.COM ", "reason": "asked by phone"},
            follow_redirects=False,
        )
        assert added.status_code == 303
        location = urllib.parse.urlsplit(added.headers["location"])
        assert location.path == "/suppression"
        assert urllib.parse.parse_qs(location.query)["q"] == ["alice@example.com"]
        entry = listed.get("alice@example.com")
        assert entry is not None and entry.reason == "asked by phone"

        main = page(client, added.headers["location"], "suppression")
        rows = _rows(main)
        assert list(rows) == ["alice@example.com"]  # the search narrowed the list
        row = rows["alice@example.com"]
        assert row.cell("email") == "alice@example.com"
        assert row.cell("reason") == "asked by phone"
        assert row.cell("added").endswith("UTC")
        form = row.one("form", cls="action-unsuppress")
        assert form.attrs["action"] == "/suppression/remove"
        assert form.attrs["method"] == "post"
        assert main.one("a", id="suppression-export").attrs["href"] == "/suppression.csv"

        removed = client.post(
            "/suppression/remove",
            data={"csrf_token": token, "email": "alice@example.com", "q": "alice"},
            follow_redirects=False,
        )
        assert removed.status_code == 303
        assert not listed.contains("alice@example.com")
        after = page(client, removed.headers["location"], "suppression")
        assert _rows(after) == {}
        assert "Removed alice@example.com" in after.one("p", id="notice").text
        assert list(_rows(page(client, "/suppression", "suppression"))) == ["other@example.org"]


def test_search_matches_prefixes_and_substrings_literally(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    listed = SuppressionList(redis_client, key_prefix=key_prefix)
    listed.add(["alice@example.com", "alina@example.org", "bob@example.org", "carl@bücher.example"])
    with dashboard(key_prefix) as client:

        def found(q: str) -> set[str]:
            return set(
                _rows(
                    page(client, "/suppression?" + urllib.parse.urlencode({"q": q}), "suppression")
                )
            )

        assert found("ali") == {"alice@example.com", "alina@example.org"}
        assert found("EXAMPLE.ORG") == {"alina@example.org", "bob@example.org"}
        assert found("xn--bcher") == {"carl@xn--bcher-kva.example"}
        assert found("bücher") == {"carl@xn--bcher-kva.example"}  # searched as stored
        assert found("l@Bücher.exa") == {"carl@xn--bcher-kva.example"}
        assert found("carl@bücher.example") == {"carl@xn--bcher-kva.example"}  # exact lookup
        assert found("*") == set()  # glob characters are literal
        assert found("a?i") == set()


def test_a_bad_address_is_refused_naming_the_field(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    listed = SuppressionList(redis_client, key_prefix=key_prefix)
    with dashboard(key_prefix) as client:
        token = csrf(client)
        bad = client.post(
            "/suppression/add",
            data={"csrf_token": token, "email": "not-an-address", "reason": "x"},
        )
        assert bad.status_code == 400
        main = dom(bad.text).one("main", id="page", data_page="suppression")
        error = main.one(cls="error").text
        assert error.startswith("email:") and "not-an-address" in error and "@" in error
        form = main.one("form", id="suppress-add")
        assert form.one("input", name="email").attrs["value"] == "not-an-address"  # kept

        long_reason = client.post(
            "/suppression/add",
            data={"csrf_token": token, "email": "ok@example.com", "reason": "r" * 501},
        )
        assert long_reason.status_code == 400
        assert dom(long_reason.text).one(cls="error").text.startswith("reason:")

        empty = client.post("/suppression/add", data={"csrf_token": token, "email": " "})
        assert empty.status_code == 400
        assert dom(empty.text).one(cls="error").text.startswith("email:")
    assert len(listed) == 0


def test_recipient_text_is_escaped_and_the_csp_is_strict(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    SuppressionList(redis_client, key_prefix=key_prefix).add(["x@example.com"], reason=XSS)
    with dashboard(key_prefix) as client:
        response = client.get("/suppression")
        assert response.status_code == 200
        assert XSS not in response.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
        assert "<script>" not in response.text.replace(
            '<script src="/static/dashboard.js" defer></script>', ""
        )
        assert "style=" not in response.text
        assert "script-src 'self'" in response.headers["content-security-policy"]
        reason = dom(response.text).one("tr", data_email="x@example.com").cell("reason")
        assert reason == XSS  # shown as text, not run


def test_pages_follow_next_links_through_the_whole_list(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    listed = SuppressionList(redis_client, key_prefix=key_prefix)
    everyone = {f"user{n:04d}@example.com" for n in range(3 * PAGE_SIZE)}
    listed.add(sorted(everyone))
    seen: list[str] = []
    with dashboard(key_prefix) as client:
        path: str | None = "/suppression"
        pages = 0
        while path is not None:
            main = page(client, path, "suppression")
            seen += list(_rows(main))
            nxt = main.select("a", rel="next")
            path = nxt[0].attrs["href"] if nxt else None
            pages += 1
            assert pages < 20, "paging does not end"
    assert pages >= 3
    assert set(seen) == everyone


def test_a_search_of_a_large_list_stops_after_its_budget(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:suppressed"
    n = 3 * MAX_SCANS_PER_PAGE * SCAN_COUNT
    entry = b'{"reason": "bulk", "at": 1700000000, "source": "user"}'
    pipe = redis_client.pipeline(transaction=False)
    for start in range(0, n, 5000):
        pipe.hset(key, mapping={f"u{i}@example.com": entry for i in range(start, start + 5000)})
    pipe.execute()
    with dashboard(key_prefix) as client:
        main = page(client, "/suppression?q=nobody-matches-this", "suppression")
        assert _rows(main) == {}
        assert main.select("a", rel="next"), "a search that ran out of budget offers to go on"
        exact = page(client, f"/suppression?q=u{n - 1}@example.com", "suppression")
        assert f"u{n - 1}@example.com" in _rows(exact)  # an exact address is found at once


def test_export_streams_every_entry_and_defuses_formulas(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    listed = SuppressionList(redis_client, key_prefix=key_prefix)
    listed.add([f"e{i}@example.com" for i in range(300)], reason="bounce")
    listed.add(["f@example.com"], reason='=HYPERLINK("http://evil.example")')
    with dashboard(key_prefix) as client:
        response = client.get("/suppression.csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["email", "reason", "source", "added_at"]
    by_email = {r[0]: r for r in rows[1:]}
    assert len(rows) - 1 == len(by_email) == 301
    assert by_email["f@example.com"][1] == '\'=HYPERLINK("http://evil.example")'
    assert by_email["e0@example.com"][1:3] == ["bounce", "user"]


def test_read_only_shows_no_forms_and_refuses_posts(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    listed = SuppressionList(redis_client, key_prefix=key_prefix)
    listed.add(["kept@example.com"], reason="bounce")
    with dashboard(key_prefix, read_only=True) as client:
        main = page(client, "/suppression", "suppression")
        assert main.select("form", id="suppress-add") == []
        assert main.select("form", cls="action-unsuppress") == []
        assert main.select("form", id="suppression-search")  # reading still works
        assert "kept@example.com" in _rows(main)
        token_page = client.get("/suppression").text
        assert 'name="csrf_token"' not in token_page.split("<main", 1)[1]
        for path, email in (
            ("/suppression/add", "new@example.com"),
            ("/suppression/remove", "kept@example.com"),
        ):
            response = client.post(path, data={"email": email})
            assert response.status_code == 403
    assert listed.contains("kept@example.com") and not listed.contains("new@example.com")


def test_a_post_without_its_csrf_token_is_refused(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    listed = SuppressionList(redis_client, key_prefix=key_prefix)
    with dashboard(key_prefix) as client:
        csrf(client)  # the session exists; the token is left out
        response = client.post("/suppression/add", data={"email": "a@example.com"})
        assert response.status_code == 403
        forged = client.post(
            "/suppression/add", data={"email": "a@example.com", "csrf_token": "0" * 64}
        )
        assert forged.status_code == 403
    assert not listed.contains("a@example.com")


def test_notices_show_only_a_canonical_address_from_the_url(key_prefix: str) -> None:
    """The notice is built from the redirect's query: a crafted link must not make the page
    say anything but an address."""
    lure = "support@yourbank.example - your account is locked, call 555-0100"
    with dashboard(key_prefix) as client:

        def notice(**query: str) -> str:
            main = page(client, "/suppression?" + urllib.parse.urlencode(query), "suppression")
            return main.one("p", id="notice").text

        assert notice(done="remove", email=lure) == "Removed the address from the list."
        assert notice(done="absent", email=lure) == "The address was not on the list."
        assert notice(done="add", q=lure) == "Suppressed the address."
        generic = "Removed the address from the list."
        assert notice(done="remove", email="Bob <bob@example.com>") == generic
        assert notice(done="remove", email="Bob@Example.com") == generic  # not canonical
        shown = "bob@example.com"
        assert notice(done="remove", email=shown) == f"Removed {shown} from the list."
        assert notice(done="absent", email=shown) == f"{shown} was not on the list."
        assert notice(done="add", q="bob@example.com") == "Suppressed bob@example.com."


def test_export_defuses_formulas_split_off_at_semicolons(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    reason = "550 5.1.1 mailbox unavailable;=cmd|' /C calc'!A0"
    SuppressionList(redis_client, key_prefix=key_prefix).add(["s@example.com"], reason=reason)
    with dashboard(key_prefix) as client:
        text = client.get("/suppression.csv").text
    assert list(csv.reader(io.StringIO(text)))[1][1] == reason.replace(";=", ";'=")
    split = [cell for row in csv.reader(io.StringIO(text), delimiter=";") for cell in row]
    assert any(cell.startswith("'=cmd") for cell in split)  # split there, and defused
    assert not [cell for cell in split if cell.lstrip(' "')[:1] in ("=", "+", "-", "@")]
