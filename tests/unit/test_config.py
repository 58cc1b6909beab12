"""Settings: validated once, secrets never shown, secrets readable from files."""

from __future__ import annotations

import pytest

from ses_tasks.config import Settings, load_settings, redact_url
from ses_tasks.errors import ConfigurationError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SES_TASKS_"):
            monkeypatch.delenv(name)


def test_defaults_follow_the_contract():
    s = load_settings()
    assert s.region == "us-east-1" and s.port == 587
    assert s.endpoint.host == "email-smtp.us-east-1.amazonaws.com"
    assert s.smtp_password() is None


def test_environment_prefix(monkeypatch):
    monkeypatch.setenv("SES_TASKS_REGION", "eu-central-1")
    monkeypatch.setenv("SES_TASKS_PORT", "2465")
    s = load_settings()
    assert s.endpoint.mode.value == "tls"
    assert s.endpoint.host == "email-smtp.eu-central-1.amazonaws.com"


def test_password_is_derived_from_the_secret_for_the_region(monkeypatch):
    monkeypatch.setenv("SES_TASKS_SECRET_ACCESS_KEY", "some+secret+key")
    monkeypatch.setenv("SES_TASKS_REGION", "eu-central-1")
    assert load_settings().smtp_password() == "BMXhUYlu5Z3gSXVQORxlVa7XPaz91aGWdfHxvkOZdWZ2"


def test_secrets_and_url_passwords_never_in_repr():
    s = load_settings(
        password="hunter2-password",
        redis_url="redis://app:redis-secret@127.0.0.1:6379/0",
        broker_url="amqp://guest:amqp-secret@127.0.0.1:5672//",
    )
    text = repr(s) + str(s)
    for secret in ("hunter2-password", "redis-secret", "amqp-secret"):
        assert secret not in text
    assert "redis://app:***@127.0.0.1:6379/0" in text


