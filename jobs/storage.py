"""One storage interface over local disk (``file://``) and S3 (``s3://``).

Why: every stage reads its inputs and writes its outputs through this interface, so one pipeline
runs on a laptop (local disk) and on a cluster (S3, or any S3-compatible server named by
``AWS_ENDPOINT_URL``) with no branch anywhere else. It offers only what the commit protocol in
DESIGN.md ("Storage layout") needs:

- Keys are relative '/'-separated paths, validated on every call, so that a key can never name
  something outside the storage root (on disk, ``..`` would escape; on S3 it would merely look
  alike but be a different object). ``download_prefix`` also confines what a server *lists*.
- ``write_bytes`` is atomic on disk (temp file beside the target, fsync, ``os.replace``); a
  reader sees the old bytes or the new ones, never a torn file. A PUT is atomic on S3.
- ``create_bytes`` is create-only (``os.link`` on disk, ``If-None-Match: *`` on S3): the
  primitive for commit markers, where two writers racing must not both believe they won.
- A Storage pickles as its URI only, so it can be shipped to Ray workers; each process builds
  its own boto3 client lazily. boto3 is configured the standard way (environment, profile, IAM
  role, ``AWS_ENDPOINT_URL``): no credential ever passes through this module, its messages or
  its reprs.

This module holds the interface (``Storage``), key validation, ``open_storage``/``split_uri``
and the helpers both backends share; the backends are jobs/storage_local.py (``LocalStorage``)
and jobs/storage_s3.py (``S3Storage``). They import this module, so it imports them only when
one is needed (in ``open_storage``): either side can be imported first without an import cycle.
"""

from __future__ import annotations

import os
import re
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")  # see _temp_beside
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class InvalidKeyError(ValueError):
    """A key that is not a clean relative '/'-separated path under the storage root."""


def validate_key(key: str) -> str:
    """Return `key` if it is a clean relative path like 'stages/tok-1a2b3c4d/vocab.json'."""
    def reject(why: str, fix: str):
        raise InvalidKeyError(f"invalid storage key {key!r}: {why}; {fix}")

    if not isinstance(key, str):
        reject("it is not a string", "pass the key as a str")
    if not key:
        reject("it is empty", "name an object, e.g. 'runs/r1/run.json'")
    if key.startswith("/"):
        reject("it is absolute", "drop the leading '/': keys are relative to the storage root")
    if "\\" in key:
        reject("it contains a backslash", "separate segments with '/'")
    if _CONTROL_CHARS.search(key):
        reject("it contains a NUL or control character", "remove it")
    if key.endswith("/"):
        reject("it ends with '/'", "name an object, not a directory")
    for segment in key.split("/"):
        if segment == "..":
            reject("it has a '..' segment", "a key cannot leave the storage root; name the "
                   "object by its path below the root")
        if segment in ("", "."):
            reject("it has an empty segment" if not segment else "it has a '.' segment",
                   "write the normalized path, e.g. 'a/b' for 'a//b' or 'a/./b'")
    return key


def _validate_prefix(prefix: str) -> str:
    """A raw listing prefix ('', 'stages/', 'stages/tok-') must be a valid key or one plus '/'."""
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int
    version: str  # change fingerprint: the ETag on S3, str(st_mtime_ns) on disk


