"""Stage classes named by a spec's ``uses:``: importing them and checking their params."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stageline.spec_base import SpecError


class ParamsError(SpecError):
    """The class imports, but the spec's ``params`` do not fit its ``__init__``."""


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
        raise ParamsError(
            f"params do not fit {cls.__name__}: {e} (it takes: {', '.join(expected) or 'nothing'})"
        ) from None
