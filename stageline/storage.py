"""Where the model registry and the feature store keep their files: a folder or a bucket.

A location is a local path (relative ones are taken from the home), a ``file://``
URI, or an object-storage URI (``s3://bucket/prefix``). Object storage is reached
through ``pyarrow.fs``, so every node of a cluster reads the same registry and
feature tables without a shared POSIX mount.

Where each lives, first found wins: the environment (:data:`MODELS_ENV`,
:data:`FEATURES_ENV`, :data:`ONLINE_ENV`), the spec's ``storage`` section, else the
home (``<home>/models``, ``<home>/features``, ``<home>/online``). The runtimes resolve
them once, in the process that reads the spec, and hand the result to every replica
and actor, so a cluster's workers need none of these variables.

S3 settings come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` or
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``...) and, for an S3-compatible server (MinIO,
Ceph, a test server), ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``. The URI's query
may set them too: ``s3://bucket/prefix?endpoint_override=http://minio:9000&region=us-east-1``.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stageline._io import atomic_write_parquet

if TYPE_CHECKING:
    from stageline.spec import PipelineSpec

MODELS_ENV = "STAGELINE_MODELS_URI"
"""Overrides where the model registry lives (the spec's ``storage.models``)."""
FEATURES_ENV = "STAGELINE_FEATURES_URI"
"""Overrides where the offline feature tables live (the spec's ``storage.features``)."""
ONLINE_ENV = "STAGELINE_ONLINE_URI"
"""Overrides where the memory online store's snapshots live (``storage.online``)."""

_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# Seconds: an unreachable endpoint fails in seconds, with a message, not after minutes.
_CONNECT_TIMEOUT_S = 5.0
_REQUEST_TIMEOUT_S = 30.0


class StorageError(RuntimeError):
    """A storage location cannot be used: a bad URI, an unreachable endpoint, missing
    credentials or a missing bucket. The message says which and what to check."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URI other than ``file://`` (object storage)."""
    text = os.fspath(location)
    return bool(_SCHEME_RE.match(text)) and not text.startswith("file://")


def local_path(location: str | os.PathLike[str], home: Path) -> Path:
    """A local location as a path: ``file://`` stripped, a relative one under ``home``."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    path = Path(text).expanduser()
    return path if path.is_absolute() else home / path


def join(location: str, *parts: str) -> str:
    """``location`` with ``parts`` appended, ``/``-separated (a URI keeps its query)."""
    split = urllib.parse.urlsplit(location)
    path = "/".join([split.path.rstrip("/"), *parts])
    return urllib.parse.urlunsplit(split._replace(path=path))


@dataclass(frozen=True)
class StorageLocations:
    """Where one pipeline's registry and feature tables live, resolved once.

    Each is a local path (as a string) or an object-storage URI. Plain data: Ray
    ships it to replicas and actors as it is.
    """

    models: str
    """The model registry's root."""
    features: str
    """The folder of offline feature tables (``<view>.parquet``)."""
    online: str
    """The folder of the memory online store's snapshots (``<view>.parquet``)."""

    @classmethod
    def resolve(cls, spec: PipelineSpec | None, home: Path) -> StorageLocations:
        """The environment's locations, else the spec's, else the home's."""
        storage = spec.storage if spec is not None else None

        def pick(env: str, configured: str | None, default: str) -> str:
            location = os.environ.get(env) or configured or default
            if is_remote(location) or location.startswith("mlflow:"):
                return location
            return str(local_path(location, home))

        return cls(
            models=pick(MODELS_ENV, storage.models if storage else None, "models"),
            features=pick(FEATURES_ENV, storage.features if storage else None, "features"),
            online=pick(ONLINE_ENV, storage.online if storage else None, "online"),
        )


def open_location(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem behind an object-storage ``uri`` and the path inside it.

    Does no I/O: a bad endpoint or missing credentials show on first use, as a
    :class:`StorageError` from :func:`storage_errors`.
    """
    split = urllib.parse.urlsplit(uri)
    if split.scheme != "s3":
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:
            raise StorageError(
                f"cannot open {uri}: {exc}; stageline reads local paths, file:// and "
                "s3://bucket/prefix URIs"
            ) from exc
        return fs, path.rstrip("/")
    if not split.netloc:
        raise StorageError(f"{uri} names no bucket; write s3://bucket/prefix")
    return s3_filesystem(split.query), f"{split.netloc}{split.path}".rstrip("/")


def s3_filesystem(query: str = "") -> pafs.S3FileSystem:
    """An S3 filesystem from the URI's ``query`` and the standard AWS variables."""
    options: dict[str, Any] = {
        "connect_timeout": _CONNECT_TIMEOUT_S,
        "request_timeout": _REQUEST_TIMEOUT_S,
        # Small objects (metadata, aliases) then go up in one PUT: one atomic write.
        "allow_delayed_open": True,
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    for key, value in urllib.parse.parse_qsl(query):
        if key in ("endpoint_override", "region", "scheme"):
            options[key] = value
        else:
            raise StorageError(
                f"unknown S3 option {key!r} in the URI; use endpoint_override, region or "
                "scheme (credentials come from the AWS environment variables or profile)"
            )
    try:
        return pafs.S3FileSystem(**options)
    except (ValueError, OSError) as exc:
        raise StorageError(f"cannot set up S3 access: {exc}") from exc


def check_bucket(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """Raise :class:`StorageError` if the bucket of ``path`` does not exist (a listing or
    a read in a missing bucket finds nothing, which would read as "not there yet")."""
    if not isinstance(fs, pafs.S3FileSystem):
        return
    try:
        missing = fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound
    except OSError as exc:
        raise storage_problem(uri, exc) from exc
    if missing:
        bucket = path.split("/", 1)[0]
        raise StorageError(
            f"cannot use {uri}: the bucket does not exist: create {bucket!r}, or fix the "
            "bucket name"
        )


def storage_problem(uri: str, exc: BaseException) -> StorageError:
    """A :class:`StorageError` for an error of pyarrow's at ``uri``, saying what to check."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" (endpoint {endpoint})" if endpoint else ""
    # AWS error codes come as NO_SUCH_BUCKET or NoSuchBucket: compare without the case
    # and the underscores.
    code = text.lower().replace("_", "")
    if "nosuchbucket" in code or "bucket does not exist" in code:
        hint = "the bucket does not exist: create it, or fix the bucket name"
    elif any(
        word in code
        for word in ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
                     "credential", "forbidden", "securitytoken", "expiredtoken")
    ):  # fmt: skip
        hint = (
            "access was refused: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE, or give the node an IAM role) to credentials that may read and "
            "write there"
        )
    elif any(word in code for word in ("networkconnection", "connect", "resolve", "timeout")):
        hint = (
            "the storage endpoint cannot be reached: check the network and, for an "
            "S3-compatible server, AWS_ENDPOINT_URL"
        )
    else:
        hint = (
            "check the URI, the endpoint (AWS_ENDPOINT_URL for an S3-compatible server) and "
            "that credentials are set (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or an IAM role)"
        )
    return StorageError(f"cannot use {uri}{where}: {hint}. ({text})")


def read_parquet(location: str | Path) -> pd.DataFrame | None:
    """The parquet file or folder at ``location`` (local or a URI), or None if absent.

    Raises :class:`StorageError` when object storage cannot be used."""
    if not is_remote(location):
        path = Path(location)
        return pd.read_parquet(path) if path.exists() else None
    uri = os.fspath(location)
    fs, path_in = open_location(uri)
    try:
        if fs.get_file_info(path_in).type == pafs.FileType.NotFound:
            check_bucket(fs, path_in, uri)
            return None
        frame: pd.DataFrame = pq.read_table(path_in, filesystem=fs).to_pandas()
        return frame
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_problem(uri, exc) from exc


def write_parquet(
    location: str | Path, frame: pd.DataFrame, metadata: Mapping[str, str] | None = None
) -> str | Path:
    """``frame`` as one parquet file at ``location``, published whole: a local file is
    renamed into place, an object appears only once its upload completes. ``metadata``
    goes into the file's key-value metadata, beside pandas' own."""
    if not is_remote(location):
        return atomic_write_parquet(Path(location), frame, metadata)
    uri = os.fspath(location)
    fs, path_in = open_location(uri)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        extra = {k.encode(): v.encode() for k, v in metadata.items()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    try:
        with fs.open_output_stream(path_in) as out:
            pq.write_table(table, out)
    except OSError as exc:
        raise storage_problem(uri, exc) from exc
    return uri
