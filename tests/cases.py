"""The example pipelines every runtime test runs: one :class:`Case` each.

A case is a pipeline spec with its world (a home holding its model and features, and
held-out request records), what the spec says about it (the id field, the declared
outputs, the fields records may leave out, the entity keys features are looked up by),
and a few invalid values, one per kind of rule the spec's request schema states.
tests/e2e/conftest.py makes them the parametrized ``case`` fixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import pandas as pd

from stageline.outputs import declared_outputs
from stageline.spec import FieldSpec, OutputSpec, PipelineSpec, load_spec, resolve_class
from stageline.stages.features import FeatureLookup
from tests.conftest import DELIVERY_SPEC, ENSEMBLE_SPEC, FRAUD_SPEC

TIERS_SPEC = Path(__file__).resolve().parent / "pipelines" / "tiers.yaml"


class World(Protocol):
    """What an example's builder returns: its home and its held-out request records."""

    @property
    def home(self) -> Path: ...

    @property
    def holdout(self) -> Path: ...


@dataclass(frozen=True)
class Example:
    """Where a case comes from: its spec file and the session fixture of its world."""

    name: str
    spec_path: Path
    world_fixture: str


EXAMPLES = (
    Example("fraud", FRAUD_SPEC, "demo"),  # binary, outputs declared by Decision
    Example("tiers", TIERS_SPEC, "tiers_world"),  # multiclass, outputs declared in the spec
    Example("delivery", DELIVERY_SPEC, "delivery_world"),  # regression, shipped
    # Two binary models combined (rank), outputs declared in the spec, shipped.
    Example("fraud-ensemble", ENSEMBLE_SPEC, "ensemble_world"),
)


class Invalid(NamedTuple):
    """A value ``field`` must not take."""

    field: str
    value: Any


@dataclass(frozen=True)
class Case:
    """One example pipeline, as the runtime tests see it."""

    name: str
    spec_path: Path
    spec: PipelineSpec
    home: Path
    holdout: Path
    """Held-out request records (parquet) of the world the model was trained on."""
    id_field: str
    outputs: tuple[OutputSpec, ...]
    """What the spec declares every prediction carries (besides the id and the model)."""
    invalid: tuple[Invalid, ...]
    """Values breaking the spec's request rules: one per kind of rule it states."""

    @property
    def fields(self) -> list[str]:
        return list(self.spec.request.fields)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def optional_fields(self) -> list[str]:
        """The fields a record may leave out."""
        return [n for n, f in self.spec.request.fields.items() if not f.is_required]

    @property
    def entity_fields(self) -> list[str]:
        """The request fields that features are looked up by and that may name an entity
        no feature table holds (a category key's values are all known to the schema)."""
        keys = []
        for stage in self.spec.stages:
            if issubclass(resolve_class(stage.uses, self.spec.base_dir), FeatureLookup):
                view = self.spec.features.views[stage.params["view"]]
                keys.append(str(stage.params.get("key") or view.entity))
        fields = self.spec.request.fields
        return [k for k in dict.fromkeys(keys) if fields[k].type in ("str", "int")]

    def held_out(self, n: int) -> pd.DataFrame:
        """The first ``n`` held-out records: the spec's request fields, nothing else."""
        frame = pd.read_parquet(self.holdout, columns=self.fields).head(n)
        assert len(frame) == n, f"{self.name}: only {len(frame)} held-out records"
        assert frame[self.id_field].is_unique, f"{self.name}: held-out ids repeat"
        return frame.reset_index(drop=True)

    def unknown_entity(self, field: str, i: int) -> Any:
        """A value of entity key ``field`` that no feature table holds."""
        spec = self.spec.request.fields[field]
        if spec.type == "int":
            return 10**12 + i
        return _fit(spec, f"zz-unknown-{i}")

    def invalid_records(self, base: dict[str, Any], prefix: str = "bad") -> list[dict[str, Any]]:
        """``base`` once per invalid value, each with an id of its own."""
        return [
            {**base, self.id_field: f"{prefix}-{i}", bad.field: bad.value}
            for i, bad in enumerate(self.invalid)
        ]


def make_case(example: Example, world: World) -> Case:
    spec = load_spec(example.spec_path)
    return Case(
        name=example.name,
        spec_path=example.spec_path,
        spec=spec,
        home=Path(world.home),
        holdout=Path(world.holdout),
        id_field=spec.request.id_field,
        outputs=declared_outputs(spec),
        invalid=violations(spec),
    )


def violations(spec: PipelineSpec) -> tuple[Invalid, ...]:
    """One value breaking each kind of rule the request schema states (a numeric bound,
    a category, a length), of the field's own type: a typed column can hold it."""
    found: dict[str, Invalid] = {}
    for name, field in spec.request.fields.items():
        if name == spec.request.id_field:
            continue
        if field.type in ("int", "float") and (field.ge is not None or field.gt is not None):
            low = field.ge if field.ge is not None else field.gt
            assert low is not None
            value = low - 1
            found.setdefault("bound", Invalid(name, int(value) if field.type == "int" else value))
        elif field.type == "category":
            found.setdefault("category", Invalid(name, "not-one-of-them"))
        elif field.type == "str" and field.max_length is not None:
            found.setdefault("length", Invalid(name, "x" * (field.max_length + 1)))
    assert found, f"pipeline {spec.name!r}: its request schema states no rule to break"
    return tuple(found.values())


def _fit(field: FieldSpec, text: str) -> str:
    return text[: field.max_length] if field.max_length else text
