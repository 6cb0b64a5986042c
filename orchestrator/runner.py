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

import functools
import logging
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from pydantic import ValidationError

from jobs.commit import read_commit, verify_commit, write_commit
from jobs.storage import Storage
from orchestrator import lease as lease_protocol
from orchestrator import ray_runtime, resources
from orchestrator.console import Console, StageConsole
from orchestrator.errors import UserError
from orchestrator.gate import apply_gate
from orchestrator.kinds import KINDS
from orchestrator.kinds.base import StageKind
from orchestrator.plan import COMMIT_FILE, PlannedStage, make_plan
from orchestrator.records import RunRecord, StageRecord, load_record, new_run_id, save_record, validate_run_id
from orchestrator.report import write_report
from orchestrator.spec import PipelineSpec
from orchestrator.stage_log import StageLog
from orchestrator.stages import StageContext
from orchestrator.tracking import Tracker, TrackingError, open_tracker

log = logging.getLogger(__name__)
_NODE_POLL_S = 5.0


def run_pipeline(spec: PipelineSpec, storage: Storage, run_id: str | None = None, address: str | None = None,
                 console: Console | None = None, kinds: Mapping[str, StageKind] = KINDS,
                 tracker: Tracker | None = None) -> RunRecord:
    """`kinds`: the registry whose run functions compute the stages (a test's stand-ins); `tracker`:
    where the run is also tracked (default: the pipeline file's `tracking:`, nothing without it)."""
    console = console or Console()
    tracker = tracker or open_tracker(spec.tracking, spec.name, console.line)
    run_id = validate_run_id(run_id) if run_id else new_run_id(spec.name)
    plan = make_plan(spec, storage, run_id)
    record = _start_record(spec, storage, run_id, plan)
    console.line(f"run {record.run_id} (attempt {record.attempts}) → {storage.uri}")
    runner = _Runner(record, storage, console, kinds, lease_timeout_s=spec.lease_timeout_s, tracker=tracker)
    try:
        tracker.run_started(record)
        for p in plan:
            if p.cached:
                runner.mark_cached(p)
        to_run = [p for p in plan if not p.cached]
        if to_run:
            ray_runtime.connect(address)
            runner.run(to_run, ray_runtime.capacity())
        record.status = "succeeded"
        if spec.gate is not None:
            record.gate = apply_gate(spec.gate, record, storage)  # the summary says what it decided
    except KeyboardInterrupt:
        runner.stopping.set()
        record.status = "stopped"
        for stage in record.stages.values():
            if stage.status == "running":
                stage.status, stage.error, stage.finished_at = "stopped", "interrupted", time.time()
        raise
    except BaseException:
        runner.stopping.set()
        record.status = "failed"
        raise
    finally:
        record.finished_at = time.time()
        runner.save()
        _write_report(storage, record)
        _finish_tracking(tracker, record, runner, storage)
    return record


def _write_report(storage: Storage, record: RunRecord) -> None:
    try:
        write_report(storage, record)
    except Exception:  # a report is a convenience: it must not turn a finished run into a failed one
        log.exception("could not write the run report")


def _finish_tracking(tracker: Tracker, record: RunRecord, runner: _Runner, storage: Storage) -> None:
    """Last, so that the report it sends is the final one. A required tracker that fails here fails
    a run that had succeeded; a run that failed already keeps its own error."""
    try:
        tracker.run_finished(record, storage)
    except TrackingError:
        if record.status != "succeeded":
            log.exception("tracking failed as well")
            return
        record.status = "failed"
        runner.save()
        _write_report(storage, record)
        raise


