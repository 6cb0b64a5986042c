"""The S3 backend of jobs.storage: ``s3://bucket[/prefix]`` on AWS or any S3-compatible server.

Why: on a cluster, stages share data through S3, and this module is the only place that speaks
it: a lazily built boto3 client per process (so a Storage pickles as its URI and is rebuilt on
each Ray worker), retries and transfer settings, and the translation of S3 errors into what the
interface promises (a missing object is None or FileNotFoundError; a racing create-only PUT is a
clean True or False). boto3 is configured the standard way (environment, profile, IAM role,
``AWS_ENDPOINT_URL``): no credential ever passes through this module, its messages or its
reprs. Build one with ``jobs.storage.open_storage``.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import boto3
import botocore.loaders
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from jobs.storage import (ObjectInfo, Storage, _check_range, _temp_beside, _validate_prefix,
                          validate_key)

MULTIPART_BYTES = 64 * 1024 * 1024  # S3 multipart threshold and part size; read at each call
NUM_TRANSFER_THREADS = 8
NUM_CONFLICT_RETRIES = 5  # S3 answers 409 ConditionalRequestConflict to racing conditional PUTs
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


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
