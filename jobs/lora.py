"""LoRA fine-tuning with peft: the adapter's spec, wrapping the model for training, its exports.

A LoRA stage freezes the model it starts from and trains a low-rank update B·A (r x in + out x r
weights) beside each targeted projection of every decoder layer; DeepSpeed gets the adapters alone
as trainable, so the optimizer, its states, the gradients and ZeRO's partitions of them hold
adapter weights only (bench/lora.py measures what that saves). B starts at zero: step 0 is the
starting model itself. A starts from a generator seeded by (seed, parameter name), as the model's
own random weights do (jobs/model_init.py): the same seed gives the same adapters whatever the
ZeRO stage or the number of ranks. Under ZeRO-3 the frozen weights stay sharded (built under
zero.Init as for full training); the adapters, created after, are sharded by deepspeed.initialize.

Checkpoints are DeepSpeed's as for full training, so a run resumes from them exactly as it does
there. Each also carries the adapter's config, which names the base model (the stage's `init`
export, by URI): `jobs.export.export_checkpoint` merges a checkpoint's adapters onto it.

Two exports: `hf-adapter/`, the adapter as peft saves it (load it with
`PeftModel.from_pretrained(base, dir)` where base is the `init` model; `base_model_name_or_path`
in its config is that model's URI) plus the tokenizer; and `hf/`, the merged model
(W + alpha / r · B·A), a plain LlamaForCausalLM like every training stage's.

This module's top is pydantic only: validating a pipeline imports LoraSpec without torch or peft.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from jobs.fields import output

# The projections of a Llama decoder layer, as transformers names them.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "hf-adapter"  # beside hf/, in the stage's output and in each checkpoint
ADAPTER_CONFIG = "adapter_config.json"


class LoraSpec(BaseModel):
    """Low-rank adapters instead of full fine-tuning (peft's LoRA)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    r: int = output(8, ge=1)
    """The adapters' rank: each targeted projection of shape out x in gets r x (in + out) weights."""
    alpha: float = output(16.0, gt=0)
    """Scales the update: W + alpha / r x B·A."""
    dropout: float = output(0.0, ge=0, lt=1)
    """Dropout on the adapters' input while training."""
    target_modules: list[Literal[TARGET_MODULES]] = output(list(TARGET_MODULES), min_length=1)
    """The projections of every decoder layer that get adapters: q_proj, k_proj, v_proj, o_proj
    (attention), gate_proj, up_proj, down_proj (MLP); all of them by default."""

    @field_validator("target_modules")
    @classmethod
    def _each_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) < len(v):
            raise ValueError(f"{v} names a module more than once; list each once")
        return v


def peft_config(spec: LoraSpec, base_uri: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_uri)


def wrap(model, spec: LoraSpec, seed: int):
    """(the model with adapters, every other weight frozen; a line saying what trains)."""
    import torch
    from peft import get_peft_model

    from jobs.model_init import parameter_seed

    wrapped = get_peft_model(model, peft_config(spec))
    for name, param in wrapped.named_parameters():
        if "lora_A" in name:  # peft's own init, kaiming-uniform, from a generator of this parameter's own
            generator = torch.Generator(device=param.device).manual_seed(parameter_seed(seed, name))
            with torch.no_grad():
                torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
    numel = [getattr(p, "ds_numel", p.numel()) for p in wrapped.parameters()]  # ZeRO-3: p is a partition
    trainable = sum(n for n, p in zip(numel, wrapped.parameters()) if p.requires_grad)
    total = sum(numel)
    note = (f"lora: r {spec.r} on {', '.join(spec.target_modules)}: {trainable:,} trainable parameters of "
            f"{total:,} ({trainable / total:.2%})")
    return wrapped, note


def checkpoint_extras(spec: LoraSpec, base_uri: str, local_dir: str) -> dict[str, str]:
    """The adapter's config rides along in every checkpoint (name -> local path): with the base
    model it names, a checkpoint of a LoRA stage exports (merged) on its own."""
    directory = os.path.join(local_dir, "lora-config")
    peft_config(spec, base_uri).save_pretrained(directory)
    return {f"{ADAPTER_DIR}/{ADAPTER_CONFIG}": os.path.join(directory, ADAPTER_CONFIG)}


