"""The local-disk backend of jobs.storage: a ``file://`` root, or a plain path.

Why: a pipeline runs unchanged on a laptop, where stages read and write files under one
directory, with the same guarantees the commit protocol relies on for S3 (see jobs/storage.py):
writes are atomic (temp file beside the target, fsync, ``os.replace``), ``create_bytes`` is
create-only (``os.link`` fails if the target exists), and listings skip the temp files of
writes in flight. Build one with ``jobs.storage.open_storage``.
"""

from __future__ import annotations

import os
import shutil
from contextlib import suppress
from pathlib import Path
from stat import S_ISREG

from jobs.storage import (_TEMP_NAME, ObjectInfo, Storage, _check_range, _temp_beside,
                          _validate_prefix, validate_key)


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
