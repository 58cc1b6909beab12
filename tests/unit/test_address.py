"""canonical_address: the one key the suppression list and the claim path compare by.

SES reports bounces for ``user@bücher.example`` as ``user@xn--bcher-kva.example``; unless
both are one key, a suppressed address is mailed again.
"""

from __future__ import annotations

import pytest

from ses_tasks.errors import ValidationError
from ses_tasks.message.address import ascii_addr_spec, canonical_address
from ses_tasks.message.spec import parse_address

PUNYCODE = "user@xn--bcher-kva.example"


@pytest.mark.parametrize(
    "form",
    [
        "user@bücher.example",
        "user@xn--bcher-kva.example",
        "User@BÜCHER.Example",
        "USER@XN--BCHER-KVA.EXAMPLE",
        "user@\uff22ÜCHER.example",  # a fullwidth B: IDNA maps it
        "  user@bücher.example\t",
        "Jane Doe <User@Bücher.example>",
        '"Doe, Jane" <user@xn--bcher-KVA.example>',
    ],
)
def test_every_form_of_an_idn_address_is_one_key(form: str) -> None:
    assert canonical_address(form) == PUNYCODE


def test_the_key_is_ascii_lower_case_and_stable() -> None:
    key = canonical_address("Ann.Lee+News@Sub.Bücher.Example")
    assert key == "ann.lee+news@sub.xn--bcher-kva.example"
    assert canonical_address(key) == key


def test_sending_keeps_the_local_part_case_and_matches_the_key() -> None:
    sent = ascii_addr_spec("Ann@Bücher.example")
    assert sent == "Ann@xn--bcher-kva.example"
    assert parse_address("Ann <Ann@Bücher.example>", "to").addr_spec == sent
    assert canonical_address("Ann@Bücher.example") == sent.lower()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nobody", "must have an @-sign"),
        ("a@b..example", "two periods"),
        ("jörg@example.com", "non-ASCII characters before the @"),
        ("", "must have an @-sign"),
    ],
)
def test_an_invalid_address_names_the_field_and_the_value(value: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem) as info:
        canonical_address(value, "emails[2]")
    assert info.value.field == "emails[2]"
    assert repr(value) in info.value.problem


def test_a_non_string_is_refused() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        canonical_address(None)  # type: ignore[arg-type]
