"""One test per row of the SES reply table (ses-smtp-facts.md), plus client errors."""

from __future__ import annotations

import ssl

import aiosmtplib
import pytest

from ses_tasks.errors import (
    EndpointFatalError,
    PermanentDeliveryError,
    QuotaExceededError,
    ThrottledError,
    TLSPolicyError,
    TransientDeliveryError,
    UnknownOutcomeError,
)
from ses_tasks.smtp.replies import (
    SendResult,
    classify_exception,
    classify_reply,
    parse_ses_message_id,
    to_error,
)
from ses_tasks.states import Outcome

SES_ID = "0107017033dbb64d-be13a01e-dbf1-44b7-b876-3622165dacc1-000000"


# -- message ids ------------------------------------------------------------------------


def test_parse_ses_message_id_from_ok_reply() -> None:
    assert parse_ses_message_id(f"Ok {SES_ID}") == SES_ID


def test_parse_ses_message_id_inside_longer_text() -> None:
    assert parse_ses_message_id(f"2.0.0 Ok {SES_ID.upper()} queued") == SES_ID.upper()


def test_parse_ses_message_id_falls_back_to_token_after_ok() -> None:
    assert parse_ses_message_id("Ok <abc-123>") == "abc-123"


def test_parse_ses_message_id_none_when_absent() -> None:
    assert parse_ses_message_id("Ok") is None
    assert parse_ses_message_id("") is None


# -- the table --------------------------------------------------------------------------


def test_250_after_data_is_sent_with_id() -> None:
    result = classify_reply(250, f"Ok {SES_ID}", stage="eom")
    assert result == SendResult(Outcome.SENT, 250, f"Ok {SES_ID}", ses_message_id=SES_ID)
    assert result.ok


def test_throttling_max_send_rate_is_throttled() -> None:
    result = classify_reply(454, "Throttling failure: Maximum sending rate exceeded.", stage="eom")
    assert result.outcome is Outcome.THROTTLED
    assert result.code == 454
    assert not result.reconnect


def test_throttling_daily_quota_is_quota_exhausted() -> None:
    result = classify_reply(454, "Throttling failure: Daily message quota exceeded.", stage="eom")
    assert result.outcome is Outcome.QUOTA_EXHAUSTED
    assert not result.reconnect


@pytest.mark.parametrize("code", [454, 451])
def test_temporary_service_failure_is_transient(code: int) -> None:
    result = classify_reply(code, "Temporary service failure", stage="eom")
    assert result.outcome is Outcome.TRANSIENT
    assert not result.reconnect


def test_451_timeout_waiting_for_data_is_transient_and_reconnects() -> None:
    result = classify_reply(451, "4.4.2 Timeout waiting for data from client.", stage="mail")
    assert (result.outcome, result.reconnect) == (Outcome.TRANSIENT, True)


def test_421_too_many_connections_is_transient_and_reconnects() -> None:
    result = classify_reply(421, "Too many concurrent SMTP connections", stage="connect")
    assert (result.outcome, result.reconnect) == (Outcome.TRANSIENT, True)


def test_421_max_message_count_is_transient_and_reconnects() -> None:
    text = "4.4.2 email-smtp.amazonaws.com Maximum message count per session reached"
    result = classify_reply(421, text, stage="mail")
    assert (result.outcome, result.reconnect) == (Outcome.TRANSIENT, True)


def test_any_421_reconnects() -> None:
    result = classify_reply(421, "Service shutting down", stage="rcpt")
    assert (result.outcome, result.reconnect) == (Outcome.TRANSIENT, True)


@pytest.mark.parametrize("text", ["Must issue a STARTTLS command first", "Authentication required"])
def test_530_is_fatal(text: str) -> None:
    assert classify_reply(530, text, stage="mail").outcome is Outcome.FATAL


@pytest.mark.parametrize(
    "text", ["Authentication Credentials Invalid", "Account not subscribed to SES"]
)
def test_535_is_fatal(text: str) -> None:
    result = classify_reply(535, text, stage="auth")
    assert result.outcome is Outcome.FATAL
    assert result.reason == text


def test_552_message_too_long_is_permanent() -> None:
    assert classify_reply(552, "Message is too long.", stage="eom").outcome is Outcome.PERMANENT


