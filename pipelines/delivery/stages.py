"""The delivery pipeline's own stage, named in the spec by file path
(``delivery/stages.py:Promise``): what the customer is told, made from the prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stageline import BaseStage, mark_errors
from stageline.context import StageContext
from stageline.spec import OutputSpec

PROMISE = (
    OutputSpec(
        name="promise_minutes",
        type="int",
        description="The delivery time promised to the customer: the prediction rounded up "
        "to the next step (5 minutes by default).",
    ),
    OutputSpec(
        name="late_risk",
        type="bool",
        description="Whether the prediction is over the service level (45 minutes by "
        "default): dispatch first, or warn the customer.",
    ),
)


class Promise(BaseStage):
    """Turns the predicted minutes into a promise and a late-risk flag.

    ``promise_minutes`` is the prediction rounded up to the next ``step`` minutes (at
    least one step); ``late_risk`` is True where the prediction exceeds
    ``sla_minutes``. ``eta`` names the prediction's column (the model stage's
    ``output``).
    """

    outputs = PROMISE
    provides = tuple(o.name for o in PROMISE)

    def __init__(
        self,
        *,
        context: StageContext,
        eta: str = "eta",
        step: int = 5,
        sla_minutes: float = 45.0,
    ) -> None:
        super().__init__(name=context.stage_name)
        if step < 1:
            raise ValueError(f"step must be a whole number of minutes, at least 1 (got {step})")
        self.eta = eta
        self.step = step
        self.sla_minutes = sla_minutes

    def required_columns(self) -> tuple[str, ...]:
        return (self.eta,)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        eta = batch[self.eta].to_numpy(dtype="float64")
        finite = np.isfinite(eta)
        steps = np.ceil(np.where(finite, eta, 0.0) / self.step).clip(min=1)
        out = batch.copy()
        out["promise_minutes"] = (steps * self.step).astype("int64")
        out["late_risk"] = eta > self.sla_minutes
        if not finite.all():  # the model stage marks its own failures; this is a guard
            mark_errors(out, ~finite, self.name, f"{self.eta}: not a finite number")
        return out
