"""The pipeline spec: one YAML file that drives every runtime.

Every model here is frozen and forbids unknown keys, so a typo in a spec is
an error that names the YAML path (``stages[1].params``) and its line, not a
setting silently ignored.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

FieldType = Literal["str", "int", "float", "bool", "category", "datetime"]


class SpecError(ValueError):
    """A pipeline spec is invalid. The message names the file, the YAML path and the line."""


class _LocatedError(ValueError):
    """A whole-spec check that knows which YAML path it is about (pydantic cannot say)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- request


class FieldSpec(_Config):
    """One field of the request schema."""

    type: FieldType
    """The field's type; ``category`` takes one of ``values``."""
    required: bool | None = None
    """Whether a record must carry the field. Defaults to True unless ``default`` is set."""
    default: Any = None
    """Value used when the field is missing or null (makes the field optional)."""
    ge: float | None = None
    """Numeric lower bound, inclusive."""
    gt: float | None = None
    """Numeric lower bound, exclusive."""
    le: float | None = None
    """Numeric upper bound, inclusive."""
    lt: float | None = None
    """Numeric upper bound, exclusive."""
    values: tuple[str, ...] | None = None
    """Allowed values of a ``category`` field."""
    max_length: int | None = Field(default=None, gt=0)
    """Longest allowed ``str`` value."""
    description: str = ""
    """Shown on the OpenAPI page."""

    @model_validator(mode="after")
    def _consistent(self) -> FieldSpec:
        numeric = self.type in ("int", "float")
        bounds = [b for b in ("ge", "gt", "le", "lt") if getattr(self, b) is not None]
        if bounds and not numeric:
            raise ValueError(f"bounds {bounds} only apply to int and float fields, not {self.type}")
        if self.type == "category" and not self.values:
            raise ValueError("a category field needs 'values': the list of allowed categories")
        if self.type != "category" and self.values is not None:
            raise ValueError("'values' only applies to category fields")
        if self.max_length is not None and self.type != "str":
            raise ValueError("'max_length' only applies to str fields")
        if self.required and self.default is not None:
            raise ValueError("a field with a default is optional: drop 'required: true'")
        return self

    @property
    def is_required(self) -> bool:
        return self.required if self.required is not None else self.default is None


class RequestSchema(_Config):
    """The fields a prediction request carries, and which one identifies a record."""

    id_field: str
    """Field echoed back with every prediction (and the key of batch output)."""
    fields: dict[str, FieldSpec]

    @model_validator(mode="after")
    def _id_present(self) -> RequestSchema:
        if self.id_field not in self.fields:
            raise ValueError(f"id_field {self.id_field!r} is not one of the fields")
        return self

    def record_model(self, name: str = "Record") -> type[BaseModel]:
        """The pydantic model of one record: FastAPI validates requests with it."""
        definitions: dict[str, Any] = {
            fname: _pydantic_field(fname, f) for fname, f in self.fields.items()
        }
        model: type[BaseModel] = create_model(
            name,
            __config__=ConfigDict(
                extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False, frozen=True
            ),
            **definitions,
        )
        return model


DATETIME_MIN = datetime(1678, 1, 1, tzinfo=timezone.utc)
DATETIME_MAX = datetime(2262, 1, 1, tzinfo=timezone.utc)
"""Datetime fields take values in ``[DATETIME_MIN, DATETIME_MAX)``: what a pandas
nanosecond timestamp can hold, so every runtime accepts the same records."""

INT_LIMIT = 2**63
"""Int fields take values in ``(-INT_LIMIT, INT_LIMIT)``: what an int64 column can hold."""


def datetime_in_range(value: datetime) -> bool:
    """Whether ``value`` (naive means UTC) lies in ``[DATETIME_MIN, DATETIME_MAX)``."""
    aware = value if value.utcoffset() is not None else value.replace(tzinfo=timezone.utc)
    return DATETIME_MIN <= aware < DATETIME_MAX


def _nan_is_missing(value: Any) -> Any:
    # NaN is pandas' null: batch cannot tell it from a missing value, so neither may we.
    return None if isinstance(value, float) and math.isnan(value) else value


def _no_bool(value: Any) -> Any:
    # True is an int to Python; a bool where a number belongs is a client bug.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def _datetime_range(value: datetime) -> datetime:
    if not datetime_in_range(value):
        raise ValueError(
            f"must be between {DATETIME_MIN:%Y-%m-%d} and {DATETIME_MAX:%Y-%m-%d} (exclusive)"
        )
    return value


