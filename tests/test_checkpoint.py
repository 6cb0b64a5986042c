"""Unit tests of training checkpoints in storage (jobs/checkpoint.py), on local disk: which steps
count as committed, what each rank downloads to resume, retention, and the writer's
upload-then-commit protocol across ranks. No Ray, no DeepSpeed: a fake engine writes the files."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

import jobs.checkpoint as checkpoint
from jobs.checkpoint import (COMMIT, CheckpointWriter, apply_retention, committed_steps, discard_after,
                             fetch_for_rank, step_key)

from jobs.commit import bytes_entry, read_commit, write_commit
from jobs.storage import open_storage
from jobs.storage_local import LocalStorage

MODEL = "mp_rank_00_model_states.pt"


def _zero(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


# Rank 10's file is there so that a prefix match (`zero_pp_rank_1` in `zero_pp_rank_10_`) shows.
FILES = {
    MODEL: b"model weights " * 40,
    _zero(0): b"rank 0 optimizer " * 30,
    _zero(1): b"rank 1 optimizer " * 31,
    _zero(10): b"rank 10 optimizer " * 32,
    "hf/config.json": b'{"hidden_size": 64}',
}
SHARED = {MODEL, "hf/config.json"}


@pytest.fixture
def ckpt(tmp_path):
    return open_storage("file://" + str(tmp_path / "store" / "ckpt"))


def _commit_step(ckpt, step: int, files: dict[str, bytes] = FILES, **meta) -> None:
    """A committed checkpoint as the writer leaves it: files first, then COMMIT.json listing them."""
    step_dir = ckpt.sub(step_key(step))
    for name, data in files.items():
        step_dir.write_bytes(name, data)
    assert write_commit(step_dir, COMMIT, {n: bytes_entry(d) for n, d in files.items()}, {"step": step, **meta})


def _path(ckpt, step: int, name: str) -> str:
    return os.path.join(ckpt.root, step_key(step), *name.split("/"))


def _flip_a_byte(path: str, at: int = 5) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def _keys(storage) -> set[str]:
    return {o.key for o in storage.list()}


# --- committed_steps ------------------------------------------------------------------------

def test_step_key_is_zero_padded_to_eight_digits():
    assert step_key(7) == "step-00000007"
    assert step_key(12345678) == "step-12345678"


def test_committed_steps_of_an_empty_or_missing_directory(ckpt):
    assert committed_steps(ckpt) == ([], [])


def test_committed_steps_newest_first_and_the_rest_ignored_with_a_reason(ckpt):
    for step in (1, 2, 3, 5):
        _commit_step(ckpt, step)
    # 4: files uploaded but never committed (a crash before COMMIT.json)
    for name, data in FILES.items():
        ckpt.sub(step_key(4)).write_bytes(name, data)
    # 6: committed, then a listed file went missing
    _commit_step(ckpt, 6)
    os.unlink(_path(ckpt, 6, _zero(1)))
    # 7: committed, then a listed file was truncated
    _commit_step(ckpt, 7)
    with open(_path(ckpt, 7, MODEL), "r+b") as f:
        f.truncate(10)
    # a key next to the steps that is no step at all
    ckpt.write_bytes("notes.txt", b"not a checkpoint")

    good, ignored = committed_steps(ckpt)

    assert good == [5, 3, 2, 1]
    assert len(ignored) == 3, ignored
    seven, six, four = ignored  # newest first, like the good ones
    assert seven.startswith("step-00000007: ") and MODEL in seven
    assert f"10 bytes, commit says {len(FILES[MODEL])}" in seven
    assert six.startswith("step-00000006: ") and _zero(1) in six and "missing" in six
    assert four.startswith("step-00000004: ") and "no readable commit" in four


def test_a_flipped_byte_passes_the_cheap_size_check(ckpt):
    """committed_steps checks sizes only; the checksum is fetch_for_rank's job (below)."""
    _commit_step(ckpt, 3)
    _flip_a_byte(_path(ckpt, 3, MODEL))
    assert committed_steps(ckpt) == ([3], [])


# --- fetch_for_rank -------------------------------------------------------------------------

def _fetched_files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root).replace(os.sep, "/")] = open(path, "rb").read()
    return out


