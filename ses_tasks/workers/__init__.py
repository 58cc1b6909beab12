"""Worker runtime: one event loop and one warm SMTP pool per worker process."""

from .runtime import WorkerRuntime, get_runtime, shutdown_runtime

__all__ = ["WorkerRuntime", "get_runtime", "shutdown_runtime"]
