"""Hosts, port modes and the TLS policy."""

from __future__ import annotations

import logging
import ssl

import pytest

from ses_tasks.errors import ConfigurationError
from ses_tasks.smtp.endpoint import PortMode, make_tls_context, resolve_endpoint, ses_host


def test_region_to_host_and_fips():
    assert ses_host("eu-west-1") == "email-smtp.eu-west-1.amazonaws.com"
    assert ses_host("us-east-1", fips=True) == "email-smtp-fips.us-east-1.amazonaws.com"


def test_bad_region_is_named():
    with pytest.raises(ConfigurationError) as err:
        ses_host("eu west")
    assert err.value.setting == "REGION"


@pytest.mark.parametrize(
    ("port", "mode"),
    [
        (25, PortMode.STARTTLS),
        (587, PortMode.STARTTLS),
        (2587, PortMode.STARTTLS),
        (465, PortMode.TLS),
        (2465, PortMode.TLS),
    ],
)
def test_mode_follows_the_port(port, mode):
    endpoint = resolve_endpoint(region="us-west-2", port=port)
    assert endpoint.mode is mode
    assert endpoint.host == endpoint.tls_server_name == "email-smtp.us-west-2.amazonaws.com"


def test_default_is_587_starttls():
    endpoint = resolve_endpoint()
    assert (endpoint.port, endpoint.mode) == (587, PortMode.STARTTLS)
    assert PortMode.STARTTLS.queue == "ses.starttls" and PortMode.TLS.queue == "ses.tls"


def test_ses_host_with_another_port_is_a_configuration_error():
    with pytest.raises(ConfigurationError) as err:
        resolve_endpoint(port=2525)
    assert err.value.setting == "PORT"
    assert "not 2525" in err.value.problem


def test_ses_port_with_the_wrong_mode_is_refused():
    with pytest.raises(ConfigurationError, match="port 465 of SES speaks tls, not starttls"):
        resolve_endpoint(port=465, mode="starttls")


def test_custom_host_needs_a_mode_for_a_custom_port():
    with pytest.raises(ConfigurationError) as err:
        resolve_endpoint(host="localhost", port=1025)
    assert err.value.setting == "MODE"
    endpoint = resolve_endpoint(
        host="vpce-1.example",
        port=1025,
        mode="tls",
        tls_server_name="email-smtp.us-east-1.amazonaws.com",
    )
    assert endpoint.host == "vpce-1.example"
    assert endpoint.tls_server_name == "email-smtp.us-east-1.amazonaws.com"


def test_unknown_mode_is_named():
    with pytest.raises(ConfigurationError, match="'ssl' is not a port mode"):
        resolve_endpoint(port=587, mode="ssl")


def test_port_25_warns_about_ec2(caplog):
    with caplog.at_level(logging.WARNING):
        resolve_endpoint(port=25)
    assert "EC2 throttles outbound port 25" in caplog.text


def test_tls_context_verifies_and_requires_tls_1_2(tmp_path):
    context = make_tls_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigurationError) as err:
        make_tls_context(str(missing))
    assert err.value.setting == "CA_FILE"
