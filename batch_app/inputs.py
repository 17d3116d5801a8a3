"""The input files of a batch run: what a file, folder, glob, list or URI names."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from batch_app.dataset import CSV_SUFFIXES

INPUT_SUFFIXES = (".parquet", *CSV_SUFFIXES)


@dataclass(frozen=True)
class InputFile:
    path: str
    """As Ray reads it: an absolute local path or a URI."""
    size: int
    mtime_ns: int

    def key(self) -> dict[str, Any]:
        return {"size": self.size, "mtime_ns": self.mtime_ns}


def list_inputs(source: str | os.PathLike[str] | list[str]) -> list[InputFile]:
    """Every parquet/CSV file of a file, directory, glob or list (URIs included), sorted."""
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    found: dict[str, InputFile] = {}
    for item in items:
        for f in _expand(os.fspath(item)):
            found[f.path] = f
    return [found[p] for p in sorted(found)]


def _expand(item: str) -> Iterator[InputFile]:
    if "://" in item:
        fs, path = pafs.FileSystem.from_uri(item)
        scheme = item.split("://", 1)[0]
        prefix = f"{scheme}://"
    else:
        fs, prefix = pafs.LocalFileSystem(), ""
        if glob.has_magic(item):
            for match in sorted(glob.glob(item, recursive=True)):
                yield from _expand(match)
            return
        path = str(Path(item).resolve())
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such input: {item}")
    if info.type == pafs.FileType.File:
        yield InputFile(prefix + info.path, int(info.size or 0), int(info.mtime_ns or 0))
        return
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        relative = entry.path[len(path) :]
        if entry.type != pafs.FileType.File or any(
            part.startswith(("_", ".")) for part in relative.split("/") if part
        ):
            continue
        if entry.path.lower().endswith(INPUT_SUFFIXES):
            yield InputFile(prefix + entry.path, int(entry.size or 0), int(entry.mtime_ns or 0))
