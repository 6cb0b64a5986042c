"""Storage lifecycle: `orchestrator gc` deletes what no kept run, alias or lease uses.

Decisions apart from actions: `read_store` takes one listing of the storage root and reads the
small files it names (run records, aliases, commits, the latest lease generation of each stage
output); `plan_gc`, a pure function of that snapshot, returns what to delete and what to keep,
each with its reason; `execute` carries the deletions out.

The policy, per pipeline (records carry their pipeline's name):
- Kept runs: the `keep_runs` newest records (by start time); every run still running or pending,
  however old (a driver that died keeps `running` until the run is resumed or stopped); every run
  an alias (`aliases/<pipeline>/latest.json`, `best.json`) names; and the newest succeeded run,
  which `init: previous` continues from. Every other run's directory `runs/<run_id>/` (its
  record, stage logs, report) is deleted: its outputs are then no longer reachable by run id.
- Stage outputs (`stages/<name>-<hash8>/`) are kept when a kept run's record lists them, when an
  alias's export lies in them, or when they hold a lease that was not released: a live one is a
  stage being computed; a stale one (its holder stopped beating) is kept too, to be safe, with
  `orchestrator lease break` as the way to free it. Every other output goes, committed or not:
  the commit file first, so that a half-deleted output never reads as complete.
- Checkpoints (`<training output>/ckpt/step-N/`) of a kept, committed training stage beyond its
  retention: the newest `keep_last` committed steps plus the multiples of `keep_every`, read from
  the stage's own commit (the fields its hash covers), so no pipeline file is needed. The
  checkpoint writer applies the same rule after each save; what gc finds beyond it was left by a
  driver killed between a commit and the retention after it, or is a step whose commit is missing
  or does not verify. Never deleted: a kept run's `last_checkpoint`, and a `{stage, step}` model
  that a kept run's committed evaluate stage names. Uncommitted training outputs keep every
  checkpoint: a resume needs the newest, and discards the rest itself.
Not touched: `schedules/` (the scheduler's tick claims: deleting one could fire its tick again),
files under `runs/<run_id>/` with no record, and anything outside the layout.

A run that starts while gc runs may plan an old output as cached: `execute` reads the records and
each output's lease again right before deleting, and spares what a new or running run, or a lease,
uses by then; the window left is that one read. Run gc between runs, e.g. after the nightly one.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

from pydantic import ValidationError

from jobs.commit import read_commit
from jobs.storage import ObjectInfo, Storage
from orchestrator import lease as lease_protocol
from orchestrator.errors import UserError
from orchestrator.gate import read_alias
from orchestrator.plan import COMMIT_FILE
from orchestrator.records import RunRecord

CHECKPOINT_COMMIT = "COMMIT.json"  # jobs.checkpoint.COMMIT, whose module imports torch
STAGE_DIR = re.compile(r"(stages/[^/]+-[0-9a-f]{8})/")
_STAGE_IN_URI = re.compile(r"(?:^|(?<=/))(stages/[^/]+-[0-9a-f]{8})/")
RUN_DIR = re.compile(r"runs/([^/]+)/")
_STEP_DIR = re.compile(r"ckpt/step-(\d{8})/")
_ALIAS = re.compile(r"aliases/([^/]+)/([^/]+)\.json")
_UNFINISHED = ("running", "pending")
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


@dataclass
class Store:
    """What gc decides from: one listing of the storage root and the small files it names."""
    objects: list[ObjectInfo]
    records: list[RunRecord]
    aliases: dict[str, dict]  # alias key -> its content
    commits: dict[str, dict]  # commit key -> its content, for stage and checkpoint commits that read back
    leases: dict[str, lease_protocol.LeaseRecord] = field(default_factory=dict)  # stage dir -> latest generation


@dataclass(frozen=True)
class Item:
    kind: str  # "stage output", "checkpoint" or "run"
    prefix: str  # ends with '/'
    num_bytes: int
    reason: str
    first: str | None = None  # deleted before the rest: the commit or the record


@dataclass
class GcPlan:
    delete: list[Item]
    keep: list[Item]


def stage_dir(uri: str) -> str | None:
    """'stages/<name>-<hash8>' of an output URI, or of a URI or key below one; None when it names none."""
    found = _STAGE_IN_URI.findall(uri.rstrip("/") + "/")
    return found[-1] if found else None

def kept_runs(records: list[RunRecord], aliases: dict[str, dict], keep_runs: int) -> dict[str, str]:
    """run id -> why the policy keeps it (see the module docstring); the other runs are dropped."""
    aliased: dict[str, list[str]] = {}
    for key, alias in sorted(aliases.items()):
        aliased.setdefault(str(alias.get("run_id")), []).append(key.removeprefix("aliases/").removesuffix(".json"))
    by_pipeline: dict[str, list[RunRecord]] = {}
    for r in sorted(records, key=lambda r: r.started_at, reverse=True):
        by_pipeline.setdefault(r.pipeline, []).append(r)
    why: dict[str, str] = {}
    for pipeline, runs in by_pipeline.items():
        succeeded = [r for r in runs if r.status == "succeeded"]
        newest_succeeded = max(succeeded, key=lambda r: r.finished_at or r.started_at) if succeeded else None
        for i, r in enumerate(runs):
            if r.status in _UNFINISHED:
                why[r.run_id] = r.status
            elif r.run_id in aliased:
                why[r.run_id] = f"alias {', '.join(aliased[r.run_id])}"
            elif i < keep_runs:
                why[r.run_id] = ("one of " if keep_runs > 1 else "") + _newest(keep_runs, pipeline)
            elif r is newest_succeeded:
                why[r.run_id] = f"the newest succeeded run of {pipeline}, which `init: previous` continues from"
    return why


def _newest(keep_runs: int, pipeline: str) -> str:
    return f"the {keep_runs} newest runs of {pipeline}" if keep_runs > 1 else f"the newest run of {pipeline}"


def plan_gc(store: Store, keep_runs: int, now: float) -> GcPlan:
    """What to delete and what to keep, each with its reason; a pure function of the snapshot."""
    assert keep_runs >= 1, keep_runs  # check_keep_runs is the user-facing check
    by_dir: dict[str, list[ObjectInfo]] = {}
    run_bytes: dict[str, int] = {}
    for o in store.objects:
        if m := STAGE_DIR.match(o.key):
            by_dir.setdefault(m.group(1), []).append(o)
        elif m := RUN_DIR.match(o.key):
            run_bytes[m.group(1)] = run_bytes.get(m.group(1), 0) + o.size
    kept = kept_runs(store.records, store.aliases, keep_runs)
    records = {r.run_id: r for r in store.records}

    uses: dict[str, str] = {}  # stage dir -> why it is kept: the first reason found, strongest first
    # As a run that holds no lease sees them: by the heartbeat alone (no run id or pid of ours to match).
    leases = {d: lease_protocol.decide(latest, now, run_id="", host="", pid_alive=lambda pid: True)
              for d, latest in store.leases.items() if d in by_dir}
    for d, state in leases.items():
        if isinstance(state, lease_protocol.HeldBy):
            uses[d] = f"leased by run {state.record.run_id}, heartbeat {state.age_s:.0f} s ago: being computed"
    for run_id, reason in sorted(kept.items(), key=lambda kv: kv[1] not in _UNFINISHED):
        for stage in records[run_id].stages.values():
            if (d := stage_dir(stage.output_uri)) in by_dir:
                uses.setdefault(d, f"used by run {run_id} ({reason})")
    for key, alias in sorted(store.aliases.items()):
        if (d := stage_dir(str(alias.get("export_uri", "")))) in by_dir:
            uses.setdefault(d, f"alias {key.removeprefix('aliases/').removesuffix('.json')}'s export")
    for d, state in leases.items():
        if isinstance(state, lease_protocol.Stale):
            uses.setdefault(d, f"unreleased lease of run {state.record.run_id} ({state.why}); "
                               f"`orchestrator lease break <storage>/{d}` lets gc free it")

    dropped_users = {stage_dir(s.output_uri): r.run_id for r in store.records if r.run_id not in kept
                     for s in r.stages.values()}
    plan = GcPlan([], [])
    for d, objects in sorted(by_dir.items()):
        num_bytes = sum(o.size for o in objects)
        committed = any(o.key == f"{d}/{COMMIT_FILE}" for o in objects)
        if d in uses:
            doomed = _beyond_retention(store, d, objects, kept, records) if committed else []
            plan.delete += doomed
            plan.keep.append(Item("stage output", d + "/", num_bytes - sum(c.num_bytes for c in doomed), uses[d]))
            continue
        why = "no kept run, alias or lease uses it"
        if d in dropped_users:
            why += f"; last used by run {dropped_users[d]}, which gc drops"
        plan.delete.append(Item("stage output", d + "/", num_bytes, why if committed else why + "; never committed",
                                f"{d}/{COMMIT_FILE}" if committed else None))
    for r in store.records:
        prefix, num_bytes, record_key = f"runs/{r.run_id}/", run_bytes.get(r.run_id, 0), f"runs/{r.run_id}/run.json"
        if r.run_id in kept:
            plan.keep.append(Item("run", prefix, num_bytes, kept[r.run_id]))
        else:
            why = (f"{r.status}; not {'among ' if keep_runs > 1 else ''}{_newest(keep_runs, r.pipeline)}, "
                   "nor running, aliased or its newest succeeded")
            plan.delete.append(Item("run", prefix, num_bytes, why, record_key))
    return plan


def _beyond_retention(store: Store, d: str, objects: list[ObjectInfo], kept: dict[str, str],
                      records: dict[str, RunRecord]) -> list[Item]:
    """The checkpoints of the committed training output `d` that its retention does not keep."""
    fields = (store.commits.get(f"{d}/{COMMIT_FILE}", {}).get("inputs") or {}).get("fields") or {}
    keep_last, keep_every = fields.get("keep_last"), fields.get("keep_every") or 0
    if not isinstance(keep_last, int):  # not a training stage
        return []
    files: dict[int, dict[str, int]] = {}  # step -> file name -> size
    for o in objects:
        if m := _STEP_DIR.match(o.key, len(d) + 1):
            files.setdefault(int(m.group(1)), {})[o.key[m.end():]] = o.size
    verified = sorted((s for s in files if _verifies(store.commits.get(_step(d, s) + CHECKPOINT_COMMIT), files[s])),
                      reverse=True)
    retained = set(verified[:keep_last]) | {s for s in verified if keep_every and s % keep_every == 0}
    retained |= _named_steps(store, d, kept, records)
    doomed = []
    for s in sorted(set(files) - retained):
        why = (f"beyond retention (keep_last {keep_last}, keep_every {keep_every})" if s in verified else
               "its commit is missing or does not verify, and the stage is committed: nothing resumes from it")
        doomed.append(Item("checkpoint", _step(d, s), sum(files[s].values()), why,
                           _step(d, s) + CHECKPOINT_COMMIT if CHECKPOINT_COMMIT in files[s] else None))
    return doomed


def _step(d: str, step: int) -> str:
    return f"{d}/ckpt/step-{step:08d}/"


def _verifies(commit: dict | None, present: dict[str, int]) -> bool:
    """Every file the checkpoint's commit lists is there with its size (jobs.commit.verify_commit's test)."""
    return commit is not None and all(present.get(k) == v["size"] for k, v in commit["files"].items())


def _named_steps(store: Store, d: str, kept: dict[str, str], records: dict[str, RunRecord]) -> set[int]:
    """Steps of training output `d` that a kept run names: its `last_checkpoint`, or a {stage, step}
    reference of one of its committed stages (an evaluate stage's model: the commit's inputs say
    which output the stage name was)."""
    steps = set()
    for run_id in kept:
        for stage in records[run_id].stages.values():
            last = str(stage.metrics.get("last_checkpoint") or "")
            if stage_dir(last) == d and (m := re.search(r"/ckpt/step-(\d{8})/?$", last)):
                steps.add(int(m.group(1)))
            inputs = store.commits.get(f"{stage_dir(stage.output_uri)}/{COMMIT_FILE}", {}).get("inputs") or {}
            for path, upstream_hash in (inputs.get("upstream") or {}).items():
                ref = _field_at(inputs.get("fields") or {}, path)
                if isinstance(ref, dict) and "step" in ref and d == f"stages/{ref.get('stage')}-{str(upstream_hash)[:8]}":
                    steps.add(ref["step"])
    return steps


def _field_at(fields: dict, path: str):
    """The value at a reference's field path, e.g. `models[1]`; None where there is none."""
    value = fields
    for name, index in re.findall(r"(\w+)(?:\[(\d+)\])?", path):
        value = value.get(name) if isinstance(value, dict) else None
        if index and isinstance(value, list):
            value = value[int(index)] if int(index) < len(value) else None
    return value


