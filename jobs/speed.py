"""The speed levers of a training stage (its `speed:` section), applied to the model on a worker.

Each lever's `auto` picks what is right on the device the worker actually got and says so; an
explicit choice is applied as asked or fails with the reason (the impossible ones, such as fused
kernels on a CPU stage, are refused at `validate` already: orchestrator/kinds/training.py).

- attention: torch's scaled_dot_product_attention (SDPA), restricted to its flash backend when
  that backend runs on this device, dtype and head size (probed once, so the record says which
  kernel ran rather than which was hoped for); or transformers' eager attention.
- fused kernels: Liger Kernel's Triton RMSNorm, RoPE, SwiGLU and fused linear cross-entropy, which
  never materializes the logits. Under ZeRO-3 the fused cross-entropy stays off: it reads the LM
  head's weight without calling the head, so ZeRO-3's hooks never gather that weight.
- activation checkpointing: `full` recomputes each decoder layer in the backward pass; `selective`
  keeps the outputs of matrix multiplications and attention and recomputes the cheap elementwise
  rest (norms, activations, rotary), most of the memory saving for a few percent of compute.
- compile: torch.compile of each decoder layer (regional: the layers share one compiled graph, so
  start-up stays short) or of the whole model.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from jobs.train_spec import SpeedSpec


def apply_speed(model, speed: SpeedSpec, device: torch.device, dtype: torch.dtype,
                zero3: bool) -> tuple[dict[str, str], contextlib.AbstractContextManager]:
    """Apply the levers to a freshly built model (before DeepSpeed wraps it): (what runs, lever by
    lever, for the record and the console; a context the training loop runs in)."""
    ran: dict[str, str] = {}
    ran["attention"], attention_context = _attention(model, speed.attention, device, dtype)
    ran["fused_kernels"] = _fused_kernels(model, speed.fused_kernels, device, zero3)
    ran["activation_checkpointing"] = _activation_checkpointing(model, speed.activation_checkpointing)
    ran["compile"] = _compile(model, speed.compile, device)
    return ran, attention_context


def _attention(model, choice: str, device: torch.device,
               dtype: torch.dtype) -> tuple[str, contextlib.AbstractContextManager]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if choice == "eager":
        model.set_attn_implementation("eager")
        return "eager", contextlib.nullcontext()
    model.set_attn_implementation("sdpa")
    if choice == "sdpa":
        return "sdpa (backend of torch's choice)", contextlib.nullcontext()
    problem = _flash_problem(model.config, device, dtype)
    if problem is None:
        return "sdpa (flash)", sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    if choice == "flash":
        raise ValueError(f"speed.attention: flash cannot run here ({problem}); use sdpa or auto")
    return f"sdpa (flash cannot run here: {problem})", contextlib.nullcontext()


def _flash_problem(config, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why SDPA's flash backend cannot run this model's attention here; None if it can."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    head_dim = config.hidden_size // config.num_attention_heads
    q = torch.zeros(1, config.num_attention_heads, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError as e:
        return str(e).splitlines()[0][:120]
    return None


def _fused_kernels(model, choice: str, device: torch.device, zero3: bool) -> str:
    if choice == "off":
        return "off"
    if device.type != "cuda":
        if choice == "liger":  # refused at validate; a worker that got no GPU is an error, not a fallback
            raise ValueError("speed.fused_kernels: liger needs a CUDA device, and this worker has none")
        return "off (auto: no GPU)"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        if choice == "liger":
            raise ValueError("speed.fused_kernels: liger-kernel is not installed on the workers; "
                             "pip install liger-kernel, or set fused_kernels: auto") from None
        return "off (auto: liger-kernel is not installed)"
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=not zero3, model=model)
    return "liger" + (" (fused cross-entropy off under ZeRO-3: the LM head is sharded)" if zero3 else "")


# The ops whose outputs selective checkpointing keeps: the expensive ones to recompute.
_KEPT_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


def _activation_checkpointing(model, choice: str) -> str:
    if choice == "none":
        return "none"
    kwargs: dict = {"use_reentrant": False}  # the reentrant variant does not work with ZeRO-3's hooks
    if choice == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return choice


def _selective_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    kept = {getattr(torch.ops.aten, name).default for name in _KEPT_OPS if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _compile(model, choice: str, device: torch.device) -> str:
    if choice == "auto":
        if device.type != "cuda":
            return "off (auto: on CPUs compiling costs more start-up than it saves)"
        choice = "layers"
    if choice != "off":
        # Under activation checkpointing dynamo traces each layer as a checkpoint region, and refuses
        # a region whose forward sets a context variable outside it (transformers' output capture
        # does), which leaves every layer uncompiled. Replaying that bookkeeping in the recompute
        # changes no gradient (tests/test_speed_units.py compares them), so let dynamo skip it.
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if choice == "layers":
        for layer in model.model.layers:
            layer.compile()
    elif choice == "model":
        model.compile()
    return choice
