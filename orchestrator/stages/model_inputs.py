"""Where a stage finds a model it reads (finetune's `init`, evaluate's `models`): always a Hugging
Face directory in storage, so that workers on any node can fetch it.

- a training stage: its final export, `<stage dir>/hf/`, as is;
- a training stage at a step: that committed checkpoint, exported by a Ray task (consolidating
  ZeRO shards needs the whole model in memory, which the driver may not have) into this stage's
  output;
- {path: DIR}: the local directory, uploaded into this stage's output.
"""

from __future__ import annotations

import os
import tempfile

import ray

from jobs.checkpoint import step_key
from jobs.commit import FileEntry, file_entry
from jobs.export import export_checkpoint
from jobs.storage import Storage, open_storage
from orchestrator.spec import LocalPath


def resolve_model(out: Storage, ref, stage_uri: str | None, step: int | None, prefix: str) -> tuple[str, dict[str, FileEntry]]:
    """(URI of the model's Hugging Face directory, the files written under `out`/`prefix` for it)."""
    if isinstance(ref, LocalPath):
        return out.url(prefix), upload_dir(out, ref.path, prefix)
    if step is None:
        return open_storage(stage_uri).url("hf"), {}
    step_uri = open_storage(stage_uri).sub(f"ckpt/{step_key(step)}").uri
    return out.url(prefix), ray.get(_export_checkpoint.remote(step_uri, out.uri, prefix))


def upload_dir(out: Storage, local_dir: str, prefix: str) -> dict[str, FileEntry]:
    """Upload a directory under `prefix`; its files' commit entries, keyed as in `out`."""
    keys = out.upload_dir(local_dir, prefix)
    return {k: file_entry(os.path.join(local_dir, k.removeprefix(prefix + "/"))) for k in keys}


@ray.remote(num_cpus=1)
def _export_checkpoint(step_uri: str, out_uri: str, prefix: str) -> dict[str, FileEntry]:
    with tempfile.TemporaryDirectory(prefix="orchestrator-export-") as tmp:
        export_checkpoint(open_storage(step_uri), tmp)
        return upload_dir(open_storage(out_uri), tmp, prefix)
