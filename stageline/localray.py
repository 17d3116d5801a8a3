"""How stageline starts a local Ray: on loopback only, sized for the machine.

Plain data, no Ray import: ``serve_app`` and ``batch_app`` pass the result to
``ray.init``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's reachable
address and its GCS and raylet then listen on every interface. With this
setting (what Ray does on a laptop) every listener binds 127.0.0.1."""


def local_ray_options(
    *,
    num_cpus: float | None = None,
    object_store_mb: int = 512,
    dashboard: bool = False,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """``ray.init`` keyword arguments for a local Ray that stays on loopback.

    Sets :data:`LOOPBACK_ENV` in this process, so the Ray processes it starts
    inherit it. Logical CPUs default to twice the cores: stage replicas take
    fractions of a CPU and spend much of their time waiting on one another.
    ``metrics_port``: where Ray serves Prometheus metrics (loopback), if set.
    """
    os.environ.update(LOOPBACK_ENV)
    # Ray reads that setting once, when it is first imported; if it already was,
    # set the flag its address lookup consults (it reads the attribute at call time).
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010 - not typed
    cpus = num_cpus if num_cpus is not None else 2 * (os.cpu_count() or 1)
    options: dict[str, Any] = {
        # A new Ray of our own, even when `ray start` left a cluster on this machine
        # (without this, ray.init() would join that one).
        "address": "local",
        "_node_ip_address": "127.0.0.1",
        "include_dashboard": dashboard,
        "num_cpus": cpus,
        "object_store_memory": object_store_mb * 1024 * 1024,
        "namespace": "stageline",
    }
    if metrics_port is not None:
        options["_metrics_export_port"] = metrics_port
    return options


def serve_record_path(home: Path) -> Path:
    """Where a running ``stageline serve`` records its Ray address and URL."""
    return home / "run" / "serve.json"


def running_server(home: Path) -> dict[str, Any] | None:
    """The record of the ``stageline serve`` running for ``home``, or None.

    Also sets what connecting to it needs. Call it before Ray is imported: Ray
    reads these settings once, at import. (Ray turns token authentication on
    by itself only for ``address="auto"``, never for an explicit address.)
    """
    try:
        record: dict[str, Any] = json.loads(serve_record_path(home).read_text())
        os.kill(int(record["pid"]), 0)  # still alive?
    except (OSError, ValueError, KeyError):
        return None
    os.environ.update(LOOPBACK_ENV)
    os.environ.setdefault("RAY_AUTH_MODE", str(record.get("auth_mode", "token")))
    return record


# --------------------------------------------------------------------------- several nodes


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def auth_token() -> str:
    """This machine's Ray token (``ray get-auth-token --generate`` makes one)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    token = os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.exists() else "")
    if not token:
        out = subprocess.run(
            ["ray", "get-auth-token", "--generate"], capture_output=True, text=True, check=True
        )
        token = out.stdout.strip().splitlines()[-1]
    return token


@dataclass
class LocalNode:
    """One Ray node (its own raylet) started by ``ray start --block``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    """A Ray cluster of several nodes on this machine, on loopback, token auth on.

    Each node is a ``ray start --block`` in its own process group: :meth:`kill`
    takes a node down at once (the raylet, its workers and their replicas), as a
    machine failure would; :meth:`stop` stops every node it started, and only those.
    """

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Ray refuses to join a second node in its loopback-only mode (LOOPBACK_ENV).
        self.env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "RAY_AUTH_MODE": "token",
            **(env or {}),
        }
        self.nodes: list[LocalNode] = []
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard, Jobs API and Serve REST API (token required)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {auth_token()}"}

    def start_head(self, *, num_cpus: float, object_store_mb: int = 256) -> LocalNode:
        return self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}",
            ],
            num_cpus,
            object_store_mb,
        )

    def add_worker(self, *, num_cpus: float, object_store_mb: int = 256) -> LocalNode:
        name = f"worker{sum(n.name.startswith('worker') for n in self.nodes) + 1}"
        return self._start(name, [f"--address={self.address}"], num_cpus, object_store_mb)

    def _start(self, name: str, args: list[str], num_cpus: float, store_mb: int) -> LocalNode:
        ports = [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        log = self.workdir / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                ["ray", "start", "--block", *args, "--node-ip-address=127.0.0.1",
                 f"--num-cpus={num_cpus}", f"--object-store-memory={store_mb * 1024 * 1024}",
                 "--disable-usage-stats", *ports],
                stdout=sink, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )  # fmt: skip
        node = LocalNode(name, process, log)
        self.nodes.append(node)
        return node

    def kill(self, node: LocalNode) -> None:
        """Take ``node`` down at once: every process of its group, SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait()

    def stop(self) -> None:
        """Stop every node this cluster started (workers first), then clean up strays."""
        for node in reversed(self.nodes):
            if node.alive:
                node.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=10)
        # `ray start --head` recorded this cluster as the machine's current one.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{self.gcs_port}"):
                current.unlink()


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tcp_sockets(pids: list[int]) -> list[tuple[str, int, str, int]]:
    """``(address, port, state, pid)`` of every TCP socket these processes hold (Linux
    ``/proc``; state as the kernel names it in hex: ``0A`` listening, ``01`` established)."""
    owner: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owner[target[8:-1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in owner:
                    address, port = fields[1].split(":")
                    found.append((_address(address), int(port, 16), fields[3], owner[fields[9]]))
    return sorted(found)


def listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """``(address, port, pid)`` of every TCP socket these processes listen on."""
    return [(a, port, pid) for a, port, state, pid in tcp_sockets(pids) if state == "0A"]


def process_name(pid: int) -> str:
    """What a process is, for listings: ``gcs_server``, ``raylet``, ``ray::ServeReplica``
    (Ray titles a worker process after the actor it runs), a Python process's script or
    module (``log_monitor.py``, ``pytest``), else its program's name."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return "?"
    argv = [a for a in raw.split("\0") if a]
    if len(argv) == 1:  # a title set over the whole command line
        argv = argv[0].split()
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return "ray::" + re.split(r"[:(.]", argv[0][5:], maxsplit=1)[0]
    program = Path(argv[0]).name
    if program.startswith("python"):
        if "-m" in argv[1:-1]:
            return argv[argv.index("-m") + 1]
        return next((Path(a).name for a in argv[1:] if a.endswith(".py")), program)
    return program


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    text = socket.inet_ntop(socket.AF_INET6, words)
    return text.removeprefix("::ffff:")


def check_port_free(host: str, port: int, option: str) -> None:
    """Raise a one-line error when ``host:port`` is taken, before anything starts that
    would fail on it with a long traceback. (A check, not a reservation: what binds the
    port later still reports its own failure.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(
                f"port {port} on {host} is in use ({e.strerror}); stop what holds it "
                f"or choose another with {option}"
            ) from None
