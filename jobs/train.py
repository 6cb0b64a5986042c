"""The training loop that pretraining and fine-tuning share: DeepSpeed ZeRO on every rank.

`train(job)` runs on each worker. It does not know about Ray: Ray Train starts it with the
process group already set up; `python -m jobs.train JOB.json` under `torchrun` starts it bare,
and it sets the process group up itself. Nothing here assumes one node: ranks come from the
process group, devices from LOCAL_RANK, data from storage.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from jobs import lora
from jobs.batch_stream import BatchStream
from jobs.checkpoint import CheckpointWriter, committed_steps, discard_after, fetch_for_rank, step_key
from jobs.commit import FileEntry, file_entry
from jobs.data import BatchOrder, PackedTokens
from jobs.deepspeed_config import build_deepspeed_config, load_user_config
from jobs.export import TOKENIZER_FILES, gather_state_dict, save_hf
from jobs.faults import crash_point
from jobs.lora import LoraSpec
from jobs.model import flops_per_token, llama_config
from jobs.mixture import MixtureData, MixtureOrder, MixtureSource
from jobs.model_init import build_model, local_parameter_bytes, model_parameter_bytes
from jobs.sft import SFTExamples
from jobs.speed import apply_speed
from jobs.storage import open_storage
from jobs.train_spec import TrainSpec

# Dense bf16 peak FLOP/s per device, as the vendors state them (no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class TrainJob:
    spec: TrainSpec
    out_uri: str  # the training stage's output: ckpt/, hf/, tb/
    config_hash: str  # the stage hash: a checkpoint is only resumed by the same configuration
    data_uri: str | None = None  # a preprocess stage's output: packed sequences, every token a label
    mixture: list[MixtureSource] | None = None  # or several, mixed by weight (jobs.mixture)
    sft_uri: str | None = None  # or prompt/response rows from jobs.sft, labels on the responses only
    init_uri: str | None = None  # a Hugging Face directory to start from; None: random weights
    lora: LoraSpec | None = None  # train low-rank adapters on the frozen init model (jobs.lora)
    cache_dir: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "orchestrator-cache"))
    report: Callable[[dict], None] | None = None  # rank 0's metrics; printed when not given
    on_start: Callable[[int | None], None] | None = None  # called once resumed: (step resumed from or None)
    # Every rank at once, where all ranks are (so it may be a collective), once per checkpoint that
    # this attempt resumed from or saved, when its commit is done: its step. Each save passes the
    # previous one's (the save waits for that upload); the end, the last step's.
    on_commit: Callable[[int], None] | None = None


@dataclass
class TrainResult:
    metrics: dict  # what the run record keeps: losses, throughput, the last checkpoint
    files: dict[str, FileEntry] = field(default_factory=dict)  # rank 0: the export and logs it wrote (hf/, tb/)


def train(job: TrainJob) -> TrainResult:
    spec = job.spec
    report = job.report or (lambda metrics: print(json.dumps(metrics), flush=True))
    import deepspeed

    # Sets the process group up under torchrun; under Ray Train, which already did, it wraps that
    # group in DeepSpeed's comm layer, which zero.Init reads before deepspeed.initialize would.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device()
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")

    data, order = _training_data(job, world)
    local_dir = tempfile.mkdtemp(prefix=f"orchestrator-train-{rank}-")
    if job.init_uri:
        init_dir = tokenizer_dir = os.path.join(local_dir, "init")
        open_storage(job.init_uri).download_prefix("", init_dir)
        config = _init_config(init_dir, data)
    else:
        # A mixture's sources share one tokenizer (checked at validate): the first one's is theirs.
        init_dir, tokenizer_dir = None, _fetch_tokenizer(job.data_uri or job.mixture[0].uri, local_dir)
        config = llama_config(spec.model, data.vocab_size, data.eos_id, _pad_id(tokenizer_dir))
    engine, speed_context, facts = _engine(spec, config, world, bf16, device, init_dir, job.lora)
    if rank == 0:
        report({"note": "speed: " + ", ".join(f"{lever.replace('_', ' ')} {how}" for lever, how in facts["speed"].items())})
        if job.lora:
            report({"note": facts.pop("lora")})
    ckpt = open_storage(job.out_uri).sub("ckpt")

    start_step, resumed_from = _resume(engine, ckpt, rank, local_dir, job.config_hash, report)
    if job.on_start:
        job.on_start(resumed_from)
    tensorboard = _tensorboard(local_dir) if rank == 0 else None
    writer = CheckpointWriter(ckpt, rank, world, local_dir, spec.keep_last, spec.keep_every)
    extras = _checkpoint_extras(config, tokenizer_dir, local_dir) if rank == 0 else {}
    if rank == 0 and job.lora:
        extras.update(lora.checkpoint_extras(job.lora, job.init_uri, local_dir))
    metrics: dict = {"resumed_from": resumed_from}
    throughput = Throughput(flops_per_token(config, data.seq_len), _peak_flops(device), world,
                            order.global_batch * data.seq_len)

    newest = resumed_from  # this attempt's newest checkpoint, not yet passed to on_commit

    def checkpoint(step: int) -> None:
        nonlocal newest
        writer.wait()  # the previous save is committed: rank 0 commits it before its upload thread ends
        if job.on_commit and newest is not None:
            job.on_commit(newest)
        newest = step
        meta = {"data_position": step * order.global_batch, "seed": spec.seed, "config_hash": job.config_hash,
                "world_size": world, "zero_stage": spec.zero_stage}
        writer.save(engine, step, {"step": step, "rng": _rng_state()}, meta, extras)

    with speed_context:
        history = _train_steps(engine, spec, data, order, start_step, rank, world, device, report, metrics,
                               throughput, tensorboard, checkpoint, writer.wait)
        if isinstance(order, MixtureOrder):  # also when a resume starts at the last step
            metrics["tokens_per_source"] = _tokens_per_source(order, data, spec.steps)
        probe = torch.from_numpy(data.batch(order.indices(0, 0, rank))[0][:1]).to(device)  # one sequence
        engine_logits = _logits(engine, probe)  # collective under ZeRO-3: every rank runs it

    writer.wait()  # the last checkpoint is committed before the export says "done"
    if job.on_commit:  # the last step's: saved now, or the one this attempt resumed at
        job.on_commit(spec.steps)
    adapter_dir = os.path.join(local_dir, lora.ADAPTER_DIR)
    state = (lora.export(engine.module, rank, job.lora, job.init_uri, init_dir, tokenizer_dir, adapter_dir)
             if job.lora else gather_state_dict(engine.module, rank))
    files: dict[str, FileEntry] = {}
    if rank == 0:
        tensorboard.close()
        out = open_storage(job.out_uri)
        hf_dir = os.path.join(local_dir, "hf")
        save_hf(state, config, tokenizer_dir, hf_dir)
        metrics["export_max_logit_diff"] = _check_export(hf_dir, probe, engine_logits, bf16)
        exports = [("hf", hf_dir), ("tb", tensorboard.logdir)]
        if job.lora:
            exports.append((lora.ADAPTER_DIR, adapter_dir))
        for prefix, directory in exports:
            for key in out.upload_dir(directory, prefix):
                files[key] = file_entry(os.path.join(directory, key.removeprefix(prefix + "/")))
        metrics.update(facts, final_loss=metrics.get("loss"))
        metrics["loss_history"] = history
        metrics["last_checkpoint"] = ckpt.url(step_key(spec.steps))
    dist.barrier()
    return TrainResult(metrics, files)


def _training_data(job: TrainJob, world: int):
    """(the data, the order it is read in): prompt/response rows, a preprocess stage's sequences,
    or a mixture of several stages' sequences."""
    spec = job.spec
    if job.mixture:
        data = MixtureData(job.mixture, job.cache_dir)
        return data, MixtureOrder(data.sizes, [s.weight for s in job.mixture], spec.micro_batch, spec.grad_accum,
                                  world, spec.seed)
    data = SFTExamples(job.sft_uri, job.cache_dir) if job.sft_uri else PackedTokens(job.data_uri, "train", job.cache_dir)
    return data, BatchOrder(len(data), spec.micro_batch, spec.grad_accum, world, spec.seed)


