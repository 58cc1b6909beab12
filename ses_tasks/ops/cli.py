"""``ses-tasks``: the command line.

Exit status, the same for every command: 0 success; 1 a runtime failure (Redis or the
broker unreachable or refusing, an SMTP error, a store failure, a campaign that does not
exist or cannot be changed in its state, an unexpected error); 2 a usage error (a bad
option or argument, an invalid input file or field, invalid configuration). A failure is
one line on stderr, ``ses-tasks: error: ...``, never a traceback (``SES_TASKS_DEBUG=1``
shows the traceback of an unexpected error). ``--json`` prints exactly one JSON document
on stdout; logs, progress and errors go to stderr.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import redis

from ses_tasks.config import Settings, load_settings
from ses_tasks.errors import ConfigurationError, SesTasksError, ValidationError
from ses_tasks.events import load_hooks as load_event_hooks

EXIT_OK = 0
#: A runtime failure: a service unreachable, SMTP, the store, a campaign's state.
EXIT_FAILURE = 1
#: A usage error: options, arguments, input files and fields, configuration.
EXIT_USAGE = 2
EXIT_USER_ERROR = EXIT_USAGE  # the former name
EXIT_INTERRUPTED = 130

#: Set to 1 to see the traceback of an unexpected error instead of one line.
DEBUG_ENV = "SES_TASKS_DEBUG"

#: Interactive publishing gives up sooner than the app's policy (about 11 s, for producers
#: that must not lose a message): pauses of 0, 0.5, 1 s. Whatever is recorded but not
#: published is swept later, so a short policy loses nothing.
CLI_PUBLISH_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}
#: ``send`` checks the broker first, so an unreachable one fails before anything is
#: recorded: connection attempts after pauses of 0 and 0.5 s.
BROKER_CHECK = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}

EXIT_CODES_EPILOG = """\b
Exit status:
  0  success
  1  runtime failure: Redis or the broker unreachable, an SMTP error, a
     store failure, a campaign that does not exist or cannot be changed in
     its state, an unexpected error
  2  usage error: a bad option or argument, an invalid input file or field,
     invalid configuration
Errors are one line on stderr; --json prints exactly one JSON document on
stdout. SES_TASKS_DEBUG=1 shows the traceback of an unexpected error."""

#: What the sandbox extra brings (the local endpoint, embedded Redis, the demo).
SANDBOX_MODULES = frozenset({"aiosmtpd", "trustme", "fakeredis", "lupa"})

log = logging.getLogger("ses_tasks.ops.cli")


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"ses-tasks: error: {message}", err=True)
    sys.exit(code)


def _redis_problem(exc: redis.RedisError) -> str:
    if isinstance(exc, redis.AuthenticationError):
        return f"Redis refused the login ({exc}); check SES_TASKS_REDIS_URL"
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return f"cannot reach Redis ({exc}); check SES_TASKS_REDIS_URL"
    return f"Redis refused a command ({type(exc).__name__}: {exc}); check SES_TASKS_REDIS_URL"


def _broker_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import KombuError

    try:
        from amqp.exceptions import AMQPError
    except ImportError:  # pragma: no cover - amqp comes with kombu
        return (KombuError,)
    return (KombuError, AMQPError)


def explain(exc: BaseException) -> tuple[str, int] | None:
    """The one line and exit status for an error we expect; None if it is unexpected."""
    if isinstance(exc, ValidationError | ConfigurationError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, SesTasksError):
        # CampaignError, DeliveryError (SMTP), a store or broker failure.
        cause = exc.__cause__
        if isinstance(cause, redis.RedisError) and str(cause) not in str(exc):
            return f"{exc} ({cause}); check SES_TASKS_REDIS_URL", EXIT_FAILURE
        return str(exc), EXIT_FAILURE
    if isinstance(exc, redis.RedisError):
        return _redis_problem(exc), EXIT_FAILURE
    if isinstance(exc, _broker_errors()):
        return f"cannot use the broker ({exc}); check SES_TASKS_BROKER_URL", EXIT_FAILURE
    if isinstance(exc, ModuleNotFoundError) and exc.name in SANDBOX_MODULES:
        return f"{exc.name} is not installed: pip install 'ses-tasks[sandbox]'", EXIT_FAILURE
    return None


class SesTasksGroup(click.Group):
    """The root group: every error below it ends as one line and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click reports these itself (usage errors: exit 2)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # click ends quietly when stdout's reader went away
            _handle(exc)
        except Exception as exc:
            _handle(exc)