@pytest.mark.parametrize("rank", [0, 1, 10])
def test_fetch_for_rank_downloads_only_its_zero_files_and_the_shared_ones(ckpt, tmp_path, rank):
    _commit_step(ckpt, 3, data_position=96)
    fetched = fetch_for_rank(ckpt, 3, rank, str(tmp_path / "local"))
    assert fetched is not None
    root, commit = fetched
    assert commit["step"] == 3 and commit["data_position"] == 96
    assert set(commit["files"]) == set(FILES)
    wanted = SHARED | {_zero(rank)}
    # the layout DeepSpeed's load_checkpoint(root, tag=step_key(step)) reads
    assert _fetched_files(root) == {f"{step_key(3)}/{name}": FILES[name] for name in wanted}
    for name in wanted:
        assert os.path.isfile(os.path.join(root, step_key(3), *name.split("/")))


def test_fetch_for_rank_clears_what_an_earlier_fetch_left(ckpt, tmp_path):
    _commit_step(ckpt, 3)
    _commit_step(ckpt, 5)
    local = str(tmp_path / "local")
    first, _ = fetch_for_rank(ckpt, 5, 0, local)
    second, _ = fetch_for_rank(ckpt, 3, 0, local)
    assert first == second
    assert {k.split("/")[0] for k in _fetched_files(second)} == {step_key(3)}


def test_fetch_for_rank_rejects_a_flipped_byte_of_a_file_it_needs(ckpt, tmp_path):
    _commit_step(ckpt, 3)
    _flip_a_byte(_path(ckpt, 3, _zero(1)))
    assert os.path.getsize(_path(ckpt, 3, _zero(1))) == len(FILES[_zero(1)])
    assert fetch_for_rank(ckpt, 3, 1, str(tmp_path / "local")) is None
    # rank 0 does not read rank 1's file: for it the step is fine (the all-reduce in
    # train._resume is what makes every rank skip the step together)
    assert fetch_for_rank(ckpt, 3, 0, str(tmp_path / "local")) is not None


def test_fetch_for_rank_rejects_a_corrupt_shared_file_on_every_rank(ckpt, tmp_path):
    _commit_step(ckpt, 3)
    _flip_a_byte(_path(ckpt, 3, "hf/config.json"), at=2)
    for rank in (0, 1):
        assert fetch_for_rank(ckpt, 3, rank, str(tmp_path / "local")) is None


def test_fetch_for_rank_of_a_missing_file_or_commit_is_none(ckpt, tmp_path):
    _commit_step(ckpt, 3)
    os.unlink(_path(ckpt, 3, MODEL))
    assert fetch_for_rank(ckpt, 3, 0, str(tmp_path / "local")) is None
    for name, data in FILES.items():  # uploaded, never committed
        ckpt.sub(step_key(4)).write_bytes(name, data)
    assert fetch_for_rank(ckpt, 4, 0, str(tmp_path / "local")) is None
    assert fetch_for_rank(ckpt, 99, 0, str(tmp_path / "local")) is None


# --- apply_retention ------------------------------------------------------------------------

class _SpyStorage(LocalStorage):
    """Local storage that checks, at every delete inside a step, that the step no longer looks
    committed unless the delete is of the commit itself."""

    violations: list[str]

    def __init__(self, root: str, violations: list[str] | None = None):
        super().__init__(root)
        self.violations = [] if violations is None else violations

    def sub(self, prefix: str) -> _SpyStorage:
        return _SpyStorage(self._path(prefix), self.violations)

    def delete(self, key: str) -> None:
        step_dir = self.root if os.path.basename(self.root).startswith("step-") else None
        rel = key
        if step_dir is None and key.startswith("step-"):
            step_dir, _, rel = key.partition("/")
            step_dir = os.path.join(self.root, step_dir)
        if step_dir is not None and rel != COMMIT and os.path.exists(os.path.join(step_dir, COMMIT)):
            self.violations.append(f"{key} deleted while {os.path.basename(step_dir)} still has its commit")
        super().delete(key)


