"""Training stages (pretrain, finetune): `jobs.train.train` on N Ray Train workers (GPUs +
NCCL, or CPUs + gloo).

Ray Train places the workers (across nodes if it must) and restarts the whole worker group on a
failure, up to `max_failures` times; the loop itself resumes from the newest committed
checkpoint, so a restart costs at most `checkpoint_every` steps. Rank 0 streams its metrics to the
driver through a Ray queue: that is the live progress line, and how the driver learns how many
times the group started and where it resumed from. The fit thread's last message says it ended,
so the driver waits on the queue alone; what the stage commits (the record's metrics, the
export's files) is rank 0's return value, which `fit` hands back as `Result.return_value`.

Ray Train's own record. The stage's output directory is Ray Train's run directory (the run is
named after it, e.g. `pretrain-1a2b3c4d`, on local disk or on S3 through a pyarrow filesystem
configured like boto3, `AWS_ENDPOINT_URL` included), and each checkpoint the stage keeps
(`checkpoint_steps`: retention's survivors) is registered with `ray.train.report(...,
checkpoint_upload_mode=NO_UPLOAD)` once its COMMIT.json is written: Ray records our
`ckpt/step-N` directory itself, with no second upload, and the metrics of rank 0's report at
that step. So `Result.checkpoint` is the last step's, `Result.metrics` its metrics,
`best_checkpoints` / `metrics_dataframe` the kept ones, and `ray.train.Result.from_path(<stage
dir>)` reads them back after the run. Our commits stay the truth: resume reads them, not
`ray.train.get_checkpoint()`, and only our retention deletes (Ray keeps every checkpoint it is
given, `num_to_keep=None`). Registering only the survivors keeps Ray's list true: a checkpoint
it listed and retention then deleted would make Ray refuse that directory
(`CheckpointManagerInitializationError`), the next fit of a resumed stage included. For the same
reason each fit starts without the previous fit's list (a checkpoint it names may have gone
since, e.g. one that failed its checksums): Ray's record covers the stage's last fit.

Why the queue stays. Ray Train V2 keeps only metrics attached to a checkpoint; a report without
one reaches only callbacks, which run in Ray Train's controller actor, not on the driver, and
each report is a barrier across the workers that waits for the controller to take the previous
one (it polls every 2 s): reporting every step's metrics to Ray would slow training and show
them nowhere. The queue carries them to the driver as they happen.
"""

from __future__ import annotations

import os
import posixpath
import threading

import ray
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jobs.checkpoint import step_key
from jobs.mixture import MixtureSource
from jobs.storage import Storage
from jobs.train import TrainJob, train
from jobs.train_spec import TrainSpec
from orchestrator import ray_internals
from orchestrator.kinds.training import DataSource, TrainResults, checkpoint_steps
from orchestrator.stages import StageContext, StageOutput

_FIT_ENDED = {"event": "fit-ended"}
_LIVENESS_S = 10.0  # how often to check that the fit thread is alive, should its last message be lost
MIXTURE_VAL_SEQUENCES = 64  # validation sequences scored per source of a mixture, at most
MIXTURE_VAL_BATCH = 8


def data_fields(ctx: StageContext, data: str | list[DataSource]) -> dict:
    """The job's data: one preprocess stage's output, or a mixture's sources (inputs `data[i]`)."""
    if isinstance(data, str):
        return {"data_uri": ctx.inputs["data"]}
    return {"mixture": [MixtureSource(s.stage, ctx.inputs[f"data[{i}]"], s.weight) for i, s in enumerate(data)]}


def run_training(ctx: StageContext, job_fields: dict) -> StageOutput:
    """Train with the stage's TrainSpec fields and `job_fields` (the data and the starting model)."""
    spec = ctx.spec
    # On the driver's node, with no CPU: a queue on a worker node would die with that node and take
    # the stage down with it, before Ray Train could restart the workers elsewhere.
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)})
    job = TrainJob(spec=TrainSpec.model_validate(spec.model_dump(include=set(TrainSpec.model_fields))),
                   out_uri=ctx.out.uri, config_hash=ctx.hash, **job_fields)
    trainer = _trainer(ctx.out, spec, job, queue)
    outcome: dict = {}
    fit = threading.Thread(target=_fit, args=(trainer, outcome, queue), daemon=True)
    fit.start()
    starts, last = 0, {}
    with ctx.console.progress(spec.steps, "steps") as advance:
        while True:
            try:
                message = queue.get(timeout=_LIVENESS_S)
            except Empty:
                if fit.is_alive():
                    continue
                break
            if message == _FIT_ENDED:
                break
            if "warning" in message or "note" in message:
                ctx.console.line(f"  {message.get('warning') or message['note']}")
            elif message.get("event") == "started":
                starts += 1
                if message["resumed_from"] is not None:
                    ctx.console.line(f"  resumed from step {message['resumed_from']}")
            else:
                advance(message["step"] - last.get("step", message.get("resumed_from") or 0))
                last = message
                ctx.console.line(_progress_line(message))
                ctx.on_step(message)
    fit.join()
    if "error" in outcome:
        raise outcome["error"]
    final = outcome["result"].return_value
    metrics = {k: final["metrics"].get(k) for k in TrainResults.model_fields if k != "restarts"}
    metrics["restarts"] = max(starts - 1, 0)
    if job.mixture:
        metrics["val_perplexity"] = _source_perplexities(ctx, job.mixture)
    return StageOutput(final["files"], metrics, attempts=max(starts, 1))


