"""The plan: each stage's content hash, its output location, and whether (and why) it must run.

A stage's hash covers exactly what decides its output: kind, name, a per-kind version (bumped
when the job's code changes its output), every spec field except references, the hashes of the
stages it references, and a fingerprint of the input files it reads (size + mtime or ETag). Never
the storage root or a timestamp, so the same pipeline hashes the same on a laptop and on S3.

The committed inputs of the newest earlier output of the same stage say why a stage reruns.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from jobs.commit import read_commit, verify_commit
from jobs.fields import local_fields, output_fields
from jobs.sources import SourceError, list_source_files
from jobs.storage import Storage, open_storage
from orchestrator.errors import UserError
from orchestrator.kinds import KINDS
from orchestrator.kinds.base import StageSpec
from orchestrator.records import list_records
from orchestrator.spec import PipelineSpec

COMMIT_FILE = "_COMMIT.json"


@dataclass
class PlannedStage:
    name: str
    kind: str
    spec: StageSpec
    hash: str
    inputs: dict  # what the hash covers, kept in the commit to explain later reruns
    upstream: dict[str, str]  # field -> stage name
    key: str  # stages/<name>-<hash8>
    uri: str
    cached: bool = False
    reason: str = ""
    upstream_uris: dict[str, str] = field(default_factory=dict)  # field -> referenced output URI


def make_plan(spec: PipelineSpec, storage: Storage, run_id: str | None = None) -> list[PlannedStage]:
    """`run_id`: the run being planned, never its own `init: previous`."""
    planned: dict[str, PlannedStage] = {}
    for name in spec.topological_order():
        stage = spec.stages[name]
        upstream = spec.upstream(name)
        # Operational fields (jobs.fields) are left out: changing how a stage runs reuses its output.
        fields = {k: v for k, v in output_fields(stage).items() if k not in {"kind", *upstream}}
        inputs = {
            "kind": stage.kind,
            "name": name,
            "version": KINDS[stage.kind].version,
            "fields": fields,
            "upstream": {f: planned[ref].hash for f, ref in upstream.items()},
            "files": _fingerprint(name, stage),
        }
        previous = None
        continues = stage.starts_from_previous_run(spec.stages)
        if continues:
            tokenizer = continues.tokenizer  # the ids the weights were trained on must not change
            tokenizer_hash = planned[tokenizer].hash if isinstance(tokenizer, str) else None
            previous = previous_weights(spec, storage, name, fields, run_id, tokenizer, tokenizer_hash)
        if previous:
            inputs["previous"] = previous  # a new previous run is a new input: the stage runs again
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        key = f"stages/{name}-{digest[:8]}"
        p = PlannedStage(name, stage.kind, stage, digest, inputs, upstream, key, storage.url(key))
        p.upstream_uris = {f: planned[ref].uri for f, ref in upstream.items()}
        if previous:
            p.upstream_uris["init"] = previous["model_uri"]
        p.cached, p.reason = _cache_status(storage, p)
        planned[name] = p
    return list(planned.values())


def previous_weights(spec: PipelineSpec, storage: Storage, name: str, fields: dict, run_id: str | None,
                     tokenizer, tokenizer_hash: str | None) -> dict | None:
    """Where stage `name` ended in the pipeline's newest successful run other than `run_id`: its
    exported weights (those of its newest checkpoint); None when there is no such run, or it
    trained another model shape or with another tokenizer stage output."""
    runs = [r for r in list_records(storage) if r.pipeline == spec.name and r.status == "succeeded"
            and r.run_id != run_id and name in r.stages and r.stages[name].status == "succeeded"]
    for record in sorted(runs, key=lambda r: r.finished_at or r.started_at, reverse=True):
        out = open_storage(record.stages[name].output_uri)
        commit = read_commit(out, COMMIT_FILE) or {}
        if commit.get("inputs", {}).get("fields", {}).get("model") != fields.get("model"):
            return None  # the model changed since: train it from scratch
        if tokenizer_hash and (tokenizer not in record.stages or record.stages[tokenizer].hash != tokenizer_hash):
            return None  # new token ids: the old weights would read them as other tokens
        return {"run_id": record.run_id, "stage_hash": record.stages[name].hash, "model_uri": out.url("hf"),
                "checkpoint": (commit.get("metrics") or {}).get("last_checkpoint")}
    return None


def _fingerprint(name: str, stage: StageSpec) -> list:
    """(file, size, version) of every input file the stage reads outside the pipeline's storage:
    those its fields declared `local=` name (jobs.fields)."""
    entries = []
    for _, owner, kind, value in local_fields(stage):
        if kind == "glob":  # a source's paths: local files and s3:// objects alike
            try:
                entries += [[_display(f.uri), f.size, f.version] for f in list_source_files(owner)]
            except SourceError as e:
                raise UserError(f"stages.{name}.{e}") from None
        elif kind == "dir":
            entries += _directory_fingerprint(name, value)
        else:
            st = _stat(name, value)
            entries.append([_display(value), st.st_size, f"{st.st_mtime_ns}-{st.st_ctime_ns}"])
    return entries


def _stat(name: str, path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise UserError(f"stages.{name}: cannot read {path!r} ({e.strerror}; relative paths are read from "
                        f"{os.getcwd()})") from None


def _directory_fingerprint(name: str, path: str) -> list:
    if not os.path.isdir(path):
        raise UserError(f"stages.{name}: {path!r} is not a directory (relative paths are read from {os.getcwd()})")
    out = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            out.append([_display(os.path.join(path, entry.name)), st.st_size, f"{st.st_mtime_ns}-{st.st_ctime_ns}"])
    return out


def _display(uri: str) -> str:
    """Local files by their path relative to the current directory: the hash survives moving the checkout."""
    path = uri.removeprefix("file://")
    if uri.startswith("s3://") or not os.path.isabs(path):
        return uri
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _cache_status(storage: Storage, p: PlannedStage) -> tuple[bool, str]:
    problems = verify_commit(storage.sub(p.key), COMMIT_FILE)
    if not problems:
        return True, "cached"
    if storage.exists(f"{p.key}/{COMMIT_FILE}"):
        return False, f"its commit does not verify ({problems[0]}); rerunning"
    previous = _previous_inputs(storage, p.name, p.key)
    if previous is None:
        return False, "new"
    if previous == p.inputs:
        return False, "not committed yet"
    return False, "changed: " + "; ".join(_diff(previous, p.inputs, p.upstream))


def _previous_inputs(storage: Storage, name: str, current_key: str) -> dict | None:
    newest, newest_time = None, -1.0
    # The prefix `stages/tok-` also lists a stage named `tok-big`: match the directory exactly.
    own_dir = re.compile(rf"stages/{re.escape(name)}-[0-9a-f]{{8}}/{COMMIT_FILE}")
    for obj in storage.list(f"stages/{name}-"):
        if not own_dir.fullmatch(obj.key) or obj.key.startswith(current_key + "/"):
            continue
        commit = read_commit(storage, obj.key)
        if commit and commit.get("committed_at", 0) > newest_time and "inputs" in commit:
            newest, newest_time = commit["inputs"], commit["committed_at"]
    return newest


def _diff(old: dict, new: dict, upstream: dict[str, str], prefix: str = "") -> list[str]:
    changes = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        path = f"{prefix}{k}"
        if path == "previous" and a != b:
            changes.append(f"continues from run {b['run_id']}" if b else "starts from scratch")
        elif isinstance(a, dict) and isinstance(b, dict):
            changes += _diff(a, b, upstream, path + ".")
        elif a != b:
            if k == "files":
                changes.append("input files changed")
            elif prefix == "upstream.":
                changes.append(f"upstream {upstream.get(k, k)} changed")
            else:
                changes.append(f"{path.removeprefix('fields.')}: {_short(a)} -> {_short(b)}")
    return changes


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