@dataclass(frozen=True)
class Throughput:
    """What turns a report window's tokens into the honest numbers: MFU, TFLOP/s per device."""
    flops_per_token: float  # training FLOPs (jobs.model.flops_per_token)
    device_peak: float | None  # the device's stated dense bf16 FLOP/s; None: unknown (CPUs)
    world: int
    tokens_per_step: int

    def of(self, tokens_per_s: float) -> dict:
        per_device = tokens_per_s * self.flops_per_token / self.world
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": per_device / 1e12,
                "mfu": per_device / self.device_peak if self.device_peak else None}


def _train_steps(engine, spec: TrainSpec, data, order: BatchOrder, start_step: int, rank: int, world: int,
                 device: torch.device, report: Callable[[dict], None], metrics: dict, throughput: Throughput,
                 tensorboard, checkpoint: Callable[[int], None],
                 commit_in_flight: Callable[[], None]) -> list[list[float]]:
    """Steps start_step..spec.steps, a checkpoint every checkpoint_every and a report every log_every
    (rank 0); metrics hold the last report. Returns the loss curve: [step, loss] at each report.
    `commit_in_flight` waits for the checkpoint being committed: a test's crash at step N comes
    after it, so the resume starts at the last checkpoint before N whatever the timing."""
    history: list[list[float]] = []

    def new_window():  # (start time, steps, summed loss), the loss on the device: no sync per micro batch
        return time.perf_counter(), 0, torch.zeros((), dtype=torch.float64, device=device)

    window_start, window_steps, window_loss = new_window()
    with BatchStream(data, order, rank, start_step, spec.steps, device) as batches:
        for step in range(start_step, spec.steps):
            for micro in range(spec.grad_accum):
                tokens, labels = next(batches)
                loss = engine(input_ids=tokens, labels=labels, use_cache=False).loss  # one compiled graph for every layer
                engine.backward(loss)
                engine.step()
                window_loss += loss.detach().double() / spec.grad_accum
            window_steps += 1
            crash_point("train", step + 1, settle=commit_in_flight)
            done = step + 1
            if done % spec.checkpoint_every == 0 or done == spec.steps:
                checkpoint(done)
            if done % spec.log_every == 0 or done == spec.steps:
                dist.all_reduce(window_loss)
                loss = float(window_loss) / world / window_steps  # waits for the device: the window's work is done
                elapsed = time.perf_counter() - window_start
                metrics.update(step=done, loss=loss, lr=engine.get_lr()[0],
                               grad_norm=_float(engine.get_global_grad_norm()),
                               peak_memory_gib=_peak_memory(device) / 2**30,
                               **throughput.of(window_steps * throughput.tokens_per_step / elapsed))
                history.append([done, metrics["loss"]])
                if isinstance(order, MixtureOrder):
                    metrics["tokens_per_source"] = _tokens_per_source(order, data, done)
                if rank == 0:
                    report(dict(metrics))
                    for name in _TENSORBOARD_SCALARS:
                        if metrics[name] is not None:
                            tensorboard.add_scalar(f"train/{name}", metrics[name], done)
                    for source, tokens in metrics.get("tokens_per_source", {}).items():
                        tensorboard.add_scalar(f"data/tokens_{source}", tokens, done)
                window_start, window_steps, window_loss = new_window()
    return history


