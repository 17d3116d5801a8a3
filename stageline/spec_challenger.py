"""A model stage's challenger: a second version of the same model, scored beside the
champion in shadow or answering a sticky share of entities as a canary.

Plain data: ``stageline.stages.model.XGBoostPredictor`` runs it, and
:mod:`stageline.challenger` says how rows are routed and which columns say so.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stageline.spec_base import SpecModel

ChallengerMode = Literal["shadow", "canary", "off"]


class ChallengerSpec(SpecModel):
    """A challenger for a model stage (``challenger:`` beside its ``params``): another
    version of the stage's model, compared with the champion on live traffic. Switched
    at run time like a model swap (``stageline serve --challenger``, or the stage's
    ``challenger`` in the deployment's ``user_config``)."""

    alias: str | None = None
    """The challenger's alias in the registry (default ``challenger`` when no
    ``version`` is given)."""
    version: int | None = Field(default=None, ge=1)
    """A pinned version instead of an alias."""
    mode: ChallengerMode = "shadow"
    """``shadow``: every row is scored by both models, the answers are the champion's and
    the challenger's predictions go to the prediction log only. ``canary``: a ``share``
    of entities (by ``sticky_by``) is answered by the challenger, the rest by the
    champion; each answer names the model version that gave it. ``off``: the champion
    alone (the challenger is not loaded)."""
    share: float = Field(default=0.1, ge=0, le=1)
    """Canary: the share of entities the challenger answers. An entity is in the canary
    when a hash of its key falls in the first ``share`` of the hash range: the same
    entity gets the same model on every replica and after every restart, and raising
    the share keeps the entities already in the canary there."""
    sticky_by: str | None = None
    """Canary: the request field whose value is the entity (``customer_id``): all of an
    entity's requests go to the same model. Default: the request's ``id_field``
    (each record on its own). A row without a value goes to the champion."""

    @model_validator(mode="after")
    def _one_reference(self) -> ChallengerSpec:
        if self.alias is not None and self.version is not None:
            raise ValueError("give the challenger's alias or its version, not both")
        return self

    @property
    def ref(self) -> str | int:
        """The registry reference to load: the version, else the alias."""
        return self.version if self.version is not None else self.alias or "challenger"