def read_store(storage: Storage) -> Store:
    """One listing of the root, then the records, aliases, commits and leases it names."""
    objects = storage.list("")
    keys = [o.key for o in objects]
    records = read_records(storage, keys)
    aliases = {}
    for key in keys:
        if m := _ALIAS.fullmatch(key):
            try:
                alias = read_alias(storage, *m.groups())
            except ValueError as e:
                raise UserError(f"{e}; gc cannot tell what it keeps") from None
            if alias is not None:
                aliases[key] = alias
    commits = {k: c for k in keys if _is_commit(k) and (c := read_commit(storage, k)) is not None}
    leased = sorted({m.group(1) for k in keys if (m := STAGE_DIR.match(k))
                     and k.startswith(f"{m.group(1)}/{lease_protocol.LEASE_DIR}/")})
    leases = {d: latest for d in leased if (latest := lease_protocol.read_latest(storage.sub(d)))}
    return Store(objects, records, aliases, commits, leases)


def read_records(storage: Storage, keys: list[str]) -> list[RunRecord]:
    """The run records among the listed `keys`; a record that does not read back is bad input."""
    records = []
    for key in (k for k in keys if _is_record(k)):
        try:
            records.append(RunRecord.model_validate_json(storage.read_bytes(key)))
        except (ValidationError, FileNotFoundError) as e:
            raise UserError(f"{storage.url(key)} is not a readable run record ({str(e).splitlines()[0]}); "
                            "restore it, or delete its run directory") from None
    return records