def _handle(exc: Exception) -> NoReturn:
    """Exit with the line for an error we expect, or the "unexpected" line (re-raised
    under SES_TASKS_DEBUG=1, for the traceback)."""
    known = explain(exc)
    if known is not None:
        _fail(*known)
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        raise exc
    _fail(
        f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)",
        EXIT_FAILURE,
    )


def _settings(**overrides: Any) -> Settings:
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


class _PublishWatch:
    """Keeps what a publish raised: the client logs it and leaves the message to the
    sweeper, without raising."""

    def __init__(self) -> None:
        self.failures: list[Exception] = []

    def attach(self, app: Any) -> None:
        send_task = app.send_task

        def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                return send_task(*args, **kwargs)
            except Exception as exc:
                self.failures.append(exc)
                raise

        setattr(app, "send_task", watched)  # noqa: B010 - an instance attribute, not a method


def _client(settings: Settings | None = None, watch: _PublishWatch | None = None) -> Any:
    """The client, with the CLI's short publish retry policy."""
    from ses_tasks.produce.client import SesTasks
    from ses_tasks.queue.app import create_app

    settings = settings or _settings()
    app = create_app(settings)
    app.conf.update(task_publish_retry_policy=dict(CLI_PUBLISH_RETRY_POLICY))
    if watch is not None:
        watch.attach(app)
    return SesTasks(settings, celery_app=app)


def _check_broker(client: Any) -> None:
    """Fail (exit 1) now if the broker cannot be reached, before anything is recorded."""

    def retrying(exc: Exception, interval: float) -> None:
        log.info("broker not reachable (%s); trying again in %.1f s", exc, interval)

    errors: tuple[type[BaseException], ...] = (*_broker_errors(), OSError, redis.RedisError)
    connection = client.app.connection_for_write()
    try:
        connection.ensure_connection(errback=retrying, **BROKER_CHECK)
    except errors as exc:
        _fail(
            f"cannot reach the broker ({exc}); nothing was enqueued; check SES_TASKS_BROKER_URL",
            EXIT_FAILURE,
        )
    finally:
        connection.release()


def _read(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"--{what}", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValidationError(f"--{what}", f"{path} is not UTF-8 text") from None


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, default=str, sort_keys=False))


JSON_HELP = "Print exactly one JSON document on stdout (errors still go to stderr)."
PROFILE_HELP = "Sender profile (SES account/region); default: the unnamed one."


@click.group(
    cls=SesTasksGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_EPILOG,
)
@click.version_option(package_name="ses-tasks")
@click.option("-v", "--verbose", count=True, help="Log more on stderr (-v: info, -vv: debug).")
def main(verbose: int) -> None:
    """Bulk and transactional email through Amazon SES SMTP, with Celery."""
    # Commands report failures as one line; library warnings only with -v. Logs go to
    # stderr, so that stdout carries only a command's output.
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="ses-tasks: %(levelname)s %(name)s: %(message)s"
    )


# send ------------------------------------------------------------------------------------

#: How long ``send --wait`` waits for the final state.
SEND_WAIT_S = 300


AT_HELP = (
    "Send at TIME, ISO-8601 with an offset (2025-06-01T09:00:00+02:00 or ...Z); default "
    "now. Stored now, sent then by the workers (survives their restarts)."
)


def _send_at(value: str | None, settings: Settings) -> float | None:
    """--at as Unix time (None: now); a bad one is a usage error naming --at."""
    from ses_tasks.produce.options import parse_send_at

    try:
        at_ms = parse_send_at(value, retention_s=settings.retention_s)
    except ValidationError as exc:
        raise ValidationError("--at", exc.problem) from None
    return None if at_ms is None else at_ms / 1000


