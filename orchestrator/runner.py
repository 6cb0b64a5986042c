"""Runs a plan: skip what is committed, run the rest as their inputs get committed, commit each
output, and keep the run record current.

Stages run side by side on threads of the driver whenever the cluster has room for them (two
fine-tunes at once, evaluation beside training): a stage starts once every stage it references
has succeeded and its resources (orchestrator.resources) fit in what the running stages leave
free. After a failure no new stage starts; the running ones finish, then the run fails.

Resuming is the same code path: with the same run id the record is reloaded, committed stages
are cache hits, and a stage that was interrupted starts again with `attempts` incremented (its
own per-shard and checkpoint commits make that cheap). When every stage is cached, Ray is never
started.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from jobs.commit import read_commit, verify_commit, write_commit
from jobs.storage import Storage
from orchestrator import ray_runtime, resources
from orchestrator.console import Console, StageConsole
from orchestrator.errors import UserError
from orchestrator.plan import COMMIT_FILE, PlannedStage, make_plan
from orchestrator.records import RunRecord, StageRecord, load_record, new_run_id, save_record, validate_run_id
from orchestrator.report import write_report
from orchestrator.spec import PipelineSpec
from orchestrator.stage_log import StageLog
from orchestrator.stages import StageContext, executor

log = logging.getLogger(__name__)


def run_pipeline(spec: PipelineSpec, storage: Storage, run_id: str | None = None, address: str | None = None,
                 console: Console | None = None) -> RunRecord:
    console = console or Console()
    plan = make_plan(spec, storage)
    record = _start_record(spec, storage, validate_run_id(run_id) if run_id else new_run_id(spec.name), plan)
    console.line(f"run {record.run_id} (attempt {record.attempts}) → {storage.uri}")
    runner = _Runner(record, storage, console)
    try:
        for p in plan:
            if p.cached:
                runner.mark_cached(p)
        to_run = [p for p in plan if not p.cached]
        if to_run:
            ray_runtime.connect(address)
            runner.run(to_run, *ray_runtime.capacity())
        record.status = "succeeded"
    except KeyboardInterrupt:
        record.status = "stopped"
        for stage in record.stages.values():
            if stage.status == "running":
                stage.status, stage.error = "stopped", "interrupted"
        raise
    except BaseException:
        record.status = "failed"
        raise
    finally:
        record.finished_at = time.time()
        runner.save()
        _write_report(storage, record)
    return record


def _write_report(storage: Storage, record: RunRecord) -> None:
    try:
        write_report(storage, record)
    except Exception:  # a report is a convenience: it must not turn a finished run into a failed one
        log.exception("could not write the run report")


class _Runner:
    def __init__(self, record: RunRecord, storage: Storage, console: Console):
        self.record, self.storage, self.console = record, storage, console
        self._lock = threading.Lock()  # stage threads update one record

    def save(self) -> None:
        with self._lock:
            save_record(self.storage, self.record)

    def mark_cached(self, p: PlannedStage) -> None:
        stage = self.record.stages[p.name]
        stage.status, stage.cached, stage.reason = "succeeded", True, "cached"
        stage.metrics = (read_commit(self.storage.sub(p.key), COMMIT_FILE) or {}).get("metrics", {})
        self.save()
        self.console.stage_finished(p.name, stage)

    def run(self, to_run: list[PlannedStage], cluster: resources.Resources, nodes: list[resources.Resources]) -> None:
        bundles = {p.name: getattr(p.spec, "bundles", lambda: resources.DEFAULT_BUNDLES)() for p in to_run}
        for p in to_run:
            problem = resources.never_fits(p.name, bundles[p.name], cluster, nodes)
            if problem:
                raise UserError(problem)
        free, waiting, errors = dict(cluster), list(to_run), []
        succeeded = {name for name, stage in self.record.stages.items() if stage.status == "succeeded"}
        running: dict[Future, PlannedStage] = {}
        pool = ThreadPoolExecutor(max_workers=len(to_run), thread_name_prefix="stage")
        try:
            while waiting or running:
                for p in list(waiting):
                    need = resources.total(bundles[p.name])
                    beside = getattr(p.spec, "BESIDE", set())
                    after = {ref for f, ref in p.upstream.items() if f not in beside}
                    started = succeeded | {q.name for q in running.values()}
                    ready = after <= succeeded and {ref for f, ref in p.upstream.items() if f in beside} <= started
                    if not errors and ready and resources.fits(need, free):
                        free = resources.subtract(free, need)
                        running[pool.submit(self._run_stage, p)] = p
                        waiting.remove(p)
                if not running:
                    break  # after a failure: what still waits needs a stage that did not succeed
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    p = running.pop(future)
                    free = resources.add(free, resources.total(bundles[p.name]))
                    if future.exception() is None:
                        succeeded.add(p.name)
                    else:
                        errors.append(future.exception())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, do not wait for running stages here
        if errors:
            raise errors[0]

    def _is_running(self, name: str) -> bool:
        return self.record.stages[name].status == "running"

    def _run_stage(self, p: PlannedStage) -> None:
        stage = self.record.stages[p.name]
        out = self.storage.sub(p.key)
        if out.exists(COMMIT_FILE):  # present but did not verify: move it out of the way to redo the stage
            log.warning("stage %s: discarding a commit that does not verify: %s", p.name, p.reason)
            out.delete(COMMIT_FILE)
        stage.status, stage.cached, stage.reason, stage.error = "running", False, p.reason, None
        stage.attempts += 1
        stage.started_at, stage.finished_at = time.time(), None
        self.save()
        self.console.stage_started(p.name, p.kind, p.reason)
        log.info("stage %s (%s) -> %s: %s", p.name, p.kind, p.uri, p.reason)
        with StageLog(self.storage, self.record.run_id, p.name) as stage_log:
            stage_log.write(f"start {p.kind} -> {p.uri} ({p.reason}), attempt {stage.attempts}")
            console = StageConsole(self.console, p.name, stage_log.write)
            try:
                context = StageContext(p.name, p.hash, p.spec, out, p.upstream_uris, console, self._is_running)
                output = executor(p.kind)(context)
                stage.attempts += output.attempts - 1
                meta = {"stage": p.name, "kind": p.kind, "hash": p.hash, "inputs": p.inputs, "metrics": output.metrics}
                if not write_commit(out, COMMIT_FILE, output.files, meta) and verify_commit(out, COMMIT_FILE):
                    raise RuntimeError(f"stage {p.name}: another commit appeared at {out.url(COMMIT_FILE)} and does not verify")
                stage.status, stage.metrics = "succeeded", output.metrics
            except BaseException as e:
                stage.status, stage.error = "failed", f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
                log.exception("stage %s failed", p.name)
                stage_log.write(traceback.format_exc())
                raise
            finally:
                stage.finished_at = time.time()
                stage_log.write(f"end {stage.status} after {stage.finished_at - stage.started_at:.1f}s")
        self.save()
        self.console.stage_finished(p.name, stage)


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
