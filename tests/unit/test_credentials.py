"""The SMTP password algorithm against the documented test vectors."""

from __future__ import annotations

import pytest

from ses_tasks.smtp.credentials import smtp_password

VECTORS = [
    ("some+secret+key", "eu-central-1", "BMXhUYlu5Z3gSXVQORxlVa7XPaz91aGWdfHxvkOZdWZ2"),
    ("another+secret+key", "eu-central-1", "BBbphbrQmrKMx42d1N6+C7VINYEBGI5v9VsZeTxwskfh"),
    ("some+secret+key", "us-west-1", "BH+jbMzper5WwlwUar9E1ySBqHa9whi0GPo+sJ0mVYJj"),
    ("another+secret+key", "us-west-1", "BKVmjjMDFk/qqw8EROW99bjCS65PF8WKvK5bSr4Y6EqF"),
]


@pytest.mark.parametrize(("secret", "region", "expected"), VECTORS)
def test_documented_vectors(secret, region, expected):
    assert smtp_password(secret, region) == expected
    assert len(expected) == 44


@pytest.mark.parametrize(("secret", "region"), [("", "us-east-1"), ("x", "")])
def test_empty_inputs_are_refused(secret, region):
    with pytest.raises(ValueError, match="is empty"):
        smtp_password(secret, region)