class Storage(ABC):
    uri: str
    _num_threads = 1  # how many transfers upload_dir/download_prefix run at once

    def __reduce__(self):
        return open_storage, (self.uri,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def url(self, key: str) -> str:
        # removesuffix: the filesystem root 'file:///' gives 'file:///k', not 'file:////k'
        return f"{self.uri.removesuffix('/')}/{validate_key(key)}"

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def upload_dir(self, local_dir, prefix: str) -> list[str]:
        """Upload every file under `local_dir` to `prefix`/<relative path>; returns the keys."""
        if prefix:
            validate_key(prefix)
        jobs = []
        for dirpath, _, filenames in os.walk(local_dir):
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), local_dir).replace(os.sep, "/")
                jobs.append((os.path.join(dirpath, name), f"{prefix}/{rel}" if prefix else rel))
        jobs.sort(key=lambda job: job[1])
        for _, key in jobs:
            validate_key(key)
        self._run_all(self.upload_file, jobs)
        return [key for _, key in jobs]

    def download_prefix(self, prefix: str, local_dir) -> list[str]:
        """Download every object under `prefix`/ into `local_dir`/<rest of key>; returns the keys.

        Every destination is checked before anything is written: a listed key must be a clean
        relative path and must resolve (symlinks included) inside `local_dir`.
        """
        base = _validate_prefix(prefix).rstrip("/") + "/" if prefix else ""
        root = os.path.realpath(local_dir)
        jobs = []
        for obj in self.list(base):
            rel = obj.key[len(base):]
            try:
                dest = os.path.realpath(os.path.join(root, *validate_key(rel).split("/")))
                if os.path.commonpath([root, dest]) != root:
                    raise InvalidKeyError(f"{rel!r} resolves to {dest!r}, outside {root!r}")
            except InvalidKeyError as e:
                raise InvalidKeyError(
                    f"refusing to download {self.uri}/{obj.key} into {root}: {e}") from e
            jobs.append((obj.key, dest))
        self._run_all(self.download_file, jobs)
        return [key for key, _ in jobs]

    def _run_all(self, fn, jobs) -> None:
        if self._num_threads == 1 or len(jobs) < 2:
            for job in jobs:
                fn(*job)
            return
        with ThreadPoolExecutor(self._num_threads) as pool:
            for future in [pool.submit(fn, *job) for job in jobs]:
                future.result()  # re-raises the first failure

    @abstractmethod
    def sub(self, prefix: str) -> Storage:
        """The storage rooted at `prefix` below this one."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo | None:
        """The object's size and version; None if there is no such object."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with the raw `prefix` ('stages/' or 'stages/tok-'),
        at any depth, sorted by key."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object; FileNotFoundError if missing."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object, short past its end, like a slice."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write or overwrite, atomically: readers see the old bytes or the new, never a mix."""

    @abstractmethod
    def create_bytes(self, key: str, data: bytes) -> bool:
        """Create-only write: True if this call created the object, False if it existed."""

    @abstractmethod
    def upload_file(self, local_path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local_path) -> None:
        """Atomically replace `local_path` (parents created) with the object."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object; a missing one is fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete what list(prefix) lists; returns how many objects that was."""


def _check_range(start: int, end: int) -> None:
    if not 0 <= start <= end:
        raise ValueError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")


@contextmanager
def _temp_beside(path: str):
    """Yield a hidden temp path in `path`'s directory (created if needed), removed at the end
    unless it was renamed; LocalStorage.list skips names of this shape (_TEMP_NAME)."""
    head, name = os.path.split(path)
    os.makedirs(head, exist_ok=True)
    tmp = os.path.join(head, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


_SCHEMES = "file:///abs/path, file://rel/path, a plain path, or s3://bucket[/prefix]"


def open_storage(uri: str) -> Storage:
    """The storage rooted at `uri`; see _SCHEMES for the forms understood."""
    from jobs.storage_local import LocalStorage  # here, not at the top: both import this module
    if uri.startswith("s3://"):
        from jobs.storage_s3 import S3Storage  # boto3 only where S3 is used

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        prefix = prefix.rstrip("/")
        if not bucket:
            raise ValueError(f"storage URI {uri!r} names no bucket; use s3://bucket[/prefix]")
        return S3Storage(bucket, validate_key(prefix) if prefix else "")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path:
        raise ValueError(f"unsupported storage URI {uri!r}: use {_SCHEMES}")
    if not path:
        raise ValueError(f"storage URI {uri!r} names no directory; use {_SCHEMES}")
    return LocalStorage(os.path.expanduser(path))


def split_uri(uri: str) -> tuple[Storage, str]:
    """Split an object URI ('s3://b/data/x.jsonl', '/abs/x.jsonl') into (storage of its
    directory, its name)."""
    from jobs.storage_local import LocalStorage  # here, not at the top: it imports this module
    if uri.endswith("/") or (uri.startswith("s3://") and "/" not in uri[len("s3://"):]):
        raise ValueError(f"{uri!r} names no object; give a file, e.g. s3://bucket/data/x.jsonl")
    if uri.startswith("s3://"):
        parent, _, name = uri.rpartition("/")
        return open_storage(parent), validate_key(name)
    storage = open_storage(uri)  # rejects unsupported schemes
    assert isinstance(storage, LocalStorage)
    return LocalStorage(os.path.dirname(storage.root)), validate_key(os.path.basename(storage.root))
