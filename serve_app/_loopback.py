"""Keep Serve replicas' internal gRPC server on loopback when Ray is in loopback mode.

Every Ray Serve 2.60 replica opens a gRPC server for calls between deployments on
``[::]:0``: every interface, no authentication, no setting to change it. In the
local mode stageline starts (``stageline serve``, tests: ``LOOPBACK_ENV``), the
whole Ray is on one machine, so we bind it to 127.0.0.1 instead. In a multi-node
cluster it is left as Ray made it (other nodes may need it; see the README).
"""

from __future__ import annotations

import os
from typing import Any

from stageline.localray import LOOPBACK_ENV


def install() -> None:
    """Patch the replica's bind call, in this (replica) process, if in loopback mode.

    Called by every deployment's constructor: Serve may ship a deployment class by
    value, so importing ``serve_app`` is not guaranteed to happen in a replica."""
    if any(os.environ.get(k) != v for k, v in LOOPBACK_ENV.items()):
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server  # type: ignore[attr-defined]
    if getattr(original, "_stageline_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        port: int = original(server, address)  # type: ignore[no-untyped-call]
        return port

    on_loopback._stageline_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback  # type: ignore[attr-defined]
