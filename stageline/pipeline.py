"""Run a whole pipeline in one process: the reference every runtime must match."""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Pipeline", "StageChain", "build_stage", "predictions", "records"]

import pandas as pd

from stageline.context import StageContext, resolve_home, stage_factory
from stageline.features import StoreUnavailableError
from stageline.outputs import OutputContract, check_outputs_provided, predictions, records
from stageline.spec import PipelineSpec, StageSpec, load_spec
from stageline.stage import (
    DataVersioned,
    Measured,
    Reading,
    Reloadable,
    Reporting,
    Stage,
    StageError,
    StageStatus,
    check_rows,
)
from stageline.stages.validate import ValidateRequest


def build_stage(spec: PipelineSpec, stage: StageSpec, home: Path, *, as_of: bool = False) -> Stage:
    """Construct one stage as every runtime does; a failure names the stage. With
    ``as_of``, its features are those as of each row's event time (``StageContext.as_of``)."""
    cls, kwargs = stage_factory(spec, stage, home, as_of=as_of)
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
        as_of: bool = False,
    ) -> None:
        self.spec = spec
        self.home = resolve_home(home)
        self.as_of = as_of
        self.stages: list[tuple[str, Stage]] = []
        if validate:
            context = StageContext("validate", spec, self.home, as_of=as_of)
            self.stages.append(("validate", ValidateRequest(context=context)))
        self.stages += [
            (n, build_stage(spec, spec.stage(n), self.home, as_of=as_of)) for n in stages
        ]
        check_outputs_provided(spec, self.stages)  # refused at load, not on each request

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

    def reconfigure(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        """Pass each :class:`~stageline.stage.Reloadable` stage its section of ``config``
        (``{stage_name: params}``): a model moving to another alias or version."""
        for name, stage in self.stages:
            params = config.get(name)
            if params is not None and isinstance(stage, Reloadable):
                stage.reconfigure(params)

    def data_version(self) -> tuple[Hashable, ...]:
        """What the :class:`~stageline.stage.DataVersioned` stages serve from now (the
        feature snapshots): it changes when that data does."""
        return tuple(s.data_version() for _, s in self.stages if isinstance(s, DataVersioned))

    def readings(self) -> list[Reading]:
        """The figures of every :class:`~stageline.stage.Measured` stage."""
        return [r for _, s in self.stages if isinstance(s, Measured) for r in s.readings()]

    def status(self) -> dict[str, StageStatus]:
        """Per stage: its class and, for :class:`~stageline.stage.Reporting` stages,
        what they report (the model a model stage serves)."""
        out: dict[str, StageStatus] = {}
        for name, stage in self.stages:
            report = stage.status() if isinstance(stage, Reporting) else StageStatus()
            if not isinstance(report, StageStatus):  # a stage reporting a plain mapping
                report = StageStatus(details=dict(report))
            out[name] = report.model_copy(update={"stage_class": type(stage).__name__})
        return out


class Pipeline(StageChain):
    """All stages of a spec, validation first, run in this process: the reference
    result Ray Serve and Ray Data must match.

    With ``as_of``, features are joined from the offline store as of each row's
    event time (``request.event_time``), as training joins them: backfills and
    backtests. By default they are the online store's latest values.

    >>> pipe = Pipeline.from_spec("pipelines/fraud.yaml")   # doctest: +SKIP
    >>> pipe.predict(pd.DataFrame(records))                 # doctest: +SKIP
    """

    def __init__(
        self, spec: PipelineSpec, home: str | os.PathLike[str] | None = None, as_of: bool = False
    ) -> None:
        super().__init__(spec, [s.name for s in spec.stages], home, validate=True, as_of=as_of)
        self.contract = OutputContract(spec)  # once: it resolves the stages' classes

    @classmethod
    def from_spec(
        cls,
        spec: str | os.PathLike[str] | PipelineSpec,
        home: str | os.PathLike[str] | None = None,
        as_of: bool = False,
    ) -> Pipeline:
        return cls(spec if isinstance(spec, PipelineSpec) else load_spec(Path(spec)), home, as_of)

    def predict(self, batch: pd.DataFrame) -> pd.DataFrame:
        """One prediction per row: the id, the declared outputs, the model, ``error``."""
        return self.contract.frame(self(batch))
