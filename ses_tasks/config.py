"""Settings from the environment (prefix ``SES_TASKS_``) or a settings file.

Validated once at construction. Secrets are ``SecretStr`` and every URL is redacted in
``repr()``, so printing or logging a ``Settings`` never leaks a credential. Each secret can
also be read from a file (``SES_TASKS_PASSWORD_FILE`` and so on), the Docker/Kubernetes way.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ses_tasks.errors import ConfigurationError
from ses_tasks.smtp.credentials import smtp_password
from ses_tasks.smtp.endpoint import DEFAULT_PORT, Endpoint, PortMode, resolve_endpoint

__all__ = ["ENV_PREFIX", "Profile", "Settings", "load_settings", "redact_url"]

ENV_PREFIX = "SES_TASKS_"
#: Settings that may instead name a file holding the value (``<NAME>_FILE``).
FILE_SETTINGS = (
    "password",
    "secret_access_key",
    "broker_url",
    "redis_url",
    "result_backend",
    "dashboard_token",
    "dashboard_user",
    "dashboard_password",
)
#: SES ends a session after about 350 messages; stay well below.
DEFAULT_MAX_MESSAGES_PER_CONNECTION = 300
#: SES drops a session after about 10 s of silence; check with NOOP before reuse past this.
DEFAULT_IDLE_CHECK_S = 5.0


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``.

    Each part of a ``;``-separated list (``sentinel://...;sentinel://...``) is redacted.
    """
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "***"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


#: See ``Settings.dispatch_timeout_s``.
DEFAULT_DISPATCH_TIMEOUT_S = 120.0
PROFILE_NAME_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
#: Settings a sender profile overrides; everything else is the fleet's.
PROFILE_FIELDS = (
    "region",
    "host",
    "port",
    "mode",
    "tls_server_name",
    "username",
    "password",
    "secret_access_key",
    "max_send_rate",
    "rate_burst",
    "max_24h_send",
    "configuration_set",
    "pool_size",
)