def test_553_invalid_address_is_permanent() -> None:
    result = classify_reply(553, "<bad@@x> Invalid email address", stage="rcpt")
    assert result.outcome is Outcome.PERMANENT


def test_554_address_not_verified_is_permanent() -> None:
    text = (
        "Message rejected: Email address is not verified. The following identities failed "
        "the check in region US-EAST-1: a@example.com"
    )
    assert classify_reply(554, text, stage="eom").outcome is Outcome.PERMANENT


@pytest.mark.parametrize(
    "text",
    [
        "Access denied: User arn:aws:iam::123456789012:user/ses-smtp is not authorized to "
        "perform ses:SendRawEmail",
        "Message rejected: User 'arn:aws:iam::123456789012:user/ses-smtp' is not authorized "
        "to perform 'ses:SendRawEmail' on resource '*'",
        "Access denied",
    ],
)
def test_554_access_denied_naming_no_identity_is_fatal(text: str) -> None:
    result = classify_reply(554, text, stage="eom", sender="news@example.com")
    assert result.outcome is Outcome.FATAL
    assert result.identity is None


# -- refusals of one sending identity: PERMANENT with ``identity``, never FATAL ----------

IAM_DENIAL = (
    "Message rejected: User 'arn:aws:iam::123456789012:user/ses-smtp' is not authorized to "
    "perform 'ses:SendRawEmail' on resource "
    "'arn:aws:ses:us-east-1:123456789012:identity/{identity}'"
)


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data", "eom"])
@pytest.mark.parametrize("identity", ["Denied@Example.com", "example.org"])
def test_iam_denial_on_an_identity_resource_is_that_identity_not_the_endpoint(
    stage: str, identity: str
) -> None:
    text = IAM_DENIAL.format(identity=identity)
    result = classify_reply(554, text, stage=stage)
    assert (result.outcome, result.code, result.identity) == (Outcome.PERMANENT, 554, identity)
    assert result.reason == text
    assert not result.reconnect  # RSET, and the connection goes on for other senders
    assert type(to_error(result)) is PermanentDeliveryError


@pytest.mark.parametrize(
    "text",
    [
        # The facts file's wording, unquoted, with a sentence end after the ARN.
        "Access denied: User arn:aws:iam::123456789012:user/ses-smtp is not authorized to "
        "perform ses:SendRawEmail on resource "
        "arn:aws:ses:eu-west-1:123456789012:identity/x@example.com.",
        # GovCloud partition.
        "Message rejected: User `arn:aws-us-gov:iam::123456789012:user/u` is not authorized "
        "to perform `ses:SendRawEmail` on resource "
        "`arn:aws-us-gov:ses:us-gov-west-1:123456789012:identity/x@example.com`",
    ],
)
def test_iam_denial_wordings_name_the_identity(text: str) -> None:
    result = classify_reply(554, text, stage="eom")
    assert (result.outcome, result.identity) == (Outcome.PERMANENT, "x@example.com")


def test_iam_denial_while_setting_up_stays_fatal() -> None:
    text = IAM_DENIAL.format(identity="x@example.com")
    result = classify_reply(554, text, stage="auth")
    assert (result.outcome, result.identity, result.reconnect) == (Outcome.FATAL, None, True)


@pytest.mark.parametrize(
    "text",
    [
        "Message rejected: Sending paused for this account. For more information, see "
        "arn:aws:ses:us-east-1:123456789012:identity/x@example.com",
        "Message rejected: Account is paused; not authorized to perform ses:SendRawEmail on "
        "resource arn:aws:ses:us-east-1:123456789012:identity/x@example.com",
    ],
)
def test_account_level_refusal_wins_over_a_named_identity(text: str) -> None:
    result = classify_reply(554, text, stage="eom", sender="x@example.com")
    assert (result.outcome, result.identity) == (Outcome.FATAL, None)


@pytest.mark.parametrize("code", [530, 535])
def test_credentials_refusals_stay_fatal_even_naming_an_identity(code: int) -> None:
    text = IAM_DENIAL.format(identity="x@example.com")
    result = classify_reply(code, text, stage="mail", sender="x@example.com")
    assert (result.outcome, result.identity) == (Outcome.FATAL, None)