def _tokens_per_source(order: MixtureOrder, data, steps: int) -> dict[str, int]:
    """Tokens each source gave the first `steps` steps: a function of the step, so exact after a resume too."""
    counts = order.sequences_per_source(steps * order.global_batch)
    return {name: count * data.seq_len for name, count in zip(data.names, counts)}


_TENSORBOARD_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tflops_per_device", "peak_memory_gib")


def _peak_memory(device: torch.device) -> int:
    """Collective: the largest peak memory of any rank so far, in bytes: allocated device memory on
    GPUs, the process's resident memory on CPUs."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    value = torch.tensor(peak, dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)


def _logits(engine, tokens: torch.Tensor) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=tokens).logits.float().cpu()
    engine.train()
    return logits


def _check_export(hf_dir: str, tokens: torch.Tensor, engine_logits: torch.Tensor, bf16: bool) -> float:
    """Reload the export as a user would and compare its logits with the engine's on one batch:
    an export that does not reproduce the trained model must not be committed."""
    from transformers import AutoModelForCausalLM

    # On the engine's device: fused kernels patch the model classes for the whole process, and
    # their kernels run only there.
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(tokens.device)
    with torch.no_grad():
        diff = (model(input_ids=tokens).logits - engine_logits.to(tokens.device)).abs().max().item()
    del model
    # The engine computes in bf16 (8-bit mantissa), the check in fp32: allow bf16's rounding, which
    # grows with the logits' scale.
    tolerance = max(0.25, 0.02 * engine_logits.abs().max().item()) if bf16 else 1e-3
    if not diff <= tolerance:
        raise RuntimeError(f"the exported model's logits differ from the engine's by {diff:.3g} (> {tolerance})")
    return diff


def _tensorboard(local_dir: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(local_dir, "tb"))


def _device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _init_config(init_dir: str, data):
    """The starting model's config, checked against the data it is about to train on."""
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(init_dir)
    if data.seq_len > config.max_position_embeddings:
        raise ValueError(f"sequences of {data.seq_len} tokens exceed the model's max_position_embeddings "
                         f"{config.max_position_embeddings}; shorten seq_len")
    if getattr(data, "vocab_size", 0) > config.vocab_size:
        raise ValueError(f"the data's vocabulary ({data.vocab_size}) is larger than the model's ({config.vocab_size}): "
                         "it was tokenized with another tokenizer")
    return config


