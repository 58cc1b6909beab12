"""Old flat module paths (``ses_tasks.tracking``, ``ses_tasks.app`` ...) keep importing.

The package is grouped by the path a message takes (``produce/``, ``queue/``, ``worker/``
...). Code and deployment files written against the flat layout, such as
``celery -A ses_tasks.app worker``, get the very same module object under its old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

__all__ = ["MOVED", "install"]

MOVED = {
    "ses_tasks.client": "ses_tasks.produce.client",
    "ses_tasks.campaigns": "ses_tasks.produce.campaigns",
    "ses_tasks.recipients": "ses_tasks.produce.recipients",
    "ses_tasks.mime": "ses_tasks.message.mime",
    "ses_tasks.app": "ses_tasks.queue.app",
    "ses_tasks.tasks": "ses_tasks.queue.tasks",
    "ses_tasks.publish": "ses_tasks.queue.publish",
    "ses_tasks.delivery": "ses_tasks.worker.delivery",
    "ses_tasks.workers": "ses_tasks.worker",
    "ses_tasks.workers.runtime": "ses_tasks.worker.runtime",
    "ses_tasks.workers.sweeper": "ses_tasks.worker.sweeper",
    "ses_tasks.ratelimit": "ses_tasks.limits.ratelimit",
    "ses_tasks.quota": "ses_tasks.limits.quota",
    "ses_tasks.endpoint": "ses_tasks.smtp.endpoint",
    "ses_tasks.credentials": "ses_tasks.smtp.credentials",
    "ses_tasks.tracking": "ses_tasks.store.tracking",
    "ses_tasks.suppression": "ses_tasks.store.suppression",
    "ses_tasks.scripts": "ses_tasks.store.scripts",
    "ses_tasks.connections": "ses_tasks.store.connections",
    "ses_tasks.cli": "ses_tasks.ops.cli",
    "ses_tasks.progress": "ses_tasks.ops.progress",
    "ses_tasks.metrics": "ses_tasks.ops.metrics",
    "ses_tasks.logs": "ses_tasks.ops.logs",
    "ses_tasks.observe": "ses_tasks.ops.observe",
    "ses_tasks.direct": "ses_tasks.ops.direct",
    "ses_tasks.embedded": "ses_tasks.sandbox.embedded",
    "ses_tasks.demo": "ses_tasks.sandbox.demo",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        real = importlib.util.find_spec(MOVED[fullname])
        return importlib.machinery.ModuleSpec(fullname, self, origin=real.origin if real else None)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._real_spec = module.__spec__  # the import system is about to overwrite it
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module ran under its new name already; give it its own spec back."""
        module.__spec__ = self._real_spec

    def get_code(self, fullname: str) -> CodeType | None:
        """``python -m ses_tasks.cli`` runs the moved module's code."""
        spec = importlib.util.find_spec(MOVED[fullname])
        loader = spec.loader if spec else None
        return loader.get_code(MOVED[fullname]) if loader and hasattr(loader, "get_code") else None

    def is_package(self, fullname: str) -> bool:
        spec = importlib.util.find_spec(MOVED[fullname])
        return bool(spec and spec.submodule_search_locations is not None)


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before any editable-install finder
