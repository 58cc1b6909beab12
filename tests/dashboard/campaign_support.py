"""Helpers for the dashboard's campaign tests: a tiny DOM (stdlib ``html.parser``), and
campaigns whose messages were recorded through the store's real scripts (no workers)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from ses_tasks.produce.client import SesTasks
from ses_tasks.states import MessageState
from ses_tasks.store.tracking import Transition
from ses_tasks.worker.delivery import BatchItem

LOOPBACK = "http://127.0.0.1"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


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

    def find_all(
        self, tag: str | None = None, *, cls: str | None = None, **attrs: str
    ) -> list[Node]:
        out = []
        for node in self.iter():
            if tag is not None and node.tag != tag:
                continue
            if cls is not None and cls not in node.classes:
                continue
            if any(node.attrs.get(k.replace("_", "-")) != v for k, v in attrs.items()):
                continue
            out.append(node)
        return out

    def find(self, tag: str | None = None, *, cls: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, cls=cls, **attrs)
        assert found, f"no {tag or '*'} cls={cls} {attrs}"
        return found[0]

    def by_id(self, id_: str) -> Node:
        return self.find(id=id_)


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

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

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


def csrf_of(html: str) -> str:
    return dom(html).find("input", name="csrf_token").attrs["value"]


def stored_items(client: SesTasks, campaign_id: str) -> list[BatchItem]:
    """Every recipient of the campaign's stored batches, in order."""
    raw = client.redis.hgetall(client.store.keys.batches(campaign_id))
    items = []
    for payload in raw.values():
        items += [BatchItem.from_json(i) for i in json.loads(payload)["items"]]
    return sorted(items, key=lambda i: int(i.seq))


def record(
    client: SesTasks,
    campaign_id: str,
    items: Sequence[BatchItem],
    state: MessageState,
    *,
    code: int = 0,
    reason: str = "",
) -> None:
    """Claim ``items`` and record ``state`` for them, as a worker would."""
    store = client.store
    claims: list[tuple[str, str, bool]] = [
        (f"{campaign_id}.{i.seq}", i.email, False) for i in items
    ]
    store.claim(campaign_id, claims, lease_s=60, token="test")
    keep_row = state in (MessageState.FAILED, MessageState.UNKNOWN)
    store.finish(
        campaign_id,
        [
            Transition(
                f"{campaign_id}.{i.seq}",
                state,
                code,
                reason,
                ses_message_id=f"ses-{i.seq}" if state is MessageState.SENT else None,
                row=i.to_json() if keep_row else None,
            )
            for i in items
        ],
        settle=_settle(),
    )


def _settle() -> Any:
    from ses_tasks.store.tracking import Settlement

    return Settlement(token="test")
