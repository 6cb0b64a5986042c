"""The DeepSpeed config a training stage runs with: built from the stage's fields, optionally
merged over a user's own DeepSpeed JSON, whose `"auto"` values are resolved from the stage.

The stage stays the source of truth for the batch shape: a user file that contradicts it is an
error naming both values, not a silent override (a wrong batch size wastes a whole run).
"""

from __future__ import annotations

import json

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_deepspeed_config(*, zero_stage: int, micro_batch: int, grad_accum: int, world_size: int,
                           grad_clip: float, bf16: bool, user_config: dict | None = None) -> dict:
    ours = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,  # our own progress line replaces DeepSpeed's prints
        "wall_clock_breakdown": False,
    }
    if not user_config:
        return ours
    merged = _merge(ours, user_config)
    for key in _BATCH_KEYS:
        if merged[key] != ours[key]:
            raise ValueError(f"deepspeed_config sets {key}={merged[key]}, but the stage gives {ours[key]} "
                             f"(micro_batch x grad_accum x workers); set it to \"auto\" or change the stage")
    # The loop relies on these two (gathering weights for export, the checkpoint's meta).
    for section, key, field in (("zero_optimization", "stage", "zero_stage"), ("bf16", "enabled", "precision")):
        if merged[section].get(key) != ours[section][key]:
            raise ValueError(f"deepspeed_config sets {section}.{key}={merged[section].get(key)}, but the stage gives "
                             f"{ours[section][key]}; set the stage's {field} instead")
    return merged


def load_user_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise ValueError(f"deepspeed_config {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed_config {path!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed_config {path!r} must hold a JSON object")
    return config


def _merge(ours: dict, theirs: dict) -> dict:
    merged = dict(ours)
    for key, value in theirs.items():
        if value == "auto":
            if key not in ours:
                raise ValueError(f"deepspeed_config: {key!r} is \"auto\" but the stage has no value for it")
        elif isinstance(value, dict):  # recurse even into sections we do not generate: "auto" there is an error
            merged[key] = _merge(ours.get(key) if isinstance(ours.get(key), dict) else {}, value)
        else:
            merged[key] = value
    return merged
