"""The model a training run starts from: random weights or a Hugging Face directory, built so that
under ZeRO-3 no rank ever holds the whole model.

Under ZeRO-3 the model is constructed inside `deepspeed.zero.Init`: each submodule's parameters
are partitioned across the ranks as soon as the submodule exists, so a rank's memory grows by its
1/N share plus one submodule at a time, not by the whole model (and a node does not need N copies
of it in host memory at start-up). Weights are then written one parameter at a time: gathered,
filled on rank 0, partitioned again. Under ZeRO-1/2 the same fills run on every rank's full model.

The random initialization is ours, not transformers': each parameter is drawn from a generator
seeded by (seed, parameter name), so the initial weights depend only on the seed and the shape:
not on the ZeRO stage, the number of ranks, the order modules are built in, or what drew from the
global RNG before. transformers' own init is skipped (it would be thrown away, and under ZeRO-3 it
indexes into empty partitions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Callable

import torch
import torch.distributed as dist

# The fill of one parameter: (its name, the module owning it, the full tensor) -> None.
Fill = Callable[[str, torch.nn.Module, torch.Tensor], None]


def build_model(config, *, ds_config: dict, zero3: bool, seed: int, device: torch.device,
                weights_dir: str | None = None):
    """A LlamaForCausalLM with its initial weights: those of the Hugging Face directory
    `weights_dir`, or random ones from `seed` (std `config.initializer_range`, norms at one)."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    placement = _zero3_init(ds_config) if zero3 else torch.device(device)
    with _large_host_blocks_returned_when_freed():
        with no_init_weights(), placement:
            model = LlamaForCausalLM(config)
        model.tie_weights()  # part of transformers' init, which no_init_weights skipped
        fill = _safetensors_fill(weights_dir, config) if weights_dir else _random_fill(seed, config.initializer_range)
        fill_parameters(model, fill, zero3)
    return model


@contextlib.contextmanager
def _large_host_blocks_returned_when_freed():
    """Building allocates and frees one full parameter after another on the host (a CPU device's
    gathers, tensors read from safetensors). glibc serves blocks under its mmap threshold from its
    heap, and raises that threshold (up to 32 MiB) each time it frees an mmapped block, so the freed
    parameters stay resident, fragmented between the kept partitions: measured here, a ZeRO-3 rank's
    resident memory grew by 0.97 x the whole model instead of its 1/N (bench/zero3_memory.py).
    A fixed 1 MiB threshold meanwhile maps every large block and unmaps it when freed; afterwards
    32 MiB, where glibc's own rule ends up, for the training steps."""
    mallopt = _glibc_mallopt()
    if mallopt:
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if mallopt:
            mallopt(_M_MMAP_THRESHOLD, 32 << 20)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _glibc_mallopt():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


def _zero3_init(ds_config: dict):
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def fill_parameters(model: torch.nn.Module, fill: Fill, zero3: bool) -> None:
    """Write every parameter once (tied ones once), one at a time. Under ZeRO-3 each is gathered
    for its fill and partitioned again from rank 0's values: the peak is one full parameter."""
    import deepspeed

    writer = not zero3 or dist.get_rank() == 0
    for name, module, param in _unique_parameters(model):
        gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0) if zero3 else contextlib.nullcontext()
        with gathered, torch.no_grad():
            if writer:
                fill(name, module, param)


def _unique_parameters(model: torch.nn.Module):
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{param_name}" if module_name else param_name, module, param


def _random_fill(seed: int, std: float) -> Fill:
    def fill(name: str, module: torch.nn.Module, param: torch.Tensor) -> None:
        if param.ndim >= 2:
            generator = torch.Generator(device=param.device).manual_seed(parameter_seed(seed, name))
            # Drawn in fp32 whatever the parameter's dtype: a bf16 parameter then holds the rounding
            # of the same draw as an fp32 one, as it does when DeepSpeed casts a ZeRO-2 model.
            if param.dtype == torch.float32:
                param.normal_(0.0, std, generator=generator)
            else:
                values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
                param.copy_(values.normal_(0.0, std, generator=generator))
            padding = getattr(module, "padding_idx", None)
            if padding is not None:
                param[padding].zero_()  # as torch's own Embedding init: the padding row starts at zero
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)  # norm weights
    return fill


def parameter_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _safetensors_fill(weights_dir: str, config) -> Fill:
    """Fills from a Hugging Face export (one model.safetensors or an index of shards), reading one
    tensor at a time from the memory-mapped files."""
    from safetensors import safe_open

    files = weight_files(weights_dir)
    handles: dict[str, object] = {}

    def fill(name: str, module: torch.nn.Module, param: torch.Tensor) -> None:
        if name not in files:
            raise ValueError(f"{weights_dir} has no weight {name!r}: it was not exported from a model of this shape")
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        tensor = handles[path].get_tensor(name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{weights_dir}: {name} has shape {tuple(tensor.shape)}, the model {tuple(param.shape)}")
        param.copy_(tensor)
    return fill


def weight_files(weights_dir: str) -> dict[str, str]:
    """Weight name -> the safetensors file holding it."""
    index = os.path.join(weights_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {name: os.path.join(weights_dir, file) for name, file in json.load(f)["weight_map"].items()}
    single = os.path.join(weights_dir, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"{weights_dir} holds no model.safetensors (or its index): export the model as safetensors")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """The bytes of the parameter storage this rank holds: its partitions under ZeRO-3."""
    return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor")
               else p.numel() * p.element_size() for _, _, p in _unique_parameters(model))


def model_parameter_bytes(model: torch.nn.Module) -> int:
    """The bytes of the whole model's parameters, at their training dtype."""
    return sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size()
               for _, _, p in _unique_parameters(model))
