"""A Ray cluster of several nodes on this machine (``ray start``): what ``bench.scale``
runs on, and what the multi-node tests and ``cluster/try_multinode.py`` use (through
tests/support/cluster.py): benchmark, test and ops tooling, not part of stageline."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.processes import free_port


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
        # Ray refuses to join a second node in its loopback-only mode
        # (stageline.localray.LOOPBACK_ENV).
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