def test_retention_keeps_the_newest_and_the_multiples_and_deletes_the_rest(tmp_path):
    ckpt = _SpyStorage(str(tmp_path / "ckpt"))
    for step in range(10, 101, 10):
        _commit_step(ckpt, step)

    doomed = apply_retention(ckpt, keep_last=2, keep_every=30)

    assert doomed == [80, 70, 50, 40, 20, 10]
    assert committed_steps(ckpt) == ([100, 90, 60, 30], [])
    # every file of a deleted step is gone, and so is its directory
    assert {k.split("/")[0] for k in _keys(ckpt)} == {step_key(s) for s in (100, 90, 60, 30)}
    assert sorted(os.listdir(ckpt.root)) == sorted(step_key(s) for s in (30, 60, 90, 100))
    # the kept ones are whole
    for step in (100, 90, 60, 30):
        assert fetch_for_rank(ckpt, step, 1, str(tmp_path / "local")) is not None
    assert ckpt.violations == []


def test_retention_without_keep_every_and_when_nothing_is_beyond_keep_last(tmp_path):
    ckpt = _SpyStorage(str(tmp_path / "ckpt"))
    for step in (1, 2, 3):
        _commit_step(ckpt, step)
    assert apply_retention(ckpt, keep_last=5, keep_every=0) == []
    assert committed_steps(ckpt)[0] == [3, 2, 1]
    assert apply_retention(ckpt, keep_last=1, keep_every=0) == [2, 1]
    assert committed_steps(ckpt) == ([3], [])
    assert ckpt.violations == []


def test_retention_leaves_uncommitted_steps_alone(tmp_path):
    """A step without a commit may be one whose upload is still in flight on another rank."""
    ckpt = _SpyStorage(str(tmp_path / "ckpt"))
    for step in (1, 2, 3):
        _commit_step(ckpt, step)
    ckpt.sub(step_key(4)).write_bytes(_zero(1), b"in flight")
    assert apply_retention(ckpt, keep_last=1, keep_every=0) == [2, 1]
    assert ckpt.sub(step_key(4)).read_bytes(_zero(1)) == b"in flight"


def test_a_step_being_deleted_never_looks_committed(tmp_path, monkeypatch):
    """Stop retention after its first delete of a step's data file: the step must not verify."""
    ckpt = _SpyStorage(str(tmp_path / "ckpt"))
    for step in (1, 2):
        _commit_step(ckpt, step)

    class Crash(Exception):
        pass

    deleted: list[str] = []
    real_delete = LocalStorage.delete

    def delete_then_crash(self, key):
        real_delete(self, key)
        deleted.append(key)
        if not key.endswith(COMMIT):
            raise Crash(key)

    monkeypatch.setattr(LocalStorage, "delete", delete_then_crash)
    with pytest.raises(Crash):
        apply_retention(ckpt, keep_last=1, keep_every=0)
    monkeypatch.undo()
    assert deleted[0] == COMMIT and len(deleted) == 2  # the commit, then one data file
    good, ignored = committed_steps(ckpt)
    assert good == [2]
    assert len(ignored) == 1 and ignored[0].startswith("step-00000001: no readable commit")


# --- CheckpointWriter -----------------------------------------------------------------------

class FakeEngine:
    """Writes what a DeepSpeed engine would: its rank's ZeRO file, and the model file on rank 0."""

    def __init__(self, rank: int, version: str = "a"):
        self.rank, self.version = rank, version
        self.calls: list[tuple] = []
        self.crc32_while_saving: list[bool] = []

    def contents(self, step: int) -> dict[str, bytes]:
        files = {_zero(self.rank): f"optimizer of rank {self.rank} at step {step} ({self.version})\n".encode() * 20}
        if self.rank == 0:
            files[MODEL] = f"model at step {step} ({self.version})\n".encode() * 50
        return files

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append((save_dir, tag, client_state, save_latest))
        self.crc32_while_saving.append(torch.serialization.get_crc32_options())
        directory = os.path.join(save_dir, tag)
        os.makedirs(directory, exist_ok=True)
        step = client_state["step"]
        for name, data in self.contents(step).items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)


@pytest.fixture
def extras(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"hidden_size": 64}')
    return {"hf/config.json": str(path)}


META = {"data_position": 40, "seed": 0, "config_hash": "abc", "world_size": 2, "zero_stage": 2}


def _writers(ckpt, tmp_path, world_size=2, keep_last=2, keep_every=0):
    return [CheckpointWriter(ckpt, r, world_size, str(tmp_path / "local"), keep_last, keep_every)
            for r in range(world_size)]