@main.command()
@click.option("--from", "from_", required=True, help="Sender, 'Name <addr>' allowed.")
@click.option("--to", multiple=True, required=True, help="Recipient (repeat for several).")
@click.option("--cc", multiple=True, help="Cc recipient (repeatable).")
@click.option("--bcc", multiple=True, help="Bcc recipient (repeatable).")
@click.option("--reply-to", multiple=True, help="Reply-To address (repeatable).")
@click.option("--subject", required=True, help="Subject line.")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="Text body file.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="HTML body file.")
@click.option("--idempotency-key", help="Enqueue the same key twice, send once.")
@click.option("--direct", is_flag=True, help="Send now through the pool, without the queue.")
@click.option("--profile", default="", help=PROFILE_HELP)
@click.option("--at", "send_at", metavar="TIME", help=AT_HELP)
@click.option(
    "--wait", is_flag=True, help=f"Wait (up to {SEND_WAIT_S} s after --at) for the final state."
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def send(
    from_: str,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    reply_to: tuple[str, ...],
    subject: str,
    text_file: str | None,
    html_file: str | None,
    idempotency_key: str | None,
    direct: bool,
    profile: str,
    send_at: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Send one message: enqueued (prints the message id) or --direct (prints the SES id).

    Enqueueing checks the broker first: if it cannot be reached, nothing is recorded and
    the command exits 1. With --wait it exits 1 unless the message was sent.
    """
    fields = {
        "from": from_,
        "to": list(to),
        "cc": list(cc),
        "bcc": list(bcc),
        "reply_to": list(reply_to),
        "subject": subject,
        "text": _read(text_file, "text"),
        "html": _read(html_file, "html"),
        "idempotency_key": idempotency_key,
    }
    watch = _PublishWatch()
    client = _client(watch=watch)
    if direct and send_at:
        raise click.UsageError("--at cannot be used with --direct (a direct send is now)")
    at = _send_at(send_at, client.settings)  # exit 2 before the broker is checked
    if direct:
        from ses_tasks.ops.direct import send_direct

        result = send_direct(client.sender(profile), fields)
        if as_json:
            _print_json({"state": "sent", "ses_message_id": result.ses_message_id})
        else:
            click.echo(result.ses_message_id)
        return
    client.build_message(profile=profile, **fields)  # invalid input: exit 2, broker or not
    _check_broker(client)
    handle = client.send_email(profile=profile, send_at=send_at, **fields)
    try:
        _report_sent(handle, watch, wait=wait, as_json=as_json, send_at=at)
    finally:
        _release(handle)


def _release(result: Any) -> None:
    """Detach a result from its backend: at interpreter exit its ``__del__`` would connect
    to the result backend to unsubscribe (the process is ending anyway) and, the
    interpreter shutting down, print a traceback."""
    result.backend = None


def _report_sent(
    handle: Any, watch: _PublishWatch, *, wait: bool, as_json: bool, send_at: float | None = None
) -> None:
    for exc in watch.failures[-1:]:
        # Recorded, so not lost: the workers' sweeper publishes it once the broker is back.
        click.echo(
            f"ses-tasks: warning: message {handle.message_id} is recorded but the broker did "
            f"not take it ({exc}); the workers publish it once the broker is back: do not "
            "send it again",
            err=True,
        )
    if not wait:
        if as_json:
            _print_json({"id": handle.message_id, **({"send_at": send_at} if send_at else {})})
        else:
            click.echo(handle.message_id)
        return
    from celery.exceptions import TimeoutError as ResultTimeout

    timeout_s = SEND_WAIT_S + max(0.0, (send_at or 0.0) - time.time())
    try:
        record = handle.get(timeout=timeout_s, propagate=False)
    except ResultTimeout:
        _fail(
            f"message {handle.message_id} is not final after {timeout_s:.0f} s (is a worker "
            "running for its queue?)",
            EXIT_FAILURE,
        )
    if not isinstance(record, dict):
        record = {"id": handle.message_id, "state": "failed", "reason": str(record)}
    if as_json:
        _print_json(record)
    else:
        click.echo(
            f"{handle.message_id} {record.get('state')} {record.get('ses_message_id') or ''}"
        )
    if record.get("state") != "sent":
        reason = record.get("reason") or "no reason recorded"
        _fail(f"message {handle.message_id} is {record.get('state')}: {reason}", EXIT_FAILURE)


# campaign --------------------------------------------------------------------------------


@main.group()
def campaign() -> None:
    """Send and control campaigns."""


@campaign.command("send")
@click.option("--from", "from_", required=True, help="Sender, 'Name <addr>' allowed.")
@click.option("--subject", required=True, help="Jinja2 template.")
@click.option(
    "--text", "text_file", type=click.Path(dir_okay=False), help="Text body file (Jinja2)."
)
@click.option(
    "--html", "html_file", type=click.Path(dir_okay=False), help="HTML body file (Jinja2)."
)
@click.option(
    "--recipients",
    required=True,
    type=click.Path(dir_okay=False),
    help="CSV file with an 'email' column (other columns are template variables), or JSONL.",
)
@click.option("--id", "campaign_id", help="Campaign id; default: a new one.")
@click.option("--reply-to", multiple=True, help="Reply-To address (repeatable).")
@click.option("--unsubscribe-url", help="List-Unsubscribe one-click URL (template).")
@click.option("--unsubscribe-mailto", help="List-Unsubscribe mailto: address.")
@click.option("--tag", "tags", multiple=True, help="SES message tag name=value (repeatable).")
@click.option("--resume", is_flag=True, help="Continue an interrupted enqueue of --id.")
@click.option(
    "--weight",
    type=float,
    default=1.0,
    show_default=True,
    help="Share of the rate against other running campaigns (2 = twice a campaign of 1).",
)
@click.option("--profile", default="", help=PROFILE_HELP)
@click.option("--at", "send_at", metavar="TIME", help=AT_HELP)
@click.option("--wait", is_flag=True, help="Show progress until every message is final.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def campaign_send(
    from_: str,
    subject: str,
    text_file: str | None,
    html_file: str | None,
    recipients: str,
    campaign_id: str | None,
    reply_to: tuple[str, ...],
    unsubscribe_url: str | None,
    unsubscribe_mailto: str | None,
    tags: tuple[str, ...],
    resume: bool,
    weight: float,
    profile: str,
    send_at: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Enqueue a campaign; prints its id. With --wait, exits 1 unless it completed.

    With --at it is stored now and nothing of it is sent before TIME (pause, resume and
    cancel work meanwhile); a resumed enqueue keeps the schedule it was created with.
    """
    from ses_tasks.ops.progress import enqueue_progress, wait_progress
    from ses_tasks.produce.options import format_epoch

    if resume and not campaign_id:
        raise click.UsageError("--resume needs --id (the campaign to continue)")
    options: dict[str, Any] = {}
    if reply_to:
        options["reply_to"] = list(reply_to)
    if unsubscribe_url:
        options["list_unsubscribe_url"] = unsubscribe_url
    if unsubscribe_mailto:
        options["list_unsubscribe_mailto"] = unsubscribe_mailto
    if tags:
        options["tags"] = dict(_parse_tag(t) for t in tags)
    text, html = _read(text_file, "text"), _read(html_file, "html")
    client = _client()
    _send_at(send_at, client.settings)  # a bad --at: exit 2, naming it, before anything
    quiet = as_json or not sys.stderr.isatty()
    with enqueue_progress(Path(recipients), quiet=quiet) as advance:
        status = client.send_campaign(
            from_=from_,
            subject=subject,
            text=text,
            html=html,
            recipients=recipients,
            campaign_id=campaign_id,
            progress=advance,
            resume=resume,
            weight=weight,
            profile=profile,
            send_at=send_at,
            **options,
        )
    if status.scheduled and not quiet:
        click.echo(f"{status.id}: scheduled for {format_epoch(status.send_at or 0)}", err=True)
    if wait:
        status = wait_progress(client, status.id, quiet=quiet)
    if as_json:
        brief = {"id": status.id, "total": status.total, "send_at": status.send_at}
        _print_json(status.to_dict() if wait else brief)
    else:
        click.echo(status.id)
        if wait:
            click.echo(_counts_line(status.to_dict()), err=True)
    if wait and not status.done:
        _fail(f"campaign {status.id} is {status.state.value}: {status.reason}", EXIT_FAILURE)


def _parse_tag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise ValidationError("--tag", f"{text!r}: use name=value")
    return name, value


def _counts_line(data: dict[str, Any]) -> str:
    from ses_tasks.store.tracking import COUNTERS

    parts = [f"{name}={data[name]}" for name in COUNTERS if data.get(name)]
    return f"{data['id']}: {data['state']} total={data['total']} " + " ".join(parts)


@campaign.command("status")
@click.argument("campaign_id")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def campaign_status(campaign_id: str, as_json: bool) -> None:
    """Counters of CAMPAIGN_ID by state (they add up to the total), share of the rate, ETA."""
    from ses_tasks.ops.direct import effective_rates
    from ses_tasks.ops.schedule import fleet_schedule

    client = _client()
    status = client.campaign_status(campaign_id)
    planned = next(
        (
            p
            for p in fleet_schedule(client.store, effective_rates(client.settings))
            if p.status.id == campaign_id
        ),
        None,
    )
    if as_json:
        extra = planned.to_dict() if planned else {}
        _print_json(
            {
                **status.to_dict(),
                **{k: extra.get(k) for k in ("weight", "share", "rate_per_s", "eta_s")},
            }
        )
        return
    from ses_tasks.ops.progress import status_table

    status_table(status, planned)


@campaign.command("failures")
@click.argument("campaign_id")
def campaign_failures(campaign_id: str) -> None:
    """CSV of email,state,code,reason,message_id for every message of CAMPAIGN_ID not sent."""
    rows = [
        [
            record.email or "",
            record.state.value,
            record.code or "",
            record.reason,
            record.message_id,
        ]
        for record in _client().failures(campaign_id)
    ]  # read before writing: a store failure leaves no half-written CSV on stdout
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["email", "state", "code", "reason", "message_id"])
    writer.writerows(rows)


@campaign.command("pause")
@click.argument("campaign_id")
def campaign_pause(campaign_id: str) -> None:
    """Pause CAMPAIGN_ID: workers stop between messages; the rest waits, deferred."""
    changed = _client().pause(campaign_id)
    click.echo(f"{campaign_id}: {'paused' if changed else 'already paused'}")


@campaign.command("resume")
@click.argument("campaign_id")
def campaign_resume(campaign_id: str) -> None:
    """Resume the paused CAMPAIGN_ID: its deferred messages are enqueued again."""
    count = _client().resume(campaign_id)
    click.echo(f"{campaign_id}: resumed, {count} deferred messages re-enqueued")


@campaign.command("cancel")
@click.argument("campaign_id")
def campaign_cancel(campaign_id: str) -> None:
    """Cancel CAMPAIGN_ID: nothing more of it is sent; its open messages end cancelled."""
    count = _client().cancel(campaign_id)
    click.echo(f"{campaign_id}: cancelled ({count} parked messages cancelled now)")


@campaign.command("retry-failed")
@click.argument("campaign_id")
@click.option(
    "--include-unknown",
    is_flag=True,
    help="Also resend messages whose outcome is unknown (may duplicate).",
)
def campaign_retry_failed(campaign_id: str, include_unknown: bool) -> None:
    """Send the failed messages of CAMPAIGN_ID again."""
    count = _client().retry_failed(campaign_id, include_unknown=include_unknown)
    click.echo(f"{campaign_id}: {count} messages re-enqueued")


@campaign.command("weight")
@click.argument("campaign_id")
@click.argument("weight", type=float)
def campaign_weight(campaign_id: str, weight: float) -> None:
    """Set CAMPAIGN_ID's share of the rate to WEIGHT while it runs (2 = twice a 1)."""
    _client().set_weight(campaign_id, weight)
    click.echo(f"{campaign_id}: weight {weight:g}")


@campaign.command("list")
@click.option("--all", "show_all", is_flag=True, help="Recent campaigns, finished ones too.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def campaign_list(show_all: bool, as_json: bool) -> None:
    """Active campaigns: weight, share of the rate, sent/total and ETA."""
    client = _client()
    if show_all:
        rows = [client.campaign_status(cid).to_dict() for cid in client.store.list_campaigns()]
        if as_json:
            _print_json(rows)
        else:
            for row in rows:
                click.echo(_counts_line(row))
        return
    from ses_tasks.ops.direct import effective_rates
    from ses_tasks.ops.progress import schedule_table
    from ses_tasks.ops.schedule import fleet_schedule

    rates = effective_rates(client.settings)
    planned = fleet_schedule(client.store, rates)
    if as_json:
        _print_json([p.to_dict() for p in planned])
    else:
        schedule_table(planned, rates)


# worker ----------------------------------------------------------------------------------

QUEUE_CHOICES = ("all", "bulk", "transactional")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Pauses before restarting a Celery worker that died, growing with each quick failure.
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: A worker that ran this long before dying restarts after the shortest pause again.
STABLE_RUN_S = 60.0
#: Exit statuses not worth a restart: our configuration and usage errors, Celery's.
NO_RESTART_STATUSES = frozenset({EXIT_USAGE, 64})
#: Signals that stop the supervisor (after the worker's warm or cold shutdown).
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT")
#: Signals passed on to the Celery worker as they are.
FORWARDED_SIGNALS = (*STOP_SIGNALS, "SIGHUP", "SIGUSR1", "SIGUSR2")
PR_SET_PDEATHSIG = 1

supervisor_log = logging.getLogger("ses_tasks.ops.supervisor")


@main.command()
@click.option(
    "--mode",
    type=click.Choice(["starttls", "tls"]),
    help="Port mode to serve; default: from SES_TASKS_MODE/SES_TASKS_PORT.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes.",
)
@click.option(
    "--queues",
    type=click.Choice(QUEUE_CHOICES),
    default="all",
    show_default=True,
    help="Which of the mode's queues to consume.",
)
@click.option("--name", "-n", default=None, help="Celery node name.")
@click.option(
    "--loglevel",
    "-l",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Log level of the worker.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics here.",
)
@click.option(
    "--supervise/--no-supervise",
    default=True,
    show_default=True,
    help="Run Celery's worker in a child process and restart it if it dies.",
)
@click.option(
    "--django-settings",
    "django_settings",
    metavar="MODULE",
    default=None,
    help="Load this Django settings module and use its SES_TASKS dict (it wins over the "
    "environment), so the web app and the workers share one configuration.",
)
def worker(
    mode: str | None,
    concurrency: int,
    queues: str,
    name: str | None,
    loglevel: str,
    metrics_port: int | None,
    supervise: bool,
    django_settings: str | None,
) -> None:
    """A Celery worker for one port mode, with safe settings.

    By default this process supervises the Celery worker: it runs it in a child process,
    restarts it (with backoff) if it exits on its own with an error or is killed, and
    passes SIGTERM/SIGINT/SIGQUIT (then exits with the worker's status), SIGHUP and
    SIGUSR1/2 on to it. Killing this process kills the worker with it (Linux). A usage or
    configuration error (exit 2) is not restarted.
    """
    loglevel = loglevel.upper()
    if django_settings:
        from ses_tasks.integrations.django_settings import export_django_settings

        exported = export_django_settings(django_settings)
    if mode is not None:
        os.environ["SES_TASKS_MODE"] = mode
        if "SES_TASKS_PORT" not in os.environ and not os.environ.get("SES_TASKS_HOST"):
            os.environ["SES_TASKS_PORT"] = "465" if mode == "tls" else "587"
    settings = _settings()
    load_event_hooks(settings.event_hooks)  # ConfigurationError (exit 2) before starting
    if metrics_port is not None:
        os.environ["SES_TASKS_METRICS_PORT"] = str(metrics_port)
    logging.getLogger().setLevel(loglevel)
    if django_settings and supervise:
        supervisor_log.info("settings from %s: %s", django_settings, ", ".join(exported))
    if supervise:
        argv = [
            sys.executable, "-m", "ses_tasks.ops.cli", "worker", "--no-supervise",
            "--concurrency", str(concurrency), "--queues", queues, "--loglevel", loglevel,
        ]  # fmt: skip
        if mode is not None:
            argv += ["--mode", mode]
        if name:
            argv += ["--name", name]
        if metrics_port is not None:
            argv += ["--metrics-port", str(metrics_port)]
        if django_settings:  # the worker sets Django up too (signal hooks, app imports)
            argv += ["--django-settings", django_settings]
        sys.exit(_Supervisor(argv).run())

    from celery import signals

    from ses_tasks.queue.app import app, bulk_queue, transactional_queue
    from ses_tasks.store.connections import patch_kombu_redis

    patch_kombu_redis()
    serve = settings.endpoint.mode
    names = {
        "all": [transactional_queue(serve), bulk_queue(serve)],
        "bulk": [bulk_queue(serve)],
        "transactional": [transactional_queue(serve)],
    }[queues]
    argv = [
        "worker",
        "--queues",
        ",".join(names),
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "-E",
    ]
    if name:
        argv += ["--hostname", name]
    # app.worker_main() drops the worker's exit status: after an "Unrecoverable error" this
    # process would end with 0, a clean exit to the supervisor. Keep it.
    exit_codes: list[int | None] = []

    def remember_exit_code(sender: Any = None, **_: Any) -> None:
        exit_codes.append(getattr(sender, "exitcode", None))

    signals.worker_shutdown.connect(remember_exit_code, weak=False)
    app.worker_main(argv)
    sys.exit(exit_codes[-1] or 0 if exit_codes else 0)


def _exit_status(returncode: int) -> int:
    """A child's ``returncode`` as a shell would report it (killed by N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _Supervisor:
    """Runs ``argv`` (the Celery worker) and restarts it until asked to stop."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._prctl = _load_prctl()

    def run(self) -> int:
        for name in FORWARDED_SIGNALS:
            signal.signal(getattr(signal, name), self._on_signal)
        failures = 0
        restarts = 0
        while True:
            started = time.monotonic()
            child = self._spawn()
            supervisor_log.info("celery worker started (pid %d)", child.pid)
            returncode = child.wait()
            if self.stopping:
                return _exit_status(returncode)
            if returncode == 0:
                supervisor_log.info("celery worker (pid %d) exited cleanly", child.pid)
                return 0
            if returncode in NO_RESTART_STATUSES:
                supervisor_log.error(
                    "celery worker (pid %d) %s; not restarting it (a configuration or "
                    "usage error)", child.pid, _describe_exit(returncode),
                )  # fmt: skip
                return returncode
            ran_s = time.monotonic() - started
            failures = 1 if ran_s >= STABLE_RUN_S else failures + 1
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S)) - 1]
            restarts += 1
            supervisor_log.warning(
                "celery worker (pid %d) %s after %.0f s; restarting it in %.0f s (restart %d)",
                child.pid, _describe_exit(returncode), ran_s, delay, restarts,
            )  # fmt: skip
            if self._pause(delay):
                return 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        parent = os.getpid()
        prctl = self._prctl

        def die_with_parent() -> None:  # runs in the child, between fork and exec
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
                if os.getppid() != parent:  # the supervisor died before prctl
                    os.kill(os.getpid(), signal.SIGKILL)

        self.child = subprocess.Popen(
            self.argv,
            preexec_fn=die_with_parent if prctl is not None else None,
            # Its own process group, so a Ctrl-C on a terminal reaches the worker once
            # (passed on by us) rather than twice; without prctl (not Linux), our group,
            # so that killing the group still takes the worker along.
            process_group=0 if prctl is not None else None,
        )
        return self.child

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signal.Signals(signum).name in STOP_SIGNALS:
            self.stopping = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        child = self.child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def _pause(self, delay_s: float) -> bool:
        """Wait ``delay_s`` or until asked to stop; True if asked to stop."""
        deadline = time.monotonic() + delay_s
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([self._wake_r], [], [], left)
            if readable:
                os.read(self._wake_r, 64)
        return True


