"""CSV exports that a spreadsheet opens as text, never as formulas (OWASP CSV injection).

Cells hold text from outside: a remote MTA's diagnostic, a recipient's name, a reason typed
by an operator. A cell a spreadsheet reads as starting with ``= + - @`` (or a tab or CR) is
run as a formula. Checking only a cell's first character is not enough: Excel in de/fr/nl
locales splits a ``.csv`` at ``;``, so ``550 unavailable;=cmd|' /C calc'!A0`` becomes two
cells there, the second a formula, and quotes are then no protection either (a ``;`` parse
takes the ``","`` between quoted cells as text, so later quotes are literal).

So every cell is quoted (``csv.QUOTE_ALL``), a cell starting with a formula character gets
a ``'`` in front (OWASP's advice; spreadsheets show it as text), and so does every position
right after a ``,`` ``;`` tab or line break that a formula character follows (after any
spaces or quotes): whatever separator a spreadsheet splits at, no cell starts a formula.
The ``'`` stays in the data; an export is for people, who read past it.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

__all__ = ["csv_line", "in_chunks", "safe_cell"]

#: What a spreadsheet takes as the start of a formula (with their full-width forms, which
#: some locales' Excel folds into the ASCII ones).
_FORMULA = "=+\\-@\uff1d\uff0b\uff0d\uff20"
#: Separators a spreadsheet may split a line at.
_SEPARATORS = ",;\t\r\n"
_AT_START = re.compile(f'^(?:[\\t\\r]|[\\s"]*[{_FORMULA}])')
_AFTER_SEPARATOR = re.compile(f'([{_SEPARATORS}])(?=[\\s"]*[{_FORMULA}])')


def safe_cell(value: Any) -> str:
    """``value`` as text no spreadsheet runs as a formula, whatever separator it splits at
    (``None`` is the empty cell)."""
    text = "" if value is None else str(value)
    text = _AFTER_SEPARATOR.sub(r"\1'", text)
    return "'" + text if _AT_START.match(text) else text


def csv_line(values: Iterable[Any]) -> str:
    """One CSV line (``\\n``-terminated), every cell quoted and made safe by :func:`safe_cell`."""
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(
        safe_cell(value) for value in values
    )
    return out.getvalue()


async def in_chunks(lines: AsyncIterator[str], size: int = 500) -> AsyncIterator[str]:
    """``size`` lines per chunk: one response message per line costs more than the line
    (a 100,000-row download went from 21 s to a few)."""
    chunk: list[str] = []
    async for line in lines:
        chunk.append(line)
        if len(chunk) >= size:
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)
