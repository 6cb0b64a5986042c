"""The preprocess stage: the driver shards the corpus and runs the two passes of
`jobs.preprocess` as Ray tasks, deciding global dedup between them.

Exactly once: a shard's scan is one atomic object and its encoded output has its own commit, so
a rerun (same run id, or after a crash) launches tasks only for shards without them; a task that
Ray retries after a worker died rewrites the same names with the same bytes. The stage's files
are exactly those the shard commits list, plus the manifest and the quarantine file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter

import numpy as np
import ray

from jobs.commit import bytes_entry, commit_entries, file_entry, read_commit, verify_commit
from jobs.preprocess import encode_shard, load_scan, scan_key, scan_shard, shard_commit_key, token_dtype
from jobs.sources import BadRecord, Shard, ShardReader, list_source_files, plan_shards
from jobs.storage import open_storage
from jobs.tokenizer import adopt_tokenizer
from orchestrator.errors import UserError
from orchestrator.ray_runtime import run_all
from orchestrator.stages import StageContext, StageOutput

TASK_OPTIONS = {"num_cpus": 1, "max_retries": 3}  # retries cover workers that die (OOM, node loss)
_PEEK_BYTES = 1 << 16


def run(ctx: StageContext) -> StageOutput:
    spec, out = ctx.spec, ctx.out
    files = list_source_files(spec.source)
    _check_text_field(ctx.name, spec, files[0])
    shards = plan_shards(files, spec.source.format, max(int(spec.shard_mb * 1e6), 1))
    tokenizer_files = _stage_tokenizer(ctx)

    scanned = {o.key for o in out.list("scan/")}
    todo = [s for s in shards if scan_key(s.index) not in scanned]
    _run_tasks(ctx, scan_shard, [(s, spec, spec.source.text_field, out) for s in todo], len(shards), "scan")
    scans = [load_scan(out, s.index) for s in shards]
    keep, drops = _global_keep_masks(ctx.name, spec, [keys for keys, _ in scans], [meta for _, meta in scans])

    tokenizer_uri = out.sub("tokenizer").uri
    committed = {o.key for o in out.list("data/")}
    todo = [s for s in shards if shard_commit_key(s.index) not in committed or verify_commit(out, shard_commit_key(s.index))]
    args = [(s, spec, spec.source.text_field, scans[s.index][0], keep[s.index], tokenizer_uri, out) for s in todo]
    _run_tasks(ctx, encode_shard, args, len(shards), "tokenize + pack")

    raw_commits = [out.read_bytes(shard_commit_key(s.index)) for s in shards]  # verified by the encode pass
    commits = [json.loads(raw) for raw in raw_commits]
    info = json.loads(out.read_bytes("tokenizer/info.json"))
    manifest = _manifest(spec, shards, commits, drops, info)
    quarantine = _quarantine_lines(shards, [meta for _, meta in scans])
    out.write_bytes("quarantine.jsonl", quarantine)
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    out.write_bytes("manifest.json", manifest_bytes)

    output_files = dict(tokenizer_files)
    for s, commit, raw in zip(shards, commits, raw_commits):
        output_files.update(commit_entries(commit))
        output_files[shard_commit_key(s.index)] = bytes_entry(raw)
    output_files["quarantine.jsonl"] = bytes_entry(quarantine)
    output_files["manifest.json"] = bytes_entry(manifest_bytes)
    metrics = {k: manifest[k] for k in ("num_records", "num_documents", "num_tokens", "num_sequences",
                                         "num_tokens_dropped", "num_shards", "drops")}
    return StageOutput(output_files, metrics)


def _run_tasks(ctx: StageContext, fn, args: list[tuple], num_shards: int, label: str) -> None:
    remote = ray.remote(**TASK_OPTIONS)(fn)
    ctx.console.line(f"  {label}: {len(args)} of {num_shards} shards to do")
    with ctx.console.progress(len(args), label) as advance:
        run_all([remote.remote(*a) for a in args], advance)


def _check_text_field(name: str, spec, first: object) -> None:
    """Catch a wrong `text_field` from the first records of the first file, before any worker."""
    if spec.source.format == "text":
        return
    peek = Shard(0, first.uri, spec.source.format, 0, min(first.size, _PEEK_BYTES))
    records = []
    for item in ShardReader(peek, spec.source.text_field):
        records.append(item)
        if len(records) >= 100:
            break
    missing = [r for r in records if isinstance(r, BadRecord) and r.reason == "missing_field"]
    if records and len(missing) == len(records):
        raise UserError(
            f"stages.{name}.source.text_field: {missing[0].excerpt} ({first.uri}, line {missing[0].line}); "
            "set text_field to the field that holds the text"
        )


def _stage_tokenizer(ctx: StageContext) -> dict:
    """Copy the tokenizer into the stage (`tokenizer/`): the output is self-contained."""
    with tempfile.TemporaryDirectory(prefix="orchestrator-tokenizer-") as tmp:
        if "tokenizer" in ctx.inputs:
            upstream = open_storage(ctx.inputs["tokenizer"])
            for key in commit_entries(read_commit(upstream, "_COMMIT.json")):
                upstream.download_file(key, os.path.join(tmp, key))
        else:
            try:
                adopt_tokenizer(ctx.spec.tokenizer.path, tmp)
            except ValueError as e:
                raise UserError(f"stages.{ctx.name}.tokenizer.path: {e}") from None
        ctx.out.upload_dir(tmp, "tokenizer")
        return {f"tokenizer/{n}": file_entry(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}


def _global_keep_masks(name: str, spec, keys: list[np.ndarray], metas: list[dict]) -> tuple[list[np.ndarray], Counter]:
    """Exact dedup over the whole corpus: the first occurrence in (shard, position) order wins."""
    drops: Counter = Counter()
    for meta in metas:
        drops.update(meta["drops"])
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    num_records = len(all_keys) + sum(drops.values())
    if num_records and drops.get("missing_field", 0) == num_records:
        raise UserError(f"stages.{name}.source.text_field: {spec.source.text_field!r} is missing in every record")
    keep_all = np.ones(len(all_keys), dtype=bool)
    if spec.dedup and len(all_keys):
        _, first = np.unique(all_keys, return_index=True)
        keep_all[:] = False
        keep_all[first] = True
        drops["duplicate"] = int(len(all_keys) - len(first))
    if not keep_all.any():
        raise UserError(
            f"stages.{name}: no document is left after filtering ({num_records} records read; dropped: "
            f"{dict(drops)}); loosen stages.{name}.filters or check the source"
        )
    bounds = np.cumsum([0] + [len(k) for k in keys])
    return [keep_all[a:b] for a, b in zip(bounds[:-1], bounds[1:])], drops


def _manifest(spec, shards: list[Shard], commits: list[dict], drops: Counter, info: dict) -> dict:
    splits = {}
    for split in ("train", "val"):
        entries = [{"key": c["counts"][split]["key"], "num_sequences": c["counts"][split]["num_sequences"]}
                   for c in commits]
        splits[split] = {"files": entries, "num_sequences": sum(e["num_sequences"] for e in entries)}
    num_documents = sum(c["counts"]["num_documents"] for c in commits)
    return {
        "format": "packed-tokens",
        "dtype": token_dtype(info["vocab_size"]).name,
        "seq_len": spec.seq_len,
        "vocab_size": info["vocab_size"],
        "eos_id": info["eos_id"],
        "tokenizer": "tokenizer/",
        "num_shards": len(shards),
        "num_records": num_documents + sum(drops.values()),
        "num_documents": num_documents,
        "num_tokens": sum(c["counts"]["num_tokens"] for c in commits),
        "num_sequences": splits["train"]["num_sequences"] + splits["val"]["num_sequences"],
        "num_tokens_dropped": sum(c["counts"][s]["num_tokens_dropped"] for c in commits for s in ("train", "val")),
        "drops": dict(sorted(drops.items())),
        "splits": splits,
        "quarantine": "quarantine.jsonl",
    }


def _quarantine_lines(shards: list[Shard], metas: list[dict]) -> bytes:
    """Bad records with their line number in the file (shards report lines relative to themselves)."""
    lines, line_base = [], Counter()
    for shard, meta in zip(shards, metas):
        for bad in meta["bad"]:
            record = BadRecord(**bad)
            lines.append(json.dumps({"source": shard.uri, "line": line_base[shard.uri] + record.line,
                                     "offset": record.offset, "reason": record.reason, "excerpt": record.excerpt}))
        line_base[shard.uri] += meta["num_lines"]
    return "".join(line + "\n" for line in lines).encode()
