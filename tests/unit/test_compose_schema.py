"""CI check for compose/docker-compose.yml: no container engine runs here, so validate the
file against the Compose Specification JSON schema and check what the fleet relies on."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "compose" / ".env.example"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator() -> Any:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    # The specification's schema is draft-07 (its "$schema" URL lacks the "#" jsonschema keys on).
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def all_messages(errors: Any) -> str:
    """Messages of the errors and of their sub-errors (a oneOf explains itself in context)."""
    out = []
    for error in errors:
        out.append(error.message)
        out.append(all_messages(error.context or []))
    return " ".join(out)


def test_compose_file_matches_the_compose_specification(compose, validator):
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda c: c["services"]["redis"].update(healthcheck={"test": "x", "bogus": 1}), "bogus"),
        (lambda c: c["services"]["worker-tls"].update(comand=["worker"]), "comand"),
        (lambda c: c.update(service={}), "service"),
        (lambda c: c["services"]["worker-tls"].update(depends_on={"redis": {}}), "condition"),
    ],
)
def test_the_schema_catches_mistakes(compose, validator, mutate, where):
    """The check is only worth running if a typo makes it fail."""
    broken = copy.deepcopy(compose)
    mutate(broken)
    messages = all_messages(validator.iter_errors(broken))
    assert where in messages


def test_fleet_services_and_profiles(compose):
    services = compose["services"]
    assert {"redis", "worker-starttls", "worker-tls", "worker-transactional", "flower"} <= set(
        services
    )
    assert services["sandbox"]["profiles"] == ["dev"]
    assert all("profiles" not in s for name, s in services.items() if name != "sandbox")
    assert services["sandbox"]["command"][0] == "sandbox"
    assert "--appendonly" in services["redis"]["command"]
    assert (
        services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
        == "yes"
    )
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


@pytest.mark.parametrize(
    ("name", "mode", "queues"),
    [
        ("worker-starttls", "starttls", "bulk"),
        ("worker-tls", "tls", "bulk"),
        ("worker-transactional", None, "transactional"),
    ],
)
def test_workers(compose, name, mode, queues):
    service = compose["services"][name]
    command = service["command"]
    assert command[0] == "worker"
    assert command[command.index("--queues") + 1] == queues
    assert (command[command.index("--mode") + 1] if "--mode" in command else None) == mode
    # Scalable with --scale: no fixed container name, no published host ports.
    assert "container_name" not in service and "ports" not in service
    assert service["env_file"] == ".env"
    assert service["init"] is True and service["stop_signal"] == "SIGTERM"
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "inspect ping" in " ".join(service["healthcheck"]["test"])
    assert service["environment"]["SES_TASKS_METRICS_PORT"] == "9808"


def test_env_example_names_are_known_settings():
    """Every SES_TASKS_ name in .env.example is a setting (or a compose-only port)."""
    from ses_tasks.config import Settings

    known = {f"SES_TASKS_{name.upper()}" for name in Settings.model_fields}
    known |= {f"SES_TASKS_{name.upper()}_FILE" for name in ("password", "secret_access_key")}
    known |= {"SES_TASKS_STARTTLS_PORT", "SES_TASKS_TLS_PORT", "SES_TASKS_SANDBOX_PASSWORD"}
    names = set(re.findall(r"^#?\s*(SES_TASKS_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert names, "no settings found"
    assert names <= known, names - known


def test_dockerfile_is_non_root_with_exec_form_entrypoint():
    text = (ROOT / "workers" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)
    entrypoints = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    assert entrypoints and all(json.loads(e)[0] in ("ses-tasks", "celery") for e in entrypoints)


def test_systemd_units_are_templates_with_warm_shutdown():
    units = sorted((ROOT / "workers" / "systemd").glob("*@.service"))
    assert units
    for unit in units:
        text = unit.read_text()
        assert "%i" in text and "KillSignal=SIGTERM" in text and "KillMode=mixed" in text
        assert re.search(r"^User=ses-tasks$", text, re.M)
