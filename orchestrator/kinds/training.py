"""What the two training kinds (pretrain, finetune) share: the worker group, its failure policy
and how a training stage is summarized."""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from jobs.fields import operational, output
from jobs.train_spec import TrainSpec
from orchestrator.kinds.base import LocalPath, StageResults, StageSpec
from orchestrator.kinds.preprocess import PreprocessStage


class TrainStage(TrainSpec, StageSpec):
    """What pretraining and fine-tuning share: the worker group and its failure policy."""

    num_workers: int = output(2, ge=1)
    """Training workers (one per GPU, or CPU processes with gloo)."""
    use_gpu: bool = output(False)
    """One GPU per worker, NCCL and bf16; otherwise CPU workers with gloo and fp32."""
    cpus_per_worker: float = operational(1.0, gt=0)
    """CPUs reserved for each worker."""
    resources_per_worker: dict[str, float] = operational({})
    """Custom Ray resources each worker also needs, such as `{H100: 1}` or a node type's marker:
    the workers go only to nodes that offer them, and the autoscaler adds such nodes."""
    max_failures: int = operational(2, ge=0)
    """Worker-group restarts allowed; each resumes from the newest committed checkpoint."""
    global_batch: int | None = output(None, ge=1)
    """Sequences per optimizer step; sets grad_accum = global_batch / (micro_batch x num_workers)."""

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.global_batch is not None:
            per_pass = self.micro_batch * self.num_workers
            if self.global_batch % per_pass:
                raise ValueError(f"global_batch {self.global_batch} does not divide by micro_batch {self.micro_batch} x "
                                 f"num_workers {self.num_workers} = {per_pass}; use a multiple of {per_pass}")
            if "grad_accum" in self.model_fields_set and self.grad_accum != self.global_batch // per_pass:
                raise ValueError(f"grad_accum {self.grad_accum} contradicts global_batch {self.global_batch} "
                                 f"(= {self.global_batch // per_pass} x {per_pass}); give one of them")
            object.__setattr__(self, "grad_accum", self.global_batch // per_pass)  # frozen: derived once, here
        return self

    @model_validator(mode="after")
    def _levers_fit_the_device(self):
        if self.speed.fused_kernels == "liger" and not self.use_gpu:
            raise ValueError("speed.fused_kernels: liger runs Triton kernels on GPUs, and this stage has use_gpu: false; "
                             "set use_gpu: true, or fused_kernels: auto (plain PyTorch on CPUs)")
        return self

    def problems(self, name: str, stages: Mapping[str, StageSpec]) -> list[str]:
        if self.speed.fused_kernels == "liger" and importlib.util.find_spec("liger_kernel") is None:
            return [f"stages.{name}.speed.fused_kernels: liger needs the liger-kernel package, which is not installed; "
                    "pip install liger-kernel (on the driver and the GPU workers), or set fused_kernels: auto"]
        return []

    def max_positions(self, stages: Mapping[str, StageSpec], seen: frozenset) -> int | None:
        """The model's context length: its own model's, or that of the model it starts from."""
        return None

    def bundles(self) -> list[dict[str, float]]:
        """The resources of each worker: what the runner reserves and Ray Train places."""
        return [{"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {}), **self.resources_per_worker}
                ] * self.num_workers

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name!r} is not a custom resource; use cpus_per_worker / use_gpu for CPUs and GPUs")
            if not amount > 0:
                raise ValueError(f"{name}: {amount} must be > 0")
        return v


class DataSource(BaseModel):
    """One source of a data mixture."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    stage: str = output()
    """A preprocess stage: its train split is trained on, its validation split scored per source."""
    weight: float = output()
    """Its share of the training sequences: weight / the sum of the weights (> 0)."""


def stage_or_mixture(value):
    """A preprocess stage's name, or a list of {stage, weight}; validated by hand so that an error
    names the entry and the fix rather than each member of a union."""
    if isinstance(value, str) or value is None:
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("give a preprocess stage's name, or a non-empty list of {stage: NAME, weight: W}")
    sources = []
    for i, item in enumerate(value):
        try:
            source = DataSource.model_validate(item)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(part) for part in (f"data[{i}]", *error["loc"]))
            raise ValueError(f"{where}: {error['msg']}; give {{stage: NAME, weight: W}} with W > 0") from None
        if not 0 < source.weight < float("inf"):
            raise ValueError(f"data[{i}].weight: {source.weight:g}; a weight must be a finite number > 0 "
                             "(drop a source to leave it out)")
        sources.append(source)
    names = [s.stage for s in sources]
    if len(set(names)) < len(names):
        raise ValueError(f"a stage appears more than once in {names}; list each source once with its total weight")
    return sources


def data_stages(data: str | list[DataSource] | None) -> list[str]:
    """The preprocess stages a training stage's `data` names, in order."""
    if data is None:
        return []
    return [data] if isinstance(data, str) else [source.stage for source in data]


def mixture_problems(name: str, stages: Mapping[str, StageSpec], data: str | list[DataSource] | None) -> list[str]:
    """A mixture's sources must share the token ids (one tokenizer) and the sequence length (a
    micro batch stacks sequences of every source)."""
    if not isinstance(data, list):
        return []
    sources = [(i, s.stage, stages.get(s.stage)) for i, s in enumerate(data)]
    sources = [(i, stage, spec) for i, stage, spec in sources if isinstance(spec, PreprocessStage)]
    if not sources:
        return []
    _, first, first_spec = sources[0]
    problems = []
    for i, stage, spec in sources[1:]:
        if _tokenizer_identity(spec.tokenizer) != _tokenizer_identity(first_spec.tokenizer):
            problems.append(f"stages.{name}.data[{i}].stage: {stage} is tokenized with "
                            f"{_tokenizer_named(spec.tokenizer)} but {first} with "
                            f"{_tokenizer_named(first_spec.tokenizer)}; every source of a mixture must use the same "
                            "tokenizer stage (or the same {path: DIR})")
        if spec.seq_len != first_spec.seq_len:
            problems.append(f"stages.{name}.data[{i}].stage: {stage} has seq_len {spec.seq_len} but {first} has "
                            f"{first_spec.seq_len}; every source of a mixture must pack sequences of one length")
    return problems


def _tokenizer_identity(tokenizer: str | LocalPath) -> tuple[str, str]:
    return ("path", os.path.realpath(tokenizer.path)) if isinstance(tokenizer, LocalPath) else ("stage", tokenizer)


def _tokenizer_named(tokenizer: str | LocalPath) -> str:
    return f"{{path: {tokenizer.path}}}" if isinstance(tokenizer, LocalPath) else f"tokenizer stage {tokenizer}"


def max_positions_of(stages: Mapping[str, StageSpec], name: str, seen: frozenset = frozenset()) -> int | None:
    """The context length of training stage `name`; None for another kind, or when it is unknown."""
    stage = None if name in seen else stages.get(name)  # a cycle is reported by the graph's checks
    return stage.max_positions(stages, seen | {name}) if isinstance(stage, TrainStage) else None


def checkpoint_steps(stage: TrainStage) -> list[int]:
    """The steps whose checkpoints a training stage keeps once it has finished (its retention)."""
    steps = sorted(set(range(stage.checkpoint_every, stage.steps + 1, stage.checkpoint_every)) | {stage.steps})
    return [s for i, s in enumerate(steps)
            if i >= len(steps) - stage.keep_last or (stage.keep_every and s % stage.keep_every == 0)]


def checkpoint_problems(where: str, stages: Mapping[str, StageSpec], target: str, step: int) -> list[str]:
    """A checkpoint step asked of training stage `target` must be one it commits and keeps."""
    source = stages.get(target)
    if isinstance(source, TrainStage) and step not in checkpoint_steps(source):
        return [f"{where}: {target} keeps no checkpoint at step {step}; it keeps steps "
                f"{checkpoint_steps(source)} (checkpoint_every, keep_last, keep_every)"]
    return []


class TrainResults(StageResults):
    final_loss: float | None
    """Training loss over the last report interval."""
    tokens_per_s: float | None
    """Throughput over the last report interval, all workers together."""
    mfu: float | None = None
    """Model FLOPs utilization: training FLOPs per token (6N + attention) x tokens/s over the
    devices' stated dense bf16 peak (GPUs with a stated peak only)."""
    tflops_per_device: float | None = None
    """Training FLOPs achieved per device, in TFLOP/s, over the last report interval."""
    peak_memory_gib: float | None = None
    """The largest peak memory of any worker: allocated GPU memory, or a CPU worker's resident memory."""
    speed: dict[str, str] = {}
    """What each speed lever did (attention kernel, fused kernels, activation checkpointing, compile)."""
    last_checkpoint: str | None
    """The URI of the final committed checkpoint."""
    resumed_from: int | None = None
    """The checkpoint step the last worker group resumed from; None when it started from step 0."""
    loss_history: list[tuple[int, float]] = []
    """(step, loss) at each report interval: the report's loss curve."""
    export_max_logit_diff: float | None = None
    """Largest logit difference between the engine and its Hugging Face export on one sequence."""
    restarts: int = 0
    """Worker-group restarts this driver attempt needed."""
    model_param_bytes: int | None = None
    """The whole model's parameters, in bytes at the training dtype."""
    param_bytes_per_rank: list[int] | None = None
    """The parameter bytes each rank held right after building the model: about model / N under
    ZeRO-3, the whole model under ZeRO-1/2."""
    tokens_per_source: dict[str, int] | None = None
    """A data mixture: tokens trained on from each source (preprocess stage), all steps together."""
    val_perplexity: dict[str, float] | None = None
    """A data mixture: the exported model's perplexity on each source's validation split."""


def training_summary(r: TrainResults) -> str:
    if r.final_loss is None:
        return ""
    resumed = f", resumed from step {r.resumed_from}" if r.resumed_from is not None else ""
    mfu = f" ({r.mfu:.1%} MFU)" if r.mfu else ""
    return f"loss {r.final_loss:.3f}, {r.tokens_per_s or 0:,.0f} tokens/s{mfu}{resumed}"
