"""Storage for the campaign lease (pipeline/lease.py): epoch files in a local directory or S3.

This module owns where and how the epoch files ``<run_dir>/lease/<epoch:012d>.json`` are kept:
their naming and parsing, the :class:`Store` protocol that pipeline/lease.py programs against,
and its two implementations. The one primitive the protocol needs is "create this file if it
does not exist", atomically: the local store gets it from ``link(2)`` of a fully written
temporary, the S3 store from ``PutObject`` with ``If-None-Match: *``. :func:`open_store` picks the
store for a run directory. What the files say and when a run may take over (the rules) live in
pipeline/lease.py; this module knows nothing of holders, heartbeats or expiry.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import json
import os
import re
import time
import uuid
from typing import Any, Protocol

from .errors import UsageError

LEASE_DIR = "lease"
_EPOCH_NAME = re.compile(r"^(\d{12})\.json$")
_STALE_TMP_S = 60.0     # a local temporary this old was left by a process killed mid-write


# --- the interface pipeline/lease.py uses ---------------------------------------------------

class Store(Protocol):
    """One campaign's epoch files. ``where`` names the run directory in messages.

    ``create`` must be atomic and exclusive: True if this call created the epoch, False if it
    already existed (or another create of it is in flight). ``read`` gives None for an epoch
    that does not exist, ``epochs`` the existing ones in ascending order.
    """

    where: str

    def prepare(self) -> None: ...
    def epochs(self) -> list[int]: ...
    def read(self, epoch: int) -> bytes | None: ...
    def create(self, epoch: int, data: bytes) -> bool: ...
    def overwrite(self, epoch: int, data: bytes) -> None: ...
    def delete_below(self, epoch: int) -> None: ...


# --- epoch file names -----------------------------------------------------------------------

def epoch_name(epoch: int) -> str:
    return f"{epoch:012d}.json"


def _epoch_of(name: str) -> int | None:
    match = _EPOCH_NAME.match(name)
    return int(match.group(1)) if match else None


# --- a local directory or an S3 prefix ------------------------------------------------------

class _LocalStore:
    """Epoch files in a local (or NFS-mounted) directory.

    Files are written whole to a hidden temporary beside the target and then published: by
    ``link`` for a create (fails if the target exists, so it is atomic and never shows a half
    file) and by ``rename`` for a rewrite of one's own epoch.
    """

    def __init__(self, directory: str, where: str) -> None:
        self.directory = directory
        self.where = where

    def _path(self, epoch: int) -> str:
        return os.path.join(self.directory, epoch_name(epoch))

    def _temporary(self, epoch: int, data: bytes) -> str:
        tmp = os.path.join(self.directory, f".{epoch_name(epoch)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())   # a crash must not leave a published but empty epoch
        return tmp

    def prepare(self) -> None:
        os.makedirs(self.directory, exist_ok=True)

    def epochs(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(e for e in map(_epoch_of, names) if e is not None)

    def read(self, epoch: int) -> bytes | None:
        try:
            with open(self._path(epoch), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def create(self, epoch: int, data: bytes) -> bool:
        tmp = self._temporary(epoch, data)
        try:
            os.link(tmp, self._path(epoch))
            return True
        except FileExistsError:
            return False
        except OSError as e:
            # Some FUSE and SMB mounts refuse hard links (EPERM, EOPNOTSUPP): say so plainly.
            if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                raise UsageError(f"the filesystem of {self.where} cannot create hard links, "
                                 f"which the campaign lease needs for an atomic create ({e}); "
                                 f"put the run directory on a POSIX filesystem or in S3") from e
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def overwrite(self, epoch: int, data: bytes) -> None:
        tmp = self._temporary(epoch, data)
        try:
            os.replace(tmp, self._path(epoch))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def delete_below(self, epoch: int) -> None:
        now = time.time()
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            number = _epoch_of(name)
            with contextlib.suppress(FileNotFoundError):
                old_epoch = number is not None and number < epoch
                if old_epoch or (number is None and name.endswith(".tmp")
                                 and now - os.stat(path).st_mtime > _STALE_TMP_S):
                    os.unlink(path)


class _S3Store:
    """Epoch objects under ``<prefix>/lease/`` in a bucket, through boto3.

    pyarrow's S3 filesystem (used for everything else) cannot make a conditional write, so the
    lease talks to S3 itself. S3 lists and reads are strongly consistent, which the protocol
    relies on.
    """

    def __init__(self, client: Any, bucket: str, prefix: str, where: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix   # "" or ends with "/"; the lease objects are prefix + name
        self.where = where

    @staticmethod
    def _error_code(error: Exception) -> tuple[str, int]:
        response: dict[str, Any] = getattr(error, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code, status

    def prepare(self) -> None:
        pass

    def epochs(self) -> list[int]:
        found: list[int] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                key = str(obj["Key"])
                if "/" not in key[len(self.prefix):]:
                    number = _epoch_of(key[len(self.prefix):])
                    if number is not None:
                        found.append(number)
        return sorted(found)

    def read(self, epoch: int) -> bytes | None:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.prefix + epoch_name(epoch))
        except self.client.exceptions.ClientError as e:
            code, status = self._error_code(e)
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return None
            raise
        return bytes(reply["Body"].read())

    def create(self, epoch: int, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + epoch_name(epoch), Body=data,
                                   ContentType="application/json", IfNoneMatch="*")
            return True
        except self.client.exceptions.ClientError as e:
            code, status = self._error_code(e)
            # 412: the object exists. 409: another conditional write of it is in flight; either
            # way somebody else is creating this epoch, and the caller re-reads to find out who.
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise

    def overwrite(self, epoch: int, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + epoch_name(epoch), Body=data,
                               ContentType="application/json")

    def delete_below(self, epoch: int) -> None:
        for number in self.epochs():
            if number < epoch:
                self.client.delete_object(Bucket=self.bucket, Key=self.prefix + epoch_name(number))


def _s3_client() -> Any:
    """A boto3 S3 client from the settings storage.py gives pyarrow (endpoint, region).

    One per process and environment: building a client costs a few tenths of a second of CPU,
    and clients are safe to share between threads. The AWS_* variables (hashed, so no second
    copy of any credential is kept) are the key, as a test or a long-lived process may change
    them. The endpoint and region are read here as storage.py reads them; the SDK reads the
    rest (profile, credentials file, checksum mode) from the environment itself.
    """
    aws = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    key = hashlib.sha256(json.dumps(aws).encode()).hexdigest()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return _new_s3_client(endpoint, region, key)


@functools.lru_cache(maxsize=8)
def _new_s3_client(endpoint: str | None, region: str | None, env_key: str) -> Any:
    """Short timeouts: a heartbeat stuck for a minute on a dead connection would let the lease
    lapse without a word, where a quick failure is retried at the next beat."""
    try:
        import boto3
        # botocore ships no type information; imported by name so mypy strict accepts it.
        config_type: Any = importlib.import_module("botocore.config").Config
    except ImportError:
        raise UsageError("an s3:// run directory needs boto3 for the campaign lease: "
                         "pip install 'bulkmail[s3]'") from None
    config = config_type(connect_timeout=3, read_timeout=5,
                         retries={"mode": "standard", "max_attempts": 3})
    # A session of its own: boto3's default session is not safe to share between threads, and
    # keeps the profile settings it saw first.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region,
                                          config=config)


# --- choosing the store ---------------------------------------------------------------------

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def open_store(run_dir: str) -> Store:
    """The store of ``<run_dir>/lease``: a local path, ``file://`` or ``s3://bucket/prefix``."""
    where = run_dir.rstrip("/")
    if run_dir.startswith("s3://"):
        bucket, _, prefix = run_dir[len("s3://"):].partition("/")
        prefix = prefix.strip("/")
        if not bucket:
            raise UsageError(f"run directory {run_dir!r} names no bucket")
        key_prefix = f"{prefix}/{LEASE_DIR}/" if prefix else f"{LEASE_DIR}/"
        return _S3Store(_s3_client(), bucket, key_prefix, where)
    if run_dir.startswith("file://") or not _SCHEME.match(run_dir):
        local = run_dir[len("file://"):] if run_dir.startswith("file://") else run_dir
        return _LocalStore(os.path.join(os.path.abspath(local), LEASE_DIR), where)
    raise UsageError(f"the campaign lease needs a local run directory or an s3:// one, "
                     f"not {run_dir!r}")
