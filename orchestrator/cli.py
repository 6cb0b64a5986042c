"""The `orchestrator` command. Exit codes (a contract): 0 ok, 1 the run failed, 2 bad input; a run
stopped by Ctrl-C exits 130, by SIGTERM 143.

A cluster that cannot be reached or refuses the token is bad input too (exit 2): nothing ran, and
the fix is the address, the tunnel or the token."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time

from jobs.storage import InvalidKeyError, open_storage
from orchestrator.console import Console
from orchestrator.errors import UserError
from orchestrator.spec import PipelineSpec, load_spec

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130 and 143, as shells report them
DEFAULT_STORAGE = "file://./.orchestrator"
DASHBOARD = "the Ray cluster's dashboard URL, e.g. http://127.0.0.1:8265"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except (UserError, InvalidKeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="LLM training pipelines on Ray.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a pipeline file; every problem at once")
    p.add_argument("spec")
    p.set_defaults(command=_validate)

    p = sub.add_parser("plan", help="each stage's hash, output and whether (and why) it runs")
    p.add_argument("spec")
    p.add_argument("--storage", help="storage root (file://DIR or s3://bucket/prefix); overrides the file's")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(command=_plan)

    p = sub.add_parser("run", help="run the pipeline now; the same --run-id resumes a run")
    p.add_argument("spec")
    p.add_argument("--run-id", help="resume this run, or name a new one")
    p.add_argument("--storage", help="storage root (file://DIR or s3://bucket/prefix); overrides the file's")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    p.set_defaults(command=_run)

    p = sub.add_parser("submit", help="run the pipeline's driver on a Ray cluster as a Ray job; prints the run id")
    p.add_argument("spec")
    p.add_argument("--address", required=True, help=DASHBOARD)
    p.add_argument("--run-id", help="the run id, also the job's submission id (default: a new one)")
    p.add_argument("--storage", help="storage root the cluster writes to (s3://bucket/prefix, or an absolute "
                                     "file:// directory the nodes share); overrides the file's")
    p.set_defaults(command=_submit)

    p = sub.add_parser("schedule", help="run the pipeline on its cron `schedule:`, one run per tick (runs until stopped)")
    p.add_argument("spec")
    p.add_argument("--address", help=f"submit each run to this cluster as a Ray job: {DASHBOARD} (default: run "
                                     "each on this machine)")
    p.add_argument("--storage", help="storage root (file://DIR or s3://bucket/prefix); overrides the file's")
    p.add_argument("--once", action="store_true", help="fire the ticks due now and exit (after the runs, when local)")
    p.add_argument("--now", help="with --once: act as if it were this ISO 8601 time (no offset: the schedule's zone)")
    p.add_argument("--list", action="store_true", help="show the next fire times and the recent ticks with their runs")
    p.add_argument("--json", action="store_true", help="with --list: machine-readable output")
    p.set_defaults(command=_schedule)

    p = sub.add_parser("render", help="write deployment manifests for the pipeline's schedule")
    p.add_argument("target", choices=["kuberay"])
    p.add_argument("spec")
    p.add_argument("--kind", choices=["cronjob", "raycronjob"], default="cronjob",
                   help="a Kubernetes CronJob that submits to a running RayCluster (default), or a KubeRay "
                        "RayCronJob (KubeRay >= 1.6) with a cluster per run")
    p.add_argument("--storage", help="storage root the cluster writes to (s3://...); overrides the file's")
    p.add_argument("--out", help="write here instead of printing")
    p.set_defaults(command=_render)

    p = sub.add_parser("export", help="a committed checkpoint, or a run's last one, as a Hugging Face model")
    p.add_argument("source", metavar="CHECKPOINT_OR_RUN",
                   help="a checkpoint URI (.../ckpt/step-N), a training stage's output URI, or a run id")
    p.add_argument("--out", required=True, help="the directory to write (safetensors, config, tokenizer)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root for a run id (default: %(default)s)")
    p.set_defaults(command=_export)

    job_storage = f"storage root (default: the submitted job's, else {DEFAULT_STORAGE})"
    p = sub.add_parser("runs", help="list the runs kept in storage, or submitted to a cluster")
    p.add_argument("--storage", help=f"storage root (default: {DEFAULT_STORAGE}; with --address, "
                                     "only the records of the cluster's jobs)")
    p.add_argument("--address", help=f"also list the runs submitted to this cluster, with Ray's status: {DASHBOARD}")
    p.set_defaults(command=_runs)

    p = sub.add_parser("status", help="one run's record")
    p.add_argument("run_id")
    p.add_argument("--storage", help=job_storage)
    p.add_argument("--address", help=f"also show the Ray job's status: {DASHBOARD}")
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.set_defaults(command=_status)

    p = sub.add_parser("logs", help="a run's stage logs: every stage's in order, or one; -f follows a running run")
    p.add_argument("run_id")
    p.add_argument("--stage", help="only this stage's log")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the run ends")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root (default: %(default)s)")
    p.add_argument("--address", help=f"the driver's output as Ray keeps it (`ray job logs`) instead: {DASHBOARD}")
    p.set_defaults(command=_logs)

    p = sub.add_parser("stop", help="stop a submitted run: Ray stops its driver, the record says stopped")
    p.add_argument("run_id")
    p.add_argument("--address", required=True, help=DASHBOARD)
    p.add_argument("--storage", help=job_storage)
    p.set_defaults(command=_stop)

    p = sub.add_parser("lease", help="show or break the lease a run holds on a stage output (a run that died "
                                     "leaves one that others wait out for lease_timeout_s)")
    p.add_argument("action", choices=["show", "break"])
    p.add_argument("stage_uri", metavar="STAGE_OUTPUT_URI", help="the stage's output, e.g. "
                                                               "s3://bucket/prefix/stages/pretrain-1a2b3c4d")
    p.set_defaults(command=_lease)

    p = sub.add_parser("report", help="write (or refresh) a run's report: stages, loss curves, evaluation, models")
    p.add_argument("run_id")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root (default: %(default)s)")
    p.set_defaults(command=_report)

    p = sub.add_parser("gc", help="delete stage outputs, checkpoints and run records that no kept run, alias or "
                                  "lease uses; prints what it frees and what it keeps, and why")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root (default: %(default)s)")
    p.add_argument("--keep-runs", type=int, default=10, metavar="N",
                   help="runs kept per pipeline, newest first, besides running and aliased ones (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="delete nothing; list what would be freed and kept")
    p.set_defaults(command=_gc)

    p = sub.add_parser("du", help="storage used per stage output (and its checkpoints) and per pipeline")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root (default: %(default)s)")
    p.set_defaults(command=_du)
    return parser


def _gc(args) -> int:
    from orchestrator.gc import run_gc

    print("\n".join(run_gc(_storage(None, args.storage), args.keep_runs, args.dry_run)))
    return EXIT_OK


def _du(args) -> int:
    from orchestrator.usage import usage_lines

    print("\n".join(usage_lines(_storage(None, args.storage))))
    return EXIT_OK


def _lease(args) -> int:
    import getpass
    import socket

    from orchestrator import lease

    if not re.search(r"/stages/[a-z0-9][a-z0-9_-]*-[0-9a-f]{8}/?$", args.stage_uri):
        raise UserError(f"{args.stage_uri!r} is not a stage output; give one that ends in /stages/<name>-<hash>, "
                        "as the waiting run's message or `orchestrator plan` prints it")
    stage_dir = _storage(None, args.stage_uri)
    held = lease.read_latest(stage_dir)
    if args.action == "show" or held is None or held.released:
        if held is None:
            print(f"{args.stage_uri}: no lease")
        else:
            state = ("broken by " + held.broken_by if held.broken_by else "released") if held.released else "held"
            print(f"{args.stage_uri}: {state}: run {held.run_id} (pid {held.pid} on {held.host}) since "
                  f"{_utc(held.acquired_at)}, last heartbeat {time.time() - held.heartbeat_at:.0f}s ago")
        return EXIT_OK
    broken = lease.break_lease(stage_dir, by=f"{getpass.getuser()}@{socket.gethostname()} via the CLI")
    if broken is None:
        print(f"{args.stage_uri}: released meanwhile; nothing to break")
    else:
        print(f"{args.stage_uri}: broke run {broken.run_id}'s lease (pid {broken.pid} on {broken.host}); "
              "if it is alive it stops without committing, and the next run to look computes the stage")
    return EXIT_OK


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _storage(spec: PipelineSpec | None, override: str | None):
    uri = override or spec.storage
    try:
        return open_storage(uri)
    except ValueError as e:
        raise UserError(f"--storage: {e}") from None


def _validate(args) -> int:
    spec = load_spec(args.spec)
    print(f"{args.spec}: valid pipeline {spec.name!r}, stages: {', '.join(spec.topological_order())}")
    return EXIT_OK


def _plan(args) -> int:
    from orchestrator.plan import make_plan

    spec = load_spec(args.spec)
    plan = make_plan(spec, _storage(spec, args.storage))
    if args.json:
        print(json.dumps([{"stage": p.name, "kind": p.kind, "hash": p.hash, "output_uri": p.uri,
                           "cached": p.cached, "reason": p.reason, "upstream": p.upstream} for p in plan], indent=2))
        return EXIT_OK
    for p in plan:
        state = "cached" if p.cached else "run"
        print(f"{p.name:<12} {p.kind:<11} {p.hash[:8]}  {state:<6} {p.reason if not p.cached else ''}")
        print(f"{'':<12} {'':<11} → {p.uri}")
    return EXIT_OK


def _run(args) -> int:
    from orchestrator.records import new_run_id, validate_run_id
    from orchestrator.runner import run_pipeline

    spec = load_spec(args.spec)
    storage = _storage(spec, args.storage)
    run_id = validate_run_id(args.run_id) if args.run_id else new_run_id(spec.name)
    log_path = _log_to_file(run_id)
    console = Console()
    try:
        _stop_on_sigterm()  # ray_runtime.connect keeps it across ray.init
        record = run_pipeline(spec, storage, run_id=run_id, address=args.address, console=console)
    except UserError:
        raise
    except KeyboardInterrupt as e:
        # The runner has marked the record and its running stages stopped. Stop this driver's Ray
        # work (an embedded Ray goes with it; on a cluster, the driver's tasks and actors end with
        # its connection), then leave at once: the stage threads still running would otherwise
        # hold the process until their stage ends.
        print(f"stopped; the record says so, and `orchestrator run {args.spec} --run-id {run_id}` resumes it",
              file=sys.stderr)
        from orchestrator import ray_runtime

        ray_runtime.disconnect()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_TERMINATED if isinstance(e, _Terminated) else EXIT_INTERRUPTED)
    except Exception as e:  # the traceback is in the log file; the terminal gets one line
        print(f"run failed: {type(e).__name__}: {e}\nsee {log_path}", file=sys.stderr)
        return EXIT_FAILED
    console.summary(record, log_path)
    return EXIT_OK


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be."""