def _load_prctl() -> Callable[..., int] | None:
    """``prctl(2)`` (Linux), loaded before any fork; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


# suppression -----------------------------------------------------------------------------


@main.group()
def suppress() -> None:
    """The local suppression list (checked before every send)."""


@suppress.command("add")
@click.argument("emails", nargs=-1, required=True)
@click.option(
    "--reason", default="added by user", show_default=True, help="Why, kept with each address."
)
def suppress_add(emails: tuple[str, ...], reason: str) -> None:
    """Never send to EMAILS (one or more addresses); prints how many were new."""
    added = _client().suppression.add(emails, reason=reason)
    click.echo(f"{added} added")


@suppress.command("remove")
@click.argument("emails", nargs=-1, required=True)
def suppress_remove(emails: tuple[str, ...]) -> None:
    """Send to EMAILS (one or more addresses) again; prints how many were listed."""
    removed = _client().suppression.remove(emails)
    click.echo(f"{removed} removed")


@suppress.command("list")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON array of {email, reason, added_at}."
)
def suppress_list(as_json: bool) -> None:
    """Suppressed addresses and why, one per line (tab-separated)."""
    entries = list(_client().suppression)  # read all first: no half output on a failure
    if as_json:
        _print_json(
            [{"email": e.email, "reason": e.reason, "added_at": e.added_at} for e in entries]
        )
        return
    for entry in entries:
        click.echo(f"{entry.email}\t{entry.reason}")


from ses_tasks.feedback.cli import feedback, suppress_export  # noqa: E402 - groups defined above

main.add_command(feedback)
suppress.add_command(suppress_export)


# tools -----------------------------------------------------------------------------------


@main.command("smtp-password")
@click.option("--region", required=True, help="SES region the password is for (us-east-1).")
def smtp_password_command(region: str) -> None:
    """Derive the SMTP password from an IAM secret key read from stdin or the environment.

    The secret is never taken from the command line, where other users could read it:
    set SES_TASKS_SECRET_ACCESS_KEY (or AWS_SECRET_ACCESS_KEY), or pipe it on stdin.
    """
    from ses_tasks.smtp.credentials import smtp_password

    secret = os.environ.get("SES_TASKS_SECRET_ACCESS_KEY") or os.environ.get(
        "AWS_SECRET_ACCESS_KEY"
    )
    if not secret:
        if sys.stdin.isatty():
            import getpass

            secret = getpass.getpass("IAM secret access key: ")
        else:
            secret = sys.stdin.readline()
    secret = (secret or "").strip()
    if not secret:
        raise ValidationError(
            "secret", "none given: pipe it on stdin or set SES_TASKS_SECRET_ACCESS_KEY"
        )
    try:
        click.echo(smtp_password(secret, region))
    except ValueError as exc:
        raise ValidationError("--region", str(exc)) from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def check(as_json: bool) -> None:
    """Connect, negotiate TLS, authenticate and report, without sending.

    Exits 1 when the endpoint could not be used or no credentials were configured to
    authenticate with (a check that did not AUTH proves nothing about sending).
    """
    from ses_tasks.ops.direct import probe

    info = probe(_settings())
    if as_json:
        _print_json(info)
    else:
        for key, value in info.items():
            click.echo(f"{key}: {value}")
    if not info.get("authenticated"):
        _fail(
            "connected and negotiated TLS but did not authenticate: no credentials are "
            "configured (SES_TASKS_USERNAME and SES_TASKS_PASSWORD, or an IAM key pair)",
            EXIT_FAILURE,
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def limits(as_json: bool) -> None:
    """Fleet rate limit, tokens, 24-hour quota use and any pause reason."""
    from ses_tasks.ops.direct import limits_status

    data = limits_status(_settings())
    if as_json:
        _print_json(data)
    else:
        for key, value in data.items():
            click.echo(f"{key}: {value}")


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; beyond loopback needs SES_TASKS_DASHBOARD_TOKEN or "
    "SES_TASKS_DASHBOARD_USER/PASSWORD.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8025, show_default=True, help="TCP port."
)
@click.option("--read-only", is_flag=True, help="Show everything; refuse every action.")
@click.option(
    "--with-feedback",
    is_flag=True,
    help="Also receive SNS feedback at /sns in this process (see `feedback serve`).",
)
def dashboard(host: str, port: int, read_only: bool, with_feedback: bool) -> None:
    """Serve the web dashboard: campaigns, suppression, limits, workers.

    Without credentials configured it only serves on a loopback address; with them, every
    request must present them (docs/dashboard.md). Runs until SIGTERM or Ctrl-C
    (then exits 0).
    """
    from ses_tasks.dashboard import DashboardAuth, check_bind, create_app
    from ses_tasks.ops.serve import serve

    settings = _settings()
    check_bind(host, DashboardAuth.from_settings(settings))  # exit 2 before listening
    app = create_app(settings=settings, read_only=read_only, feedback=with_feedback)

    def announce(url: str) -> None:
        click.echo(
            f"ses-tasks dashboard on {url}"
            + (" (read-only)" if read_only else "")
            + (f", SNS feedback at {url}sns" if with_feedback else ""),
            err=True,
        )

    serve(
        app,
        name="dashboard",
        host=host,
        port=port,
        announce=announce,
        log_level=logging.WARNING,
        lifespan="auto",
    )


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def sandbox(ctx: click.Context) -> None:
    """Run the local SES-compatible endpoint (see `ses-tasks sandbox --help`)."""
    from ses_tasks.sandbox import main as sandbox_main

    sys.exit(sandbox_main(list(ctx.args)))


@main.command()
@click.option(
    "--recipients",
    "count",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Size of the sample campaign.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes.",
)
@click.option(
    "--mode",
    type=click.Choice(["starttls", "tls"]),
    default="tls",
    show_default=True,
    help="Port mode of the sandbox endpoint to send through.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=500.0,
    show_default=True,
    help="Recipients/s.",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def demo(count: int, workers: int, mode: str, rate: float, as_json: bool) -> None:
    """Everything on this machine: Redis, the sandbox, workers, a sample campaign.

    Exits 1 unless every recipient was sent.
    """
    from ses_tasks.sandbox.demo import run_demo

    report = run_demo(recipients=count, workers=workers, mode=mode, rate=rate, quiet=as_json)
    if as_json:
        _print_json(report)
    sent = report.get("counts", {}).get("sent", 0)
    if sent != count:
        _fail(f"demo: {sent} of {count} recipients sent ({report.get('state')})", EXIT_FAILURE)


if __name__ == "__main__":
    main(prog_name="ses-tasks")
