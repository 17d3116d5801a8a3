"""Decision: turn a score into the label, reasons and model identity a caller gets."""

from __future__ import annotations

import pandas as pd

from stageline.context import StageContext
from stageline.outputs import MODEL
from stageline.spec import OutputSpec
from stageline.stage import BaseStage, with_columns

DECISION = (
    OutputSpec(name="score", type="float", description="The model's score for the record."),
    OutputSpec(
        name="label", type="bool", description="The decision: the score at or over the threshold."
    ),
    OutputSpec(
        name="reasons",
        type="str_list",
        description=(
            "The features that pushed the score up most, strongest first, for a positive "
            "label (empty for a negative one, unless the model stage has reasons_for: all)."
        ),
    ),
)


class Decision(BaseStage):
    """``label = score >= threshold``; the threshold is the model version's own
    (chosen at training and stored with it) unless the spec pins one."""

    def __init__(
        self, *, context: StageContext, score: str = "score", threshold: float | None = None
    ) -> None:
        super().__init__(name=context.stage_name)
        self.score = score
        self.threshold = threshold

    def required_columns(self) -> tuple[str, ...]:
        return (
            self.score,
            f"{self.score}_threshold",
            f"{self.score}_model",
            f"{self.score}_version",
        )

    outputs = DECISION
    provides = (*(o.name for o in DECISION), *(m.name for m in MODEL))

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        s = self.score
        # On NumPy arrays: each Series operation costs more than the work on a few rows.
        threshold = batch[f"{s}_threshold"].to_numpy() if self.threshold is None else self.threshold
        reasons = batch.get(f"{s}_reasons")
        columns = {
            "label": batch[s].to_numpy() >= threshold,
            "reasons": list(reasons) if reasons is not None else [[] for _ in range(len(batch))],
            "model_name": batch[f"{s}_model"].to_numpy(dtype=object),
            "model_version": batch[f"{s}_version"].to_numpy(dtype="int64"),
        }
        if s != "score" or batch[s].dtype != "float64":  # else it is the score already
            columns = {"score": batch[s].astype("float64"), **columns}
        return with_columns(batch, columns)
