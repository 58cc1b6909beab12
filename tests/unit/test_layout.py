"""The package layout: old flat import paths still work; the low rooms stay low."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from ses_tasks._moved import MOVED

PACKAGE = Path(__file__).resolve().parents[2] / "ses_tasks"
VOCABULARY = {"ses_tasks.errors", "ses_tasks.states", "ses_tasks.keys"}


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_an_old_flat_path_is_the_same_module(old: str, new: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(new)


def test_documented_imports_keep_working() -> None:
    code = (
        "from ses_tasks import SesTasks, MessageSpec, CampaignTemplate, Settings\n"
        "from ses_tasks.app import app\n"
        "from ses_tasks.tracking import StatusStore\n"
        "from ses_tasks.message import MessageSpec as M\n"
        "import ses_tasks.tasks\n"
        "assert app.tasks['ses_tasks.send_batch'] and app.tasks['ses_tasks.send_message']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _imports(room: str) -> set[str]:
    found: set[str] = set()
    for path in (PACKAGE / room).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("ses_tasks")}


@pytest.mark.parametrize("room", ["smtp", "message"])
def test_the_low_rooms_import_only_themselves_and_the_shared_vocabulary(room: str) -> None:
    outside = {
        m for m in _imports(room) if not m.startswith(f"ses_tasks.{room}") and m not in VOCABULARY
    }
    assert outside == set(), f"{room}/ reaches up into {sorted(outside)}"


def test_python_dash_m_with_an_old_path_runs_the_moved_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ses_tasks.cli", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Usage:" in out.stdout


def test_an_alias_leaves_the_real_module_its_own_spec() -> None:
    code = (
        "import importlib.resources, importlib.util\n"
        "import ses_tasks.workers, ses_tasks.app\n"
        "import ses_tasks.worker, ses_tasks.queue.app\n"
        "assert ses_tasks.worker.__spec__.name == 'ses_tasks.worker'\n"
        "assert ses_tasks.worker.__spec__.submodule_search_locations\n"
        "assert importlib.resources.files('ses_tasks.worker').is_dir()\n"
        "assert ses_tasks.queue.app.__spec__.name == 'ses_tasks.queue.app'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
