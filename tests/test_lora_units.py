"""LoRA without Ray or DeepSpeed: the `lora` spec's errors at validate (exit 2, the field, the
valid values), its place in the stage hash, evaluate's adapter entry, and jobs.lora's wrapping and
merge checked against the formula W + alpha / r · B·A computed here."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import yaml

from jobs.lora import TARGET_MODULES, LoraSpec
from jobs.storage import open_storage
from orchestrator.cli import main as cli
from orchestrator.errors import SpecError
from orchestrator.kinds.evaluate import AdapterRef, model_label
from orchestrator.plan import make_plan
from orchestrator.spec import parse_spec
from problems import one_problem_starting


@pytest.fixture
def pipeline(pipeline) -> dict:
    """conftest's pipeline with LoRA on its fine-tune, which evaluate scores merged and as an adapter."""
    pipeline["stages"]["sft"]["lora"] = {}
    pipeline["stages"]["eval"]["models"] = ["sft", {"stage": "sft", "adapter": True}]
    return pipeline


def _problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(yaml.safe_dump(raw))
    return info.value.problems


def _with(pipeline: dict, stage: str, **fields) -> dict:
    raw = copy.deepcopy(pipeline)
    raw["stages"][stage].update(fields)
    return raw


def test_lora_defaults_and_every_zero_stage_validate(pipeline):
    assert LoraSpec() == LoraSpec(r=8, alpha=16.0, dropout=0.0, target_modules=list(TARGET_MODULES))
    for zero in (1, 2, 3):
        spec = parse_spec(yaml.safe_dump(_with(pipeline, "sft", zero_stage=zero)))
        assert spec.stages["sft"].lora == LoraSpec()
    without = _with(_with(pipeline, "sft", lora=None), "eval", models=["sft"])
    assert parse_spec(yaml.safe_dump(without)).stages["sft"].lora is None


@pytest.mark.parametrize("lora, field, fragment", [
    ({"target_modules": ["q_proj", "qkv"]}, "lora.target_modules[1]",
     "Input should be 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj' or 'down_proj' (got 'qkv')"),
    ({"target_modules": ["q_proj", "q_proj"]}, "lora.target_modules", "names a module more than once"),
    ({"target_modules": []}, "lora.target_modules", "at least 1 item"),
    ({"r": 0}, "lora.r", "greater than or equal to 1"),
    ({"dropout": 1.0}, "lora.dropout", "less than 1"),
    ({"rank": 4}, "lora.rank", "valid fields: alpha, dropout, r, target_modules"),
])
def test_lora_mistakes_name_the_field_and_the_valid_values(pipeline, lora, field, fragment):
    problems = _problems(_with(pipeline, "sft", lora=lora))
    assert len(problems) == 1, problems
    assert fragment in one_problem_starting(problems, f"stages.sft.{field}")


def test_cli_validate_an_unknown_module_exits_2(pipeline, tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_with(pipeline, "sft", lora={"target_modules": ["attn"]})))
    assert cli(["validate", str(path)]) == 2
    assert "stages.sft.lora.target_modules[0]: Input should be 'q_proj'" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_evaluating_the_adapter_of_a_stage_without_lora_is_an_error(pipeline, stage):
    raw = _with(pipeline, "sft", lora=None) if stage == "sft" else pipeline
    raw = _with(raw, "eval", models=[{"stage": stage, "adapter": True}])
    problems = _problems(raw)
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.eval.models[0].adapter")
    assert f"{stage} trains no adapter (it has no `lora`)" in message and f"name the stage itself ({stage})" in message


def test_the_adapter_entry_depends_on_its_stage_and_has_its_own_label(pipeline):
    spec = parse_spec(yaml.safe_dump(pipeline))
    assert spec.stages["eval"].models[1] == AdapterRef(stage="sft", adapter=True)
    assert spec.upstream("eval") == {"models[0]": "sft", "models[1]": "sft", "data": "corpus"}
    assert [model_label(m) for m in spec.stages["eval"].models] == ["sft", "sft.adapter"]
    problems = _problems(_with(pipeline, "eval", models=[{"stage": "sft", "adapter": False}]))
    assert "Input should be True" in one_problem_starting(problems, "stages.eval.models[0].adapter")


