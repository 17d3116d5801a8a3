"""__NAME__'s own stages: plain classes that every runtime runs unchanged.

A stage is constructed once with the spec's ``params`` (load models, tables or clients
there, never per call) and called on DataFrames of any length, returning the same rows
in the same order with its columns added. The spec names it by this file's path:
``uses: stages.py:AmountBand``.

On :class:`stageline.BaseStage` a stage declares the columns it needs (``requires``)
and adds (``provides``): a batch without them fails naming the stage and the columns.
Its ``process`` only sees rows no earlier stage rejected; to reject a row, mark it
with :func:`stageline.mark_errors` (the row comes back with that reason, the others are
scored). A class that subclasses nothing, with ``__call__(batch) -> batch``, works too.

train.py runs the stages before the model to build its training set, so a column a
stage adds here is a feature the model can learn from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from stageline import BaseStage, mark_errors
from stageline.context import StageContext


class AmountBand(BaseStage):
    """``amount_band``: how many of ``edges`` the amount reaches (0 below the first).

    ``max_amount``: reject rows over it (off unless the spec sets it).
    """

    requires = ("amount",)
    provides = ("amount_band",)

    def __init__(
        self,
        *,
        context: StageContext,
        edges: Sequence[float] = (20.0, 100.0, 500.0),
        max_amount: float | None = None,
    ) -> None:
        # `context` (given to a stage whose __init__ takes it): the stage's name in the
        # spec, the spec and the stageline home, to load what the stage needs from there.
        super().__init__(name=context.stage_name)
        self.edges = np.sort(np.asarray(edges, dtype="float64"))
        self.max_amount = max_amount

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        amount = batch["amount"].to_numpy(dtype="float64")
        out = batch.copy()
        out["amount_band"] = np.searchsorted(self.edges, amount, side="right").astype("int64")
        if self.max_amount is not None:
            mark_errors(out, amount > self.max_amount, self.name, f"amount over {self.max_amount}")
        return out
