"""A real, throw-away Redis Cluster on 127.0.0.1 for tests.

``LocalCluster`` starts ``nodes`` ``redis-server --cluster-enabled yes`` processes on free
ports in a private directory, joins them with ``redis-cli --cluster create`` (or, when
``redis-cli`` is missing, with CLUSTER ADDSLOTSRANGE + CLUSTER MEET through redis-py), waits
until every node reports ``cluster_state:ok`` and agrees on the slot map, and on ``stop()``
kills every process it started and removes the directory. Use it as a context manager.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis

__all__ = ["CLUSTER_SLOTS", "LocalCluster", "poll", "redis_server_path"]

CLUSTER_SLOTS = 16384
#: Redis uses port + 10000 for the cluster bus, so node ports must stay below this.
_MAX_PORT = 65535 - 10000
T = TypeVar("T")


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def poll(condition: Callable[[], T], *, timeout_s: float, what: str, every_s: float = 0.02) -> T:
    """Call ``condition`` until it returns something truthy; TimeoutError after ``timeout_s``.

    Exceptions raised by ``condition`` count as "not yet" (a node still starting up); the
    last one is chained to the TimeoutError.
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}") from last
        time.sleep(every_s)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` ports whose cluster bus port (+10000) is free as well."""
    rng = random.Random()
    ports: list[int] = []
    for _ in range(10_000):
        port = rng.randrange(20_000, _MAX_PORT)
        if port in taken or port in ports or (port + 10_000) in taken:
            continue
        if _bindable(port) and _bindable(port + 10_000):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free port pairs for a local Redis Cluster")


class NodeExited(RuntimeError):
    """A redis-server process ended while the cluster was starting."""


def _info(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


class LocalCluster:
    """``nodes`` primaries, no replicas; ``startup_nodes`` feed ``redis.RedisCluster``."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        node_timeout_ms: int = 2000,
        start_timeout_s: float = 20.0,
        server: str | None = None,
        cli: str | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.nodes = nodes
        self.node_timeout_ms = node_timeout_ms
        self.start_timeout_s = start_timeout_s
        self.server = server or redis_server_path()
        if self.server is None:
            raise FileNotFoundError("redis-server is not installed")
        self.cli = cli if cli is not None else shutil.which("redis-cli")
        self.host = "127.0.0.1"
        self.ports: list[int] = []
        self.dir: Path | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    # Life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ses-tasks-cluster-"))
        taken: set[int] = set()
        for attempt in range(3):  # a port taken between the probe and the bind: new ports
            self.ports = _free_ports(self.nodes, taken)
            taken.update(self.ports)
            self._spawn()
            try:
                poll(self._all_answer, timeout_s=self.start_timeout_s, what="nodes to answer")
                break
            except (TimeoutError, NodeExited):
                if attempt == 2 or not self._someone_exited():
                    raise RuntimeError(f"redis-server did not start:\n{self.logs()}") from None
                self._kill()
        self._create()
        poll(
            self._healthy,
            timeout_s=self.start_timeout_s,
            what="cluster_state:ok on every node",
        )

    def stop(self) -> None:
        self._kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # Clients ------------------------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(self.host, port) for port in self.ports]

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.ports[0]}"

    def node_client(self, port: int, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=self.host, port=port, socket_timeout=5, **kwargs)

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in self.addresses]
        return redis.RedisCluster(startup_nodes=nodes, **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(h, p) for h, p in self.addresses]
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def cluster_info(self, port: int) -> dict[str, str]:
        with self.node_client(port, decode_responses=True) as node:
            raw = node.execute_command("CLUSTER INFO")
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else _info(raw)

    def logs(self) -> str:
        if self.dir is None:
            return ""
        out = []
        for log in sorted(self.dir.glob("*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    # Internals ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self.dir is not None and self.server is not None
        for port in self.ports:
            log = (self.dir / f"redis-{port}.log").open("wb")
            proc = subprocess.Popen(
                [
                    self.server,
                    "--port",
                    str(port),
                    "--bind",
                    self.host,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            log.close()
            self._procs.append(proc)

    def _someone_exited(self) -> bool:
        return any(p.poll() is not None for p in self._procs)

    def _all_answer(self) -> bool:
        if self._someone_exited():
            raise NodeExited("a redis-server exited")  # not retried by poll: fail fast
        for port in self.ports:
            with self.node_client(port, socket_connect_timeout=1) as node:
                node.ping()
        return True

    def _create(self) -> None:
        if self.cli:
            cmd = [
                self.cli,
                "--cluster",
                "create",
                *(f"{self.host}:{p}" for p in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ]
            done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({done.returncode}):\n"
                    f"{done.stdout.decode(errors='replace')}\n"
                    f"{done.stderr.decode(errors='replace')}"
                )
            return
        # No redis-cli: the same layout by hand (contiguous slot ranges, then MEET).
        per = CLUSTER_SLOTS // self.nodes
        for index, port in enumerate(self.ports):
            first = index * per
            last = CLUSTER_SLOTS - 1 if index == self.nodes - 1 else first + per - 1
            with self.node_client(port) as node:
                node.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
                node.execute_command("CLUSTER SET-CONFIG-EPOCH", index + 1)
        with self.node_client(self.ports[0]) as first_node:
            for port in self.ports[1:]:
                first_node.execute_command("CLUSTER MEET", self.host, port)

    def _healthy(self) -> bool:
        for port in self.ports:
            info = self.cluster_info(port)
            if info.get("cluster_state") != "ok":
                return False
            if info.get("cluster_slots_assigned") != str(CLUSTER_SLOTS):
                return False
            if info.get("cluster_known_nodes") != str(self.nodes):
                return False
        # Every node must also see the same owner for every slot range.
        views = set()
        for port in self.ports:
            with self.node_client(port) as node:
                slots = node.execute_command("CLUSTER SLOTS")
            views.add(tuple(sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in slots)))
        return len(views) == 1

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._procs = []
