"""Combine: several models' scores made into one ensemble score and label.

Each input is a score column an earlier stage added (an ``XGBoostPredictor`` with its
own ``output``: ``score_a``, ``score_b``...). Every method is computed row by row from
that row's scores and from constants known when the stage loads (or stored with the
model versions that scored the row): a record gets the same answer scored alone online
as in a batch of a million. That is why ``rank`` ranks each score against the model
version's reference distribution, not against the other rows of the batch (a one-record
request has nothing to rank against; a batch would rank the same record differently
depending on its neighbours).

Methods (``s_i`` the inputs' scores, ``t_i`` their thresholds, ``w_i`` their weights):

- ``mean``: ``score = mean(s_i)``; label when ``score >= mean(t_i)``.
- ``weighted``: ``score = sum(w_i s_i) / sum(w_i)``; label when ``score >= `` the same
  weighted mean of the ``t_i``.
- ``rank``: each score replaced by its rank in its model's reference scores (the share
  of the held-out scores at or below it, 0 to 1, interpolated between stored
  quantiles), then their (weighted) mean; label when it reaches the (weighted) mean of
  the thresholds' ranks. Models of different calibration then count alike.
- ``vote``: each input votes yes when ``s_i >= t_i``; ``score`` is the (weighted)
  share of yes votes; label when more than half vote yes (``threshold: t``: when at
  least ``t`` do).

``threshold`` overrides the combined threshold of any method. A row an earlier stage
rejected stays rejected (and gets no ensemble score); a row that reaches this stage
without one of its input scores is rejected here, naming the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, field_validator, model_validator

from stageline.context import StageContext
from stageline.outputs import MODEL
from stageline.registry import ModelMetadata, ModelRegistry
from stageline.spec import OutputSpec, PipelineSpec, resolve_class
from stageline.spec_base import SpecModel
from stageline.stage import BaseStage, StageError, StageStatus, mark_errors, with_columns
from stageline.stages.model import XGBoostPredictor

Method = Literal["mean", "weighted", "rank", "vote"]

SCORE_QUANTILES = "score_quantiles"
"""The key, in a model version's training profile, of its reference score distribution:
evenly spaced quantiles (probabilities 0 to 1) of its scores on held-out events, written
by ``stageline train`` (:func:`stageline.training.profile`). What ``rank`` ranks
against."""

ENSEMBLE = (
    OutputSpec(name="score", type="float", description="The ensemble's combined score."),
    OutputSpec(
        name="label",
        type="bool",
        description="The ensemble's decision: the combined score at or over its threshold.",
    ),
    OutputSpec(
        name="models",
        type="str_list",
        description="Every model that scored the record, as 'name vN', in the inputs' order.",
    ),
)
MODEL_NAME, MODEL_VERSION = (m.name for m in MODEL)


class CombineParams(SpecModel):
    """The params of a ``stageline.stages.combine:Combine`` stage."""

    inputs: tuple[str, ...] = Field(min_length=2)
    """The score columns to combine (each model stage's ``output``), two or more."""
    method: Method = "mean"
    """How: ``mean``, ``weighted`` (needs ``weights``), ``rank`` or ``vote``."""
    weights: dict[str, float] | None = None
    """Each input's weight (positive), by input: required by ``weighted``, optional for
    ``rank`` and ``vote``, refused by ``mean``."""
    thresholds: dict[str, float] | None = None
    """Thresholds of some or all inputs, by input; an input not named here uses the
    threshold its model version stores (its ``<input>_threshold`` column)."""
    threshold: float | None = None
    """The combined score's threshold for ``label``; default: the inputs' thresholds
    combined as their scores are (more than half the votes, for ``vote``)."""
    reference: dict[str, list[float]] | None = None
    """For ``rank``: reference score distributions, by input, as evenly spaced quantiles
    (probabilities 0 to 1, at least two values, ascending). An input not named here
    ranks against the one stored with the model version that scored the row."""

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, inputs: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({i for i in inputs if inputs.count(i) > 1})
        if repeated:
            raise ValueError(f"inputs name {repeated} more than once")
        if "score" in inputs:
            raise ValueError(
                "an input is named 'score', the column the ensemble writes: give each model "
                "stage an output of its own (params: {output: score_a}) and combine those"
            )
        return inputs

    @model_validator(mode="after")
    def _consistent(self) -> CombineParams:
        inputs = set(self.inputs)
        if self.method == "mean" and self.weights is not None:
            raise ValueError("method mean takes no weights: use method: weighted")
        if self.method == "weighted" and self.weights is None:
            raise ValueError(
                f"method weighted needs weights, one per input: e.g. weights: "
                f"{{{', '.join(f'{i}: 1.0' for i in self.inputs)}}}"
            )
        if self.weights is not None:
            if set(self.weights) != inputs:
                raise ValueError(
                    f"weights must name every input exactly once: inputs {list(self.inputs)}, "
                    f"weights for {list(self.weights)}"
                )
            bad = {k: w for k, w in self.weights.items() if not (math.isfinite(w) and w > 0)}
            if bad:
                raise ValueError(f"weights must be positive numbers; got {bad}")
        for name, values in (("thresholds", self.thresholds), ("reference", self.reference)):
            unknown = sorted(set(values or ()) - inputs)
            if unknown:
                raise ValueError(f"{name} names {unknown}, which are not inputs {list(inputs)}")
        if self.reference is not None and self.method != "rank":
            raise ValueError("reference is for method rank only")
        for name, quantiles in (self.reference or {}).items():
            _check_quantiles(f"reference of {name!r}", quantiles)
        return self


def _check_quantiles(what: str, quantiles: Sequence[float]) -> np.ndarray[Any, Any]:
    values = np.asarray(quantiles, dtype="float64")
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"{what}: needs at least two quantiles")
    if not np.isfinite(values).all() or (np.diff(values) < 0).any():
        raise ValueError(f"{what}: quantiles must be finite numbers in ascending order")
    return values


