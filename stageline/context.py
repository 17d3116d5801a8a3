"""What a stage gets besides its own params, and how every runtime builds one.

``stage_factory`` is the single place that turns a :class:`StageSpec` into a
class and its constructor keyword arguments. The in-process ``Pipeline``,
Ray Serve (deployment init args) and Ray Data (``fn_constructor_kwargs``)
all call it, so a stage is constructed the same way everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stageline.spec import PipelineSpec, SpecError, StageSpec, accepts, resolve_class
from stageline.storage import StorageLocations

if TYPE_CHECKING:
    from stageline.features.offline import OfflineStore
    from stageline.features.online import OnlineStore
    from stageline.registry import ModelRegistry

HOME_ENV = "STAGELINE_HOME"


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``home`` if given, else ``$STAGELINE_HOME``, else ``./.stageline``."""
    if home is not None:
        return Path(home).resolve()
    return Path(os.environ.get(HOME_ENV) or ".stageline").resolve()


@dataclass(frozen=True)
class StageContext:
    """Passed as ``context=`` to a stage whose ``__init__`` accepts it.

    Plain data (picklable): Ray ships it to replicas and actors as it is.
    """

    stage_name: str
    spec: PipelineSpec
    home: Path
    as_of: bool = False
    """Score as of each row's event time (``request.event_time``): feature stages join
    the offline store's history as of that time instead of the online store's latest
    values. A backfill or a backtest; the runtime sets it, never the spec."""

    locations: StorageLocations | None = None
    """Where the registry and the feature tables are, resolved once where the spec was
    read (``None``: resolved here, from the spec, the environment and the home)."""

    def storage(self) -> StorageLocations:
        return self.locations or StorageLocations.resolve(self.spec, self.home)

    def registry(self) -> ModelRegistry:
        from stageline.registry import open_registry

        return open_registry(self.storage().models)

    def offline_store(self) -> OfflineStore:
        from stageline.features.offline import OfflineStore

        return OfflineStore.for_spec(self.spec, self.home, self.storage())

    def online_store(self) -> OnlineStore:
        from stageline.features.online import open_online_store

        return open_online_store(self.spec, self.home, self.storage())


AS_OF_FEATURES = "features as of each row's event time"
"""What scoring ``as_of`` means, as summaries tell the user."""


def as_of_field(spec: PipelineSpec) -> str:
    """The request field that says when each row happened; a SpecError, telling the
    user what to set, when the spec names none (scoring as of it is impossible)."""
    if spec.request.event_time is None:
        raise SpecError(
            f"pipeline {spec.name!r} cannot score as of each row's event time: set "
            "request.event_time in the spec to the request's datetime field (e.g. event_time: ts)"
        )
    return spec.request.event_time


def stage_factory(
    spec: PipelineSpec, stage: StageSpec, home: Path, *, as_of: bool = False
) -> tuple[type, dict[str, Any]]:
    """The class named by ``stage.uses`` and the keyword arguments to construct it."""
    if as_of:
        as_of_field(spec)  # before any stage loads: the same one-line error everywhere
    cls = resolve_class(stage.uses, spec.base_dir)
    kwargs = dict(stage.params)
    if accepts(cls, "context"):
        kwargs["context"] = StageContext(
            stage_name=stage.name,
            spec=spec,
            home=home,
            as_of=as_of,
            # Resolved here, where the spec is read: a cluster's workers need not share
            # this process's environment to find the same registry and tables.
            locations=StorageLocations.resolve(spec, home),
        )
    if stage.challenger is not None:
        if not accepts(cls, "challenger"):
            raise SpecError(
                f"stage {stage.name!r}: {cls.__name__} takes no challenger: only a model "
                "stage (stageline.stages.model:XGBoostPredictor) scores one"
            )
        kwargs["challenger"] = stage.challenger
    return cls, kwargs
