"""Recipient files, streamed: CSV with an ``email`` column, or JSON lines.

Never loads a file whole. A bad row becomes a ``RowError`` carrying the line number and the
reason, so the campaign records that recipient as failed and goes on with the others. A file
that cannot be a recipient list at all (no ``email`` column, empty) raises ``ValidationError``
before anything is enqueued.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ses_tasks.errors import ValidationError

__all__ = ["MAX_FIELD_BYTES", "Recipient", "RowError", "iter_recipients", "open_recipients"]

#: The largest single CSV field accepted (a template variable, say); bigger rows are refused.
MAX_FIELD_BYTES = 1024 * 1024
EMAIL_COLUMN = "email"


@dataclass(frozen=True, slots=True)
class Recipient:
    email: str
    variables: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    reason: str
    email: str = ""


Row = Recipient | RowError


def _recipient(line: int, data: Mapping[str, Any]) -> Row:
    email = data.get(EMAIL_COLUMN)
    if not isinstance(email, str) or not email.strip():
        return RowError(line, f"row {line}: no value in the '{EMAIL_COLUMN}' column")
    email = email.strip()
    if "\ufffd" in email or any(ord(c) < 32 for c in email):
        return RowError(line, f"row {line}: the email value has invalid characters", email)
    variables = {k: v for k, v in data.items() if k != EMAIL_COLUMN and k is not None}
    return Recipient(email, variables)


def _decoded_lines(raw: IO[bytes]) -> Iterator[tuple[int, str | None]]:
    """Lines as text; ``None`` for a line that is not UTF-8 (reported, not fatal)."""
    for number, line in enumerate(raw, start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None


def _iter_jsonl(raw: IO[bytes]) -> Iterator[Row]:
    for number, text in _decoded_lines(raw):
        if text is None:
            yield RowError(number, f"line {number}: not valid UTF-8")
            continue
        if not text.strip():
            continue
        if len(text) > MAX_FIELD_BYTES:
            yield RowError(number, f"line {number}: longer than {MAX_FIELD_BYTES} bytes")
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RowError(number, f"line {number}: not JSON ({exc.msg})")
            continue
        if not isinstance(data, dict):
            yield RowError(number, f"line {number}: expected a JSON object")
            continue
        yield _recipient(number, data)


def _iter_csv(raw: IO[bytes]) -> Iterator[Row]:
    bad_lines: list[int] = []

    def text_lines() -> Iterator[str]:
        for number, text in _decoded_lines(raw):
            if text is None:
                bad_lines.append(number)
                yield "\n"  # keeps csv's line numbers aligned; reported below
            else:
                yield text

    reader = csv.reader(text_lines())
    csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        header = next(reader)
    except StopIteration:
        raise ValidationError("recipients", "the file is empty") from None
    except csv.Error as exc:
        raise ValidationError("recipients", f"unreadable CSV header: {exc}") from None
    names = [h.strip() for h in header]
    if EMAIL_COLUMN not in names:
        raise ValidationError(
            "recipients",
            f"no '{EMAIL_COLUMN}' column in the CSV header (found: {', '.join(names)})",
        )
    reported = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield RowError(reader.line_num, f"row {reader.line_num}: {exc}")
            continue
        line = reader.line_num
        while reported < len(bad_lines):
            yield RowError(bad_lines[reported], f"line {bad_lines[reported]}: not valid UTF-8")
            reported += 1
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(names):
            yield RowError(line, f"row {line}: {len(values)} fields, header has {len(names)}")
            continue
        yield _recipient(line, dict(zip(names, values, strict=True)))


def open_recipients(path: str | Path) -> Iterator[Row]:
    """Stream a ``.csv`` or ``.jsonl``/``.ndjson`` file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson", ".json"):
        raise ValidationError("recipients", f"{p.name}: use a .csv or .jsonl file")
    try:
        handle = p.open("rb")
    except OSError as exc:
        raise ValidationError("recipients", f"cannot open {p}: {exc.strerror}") from None

    def rows() -> Iterator[Row]:
        with handle:
            yield from (_iter_csv(handle) if suffix == ".csv" else _iter_jsonl(handle))

    iterator = rows()
    return _prime(iterator)


def _prime(iterator: Iterator[Row]) -> Iterator[Row]:
    """Read the first row now, so header errors surface before the campaign is created."""
    try:
        first = next(iterator)
    except StopIteration:
        return iter(())

    def chained() -> Iterator[Row]:
        yield first
        yield from iterator

    return chained()


def iter_recipients(source: str | Path | Iterable[Any]) -> Iterator[Row]:
    """Rows from a file path, or from an iterable of mappings or ``(email, vars)`` pairs."""
    if isinstance(source, (str, Path)):
        return open_recipients(source)
    return _iter_objects(source)


def _iter_objects(source: Iterable[Any]) -> Iterator[Row]:
    for index, item in enumerate(source, start=1):
        if isinstance(item, Recipient):
            yield item
        elif isinstance(item, str):
            yield _recipient(index, {EMAIL_COLUMN: item})
        elif isinstance(item, Mapping):
            yield _recipient(index, item)
        elif isinstance(item, tuple) and len(item) == 2:
            yield _recipient(index, {EMAIL_COLUMN: item[0], **dict(item[1] or {})})
        else:
            yield RowError(index, f"row {index}: expected a mapping with an 'email' key")


def iter_csv_text(text: str) -> Iterator[Row]:
    """Parse CSV held in memory (tests, small lists)."""
    return _iter_csv(io.BytesIO(text.encode("utf-8")))
