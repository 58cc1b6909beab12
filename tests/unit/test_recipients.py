"""Recipient files: streamed, bad rows reported with their line, bad files refused early."""

from __future__ import annotations

from pathlib import Path

import pytest

from ses_tasks.errors import ValidationError
from ses_tasks.produce.recipients import MAX_FIELD_BYTES, Recipient, RowError, open_recipients


def rows(path: Path) -> list[Recipient | RowError]:
    return list(open_recipients(path))


def test_csv_with_bom_and_variables(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"\xef\xbb\xbfemail,name\r\na@example.com,Ann\r\n")
    assert rows(path) == [Recipient("a@example.com", {"name": "Ann"})]


def test_csv_quoted_newline_stays_in_one_field(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('email,note\na@example.com,"two\nlines"\nb@example.com,x\n')
    assert rows(path) == [
        Recipient("a@example.com", {"note": "two\nlines"}),
        Recipient("b@example.com", {"note": "x"}),
    ]


def test_csv_without_email_column_is_refused_before_anything(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("mail,name\na@example.com,x\n")
    with pytest.raises(ValidationError) as err:
        open_recipients(path)
    assert err.value.field == "recipients"
    assert "no 'email' column" in err.value.problem and "mail, name" in err.value.problem


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("")
    with pytest.raises(ValidationError, match="the file is empty"):
        open_recipients(path)


def test_wrong_encoding_row_is_reported_and_others_go_on(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"email,name\na@example.com,A\nb@example.com,\xff\xfe\nc@example.com,C\n")
    out = rows(path)
    assert out[0] == Recipient("a@example.com", {"name": "A"})
    assert RowError(3, "line 3: not valid UTF-8") in out
    assert Recipient("c@example.com", {"name": "C"}) in out


def test_field_over_the_limit_is_a_row_error(tmp_path):
    path = tmp_path / "r.csv"
    big = "x" * (MAX_FIELD_BYTES + 10)
    path.write_text(f"email,blob\na@example.com,{big}\nb@example.com,small\n")
    out = rows(path)
    assert isinstance(out[0], RowError) and "field larger than field limit" in out[0].reason
    assert out[-1] == Recipient("b@example.com", {"blob": "small"})


def test_wrong_field_count_and_missing_email(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("email,name\na@example.com,A,extra\n,B\n")
    out = rows(path)
    assert out == [
        RowError(2, "row 2: 3 fields, header has 2"),
        RowError(3, "row 3: no value in the 'email' column"),
    ]


def test_jsonl_rows_and_errors(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"email": "a@example.com", "n": 1}\nnot json\n[1]\n\n{"name": "x"}\n')
    out = rows(path)
    assert out[0] == Recipient("a@example.com", {"n": 1})
    assert [r.reason for r in out[1:]] == [
        "line 2: not JSON (Expecting value)",
        "line 3: expected a JSON object",
        "row 5: no value in the 'email' column",
    ]


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("email\na@example.com\n")
    with pytest.raises(ValidationError, match=r"use a \.csv or \.jsonl file"):
        open_recipients(path)
