"""The preprocess stage: the driver shards the corpus and runs the passes of `jobs.preprocess` as
Ray tasks: scan every shard, deduplicate by key range (jobs/dedup.py), encode every shard.

Exactly once: a shard's scan and a key range's dedup decision are atomic objects, and a shard's
encoded output has its own commit, so a rerun (same run id, or after a crash) launches tasks only
for what lacks them; a task that Ray retries after a worker died rewrites the same names with the
same bytes. The driver holds counts only, never keys or texts: its memory does not grow with the
corpus. The stage's files are exactly those the shard commits list, plus the manifest and the
quarantine file.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections import Counter

import ray

from jobs.commit import bytes_entry, commit_entries, file_entry, read_commit, verify_commit
from jobs.dedup import exact_drops_key, find_exact_duplicates
from jobs.near_dedup import NEAR_DROPS_KEY, find_candidate_pairs, near_duplicate_drops, near_edges_key
from jobs.preprocess import (encode_shard, load_scan_meta, scan_bands_key, scan_keys_key, scan_meta_key, scan_shard,
                             scan_signatures_key, shard_commit_key, token_dtype)
from jobs.shuffle import num_listed, num_partitions
from jobs.sources import (BadRecord, Shard, ShardReader, SourceError, check_source_content, list_source_files,
                          plan_shards)
from jobs.storage import open_storage
from jobs.tokenizer import adopt_tokenizer
from orchestrator.errors import UserError
from orchestrator.ray_runtime import run_all
from orchestrator.stages import StageContext, StageOutput

TASK_OPTIONS = {"num_cpus": 1, "max_retries": 3}  # retries cover workers that die (OOM, node loss)
_PEEK_BYTES = 1 << 16


def run(ctx: StageContext) -> StageOutput:
    spec, out = ctx.spec, ctx.out
    shards = _planned_shards(ctx.name, spec, list_source_files(spec.source))
    tokenizer_files = _stage_tokenizer(ctx)

    scanned = {o.key for o in out.list("scan/")}
    todo = [s for s in shards if scan_meta_key(s.index) not in scanned]
    _run_tasks(ctx, scan_shard, [(s, spec, spec.source.text_field, out) for s in todo], len(shards), "scan")
    num_kept, drops, quarantine = _scan_summary(ctx.name, spec, out, shards)
    exact_keys = _exact_dedup(ctx, shards, sum(num_kept))
    if exact_keys:
        drops["duplicate"] = sum(num_listed(out, key, len(shards)) for key in exact_keys)
    near_keys = _near_dedup(ctx, shards, sum(num_kept), exact_keys)
    if near_keys:
        drops["near_duplicate"] = num_listed(out, NEAR_DROPS_KEY, len(shards))
    drop_keys = exact_keys + near_keys

    tokenizer_uri = out.sub("tokenizer").uri
    committed = {o.key for o in out.list("data/")}
    todo = [s for s in shards if shard_commit_key(s.index) not in committed or verify_commit(out, shard_commit_key(s.index))]
    args = [(s, spec, spec.source.text_field, len(shards), drop_keys, tokenizer_uri, out) for s in todo]
    _run_tasks(ctx, encode_shard, args, len(shards), "tokenize + pack")

    raw_commits = [out.read_bytes(shard_commit_key(s.index)) for s in shards]  # verified by the encode pass
    commits = [json.loads(raw) for raw in raw_commits]
    info = json.loads(out.read_bytes("tokenizer/info.json"))
    manifest = _manifest(spec, shards, commits, drops, info)
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


def _run_tasks(ctx: StageContext, fn, args: list[tuple], total: int, label: str, unit: str = "shards") -> None:
    remote = ray.remote(**TASK_OPTIONS)(fn)
    ctx.console.line(f"  {label}: {len(args)} of {total} {unit} to do")
    with ctx.console.progress(len(args), label) as advance:
        run_all([remote.remote(*a) for a in args], advance)


def _planned_shards(name: str, spec, files: list) -> list[Shard]:
    """Before any worker: every file's first bytes must match the format (a `.jsonl` that is gzip,
    a binary file), the shards are planned (parquet footers read), and the first records of the
    first file must have `text_field`."""
    try:
        check_source_content(files, spec.source)
        shards = plan_shards(files, spec.source.format, max(int(spec.shard_mb * 1e6), 1))
        if spec.source.format != "text":
            _check_text_field(name, spec, files[0])
    except SourceError as e:
        raise UserError(f"stages.{name}.source: {e}") from None
    return shards


def _check_text_field(name: str, spec, first) -> None:
    peek = plan_shards([first], spec.source.format, _PEEK_BYTES)[0]
    records = list(itertools.islice(ShardReader(peek, spec.source.text_field), 100))
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


def _scan_summary(name: str, spec, out, shards: list[Shard]) -> tuple[list[int], Counter, bytes]:
    """From the scans' metadata: each shard's surviving documents, the drops by reason, and the
    quarantine file (bad records with their line number in the file: shards count from their start)."""
    drops: Counter = Counter()
    num_kept, lines, line_base = [], [], Counter()
    for shard in shards:
        meta = load_scan_meta(out, shard.index)
        drops.update(meta["drops"])
        num_kept.append(meta["num_kept"])
        for bad in meta["bad"]:
            record = BadRecord(**bad)
            lines.append(json.dumps({"source": shard.uri, "line": line_base[shard.uri] + record.line,
                                     "offset": record.offset, "reason": record.reason, "excerpt": record.excerpt}))
        line_base[shard.uri] += meta["num_lines"]
    num_records = sum(num_kept) + sum(drops.values())
    if num_records and drops.get("missing_field", 0) == num_records:
        raise UserError(f"stages.{name}.source.text_field: {spec.source.text_field!r} is missing in every record")
    if not sum(num_kept):  # dedup always keeps a first copy: only the filters can leave nothing
        raise UserError(f"stages.{name}: no document is left after filtering ({num_records} records read; dropped: "
                        f"{dict(drops)}); loosen stages.{name}.filters or check the source")
    return num_kept, drops, "".join(line + "\n" for line in lines).encode()


def _exact_dedup(ctx: StageContext, shards: list[Shard], num_keys: int) -> list[str]:
    """Run the reduce tasks that are not done yet; the keys of all their outputs (none without dedup)."""
    if not ctx.spec.dedup:
        return []
    parts = num_partitions(num_keys, ctx.spec.dedup_keys_per_task)
    drop_keys = [exact_drops_key(p, parts) for p in range(parts)]
    done = {o.key for o in ctx.out.list("dedup/")}
    scan_keys = [scan_keys_key(s.index) for s in shards]
    args = [(ctx.out, scan_keys, p, parts) for p in range(parts) if drop_keys[p] not in done]
    _run_tasks(ctx, find_exact_duplicates, args, parts, "dedup", "key ranges")
    return drop_keys


def _near_dedup(ctx: StageContext, shards: list[Shard], num_docs: int, exact_keys: list[str]) -> list[str]:
    """Run the near-duplicate reduce and components tasks that are not done yet; the key of the
    drops they decided (none without near_dedup)."""
    near = ctx.spec.near_dedup
    if near is None:
        return []
    parts = num_partitions(num_docs * near.bands, ctx.spec.dedup_keys_per_task)
    edge_keys = [near_edges_key(p, parts) for p in range(parts)]
    done = {o.key for o in ctx.out.list("dedup/")}
    band_keys = [scan_bands_key(s.index) for s in shards]
    signature_keys = [scan_signatures_key(s.index) for s in shards] if near.threshold is not None else None
    args = [(ctx.out, band_keys, signature_keys, near, p, parts) for p in range(parts) if edge_keys[p] not in done]
    _run_tasks(ctx, find_candidate_pairs, args, parts, "near-dedup", "hash ranges")
    args = [(ctx.out, edge_keys, exact_keys, len(shards))] if NEAR_DROPS_KEY not in done else []
    _run_tasks(ctx, near_duplicate_drops, args, 1, "near-dedup clusters", "tasks")
    return [NEAR_DROPS_KEY]


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