UNVERIFIED = (
    "Message rejected: Email address is not verified. The following identities failed "
    "the check in region US-EAST-1: {listed}"
)


@pytest.mark.parametrize(
    ("listed", "identity"),
    [
        ("News@Example.com", "News@Example.com"),
        ("rcpt@example.net, news@example.com", "news@example.com"),
        ("example.com", "example.com"),  # the sender's domain identity
    ],
)
def test_unverified_sender_is_that_identity(listed: str, identity: str) -> None:
    text = UNVERIFIED.format(listed=listed)
    for stage in ("mail", "eom"):
        result = classify_reply(554, text, stage=stage, sender="news@example.com")
        assert (result.outcome, result.identity) == (Outcome.PERMANENT, identity)


def test_unverified_recipient_is_about_the_message_only() -> None:
    text = UNVERIFIED.format(listed="rcpt@example.com")
    # Same domain as the sender, different address: the sandbox recipient, not the sender.
    result = classify_reply(554, text, stage="eom", sender="news@example.com")
    assert (result.outcome, result.identity) == (Outcome.PERMANENT, None)
    # Without a sender nothing can be pinned on one: permanent for the message, as before.
    no_sender = classify_reply(554, UNVERIFIED.format(listed="news@example.com"), stage="eom")
    assert (no_sender.outcome, no_sender.identity) == (Outcome.PERMANENT, None)


def test_sender_refused_exception_carries_its_sender() -> None:
    text = UNVERIFIED.format(listed="news@example.com")
    exc = aiosmtplib.SMTPSenderRefused(554, text, "news@example.com")
    result = classify_exception(exc, data_sent=False)
    assert (result.outcome, result.identity) == (Outcome.PERMANENT, "news@example.com")


def test_554_sending_paused_is_fatal() -> None:
    text = "Message rejected: Sending paused for this account. For more information, see ..."
    assert classify_reply(554, text, stage="eom").outcome is Outcome.FATAL


@pytest.mark.parametrize("code", [450, 452, 455])
def test_other_4xx_is_transient(code: int) -> None:
    result = classify_reply(code, "try later", stage="rcpt")
    assert (result.outcome, result.reconnect) == (Outcome.TRANSIENT, False)


@pytest.mark.parametrize("code", [500, 501, 550, 554])
def test_other_5xx_is_permanent(code: int) -> None:
    result = classify_reply(code, "nope", stage="rcpt")
    assert (result.outcome, result.reconnect) == (Outcome.PERMANENT, False)


def test_5xx_while_setting_up_is_fatal_not_permanent() -> None:
    result = classify_reply(554, "No SMTP service here", stage="connect")
    assert (result.outcome, result.reconnect) == (Outcome.FATAL, True)


def test_4xx_while_setting_up_drops_the_connection() -> None:
    result = classify_reply(454, "Temporary authentication failure", stage="auth")
    assert (result.outcome, result.reconnect) == (Outcome.TRANSIENT, True)


def test_malformed_reply_after_data_is_unknown() -> None:
    result = classify_reply(-1, "Malformed SMTP response line", stage="eom")
    assert (result.outcome, result.reconnect) == (Outcome.UNKNOWN, True)


def test_malformed_reply_before_data_is_transient() -> None:
    result = classify_reply(-1, "Malformed SMTP response line", stage="mail")
    assert (result.outcome, result.reconnect) == (Outcome.TRANSIENT, True)


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="stage"):
        classify_reply(250, "Ok", stage="bogus")


