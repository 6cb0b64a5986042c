"""The model: a decoder-only Llama from `transformers`, sized by a preset or explicit dimensions.

Presets name shapes people know (GPT-3's 125M/350M, a 1B Llama); `tiny` trains on a laptop CPU
in seconds and is what CI uses. The vocabulary always comes from the tokenizer, never the spec.
FLOPs per token follow the usual 6·N (forward + backward over the non-embedding weights) plus
the attention term 12·layers·seq_len·hidden, which is what MFU divides by.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from jobs.fields import output

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256),
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048),
    "350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=5632),
}


class ModelSpec(BaseModel):
    """Model shape. A preset fills every dimension that is not given explicitly."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    preset: Literal["tiny", "125m", "350m", "1b"] | None = output("tiny")
    """A named shape; null to give every dimension yourself."""
    hidden_size: int | None = output(None, ge=8)
    """Width of the residual stream."""
    num_layers: int | None = output(None, ge=1)
    """Transformer blocks."""
    num_heads: int | None = output(None, ge=1)
    """Attention heads (hidden_size must divide by it)."""
    num_kv_heads: int | None = output(None, ge=1)
    """Key/value heads for grouped-query attention (num_heads must divide by it)."""
    intermediate_size: int | None = output(None, ge=8)
    """Width of the MLP."""
    max_position_embeddings: int = output(2048, ge=8)
    """Longest sequence the model accepts; the data's seq_len must not exceed it."""
    rope_theta: float = output(10000.0, gt=0)
    """RoPE base."""
    tie_embeddings: bool = output(True)
    """Share the input embedding and output projection weights."""

    @model_validator(mode="after")
    def _complete_and_consistent(self):
        dims = self.dims()
        missing = [k for k, v in dims.items() if v is None]
        if missing:
            raise ValueError(f"without a preset, give {', '.join(missing)}")
        if dims["hidden_size"] % dims["num_heads"]:
            raise ValueError(f"hidden_size {dims['hidden_size']} does not divide by num_heads {dims['num_heads']}")
        if (dims["hidden_size"] // dims["num_heads"]) % 2:
            raise ValueError(f"the head dimension hidden_size / num_heads = {dims['hidden_size'] // dims['num_heads']} "
                             "must be even (rotary embeddings rotate pairs of dimensions)")
        if dims["num_heads"] % dims["num_kv_heads"]:
            raise ValueError(f"num_heads {dims['num_heads']} does not divide by num_kv_heads {dims['num_kv_heads']}")
        return self

    def dims(self) -> dict[str, int | None]:
        base = PRESETS.get(self.preset, {}) if self.preset else {}
        return {k: getattr(self, k) if getattr(self, k) is not None else base.get(k) for k in PRESETS["tiny"]}


def llama_config(spec: ModelSpec, vocab_size: int, eos_id: int, pad_id: int | None):
    from transformers import LlamaConfig

    d = spec.dims()
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_layers"],
        num_attention_heads=d["num_heads"],
        num_key_value_heads=d["num_kv_heads"],
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def num_parameters(config, non_embedding: bool = False) -> int:
    d, h, i, n = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * i + 2 * d  # q,o + k,v + MLP + norms
    embeddings = n * d * (1 if config.tie_word_embeddings else 2)
    body = h * per_layer + d
    return body if non_embedding else body + embeddings


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores."""
    weights = num_parameters(config, non_embedding=True) + config.vocab_size * config.hidden_size  # + LM head
    return 6.0 * weights + 12.0 * config.num_hidden_layers * seq_len * config.hidden_size
