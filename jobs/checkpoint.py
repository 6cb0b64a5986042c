"""Training checkpoints in storage, committed: `ckpt/step-<N:08d>/...` + `COMMIT.json`.

Saving (every rank): DeepSpeed writes this rank's files to a rank-local directory, then a
background thread uploads them (then deletes them, uploaded or not) and leaves a marker
`_ranks/rank-<r>.json` listing them; rank 0's thread waits for every rank's marker, then writes
`COMMIT.json` (all files with sizes and checksums, the step, the data position, the config hash)
create-only, and applies retention.
Training goes on while that happens; at most one upload is in flight (the next save waits).

Resuming: rank 0 lists the steps whose commits verify (sizes), newest first; for each
candidate every rank downloads the files it needs and checks their checksums, and all ranks
agree (an all-reduce) before loading, so a torn or corrupted checkpoint is skipped by every
rank alike and the previous one is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from jobs.commit import FileEntry, file_entry, read_commit, verify_commit, write_commit
from jobs.storage import Storage

log = logging.getLogger(__name__)

COMMIT = "COMMIT.json"
_STEP_DIR = re.compile(r"step-(\d{8})")
_MARKER_WAIT_S = 1800.0


def step_key(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointWriter:
    """Saves and uploads this rank's part of each checkpoint without blocking training for long."""

    def __init__(self, ckpt: Storage, rank: int, world_size: int, local_dir: str, keep_last: int, keep_every: int):
        self.ckpt, self.rank, self.world_size = ckpt, rank, world_size
        self.local_dir = os.path.join(local_dir, f"rank-{rank}")
        self.keep_last, self.keep_every = keep_last, keep_every
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, engine, step: int, client_state: dict, meta: dict, extra_files: dict[str, str]) -> None:
        """Collective: every rank calls it at the same step. `extra_files` (name -> local path)
        are added by rank 0, e.g. the model config and the tokenizer, so a checkpoint exports alone.

        DeepSpeed writes this rank's files under `local_dir` (the part that blocks training), with
        torch.save's zip CRC32 turned off: see `_without_zip_crc32`."""
        self.wait()
        tag = step_key(step)
        staged = os.path.join(self.local_dir, tag)
        shutil.rmtree(staged, ignore_errors=True)
        with _without_zip_crc32():
            engine.save_checkpoint(self.local_dir, tag=tag, client_state=client_state, save_latest=False)
        files = _local_files(staged)
        if self.rank == 0:
            files.update(extra_files)
        self._upload = threading.Thread(target=self._upload_and_commit, args=(step, files, meta, staged),
                                        name=f"checkpoint-upload-{step}", daemon=True)
        self._upload.start()

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done; re-raise its failure."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("checkpoint upload failed") from error

    def _upload_and_commit(self, step: int, files: dict[str, str], meta: dict, staged: str) -> None:
        """Upload `files`, leave this rank's marker, delete `staged` (what save() wrote); on rank 0,
        then commit and apply retention."""
        try:
            step_dir = self.ckpt.sub(step_key(step))
            entries = {}
            try:
                # Hash each file while it uploads (the second read comes from the page cache).
                with ThreadPoolExecutor(max_workers=1) as uploader:
                    for name, path in sorted(files.items()):
                        upload = uploader.submit(step_dir.upload_file, path, name)
                        entries[name] = file_entry(path)
                        upload.result()
            finally:
                # Failed too: nothing retries from these files (the next save writes its own).
                shutil.rmtree(staged, ignore_errors=True)
            marker = {name: {"size": e.size, "sha256": e.sha256} for name, e in entries.items()}
            step_dir.write_bytes(f"_ranks/rank-{self.rank:05d}.json", json.dumps(marker).encode())
            if self.rank == 0:
                self._commit(step_dir, step, meta)
                apply_retention(self.ckpt, self.keep_last, self.keep_every)
        except BaseException as e:  # surfaced to the training thread by wait()
            self._error = e

    def _commit(self, step_dir: Storage, step: int, meta: dict) -> None:
        deadline = time.monotonic() + _MARKER_WAIT_S
        markers = [f"_ranks/rank-{r:05d}.json" for r in range(self.world_size)]
        while not all(step_dir.exists(m) for m in markers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{step_dir.uri}: not every rank uploaded its part")
            time.sleep(0.2)
        entries: dict[str, FileEntry] = {}
        for m in markers:
            for name, e in json.loads(step_dir.read_bytes(m)).items():
                entries[name] = FileEntry(e["size"], e["sha256"])
        if not write_commit(step_dir, COMMIT, entries, {"step": step, **meta}):
            raise RuntimeError(f"{step_dir.url(COMMIT)} exists already: an earlier attempt's step was not discarded")


@contextlib.contextmanager
def _without_zip_crc32():
    """torch.save without the CRC32 of every zip record: it took about half of a save's time (a
    DeepSpeed save of 220 MB on 2 cores: 0.15 s with it, 0.09 s without), and the commit's sha256
    of every file, checked on every download, guards the content already: torch.load ignores the
    CRC (a flipped byte loads silently with or without it)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _local_files(directory: str) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), directory): os.path.join(d, f)
            for d, _, names in os.walk(directory) for f in names}


def committed_steps(ckpt: Storage) -> tuple[list[int], list[str]]:
    """Steps whose commit verifies, newest first, and a note for each step that is ignored."""
    steps = sorted({int(m.group(1)) for o in ckpt.list("step-") if (m := _STEP_DIR.match(o.key))}, reverse=True)
    good, ignored = [], []
    for step in steps:
        problems = verify_commit(ckpt.sub(step_key(step)), COMMIT)
        if problems:
            ignored.append(f"{step_key(step)}: {problems[0]}")
        else:
            good.append(step)
    return good, ignored


def fetch_for_rank(ckpt: Storage, step: int, rank: int, local_dir: str) -> tuple[str, dict] | None:
    """Download what `rank` needs of a committed step and check every checksum.

    Returns (local directory holding the DeepSpeed tag, the commit), or None when a file is
    missing or corrupt. ZeRO files of other ranks are not fetched.
    """
    step_dir = ckpt.sub(step_key(step))
    commit = read_commit(step_dir, COMMIT)
    if commit is None:
        return None
    root = os.path.join(local_dir, f"resume-rank-{rank}")
    shutil.rmtree(root, ignore_errors=True)
    for name, entry in commit["files"].items():
        if not _needed_by(name, rank):
            continue
        local = os.path.join(root, step_key(step), name)
        try:
            step_dir.download_file(name, local)
        except FileNotFoundError:
            return None
        if file_entry(local).sha256 != entry["sha256"]:
            log.warning("%s/%s: checksum differs from the commit", step_dir.uri, name)
            return None
    return root, commit


def _needed_by(name: str, rank: int) -> bool:
    match = re.search(r"zero_pp_rank_(\d+)_", name)
    return match is None or int(match.group(1)) == rank


def discard_after(ckpt: Storage, step: int) -> list[int]:
    """Delete every checkpoint directory past `step` and every uncommitted one: what a resumed run
    will write again. Left in place, an old commit (create-only) or an earlier attempt's rank
    markers would be mistaken for the new attempt's."""
    steps = sorted({int(m.group(1)) for o in ckpt.list("step-") if (m := _STEP_DIR.match(o.key))})
    committed, _ = committed_steps(ckpt)
    doomed = [s for s in steps if s > step or s not in committed]
    for doomed_step in doomed:
        ckpt.sub(step_key(doomed_step)).delete(COMMIT)
        ckpt.delete_prefix(step_key(doomed_step) + "/")
    return doomed


def apply_retention(ckpt: Storage, keep_last: int, keep_every: int) -> list[int]:
    """Delete committed steps beyond the newest `keep_last`, except multiples of `keep_every`."""
    steps, _ = committed_steps(ckpt)
    doomed = [s for s in steps[keep_last:] if not (keep_every and s % keep_every == 0)]
    for step in doomed:
        # The commit goes first: a half-deleted checkpoint must never look committed.
        ckpt.sub(step_key(step)).delete(COMMIT)
        ckpt.delete_prefix(step_key(step) + "/")
    return doomed
