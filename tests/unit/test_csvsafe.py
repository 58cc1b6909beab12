"""``ses_tasks.dashboard.csvsafe``: no cell of an export starts a formula, whatever separator
(``,`` ``;`` tab) a spreadsheet splits its lines at; ordinary text is kept as it was."""

from __future__ import annotations

import csv
import io

import pytest

from ses_tasks.dashboard.csvsafe import csv_line, safe_cell

FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\uff1d")

#: The review's payloads (a remote MTA's diagnostic, a recipient's name) and their kin.
PAYLOADS = [
    "550 5.1.1 mailbox unavailable;=cmd|' /C calc'!A0",
    "Bob;@SUM(1+1)",
    '=HYPERLINK("http://evil.example")',
    "+1+2",
    "-2+3",
    "@SUM(A1)",
    "\t=1+1",
    "\r=1+1",
    "a,=1+1",
    "a\t-1+1",
    "a\n=1+1",
    "a\r\n+1",
    "x; =1+1",
    'x;"=1+1',
    'x";=1+2',
    '=1+2";=1+2',
    '550 x;=HYPERLINK("http://evil") <script>',
    "N;=2+3",
    "\uff1d1+1",
]


def cells(text: str, delimiter: str) -> list[str]:
    """The cells a spreadsheet splitting at ``delimiter`` (and at any line break) sees."""
    lines = io.StringIO(text.replace("\r\n", "\n").replace("\r", "\n"))
    return [cell for row in csv.reader(lines, delimiter=delimiter) for cell in row]


def starts_formula(cell: str) -> bool:
    return cell.lstrip(' "').startswith(FORMULA_START) or cell.startswith(("\t", "\r"))


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_no_cell_starts_a_formula_whatever_the_separator(payload: str, delimiter: str) -> None:
    line = csv_line(("user@example.com", "failed", 550, payload, "c.1", payload))
    split = cells(line, delimiter)
    assert split, line
    assert not [cell for cell in split if starts_formula(cell)], (line, split)


def test_the_unsafe_line_the_review_found_is_now_safe() -> None:
    """Before: unquoted, first character only: a ';' parse gave a formula cell."""
    reason = "550 5.1.1 mailbox unavailable;=cmd|' /C calc'!A0"
    line = csv_line(("user@example.com", "failed", 550, reason, "c.1", "Bob;@SUM(1+1)"))
    assert line == (
        '"user@example.com","failed","550",'
        '"550 5.1.1 mailbox unavailable;\'=cmd|\' /C calc\'!A0","c.1","Bob;\'@SUM(1+1)"\n'
    )
    assert (
        next(csv.reader(io.StringIO(line)))[3]
        == "550 5.1.1 mailbox unavailable;'=cmd|' /C calc'!A0"
    )


def test_every_cell_is_quoted_and_plain_text_is_kept() -> None:
    assert csv_line(("email", "reason", None, 550)) == '"email","reason","","550"\n'
    for text in ("Reader 7", "550 5.1.1 user unknown - mailbox full", "a@b.example", "1-2", ""):
        assert safe_cell(text) == text


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("=1+1", "'=1+1"),
        ("-5", "'-5"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ('"=1', "'\"=1"),
        ("a;=b", "a;'=b"),
        ("a, @b", "a,' @b"),
        ("=a;+b", "'=a;'+b"),
    ],
)
def test_safe_cell_prefixes_the_cell_and_each_dangerous_split(value: str, safe: str) -> None:
    assert safe_cell(value) == safe
