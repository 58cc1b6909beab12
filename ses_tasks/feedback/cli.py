"""``ses-tasks feedback serve|ingest|status`` and ``ses-tasks suppress export``.

Wired into ``ses_tasks.ops.cli`` by ``main.add_command(feedback)`` and
``suppress.add_command(suppress_export)``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from ses_tasks.config import load_settings
from ses_tasks.errors import ConfigurationError, SesTasksError, ValidationError
from ses_tasks.store.connections import sync_redis

__all__ = ["feedback", "suppress_export"]

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """One line on stderr instead of a traceback, like ``ses_tasks.ops.cli`` (not imported from
    there: ``ses_tasks.ops.cli`` imports this module)."""
    import redis

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SesTasksError as exc:
            click.echo(f"ses-tasks: error: {exc}", err=True)
            # The CLI's contract (docs/cli.md): 2 for usage and configuration, 1 otherwise.
            sys.exit(2 if isinstance(exc, ValidationError | ConfigurationError) else 1)
        except redis.ConnectionError as exc:
            click.echo(
                f"ses-tasks: error: cannot reach Redis ({exc}); check SES_TASKS_REDIS_URL",
                err=True,
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _handler() -> Any:
    from ses_tasks.feedback.handler import FeedbackHandler

    return FeedbackHandler.from_settings()


@click.group()
def feedback() -> None:
    """Delivery feedback: SES bounce, complaint and delivery notifications via SNS."""


@feedback.command("serve")
@click.option("--host", default=None, help="Address to listen on [SES_TASKS_FEEDBACK_HOST].")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="Port [SES_TASKS_FEEDBACK_PORT]."
)
@click.option(
    "--ssl-certfile",
    type=click.Path(exists=True, dir_okay=False),
    envvar="SES_TASKS_FEEDBACK_SSL_CERTFILE",
    default=None,
    help="Serve HTTPS with this PEM certificate chain (and key, unless --ssl-keyfile)"
    " [SES_TASKS_FEEDBACK_SSL_CERTFILE].",
)
@click.option(
    "--ssl-keyfile",
    type=click.Path(exists=True, dir_okay=False),
    envvar="SES_TASKS_FEEDBACK_SSL_KEYFILE",
    default=None,
    help="The certificate's unencrypted PEM private key [SES_TASKS_FEEDBACK_SSL_KEYFILE].",
)
@user_errors
def serve_command(
    host: str | None, port: int | None, ssl_certfile: str | None, ssl_keyfile: str | None
) -> None:
    """Receive SNS HTTP POSTs (subscribe http(s)://<this host>/ to the SES topics).

    Refuses to start without SES_TASKS_FEEDBACK_ALLOWED_TOPIC_ARNS: SNS signs every
    account's messages alike, so only the topic says a bounce or complaint is yours.
    SIGTERM or Ctrl-C stops it cleanly: requests in flight are finished, then exit 0.
    """
    from ses_tasks.feedback.asgi import FeedbackApp
    from ses_tasks.feedback.settings import load_feedback_settings
    from ses_tasks.ops.serve import serve

    if ssl_keyfile is not None and ssl_certfile is None:
        raise click.UsageError("--ssl-keyfile needs --ssl-certfile")
    fb = load_feedback_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # A long-running receiver: its refusals and start-up warnings show even without -v (the
    # ``ses-tasks`` group logs only errors by default).
    receiver_log = logging.getLogger("ses_tasks.feedback")
    if receiver_log.getEffectiveLevel() > logging.INFO:
        receiver_log.setLevel(logging.INFO)
    app = FeedbackApp(feedback_settings=fb)
    app.handler  # noqa: B018 - built now: bad settings end here as one error line
    serve(
        app,
        name="feedback receiver",
        host=host or fb.host,
        port=fb.port if port is None else port,
        announce=lambda url: receiver_log.info("feedback receiver listening on %s", url),
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    receiver_log.info("feedback receiver stopped")


@feedback.command("ingest")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=False))
@click.option("--verify", is_flag=True, help="Check the SNS signature of saved envelopes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@user_errors
def ingest_command(file: str, verify: bool, as_json: bool) -> None:
    """Apply notifications saved as JSON lines in FILE (SNS envelopes or raw SES
    notifications), e.g. exported from an SQS queue or a log."""
    report = _handler().ingest(file, verify=verify)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(
            f"{report.applied} applied, {report.duplicates} duplicates, "
            f"{report.uncorrelated} uncorrelated, {report.invalid} invalid, "
            f"{report.ignored} ignored, {report.suppressed} addresses suppressed"
        )
        for error in report.errors:
            click.echo(error, err=True)


@feedback.command("status")
@click.argument("campaign_id")
@user_errors
def status_command(campaign_id: str) -> None:
    """Feedback counters and bounce/complaint rates of CAMPAIGN_ID, as JSON (exit 1 if
    there is no such campaign)."""
    click.echo(json.dumps(_handler().applier.feedback_status(campaign_id).to_dict()))


@click.command("export")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write to this file instead of stdout.",
)
@user_errors
def suppress_export(output: str | None) -> None:
    """Export the suppression list as CSV: email,reason,source,added_at."""

    from ses_tasks.store.suppression import SuppressionList

    settings = load_settings()
    suppression = SuppressionList(
        sync_redis(settings.redis_url, settings=settings), key_prefix=settings.key_prefix
    )
    if output is None:
        suppression.export_csv(sys.stdout)
        return
    with open(output, "w", newline="", encoding="utf-8") as handle:
        count = suppression.export_csv(handle)
    click.echo(f"{count} exported to {output}", err=True)
