"""Stage deployments scale on how busy their replicas are, not on requests in flight.

The ingress merges concurrent requests into one batch and sends it down the graph, so a
stage deployment has few calls in flight however heavy the load: Serve's default
policy (ongoing requests per replica) would keep it at its minimum. Each stage replica
reports the share of recent time it spent running its stages
(:meth:`serve_app.deployment.StageDeployment.record_autoscaling_stats`, Serve's custom
autoscaling metrics), and :class:`Utilization` asks for as many replicas as keep that
share at the target. A stage that costs several times the others is busy several
times as long, and so gets several times the replicas. Serve applies the bounds
(``min_replicas``, ``max_replicas``) and the delays (``upscale_delay_s``,
``downscale_delay_s``) around the policy, as for its own.
"""

from __future__ import annotations

from typing import Any

BUSY = "busy"
"""The custom autoscaling metric: a replica's busy share of its recent time (0 to 1)."""

POLICY = "serve_app.autoscaling:Utilization"
"""Import path of the policy, as a deployment's ``autoscaling_config.policy`` names it."""


class Utilization:
    """Replicas enough to keep each busy ``target`` of the time (0 to 1).

    Desired replicas = the replicas' busy shares summed (the work, in replicas' worth)
    divided by ``target``. Before any replica has reported, the current count stands.
    """

    def __init__(self, target: float = 0.7) -> None:
        if not 0 < target <= 1:
            raise ValueError(f"target must be in (0, 1], got {target}")
        self.target = target

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        # ctx: ray.serve.config.AutoscalingContext (an alpha API: read only its
        # documented fields).
        reported = (ctx.aggregated_metrics or {}).get(BUSY) or {}
        if not reported:
            return float(ctx.current_num_replicas), {}
        work = sum(min(1.0, max(0.0, float(v))) for v in reported.values())
        # Replicas that have not reported yet (just started) count as idle.
        return work / self.target, {}


def policy(target: float) -> dict[str, Any]:
    """The ``autoscaling_config.policy`` of a stage deployment."""
    return {"policy_function": POLICY, "policy_kwargs": {"target": target}}
