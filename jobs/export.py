"""Hugging Face export: safetensors weights + config + tokenizer, loadable with
`AutoModelForCausalLM` / `AutoTokenizer`, from a live engine or from a committed checkpoint.

ZeRO-3 shards every weight across ranks; both paths gather them into one consolidated fp32
state dict in host memory first (a live engine one parameter at a time, a checkpoint with
DeepSpeed's `zero_to_fp32`), so the export is the same whatever the ZeRO stage was. Past
MAX_SHARD_SIZE the weights are written as several safetensors files with an index, as the Hub does.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch

# info.json (jobs.tokenizer) rides along: a fine-tuning stage reads eos/pad ids from an export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "info.json")
MAX_SHARD_SIZE = "5GB"  # per safetensors file: what the Hub's loaders and most file systems handle well


def gather_state_dict(module, rank: int, trainable_only: bool = False) -> dict | None:
    """Collective: the full fp32 state dict in rank 0's host memory (None elsewhere); with
    `trainable_only`, the parameters that train (LoRA's adapters). Under ZeRO-3 one parameter at a
    time is gathered on the device and copied out: the device never holds more than the largest
    parameter beyond its own partition."""
    import deepspeed

    state = {} if rank == 0 else None
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    for name, param in params:  # tied weights once: save_hf ties them again
        zero3 = hasattr(param, "ds_id")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None) if zero3 else contextlib.nullcontext():
            if rank == 0:
                state[name] = param.detach().to("cpu", torch.float32, copy=True)
    return state


def save_hf(state_dict: dict, config, tokenizer_dir: str, out_dir: str, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, assign=True, strict=False)
    missing = set(model.state_dict()) - set(state_dict)
    if missing - {"lm_head.weight"} or ("lm_head.weight" in missing and not config.tie_word_embeddings):
        raise ValueError(f"the checkpoint lacks weights: {sorted(missing)[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)  # safetensors
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))


def state_dict_from_checkpoint(local_dir: str, tag: str) -> dict:
    """The consolidated fp32 weights of a DeepSpeed ZeRO checkpoint (all ranks' files present)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(local_dir, tag=tag)
    return {k: v.float() for k, v in state.items()}


def export_checkpoint(step_dir, out_dir: str) -> None:
    """Export a committed checkpoint (`.../ckpt/step-<N>`, a Storage) to a Hugging Face directory.

    The checkpoint carries its model config and tokenizer under `hf/`, so nothing else is needed;
    a LoRA stage's is exported merged, onto the base model its `hf-adapter/` config names.
    """
    import tempfile

    from transformers import LlamaConfig

    from jobs import lora
    from jobs.checkpoint import COMMIT
    from jobs.commit import read_commit, verify_commit

    problems = verify_commit(step_dir, COMMIT)
    if problems:
        raise ValueError(f"{step_dir.uri} is not a committed checkpoint: {problems[0]}")
    tag = step_dir.uri.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="orchestrator-export-") as tmp:
        for name in read_commit(step_dir, COMMIT)["files"]:
            step_dir.download_file(name, os.path.join(tmp, tag, name))
        hf_files = os.path.join(tmp, tag, "hf")
        config = LlamaConfig.from_json_file(os.path.join(hf_files, "config.json"))
        state = state_dict_from_checkpoint(tmp, tag)
        if lora.is_lora_checkpoint(os.path.join(tmp, tag)):
            state = lora.merge_checkpoint(state, os.path.join(tmp, tag), tmp)
        save_hf(state, config, hf_files, out_dir)
