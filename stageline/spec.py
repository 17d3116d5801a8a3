"""The pipeline spec: one YAML file that drives every runtime.

Every model here is frozen and forbids unknown keys, so a typo in a spec is
an error that names the YAML path (``stages[1].params``) and its line, not a
setting silently ignored.

The sections live in sibling modules: the request schema (``spec_request``),
the feature store (``spec_features``), the runtime options (``spec_runtime``)
and the stage classes (``spec_classes``). This module holds the pipeline as a
whole and its loading, and every name stays importable from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from stageline.spec_base import LocatedError, SpecError, SpecModel
from stageline.spec_challenger import ChallengerSpec
from stageline.spec_classes import (
    ParamsError,
    accepts,
    check_params,
    resolve_class,
    resolve_object,
)
from stageline.spec_features import (
    REDIS_PASSWORD_ENV,
    FeatureSpec,
    FeatureStoreSpec,
    FeatureViewSpec,
    LookupCacheSpec,
    MemoryStoreSpec,
    OnlineStoreSpec,
    RedisStoreSpec,
)
from stageline.spec_logging import PredictionLogSpec
from stageline.spec_outputs import OutputSpec, OutputType
from stageline.spec_request import (
    DATETIME_MAX,
    DATETIME_MIN,
    INT_LIMIT,
    FieldSpec,
    FieldType,
    RequestSchema,
    datetime_in_range,
)
from stageline.spec_runtime import (
    AutoscalingSpec,
    BatchAppSpec,
    BatchingSpec,
    GraphSpec,
    IngressSpec,
    Placement,
    ResponseCacheSpec,
    ServeAppSpec,
    StageBatchSpec,
    StageServeSpec,
)
from stageline.spec_storage import StorageSpec
from stageline.spec_training import TrainingSpec

__all__ = [
    "DATETIME_MAX",
    "DATETIME_MIN",
    "INT_LIMIT",
    "REDIS_PASSWORD_ENV",
    "AutoscalingSpec",
    "BatchAppSpec",
    "BatchingSpec",
    "FeatureSpec",
    "FeatureStoreSpec",
    "FeatureViewSpec",
    "FieldSpec",
    "FieldType",
    "GraphSpec",
    "IngressSpec",
    "LookupCacheSpec",
    "MemoryStoreSpec",
    "OnlineStoreSpec",
    "OutputSpec",
    "OutputType",
    "PipelineSpec",
    "Placement",
    "RedisStoreSpec",
    "RequestSchema",
    "ResponseCacheSpec",
    "Segment",
    "ServeAppSpec",
    "SpecError",
    "StageBatchSpec",
    "StageServeSpec",
    "StageSpec",
    "StorageSpec",
    "accepts",
    "check_params",
    "datetime_in_range",
    "load_spec",
    "prepare_home",
    "resolve_class",
    "setup_function",
]


_USES = re.compile(r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class StageSpec(SpecModel):
    """One stage: the class that runs it, its params, and how each runtime places it."""

    name: str
    """Unique within the pipeline; also the Serve deployment's name."""
    uses: str
    """``package.module:Class``, or ``path/to/file.py:Class`` relative to the spec file."""
    params: dict[str, Any] = {}
    """Keyword arguments for the class's ``__init__``."""
    serve: StageServeSpec = StageServeSpec()
    """Options of the stage's Ray Serve deployment."""
    batch: StageBatchSpec = StageBatchSpec()
    """Options of the stage's Ray Data actor pool."""
    challenger: ChallengerSpec | None = None
    """A model stage's challenger: another version of its model scored in shadow or
    answering a canary share (see the README's "Champion and challenger")."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or v == "validate":
            raise ValueError(
                "stage names are lower-case letters, digits, '_' or '-', starting with a letter"
                " ('validate' is reserved)"
            )
        return v

    @field_validator("uses")
    @classmethod
    def _uses(cls, v: str) -> str:
        if not _USES.match(v):
            raise ValueError("expected 'package.module:ClassName' or 'path/to/file.py:ClassName'")
        return v


@dataclass(frozen=True)
class Segment:
    """A run of adjacent stages that one runtime unit executes (a deployment, an actor pool)."""

    name: str
    """The first stage's name, or ``first+last`` for a fused group."""
    stages: tuple[str, ...]
    inline: bool = False
    """Online: runs inside the ingress replica."""


