"""Ways a registered model file goes bad: what the registry's unit tests and the fault
suite (a bad version swapped into a running app) do to a version on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stageline.registry import LocalRegistry

GIB = 1 << 30


def model_file(registry: LocalRegistry, version: int = 1, name: str = "fraud") -> Path:
    """The model file of ``name@version`` (as its metadata names it)."""
    meta = json.loads((registry.root / name / str(version) / "metadata.json").read_text())
    return registry.root / name / str(version) / str(meta["file"])


def record_in_metadata(
    registry: LocalRegistry, version: int, *, size: int, sha256: str, name: str = "fraud"
) -> None:
    """Make ``name@version``'s metadata claim this size and sha256 for its model file."""
    meta_path = registry.root / name / str(version) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.update(sha256=sha256, size_bytes=size)
    meta_path.write_text(json.dumps(meta))


def replace_model_bytes(
    registry: LocalRegistry, data: bytes, version: int = 1, name: str = "fraud"
) -> None:
    """Overwrite the model file and make its metadata agree with the new bytes, as
    someone who can write the registry would (the sha256 check then passes)."""
    model_file(registry, version, name).write_bytes(data)
    record_in_metadata(
        registry, version, size=len(data), sha256=hashlib.sha256(data).hexdigest(), name=name
    )


def flip_a_byte(registry: LocalRegistry, version: int = 1, name: str = "fraud") -> None:
    """One byte in the middle changed: same size, another sha256."""
    path = model_file(registry, version, name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(registry: LocalRegistry, version: int = 1, name: str = "fraud") -> None:
    """The last 10 bytes cut off, as by an interrupted copy."""
    path = model_file(registry, version, name)
    path.write_bytes(path.read_bytes()[:-10])


def huge_sparse_file(
    registry: LocalRegistry, version: int = 1, name: str = "fraud", *, claimed: bool = False
) -> None:
    """The model file grown to 1 GiB, sparse (no real disk use). ``claimed``: its
    metadata records that size too, so only a size limit stops a 1 GiB read."""
    path = model_file(registry, version, name)
    with open(path, "r+b") as f:
        f.truncate(GIB)
    if claimed:
        record_in_metadata(registry, version, size=GIB, sha256="0" * 64, name=name)
