"""Stage classes named by a spec's ``uses:``: importing them and checking their params."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from stageline.spec_base import SpecError


class ParamsError(SpecError):
    """The class imports, but the spec's ``params`` do not fit its ``__init__``."""


def resolve_class(uses: str, base_dir: Path | None = None) -> type:
    """Import ``module:Class`` or ``file.py:Class`` (relative to ``base_dir``)."""
    cls = resolve_object(uses, base_dir)
    if not isinstance(cls, type):
        module_name, _, class_name = uses.rpartition(":")
        raise SpecError(
            f"cannot import {uses!r}: module {module_name!r} has no class {class_name!r}"
        )
    if not callable(getattr(cls, "__call__", None)):  # noqa: B004 - a class is always callable
        raise SpecError(f"{uses!r} is not a stage: it has no __call__(batch) method")
    return cls


def resolve_object(
    ref: str, base_dir: Path | None = None, *, kind: str = "stage", attr: str = "class"
) -> Any:
    """The object named by ``package.module:name`` or ``path/to/file.py:name``.

    A relative file path is relative to ``base_dir`` (the spec's folder; default:
    the current directory). ``kind`` and ``attr`` name what is looked up in the
    errors: "cannot import stage file ...", "... has no class ...".
    """
    module_name, _, name = ref.rpartition(":")
    if not module_name or not name:
        raise SpecError(
            f"cannot import {ref!r}: expected 'package.module:{attr}' or "
            f"'path/to/file.py:{attr}' (relative to the spec's folder)"
        )
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_absolute():
                file = (base_dir or Path.cwd()) / file
            module = _import_file(file, kind)
        else:
            module = importlib.import_module(module_name)
    except SpecError:
        raise
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name + ".").startswith(e.name + "."):
            # The module exists, but something it imports does not.
            raise SpecError(
                f"cannot import {ref!r}: ModuleNotFoundError: {e} (install what it imports)"
            ) from None
        as_file = module_name.replace(".", "/") + ".py"
        raise SpecError(
            f"cannot import {ref!r}: ModuleNotFoundError: {e}: install {module_name!r} or put "
            f"it on PYTHONPATH, or name a file relative to the spec's folder "
            f"({str(base_dir or Path.cwd())!r}) as '{as_file}:{name}'"
        ) from None
    except Exception as e:  # an import runs arbitrary user code: report whatever it raised
        raise SpecError(f"cannot import {ref!r}: {type(e).__name__}: {e}") from None
    found = getattr(module, name, None)
    if found is None:
        raise SpecError(f"cannot import {ref!r}: module {module_name!r} has no {attr} {name!r}")
    return found


def _import_file(file: Path, kind: str) -> Any:
    if not file.is_file():
        raise SpecError(f"cannot import {kind} file {str(file)!r}: no such file")
    name = "stageline_user_" + re.sub(r"\W", "_", str(file.resolve().with_suffix("")))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {kind} file {str(file)!r}")
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


@runtime_checkable
class ChecksParams(Protocol):
    """A stage class that checks its params beyond their names when the spec loads (a
    transform's ``function:`` must import), without being constructed: no model, no
    store, no Ray."""

    @classmethod
    def check_spec_params(cls, params: Mapping[str, Any], base_dir: Path | None) -> None:
        """Raise :class:`SpecError` saying what to fix. ``base_dir`` is the spec's folder;
        None when unknown, and then a path relative to it cannot be checked."""
        ...


INJECTED = ("context", "challenger")
"""Constructor arguments a stage gets from elsewhere than its ``params``."""


def check_params(cls: type, params: Mapping[str, Any], base_dir: Path | None = None) -> None:
    """Bind the spec's params to the class's ``__init__`` without constructing it, then let
    a :class:`ChecksParams` class check their values (relative paths from ``base_dir``)."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    # Given by the runtime (``context``) or by the stage's own spec key (``challenger``).
    injected = {k: None for k in INJECTED if k in sig.parameters}
    try:
        sig.bind(**params, **injected)
    except TypeError as e:
        expected = [p for p in sig.parameters if p not in (*INJECTED, "self")]
        raise ParamsError(
            f"params do not fit {cls.__name__}: {e} (it takes: {', '.join(expected) or 'nothing'})"
        ) from None
    if isinstance(cls, ChecksParams):
        try:
            cls.check_spec_params(params, base_dir)
        except ParamsError:
            raise
        except SpecError as e:
            raise ParamsError(str(e)) from None
