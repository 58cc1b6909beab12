"""Every Redis client the package makes, built one way.

``sync_redis(url)`` and ``async_redis(url)`` give a ``redis.Redis`` / ``redis.asyncio.Redis``
with the same network behaviour everywhere:

- a socket timeout (``SES_TASKS_REDIS_SOCKET_TIMEOUT_S``, default 10 s) and a connect
  timeout, so a Redis that stops answering (a host gone, a network partition) is an error
  after seconds instead of a call blocked for ever;
- TCP keepalive, and a health check (PING) on a connection idle for longer than
  ``HEALTH_CHECK_INTERVAL_S``, so a connection killed while idle (Redis restarted, a proxy
  or load balancer timing it out) is found before a command is written to it;
- one quick retry of a command whose *connection* failed (a stale pooled connection after
  a restart), and none for a timeout: a command that timed out may have run, and the
  callers decide whether running it again is safe (they retry whole operations).

URLs: ``redis://``, ``rediss://`` (TLS, ``?ssl_cert_reqs=required&ssl_ca_certs=...``),
``unix://``, ACL users (``redis://user:password@host/0``), and Redis Sentinel::

    sentinel://[[user]:password@]host:port[/db][;sentinel://host2:port2...]?master_name=NAME

in the form kombu and Celery use for their ``sentinel://`` broker and result backend (one
``sentinel://`` URL per sentinel, separated by ``;``), with the master's name in the query
(kombu and Celery take it from transport options instead; ``ses_tasks.queue.app`` moves it there).
The user and password are the Redis master's; the sentinels themselves are reached without
a password. The same URL works for ``SES_TASKS_REDIS_URL``, ``SES_TASKS_BROKER_URL`` and
``SES_TASKS_RESULT_BACKEND``.

Credentials never appear in a ``repr``, a log line or an error raised here.

``patch_kombu_redis()`` fixes, at worker start, a kombu bug that made a worker exit when
Redis restarted (see its docstring).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ses_tasks.config import redact_url
from ses_tasks.errors import ConfigurationError

if TYPE_CHECKING:
    from ses_tasks.config import Settings

__all__ = [
    "DEFAULT_SOCKET_TIMEOUT_S",
    "HEALTH_CHECK_INTERVAL_S",
    "SentinelURL",
    "async_redis",
    "celery_url",
    "client_options",
    "is_sentinel_url",
    "keepalive_options",
    "parse_sentinel_url",
    "patch_kombu_redis",
    "sync_redis",
]

logger = logging.getLogger(__name__)

DEFAULT_SOCKET_TIMEOUT_S = 10.0
#: PING a pooled connection before use when it has been idle this long (seconds).
HEALTH_CHECK_INTERVAL_S = 25
#: Retries of a command whose connection failed (not of a timeout), and the pause before.
CONNECTION_RETRIES = 1
RETRY_BACKOFF_BASE_S = 0.1
RETRY_BACKOFF_CAP_S = 1.0
SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379


def _socket_timeout(settings: Settings | None) -> float:
    value = getattr(settings, "redis_socket_timeout_s", None)
    return float(value) if value else DEFAULT_SOCKET_TIMEOUT_S


def keepalive_options() -> dict[int, int]:
    """TCP keepalive probing that notices a dead peer in about a minute (where supported)."""
    options: dict[int, int] = {}
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        constant = getattr(socket, name, None)
        if constant is not None:
            options[constant] = value
    return options


def client_options(settings: Settings | None = None, *, tcp: bool = True) -> dict[str, Any]:
    """Socket options shared by every client (``tcp=False`` for ``unix://`` sockets)."""
    timeout = _socket_timeout(settings)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if tcp:
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = keepalive_options()
    return options


def _retry() -> Retry:
    return Retry(
        ExponentialBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S),
        CONNECTION_RETRIES,
        supported_errors=(redis.ConnectionError,),
    )


def _async_retry() -> AsyncRetry:
    return AsyncRetry(
        ExponentialBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S),
        CONNECTION_RETRIES,
        supported_errors=(redis.ConnectionError,),
    )