# -- client errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPServerDisconnected("Connection lost"),
        aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
)
def test_lost_after_data_is_unknown(exc: BaseException) -> None:
    result = classify_exception(exc, data_sent=True)
    assert (result.outcome, result.code, result.reconnect) == (Outcome.UNKNOWN, 0, True)
    assert "SES may have accepted it" in result.reason


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPServerDisconnected("Connection lost"),
        aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
        aiosmtplib.SMTPConnectError("Error connecting to x on port 587: refused"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
def test_lost_before_data_is_transient_and_reconnects(exc: BaseException) -> None:
    result = classify_exception(exc, data_sent=False)
    assert (result.outcome, result.reconnect) == (Outcome.TRANSIENT, True)


def _cert_error() -> ssl.SSLCertVerificationError:
    err = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify")
    err.verify_message = "unable to get local issuer certificate"
    return err


def test_certificate_failure_is_fatal_with_clear_reason() -> None:
    result = classify_exception(_cert_error(), data_sent=False)
    assert result.outcome is Outcome.FATAL
    assert result.reason == "certificate verify failed: unable to get local issuer certificate"


def test_certificate_failure_wrapped_by_aiosmtplib_is_found() -> None:
    wrapped = aiosmtplib.SMTPConnectError("Error connecting to localhost on port 465: ...")
    wrapped.__cause__ = _cert_error()
    result = classify_exception(wrapped, data_sent=False)
    assert result.outcome is Outcome.FATAL
    assert result.reason.startswith("certificate verify failed")
    assert isinstance(to_error(result), TLSPolicyError)


def test_starttls_not_offered_is_fatal_tls_policy() -> None:
    exc = aiosmtplib.SMTPException("SMTP STARTTLS extension not supported by server.")
    result = classify_exception(exc, data_sent=False)
    assert result.outcome is Outcome.FATAL
    assert "STARTTLS" in result.reason
    assert isinstance(to_error(result), TLSPolicyError)


def test_tls_handshake_error_is_fatal() -> None:
    exc = ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version")
    result = classify_exception(exc, data_sent=False)
    assert result.outcome is Outcome.FATAL
    assert result.reason.startswith("TLS handshake failed")


def test_auth_error_exception_uses_reply_table() -> None:
    exc = aiosmtplib.SMTPAuthenticationError(535, "Authentication Credentials Invalid")
    result = classify_exception(exc, data_sent=False)
    assert (result.outcome, result.code) == (Outcome.FATAL, 535)


def test_data_error_exception_after_data_uses_eom_row() -> None:
    exc = aiosmtplib.SMTPDataError(454, "Throttling failure: Maximum sending rate exceeded.")
    assert classify_exception(exc, data_sent=True).outcome is Outcome.THROTTLED


def test_non_ascii_address_is_permanent() -> None:
    try:
        "jöe@example.com".encode("ascii")
    except UnicodeEncodeError as exc:
        result = classify_exception(exc, data_sent=False)
    assert result.outcome is Outcome.PERMANENT
    assert "ASCII" in result.reason


def test_our_own_errors_round_trip() -> None:
    exc = TLSPolicyError(0, "server did not offer STARTTLS; refusing to authenticate in clear")
    result = classify_exception(exc, data_sent=False)
    assert result.outcome is Outcome.FATAL
    assert isinstance(to_error(result), TLSPolicyError)
    assert classify_exception(ThrottledError(454, "x"), data_sent=True).outcome is (
        Outcome.THROTTLED
    )


# -- to_error ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "error_type"),
    [
        (Outcome.THROTTLED, ThrottledError),
        (Outcome.QUOTA_EXHAUSTED, QuotaExceededError),
        (Outcome.TRANSIENT, TransientDeliveryError),
        (Outcome.PERMANENT, PermanentDeliveryError),
        (Outcome.FATAL, EndpointFatalError),
        (Outcome.UNKNOWN, UnknownOutcomeError),
    ],
)
def test_to_error_matches_outcome(outcome: Outcome, error_type: type[Exception]) -> None:
    error = to_error(SendResult(outcome, 454, "why"), "a@example.com")
    assert type(error) is error_type
    assert (error.code, error.reason, error.recipient) == (454, "why", "a@example.com")
    assert str(error) == "454 why (recipient a@example.com)"


def test_to_error_refuses_success() -> None:
    with pytest.raises(ValueError, match="SENT"):
        to_error(SendResult(Outcome.SENT, 250, "Ok"))


def test_throttled_and_quota_errors_are_transient() -> None:
    throttled = to_error(classify_reply(454, "Maximum sending rate exceeded", stage="eom"))
    quota = to_error(classify_reply(454, "Daily message quota exceeded", stage="eom"))
    assert isinstance(throttled, TransientDeliveryError)
    assert isinstance(quota, TransientDeliveryError)