class _Runner:
    def __init__(self, record: RunRecord, storage: Storage, console: Console, kinds: Mapping[str, StageKind],
                 lease_timeout_s: float = lease_protocol.DEFAULT_TIMEOUT_S, lease_poll_s: float = 2.0,
                 tracker: Tracker = Tracker()):
        self.record, self.storage, self.console, self.kinds = record, storage, console, kinds
        self.tracker = tracker
        self.lease_timeout_s, self.lease_poll_s = lease_timeout_s, lease_poll_s
        self.stopping = threading.Event()  # set when the run stops: stages waiting on a lease give up
        self.waited_on: dict[str, str] = {}  # stage -> the run whose lease it waited on
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
        self.tracker.stage_finished(p, stage)

    def run(self, to_run: list[PlannedStage], cluster: ray_runtime.ClusterView) -> None:
        bundles = {p.name: p.spec.bundles() for p in to_run}
        most = resources.ceiling(cluster.total, cluster.most)
        for p in to_run:
            problem = resources.never_fits(p.name, bundles[p.name], most, cluster.nodes, cluster.node_types)
            if problem:
                raise UserError(problem)
        self.cluster = cluster
        free, waiting, errors = most, list(to_run), []
        succeeded = {name for name, stage in self.record.stages.items() if stage.status == "succeeded"}
        running: dict[Future, PlannedStage] = {}
        pool = ThreadPoolExecutor(max_workers=len(to_run), thread_name_prefix="stage")
        try:
            while waiting or running:
                for p in list(waiting):
                    need = resources.total(bundles[p.name])
                    if not errors and _ready(p, succeeded, running.values()) and resources.fits(need, free):
                        free = resources.subtract(free, need)
                        running[pool.submit(self._run_stage, p, need)] = p
                        waiting.remove(p)
                        self._ask_autoscaler([b for q in running.values() for b in bundles[q.name]])
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
                self._ask_autoscaler([b for q in running.values() for b in bundles[q.name]])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, do not wait for running stages here
        if errors:
            raise errors[0]

    def _ask_autoscaler(self, bundles: list[resources.Resources]) -> None:
        """Exactly the running stages' bundles: nodes for a stage that starts, and none kept for one
        that ended, so that GPU nodes scale back to zero once idle."""
        if self.cluster.autoscaling:
            ray_runtime.request_resources(bundles)

    def _watch_nodes(self, need: resources.Resources, console: StageConsole) -> threading.Event:
        """While a stage waits for the autoscaler's nodes, say how far they are; set the event to stop."""
        done = threading.Event()
        if not self.cluster.autoscaling:
            return done

        def watch() -> None:
            last = None
            while True:
                have = ray_runtime.capacity(autoscaler=False).total
                if resources.fits(need, have):
                    if last is not None:  # only after saying that it waits
                        console.line(f"nodes are up: the cluster has {resources.describe(have)}")
                    return
                if have != last:
                    console.line(f"waiting for nodes: the stage needs {resources.describe(need)}, "
                                 f"the cluster has {resources.describe(have)}")
                    last = have
                if done.wait(_NODE_POLL_S):
                    return
        threading.Thread(target=watch, name="watch-nodes", daemon=True).start()
        return done

    def _is_running(self, name: str) -> bool:
        return self.record.stages[name].status == "running"

    def _run_stage(self, p: PlannedStage, need: resources.Resources) -> None:
        stage = self.record.stages[p.name]
        out = self.storage.sub(p.key)
        attempts_before = stage.attempts
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
                self.tracker.stage_started(p)
                lease = self._lease(p, out, console)
                if lease is None:  # another run computed it while this one waited
                    stage.attempts = attempts_before
                    self._cached_by_another_run(p, out, stage)
                else:
                    with lease:
                        self._compute(p, out, need, stage, console, lease)
            except BaseException as e:
                stopped = isinstance(e, (KeyboardInterrupt, lease_protocol.WaitStopped))
                stage.status = "stopped" if stopped else "failed"
                stage.error = ("interrupted" if stopped else str(e) if isinstance(e, UserError)
                               else f"{type(e).__name__}: {e}")
                log.exception("stage %s %s", p.name, stage.status)
                stage_log.write(traceback.format_exc())
                raise
            finally:
                stage.finished_at = time.time()
                how = f" ({stage.reason})" if stage.cached else ""
                stage_log.write(f"end {stage.status}{how} after {stage.finished_at - stage.started_at:.1f}s")
                self.tracker.stage_finished(p, stage)
        self.save()
        self.console.stage_finished(p.name, stage)

    def _lease(self, p: PlannedStage, out: Storage, console: StageConsole) -> lease_protocol.Lease | None:
        """The lease to compute the stage under; None once its output is committed by whichever run
        held the lease. Waiting says who holds it, and stops when the run does."""
        def committed() -> bool:
            return out.exists(COMMIT_FILE) and not verify_commit(out, COMMIT_FILE)

        def say_who_holds(held: lease_protocol.HeldBy) -> None:
            r = held.record
            since = time.strftime("%H:%M:%S UTC", time.gmtime(r.acquired_at))
            console.line(f"waiting: run {r.run_id} (pid {r.pid} on {r.host}) has been computing this output since "
                         f"{since}, last heartbeat {held.age_s:.0f}s ago; this run uses its commit, or takes over "
                         f"{r.timeout_s:.0f}s after its last heartbeat. If that run is gone: "
                         f"orchestrator lease break {out.uri}")
            self.waited_on[p.name] = r.run_id

        lease = lease_protocol.wait_for(out, self.record.run_id, p.name, committed, say_who_holds,
                                        timeout_s=self.lease_timeout_s, poll_s=self.lease_poll_s,
                                        wait=self.stopping.wait)
        if lease is not None and lease.took_over is not None:
            gone = lease.took_over.record
            whose = "this run's earlier driver" if gone.run_id == self.record.run_id else f"run {gone.run_id}"
            console.line(f"took over from {whose} ({lease.took_over.why}); resuming from its committed work")
        return lease

    def _cached_by_another_run(self, p: PlannedStage, out: Storage, stage) -> None:
        holder = self.waited_on.get(p.name) or getattr(lease_protocol.read_latest(out), "run_id", None)
        stage.status, stage.cached = "succeeded", True
        stage.reason = f"cached: computed by run {holder}" if holder else "cached: committed meanwhile"
        stage.metrics = (read_commit(out, COMMIT_FILE) or {}).get("metrics", {})

    def _compute(self, p: PlannedStage, out: Storage, need: resources.Resources, stage, console: StageConsole,
                 lease: lease_protocol.Lease) -> None:
        if out.exists(COMMIT_FILE):  # present but did not verify: move it out of the way to redo the stage
            log.warning("stage %s: discarding a commit that does not verify: %s", p.name, p.reason)
            out.delete(COMMIT_FILE)
        nodes_up = self._watch_nodes(need, console)
        try:
            context = StageContext(p.name, p.hash, p.spec, out, p.upstream_uris, console, self._is_running,
                                   on_step=functools.partial(self.tracker.step, p.name))
            output = self.kinds[p.kind].run_function()(context)
        finally:
            nodes_up.set()
        stage.attempts += output.attempts - 1
        try:  # what the record keeps must read back as the kind's results
            metrics = self.kinds[p.kind].results.model_validate(output.metrics).model_dump(mode="json")
        except ValidationError as e:
            raise RuntimeError(f"stage {p.name}: its results do not match {p.kind}'s: {e}") from None
        if not lease.still_held():
            holder = lease_protocol.read_latest(out)
            raise RuntimeError(f"stage {p.name}: lost the lease on {out.uri} to "
                               f"{holder.broken_by or 'run ' + holder.run_id}; not committing over its work")
        meta = {"stage": p.name, "kind": p.kind, "hash": p.hash, "inputs": p.inputs, "metrics": metrics}
        if not write_commit(out, COMMIT_FILE, output.files, meta) and verify_commit(out, COMMIT_FILE):
            raise RuntimeError(f"stage {p.name}: another commit appeared at {out.url(COMMIT_FILE)} and does not verify")
        stage.status, stage.metrics = "succeeded", metrics


def _ready(p: PlannedStage, succeeded: set[str], running) -> bool:
    """Every stage it reads has succeeded; a stage it runs beside (evaluate's `follow`) has started."""
    beside = KINDS[p.kind].beside
    started = succeeded | {q.name for q in running}
    return all(ref in (started if field in beside else succeeded) for field, ref in p.upstream.items())


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
