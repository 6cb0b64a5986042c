"""Runs a plan: skip what is committed, run the rest in dependency order, commit each output,
and keep the run record current.

Resuming is the same code path: with the same run id the record is reloaded, committed stages
are cache hits, and a stage that was interrupted starts again with `attempts` incremented (its
own per-shard commits make that cheap). When every stage is cached, Ray is never started.
"""

from __future__ import annotations

import logging
import time

from jobs.commit import read_commit, verify_commit, write_commit
from jobs.storage import Storage
from orchestrator import ray_runtime
from orchestrator.console import Console
from orchestrator.errors import UserError
from orchestrator.plan import COMMIT_FILE, PlannedStage, make_plan
from orchestrator.records import RunRecord, StageRecord, load_record, new_run_id, save_record, validate_run_id
from orchestrator.spec import PipelineSpec
from orchestrator.stages import StageContext, executor

log = logging.getLogger(__name__)


def run_pipeline(spec: PipelineSpec, storage: Storage, run_id: str | None = None, address: str | None = None,
                 console: Console | None = None) -> RunRecord:
    console = console or Console()
    plan = make_plan(spec, storage)
    record = _start_record(spec, storage, validate_run_id(run_id) if run_id else new_run_id(spec.name), plan)
    console.line(f"run {record.run_id} (attempt {record.attempts}) → {storage.uri}")
    try:
        if not all(p.cached for p in plan):
            ray_runtime.connect(address)
        for p in plan:
            _run_stage(p, record, storage, console)
        record.status = "succeeded"
    except KeyboardInterrupt:
        record.status = "stopped"
        raise
    except BaseException:
        record.status = "failed"
        raise
    finally:
        record.finished_at = time.time()
        save_record(storage, record)
    return record


def _start_record(spec: PipelineSpec, storage: Storage, run_id: str, plan: list[PlannedStage]) -> RunRecord:
    record = load_record(storage, run_id)
    if record is None:
        record = RunRecord(run_id=run_id, pipeline=spec.name, spec_hash=spec.spec_hash(), storage=storage.uri)
    elif record.spec_hash != spec.spec_hash():
        raise UserError(f"run {run_id} was started from a different pipeline file (spec hash {record.spec_hash[:8]}, "
                        f"this one {spec.spec_hash()[:8]}); resume it with its own file or start a new run id")
    record.status, record.finished_at = "running", None
    record.attempts += 1
    for p in plan:
        previous = record.stages.get(p.name)
        if previous is None or previous.hash != p.hash:
            record.stages[p.name] = StageRecord(kind=p.kind, hash=p.hash, output_uri=p.uri, reason=p.reason)
    save_record(storage, record)
    return record


def _run_stage(p: PlannedStage, record: RunRecord, storage: Storage, console: Console) -> None:
    stage = record.stages[p.name]
    out = storage.sub(p.key)
    if p.cached:
        stage.status, stage.cached, stage.reason = "succeeded", True, "cached"
        stage.metrics = (read_commit(out, COMMIT_FILE) or {}).get("metrics", {})
        save_record(storage, record)
        console.stage_finished(p.name, stage)
        return
    if out.exists(COMMIT_FILE):  # present but did not verify: move it out of the way to redo the stage
        log.warning("stage %s: discarding a commit that does not verify: %s", p.name, p.reason)
        out.delete(COMMIT_FILE)
    stage.status, stage.cached, stage.reason, stage.error = "running", False, p.reason, None
    stage.attempts += 1
    stage.started_at, stage.finished_at = time.time(), None
    save_record(storage, record)
    console.stage_started(p.name, p.kind, p.reason)
    log.info("stage %s (%s) -> %s: %s", p.name, p.kind, p.uri, p.reason)
    try:
        output = executor(p.kind)(StageContext(p.name, p.hash, p.spec, out, p.upstream_uris, console))
        stage.attempts += output.attempts - 1
        meta = {"stage": p.name, "kind": p.kind, "hash": p.hash, "inputs": p.inputs, "metrics": output.metrics}
        if not write_commit(out, COMMIT_FILE, output.files, meta) and verify_commit(out, COMMIT_FILE):
            raise RuntimeError(f"stage {p.name}: another commit appeared at {out.url(COMMIT_FILE)} and does not verify")
        stage.status, stage.metrics = "succeeded", output.metrics
    except KeyboardInterrupt:
        stage.status, stage.error = "stopped", "interrupted"
        raise
    except BaseException as e:
        stage.status, stage.error = "failed", f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
        log.exception("stage %s failed", p.name)
        raise
    finally:
        stage.finished_at = time.time()
        save_record(storage, record)
        console.stage_finished(p.name, stage)