@pytest.mark.parametrize("first", [1, 0])
def test_writer_commits_a_step_once_every_rank_uploaded(ckpt, tmp_path, extras, first):
    writers = _writers(ckpt, tmp_path)
    engines = [FakeEngine(0), FakeEngine(1)]
    second = 1 - first
    writers[first].save(engines[first], 5, {"step": 5}, META, extras if first == 0 else {})
    writers[second].save(engines[second], 5, {"step": 5}, META, extras if second == 0 else {})
    for w in writers:
        w.wait()

    assert committed_steps(ckpt) == ([5], [])
    commit = read_commit(ckpt.sub(step_key(5)), COMMIT)
    expected = {**engines[0].contents(5), **engines[1].contents(5), "hf/config.json": b'{"hidden_size": 64}'}
    assert commit["files"] == {n: {"size": len(d), "sha256": bytes_entry(d).sha256} for n, d in expected.items()}
    assert commit["step"] == 5
    for key, value in META.items():
        assert commit[key] == value
    for name, data in expected.items():
        assert ckpt.sub(step_key(5)).read_bytes(name) == data
    # each engine saved once, to a rank-local directory, under the step's tag, without `latest`
    for rank, engine in enumerate(engines):
        [(save_dir, tag, client_state, save_latest)] = engine.calls
        assert tag == step_key(5) and client_state == {"step": 5} and save_latest is False
        assert save_dir == str(tmp_path / "local" / f"rank-{rank}")
        assert not os.path.exists(os.path.join(save_dir, tag))  # the local copy is removed once uploaded
        assert engine.crc32_while_saving == [False]  # the commit's sha256 guards the files instead
    assert torch.serialization.get_crc32_options() is True  # and torch.save's default is back
    # and every rank can resume from it
    for rank in (0, 1):
        root, _ = fetch_for_rank(ckpt, 5, rank, str(tmp_path / "resume"))
        assert _fetched_files(root) == {f"{step_key(5)}/{n}": d for n, d in expected.items()
                                        if n in SHARED or n == _zero(rank)}


def test_writer_applies_retention_after_each_commit(ckpt, tmp_path, extras):
    [writer] = _writers(ckpt, tmp_path, world_size=1, keep_last=1, keep_every=2)
    engine = FakeEngine(0)
    for step in (1, 2, 3, 4, 5):
        writer.save(engine, step, {"step": step}, {"world_size": 1}, extras)
    writer.wait()
    assert committed_steps(ckpt) == ([5, 4, 2], [])
    assert {k.split("/")[0] for k in _keys(ckpt)} == {step_key(s) for s in (5, 4, 2)}


def test_without_every_rank_no_commit_appears_and_wait_raises(ckpt, tmp_path, extras, monkeypatch):
    monkeypatch.setattr(checkpoint, "_MARKER_WAIT_S", 0.5)
    rank0, _ = _writers(ckpt, tmp_path)
    rank0.save(FakeEngine(0), 5, {"step": 5}, META, extras)  # rank 1 never saves
    with pytest.raises(RuntimeError, match="checkpoint upload failed") as info:
        rank0.wait()
    assert isinstance(info.value.__cause__, TimeoutError)
    assert "not every rank uploaded its part" in str(info.value.__cause__)
    assert not ckpt.sub(step_key(5)).exists(COMMIT)
    assert committed_steps(ckpt)[0] == []
    rank0.wait()  # the failure is reported once


class _FailingUploads(LocalStorage):
    def sub(self, prefix: str) -> _FailingUploads:
        return _FailingUploads(self._path(prefix))

    def upload_file(self, local_path, key: str) -> None:
        raise OSError(28, "No space left on device")


def test_a_failing_upload_surfaces_from_wait(tmp_path, extras):
    ckpt = _FailingUploads(str(tmp_path / "ckpt"))
    [writer] = _writers(ckpt, tmp_path, world_size=1)
    writer.save(FakeEngine(0), 1, {"step": 1}, {}, extras)
    with pytest.raises(RuntimeError, match="checkpoint upload failed") as info:
        writer.wait()
    assert isinstance(info.value.__cause__, OSError) and "No space left" in str(info.value.__cause__)
    assert committed_steps(ckpt)[0] == []
    # the local copy is gone all the same: nothing retries from it
    assert os.listdir(tmp_path / "local" / "rank-0") == []


