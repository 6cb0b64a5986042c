"""The training stages' shared settings: a light module (pydantic only), so that validating a
pipeline file never imports torch or DeepSpeed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from jobs.fields import operational, output
from jobs.model import ModelSpec


class SpeedSpec(BaseModel):
    """How fast the model's steps run on the device (jobs/speed.py). `auto` picks what is right on
    the device the stage gets and says so in one line; the record keeps what ran."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    compile: Literal["auto", "layers", "model", "off"] = output("auto")
    """torch.compile: `layers` compiles each decoder layer (one compilation that every layer reuses:
    start-up stays short), `model` the whole model; `auto`: `layers` on GPUs, off on CPUs."""
    fused_kernels: Literal["auto", "liger", "off"] = output("auto")
    """Liger Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy (the logits are never
    materialized); `liger` needs a GPU stage and the `liger-kernel` package; `auto` uses them where
    both are there."""
    attention: Literal["auto", "flash", "sdpa", "eager"] = output("auto")
    """`flash`: torch SDPA's flash backend (an error where it cannot run); `sdpa`: SDPA with the
    backend torch picks; `eager`: transformers' plain attention; `auto`: flash where it runs, else sdpa."""
    activation_checkpointing: Literal["none", "selective", "full"] = operational("none")
    """Recompute activations in the backward pass instead of keeping them: `full` each decoder
    layer, `selective` all but the matrix multiplications' and attention's outputs. Less memory
    for more compute; the same numbers, so it does not change the output."""


class TrainSpec(BaseModel):
    """How a model trains; shared by pretraining and fine-tuning stages."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    model: ModelSpec = output(ModelSpec())
    """The model's shape."""
    steps: int = output(1000, ge=1)
    """Optimizer steps in all."""
    micro_batch: int = output(4, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum: int = output(1, ge=1)
    """Micro batches per optimizer step."""
    lr: float = output(3e-4, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = output(0.1, ge=0, le=1)
    """The cosine schedule ends at lr x this."""
    warmup_steps: int = output(100, ge=0)
    """Linear warmup from 0 to lr."""
    weight_decay: float = output(0.1, ge=0)
    """AdamW weight decay (not applied to norms and biases)."""
    betas: tuple[float, float] = output((0.9, 0.95))
    """AdamW betas."""
    grad_clip: float = output(1.0, gt=0)
    """Gradient-norm clipping."""
    zero_stage: Literal[1, 2, 3] = output(2)
    """DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    precision: Literal["auto", "fp32", "bf16"] = output("auto")
    """auto: bf16 on GPUs, fp32 on CPUs."""
    checkpoint_every: int = output(100, ge=1)
    """Steps between checkpoints (the last step always checkpoints)."""
    keep_last: int = output(2, ge=1)
    """Checkpoints kept, newest first..."""
    keep_every: int = output(0, ge=0)
    """...plus every checkpoint whose step is a multiple of this (0: none)."""
    seed: int = output(0)
    """Seeds the weights and the data order."""
    log_every: int = operational(10, ge=1)
    """Steps between progress reports."""
    speed: SpeedSpec = output(SpeedSpec())
    """Compilation, fused kernels, attention and activation checkpointing."""
    deepspeed_config: str | None = output(None, local="file")
    """A DeepSpeed JSON file merged over the generated config; its "auto" values come from here."""
