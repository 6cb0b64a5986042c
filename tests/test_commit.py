"""Unit tests of the commit protocol (jobs/commit.py) on local disk and on S3 (moto server)."""

from __future__ import annotations

import hashlib
import json

import pytest

from jobs.commit import (FileEntry, bytes_entry, commit_entries, file_entry, read_commit, upload_and_commit,
                         verify_commit, write_commit)
from jobs.storage import open_storage

COMMIT = "_COMMIT.json"
FILES = {"a.bin": b"alpha" * 100, "sub/b.txt": b"bravo\n", "sub/deeper/c.dat": b"\x00\x01\x02charlie"}


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage("file://" + str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"{bucket}/stages/x-12345678")


@pytest.fixture
def committed(storage, tmp_path):
    """An output of three files, uploaded and committed; returns the storage."""
    local = {}
    for key, data in FILES.items():
        path = tmp_path / "src" / key.replace("/", "_")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        local[key] = str(path)
    assert upload_and_commit(storage, local, COMMIT, {"inputs": {"kind": "test"}, "run_id": "r1"}) is True
    return storage


def test_entries_are_size_and_sha256(tmp_path):
    path = tmp_path / "f"
    data = b"x" * (9 << 20) + b"tail"  # more than one read chunk
    path.write_bytes(data)
    expected = FileEntry(len(data), hashlib.sha256(data).hexdigest())
    assert file_entry(str(path)) == expected
    assert bytes_entry(data) == expected
    assert bytes_entry(b"") == FileEntry(0, hashlib.sha256(b"").hexdigest())


def test_upload_and_commit_then_verify(committed):
    storage = committed
    assert verify_commit(storage, COMMIT) == []
    assert verify_commit(storage, COMMIT, deep=True) == []
    for key, data in FILES.items():
        assert storage.read_bytes(key) == data
    commit = read_commit(storage, COMMIT)
    assert commit["inputs"] == {"kind": "test"} and commit["run_id"] == "r1"
    assert isinstance(commit["committed_at"], float)
    assert commit_entries(commit) == {key: bytes_entry(data) for key, data in FILES.items()}
    assert set(commit["files"]) == set(FILES)


def test_commit_is_create_only(committed):
    storage = committed
    before = storage.read_bytes(COMMIT)
    assert write_commit(storage, COMMIT, {}, {"inputs": {"kind": "other"}}) is False
    assert storage.read_bytes(COMMIT) == before
    # and a second upload_and_commit neither replaces the commit nor reports success
    assert upload_and_commit(storage, {}, COMMIT, {}) is False
    assert storage.read_bytes(COMMIT) == before
    assert verify_commit(storage, COMMIT, deep=True) == []


def test_deleted_file_is_a_problem(committed):
    committed.delete("sub/b.txt")
    assert verify_commit(committed, COMMIT) == ["sub/b.txt: missing"]


def test_truncated_file_is_a_problem(committed):
    committed.write_bytes("a.bin", FILES["a.bin"][:-1])
    problems = verify_commit(committed, COMMIT)
    assert problems == [f"a.bin: {len(FILES['a.bin']) - 1} bytes, commit says {len(FILES['a.bin'])}"]


def test_flipped_byte_is_caught_only_by_deep_verify(committed):
    data = bytearray(FILES["sub/deeper/c.dat"])
    data[4] ^= 0xFF
    committed.write_bytes("sub/deeper/c.dat", bytes(data))
    assert verify_commit(committed, COMMIT) == []  # same size: the cheap check cannot see it
    assert verify_commit(committed, COMMIT, deep=True) == ["sub/deeper/c.dat: checksum differs from the commit"]


def test_several_problems_are_all_reported(committed):
    committed.delete("a.bin")
    committed.write_bytes("sub/b.txt", b"")
    problems = sorted(verify_commit(committed, COMMIT))
    assert problems == ["a.bin: missing", "sub/b.txt: 0 bytes, commit says 6"]


def test_commit_of_many_files_verifies_and_reports_each_problem(storage):
    # More files than verify_commit checks one by one: it lists directories instead.
    files = {f"data/shard-{i:05d}.bin": bytes([i]) * (i + 1) for i in range(10)}
    files.update({"manifest.json": b"{}", "tokenizer/vocab.json": b'{"a": 0}'})
    for key, data in files.items():
        storage.write_bytes(key, data)
    assert write_commit(storage, COMMIT, {k: bytes_entry(v) for k, v in files.items()}, {})
    storage.write_bytes("data/shard-99999.bin.unlisted", b"junk")
    assert verify_commit(storage, COMMIT, deep=True) == []

    storage.delete("tokenizer/vocab.json")
    storage.write_bytes("data/shard-00003.bin", b"\x03")
    storage.write_bytes("data/shard-00007.bin", b"\xff" * 8)  # same size, other bytes
    assert sorted(verify_commit(storage, COMMIT)) == [
        "data/shard-00003.bin: 1 bytes, commit says 4", "tokenizer/vocab.json: missing"]
    assert sorted(verify_commit(storage, COMMIT, deep=True)) == [
        "data/shard-00003.bin: 1 bytes, commit says 4",
        "data/shard-00007.bin: checksum differs from the commit",
        "tokenizer/vocab.json: missing"]


def test_extra_files_do_not_break_a_commit(committed):
    committed.write_bytes("sub/unlisted.tmp", b"junk")
    assert verify_commit(committed, COMMIT, deep=True) == []


def test_missing_commit_is_one_problem(storage):
    storage.write_bytes("a.bin", b"data")
    assert read_commit(storage, COMMIT) is None
    problems = verify_commit(storage, COMMIT)
    assert problems == [f"no readable commit at {storage.url(COMMIT)}"]


GARBAGE = [b"", b"not json at all", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'"a string"', b"{}",
           b'{"files": [1, 2]}', b'{"files": null}', b'{"committed_at": 1}']


def test_garbage_commit_reads_as_none_and_does_not_verify(storage):
    for garbage in GARBAGE if storage.uri.startswith("file://") else GARBAGE[1:4]:  # S3 round trips are slow
        storage.write_bytes(COMMIT, garbage)
        assert read_commit(storage, COMMIT) is None, garbage
        assert verify_commit(storage, COMMIT) == [f"no readable commit at {storage.url(COMMIT)}"], garbage


@pytest.mark.parametrize("files", [{"a.bin": 5}, {"a.bin": {"size": 5}}, {"a.bin": "x"}])
def test_commit_with_malformed_entries_is_a_problem_not_a_crash(tmp_path, files):
    storage = open_storage("file://" + str(tmp_path))
    storage.write_bytes("a.bin", b"12345")
    storage.write_bytes(COMMIT, json.dumps({"files": files}).encode())
    assert verify_commit(storage, COMMIT) == [f"no readable commit at {storage.url(COMMIT)}"]  # today: raises
    assert read_commit(storage, COMMIT) is None


def test_empty_commit_verifies(storage):
    assert write_commit(storage, COMMIT, {}, {}) is True
    assert verify_commit(storage, COMMIT, deep=True) == []
    assert read_commit(storage, COMMIT)["files"] == {}


def test_commit_under_a_sub_storage_uses_relative_keys(storage):
    out = storage.sub("stages/tok-abcdef12")
    out.write_bytes("vocab.json", b"{}")
    assert write_commit(out, COMMIT, {"vocab.json": bytes_entry(b"{}")}, {})
    assert storage.exists("stages/tok-abcdef12/_COMMIT.json")
    assert verify_commit(out, COMMIT, deep=True) == []
    assert verify_commit(storage, "stages/tok-abcdef12/_COMMIT.json") == ["vocab.json: missing"]