# Sentinel URLs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL. The password is kept out of ``repr``."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def celery_url(self) -> str:
        """The same target in kombu's/Celery's form: one full URL per sentinel, no query.

        kombu reads the credentials and database from the first URL and only host and port
        from the others; Celery's result backend does the same. Every part gets them here.
        """
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        elif self.username:
            auth = f"{self.username}@"
        return ";".join(
            f"{SENTINEL_SCHEME}://{auth}{_host(host)}:{port}/{self.db}"
            for host, port in self.sentinels
        )


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str, *, setting: str = "REDIS_URL") -> SentinelURL:
    """Parse ``sentinel://[[user]:pass@]host:port[/db][;sentinel://...]?master_name=NAME``.

    The database, credentials and query may be given on any part (usually the first or
    the last); given twice, they must agree. Errors name the setting, never the password.
    """

    def fail(problem: str) -> ConfigurationError:
        return ConfigurationError(setting, f"{problem} in {redact_url(url)}")

    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    users: set[str] = set()
    passwords: set[str] = set()
    query: dict[str, str] = {}
    for chunk in (c.strip() for c in url.strip().split(";")):
        if not chunk:
            continue
        try:
            parts = urlsplit(chunk)
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise fail("a malformed sentinel address") from None
        if parts.scheme.lower() != SENTINEL_SCHEME:
            raise fail(f"every part must be a {SENTINEL_SCHEME}:// URL")
        if not parts.hostname:
            raise fail("a sentinel without a host")
        sentinels.append((parts.hostname, port))
        if parts.username:
            users.add(unquote(parts.username))
        if parts.password is not None:
            passwords.add(unquote(parts.password))
        path = parts.path.strip("/")
        if path:
            try:
                dbs.add(int(path))
            except ValueError:
                raise fail("a database that is not a number") from None
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in query and query[key] != value:
                raise fail(f"two different values for {key}")
            query[key] = value
    if not sentinels:
        raise fail("no sentinel address")
    if len(dbs) > 1 or len(users) > 1 or len(passwords) > 1:
        raise fail("parts with different databases or credentials")
    master_name = query.pop("master_name", "") or query.pop("service_name", "")
    if not master_name:
        raise fail("no master name (add ?master_name=NAME)")
    if query:
        raise fail(f"unsupported option(s) {', '.join(sorted(query))}")
    return SentinelURL(
        sentinels=tuple(sentinels),
        master_name=master_name,
        db=dbs.pop() if dbs else 0,
        username=users.pop() if users else None,
        password=passwords.pop() if passwords else None,
    )


def celery_url(url: str, *, setting: str = "BROKER_URL") -> tuple[str, str | None]:
    """``(url for kombu/Celery, master name or None)``: sentinel URLs lose their query."""
    if not is_sentinel_url(url):
        return url, None
    target = parse_sentinel_url(url, setting=setting)
    return target.celery_url(), target.master_name


# Clients ----------------------------------------------------------------------------------


class _SentinelRedis(redis.Redis):
    """The master's client; closing it also closes the connections to the sentinels."""

    _sentinel_manager: Any = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            manager, self._sentinel_manager = self._sentinel_manager, None
            close = getattr(manager, "close", None)
            if close is not None:  # redis-py >= 8.1
                close()
            elif manager is not None:
                for node in manager.sentinels:
                    node.close()


class _AsyncSentinelRedis(aioredis.Redis):
    _sentinel_manager: Any = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            manager, self._sentinel_manager = self._sentinel_manager, None
            if manager is not None:
                aclose = getattr(manager, "aclose", None)
                if aclose is not None:
                    await aclose()
                else:
                    for node in manager.sentinels:
                        await node.aclose()


def _sentinel_kwargs(settings: Settings | None) -> dict[str, Any]:
    # The sentinels answer a few small queries; no health check needed, no credentials.
    options = client_options(settings)
    options.pop("health_check_interval", None)
    return options


def _client(
    url: str,
    settings: Settings | None,
    overrides: dict[str, Any],
    *,
    client_class: type[Any],
    sentinel_class: type[Any],
    master_class: type[Any],
    retry: Callable[[], Any],
) -> Any:
    """One recipe for both kinds of client: the same options, sentinel or not."""
    if is_sentinel_url(url):
        target = parse_sentinel_url(url)
        manager = sentinel_class(
            list(target.sentinels),
            sentinel_kwargs={**_sentinel_kwargs(settings), "retry": retry()},
            **{**client_options(settings), "retry": retry(), **overrides},
        )
        client = manager.master_for(
            target.master_name,
            redis_class=master_class,
            db=target.db,
            username=target.username,
            password=target.password,
        )
        client._sentinel_manager = manager
        return client
    tcp = not url.lower().startswith("unix:")
    return client_class.from_url(
        url, **{**client_options(settings, tcp=tcp), "retry": retry(), **overrides}
    )