class Reference:
    """A score distribution, as evenly spaced quantiles: :meth:`rank` gives the share of
    it at or below a score, linearly between the quantiles; 0 below the lowest, 1 over
    the highest. Row by row, so a record ranks alike alone or in any batch."""

    def __init__(self, quantiles: Sequence[float]) -> None:
        values = _check_quantiles("reference", quantiles)
        probabilities = np.linspace(0.0, 1.0, len(values))
        # Repeated quantiles (many equal scores): a score equal to them has all of them
        # at or below it, so each distinct value keeps its highest probability.
        last = np.r_[values[1:] != values[:-1], True]
        self.values, self.probabilities = values[last], probabilities[last]

    def rank(self, scores: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        ranks = np.interp(scores, self.values, self.probabilities, left=0.0, right=1.0)
        return np.where(np.isnan(scores), np.nan, ranks)


class Combine(BaseStage):
    """Combines several model stages' scores into one ``score``, ``label`` and the
    ``models`` that scored the record (methods in :mod:`stageline.stages.combine`).

    ``model_name`` and ``model_version``, the model every answer reports, are the first
    input's: list the lead model first. ``score_threshold`` holds the threshold the
    label was decided with.
    """

    outputs = ENSEMBLE

    def __init__(self, *, context: StageContext, **params: Any) -> None:
        super().__init__(name=context.stage_name)
        try:
            self.params = CombineParams.model_validate(params)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'params'}: {err['msg']}" for err in e.errors()
            )
            raise StageError(f"stage {self.name!r}: invalid params: {problems}") from None
        p = self.params
        self.inputs = p.inputs
        self.weights = np.array([(p.weights or {}).get(i, 1.0) for i in p.inputs], dtype="float64")
        self.thresholds = dict(p.thresholds or {})
        self.models = {i: _model_stage(context.spec, i) for i in p.inputs}
        self._registry: ModelRegistry | None = None
        self._references: dict[tuple[str, int], Reference] = {}
        self.fixed: dict[str, Reference] = {i: Reference(q) for i, q in (p.reference or {}).items()}
        if p.method == "rank":
            self._registry = context.registry()
            for i in p.inputs:
                if i in self.fixed:
                    continue
                stage = self.models[i]
                if stage is None:
                    raise StageError(
                        f"stage {self.name!r}: method rank ranks each input against its "
                        f"model's reference scores, and no XGBoostPredictor stage before it "
                        f"has output {i!r}: give one with `reference: {{{i}: [quantiles]}}`"
                    )
                # At load, the version the model stage serves now: a missing reference
                # fails here, not on the first request.
                ref = stage.params.get("version") or stage.params.get("alias") or "champion"
                meta = self._registry.resolve(str(stage.params["model"]), ref)
                self._reference(meta.name, meta.version, meta)

    # -- columns ---------------------------------------------------------------------

    def required_columns(self) -> tuple[str, ...]:
        needed = list(self.inputs)
        if self.params.threshold is None or self.params.method == "vote":
            needed += [f"{i}_threshold" for i in self.inputs if i not in self.thresholds]
        if self.params.method == "rank":
            needed += [
                c
                for i in self.inputs
                if i not in self.fixed
                for c in (f"{i}_model", f"{i}_version")
            ]
        # A vote needs each input's threshold even with a combined threshold given.
        return tuple(dict.fromkeys(needed))

    def provided_columns(self) -> tuple[str, ...]:
        return (*(o.name for o in ENSEMBLE), "score_threshold", MODEL_NAME, MODEL_VERSION)

    # -- inference -------------------------------------------------------------------

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        p = self.params
        scores = np.column_stack(
            [batch[i].to_numpy(dtype="float64", na_value=np.nan) for i in self.inputs]
        )
        missing = np.isnan(scores)
        method = p.method
        # Each input's threshold, where the method needs it (a vote always does).
        cuts = (
            np.column_stack([self._threshold(batch, i) for i in self.inputs])
            if method == "vote" or p.threshold is None
            else scores  # unused
        )
        if method in ("mean", "weighted"):
            combined = self._mean(scores)
            threshold = (
                self._mean(cuts) if p.threshold is None else np.full(len(batch), p.threshold)
            )
        elif method == "rank":
            ranks = np.column_stack(
                [self._rank(batch, i, scores[:, j]) for j, i in enumerate(self.inputs)]
            )
            combined = self._mean(ranks)
            if p.threshold is None:
                cut_ranks = [self._rank(batch, i, cuts[:, j]) for j, i in enumerate(self.inputs)]
                threshold = self._mean(np.column_stack(cut_ranks))
            else:
                threshold = np.full(len(batch), p.threshold)
        else:
            combined = self._mean((scores >= cuts).astype("float64"))
            threshold = np.full(len(batch), 0.5 if p.threshold is None else p.threshold)
        if method == "vote" and p.threshold is None:
            label = combined > threshold  # more than half
        else:
            label = combined >= threshold
        bad = missing.any(axis=1)
        decided: Any = label
        if bad.any():  # rejected here: no score, no label (null, as for earlier rejects)
            combined[bad], threshold[bad] = np.nan, np.nan
            decided = pd.array(label, dtype="boolean")
            decided[bad] = pd.NA
        columns = {
            "score": combined,
            "label": decided,
            "models": self._models(batch),
            "score_threshold": threshold,
            MODEL_NAME: batch.get(f"{self.inputs[0]}_model"),
            MODEL_VERSION: batch.get(f"{self.inputs[0]}_version"),
        }
        out = with_columns(batch, columns)
        if bad.any():
            names = np.array(self.inputs, dtype=object)
            why = np.full(len(batch), "", dtype=object)
            for r in np.flatnonzero(bad):
                why[r] = f"{', '.join(names[missing[r]])}: no score to combine"
            mark_errors(out, bad, self.name, why)
        return out

    def _mean(self, values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The weighted mean of each row (all weights 1 unless given)."""
        return np.asarray((values * self.weights).sum(axis=1) / self.weights.sum())

    def _threshold(self, batch: pd.DataFrame, name: str) -> np.ndarray[Any, Any]:
        if name in self.thresholds:
            return np.full(len(batch), self.thresholds[name], dtype="float64")
        return batch[f"{name}_threshold"].to_numpy(dtype="float64", na_value=np.nan)

    def _rank(
        self, batch: pd.DataFrame, name: str, values: np.ndarray[Any, Any]
    ) -> np.ndarray[Any, Any]:
        """``values`` ranked against the reference of the model version that scored each
        row (several versions in one batch only around a reload)."""
        if name in self.fixed:
            return self.fixed[name].rank(values)
        models = batch[f"{name}_model"].to_numpy(dtype=object)
        versions = batch[f"{name}_version"].to_numpy()
        ranks = np.full(len(values), np.nan)
        for model, version in set(zip(models, versions, strict=True)):
            rows = (models == model) & (versions == version)
            ranks[rows] = self._reference(str(model), int(version)).rank(values[rows])
        return ranks

    def _reference(self, model: str, version: int, meta: ModelMetadata | None = None) -> Reference:
        """The reference scores of ``model`` v``version``, read from the registry once."""
        key = (model, version)
        found = self._references.get(key)
        if found is None:
            assert self._registry is not None
            meta = meta or self._registry.resolve(model, version)
            quantiles = meta.profile.get(SCORE_QUANTILES)
            if not quantiles:
                raise StageError(
                    f"stage {self.name!r}: method rank needs {model} v{version}'s reference "
                    f"scores, and it was registered without them: retrain it with stageline "
                    f"train (which stores them; a demo home built before: stageline demo "
                    f"--force), or give them as params (reference: {{<input>: [quantiles]}})"
                )
            found = self._references[key] = Reference(quantiles)
        return found

    def _models(self, batch: pd.DataFrame) -> list[list[str]]:
        """Per row, ``"name vN"`` of each input's model, where its stage says which."""
        named = []
        for i in self.inputs:
            model, version = batch.get(f"{i}_model"), batch.get(f"{i}_version")
            if model is not None and version is not None:
                named.append([f"{m} v{int(v)}" for m, v in zip(model, version, strict=True)])
        return (
            [list(row) for row in zip(*named, strict=True)]
            if named
            else [[] for _ in range(len(batch))]
        )

    def status(self) -> StageStatus:
        """The method, inputs and weights, for ``/readyz`` and operators."""
        p = self.params
        return StageStatus(
            details={
                "method": p.method,
                "inputs": list(self.inputs),
                "weights": dict(zip(self.inputs, self.weights.tolist(), strict=True)),
            }
        )


def _model_stage(spec: PipelineSpec, output: str) -> Any:
    """The spec's XGBoostPredictor stage whose ``output`` is ``output``, if any."""
    for stage in spec.stages:
        if (stage.params.get("output") or "score") != output:
            continue
        if issubclass(resolve_class(stage.uses, spec.base_dir), XGBoostPredictor):
            return stage
    return None
