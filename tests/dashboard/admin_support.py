"""Helpers for the suppression, limits and workers page tests: an app on a test's key
prefix (no credentials, so addressed to 127.0.0.1), its CSRF token, and a tiny DOM."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from starlette.testclient import TestClient

from ses_tasks.config import Settings
from ses_tasks.dashboard.app import create_app
from ses_tasks.dashboard.security import DashboardAuth

from ..conftest import REDIS_URL

LOOPBACK = "http://127.0.0.1"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


@contextmanager
def dashboard(key_prefix: str, *, read_only: bool = False, **settings: Any) -> Iterator[TestClient]:
    """A client of a dashboard reading ``key_prefix``'s store."""
    config = Settings(redis_url=REDIS_URL, key_prefix=key_prefix, **settings)
    app = create_app(
        settings=config, read_only=read_only, auth=DashboardAuth(), secret_key=b"k" * 32
    )
    with TestClient(app, base_url=LOOPBACK) as client:
        yield client


def csrf(client: TestClient, path: str = "/suppression") -> str:
    """The CSRF token of this client's session (a page's hidden field)."""
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', client.get(path).text)
    assert match, "no csrf_token field on the page"
    return match.group(1)


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def iter(self) -> Iterator[Node]:
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def select(self, tag: str | None = None, *, cls: str | None = None, **attrs: str) -> list[Node]:
        """Descendants by tag, class and exact attributes (``data_email`` = ``data-email``)."""
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.classes)
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def one(self, tag: str | None = None, *, cls: str | None = None, **attrs: str) -> Node:
        found = self.select(tag, cls=cls, **attrs)
        assert len(found) == 1, f"{len(found)} of {tag or '*'} cls={cls} {attrs}"
        return found[0]

    def cell(self, cls: str) -> str:
        return self.one("td", cls=cls).text.strip()


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def dom(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root


def page(client: TestClient, path: str, name: str) -> Node:
    """GET ``path``: 200 and ``main#page[data-page=name]``; returns that main."""
    response = client.get(path)
    assert response.status_code == 200, response.text[:500]
    return dom(response.text).one("main", id="page", data_page=name)