def _engine(spec: TrainSpec, config, world: int, bf16: bool, device: torch.device, init_dir: str | None,
            lora_spec: LoraSpec | None):
    """(the DeepSpeed engine, the context its steps run in, facts for the record: the parameter
    bytes of each rank right after construction, what each speed lever does; with LoRA, what trains)."""
    import deepspeed

    user = load_user_config(spec.deepspeed_config) if spec.deepspeed_config else None
    ds_config = build_deepspeed_config(zero_stage=spec.zero_stage, micro_batch=spec.micro_batch,
                                       grad_accum=spec.grad_accum, world_size=world, grad_clip=spec.grad_clip,
                                       bf16=bf16, user_config=user)
    zero3 = spec.zero_stage == 3
    model = build_model(config, ds_config=ds_config, zero3=zero3, seed=spec.seed, device=device, weights_dir=init_dir)
    # Right after construction, before DeepSpeed adds buffers of its own: what sharding saved.
    per_rank = [None] * world
    dist.all_gather_object(per_rank, local_parameter_bytes(model))
    facts = {"param_bytes_per_rank": per_rank, "model_param_bytes": model_parameter_bytes(model)}
    facts["speed"], speed_context = apply_speed(model, spec.speed, device, torch.bfloat16 if bf16 else torch.float32,
                                                zero3)
    if lora_spec:  # after the levers, which act on the Llama itself
        model, facts["lora"] = lora.wrap(model, lora_spec, spec.seed)
    torch.manual_seed(spec.seed)  # the streams a step draws from start the same however the model was built
    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        # torch's AdamW rather than DeepSpeed's: no op to JIT-compile, and identical on CPU and GPU.
        # A ZeRO-3 parameter's tensor is its (flat) partition: its shape is ds_shape.
        trained = [p for p in model.parameters() if p.requires_grad]  # frozen ones (LoRA's base) get no state
        matrices = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trained]
        decay = [p for p, matrix in zip(trained, matrices) if matrix]
        no_decay = [p for p, matrix in zip(trained, matrices) if not matrix]
        groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # An empty group (LoRA trains matrices only) is dropped by ZeRO and would leave the scheduler one behind.
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=spec.betas)
    if "scheduler" not in ds_config and optimizer is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(spec))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, speed_context, facts


