"""What each worker process tells people about itself at every heartbeat.

The dispatcher's heartbeat puts the process in ``workers`` (its batch capacity, for the
dispatch window) and in ``consumers:<queue>`` (for the producers' no-consumer warning);
both drop a process three beats after it went silent. For an operator (the dashboard's
workers page) the same beat also writes, in the same pipeline:

- ``<prefix>:workers-seen``: token -> time of its last beat (ms), kept ``KEEP_S`` after it
  went silent, so a dead process is shown stale for a while instead of vanishing;
- ``<prefix>:worker-info:<token>``: a small JSON object (Celery node name, host, pid,
  queues, capacity, one entry per sender profile's SMTP pool), expiring ``KEEP_S`` after
  the last beat.

A clean shutdown removes both at once. Reading them costs one ZRANGE and one GET per
process; nothing here scans keys.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ses_tasks.worker.runtime import WorkerRuntime

__all__ = [
    "KEEP_S",
    "PoolInfo",
    "WorkerInfo",
    "describe",
    "parse_info",
    "remember_node",
]

#: A silent process stays listed (as stale) this long after its last beat.
KEEP_S = 600.0


#: The Celery node name (``name@host``), set in the main process before the pool forks.
_node = ""


def remember_node(sender: Any = None, **_: Any) -> None:
    """Celery's ``worker_init`` handler: keep the node name for the pool's processes."""
    global _node
    _node = str(getattr(sender, "hostname", "") or "")


@cache
def _host() -> str:
    return socket.gethostname()


def describe(rt: WorkerRuntime, now: float) -> str:
    """This process as JSON: cheap (no I/O), called on the loop at every beat."""
    pools = []
    for name, lane in rt.lanes.items():
        stats = lane.pool.stats
        pools.append(
            {
                "profile": name,
                "size": lane.settings.pool_size,
                "in_use": stats.in_use,
                "idle": stats.idle,
                "waiting": stats.waiting,
            }
        )
    return json.dumps(
        {
            "at": now,
            "node": _node,
            "host": _host(),
            "pid": os.getpid(),
            "queues": list(rt.consumed_queues),
            "capacity": rt.bulk_capacity,
            "pools": pools,
        },
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class PoolInfo:
    #: Sender profile ('' is the unnamed default).
    profile: str
    size: int
    in_use: int
    idle: int
    waiting: int


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    #: Celery node name (``name@host``); '' if the process did not start as a Celery worker.
    node: str
    host: str
    pid: int
    queues: tuple[str, ...]
    #: Bulk batches it runs at once (0: it takes no bulk queue).
    capacity: int
    pools: tuple[PoolInfo, ...]


def parse_info(raw: Any) -> WorkerInfo | None:
    """A stored description; None if absent or unreadable (never raises)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        return WorkerInfo(
            node=str(data.get("node", "")),
            host=str(data.get("host", "")),
            pid=int(data.get("pid", 0)),
            queues=tuple(str(q) for q in data.get("queues", ())),
            capacity=int(data.get("capacity", 0)),
            pools=tuple(
                PoolInfo(
                    profile=str(p.get("profile", "")),
                    size=int(p.get("size", 0)),
                    in_use=int(p.get("in_use", 0)),
                    idle=int(p.get("idle", 0)),
                    waiting=int(p.get("waiting", 0)),
                )
                for p in data.get("pools", ())
            ),
        )
    except (TypeError, ValueError, AttributeError):
        return None