def _is_record(key: str) -> bool:
    return key.startswith("runs/") and key.count("/") == 2 and key.endswith("/run.json")


def _is_commit(key: str) -> bool:
    m = STAGE_DIR.match(key)
    rest = key[m.end():] if m else ""
    return rest == COMMIT_FILE or bool(re.fullmatch(rf"ckpt/step-\d{{8}}/{CHECKPOINT_COMMIT}", rest))


def execute(storage: Storage, plan: GcPlan) -> GcPlan:
    """Carry `plan` out. Records and leases are read again first: a stage output that a run started
    using meanwhile, or a run that was resumed meanwhile, is spared. Returns what was done: deleted,
    and kept (the spared among them)."""
    in_use, resumed = _in_use_now(storage, plan)
    done = GcPlan([], list(plan.keep))
    for item in plan.delete:
        if item.kind == "stage output":
            latest = lease_protocol.read_latest(storage.sub(item.prefix.rstrip("/")))
            spared = item.prefix.rstrip("/") in in_use or (latest is not None and not latest.released)
        else:
            spared = item.prefix in resumed
        if spared:
            done.keep.append(Item(item.kind, item.prefix, item.num_bytes, "spared: a run started using it while gc ran"))
            continue
        if item.first:  # the commit or record first: a half-deleted item never reads as complete
            storage.delete(item.first)
        storage.delete_prefix(item.prefix)
        done.delete.append(item)
    return done