def _pydantic_field(name: str, spec: FieldSpec) -> tuple[Any, Any]:
    """Annotation and default of one record field: the rules ``validate_frame`` applies too."""
    constraints: dict[str, Any] = {
        k: getattr(spec, k)
        for k in ("ge", "gt", "le", "lt", "max_length")
        if getattr(spec, k) is not None
    }
    annotation: Any
    if spec.type == "category":
        annotation = Literal[tuple(spec.values or ())]
    elif spec.type == "datetime":
        annotation = Annotated[datetime, AfterValidator(_datetime_range)]
    elif spec.type == "int":
        # Constraints before validators, or the JSON schema loses minimum/maximum.
        annotation = Annotated[
            int, Field(gt=-INT_LIMIT, lt=INT_LIMIT), Field(**constraints), BeforeValidator(_no_bool)
        ]
    elif spec.type == "float":
        annotation = Annotated[float, Field(**constraints), BeforeValidator(_no_bool)]
    else:
        annotation = Annotated[{"str": str, "bool": bool}[spec.type], Field(**constraints)]
    if not spec.is_required:
        annotation = annotation | None
    default = ... if spec.is_required else spec.default
    return Annotated[annotation, BeforeValidator(_nan_is_missing)], Field(
        default=default, description=spec.description or None
    )


# --------------------------------------------------------------------------- features


class FeatureSpec(_Config):
    type: Literal["str", "int", "float", "bool"]
    default: Any
    """Value served for an entity the store does not know."""


class FeatureViewSpec(_Config):
    """A table of precomputed features per entity, with an event time."""

    entity: str
    """Entity key column, e.g. ``customer_id``."""
    event_time: str = "event_time"
    """When each row's values became true (point-in-time joins use it)."""
    source: str | None = None
    """Parquet file or folder of the offline table; default ``<home>/features/<view>``."""
    features: dict[str, FeatureSpec]


class MemoryStoreSpec(_Config):
    """In-process online store, loaded from the materialized snapshot (the default)."""

    kind: Literal["memory"] = "memory"


REDIS_PASSWORD_ENV = "STAGELINE_REDIS_PASSWORD"
"""Where a Redis store chosen with ``--online`` (not in the spec) reads its password."""


class RedisStoreSpec(_Config):
    """Online store in Redis: shared by every replica, updated by ``stageline materialize``."""

    kind: Literal["redis"]
    url: str = Field(pattern=r"^rediss?://")
    """``redis://host:port/db`` (``rediss://`` for TLS). Put no password here."""
    password_env: str | None = None
    """Environment variable holding the password."""
    password_file: str | None = None
    """File holding the password (read when ``password_env`` is unset or empty)."""
    timeout_ms: float = Field(default=200, gt=0)
    """Connect and read timeout: past it a lookup fails fast (online: a 503)."""
    max_connections: int = Field(default=16, ge=1)
    """Connection pool size per replica or actor."""
    prefix: str = "stageline"
    """Key prefix, to share one Redis between pipelines."""


OnlineStoreSpec = Annotated[MemoryStoreSpec | RedisStoreSpec, Field(discriminator="kind")]


class FeatureStoreSpec(_Config):
    online: OnlineStoreSpec = MemoryStoreSpec()
    views: dict[str, FeatureViewSpec] = {}


# --------------------------------------------------------------------------- stages


class AutoscalingSpec(_Config):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=3.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class BatchingSpec(_Config):
    max_size: int = Field(default=64, ge=1)
    """Most requests merged into one call of the stage."""
    wait_ms: float = Field(default=0.0, ge=0)
    """Longest a request waits for others to share its batch. 0: nobody waits; a batch
    is whatever queued up while the previous one ran."""
    regroup_ms: float = Field(default=3.0, ge=0)
    """Longest a batch smaller than the previous one waits for as many requests as that
    one had: callers answered together come back a few ms apart, and without it the
    first back runs alone while the rest queue behind it. A lone caller never waits."""


class StageServeSpec(_Config):
    """How the stage runs as a Ray Serve deployment."""

    num_cpus: float = Field(default=0.25, gt=0)
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=-1)
    batch: BatchingSpec | None = BatchingSpec()


