"""The outputs a pipeline declares: what every prediction carries besides its id."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import field_validator

from stageline.spec_base import SpecModel

OutputType = Literal["float", "bool", "int", "str", "str_list"]
"""An output's type: a number, a flag, a whole number, a string, or a list of strings."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class OutputSpec(SpecModel):
    """One field of every prediction: a column the pipeline's stages add."""

    name: str
    """The column, and the field's name in every answer (``/predict``, OIP, parquet)."""
    type: OutputType
    """What it holds; decides its JSON, OIP datatype and parquet type."""
    description: str = ""
    """For humans: shown in the OpenAPI page."""

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"output name {name!r} must be a letter or '_', then letters, digits")
        return name
