"""Reading a stored model file and proving it is the one its metadata describes.

Nothing here unpickles. A model file is read once, with its size checked
before reading, and the bytes that are hashed are the bytes XGBoost loads, so
a file swapped between the check and the load cannot slip through.
"""

from __future__ import annotations

import hashlib
import os
import pickletools
from pathlib import Path

import xgboost

from stageline.registry.metadata import (
    METADATA_FILE,
    ModelIntegrityError,
    ModelMetadata,
    objective,
    tasks_of,
)

MAX_MODEL_BYTES_ENV = "STAGELINE_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL_BYTES = 512 * 2**20
"""Largest model file loaded or registered (``$STAGELINE_MAX_MODEL_BYTES`` overrides it).
A file is loaded into memory whole; one past this is refused before a byte is read."""


def load_verified(path: Path, meta: ModelMetadata, *, max_bytes: int) -> xgboost.Booster:
    """The booster stored at ``path``, after checking it against ``meta`` every way we can."""
    where = f"{meta.name}@{meta.version}"
    reregister = f"re-register {where} from its training run with LocalRegistry.register()"
    raw = _read_exactly(path, meta, max_bytes=max_bytes, where=where, reregister=reregister)
    return verified_booster(path, meta, raw)


def check_stored_size(path: str | Path, meta: ModelMetadata, size: int, *, max_bytes: int) -> None:
    """Refuse a stored model file, before reading it, whose ``size`` is not the recorded
    one or is over ``max_bytes``."""
    where = f"{meta.name}@{meta.version}"
    if size != meta.size_bytes:
        raise ModelIntegrityError(
            f"{path} ({where}) is {size} bytes but its {METADATA_FILE} records "
            f"{meta.size_bytes}; the file was truncated or replaced - re-register {where} "
            "from its training run"
        )
    if size > max_bytes:
        raise ModelIntegrityError(
            f"{path} ({where}) is {size} bytes, over the {max_bytes}-byte limit on model "
            f"files, and was not read; if the model is genuine, raise ${MAX_MODEL_BYTES_ENV}"
        )


def verified_booster(path: str | Path, meta: ModelMetadata, raw: bytes) -> xgboost.Booster:
    """The booster in ``raw`` (the bytes read from ``path``), after checking them against
    ``meta``: not a pickle, the recorded sha256, XGBoost's format, features and task."""
    where = f"{meta.name}@{meta.version}"
    reregister = f"re-register {where} from its training run with LocalRegistry.register()"
    _check_content(path, meta, raw, where=where, reregister=reregister)
    booster = xgboost.Booster()
    try:
        booster.load_model(bytearray(raw))
    # XGBoost raises XGBoostError for most bad input, but also e.g.
    # UnicodeDecodeError while decoding its own error text.
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ModelIntegrityError(
            f"XGBoost cannot load {path} ({where}): {first_line}; the file is not a valid "
            f"XGBoost model - {reregister}"
        ) from exc
    loaded_features = tuple(booster.feature_names or ())
    if loaded_features != meta.features:
        raise ModelIntegrityError(
            f"{path} ({where}) has feature names {list(loaded_features)} but its "
            f"{METADATA_FILE} records {list(meta.features)}; {reregister}"
        )
    trained, num_class, _ = objective(booster)
    classes = len(meta.classes) if meta.classes is not None else 0
    if meta.task not in tasks_of(trained) or (meta.task == "multiclass" and classes != num_class):
        raise ModelIntegrityError(
            f"{path} ({where}) is a {trained} model with {num_class} classes but its "
            f"{METADATA_FILE} records a {meta.task} model with {classes} classes; {reregister}"
        )
    return booster


def _read_exactly(
    path: Path, meta: ModelMetadata, *, max_bytes: int, where: str, reregister: str
) -> bytes:
    """The file's bytes, refused unread if its size is not what ``meta`` records."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != meta.size_bytes:
                raise ModelIntegrityError(
                    f"{path} ({where}) is {size} bytes but its {METADATA_FILE} records "
                    f"{meta.size_bytes}; the file was truncated or replaced - {reregister}"
                )
            if size > max_bytes:
                raise ModelIntegrityError(
                    f"{path} ({where}) is {size} bytes, over the {max_bytes}-byte "
                    f"limit on model files, and was not read; if the model is genuine, "
                    f"raise ${MAX_MODEL_BYTES_ENV}"
                )
            # One byte more than expected tells us if the file grew since fstat.
            raw = f.read(meta.size_bytes + 1)
    except FileNotFoundError as exc:
        raise ModelIntegrityError(
            f"model file {path} ({where}) is missing; restore it or {reregister}"
        ) from exc
    except IsADirectoryError as exc:
        raise ModelIntegrityError(f"{path} ({where}) is a directory; {reregister}") from exc
    if len(raw) != meta.size_bytes:
        raise ModelIntegrityError(
            f"{path} ({where}) changed size while being read; retry, and if it persists "
            f"{reregister}"
        )
    return raw


def _check_content(
    path: str | Path, meta: ModelMetadata, raw: bytes, *, where: str, reregister: str
) -> None:
    """Not a pickle, the recorded sha256, and XGBoost's JSON/UBJSON format."""
    if looks_like_pickle(raw):
        raise ModelIntegrityError(
            f"{path} ({where}) is a Python pickle; stageline never loads pickle (unpickling "
            'runs arbitrary code). Re-save the model with booster.save_model("model.ubj") '
            "and register it again"
        )
    digest = hashlib.sha256(raw).hexdigest()
    if digest != meta.sha256:
        raise ModelIntegrityError(
            f"{path} ({where}) has sha256 {digest} but its {METADATA_FILE} records "
            f"{meta.sha256}; the file was modified after registration - {reregister}"
        )
    if raw[:1] != b"{":
        raise ModelIntegrityError(
            f"{path} ({where}) is not an XGBoost JSON/UBJSON model; save models with "
            'booster.save_model("model.ubj") and register them again'
        )


def looks_like_pickle(raw: bytes) -> bool:
    """True if ``raw`` is a pickle. Parses opcodes only; never unpickles."""
    if raw[:1] == b"\x80":  # PROTO, the first opcode of every protocol >= 2 pickle
        return True
    if raw[:1] in (b"", b"{"):  # '{' is not a pickle opcode
        return False
    # Protocols 0 and 1 have no header: it is a pickle if it parses up to STOP.
    try:
        for opcode, _arg, _pos in pickletools.genops(raw):
            if opcode.name == "STOP":
                return True
    except Exception:
        return False
    return False
