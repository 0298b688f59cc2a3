"""Paths and URIs (local, `s3://…`, any pyarrow filesystem) behind one small set of functions.

Everything the pipeline reads or writes goes through here, so a run directory can live on a
shared filesystem or in object storage on a cluster without the callers knowing.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "file://")


def is_uri(path: str) -> bool:
    return path.startswith(_URI_SCHEMES)


def is_local(path: str) -> bool:
    return not is_uri(path) or path.startswith("file://")


def absolute(path: str) -> str:
    """`path` as a task or actor reads it: a local path made absolute against this process's
    directory (a joined cluster's workers run in the directory its `ray start` ran in), a URI
    as it is."""
    return path if is_uri(path) else os.path.abspath(path)


def shown(path: str) -> str:
    """`path` for the console: relative to the working directory when it lies below it."""
    if is_uri(path) or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# Settings (never secrets) that decide where and how s3:// URIs are reached. The AWS SDK and
# pyarrow read them from the environment; the driver forwards the ones it has to every sender
# actor (campaign.py, as the actors' runtime_env), because an actor on another node does not
# share the driver's environment. Credentials are not forwarded: a runtime_env is visible in the
# dashboard and the job table, so each node finds its own (instance profile on AWS, or
# ~/.aws/credentials / AWS_* variables set up on the node).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
    # S3-compatible servers that do not take the SDK's default streamed checksums (moto's
    # server, older MinIO) need "when_required" here.
    "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_EC2_METADATA_DISABLED",
    # Names and paths, not secrets: which profile, in which files present on every node.
    "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)


def forwarded_env() -> dict[str, str]:
    """The storage settings of this process's environment, to hand to actors elsewhere."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def runtime_env(*paths: str | None) -> dict[str, Any] | None:
    """A Ray `runtime_env` carrying the storage settings, when any of `paths` is in object
    storage: tasks and actors on other nodes do not share the driver's environment (the S3
    endpoint, region; never credentials)."""
    env = forwarded_env() if any(p is not None and is_uri(p) for p in paths) else {}
    return {"env_vars": env} if env else None


@lru_cache(maxsize=32)
def _filesystem_for(uri_root: str, settings: tuple[tuple[str, str], ...]) -> pafs.FileSystem:
    if uri_root.startswith("s3://"):
        # pyarrow reads credentials from the AWS_* variables itself; AWS_ENDPOINT_URL points it
        # at any S3-compatible server (MinIO, moto in tests).
        env = dict(settings)
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, object] = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["scheme"] = "http"
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    fs, _ = pafs.FileSystem.from_uri(uri_root)
    return fs


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem for `path` and the path inside it."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if path.startswith("file://"):
        return pafs.LocalFileSystem(), path[len("file://"):]
    scheme, rest = path.split("://", 1)
    # Keyed on the settings too: a changed endpoint (a test's own server) gets its own client.
    return _filesystem_for(f"{scheme}://", tuple(sorted(forwarded_env().items()))), rest


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return bool(fs.get_file_info(p).type != pafs.FileType.NotFound)


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return bool(fs.get_file_info(p).type == pafs.FileType.Directory)


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def list_files(directory: str, suffix: str = "") -> list[str]:
    """Files directly under `directory` (sorted, full paths in the caller's notation)."""
    fs, p = resolve(directory)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                   and not i.base_name.startswith((".", "_")))
    return [join(directory, n) for n in names]


def list_dirs(directory: str) -> list[str]:
    """Names of the directories directly under `directory` (sorted)."""
    fs, p = resolve(directory)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def delete_file(path: str) -> None:
    fs, p = resolve(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(p)


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def write_table(table: pa.Table, path: str) -> None:
    """Write Parquet so that a reader never sees half a file (see `write_bytes`)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(path, sink.getvalue())


def read_table(path: str) -> pa.Table:
    fs, p = resolve(path)
    return pq.read_table(p, filesystem=fs)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes | pa.Buffer) -> None:
    """The one atomic write. Locally: a hidden temporary beside the target, then a rename
    (atomic on POSIX), so a process killed mid-write leaves either nothing or a whole file.
    Object stores publish whole objects only, so they are written directly."""
    fs, p = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        directory, name = os.path.split(p)
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    else:
        with fs.open_output_stream(p) as out:
            out.write(data)


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return bytes(f.read()).decode()


def open_bytes(path: str) -> io.BytesIO:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return io.BytesIO(bytes(f.read()))