@pytest.mark.parametrize("lora", [None, {"r": 16}, {"alpha": 8}, {"dropout": 0.1}, {"target_modules": ["q_proj"]}])
def test_every_lora_field_changes_the_stage_hash(pipeline, tmp_path, lora):
    storage = open_storage(f"file://{tmp_path}/store")

    def hashes(raw):
        return {p.name: p.hash for p in make_plan(parse_spec(yaml.safe_dump(raw)), storage)}

    merged_only = _with(pipeline, "eval", models=["sft"])  # `lora: null` has no adapter to evaluate
    before, after = hashes(merged_only), hashes(_with(merged_only, "sft", lora=lora))
    assert {name for name in before if before[name] != after[name]} == {"sft", "eval"}


# --- jobs.lora on a small model: wrapping and the merge ---------------------------------------

SPEC = LoraSpec(r=2, alpha=6.0, target_modules=["q_proj", "up_proj"])


def _model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def test_wrap_trains_the_adapters_only_and_seeds_them_by_name():
    from jobs.lora import wrap

    first, note = wrap(_model(), SPEC, seed=7)
    torch.manual_seed(123)  # another global stream: the adapters must not depend on it
    second, _ = wrap(_model(), SPEC, seed=7)
    trainable = {name: p for name, p in first.named_parameters() if p.requires_grad}
    # r x (in + out) per targeted projection per layer: q 16 -> 16, up 16 -> 32
    assert sum(p.numel() for p in trainable.values()) == 2 * SPEC.r * ((16 + 16) + (16 + 32))
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert f"{2 * 2 * (32 + 48):,} trainable parameters" in note
    others = dict(second.named_parameters())
    for name, p in trainable.items():
        assert torch.equal(p, others[name]), name
        if ".lora_B." in name:
            assert not p.any()  # B starts at zero: step 0 is the starting model


def test_the_merge_is_w_plus_alpha_over_r_b_a_onto_the_base_export(tmp_path):
    from jobs.lora import _merged_state, _with_adapters, peft_config, wrap

    base = _model()
    base.save_pretrained(tmp_path / "base")
    wrapped, _ = wrap(_model(), SPEC, seed=0)
    adapters = {n: torch.randn_like(p) for n, p in wrapped.named_parameters() if p.requires_grad}  # B != 0
    merged = _merged_state(_with_adapters(str(tmp_path / "base"), adapters, peft_config(SPEC, "file:///base")))
    expected = dict(base.named_parameters())
    for layer in range(2):
        for module, parent in (("q_proj", "self_attn"), ("up_proj", "mlp")):
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            a, b = adapters[f"{prefix}.lora_A.default.weight"], adapters[f"{prefix}.lora_B.default.weight"]
            name = f"model.layers.{layer}.{parent}.{module}.weight"
            expected[name] = expected[name] + SPEC.alpha / SPEC.r * b @ a
    assert merged.keys() == expected.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name].detach(), rtol=1e-6, atol=1e-6)


def test_an_adapter_missing_a_weight_is_refused(tmp_path):
    from jobs.lora import _with_adapters, peft_config, wrap

    _model().save_pretrained(tmp_path / "base")
    wrapped, _ = wrap(_model(), SPEC, seed=0)
    adapters = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    adapters.pop(next(iter(adapters)))
    with pytest.raises(ValueError, match="the adapters lack weights"):
        _with_adapters(str(tmp_path / "base"), adapters, peft_config(SPEC))


def test_localize_adapter_points_the_adapter_at_a_local_copy_of_its_base(tmp_path):
    from jobs.lora import localize_adapter, peft_config

    _model().save_pretrained(tmp_path / "store" / "base")
    adapter = tmp_path / "adapter"
    peft_config(SPEC, f"file://{tmp_path}/store/base").save_pretrained(str(adapter))
    localize_adapter(str(adapter), str(tmp_path / "local-base"))
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(tmp_path / "local-base")
    assert os.path.exists(tmp_path / "local-base" / "model.safetensors")
    model_dir = tmp_path / "store" / "base"
    localize_adapter(str(model_dir), str(tmp_path / "unused"))  # a model's directory: nothing to do
    assert not os.path.exists(tmp_path / "unused")

