"""The speed levers at validate time (an impossible request is exit 2 naming the field and the
fix) and the Hugging Face weights path: sharded safetensors past a size, loaded back one tensor
at a time. No Ray, no process group."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import yaml

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.spec import parse_spec
from problems import one_problem_starting

PIPELINE = {"name": "t", "stages": {
    "tok": {"kind": "tokenizer", "source": {"paths": ["data/*.jsonl"]}, "vocab_size": 4096},
    "corpus": {"kind": "preprocess", "source": {"paths": ["data/*.jsonl"]}, "tokenizer": "tok", "seq_len": 128},
}}


def problems_of(**train) -> list[str]:
    raw = {**PIPELINE, "stages": {**PIPELINE["stages"], "pretrain": {"kind": "pretrain", "data": "corpus", **train}}}
    with pytest.raises(SpecError) as info:
        parse_spec(yaml.safe_dump(raw))
    return info.value.problems


def test_fused_kernels_on_a_cpu_stage_is_refused_with_the_fix():
    problem = one_problem_starting(problems_of(speed={"fused_kernels": "liger"}), "stages.pretrain")
    assert "fused_kernels: liger" in problem and "use_gpu: false" in problem and "fused_kernels: auto" in problem


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_fused_kernels_without_the_package_names_the_install_command():
    problem = one_problem_starting(problems_of(use_gpu=True, speed={"fused_kernels": "liger"}),
                                   "stages.pretrain.speed.fused_kernels")
    assert "pip install liger-kernel" in problem


@pytest.mark.parametrize("lever, value", [("compile", "fast"), ("attention", "flash2"),
                                          ("activation_checkpointing", "some"), ("fused_kernels", "on")])
def test_an_unknown_mode_names_the_choices(lever, value):
    problem = one_problem_starting(problems_of(speed={lever: value}), f"stages.pretrain.speed.{lever}")
    assert repr(value) in problem or value in problem


def test_validate_exits_2_on_an_impossible_lever(tmp_path, capsys):
    raw = {**PIPELINE, "stages": {**PIPELINE["stages"], "pretrain": {
        "kind": "pretrain", "data": "corpus", "speed": {"fused_kernels": "liger"}}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    assert "fused_kernels: liger" in capsys.readouterr().err


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), config


def test_an_export_past_the_shard_size_is_sharded_and_loads_back_equal(tmp_path):
    from transformers import AutoModelForCausalLM

    from jobs.export import save_hf
    from jobs.model_init import build_model

    model, config = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "tok").mkdir()
    save_hf(state, config, str(tmp_path / "tok"), str(tmp_path / "hf"), max_shard_size=20_000)
    shards = sorted(f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    tokens = torch.randint(0, 300, (1, 16))
    expected = model(tokens).logits
    assert torch.equal(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))(tokens).logits, expected)
    # Our loader (what a finetune's `init` runs) reads the index one tensor at a time.
    loaded = build_model(config, ds_config={}, zero3=False, seed=1, device=torch.device("cpu"),
                         weights_dir=str(tmp_path / "hf"))
    assert torch.equal(loaded(tokens).logits, expected)


def test_random_weights_depend_on_the_seed_and_the_name_only():
    from jobs.model_init import build_model

    _, config = tiny_model()
    a, b, c = (build_model(config, ds_config={}, zero3=False, seed=seed, device=torch.device("cpu"))
               for seed in (7, 7, 8))
    torch.manual_seed(123)  # the global stream plays no part
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim >= 2:
            assert not torch.equal(pa, pc), name
            assert abs(pa.std().item() - config.initializer_range) < 0.005, name
        else:
            assert torch.equal(pa, torch.ones_like(pa)), name  # norm weights
    assert torch.equal(a.model.embed_tokens.weight[0], torch.zeros(32))  # the padding row
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_compiled_layers_under_activation_checkpointing_compile_and_give_eager_gradients(checkpointing):
    from torch._dynamo.utils import counters

    from jobs.speed import apply_speed
    from jobs.train_spec import SpeedSpec

    def gradients(speed: SpeedSpec):
        model, _ = tiny_model()
        apply_speed(model, speed, torch.device("cpu"), torch.float32, zero3=False)
        tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    eager = gradients(SpeedSpec(compile="off", attention="sdpa", fused_kernels="off"))
    torch._dynamo.reset()
    counters.clear()
    compiled = gradients(SpeedSpec(compile="layers", attention="sdpa", fused_kernels="off",
                                   activation_checkpointing=checkpointing))
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
