"""Training stages (pretrain, finetune): `jobs.train.train` on N Ray Train workers (GPUs +
NCCL, or CPUs + gloo).

Ray Train places the workers (across nodes if it must) and restarts the whole worker group on a
failure, up to `max_failures` times; the loop itself resumes from the newest committed
checkpoint, so a restart costs at most `checkpoint_every` steps. Rank 0 streams its metrics to the
driver through a Ray queue: that is the live progress line, and how the driver learns how many
times the group started and where it resumed from. The fit thread's last message says it ended,
so the driver waits on the queue alone.
"""

from __future__ import annotations

import os
import tempfile
import threading

import ray
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jobs.mixture import MixtureSource
from jobs.train import TrainJob, train
from jobs.train_spec import TrainSpec
from orchestrator.kinds.training import DataSource, TrainResults
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
    trainer = _trainer(ctx.name, spec, job, queue)
    outcome: dict = {}
    fit = threading.Thread(target=_fit, args=(trainer, outcome, queue), daemon=True)
    fit.start()
    starts, final, last = 0, None, {}
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
            elif message.get("event") == "finished":
                final = message
            else:
                advance(message["step"] - last.get("step", message.get("resumed_from") or 0))
                last = message
                ctx.console.line(_progress_line(message))
    fit.join()
    if "error" in outcome:
        raise outcome["error"]
    if final is None:
        raise RuntimeError(f"stage {ctx.name}: training ended without a final report")
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
        trainer.fit()
    except BaseException as e:  # re-raised on the stage's thread
        outcome["error"] = e
    finally:
        queue.put(_FIT_ENDED)


def _trainer(name: str, spec, job: TrainJob, queue: Queue):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    worker_env = {} if spec.use_gpu else {"DS_ACCELERATOR": "cpu"}
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "queue": queue},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker,
                                                           **spec.resources_per_worker}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=os.path.join(tempfile.gettempdir(), "orchestrator-ray-train"),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            worker_runtime_env={"env_vars": worker_env},
        ),
    )


def _worker_loop(config: dict) -> None:
    import ray.train

    job: TrainJob = config["job"]
    queue: Queue = config["queue"]
    rank = ray.train.get_context().get_world_rank()
    job.report = queue.put
    job.on_start = (lambda resumed_from: queue.put({"event": "started", "resumed_from": resumed_from})) if rank == 0 else None
    result = train(job)
    if rank == 0:
        queue.put({"event": "finished", "metrics": result.metrics, "files": result.files})


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