def _in_use_now(storage: Storage, plan: GcPlan) -> tuple[set[str], set[str]]:
    """The stage outputs that runs new since the plan, or running now, list; the run directories of
    runs running now."""
    planned = {i.prefix for i in plan.keep + plan.delete if i.kind == "run"}
    in_use, running = set(), set()
    for o in storage.list("runs/"):
        if _is_record(o.key):
            try:
                record = RunRecord.model_validate_json(storage.read_bytes(o.key))
            except FileNotFoundError:  # deleted since the listing
                continue
            if f"runs/{record.run_id}/" not in planned or record.status in _UNFINISHED:
                in_use |= {stage_dir(s.output_uri) for s in record.stages.values()}
            if record.status in _UNFINISHED:
                running.add(f"runs/{record.run_id}/")
    return in_use, running


def check_keep_runs(keep_runs: int) -> None:
    """0 would drop even the newest run of each pipeline, and with it the cache the next run starts
    from: far more likely a typo than a wish, so it is bad input, as is a negative count."""
    if keep_runs < 1:
        raise UserError(f"--keep-runs {keep_runs}: keep at least 1 run per pipeline (gc never deletes every run's "
                        "outputs; to empty a store, delete its directory or prefix)")


def human_bytes(num_bytes: int) -> str:
    """1536 -> '1.5 KiB'; below 1 KiB, the bytes as they are."""
    size, unit = float(num_bytes), 0
    while size >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{num_bytes} B" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def format_plan(plan: GcPlan, dry_run: bool) -> list[str]:
    """One line per item, what is (or would be) deleted first, then the totals."""
    lines = [f"{'would free' if dry_run else 'freed':<10} {human_bytes(i.num_bytes):>10}  {i.kind:<12} {i.prefix}  "
             f"{i.reason}" for i in plan.delete]
    lines += [f"{'keep':<10} {human_bytes(i.num_bytes):>10}  {i.kind:<12} {i.prefix}  {i.reason}" for i in plan.keep]
    lines.append(f"{'would free' if dry_run else 'freed'} {human_bytes(sum(i.num_bytes for i in plan.delete))} "
                 f"({len(plan.delete)} items), kept {human_bytes(sum(i.num_bytes for i in plan.keep))} "
                 f"({len(plan.keep)} items)" + ("; a dry run: nothing was deleted" if dry_run else ""))
    return lines


def run_gc(storage: Storage, keep_runs: int, dry_run: bool, now: Callable[[], float] = time.time) -> list[str]:
    """`orchestrator gc`: plan, delete unless `dry_run`, and return the lines to print."""
    check_keep_runs(keep_runs)  # before any request
    plan = plan_gc(read_store(storage), keep_runs, now())
    return format_plan(plan if dry_run else execute(storage, plan), dry_run)