def _warmup_cosine(spec: TrainSpec) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(spec.steps - spec.warmup_steps, 1)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cosine
    return factor


def _resume(engine, ckpt, rank: int, local_dir: str, config_hash: str,
            report: Callable[[dict], None]) -> tuple[int, int | None]:
    """Load the newest checkpoint every rank can verify; (start step, resumed-from step or None)."""
    candidates = [None]
    if rank == 0:
        steps, ignored = committed_steps(ckpt)
        for note in ignored:
            report({"warning": f"ignoring checkpoint {note}"})
        candidates = [steps]
    dist.broadcast_object_list(candidates, src=0)
    start = None
    for step in candidates[0]:
        fetched = fetch_for_rank(ckpt, step, rank, local_dir)
        ok = torch.tensor(int(fetched is not None and fetched[1].get("config_hash") == config_hash), device=engine.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item():
            _, client_state = engine.load_checkpoint(fetched[0], tag=step_key(step))
            _set_rng_state(client_state["rng"])
            start = step
            break
        if rank == 0:
            report({"warning": f"ignoring checkpoint {step_key(step)}: a file is missing or corrupt"})
    if rank == 0:
        discard_after(ckpt, start or 0)  # the steps this run will write again
    dist.barrier()
    return (start, start) if start is not None else (0, None)


def _rng_state() -> dict:
    """Every random stream a step may draw from (dropout, sampling), saved with each checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fetch_tokenizer(data_uri: str, local_dir: str) -> str:
    target = os.path.join(local_dir, "tokenizer")
    open_storage(data_uri).download_prefix("tokenizer", target)
    return target


def _pad_id(tokenizer_dir: str) -> int | None:
    with open(os.path.join(tokenizer_dir, "info.json")) as f:
        return json.load(f).get("pad_id")


def _checkpoint_extras(config, tokenizer_dir: str, local_dir: str) -> dict[str, str]:
    """The model config and the tokenizer ride along in every checkpoint: it exports on its own."""
    path = os.path.join(local_dir, "config.json")
    config.to_json_file(path)
    extras = {"hf/config.json": path}
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            extras[f"hf/{name}"] = os.path.join(tokenizer_dir, name)
    return extras


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no stated peak for CPUs: MFU is left out rather than guessed
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def _float(value) -> float | None:
    return None if value is None else float(value)


def main(argv: list[str]) -> int:
    """`torchrun --nproc_per_node N -m jobs.train JOB.json`: the same loop without Ray."""
    with open(argv[0]) as f:
        raw = json.load(f)
    job = TrainJob(spec=TrainSpec.model_validate(raw["spec"]), out_uri=raw["out_uri"],
                   config_hash=raw.get("config_hash", "torchrun"), data_uri=raw.get("data_uri"),
                   mixture=[MixtureSource(**m) for m in raw["mixture"]] if raw.get("mixture") else None,
                   sft_uri=raw.get("sft_uri"), init_uri=raw.get("init_uri"),
                   lora=LoraSpec.model_validate(raw["lora"]) if raw.get("lora") else None)
    result = train(job)
    if dist.get_rank() == 0:
        print(json.dumps(result.metrics))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