class PipelineSpec(SpecModel):
    """A whole pipeline: the request it takes, its stages in order, and its runtimes."""

    name: str
    """The pipeline's name."""
    description: str = ""
    """Free text for humans."""
    request: RequestSchema
    """The fields of a prediction request."""
    features: FeatureStoreSpec = FeatureStoreSpec()
    """Feature views and the online store."""
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    """The stages, in the order a batch goes through them (after ``validate``)."""
    outputs: tuple[OutputSpec, ...] | None = None
    """What every prediction carries besides the record's id, in order. Default: what
    the last stage whose class declares outputs declares (``outputs`` on a
    ``BaseStage``, as ``Decision``)."""
    serve: ServeAppSpec = ServeAppSpec()
    """Options of the online application."""
    batch: BatchAppSpec = BatchAppSpec()
    """Options of batch runs."""
    prediction_log: PredictionLogSpec = PredictionLogSpec()
    """Where every prediction is recorded (request id, time, the request's fields, the
    features the model received, model, outputs; latency online), online off the request
    path, in batch once per committed run."""
    storage: StorageSpec = StorageSpec()
    """Where the model registry and the feature tables live: under the home, another
    folder, or object storage (``s3://bucket/prefix``) that every node reads."""
    training: TrainingSpec | None = None
    """How ``stageline train`` trains the model stage's model from labelled events; none:
    the model is trained elsewhere and registered."""
    setup: str | None = None
    """An example's world builder: ``module:function`` or ``file.py:function`` (relative
    to the spec's folder), called as ``function(spec, home)`` before ``predict``,
    ``batch`` and ``serve`` run on a home. It builds the example's data, feature tables
    and model where the home has none, and returns at once where it has them. For
    shipped examples; a pipeline of your own leaves it out."""

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _stage_names(self) -> PipelineSpec:
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise LocatedError(
                    ("stages", i, "name"),
                    f"stage names must be unique; {name!r} is already stages[{names.index(name)}]",
                )
        order = {n: i for i, n in enumerate(names)}
        fused = _check_fuse(("serve",), self.serve.fuse, names)
        graph_fused = _check_fuse(("serve", "graph"), self.serve.graph.fuse, names)
        if self.batch.fuse != "all":
            _check_fuse(("batch",), self.batch.fuse, names)
        for where, inline, seen in (
            (("serve", "inline"), self.serve.inline or (), fused),
            (("serve", "graph", "inline"), self.serve.graph.inline, graph_fused),
        ):
            for i, name in enumerate(inline):
                if name not in order:
                    raise LocatedError(
                        (*where, i), f"{'.'.join(where)} names unknown stage {name!r}"
                    )
                if name in seen:
                    raise LocatedError(
                        (*where, i),
                        f"stage {name!r} is both fused and inline: pick one placement",
                    )
        return self

    @property
    def base_dir(self) -> Path:
        """Folder of the spec file: relative paths in the spec resolve against it."""
        return self._base_dir

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def with_online(self, store: str, **options: Any) -> PipelineSpec:
        """This spec with its online store switched: ``memory``, or a ``redis://`` URL
        (options as in the spec's ``features.online``; those of a Redis store the spec
        already names are kept). What ``--online`` and the Serve ``online`` arg do."""
        current = self.features.online
        if store == "memory":
            online: dict[str, Any] = {"kind": "memory"}
        else:
            kept = (
                current.model_dump(exclude={"url"})
                if current.kind == "redis"
                else {"password_env": REDIS_PASSWORD_ENV}
            )
            online = {**kept, "kind": "redis", "url": store, **options}
        data = self.model_dump()
        data["features"]["online"] = online
        try:
            switched = PipelineSpec.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(err["msg"] for err in e.errors())
            raise SpecError(
                f"online store {store!r}: {problems} (use memory or redis://host:port/db)"
            ) from None
        switched._base_dir = self._base_dir
        return switched

    def with_placement(self, placement: Placement) -> PipelineSpec:
        """This spec placed ``placement``: for ``graph``, the stages inline, the ingress's
        autoscaling and its batches in flight from ``serve.graph``. What
        ``--placement`` and the Serve ``args`` key do; the app is built from it."""
        data = self.model_dump()
        serve = data["serve"]
        serve["placement"] = placement
        if placement == "graph":
            serve["ingress"]["autoscaling"] = serve["graph"]["ingress"]
            serve["ingress"]["in_flight"] = serve["graph"]["in_flight"]
        placed = PipelineSpec.model_validate(data)
        placed._base_dir = self._base_dir
        return placed

    def batch_segments(self) -> list[Segment]:
        """The actor pools of a batch run: the whole chain (``batch.fuse: all``), else
        one per fused group and one per remaining stage."""
        if self.batch.fuse == "all":
            names = tuple(s.name for s in self.stages)
            return [Segment(names[0] if len(names) == 1 else f"{names[0]}+{names[-1]}", names)]
        return _fused_segments(self.stages, self.batch.fuse, inline=())

    def segments(self) -> list[Segment]:
        """Where the deployment boundaries fall: one segment per stage, a fused group,
        or a run of adjacent inline stages. Placement never changes what is computed."""
        if self.serve.placement == "graph":
            graph = self.serve.graph
            return _fused_segments(self.stages, graph.fuse, graph.inline)
        inline = self.serve.inline
        if inline is None:
            fused = {n for group in self.serve.fuse for n in group}
            inline = tuple(s.name for s in self.stages if s.name not in fused)
        return _fused_segments(self.stages, self.serve.fuse, inline)