def sync_redis(url: str, *, settings: Settings | None = None, **overrides: Any) -> redis.Redis:
    """A ``redis.Redis`` for ``url`` (see the module docstring); ``overrides`` win."""
    from redis.sentinel import Sentinel

    client: redis.Redis = _client(
        url,
        settings,
        overrides,
        client_class=redis.Redis,
        sentinel_class=Sentinel,
        master_class=_SentinelRedis,
        retry=_retry,
    )
    return client


def async_redis(url: str, *, settings: Settings | None = None, **overrides: Any) -> aioredis.Redis:
    """A ``redis.asyncio.Redis`` for ``url`` (see the module docstring); ``overrides`` win."""
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    client: aioredis.Redis = _client(
        url,
        settings,
        overrides,
        client_class=aioredis.Redis,
        sentinel_class=AsyncSentinel,
        master_class=_AsyncSentinelRedis,
        retry=_async_retry,
    )
    return client


# kombu ------------------------------------------------------------------------------------


def patch_kombu_redis() -> bool:
    """Keep a Celery worker alive through a Redis restart (kombu 5.x redis transport).

    The bug: when the broker connection breaks, Celery's consumer calls
    ``Connection.collect()`` and then ``Connection.close()``
    (``celery/worker/consumer/consumer.py``, ``on_connection_error_after_connected``).
    ``collect()`` closes the channels one by one in ``virtual.Transport.close_connection``
    and then detaches the transport (``transport.client = None``). When Redis is down,
    closing a channel can raise a connection error, e.g. the pidbox channel deleting its
    auto-delete fanout queue, and that aborts the loop: the channels after it, usually the
    task channel that holds the unacknowledged deliveries, stay open. (The task channel's
    own first close had already failed early, reading the reply of its pending BRPOP from
    the dead socket.) ``close()`` then closes the task channel again; restoring its
    unacknowledged messages needs a new connection pool, whose parameters are read from
    the detached transport: ``AttributeError: 'NoneType' object has no attribute
    'hostname'`` in ``_connparams``, which is not a connection error, so it escapes
    ``ignore_errors`` and the consumer, and the worker exits ("Unrecoverable error"). It
    only happens when the first error of the outage comes from another connection (the
    pidbox's LISTEN, a timer) while a BRPOP is pending and a task is unacknowledged, hence
    about one Redis restart in several. Same symptom upstream: celery/kombu#582 (on
    restarting Gossip) and celery/kombu#970 (at warm shutdown); not fixed in kombu 5.7.0.
    Reproduced by ``tests/reliability/test_connectivity.py``.

    The patch (idempotent; returns True the first time):

    1. ``close_connection`` closes *every* channel even when one fails, then raises the
       first error, so each channel is closed while the transport is still attached: the
       unacknowledged messages are restored (or, with Redis down, stay in the unacked
       hash for the visibility-timeout sweep) and their late acks still find a pool;
    2. a redis channel whose transport was detached raises a redis ``ConnectionError``
       (which kombu and Celery handle) when it needs new connection parameters, instead
       of the ``AttributeError``.
    """
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual

    transport_cls = virtual.Transport
    channel_cls = kombu_redis.Channel
    if getattr(transport_cls.close_connection, "_ses_tasks_patch", False):
        return False

    def close_connection(self: Any, connection: Any) -> None:
        self.cycle.close()
        first_error: BaseException | None = None
        for chan_list in self._avail_channels, self.channels:
            while chan_list:
                try:
                    channel = chan_list.pop()
                except LookupError:  # pragma: no cover - emptied concurrently
                    break
                try:
                    channel.close()
                except Exception as exc:
                    if first_error is None:
                        first_error = exc
        if first_error is not None:
            raise first_error

    original_connparams = channel_cls._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or getattr(transport, "client", None) is None:
            raise redis.ConnectionError("the broker connection of this channel was closed")
        return original_connparams(self, asynchronous=asynchronous)

    close_connection._ses_tasks_patch = True  # type: ignore[attr-defined]
    _connparams._ses_tasks_patch = True  # type: ignore[attr-defined]
    transport_cls.close_connection = close_connection  # type: ignore[method-assign]
    channel_cls._connparams = _connparams  # type: ignore[method-assign]
    logger.debug("kombu redis transport patched (close every channel on collect)")
    return True
