"""What a plain `pip install ses-tasks` brings: production needs only."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_ONLY = {"aiosmtpd", "trustme", "fakeredis", "lupa"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_leave_the_sandbox_out_and_declare_direct_imports():
    core = _names(_project()["dependencies"])
    assert not core & SANDBOX_ONLY
    assert {"click", "cryptography", "celery", "redis", "aiosmtplib"} <= core
    assert SANDBOX_ONLY - {"lupa"} <= _names(_project()["optional-dependencies"]["sandbox"])


def test_only_the_sandbox_imports_sandbox_libraries_at_module_level():
    offenders = []
    for path in (ROOT / "ses_tasks").rglob("*.py"):
        if "sandbox" in path.relative_to(ROOT / "ses_tasks").parts:
            continue
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in SANDBOX_ONLY]
    assert offenders == []


def test_the_readme_demo_installs_the_sandbox_extra():
    first = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    assert "'.[sandbox]'" in first and "ses-tasks demo" in first
