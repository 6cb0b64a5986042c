"""The commit protocol: an output exists only once its commit file does.

Writers upload every file first and write the commit file LAST, create-only (S3
`If-None-Match: *`, disk `os.link`), listing each file with its size and sha256. Readers trust
only what a commit lists, and `verify` checks that each listed file is there with its size
(cheap: one listing) or, with `deep=True`, its checksum too. A crash at any point leaves either
no commit (the output is ignored and redone) or a complete output; never a half-written one that
is read back as complete.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from jobs.storage import Storage

_CHUNK = 8 << 20
_FEW_KEYS = 8


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


def file_entry(local_path: str) -> FileEntry:
    digest, size = hashlib.sha256(), 0
    with open(local_path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(size, digest.hexdigest())


def bytes_entry(data: bytes) -> FileEntry:
    return FileEntry(len(data), hashlib.sha256(data).hexdigest())


def upload_and_commit(storage: Storage, files: dict[str, str], commit_key: str, meta: dict) -> bool:
    """Upload local files (key -> local path), then commit them. Returns False if already committed."""
    entries = {}
    for key, local_path in sorted(files.items()):
        entries[key] = file_entry(local_path)
        storage.upload_file(local_path, key)
    return write_commit(storage, commit_key, entries, meta)


def write_commit(storage: Storage, commit_key: str, files: dict[str, FileEntry], meta: dict) -> bool:
    """Create the commit file for already-uploaded `files`; False if a commit already exists."""
    body = {
        "committed_at": time.time(),
        **meta,
        "files": {key: {"size": e.size, "sha256": e.sha256} for key, e in sorted(files.items())},
    }
    return storage.create_bytes(commit_key, json.dumps(body, indent=1, sort_keys=True).encode())


def read_commit(storage: Storage, commit_key: str) -> dict | None:
    """The commit's content, or None when there is none (or it is unreadable, i.e. not a commit)."""
    try:
        body = json.loads(storage.read_bytes(commit_key))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
        return None
    for entry in body["files"].values():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str)):
            return None
    return body


def commit_entries(commit: dict) -> dict[str, FileEntry]:
    return {key: FileEntry(v["size"], v["sha256"]) for key, v in commit["files"].items()}


def verify_commit(storage: Storage, commit_key: str, deep: bool = False) -> list[str]:
    """Problems found (empty when the commit verifies). A missing commit is one problem."""
    commit = read_commit(storage, commit_key)
    if commit is None:
        return [f"no readable commit at {storage.url(commit_key)}"]
    problems = []
    entries = commit_entries(commit)
    present = _sizes(storage, list(entries))
    for key, entry in entries.items():
        if key not in present:
            problems.append(f"{key}: missing")
        elif present[key] != entry.size:
            problems.append(f"{key}: {present[key]} bytes, commit says {entry.size}")
        elif deep and bytes_entry(storage.read_bytes(key)).sha256 != entry.sha256:
            problems.append(f"{key}: checksum differs from the commit")
    return problems


def _sizes(storage: Storage, keys: list[str]) -> dict[str, int]:
    """Sizes of the keys that exist: one request per key for a few (a shard's commit), else one
    listing per directory (a stage's commit, which may list thousands of files)."""
    if len(keys) <= _FEW_KEYS:
        infos = [storage.info(key) for key in keys]
        return {key: info.size for key, info in zip(keys, infos) if info is not None}
    prefixes = {key.rsplit("/", 1)[0] + "/" if "/" in key else "" for key in keys}
    if "" in prefixes:  # a listing of the root covers every other prefix
        prefixes = {""}
    return {o.key: o.size for prefix in prefixes for o in storage.list(prefix)}
