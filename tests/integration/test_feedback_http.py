"""The feedback Starlette app over HTTP: its routes and answers (TestClient), mounted under a
prefix, its lifespan, and under uvicorn the body cap enforced while the body streams in and a
slow handler that does not block the event loop."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from ses_tasks.errors import ConfigurationError
from ses_tasks.feedback import FeedbackApp, FeedbackApplier, FeedbackHandler, create_app
from ses_tasks.feedback.handler import HttpResponse
from ses_tasks.feedback.settings import ALLOWED_TOPIC_ARNS_ENV, FeedbackSettings
from ses_tasks.feedback.sns import SnsVerifier
from ses_tasks.feedback.testing import DEFAULT_TOPIC_ARN, SnsTestSigner
from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.store.tracking import StatusStore

from .test_feedback_apply import example, sent_campaign

START_TIMEOUT_S = 10.0


@contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on a free port in a thread; yields its base URL.

    Raises ``RuntimeError`` if the server stops before listening (a failed lifespan)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    exits: list[object] = []

    def run() -> None:
        try:
            server.run()
        except SystemExit as exc:  # uvicorn's start-up failure
            exits.append(exc.code)

    thread = threading.Thread(target=run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: server.started or not thread.is_alive(),
            timeout_s=START_TIMEOUT_S,
            what="uvicorn to start",
        )
        if not server.started:
            raise RuntimeError(f"uvicorn stopped before listening (exit {exits})")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
        assert not thread.is_alive(), "uvicorn did not stop"


def refused_total(reason: str) -> float:
    """``ses_tasks_feedback_refused_total{reason}``, or 0 without prometheus-client."""
    try:
        import prometheus_client
    except ImportError:
        return 0.0
    value = prometheus_client.REGISTRY.get_sample_value(
        "ses_tasks_feedback_refused_total", {"reason": reason}
    )
    return value or 0.0


class StubHandler:
    """Stands in for ``FeedbackHandler`` where only the HTTP plumbing is under test."""

    def __init__(self) -> None:
        self.response = HttpResponse(200, "applied")
        self.calls: list[tuple[bytes, dict[str, str]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def require_topic_policy(self) -> None:
        pass

    def handle_http(self, body: bytes, headers: dict[str, str]) -> HttpResponse:
        self.calls.append((body, dict(headers)))
        self.entered.set()
        if not self.release.wait(START_TIMEOUT_S):
            raise TimeoutError("the test never released the handler")
        return self.response


@pytest.fixture
def signer() -> SnsTestSigner:
    return SnsTestSigner()


@pytest.fixture
def env(redis_client, key_prefix, signer) -> tuple[StatusStore, FeedbackApplier, FeedbackHandler]:
    store = StatusStore(redis_client, key_prefix=key_prefix)
    applier = FeedbackApplier(
        redis_client, key_prefix=key_prefix, settings=FeedbackSettings(), store=store
    )
    handler = FeedbackHandler(
        applier=applier,
        verifier=SnsVerifier(fetcher=signer.fetcher, allowed_topic_arns=[DEFAULT_TOPIC_ARN]),
        replay_ttl_s=600,
    )
    return store, applier, handler


def complaint(store: StatusStore, signer: SnsTestSigner, campaign_id: str, n: int = 1) -> bytes:
    """A signed complaint about message ``n`` of a new sent campaign, as a POST body."""
    sent = sent_campaign(store, campaign_id, n + 1)
    email = f"u{n}@example.com"
    _, ses = sent[email]
    return json.dumps(signer.notification(example("event_complaint", ses, email))).encode()


# TestClient: routes, answers, mounting, lifespan ----------------------------------------------


def test_post_anywhere_delivers_and_other_methods_get_405(env, signer):
    store, applier, handler = env
    with TestClient(create_app(handler)) as client:
        response = client.post("/", content=complaint(store, signer, "http1"))
        assert (response.status_code, response.json()) == (200, {"result": "applied"})
        assert response.headers["content-type"] == "application/json"
        assert applier.feedback_status("http1").counts["complained"] == 1

        response = client.post("/any/path/sns", content=complaint(store, signer, "http2"))
        assert (response.status_code, response.json()) == (200, {"result": "applied"})
        assert applier.feedback_status("http2").counts["complained"] == 1

        # POST /health is a delivery like any other path (not JSON here)
        response = client.post("/health", content=b"not json")
        assert (response.status_code, response.json()) == (400, {"result": "body is not JSON"})

        response = client.get("/health")
        assert (response.status_code, response.json()) == (200, {"result": "ok"})
        assert client.head("/health").status_code == 200

        for method in ("GET", "PUT", "DELETE"):
            response = client.request(method, "/")
            assert response.status_code == 405, method
            assert response.json() == {"result": "POST an SNS message"}
            assert response.headers["allow"] == "POST"


def test_the_handler_sees_the_body_and_lower_case_headers():
    stub = StubHandler()
    with TestClient(FeedbackApp(stub)) as client:
        response = client.post(
            "/", content=b'{"Type": "x"}', headers={"X-Amz-Sns-Message-Type": "Notification"}
        )
    assert response.status_code == 200
    [(body, headers)] = stub.calls
    assert body == b'{"Type": "x"}'
    assert headers["x-amz-sns-message-type"] == "Notification"


def test_mounted_under_a_prefix(env, signer):
    store, applier, handler = env
    outer = Starlette(routes=[Mount("/sns", app=create_app(handler))])
    with TestClient(outer) as client:
        response = client.get("/sns/health")
        assert (response.status_code, response.json()) == (200, {"result": "ok"})
        response = client.post("/sns/", content=complaint(store, signer, "http3"))
        assert (response.status_code, response.json()) == (200, {"result": "applied"})
        response = client.post("/sns/feedback", content=complaint(store, signer, "http4"))
        assert (response.status_code, response.json()) == (200, {"result": "applied"})
        assert client.get("/sns/").status_code == 405
        assert client.get("/health").status_code == 404  # nothing outside the mount
    assert applier.feedback_status("http3").counts["complained"] == 1
    assert applier.feedback_status("http4").counts["complained"] == 1


def test_body_over_the_cap_is_413_and_counted():
    stub = StubHandler()
    app = FeedbackApp(stub, max_body_bytes=1024)
    before = refused_total("body_too_large")
    with TestClient(app) as client:
        assert client.post("/", content=b"x" * 1024).status_code == 200  # at the cap: fine

        response = client.post("/", content=b"x" * 1025)
        assert (response.status_code, response.json()) == (413, {"result": "body too large"})

        # no Content-Length (chunked): counted as it streams in
        response = client.post("/", content=iter([b"x" * 600, b"x" * 600]))
        assert response.status_code == 413
    assert len(stub.calls) == 1
    pytest.importorskip("prometheus_client")
    assert refused_total("body_too_large") == before + 2


def test_a_failing_handler_is_500_so_sns_retries(caplog):
    class Broken(StubHandler):
        def handle_http(self, body: bytes, headers: dict[str, str]) -> HttpResponse:
            raise RuntimeError("redis went away")

    with TestClient(FeedbackApp(Broken())) as client:
        response = client.post("/", content=b"{}")
    assert (response.status_code, response.json()) == (500, {"result": "internal error"})
    assert "feedback handler failed" in caplog.text


def test_max_body_bytes_is_validated_and_defaults_to_the_settings():
    with pytest.raises(ConfigurationError) as info:
        FeedbackApp(StubHandler(), max_body_bytes=0)
    assert info.value.setting == "max_body_bytes"
    fb = FeedbackSettings(allowed_topic_arns=DEFAULT_TOPIC_ARN, max_body_bytes=2048)
    assert create_app(feedback_settings=fb).max_body_bytes == 2048
    assert create_app(feedback_settings=fb, max_body_bytes=4096).max_body_bytes == 4096
    assert FeedbackApp(StubHandler()).max_body_bytes == 1024 * 1024


def test_the_lifespan_builds_and_checks_a_factory_handler(redis_client, key_prefix, signer):
    def open_handler() -> FeedbackHandler:  # no allow-list
        applier = FeedbackApplier(redis_client, key_prefix=key_prefix)
        return FeedbackHandler(applier=applier, verifier=SnsVerifier(fetcher=signer.fetcher))

    with pytest.raises(ConfigurationError) as info, TestClient(FeedbackApp(factory=open_handler)):
        pass
    assert info.value.setting == ALLOWED_TOPIC_ARNS_ENV

    built: list[StubHandler] = []

    def factory() -> Any:
        built.append(StubHandler())
        return built[-1]

    app = FeedbackApp(factory=factory)
    assert built == []  # not at creation
    with TestClient(app) as client:
        assert len(built) == 1  # at start-up, before any request
        assert client.post("/", content=b"{}").status_code == 200
        assert client.post("/", content=b"{}").status_code == 200
    assert len(built) == 1 and len(built[0].calls) == 2


def test_a_mounted_app_builds_its_handler_once_on_first_use():
    built: list[StubHandler] = []

    def factory() -> Any:
        built.append(StubHandler())
        return built[-1]

    outer = Starlette(routes=[Mount("/sns", app=FeedbackApp(factory=factory))])
    with TestClient(outer) as client:  # the outer lifespan does not reach a mounted app
        assert built == []
        assert [client.post("/sns/", content=b"{}").status_code for _ in range(3)] == [200] * 3
    assert len(built) == 1 and len(built[0].calls) == 3


# Under uvicorn ------------------------------------------------------------------------------


def raw_request(url: str, head: bytes, body: bytes, timeout_s: float = 5.0) -> bytes:
    """Send a request head and part of a body, never finish it; return what came back."""
    port = httpx.URL(url).port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        return received


def test_uvicorn_refuses_an_oversized_body_before_it_has_all_arrived():
    stub = StubHandler()
    with running(FeedbackApp(stub, max_body_bytes=1024)) as url:
        # A declared length over the cap: refused before a byte of the body is read.
        head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n"
        assert raw_request(url, head, b"").startswith(b"HTTP/1.1 413 ")

        # Chunked: refused once the bytes received pass the cap, the body still unfinished.
        head = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        chunk = b"800\r\n" + b"x" * 0x800 + b"\r\n"  # 2 KiB, no terminating 0-chunk
        assert raw_request(url, head, chunk).startswith(b"HTTP/1.1 413 ")

        response = httpx.post(url, content=b"{}", timeout=10)
        assert (response.status_code, response.json()) == (200, {"result": "applied"})
    assert len(stub.calls) == 1


def test_a_slow_handler_does_not_block_the_event_loop():
    stub = StubHandler()
    stub.release.clear()
    with running(FeedbackApp(stub)) as url:
        results: list[httpx.Response] = []
        poster = threading.Thread(
            target=lambda: results.append(httpx.post(url, content=b"{}", timeout=20))
        )
        poster.start()
        try:
            assert stub.entered.wait(START_TIMEOUT_S), "the POST never reached the handler"
            health = httpx.get(url + "health", timeout=5)  # answered while the handler waits
            assert (health.status_code, health.json()) == (200, {"result": "ok"})
            assert results == []
        finally:
            stub.release.set()
            poster.join(timeout=20)
    assert [r.status_code for r in results] == [200]