class StageBatchSpec(_Config):
    """How the stage runs in a Ray Data job."""

    batch_size: int = Field(default=4096, ge=1)
    actors: tuple[int, int] = (1, 2)
    """Actor pool size (min, max) for stateful stages."""
    num_cpus: float = Field(default=0.5, gt=0)

    @field_validator("actors", mode="before")
    @classmethod
    def _one_or_two(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _order(self) -> StageBatchSpec:
        lo, hi = self.actors
        if not 1 <= lo <= hi:
            raise ValueError("actors must be [min, max] with 1 <= min <= max")
        return self


_USES = re.compile(r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class StageSpec(_Config):
    name: str
    """Unique within the pipeline; also the Serve deployment's name."""
    uses: str
    """``package.module:Class``, or ``path/to/file.py:Class`` relative to the spec file."""
    params: dict[str, Any] = {}
    """Keyword arguments for the class's ``__init__``."""
    serve: StageServeSpec = StageServeSpec()
    batch: StageBatchSpec = StageBatchSpec()

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


class IngressSpec(_Config):
    """The HTTP ingress deployment (validation, composition, response formatting)."""

    num_cpus: float = Field(default=0.25, gt=0)
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    max_ongoing_requests: int = Field(default=256, ge=1)
    max_queued_requests: int = Field(default=512, ge=-1)
    """Requests one replica holds beyond ``max_ongoing_requests``: it takes the sum at
    once, and the next ones wait nowhere (a 503 with Retry-After at once). -1: no limit."""
    batch: BatchingSpec | None = BatchingSpec(max_size=64, wait_ms=0.0)
    """Concurrent requests merged into one frame before the first stage, so every stage
    (inline or behind a handle) runs once per batch, not once per request. With
    ``wait_ms: 0`` nobody waits: a batch is whatever arrived while the last one ran."""
    in_flight: int = Field(default=1, ge=1)
    """Batches one ingress replica has going through the stages at once. 1: the next
    batch forms while this one runs, so batches grow with the load. More lets stage
    deployments work on several batches at once (on a cluster where each has CPUs of its
    own); on one 2-core machine, 1 served the per-stage graph best at every load measured
    (``python -m bench.online``). Stages placed inline run one batch at a time anyway."""


class ServeAppSpec(_Config):
    """Options of the online application as a whole."""

    fuse: tuple[tuple[str, ...], ...] = ()
    """Groups of adjacent stages that share one deployment (fewer hops)."""
    inline: tuple[str, ...] = ()
    """Stages run inside the ingress replica itself: no hop at all."""
    max_records: int = Field(default=1000, ge=1)
    """Most records one request may carry."""
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest request body accepted; larger is a 413."""
    request_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline of one request through every stage; past it the client gets a 504. A
    request body still arriving after this long is a 408 (a slow client holds nothing)."""
    ingress: IngressSpec = IngressSpec()
    stage_calls: Literal["actor", "grpc"] = "actor"
    """How the ingress calls the stage deployments. ``actor``: Ray actor calls passing
    object references; a stage replica that dies under a call fails it at once (a 503
    with Retry-After, and the retry goes to another replica). ``grpc``: straight to the
    replica's gRPC server (Serve's by-value handles): 2.2 against 3.0 ms a bare call
    here (``python -m bench.hop``), but a replica killed under a call left it hanging
    until the request's deadline (a 504 after 5 s) in the fault suite, and every
    replica's gRPC port must be reachable from the ingress's node."""
    access_log: bool = False
    """Ray Serve's access log line per request and stage. Off by default: at a thousand
    requests a second those lines cost more CPU than the stages; the request metrics
    count every request anyway, and errors are logged either way."""


class BatchAppSpec(_Config):
    """Options of batch runs as a whole."""

    fuse: Literal["all"] | tuple[tuple[str, ...], ...] = "all"
    """Groups of adjacent stages that share one actor pool. ``all`` (the default) runs
    the whole chain in one pool: between pools a batch only travels through the object
    store, which costs memory and CPU and buys nothing on one machine. Each pool takes
    the ``batch:`` options of its first stage."""
    block_mb: float = Field(default=8.0, gt=0, le=1024)
    """Target size of the blocks Ray Data reads (MiB): with the actor pool's batch
    size, what bounds a run's memory however large the input is."""
    store_retries: int = Field(default=5, ge=0, le=20)
    """When the online feature store does not answer, retry a batch this many times,
    waiting 0.5 s, then 1, 2, 4, 8 s (at most 8) between tries, then fail the run."""


@dataclass(frozen=True)
class Segment:
    """A run of adjacent stages that one runtime unit executes (a deployment, an actor pool)."""

    name: str
    """The first stage's name, or ``first+last`` for a fused group."""
    stages: tuple[str, ...]
    inline: bool = False
    """Online: runs inside the ingress replica."""


class PipelineSpec(_Config):
    name: str
    description: str = ""
    request: RequestSchema
    features: FeatureStoreSpec = FeatureStoreSpec()
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    serve: ServeAppSpec = ServeAppSpec()
    batch: BatchAppSpec = BatchAppSpec()

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _stage_names(self) -> PipelineSpec:
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _LocatedError(
                    ("stages", i, "name"),
                    f"stage names must be unique; {name!r} is already stages[{names.index(name)}]",
                )
        order = {n: i for i, n in enumerate(names)}
        seen = _check_fuse("serve", self.serve.fuse, names)
        if self.batch.fuse != "all":
            _check_fuse("batch", self.batch.fuse, names)
        for i, name in enumerate(self.serve.inline):
            if name not in order:
                raise _LocatedError(
                    ("serve", "inline", i), f"serve.inline names unknown stage {name!r}"
                )
            if name in seen:
                raise _LocatedError(
                    ("serve", "inline", i),
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
        return _fused_segments(self.stages, self.serve.fuse, self.serve.inline)


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


def _check_fuse(section: str, fuse: Sequence[Sequence[str]], names: list[str]) -> set[str]:
    """Every group a run of adjacent, known stages, no stage twice; the stages fused."""
    order = {n: i for i, n in enumerate(names)}
    seen: set[str] = set()
    for g, group in enumerate(fuse):
        where = (section, "fuse", g)
        unknown = [n for n in group if n not in order]
        if unknown:
            raise _LocatedError(
                where, f"{section}.fuse names unknown stage(s) {unknown}; stages: {names}"
            )
        idx = sorted(order[n] for n in group)
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise _LocatedError(
                where, f"{section}.fuse group {list(group)} is not a run of adjacent stages"
            )
        if seen & set(group):
            raise _LocatedError(
                where, f"{section}.fuse lists a stage twice: {sorted(seen & set(group))}"
            )
        seen |= set(group)
    return seen


# --------------------------------------------------------------------------- loading


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
                check_params(cls, stage.params)
            except SpecError as e:
                loc: tuple[str | int, ...] = ("stages", i, "uses")
                if isinstance(e, _ParamsError):
                    loc = ("stages", i, "params")
                raise SpecError(f"{path}: {_where(loc, node)}: {e}") from None
    return spec


def _format_errors(path: Path, node: yaml.Node | None, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _LocatedError):
            loc += cause.loc
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the spec reference in the README)"
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


class _ParamsError(SpecError):
    pass


def resolve_class(uses: str, base_dir: Path | None = None) -> type:
    """Import ``module:Class`` or ``file.py:Class`` (relative to ``base_dir``)."""
    module_name, _, class_name = uses.rpartition(":")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_absolute():
                file = (base_dir or Path.cwd()) / file
            module = _import_file(file)
        else:
            module = importlib.import_module(module_name)
    except SpecError:
        raise
    except Exception as e:  # an import runs arbitrary user code: report whatever it raised
        raise SpecError(f"cannot import {uses!r}: {type(e).__name__}: {e}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise SpecError(
            f"cannot import {uses!r}: module {module.__name__!r} has no class {class_name!r}"
        )
    if not callable(getattr(cls, "__call__", None)):  # noqa: B004 - a class is always callable
        raise SpecError(f"{uses!r} is not a stage: it has no __call__(batch) method")
    return cls


def _import_file(file: Path) -> Any:
    if not file.is_file():
        raise SpecError(f"cannot import stage file {str(file)!r}: no such file")
    name = "stageline_user_" + re.sub(r"\W", "_", str(file.resolve().with_suffix("")))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import stage file {str(file)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def accepts(cls: type, keyword: str) -> bool:
    """Whether ``cls(...)`` takes ``keyword`` (explicitly or through ``**kwargs``)."""
    params = inspect.signature(cls).parameters
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_params(cls: type, params: Mapping[str, Any]) -> None:
    """Bind the spec's params to the class's ``__init__`` without constructing it."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    injected = {k: None for k in ("context",) if k in sig.parameters}
    try:
        sig.bind(**params, **injected)
    except TypeError as e:
        expected = [p for p in sig.parameters if p not in ("context", "self")]
        raise _ParamsError(
            f"params do not fit {cls.__name__}: {e} (it takes: {', '.join(expected) or 'nothing'})"
        ) from None