def test_secret_files(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("from-a-file\n")
    (tmp_path / "url").write_text("redis://:file-secret@127.0.0.1:6379/3\n")
    monkeypatch.setenv("SES_TASKS_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("SES_TASKS_REDIS_URL_FILE", str(tmp_path / "url"))
    s = load_settings()
    assert s.smtp_password() == "from-a-file"
    assert s.redis_url == "redis://:file-secret@127.0.0.1:6379/3"


def test_unreadable_secret_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SES_TASKS_PASSWORD_FILE", str(tmp_path / "nope"))
    with pytest.raises(ConfigurationError, match="password_file: cannot read"):
        load_settings()


def test_password_and_secret_together_are_refused():
    with pytest.raises(ConfigurationError, match="not both"):
        load_settings(password="a", secret_access_key="b")


def test_invalid_values_name_the_setting():
    with pytest.raises(ConfigurationError) as err:
        load_settings(max_send_rate=0)
    assert err.value.setting == "MAX_SEND_RATE"
    with pytest.raises(ConfigurationError) as err:
        load_settings(configuration_set="bad name!")
    assert err.value.setting == "CONFIGURATION_SET"


def test_visibility_timeout_must_outlast_retries():
    with pytest.raises(ConfigurationError, match="must exceed RETRY_MAX_S"):
        load_settings(visibility_timeout_s=60, retry_max_s=600)


def test_settings_file(tmp_path, monkeypatch):
    env_file = tmp_path / "ses.env"
    env_file.write_text("SES_TASKS_REGION=ap-south-1\nSES_TASKS_POOL_SIZE=3\n")
    monkeypatch.setenv("SES_TASKS_CONFIG", str(env_file))
    s = load_settings()
    assert (s.region, s.pool_size) == ("ap-south-1", 3)


def test_redact_url_keeps_urls_without_password():
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("rediss://u:p@h:6380/1") == "rediss://u:***@h:6380/1"
    assert isinstance(Settings.model_fields, dict)


# Sender profiles -----------------------------------------------------------------------


def test_profiles_from_the_environment_override_only_what_they_set(monkeypatch):
    from ses_tasks.smtp.credentials import smtp_password

    monkeypatch.setenv("SES_TASKS_MAX_SEND_RATE", "14")
    monkeypatch.setenv("SES_TASKS_SECRET_ACCESS_KEY", "fleet-secret")
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__REGION", "eu-west-1")
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__MAX_SEND_RATE", "50")
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__CONFIGURATION_SET", "eu-set")
    monkeypatch.setenv("SES_TASKS_PROFILES__TENANT_B__SECRET_ACCESS_KEY", "tenant-b-secret")
    monkeypatch.setenv("SES_TASKS_PROFILES__OTHER__HOST", "smtp.tenant.example")
    s = load_settings()
    assert set(s.profiles) == {"eu", "tenant_b", "other"}
    eu = s.for_profile("eu")
    assert eu.endpoint.host == "email-smtp.eu-west-1.amazonaws.com"
    assert (eu.max_send_rate, eu.configuration_set) == (50.0, "eu-set")
    # The same account in another region: the password is derived for that region.
    assert eu.smtp_password() == smtp_password("fleet-secret", "eu-west-1")
    assert eu.smtp_password() != s.smtp_password()
    assert eu.batch_size == s.batch_size and eu.redis_url == s.redis_url
    tenant = s.for_profile("tenant_b")
    assert tenant.smtp_password() == smtp_password("tenant-b-secret", "us-east-1")
    # Another endpoint never gets the fleet's credentials.
    assert s.for_profile("other").smtp_password() is None
    assert s.for_profile("") is s
    for text in (repr(s), str(s), repr(s.profiles), repr(tenant)):
        assert "tenant-b-secret" not in text and "fleet-secret" not in text


def test_a_password_given_directly_stays_in_its_region(monkeypatch):
    monkeypatch.setenv("SES_TASKS_PASSWORD", "us-east-1-password")
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__REGION", "eu-west-1")
    monkeypatch.setenv("SES_TASKS_PROFILES__US__MAX_SEND_RATE", "5")
    s = load_settings()
    assert s.for_profile("eu").smtp_password() is None
    assert s.for_profile("us").smtp_password() == "us-east-1-password"


def test_an_unknown_profile_is_named_with_the_known_ones(monkeypatch):
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__REGION", "eu-west-1")
    with pytest.raises(ConfigurationError, match=r"no profile 'us'.*profiles: eu"):
        load_settings().for_profile("us")


def test_profile_names_and_fields_are_checked(monkeypatch):
    with pytest.raises(ConfigurationError, match="profile name"):
        load_settings(profiles={"Bad Name": {}})
    with pytest.raises(ConfigurationError, match=r"(?i)profiles.eu.max_send_rate"):
        load_settings(profiles={"eu": {"max_send_rate": 0}})
    with pytest.raises(ConfigurationError, match=r"(?i)colour"):
        load_settings(profiles={"eu": {"colour": "red"}})


def test_profiles_as_json_and_failover(monkeypatch):
    monkeypatch.setenv("SES_TASKS_SECRET_ACCESS_KEY", "fleet-secret")
    monkeypatch.setenv(
        "SES_TASKS_PROFILES",
        '{"eu": {"region": "eu-west-1", "failover_region": "eu-central-1"}, "us": {}}',
    )
    s = load_settings()
    failover = s.failover_for("eu")
    assert failover is not None
    assert failover.endpoint.host == "email-smtp.eu-central-1.amazonaws.com"
    assert failover.endpoint.tls_server_name == "email-smtp.eu-central-1.amazonaws.com"
    assert failover.smtp_password() != s.for_profile("eu").smtp_password()
    assert s.failover_for("us") is None and s.failover_for("") is None


def test_failover_to_another_region_needs_a_derivable_password(monkeypatch):
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__REGION", "eu-west-1")
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__PASSWORD", "eu-west-1-password")
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__FAILOVER_REGION", "eu-central-1")
    with pytest.raises(ConfigurationError, match=r"(?i)failover_region.*SECRET_ACCESS_KEY"):
        load_settings()


def test_a_bad_profile_endpoint_is_refused_at_load(monkeypatch):
    monkeypatch.setenv("SES_TASKS_PROFILES__EU__REGION", "../../x")
    with pytest.raises(ConfigurationError, match="profile 'eu'"):
        load_settings()


def test_profile_secrets_are_redacted_from_logs(monkeypatch):
    from ses_tasks.ops.logs import secrets_from_settings

    monkeypatch.setenv("SES_TASKS_PROFILES__EU__PASSWORD", "eu-smtp-password")
    monkeypatch.setenv("SES_TASKS_PROFILES__US__SECRET_ACCESS_KEY", "us-secret")
    monkeypatch.setenv("SES_TASKS_PROFILES__US__FAILOVER_REGION", "us-west-2")
    settings = load_settings()
    secrets = secrets_from_settings(settings)
    assert "eu-smtp-password" in secrets and "us-secret" in secrets
    failover = settings.failover_for("us")
    assert failover is not None and failover.smtp_password() in secrets