def _source_perplexities(ctx: StageContext, sources: list[MixtureSource]) -> dict[str, float]:
    """The export's perplexity on each source's validation split, in one Ray task (the workers'
    resources are free again), as the evaluate stage scores perplexity."""
    from orchestrator.stages.evaluate import source_perplexities

    ctx.console.line(f"  scoring each source's validation split: {', '.join(s.name for s in sources)}")
    task = source_perplexities.options(num_cpus=ctx.spec.cpus_per_worker, num_gpus=1 if ctx.spec.use_gpu else 0)
    return ray.get(task.remote(ctx.out.url("hf"), {s.name: s.uri for s in sources}, MIXTURE_VAL_SEQUENCES,
                               MIXTURE_VAL_BATCH))


def _fit(trainer, outcome: dict, queue: Queue) -> None:
    try:
        outcome["result"] = trainer.fit()
    except BaseException as e:  # re-raised on the stage's thread
        outcome["error"] = e
    finally:
        queue.put(_FIT_ENDED)


def _trainer(out: Storage, spec, job: TrainJob, queue: Queue):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    worker_env = {} if spec.use_gpu else {"DS_ACCELERATOR": "cpu"}
    out.delete(ray_internals.train_snapshot_name())  # the previous fit's list (see the module docstring)
    parent, name, filesystem = _ray_train_storage(out)
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "queue": queue, "kept": checkpoint_steps(spec)},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker,
                                                           **spec.resources_per_worker}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # our retention deletes, Ray never does
            failure_config=FailureConfig(max_failures=spec.max_failures),
            worker_runtime_env={"env_vars": worker_env},
        ),
    )


def _ray_train_storage(out: Storage) -> tuple[str, str, pyarrow.fs.FileSystem | None]:
    """(storage_path, name, storage_filesystem) that make Ray Train's run directory the stage's
    output directory `out`. On S3, a pyarrow filesystem that finds credentials as boto3 does
    (environment, profile, IAM role); pyarrow does not read `AWS_ENDPOINT_URL`, so it is passed
    on. The filesystem pickles without credentials: each process finds its own."""
    from jobs.storage_s3 import S3Storage

    if not isinstance(out, S3Storage):
        return *posixpath.split(out.root), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=endpoint) if endpoint else pyarrow.fs.S3FileSystem()
    return *posixpath.split(f"{out.bucket}/{out.prefix}"), filesystem


def _worker_loop(config: dict) -> dict | None:
    """One worker: `train(job)`, rank 0's messages to the driver's queue, and each kept checkpoint
    registered with Ray Train as its commit is done. Rank 0 returns what the stage commits."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    job: TrainJob = config["job"]
    queue: Queue = config["queue"]
    kept: list[int] = config["kept"]
    context = ray.train.get_context()
    rank, storage = context.get_world_rank(), context.get_storage()
    # What an earlier worker group of this fit registered last, the same on every rank: a resume
    # from it must not register it twice. Every rank decides alike whether to report: a report is
    # a barrier.
    registered = ray.train.get_checkpoint()
    steps_reported: list[dict] = []  # rank 0's step reports, oldest first; a checkpoint carries its step's

    def report(message: dict) -> None:
        queue.put(message)
        if "step" in message:
            steps_reported.append(message)

    def register(step: int) -> None:
        earlier = [m for m in steps_reported if m["step"] <= step]
        del steps_reported[:max(len(earlier) - 1, 0)]  # the newest of them may serve a later checkpoint too
        path = f"{storage.experiment_fs_path}/ckpt/{step_key(step)}"
        if step not in kept or (registered is not None and registered.path == path):
            return
        ray.train.report(earlier[-1] if earlier else {"step": step},
                         checkpoint=Checkpoint(path, storage.storage_filesystem) if rank == 0 else None,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    job.report = report
    job.on_commit = register
    job.on_start = (lambda resumed_from: queue.put({"event": "started", "resumed_from": resumed_from})) if rank == 0 else None
    result = train(job)
    return {"metrics": result.metrics, "files": result.files} if rank == 0 else None


def _progress_line(m: dict) -> str:
    mfu = f"  mfu {m['mfu']:.1%}" if m.get("mfu") else ""
    return (f"  step {m['step']:>6}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  grad norm {m['grad_norm'] or 0:.3f}  "
            f"{m['tokens_per_s']:,.0f} tokens/s  {m['tflops_per_device']:.2f} TFLOP/s/device{mfu}  "
            f"peak {m['peak_memory_gib']:.1f} GiB{_mixture_progress(m.get('tokens_per_source'))}")


def _mixture_progress(tokens_per_source: dict[str, int] | None) -> str:
    """Each source's share of the tokens so far, e.g. `  mix web 70% code 30%`."""
    if not tokens_per_source:
        return ""
    total = sum(tokens_per_source.values())
    return "  mix " + " ".join(f"{name} {tokens / total:.0%}" for name, tokens in tokens_per_source.items())
