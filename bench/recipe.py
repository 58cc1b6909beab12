"""The common recipe, as people write it: one Celery task per message, a fresh ``smtplib``
connection each time (connect, STARTTLS, login, send, quit), the message built with
``email.message.EmailMessage``.

Run by ``bench/baselines.py`` as real Celery workers:
``celery -A bench.recipe worker -P threads -c N``. Configuration comes from the environment
(``BENCH_RECIPE_*``), so the same module serves any sandbox the benchmark starts.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import uuid
from email.message import EmailMessage
from email.utils import formatdate

import redis
from celery import Celery

BROKER_URL = os.environ.get("BENCH_RECIPE_BROKER", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("BENCH_RECIPE_PREFIX", "bench-recipe")
HOST = os.environ.get("BENCH_RECIPE_HOST", "localhost")
PORT = int(os.environ.get("BENCH_RECIPE_PORT", "587"))
CA_FILE = os.environ.get("BENCH_RECIPE_CA_FILE") or None
USERNAME = os.environ.get("BENCH_RECIPE_USERNAME", "")
PASSWORD = os.environ.get("BENCH_RECIPE_PASSWORD", "")
DONE_KEY = f"{PREFIX}:done"

app = Celery("bench_recipe", broker=BROKER_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:broker:"},
    worker_hijack_root_logger=False,
    task_default_queue="recipe",
)
_tls = ssl.create_default_context(cafile=CA_FILE)
_redis = redis.Redis.from_url(BROKER_URL)


def build_message(sender: str, to: str, name: str, text: str, html: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"News for {name}"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.com>"
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg


@app.task(name="bench.recipe.send_one")
def send_one(sender: str, to: str, name: str, text: str, html: str) -> None:
    msg = build_message(sender, to, name, text, html)
    with smtplib.SMTP(HOST, PORT, timeout=60) as smtp:
        smtp.starttls(context=_tls)
        smtp.login(USERNAME, PASSWORD)
        smtp.send_message(msg)
    _redis.incr(DONE_KEY)
