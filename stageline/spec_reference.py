"""The pipeline spec reference, generated from the spec's own models.

Every key a spec may hold, its type, its default and what it means (the field's
docstring), section by section, from :class:`~stageline.spec.PipelineSpec` down.
``stageline spec --reference`` prints it; ``docs/spec-reference.md`` is a copy that a
test keeps in sync.
"""

from __future__ import annotations

import enum
import inspect
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from stageline.spec import PipelineSpec

TITLE = "# Pipeline spec reference"


def reference(root: type[BaseModel] = PipelineSpec) -> str:
    """Markdown: a section per model reachable from ``root``, a row per key."""
    sections: list[str] = [
        TITLE,
        "",
        "Generated from the spec's models (`stageline spec --reference`). A spec is YAML; "
        "every section below is a mapping, and an unknown key is an error.",
    ]
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        model = todo.pop(0)
        if model in seen:
            continue
        seen.append(model)
        sections += ["", *_section(model, todo)]
    return "\n".join(sections) + "\n"


def _section(model: type[BaseModel], todo: list[type[BaseModel]]) -> list[str]:
    doc = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"## {_anchor(model)}", "", doc, "", "| key | type | default | meaning |"]
    lines.append("|---|---|---|---|")
    for name, field in model.model_fields.items():
        todo += [m for m in _models(field.annotation) if m not in todo]
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        type_ = _type(field.annotation).replace("|", "\\|")
        lines.append(f"| `{name}` | {type_} | {_default(field)} | {meaning} |")
    return lines


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The spec models an annotation refers to, in order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type(a) for a in args if a is not type(None)) + " or null"
    if origin in (tuple, list):
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{m.value}`" for m in annotation)
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is PydanticUndefined:
        value = field.default_factory() if field.default_factory else None  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "see its section"
    if value in ((), [], {}):
        return "empty"
    return f"`{value!r}`" if value is not None else "null"
