"""Run a whole pipeline in one process: the reference every runtime must match."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stageline.context import StageContext, resolve_home, stage_factory
from stageline.features import StoreUnavailableError
from stageline.spec import PipelineSpec, StageSpec, load_spec
from stageline.stage import ERROR_COLUMN, Stage, StageError, check_rows
from stageline.stages.postprocess import OUTPUT_COLUMNS
from stageline.stages.validate import ValidateRequest


def build_stage(spec: PipelineSpec, stage: StageSpec, home: Path) -> Stage:
    """Construct one stage as every runtime does; a failure names the stage."""
    cls, kwargs = stage_factory(spec, stage, home)
    try:
        instance: Stage = cls(**kwargs)
    except StoreUnavailableError as e:  # still unavailable: callers wait or answer 503
        raise StoreUnavailableError(f"stage {stage.name!r} failed to load: {e}") from e
    except Exception as e:  # a user's __init__ may raise anything: report which stage
        raise StageError(f"stage {stage.name!r} ({stage.uses}) failed to load: {e}") from e
    return instance


class StageChain:
    """Stages run one after another in one process.

    The unit every runtime executes: the whole in-process :class:`Pipeline`,
    one Ray Serve deployment (a stage or a fused group), one Ray Data actor.
    Constructed from plain data, so Ray can ship the arguments anywhere.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        stages: Sequence[str],
        home: str | os.PathLike[str] | None = None,
        *,
        validate: bool = False,
    ) -> None:
        self.spec = spec
        self.home = resolve_home(home)
        self.stages: list[tuple[str, Stage]] = []
        if validate:
            context = StageContext("validate", spec, self.home)
            self.stages.append(("validate", ValidateRequest(context=context)))
        self.stages += [(n, build_stage(spec, spec.stage(n), self.home)) for n in stages]

    def __iter__(self) -> Iterator[tuple[str, Stage]]:
        return iter(self.stages)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Every stage's columns for every row, on the caller's index; rejected rows carry
        ``_error``. A stage that drops or adds rows (a plain class may) is a StageError."""
        frame = batch.reset_index(drop=True)
        for name, stage in self.stages:
            out = stage(frame)
            check_rows(name, len(frame), out)
            frame = out
        return frame.set_axis(batch.index)

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Pass each stage its section of ``config`` (``{stage_name: params}``), for
        stages that support reloading (a model moving to another alias or version)."""
        for name, stage in self.stages:
            params = config.get(name)
            reconfigure = getattr(stage, "reconfigure", None)
            if params is not None and callable(reconfigure):
                reconfigure(params)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per stage: its class and, for stages that report one, their own status."""
        out: dict[str, dict[str, Any]] = {}
        for name, stage in self.stages:
            report = getattr(stage, "status", None)
            out[name] = {"class": type(stage).__name__, **(report() if callable(report) else {})}
        return out


class Pipeline(StageChain):
    """All stages of a spec, validation first, run in this process: the reference
    result Ray Serve and Ray Data must match.

    >>> pipe = Pipeline.from_spec("pipelines/fraud.yaml")   # doctest: +SKIP
    >>> pipe.predict(pd.DataFrame(records))                 # doctest: +SKIP
    """

    def __init__(self, spec: PipelineSpec, home: str | os.PathLike[str] | None = None) -> None:
        super().__init__(spec, [s.name for s in spec.stages], home, validate=True)

    @classmethod
    def from_spec(
        cls, spec: str | os.PathLike[str] | PipelineSpec, home: str | os.PathLike[str] | None = None
    ) -> Pipeline:
        return cls(spec if isinstance(spec, PipelineSpec) else load_spec(Path(spec)), home)

    def predict(self, batch: pd.DataFrame) -> pd.DataFrame:
        """One prediction per row: id, score, label, reasons, model, error."""
        return predictions(self(batch), self.spec)


def predictions(frame: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """The caller-facing columns of a pipeline's output, the same in every runtime."""
    # One constructor call, not a column at a time: on the one-row frames of online
    # requests, pandas' per-call overhead is most of the cost.
    id_field = spec.request.id_field
    columns: dict[str, Any] = {id_field: frame[id_field]} if id_field in frame else {}
    for col in OUTPUT_COLUMNS:
        columns[col] = frame.get(col)
    error = frame[ERROR_COLUMN] if ERROR_COLUMN in frame else pd.Series(None, index=frame.index)
    columns["error"] = error.astype(object).where(error.notna(), None)
    return pd.DataFrame(columns, index=frame.index)


def records(predicted: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready dicts: NaN becomes null, numpy scalars become Python ones."""
    columns = []
    for name in predicted.columns:
        series = predicted[name]
        missing = series.isna().to_numpy()
        values = series.to_numpy(dtype=object)
        columns.append(
            [None if gone else _plain(v) for v, gone in zip(values, missing, strict=True)]
        )
    names = [str(k) for k in predicted.columns]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return v
