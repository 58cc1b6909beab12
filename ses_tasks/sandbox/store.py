"""What the sandbox accepted, in memory and as append-only JSONL.

The accepted-message store is written through: a message is on disk before the client
sees ``250 Ok``, so a reader never finds a message acknowledged but missing. The events
log is diagnostic and is written in batches (by size, and by the sandbox's periodic flush).
Message bytes are stored as text with ``surrogateescape``: JSON escapes the stray bytes
and :func:`read_messages` gives back the exact bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ses_tasks.smtp.endpoint import PortMode

__all__ = ["AcceptedMessage", "JsonlWriter", "read_jsonl", "read_messages"]

DEFAULT_BATCH_LINES = 512


@dataclass(frozen=True, slots=True)
class AcceptedMessage:
    """One message the sandbox answered ``250 Ok <ses_message_id>``."""

    ses_message_id: str
    mail_from: str
    rcpt_tos: list[str]
    #: The message bytes as received, or None when the sandbox runs with ``keep_data=False``.
    data: bytes | None
    size: int
    session_id: str
    mode: PortMode
    #: Unix time (seconds).
    received_at: float

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ses_message_id": self.ses_message_id,
            "mail_from": self.mail_from,
            "rcpt_tos": self.rcpt_tos,
            "size": self.size,
            "session_id": self.session_id,
            "mode": self.mode.value,
            "received_at": self.received_at,
        }
        if self.data is not None:
            record["data"] = self.data.decode("utf-8", "surrogateescape")
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> AcceptedMessage:
        data = record.get("data")
        return cls(
            ses_message_id=record["ses_message_id"],
            mail_from=record["mail_from"],
            rcpt_tos=list(record["rcpt_tos"]),
            data=None if data is None else data.encode("utf-8", "surrogateescape"),
            size=int(record["size"]),
            session_id=record["session_id"],
            mode=PortMode(record["mode"]),
            received_at=float(record["received_at"]),
        )


class JsonlWriter:
    """Append one JSON object per line; write in batches; ``close`` flushes the rest."""

    def __init__(self, path: str | Path, *, batch_lines: int = DEFAULT_BATCH_LINES) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open("a", encoding="utf-8", newline="\n")
        self._buffer: list[str] = []
        self._batch_lines = batch_lines

    def write(self, record: dict[str, Any]) -> None:
        self._buffer.append(json.dumps(record, separators=(",", ":")))
        if len(self._buffer) >= self._batch_lines:
            self.flush()

    def flush(self) -> None:
        if self._buffer and self._file is not None:
            self._buffer.append("")
            self._file.write("\n".join(self._buffer))
            self._file.flush()
            self._buffer.clear()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"<JsonlWriter {self.path} buffered={len(self._buffer)}>"


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every complete line of a JSONL file (a torn last line, from a crash, is skipped)."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n") and line.strip():
                yield json.loads(line)


def read_messages(path: str | Path) -> list[AcceptedMessage]:
    """The accepted messages recorded in a sandbox store file."""
    return [AcceptedMessage.from_json(record) for record in read_jsonl(path)]
