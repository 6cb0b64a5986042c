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
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import boto3
import botocore.loaders
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

MULTIPART_BYTES = 64 * 1024 * 1024  # S3 multipart threshold and part size; read at each call
NUM_TRANSFER_THREADS = 8
NUM_CONFLICT_RETRIES = 5  # S3 answers 409 ConditionalRequestConflict to racing conditional PUTs
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
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


def _fsync(path: str) -> None:
    """Flush a file's bytes, or a directory's entries (a rename or link in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.uri = "file://" + self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *validate_key(key).split("/"))

    def sub(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._path(prefix))

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, st.st_size, str(st.st_mtime_ns)) if S_ISREG(st.st_mode) else None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        found = []
        for dirpath, _, filenames in os.walk(self._walk_start(prefix)):
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if _TEMP_NAME.match(name) or not key.startswith(prefix):
                    continue
                with suppress(FileNotFoundError):  # deleted since the walk saw it: not listed
                    st = os.stat(os.path.join(dirpath, name))
                    found.append(ObjectInfo(key, st.st_size, str(st.st_mtime_ns)))
        return sorted(found, key=lambda obj: obj.key)

    def _walk_start(self, prefix: str) -> str:
        """The deepest directory that `prefix` names in full ('stages/tok-' -> 'stages')."""
        return os.path.join(self.root, *_validate_prefix(prefix).split("/")[:-1])

    def read_bytes(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read()

    def read_range(self, key: str, start: int, end: int) -> bytes:
        _check_range(start, end)
        with open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def _install(self, key: str, fill, create_only: bool = False) -> bool:
        """fill(temp path) beside the key's file, make it durable, then move it into place."""
        path = self._path(key)
        with _temp_beside(path) as tmp:
            fill(tmp)
            _fsync(tmp)
            if not create_only:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # unlike os.replace, fails if `path` exists
                except FileExistsError:
                    return False
        _fsync(os.path.dirname(path))
        return True

    def write_bytes(self, key: str, data: bytes) -> None:
        self._install(key, lambda tmp: Path(tmp).write_bytes(data))

    def create_bytes(self, key: str, data: bytes) -> bool:
        return self._install(key, lambda tmp: Path(tmp).write_bytes(data), create_only=True)

    def upload_file(self, local_path, key: str) -> None:
        self._install(key, lambda tmp: shutil.copyfile(local_path, tmp))

    def download_file(self, key: str, local_path) -> None:
        local_path = os.path.abspath(local_path)
        with _temp_beside(local_path) as tmp:
            shutil.copyfile(self._path(key), tmp)
            os.replace(tmp, local_path)

    def delete(self, key: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        for obj in objects:
            self.delete(obj.key)
        # Remove the directories this emptied, deepest first; a non-empty one stays.
        for dirpath, _, _ in sorted(os.walk(self._walk_start(prefix)), reverse=True):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/") + "/"
            if dirpath != self.root and rel.startswith(prefix):
                with suppress(OSError):
                    os.rmdir(dirpath)
        return len(objects)


# botocore's parsed service models (~0.1 s to load per fresh session): read once per process.
# Sessions stay per Storage, so credentials and endpoint still come from the environment of
# the moment a client is built.
_LOADER = botocore.loaders.create_loader()


class _LazyS3Client:
    """One boto3 session + client, built on first use (in the process that uses it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._client = None

    def get(self):
        with self._lock:
            if self._client is None:
                # `standard` retries throttling with jittered backoff; `adaptive` adds a client-side
                # rate limiter that, under SlowDown storms, throttles a worker far below what S3
                # allows (16x slower in tests/test_storage.py's fault test): opt in via the env.
                config = Config(
                    retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                             "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))},
                    connect_timeout=10, read_timeout=120,
                    # upload_dir threads x multipart threads share this pool
                    max_pool_connections=4 * NUM_TRANSFER_THREADS)
                session = botocore.session.Session()
                session.register_component("data_loader", _LOADER)
                self._client = boto3.session.Session(botocore_session=session).client(
                    "s3", config=config)
            return self._client


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3Storage(Storage):
    _num_threads = NUM_TRANSFER_THREADS

    def __init__(self, bucket: str, prefix: str = "", _client: _LazyS3Client | None = None):
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = _client or _LazyS3Client()  # shared with sub() storages

    @property
    def _s3(self):
        return self._client.get()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{validate_key(key)}" if self.prefix else validate_key(key)

    def _transfer_config(self) -> TransferConfig:
        return TransferConfig(multipart_threshold=MULTIPART_BYTES,
                              multipart_chunksize=MULTIPART_BYTES,
                              max_concurrency=NUM_TRANSFER_THREADS)

    @contextmanager
    def _missing_as_file_not_found(self, key: str):
        try:
            yield
        except ClientError as e:
            if _error_code(e) in _MISSING_CODES:
                raise FileNotFoundError(f"no object at {self.url(key)}") from e
            raise

    def sub(self, prefix: str) -> S3Storage:
        return S3Storage(self.bucket, self._key(prefix), self._client)

    def info(self, key: str) -> ObjectInfo | None:
        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if _error_code(e) in _MISSING_CODES:
                return None
            raise
        return ObjectInfo(key, head["ContentLength"], head["ETag"].strip('"'))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = f"{self.prefix}/{_validate_prefix(prefix)}" if self.prefix else prefix
        skip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full_prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # a console "folder" marker, not an object to us
                    continue
                found.append(ObjectInfo(obj["Key"][skip:], obj["Size"], obj["ETag"].strip('"')))
        return sorted(found, key=lambda obj: obj.key)

    def read_bytes(self, key: str) -> bytes:
        with self._missing_as_file_not_found(key):
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def read_range(self, key: str, start: int, end: int) -> bytes:
        _check_range(start, end)
        if start == end:
            return b""
        with self._missing_as_file_not_found(key):
            try:
                response = self._s3.get_object(
                    Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}")
            except ClientError as e:
                if _error_code(e) == "InvalidRange":  # start is past the end: like a slice
                    return b""
                raise
            return response["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def create_bytes(self, key: str, data: bytes) -> bool:
        for attempt in range(NUM_CONFLICT_RETRIES):
            try:
                self._s3.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                code = _error_code(e)
                if code == "PreconditionFailed":
                    # Someone created it first, or our own earlier attempt did and its response
                    # was lost before botocore retried: the bytes tell the two apart.
                    return self.read_bytes(key) == data
                if code != "ConditionalRequestConflict" or attempt == NUM_CONFLICT_RETRIES - 1:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def upload_file(self, local_path, key: str) -> None:
        self._s3.upload_file(os.fspath(local_path), self.bucket, self._key(key),
                             Config=self._transfer_config())

    def download_file(self, key: str, local_path) -> None:
        local_path = os.path.abspath(local_path)
        with _temp_beside(local_path) as tmp, self._missing_as_file_not_found(key):
            self._s3.download_file(self.bucket, self._key(key), tmp,
                                   Config=self._transfer_config())
            os.replace(tmp, local_path)

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        # Listed keys are deleted as listed (not re-validated): they exist, so they can go.
        keys = [f"{self.prefix}/{obj.key}" if self.prefix else obj.key
                for obj in self.list(prefix)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            response = self._s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": key} for key in keys[i:i + 1000]], "Quiet": True})
            if errors := response.get("Errors"):
                raise OSError(f"could not delete {len(errors)} objects under {self.uri}/{prefix}"
                              f", e.g. {errors[0]['Key']!r}: {errors[0]['Code']}")
        return len(keys)


_SCHEMES = "file:///abs/path, file://rel/path, a plain path, or s3://bucket[/prefix]"


def open_storage(uri: str) -> Storage:
    """The storage rooted at `uri`; see _SCHEMES for the forms understood."""
    if uri.startswith("s3://"):
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
    if uri.endswith("/") or (uri.startswith("s3://") and "/" not in uri[len("s3://"):]):
        raise ValueError(f"{uri!r} names no object; give a file, e.g. s3://bucket/data/x.jsonl")
    if uri.startswith("s3://"):
        parent, _, name = uri.rpartition("/")
        return open_storage(parent), validate_key(name)
    storage = open_storage(uri)  # rejects unsupported schemes
    assert isinstance(storage, LocalStorage)
    return LocalStorage(os.path.dirname(storage.root)), validate_key(os.path.basename(storage.root))
