"""The drain of a stopping ``stageline serve``: no new requests, those in flight answered.

No Ray: it acts on the HAProxy processes below this one (psutil finds them) and reads
their connections with iproute2's ``ss``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from stageline.spec import PipelineSpec

log = logging.getLogger(__name__)

DRAIN_CAP_S = 6.0
"""The longest a stop waits for requests in flight, whatever the request deadline."""


def drain_budget(spec: PipelineSpec) -> float:
    """How long a stop waits for requests in flight: one request deadline and a little
    (every request is answered by then, with its prediction or its 504), at most
    :data:`DRAIN_CAP_S`."""
    return min(spec.serve.request_timeout_s + 0.5, DRAIN_CAP_S)


def drain(port: int, timeout_s: float) -> bool:
    """Stop taking requests and let those in flight finish, for up to ``timeout_s``.

    In HAProxy mode, each HAProxy of this server gets SIGUSR1, its soft stop: it closes
    its listener at once (a new connection is refused, never half-answered) and answers
    every request it has taken, with ``Connection: close``. A keep-alive connection
    that is idle stays open (Serve's config has ``option idle-close-on-response``: a
    client that sends on it is still answered, instead of finding it closed under its
    request), so the drain is over when no client connection on ``port`` has a request
    in flight (:func:`requests_in_flight`); Ray's stop then closes the idle ones. True
    when that happened in time. With Serve's own proxy there is nothing to do here:
    ``serve.shutdown`` drains it."""
    haproxies = _haproxies()
    for proc in haproxies:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGUSR1)  # psutil checks the pid was not reused
    pids = [proc.pid for proc in haproxies]
    deadline = time.monotonic() + timeout_s
    quiet = 0  # twice in a row, 50 ms apart: TCP_INFO's times tick in jiffies
    while time.monotonic() < deadline:
        quiet = quiet + 1 if requests_in_flight(port, pids) == 0 else 0
        if quiet == 2:
            return True
        time.sleep(0.05)
    log.warning(
        "drain deadline passed with %s request(s) still in flight",
        requests_in_flight(port, pids),
    )
    return False


def _haproxies() -> list[psutil.Process]:
    """The HAProxy processes below this one (Serve's HAProxy mode starts them)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            # By its command, not its process name: the wrapper script Serve starts
            # (serve_app.local) is named haproxy too, and a SIGUSR1 would end it.
            argv = proc.cmdline()
            if argv and Path(argv[0]).name == "haproxy":
                found.append(proc)
    return found


# One connection in `ss -tin` output: the socket line, then its TCP_INFO line.
_QUEUE = re.compile(r"^\s*(\d+)\s+\d+\s+\S+:\d+\s+\S+:\d+", re.MULTILINE)
_LAST = re.compile(r"\blast(snd|rcv):(\d+)")


def requests_in_flight(port: int, pids: list[int]) -> int:
    """Client connections on ``port`` with a request in flight: the client sent data
    more recently than it was last answered (TCP_INFO's ``lastrcv`` < ``lastsnd``, in ms
    ago), or sent data not read yet. Idle keep-alive connections are not counted.

    Read with iproute2's ``ss``; without it, every client connection of ``pids`` on
    ``port`` counts (the drain then waits for them to close, up to its deadline)."""
    ss = shutil.which("ss")
    if ss is None:
        return sum(
            1
            for c in psutil.net_connections(kind="tcp")
            if c.pid in pids and c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
        )
    out = subprocess.run(
        [ss, "-tinH", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    lines = out.splitlines()
    busy = 0
    for socket_line, info in zip(lines[::2], lines[1::2], strict=False):
        queued = _QUEUE.match(socket_line)
        last = {kind: int(ms) for kind, ms in _LAST.findall(info)}
        unread = queued is not None and int(queued.group(1)) > 0
        answered = "rcv" not in last or last.get("snd", 10**9) <= last["rcv"]
        busy += unread or not answered
    return busy