def test_a_failing_upload_surfaces_from_the_next_save_before_it_saves(tmp_path, extras):
    ckpt = _FailingUploads(str(tmp_path / "ckpt"))
    [writer] = _writers(ckpt, tmp_path, world_size=1)
    engine = FakeEngine(0)
    writer.save(engine, 1, {"step": 1}, {}, extras)
    with pytest.raises(RuntimeError, match="checkpoint upload failed"):
        writer.save(engine, 2, {"step": 2}, {}, extras)
    assert [call[1] for call in engine.calls] == [step_key(1)]
    assert committed_steps(ckpt)[0] == []


def test_save_blocks_until_the_previous_upload_is_done(ckpt, tmp_path, extras, monkeypatch):
    """At most one upload in flight: save N+1 starts only after upload N has finished."""
    [writer] = _writers(ckpt, tmp_path, world_size=1)
    gate = threading.Event()
    started: list[str] = []
    real_upload = LocalStorage.upload_file

    def slow_upload(self, local_path, key):
        started.append(os.path.basename(self.root) + "/" + key)
        gate.wait(5)
        real_upload(self, local_path, key)

    monkeypatch.setattr(LocalStorage, "upload_file", slow_upload)
    engine = FakeEngine(0)
    writer.save(engine, 1, {"step": 1}, {}, extras)
    second = threading.Thread(target=writer.save, args=(engine, 2, {"step": 2}, {}, extras))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waiting for step 1's upload
    assert len(engine.calls) == 1
    gate.set()
    second.join(5)
    writer.wait()
    assert [c[1] for c in engine.calls] == [step_key(1), step_key(2)]
    assert committed_steps(ckpt)[0] == [2, 1]


# --- re-saving a step after a resume from an earlier one ------------------------------------
# A resume skips a step whose files are missing or corrupt and restarts from an earlier one, so
# training reaches that step again and saves it again, into the same directory.

def test_a_step_saved_again_after_a_resume_is_usable(ckpt, tmp_path, extras):
    [first] = _writers(ckpt, tmp_path, world_size=1)
    first.save(FakeEngine(0, "attempt-1"), 2, {"step": 2}, {}, extras)
    first.wait()
    os.unlink(_path(ckpt, 2, MODEL))  # lost: the resume skips step 2 and restarts from scratch
    assert committed_steps(ckpt)[0] == []
    assert discard_after(ckpt, 0) == [2]  # what the resume does before training goes on

    [again] = _writers(ckpt, tmp_path, world_size=1)
    engine = FakeEngine(0, "attempt-2")
    again.save(engine, 2, {"step": 2}, {}, extras)
    again.wait()
    assert committed_steps(ckpt)[0] == [2]
    fetched = fetch_for_rank(ckpt, 2, 0, str(tmp_path / "resume"))
    assert fetched is not None
    assert _fetched_files(fetched[0])[f"{step_key(2)}/{MODEL}"] == engine.contents(2)[MODEL]


def test_a_marker_left_by_an_earlier_attempt_is_not_committed(ckpt, tmp_path, extras):
    # attempt 1 died after rank 1 uploaded its part of step 2 and before rank 0 committed
    stale = FakeEngine(1, "attempt-1")
    step_dir = ckpt.sub(step_key(2))
    for name, data in stale.contents(2).items():
        step_dir.write_bytes(name, data)
    step_dir.write_bytes("_ranks/rank-00001.json", json.dumps(
        {n: {"size": len(d), "sha256": bytes_entry(d).sha256} for n, d in stale.contents(2).items()}).encode())

    # attempt 2 resumed from scratch (discarding what it will write again) and reaches step 2;
    # rank 0 happens to finish first
    assert discard_after(ckpt, 0) == [2]
    rank0, rank1 = _writers(ckpt, tmp_path)
    rank0.save(FakeEngine(0, "attempt-2"), 2, {"step": 2}, META, extras)
    engine1 = FakeEngine(1, "attempt-2")
    rank1.save(engine1, 2, {"step": 2}, META, {})
    rank1.wait()
    rank0.wait()

    fetched = fetch_for_rank(ckpt, 2, 1, str(tmp_path / "resume"))
    assert fetched is not None
    assert _fetched_files(fetched[0])[f"{step_key(2)}/{_zero(1)}"] == engine1.contents(2)[_zero(1)]
