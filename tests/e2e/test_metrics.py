"""Prometheus metrics: a worker with --metrics-port, scraped after a campaign."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ses_tasks.sandbox.embedded import WorkerProcess, free_port, wait_for

from ..conftest import write_csv

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

RECIPIENTS = 200


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """Samples by (name, sorted labels), or None while the exporter is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that includes ``labels``."""
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and set(labels.items()) <= set(sample_labels)
    )


def _documented_worker_metrics() -> list[str]:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    queries = doc.split("```promql", 1)[1].split("```", 1)[0]
    return sorted({m for m in re.findall(r"ses_tasks_[a-z_]+", queries) if "_feedback_" not in m})


def test_metrics_match_the_status_store_after_a_campaign(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("tls")
    port = free_port()
    worker = WorkerProcess(
        env=pipeline.env,
        mode="tls",
        concurrency=2,
        log_path=tmp_path / "worker-metrics.log",
        extra_args=["--metrics-port", str(port)],
    ).start()
    pipeline.workers.append(worker)
    before = wait_for(lambda: scrape(port), timeout_s=30, what="the metrics endpoint")
    assert total(before, "ses_tasks_messages_recorded_total") == 0

    rows = [{"email": f"m{i}@example.com"} for i in range(RECIPIENTS)]
    status = pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Metrics",
        text="Hello {{ email }}",
        recipients=write_csv(tmp_path / "list.csv", rows),
        campaign_id="metrics-e2e",
    )
    final = pipeline.wait_done(status.id)
    assert final.counts["sent"] == RECIPIENTS

    def settled():
        """Counters caught up, and pool gauges refreshed (every 2 s) after the last send."""
        samples = scrape(port)
        if (
            samples
            and total(samples, "ses_tasks_messages_recorded_total", state="sent")
            >= final.counts["sent"]
            and total(samples, "ses_tasks_pool_connections", state="in_use") == 0
            and total(samples, "ses_tasks_pool_connections", state="idle") >= 1
        ):
            return samples
        return None

    samples = wait_for(settled, timeout_s=15, what="counters and pool gauges to settle")

    sent = final.counts["sent"]
    assert total(samples, "ses_tasks_messages_recorded_total", state="sent") == sent
    assert total(samples, "ses_tasks_messages_total", outcome="sent") == sent
    assert total(samples, "ses_tasks_messages_total", outcome="sent", priority="bulk") == sent
    assert total(samples, "ses_tasks_send_latency_seconds_count") == sent
    assert total(samples, "ses_tasks_limiter_wait_seconds_count", priority="bulk") > 0
    # Warm connections stay open after the campaign, idle, within the pools' size.
    idle = total(samples, "ses_tasks_pool_connections", state="idle")
    assert 1 <= idle <= 2 * 4  # concurrency x POOL_SIZE
    assert total(samples, "ses_tasks_pool_connections", state="waiting") == 0
    # Fleet gauges come from Redis at scrape time.
    assert total(samples, "ses_tasks_effective_rate_per_second") == pytest.approx(2000.0)
    assert total(samples, "ses_tasks_quota_used") == RECIPIENTS
    assert total(samples, "ses_tasks_quota_limit") == float("inf")  # no MAX_24H_SEND
    # Every metric the documented PromQL uses is served with default settings.
    names = {name for name, _ in samples}
    missing = [m for m in _documented_worker_metrics() if m not in names]
    assert missing == [], f"docs/observability.md queries metrics no worker serves: {missing}"
    # Nothing failed, so nothing was retried.
    assert total(samples, "ses_tasks_retries_total") == 0

    worker.stop(timeout_s=20)
    assert "metrics on http://0.0.0.0:" in worker.log_path.read_text(errors="replace")
