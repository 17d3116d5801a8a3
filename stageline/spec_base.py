"""What every part of the pipeline spec shares: the model base and its errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SpecError(ValueError):
    """A pipeline spec is invalid. The message names the file, the YAML path and the line."""


class LocatedError(ValueError):
    """A whole-spec check that knows which YAML path it is about (pydantic cannot say)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class SpecModel(BaseModel):
    """Base of every spec model: frozen, and an unknown key is an error, not ignored."""

    # Each field's docstring is its description: in the JSON schema and the generated
    # spec reference (stageline/spec_reference.py).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