def _fused_segments(
    stages: Sequence[StageSpec], fuse: Sequence[Sequence[str]], inline: Sequence[str]
) -> list[Segment]:
    group_of = {n: tuple(g) for g in fuse for n in g}
    inlined = set(inline)
    out: list[Segment] = []
    for stage in stages:
        name = stage.name
        if name in group_of:
            group = group_of[name]
            if out and out[-1].stages[0] in group:
                continue
            ordered = tuple(s.name for s in stages if s.name in group)
            out.append(Segment(f"{ordered[0]}+{ordered[-1]}", ordered))
        elif name in inlined and out and out[-1].inline:
            last = out[-1]
            out[-1] = Segment(last.name, (*last.stages, name), inline=True)
        else:
            out.append(Segment(name, (name,), inline=name in inlined))
    return out


def _check_fuse(
    location: tuple[str, ...], fuse: Sequence[Sequence[str]], names: list[str]
) -> set[str]:
    """Every group a run of adjacent, known stages, no stage twice; the stages fused."""
    order = {n: i for i, n in enumerate(names)}
    seen: set[str] = set()
    section = ".".join(location)
    for g, group in enumerate(fuse):
        where: tuple[str | int, ...] = (*location, "fuse", g)
        unknown = [n for n in group if n not in order]
        if unknown:
            raise LocatedError(
                where, f"{section}.fuse names unknown stage(s) {unknown}; stages: {names}"
            )
        idx = sorted(order[n] for n in group)
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise LocatedError(
                where, f"{section}.fuse group {list(group)} is not a run of adjacent stages"
            )
        if seen & set(group):
            raise LocatedError(
                where, f"{section}.fuse lists a stage twice: {sorted(seen & set(group))}"
            )
        seen |= set(group)
    return seen


def load_spec(path: str | Path, *, check_stages: bool = True) -> PipelineSpec:
    """Read and validate a pipeline spec file.

    With ``check_stages`` every ``uses:`` is imported and its ``params`` are
    bound against the class's ``__init__``, so a broken stage fails here,
    naming its YAML path, rather than on the first request.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the pipeline spec: {e.strerror or e}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a pipeline spec is a YAML mapping (name, request, stages)")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(path, node, e)) from None
    spec._base_dir = path.resolve().parent
    if check_stages:
        for i, stage in enumerate(spec.stages):
            try:
                cls = resolve_class(stage.uses, spec.base_dir)
                check_params(cls, stage.params, spec.base_dir)
            except SpecError as e:
                loc: tuple[str | int, ...] = ("stages", i, "uses")
                if isinstance(e, ParamsError):
                    loc = ("stages", i, "params")
                raise SpecError(f"{path}: {_where(loc, node)}: {e}") from None
            if stage.challenger is not None and not accepts(cls, "challenger"):
                where = _where(("stages", i, "challenger"), node)
                raise SpecError(
                    f"{path}: {where}: {cls.__name__} takes no challenger: only a model "
                    "stage (stageline.stages.model:XGBoostPredictor) scores one"
                )
        if spec.setup is not None:
            try:
                setup_function(spec)
            except SpecError as e:
                raise SpecError(f"{path}: {_where(('setup',), node)}: {e}") from None
    return spec


def setup_function(spec: PipelineSpec) -> Callable[[PipelineSpec, Path], object] | None:
    """The function the spec's ``setup`` names, or None when it names none."""
    if spec.setup is None:
        return None
    found = resolve_object(spec.setup, spec.base_dir, kind="setup", attr="function")
    if not callable(found):
        raise SpecError(f"setup {spec.setup!r} is not a function")
    return cast(Callable[[PipelineSpec, Path], object], found)


def prepare_home(spec: PipelineSpec, home: Path) -> None:
    """Run the spec's ``setup`` on ``home`` (a shipped example builds its world there)."""
    build = setup_function(spec)
    if build is not None:
        build(spec, home)


def _format_errors(path: Path, node: yaml.Node | None, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, LocatedError):
            loc += cause.loc
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `stageline spec --reference` lists every key)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{_where(loc, node)}: {msg}")
    plural = "s" if len(lines) > 1 else ""
    return f"{path}: invalid pipeline spec ({len(lines)} error{plural}):\n  " + "\n  ".join(lines)


def _where(loc: tuple[str | int, ...], node: yaml.Node | None) -> str:
    """``('stages', 1, 'uses')`` -> ``stages[1].uses (line 14)``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    line = _line_of(loc, node)
    text = text or "(top level)"
    return f"{text} (line {line})" if line else text


def _line_of(loc: tuple[str | int, ...], node: yaml.Node | None) -> int | None:
    found = node
    for part in loc:
        nxt: yaml.Node | None = None
        if isinstance(found, yaml.MappingNode):
            for k, v in found.value:
                if k.value == str(part):
                    nxt = v if part != loc[-1] else k
                    break
        elif (
            isinstance(found, yaml.SequenceNode)
            and isinstance(part, int)
            and part < len(found.value)
        ):
            nxt = found.value[part]
        if nxt is None:
            break
        found = nxt
    return found.start_mark.line + 1 if found is not None else None
