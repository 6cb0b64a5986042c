"""`orchestrator du`: what a storage root holds, per stage output and per pipeline.

A stage output is content-addressed, so two pipelines (or many runs of one) can share it: an output
is listed once, with the pipelines whose run records use it, and counts in each of those
pipelines' totals; the grand total counts every object once. Sizes come from one listing of the
root (file:// or s3://) plus the run records, which say which pipeline uses what.
"""

from __future__ import annotations

import re

from jobs.storage import Storage
from orchestrator.gc import RUN_DIR, STAGE_DIR, human_bytes, read_records, stage_dir

_OWNED = re.compile(r"(?:aliases|schedules)/([^/]+)/")  # keyed by the pipeline's name


def usage_lines(storage: Storage) -> list[str]:
    """Stage outputs (with their checkpoints' share), then pipelines, largest first, then the total."""
    objects = storage.list("")
    records = read_records(storage, [o.key for o in objects])
    run_pipeline = {r.run_id: r.pipeline for r in records}
    outputs: dict[str, list[int]] = {}  # stage dir -> [bytes, of which checkpoints]
    pipeline_bytes: dict[str, int] = {}
    other = 0
    for o in objects:
        run = m.group(1) if (m := RUN_DIR.match(o.key)) else None
        if m := STAGE_DIR.match(o.key):
            sizes = outputs.setdefault(m.group(1), [0, 0])
            sizes[0] += o.size
            sizes[1] += o.size if o.key.startswith(f"{m.group(1)}/ckpt/") else 0
        elif run in run_pipeline or (m := _OWNED.match(o.key)):
            pipeline = run_pipeline[run] if run in run_pipeline else m.group(1)
            pipeline_bytes[pipeline] = pipeline_bytes.get(pipeline, 0) + o.size
        else:
            other += o.size
    users: dict[str, set[str]] = {}
    for r in records:
        for s in r.stages.values():
            users.setdefault(stage_dir(s.output_uri), set()).add(r.pipeline)
    for d, (num_bytes, _) in outputs.items():
        for pipeline in users.get(d, ()):
            pipeline_bytes[pipeline] = pipeline_bytes.get(pipeline, 0) + num_bytes

    lines = [f"stage outputs in {storage.uri}, largest first"]
    for d, (num_bytes, ckpt) in sorted(outputs.items(), key=lambda kv: (-kv[1][0], kv[0])):
        checkpoints = f"checkpoints {human_bytes(ckpt)}" if ckpt else ""
        used_by = ", ".join(sorted(users.get(d, ()))) or "no run record"
        lines.append(f"  {human_bytes(num_bytes):>10}  {d + '/':<40} {checkpoints:<22}  used by: {used_by}")
    lines.append("pipelines, largest first (stage outputs their runs use, run directories, aliases, schedules; "
                 "a shared output counts in each)")
    for pipeline, num_bytes in sorted(pipeline_bytes.items(), key=lambda kv: (-kv[1], kv[0])):
        num_runs = sum(1 for p in run_pipeline.values() if p == pipeline)
        lines.append(f"  {human_bytes(num_bytes):>10}  {pipeline} ({num_runs} runs)")
    if other:
        lines.append(f"  {human_bytes(other):>10}  other: outside stage outputs, recorded runs, aliases and schedules")
    lines.append(f"total {human_bytes(sum(o.size for o in objects))} in {len(objects)} objects")
    return lines