class Profile(BaseModel):
    """A named sender: its own SES account or region, pool, rate limit, quota and AIMD.

    From the environment: ``SES_TASKS_PROFILES__<NAME>__<FIELD>`` (for example
    ``SES_TASKS_PROFILES__EU__REGION=eu-west-1``), or ``SES_TASKS_PROFILES`` as JSON.
    Unset fields take the fleet's value. ``failover_region`` (or ``failover_host``) names
    a second endpoint used while the first fails to connect, never for refusals.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    region: str | None = None
    host: str | None = None
    port: int | None = None
    mode: PortMode | None = None
    tls_server_name: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    max_send_rate: float | None = Field(default=None, gt=0)
    rate_burst: float | None = Field(default=None, gt=0)
    max_24h_send: int | None = Field(default=None, gt=0)
    configuration_set: str | None = None
    pool_size: int | None = Field(default=None, ge=1, le=1000)
    failover_region: str | None = None
    failover_host: str | None = None
    failover_port: int | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    # Endpoint
    region: str = "us-east-1"
    host: str | None = None
    port: int = DEFAULT_PORT
    mode: PortMode | None = None
    fips: bool = False
    tls_server_name: str | None = None
    ca_file: str | None = None
    # Credentials
    username: str | None = None
    password: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    # Infrastructure
    broker_url: str = "redis://127.0.0.1:6379/0"
    redis_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    key_prefix: str = "sestasks"
    #: Seconds before a Redis read, write or connect is an error (every client we make).
    redis_socket_timeout_s: float = Field(default=10.0, gt=0)
    # Limits (SES account quotas)
    max_send_rate: float = Field(default=14.0, gt=0)
    rate_burst: float | None = Field(default=None, gt=0)
    max_24h_send: int | None = Field(default=None, gt=0)
    quota_window_s: float = Field(default=86400.0, gt=0)
    transactional_reserve: float = Field(default=0.2, ge=0, lt=1)
    # Pool
    pool_size: int = Field(default=10, ge=1, le=1000)
    pool_min_size: int = Field(default=1, ge=0)
    max_messages_per_connection: int = Field(default=DEFAULT_MAX_MESSAGES_PER_CONNECTION, ge=1)
    max_connection_age: float = Field(default=300.0, gt=0)
    idle_check_s: float = Field(default=DEFAULT_IDLE_CHECK_S, ge=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    send_timeout: float = Field(default=60.0, gt=0)
    # Messages
    configuration_set: str | None = None
    max_message_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Delivery policy
    max_attempts: int = Field(default=5, ge=1)
    retry_base_s: float = Field(default=5.0, ge=0)
    retry_max_s: float = Field(default=600.0, ge=0)
    throttle_retry_s: float = Field(default=1.0, ge=0)
    resend_unknown: bool = False
    batch_size: int = Field(default=100, ge=1, le=5000)
    #: How long a worker's claim on a batch's messages lasts before another may take them
    #: over (after a crash), on top of the time the rate limit needs for the batch.
    claim_lease_s: float = Field(default=120.0, gt=0)
    #: How long a worker rides out Redis errors in place (retrying each call) before it
    #: hands its batch back; recording outcomes of sends made retries for the lease too.
    store_retry_s: float = Field(default=30.0, ge=0)
    #: A batch nobody settled (its publish was lost, its worker died) is republished by the
    #: sweeper this long after it was due. Default: VISIBILITY_TIMEOUT_S.
    redeliver_after_s: float | None = Field(default=None, gt=0)
    #: How often the fleet's sweeper looks for batches past due (one process sweeps).
    sweep_interval_s: float = Field(default=5.0, gt=0)
    #: Batches of bulk mail the broker holds for the whole fleet; default: what the live
    #: workers run at once (their heartbeats say). Bounds broker memory and fairness lag.
    dispatch_window: int | None = Field(default=None, ge=1, le=100_000)
    #: A batch handed to the broker that no worker claimed within this long is handed
    #: over again by the sweeper (its publish was lost, its dispatcher died, or its task
    #: was acknowledged unrun). Default: 120 s, or REDELIVER_AFTER_S if shorter.
    dispatch_timeout_s: float | None = Field(default=None, gt=0)
    #: Batches one worker process runs at once: the next batch's claim and render overlap
    #: the tail of the last one, so the process's connections stay busy.
    batches_per_process: int = Field(default=2, ge=1, le=64)
    #: Upper bound on one task's run on the worker's event loop.
    task_timeout_s: float = Field(default=900.0, gt=0)
    #: Broker redelivery of unacknowledged tasks; must outlast every retry delay.
    visibility_timeout_s: int = Field(default=7200, ge=1)
    #: Named sender profiles (several SES accounts, regions or tenants in one fleet).
    profiles: dict[str, Profile] = Field(default_factory=dict)
    # Status store
    retention_s: int = Field(default=30 * 86400, ge=60)
    log_json: bool = False
    # Delivery events (ses_tasks.events, docs/events.md)
    #: Comma-separated dotted paths of callables called with each delivery event, in the
    #: process where it happens (worker: sent/failed/...; feedback: bounced/...).
    event_hooks: str = ""
    #: A Celery task name each event is also sent to (``send_task(name, args=[event])``).
    event_task: str | None = None
    #: The queue of EVENT_TASK (default: Celery's default queue, ``celery``).
    event_task_queue: str | None = None
    #: The broker EVENT_TASK is published to (default: BROKER_URL, without our key prefix).
    event_broker_url: str | None = None
    #: Events waiting for the hooks per process; past this they are dropped and counted.
    event_queue_size: int = Field(default=10_000, ge=1, le=1_000_000)
    # Dashboard (ses_tasks.dashboard): with any of these set, every request must present
    # them, on every bind; without them it only serves on a loopback address.
    #: ``Authorization: Bearer <token>``, or the token typed into the login form.
    dashboard_token: SecretStr | None = None
    #: HTTP basic credentials (both or neither).
    dashboard_user: str | None = None
    dashboard_password: SecretStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in FILE_SETTINGS:
            path = data.pop(f"{name}_file", None) or os.environ.get(
                f"{ENV_PREFIX}{name.upper()}_FILE"
            )
            if path and not data.get(name):
                try:
                    data[name] = Path(path).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ValueError(f"{name}_file: cannot read {path}: {exc.strerror}") from None
        return data

    @field_validator(
        "username",
        "password",
        "secret_access_key",
        "dashboard_token",
        "dashboard_user",
        "dashboard_password",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `SES_TASKS_PASSWORD=` in an env file means "none", not an empty password to AUTH.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("key_prefix")
    @classmethod
    def _check_key_prefix(cls, value: str) -> str:
        # Braces would replace the campaign hash tag (Redis Cluster slots).
        if not value or len(value) > 64 or any(c in value for c in "{} \t\r\n"):
            raise ValueError("a key prefix is 1-64 characters without braces or whitespace")
        return value

    @field_validator("configuration_set")
    @classmethod
    def _check_configuration_set(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value or len(value) > 64 or not all(c.isalnum() or c in "_-" for c in value):
            raise ValueError("a configuration set name is 1-64 ASCII letters, digits, '_' or '-'")
        return value

    @field_validator("profiles")
    @classmethod
    def _check_profiles(cls, value: dict[str, Profile]) -> dict[str, Profile]:
        for name in value:
            if not PROFILE_NAME_RE.match(name):
                raise ValueError(
                    f"profile name {name!r}: use 1-32 lowercase letters, digits, '_' or '-'"
                )
        return value

    @model_validator(mode="after")
    def _check_endpoint(self) -> Settings:
        self.endpoint  # noqa: B018 - validate host/port/mode together, once
        for name in self.profiles:  # each profile's endpoint (and failover) too
            try:
                self.for_profile(name).endpoint  # noqa: B018
                failover = self.failover_for(name)
                if failover is not None:
                    failover.endpoint  # noqa: B018
            except ConfigurationError as exc:
                raise ValueError(f"profile {name!r}: {exc}") from None
            except ValueError as exc:
                raise ValueError(f"profile {name!r}: {exc}") from None
        if self.visibility_timeout_s <= self.retry_max_s:
            raise ValueError(
                f"VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed RETRY_MAX_S "
                f"({self.retry_max_s}): a delayed retry would be delivered twice"
            )
        if self.password is not None and self.secret_access_key is not None:
            raise ValueError("set PASSWORD or SECRET_ACCESS_KEY, not both")
        if (self.dashboard_user is None) != (self.dashboard_password is None):
            missing = "PASSWORD" if self.dashboard_password is None else "USER"
            raise ConfigurationError(
                f"{ENV_PREFIX}DASHBOARD_{missing}",
                f"set {ENV_PREFIX}DASHBOARD_USER and {ENV_PREFIX}DASHBOARD_PASSWORD together"
                " (or neither)",
            )
        return self

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name in ("broker_url", "redis_url", "result_backend", "event_broker_url") and (
                isinstance(value, str)
            ):
                yield name, redact_url(value)
            else:
                yield name, value

    @cached_property
    def endpoint(self) -> Endpoint:
        return resolve_endpoint(
            region=self.region,
            host=self.host,
            port=self.port,
            mode=self.mode,
            fips=self.fips,
            tls_server_name=self.tls_server_name,
        )

    def smtp_password(self) -> str | None:
        """The SMTP password: given directly, or derived from the IAM secret for REGION."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.secret_access_key is not None:
            return smtp_password(self.secret_access_key.get_secret_value(), self.region)
        return None

    @property
    def redeliver_after(self) -> float:
        return float(self.redeliver_after_s or self.visibility_timeout_s)

    @property
    def dispatch_timeout(self) -> float:
        return self.dispatch_timeout_s or min(DEFAULT_DISPATCH_TIMEOUT_S, self.redeliver_after)

    def for_profile(self, name: str) -> Settings:
        """These settings as the named profile sends ('' is the unnamed default)."""
        if not name:
            return self
        profile = self.profiles.get(name)
        if profile is None:
            known = ", ".join(sorted(self.profiles)) or "none configured"
            raise ConfigurationError("profile", f"no profile {name!r} (profiles: {known})")
        update = {f: getattr(profile, f) for f in PROFILE_FIELDS}
        update = {f: v for f, v in update.items() if v is not None}
        own_credentials = "password" in update or "secret_access_key" in update
        if own_credentials or "host" in update or "username" in update:
            # Another account or endpoint: never the fleet's credentials.
            update.setdefault("password", None)
            update.setdefault("secret_access_key", None)
        elif "region" in update:
            # The same account in another region: an SMTP password is per region, so only
            # a secret access key (derived per region) carries over.
            update.setdefault("password", None)
        if "region" in update and "host" not in update:  # the region's SES endpoint
            update["host"] = None
        if "host" in update or "region" in update:
            update.setdefault("tls_server_name", None)
        data = {**self.model_dump(exclude={"profiles"}), **update, "profiles": {}}
        return Settings.model_construct(**data)

    def failover_for(self, name: str) -> Settings | None:
        """The named profile's second endpoint, if it has one."""
        profile = self.profiles.get(name) if name else None
        if profile is None or not (profile.failover_region or profile.failover_host):
            return None
        primary = self.for_profile(name)
        data = primary.model_dump()
        data["region"] = profile.failover_region or primary.region
        data["host"] = profile.failover_host
        data["tls_server_name"] = None
        if profile.failover_port:
            data["port"] = profile.failover_port
        if data["region"] != primary.region and data["secret_access_key"] is None:
            raise ConfigurationError(
                f"profiles.{name}.failover_region",
                "needs SECRET_ACCESS_KEY (the SMTP password is derived per region; a "
                "password given directly only works in its own region)",
            )
        return Settings.model_construct(**data)

    @property
    def burst(self) -> float:
        return self.rate_burst if self.rate_burst is not None else max(1.0, self.max_send_rate)


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning pydantic's errors into one ``ConfigurationError``.

    ``SES_TASKS_CONFIG`` may name a dotenv-style file with the same keys.
    """
    env_file = os.environ.get(f"{ENV_PREFIX}CONFIG")
    try:
        if env_file:
            return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
        return Settings(**overrides)
    except ConfigurationError:
        raise
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        ctx = first.get("ctx", {}) or {}
        err = ctx.get("error")
        if isinstance(err, ConfigurationError):
            raise ConfigurationError(err.setting, err.problem) from None
        raise ConfigurationError(loc.upper(), message) from None