def export(module, rank: int, spec: LoraSpec, base_uri: str, base_dir: str, tokenizer_dir: str,
           adapter_dir: str) -> dict | None:
    """Collective: gathers the adapters; rank 0 writes them to `adapter_dir` and returns the merged
    model's fp32 state dict with plain Llama names, for jobs.export.save_hf (None elsewhere).

    The merge is onto the base model's own weights (`base_dir`, a local copy of `base_uri`), not the
    engine's copy of them, which is bf16 on GPUs: the merged export is then what
    `PeftModel.from_pretrained(base, adapter).merge_and_unload()` gives."""
    from jobs.export import TOKENIZER_FILES, gather_state_dict

    adapters = gather_state_dict(module, rank, trainable_only=True)
    if rank != 0:
        return None
    peft_model = _with_adapters(base_dir, adapters, peft_config(spec, base_uri))
    peft_model.save_pretrained(adapter_dir)
    for name in TOKENIZER_FILES:  # AutoTokenizer reads the adapter's directory, as it reads a model's
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(adapter_dir, name))
    return _merged_state(peft_model)


def merge_checkpoint(state: dict, checkpoint_dir: str, work_dir: str) -> dict:
    """A LoRA stage's consolidated checkpoint (`state`, peft's parameter names; `checkpoint_dir`,
    its downloaded files) -> the merged model's state: its adapters onto the base model that its
    adapter config names, fetched into `work_dir`."""
    from peft import LoraConfig

    from jobs.storage import open_storage

    lora_config = LoraConfig.from_pretrained(os.path.join(checkpoint_dir, ADAPTER_DIR))
    base_dir = os.path.join(work_dir, "base")
    open_storage(lora_config.base_model_name_or_path).download_prefix("", base_dir)
    return _merged_state(_with_adapters(base_dir, state, lora_config))


def is_lora_checkpoint(checkpoint_dir: str) -> bool:
    return os.path.exists(os.path.join(checkpoint_dir, ADAPTER_DIR, ADAPTER_CONFIG))


def _with_adapters(base_dir: str, state: dict, lora_config):
    """The base model of `base_dir` (fp32) with adapters of `lora_config` holding `state`'s adapter
    weights (peft's names; other entries are ignored)."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.model_init import weight_files

    config = LlamaConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for path in sorted(set(weight_files(base_dir).values())):
        model.load_state_dict({k: v.float() for k, v in load_file(path).items()}, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()  # assign replaced the embedding the head was tied to
    absent = [name for name, p in model.named_parameters() if p.is_meta]
    if absent:
        raise ValueError(f"the base model {base_dir} lacks weights: {absent[:5]}")
    # get_peft_model would replace the base's URI by the model's own name (none: built from a config), with a warning
    base_uri, lora_config.base_model_name_or_path = lora_config.base_model_name_or_path, None
    peft_model = get_peft_model(model, lora_config)
    peft_model.peft_config["default"].base_model_name_or_path = base_uri
    names = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    if not names <= state.keys():
        raise ValueError(f"the adapters lack weights: {sorted(names - state.keys())[:5]}")
    peft_model.load_state_dict({name: state[name] for name in names}, strict=False)
    return peft_model


def _merged_state(peft_model) -> dict:
    merged = peft_model.merge_and_unload()  # W += alpha / r · B·A, in place; the adapters removed
    return {name: p.detach() for name, p in merged.named_parameters()}  # a tied head once, as gather_state_dict


def localize_adapter(model_dir: str, base_dir: str) -> None:
    """If `model_dir` holds an exported adapter, fetch the base model it names into `base_dir` and
    point the adapter at it: `AutoModelForCausalLM.from_pretrained(model_dir)` then loads the base
    and the adapter on it, unmerged, as a server would. A model's directory is left as it is."""
    from jobs.storage import open_storage

    path = os.path.join(model_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        return
    with open(path) as f:
        config = json.load(f)
    open_storage(config["base_model_name_or_path"]).download_prefix("", base_dir)
    config["base_model_name_or_path"] = os.path.abspath(base_dir)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