def _stop_on_sigterm() -> None:
    """SIGTERM (Ray's stop_job, `kill`, a container stopping) stops the run as Ctrl-C does: the
    runner marks the record and its running stages stopped. A second SIGTERM is not caught."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise _Terminated

    signal.signal(signal.SIGTERM, stop)


def _submit(args) -> int:
    from orchestrator import submit
    from orchestrator.records import new_run_id, validate_run_id

    # Everything that can be checked here is, before the cluster is contacted.
    spec = load_spec(args.spec)
    storage_uri = submit.storage_for_cluster(args.storage or spec.storage)
    run_id = validate_run_id(args.run_id) if args.run_id else new_run_id(spec.name)
    files = submit.files_to_ship(spec)
    client = submit.open_client(args.address)
    started, job = submit.submit(client, args.spec, spec, files, run_id, storage_uri)
    print(run_id)
    if started:
        print(f"submitted as Ray job {run_id} ({job.status}) with {len(files)} input file(s); records in {storage_uri}\n"
              f"follow it: orchestrator logs {run_id} -f --address {args.address}", file=sys.stderr)
    else:
        print(f"run {run_id} is already a Ray job on {args.address}: {job.status}; nothing submitted", file=sys.stderr)
    return EXIT_OK


def _schedule(args) -> int:
    from datetime import datetime, timezone

    from orchestrator.scheduler import Scheduler, format_listing

    spec = load_spec(args.spec)
    if spec.schedule is None:
        raise UserError(f"{args.spec}: the pipeline has no `schedule:`; add e.g. `schedule: {{cron: \"30 2 * * *\", "
                        "timezone: UTC}` (see README, Scheduling)")
    if args.now and not (args.once or args.list):
        raise UserError("--now: only with --once or --list (a scheduler that runs on keeps real time)")
    now = _parse_now(args.now, spec.schedule.zone) if args.now else datetime.now(timezone.utc)
    storage, launcher = _schedule_launcher(args, spec)
    clock = (lambda: now.timestamp()) if args.now else time.time
    scheduler = Scheduler(spec, storage, launcher, clock=clock, say=lambda line: print(line, flush=True))
    if args.list:
        listing = scheduler.listing(now)
        print(json.dumps(listing, indent=2) if args.json else format_listing(listing))
        return EXIT_OK
    if args.once:
        scheduler.fire_due(now)
        waited = getattr(launcher, "wait", lambda: True)()  # local runs: this process is their parent
        scheduler.say_ended()
        return EXIT_OK if waited else EXIT_FAILED
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    print(f"scheduling {spec.name}: '{spec.schedule.cron}' in {spec.schedule.timezone}; Ctrl-C stops "
          "(runs already started go on)", flush=True)
    try:
        scheduler.run_forever(sleep=lambda s: _sleep_unless(stopping, s), stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _sleep_unless(stopping: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stopping and time.monotonic() < deadline:
        time.sleep(min(1.0, deadline - time.monotonic()))


def _parse_now(text: str, zone):
    from datetime import datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--now {text!r}: not an ISO 8601 time; e.g. 2026-11-26T02:30:00+01:00") from None
    return when if when.tzinfo else when.replace(tzinfo=zone)


def _schedule_launcher(args, spec: PipelineSpec):
    from orchestrator import submit
    from orchestrator.launchers import LocalLauncher, RayJobLauncher

    if args.address:
        uri = submit.storage_for_cluster(args.storage or spec.storage)
        return open_storage(uri), RayJobLauncher(args.address, args.spec, spec, uri)
    storage = _storage(spec, args.storage)
    return storage, LocalLauncher(os.path.abspath(args.spec), spec, storage, _log_dir())


def _render(args) -> int:
    from orchestrator.render import render_kuberay

    spec = load_spec(args.spec)
    if args.storage:
        spec = spec.model_copy(update={"storage": args.storage})
    text = render_kuberay(args.spec, spec, kind=args.kind)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}: kubectl apply -f {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return EXIT_OK


def _runs(args) -> int:
    from orchestrator import submit
    from orchestrator.records import list_records, load_record

    jobs = {job.submission_id: job for job in submit.pipeline_jobs(submit.open_client(args.address))} if args.address else {}
    if args.storage or not args.address:
        for r in list_records(_storage(None, args.storage or DEFAULT_STORAGE)):
            print(_run_line(r.run_id, r.pipeline, r, jobs.pop(r.run_id, None), bool(args.address)))
    storages = {}
    for run_id, job in jobs.items():  # each submitted run's record, from the storage it was given
        uri = submit.job_storage(job)
        if uri not in storages:
            storages[uri] = _storage(None, uri)
        print(_run_line(run_id, job.metadata[submit.PIPELINE_KEY], load_record(storages[uri], run_id), job, True))
    return EXIT_OK


def _run_line(run_id: str, pipeline: str, record, job, with_job: bool) -> str:
    status, stages = ("-", "-") if record is None else (
        record.status, f"{sum(s.status == 'succeeded' for s in record.stages.values())}/{len(record.stages)}")
    line = f"{run_id:<40} {pipeline:<16} {status:<10} {stages} stages"
    return line + (f"  ray job: {job.status if job else '-'}" if with_job else "")


def _status(args) -> int:
    from orchestrator import submit
    from orchestrator.records import load_record
    from orchestrator.report import format_duration, format_time, stage_rows

    job = submit.find_job(submit.open_client(args.address), args.run_id) if args.address else None
    storage = _storage(None, args.storage or (submit.job_storage(job) if job else None) or DEFAULT_STORAGE)
    # A submitted job has no record until its driver has started.
    record = load_record(storage, args.run_id) if job else _load_run(storage, args.run_id)
    if args.json:
        if not args.address:
            print(record.model_dump_json(indent=2))
            return EXIT_OK
        out = record.model_dump(mode="json") if record else {"run_id": args.run_id}
        out["ray_job"] = submit.job_summary(job) if job else None
        print(json.dumps(out, indent=2))
        return EXIT_OK
    if args.address:
        print(f"ray job {args.run_id}: {job.status}, {job.message}" if job else
              f"ray job {args.run_id}: none on the cluster at {args.address}")
    if record is None:
        print(f"no run record (yet) at {storage.url(f'runs/{args.run_id}/run.json')}")
        return EXIT_OK
    elapsed = (record.finished_at or time.time()) - record.started_at
    print(f"run {record.run_id} ({record.pipeline}): {record.status}, driver attempt {record.attempts}, "
          f"started {format_time(record.started_at)}, {format_duration(elapsed)}")
    widths = [12, 11, 10, 6, 8, 8]
    for row in stage_rows(record):
        *cells, metric = row
        print("  " + " ".join(f"{c:<{w}}" for c, w in zip(cells, widths)) + f" {metric}".rstrip())
    for name, stage in record.stages.items():
        if stage.error:
            print(f"  {name}: {stage.error}")
    if record.gate is not None:
        from orchestrator.console import gate_summary

        print(f"gate: {gate_summary(record.gate)}")
    print(f"record: {record.storage.rstrip('/')}/runs/{record.run_id}/run.json")
    return EXIT_OK


def _logs(args) -> int:
    from orchestrator.stage_log import follow_log, read_log

    if args.address:
        return _job_logs(args)
    storage = _storage(None, args.storage)
    record = _load_run(storage, args.run_id)
    if args.stage is not None and args.stage not in record.stages:
        raise UserError(f"--stage {args.stage!r}: run {record.run_id} has no such stage; "
                        f"its stages: {', '.join(record.stages)}")
    if not args.follow:
        text = read_log(storage, record.run_id, args.stage)
        if not text:
            which = f"stage {args.stage}" if args.stage else f"run {record.run_id}"
            print(f"no log yet for {which} (a cached stage has none)", file=sys.stderr)
        sys.stdout.write(text)
        return EXIT_OK
    try:
        for text in follow_log(storage, record.run_id, args.stage):
            sys.stdout.write(text)
            sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C ends following; the run itself goes on
        pass
    return EXIT_OK


def _job_logs(args) -> int:
    from orchestrator import submit

    if args.stage is not None:
        raise UserError("--stage reads one stage's log from storage, --address the driver's output from Ray; "
                        "give one of them")
    client = submit.open_client(args.address)
    submit.require_job(client, args.run_id, args.address)
    if not args.follow:
        sys.stdout.write(client.get_job_logs(args.run_id))
        return EXIT_OK

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        status = submit.follow_job_logs(client, args.run_id, write)
    except KeyboardInterrupt:  # Ctrl-C ends following; the job itself goes on
        return EXIT_OK
    print(f"ray job {args.run_id}: {status}", file=sys.stderr)
    return EXIT_OK


def _stop(args) -> int:
    from orchestrator import submit
    from orchestrator.records import load_record

    client = submit.open_client(args.address)
    job = submit.require_job(client, args.run_id, args.address)
    try:
        was_running, status = submit.stop_job(client, job)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    storage = _storage(None, args.storage or submit.job_storage(job) or DEFAULT_STORAGE)
    record = submit.mark_stopped(storage, args.run_id) if status == "STOPPED" else load_record(storage, args.run_id)
    state = record.status if record else f"none at {storage.url(f'runs/{args.run_id}/run.json')}"
    print(f"run {args.run_id}: Ray job {status}{'' if was_running else ' (it had already ended)'}; record: {state}")
    return EXIT_OK


def _report(args) -> int:
    from orchestrator.report import write_report

    storage = _storage(None, args.storage)
    print(f"report: {write_report(storage, _load_run(storage, args.run_id))}")
    return EXIT_OK


def _load_run(storage, run_id: str):
    from orchestrator.records import load_record

    record = load_record(storage, run_id)
    if record is None:
        raise UserError(f"no run {run_id!r} in {storage.uri}; `orchestrator runs --storage {storage.uri}` lists them")
    return record


def _export(args) -> int:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidating weights needs no GPU
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from jobs.checkpoint import committed_steps, step_key
    from jobs.export import export_checkpoint

    source = args.source
    if "://" not in source and not os.path.exists(source):
        source = _last_checkpoint_of_run(args.storage, source)
    storage = _storage(None, source)
    if not storage.exists("COMMIT.json"):  # a training stage's directory: its newest checkpoint
        steps, _ = committed_steps(storage.sub("ckpt"))
        if not steps:
            raise UserError(f"{source}: neither a committed checkpoint nor a training stage with one")
        storage = storage.sub(f"ckpt/{step_key(steps[0])}")
    try:
        export_checkpoint(storage, args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"exported {storage.uri} -> {os.path.abspath(args.out)}")
    return EXIT_OK


def _last_checkpoint_of_run(storage_uri: str, run_id: str) -> str:
    from orchestrator.kinds import KINDS
    from orchestrator.kinds.training import TrainResults
    from orchestrator.records import load_record

    record = load_record(_storage(None, storage_uri), run_id)
    if record is None:
        raise UserError(f"{run_id!r} is neither a checkpoint URI nor a run in {storage_uri} (see `orchestrator runs`)")
    results = [KINDS[s.kind].results_of(s.metrics) for s in record.stages.values() if s.kind in KINDS]
    trained = [r.last_checkpoint for r in results if isinstance(r, TrainResults) and r.last_checkpoint]
    if not trained:
        raise UserError(f"run {run_id} has no training stage with a committed checkpoint")
    return trained[-1]


def _log_dir() -> str:
    return os.environ.get("ORCHESTRATOR_LOG_DIR", os.path.expanduser("~/.cache/orchestrator/logs"))


def _log_to_file(run_id: str) -> str:
    """Our own log (and tracebacks) go to a file; the terminal only gets the stage lines."""
    log_dir = _log_dir()
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"{run_id}.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


if __name__ == "__main__":
    sys.exit(main())
