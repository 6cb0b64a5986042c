"""LoRA fine-tuning end to end: real Ray Train, real DeepSpeed ZeRO-2 (CPU, gloo, 2 workers), peft.

One pipeline from a local Hugging Face model ({path: DIR}, as a team fine-tunes a model it got
elsewhere): the same LoRA fine-tune twice under two names while a worker is set to die once at
step 5 (the first of the two to get there restarts and resumes from step 3, the other runs
through), then an evaluation of the merged export next to the adapter on its base. Outcomes are
checked against independent computations: the adapter's size from r and the model's shapes, the
frozen weights in DeepSpeed's checkpoint against the starting model bit for bit, peft loading the
adapter onto the starting model, and the two runs' weights compared bit for bit.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile

import pytest
import torch

from jobs.checkpoint import step_key
from jobs.export import export_checkpoint
from jobs.storage import open_storage
from orchestrator.console import Console
from orchestrator.runner import run_pipeline
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "examples", "tasks")
R, ALPHA, TARGETS = 4, 8, ["q_proj", "v_proj", "down_proj"]
STEPS, EVERY, CRASH_AT = 6, 3, 5


def write_base_model(out_dir: str) -> None:
    """A tiny Llama with random weights and a tokenizer trained on part of the shipped corpus, saved
    as a Hugging Face directory."""
    from transformers import LlamaForCausalLM

    from jobs.export import save_hf
    from jobs.model import ModelSpec, llama_config
    from jobs.tokenizer import train_tokenizer
    from packed import read_texts

    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    texts = read_texts(sorted(glob.glob(os.path.join(REPO, "examples", "data", "*.jsonl"))))[:500]
    info = train_tokenizer(iter(texts), 1024, 2, tokenizer_dir)
    config = llama_config(ModelSpec(preset="tiny", max_position_embeddings=128), info["vocab_size"], info["eos_id"],
                          info.get("pad_id"))
    torch.manual_seed(0)
    save_hf(dict(LlamaForCausalLM(config).named_parameters()), config, tokenizer_dir, os.path.join(out_dir, "hf"))


def pipeline(storage: str, base_dir: str) -> str:
    lora_ft = {"kind": "finetune", "init": {"path": base_dir},
               "lora": {"r": R, "alpha": ALPHA, "target_modules": TARGETS},
               "task": {"path": os.path.join(TASKS, "plurals.jsonl"), "seq_len": 32},
               "steps": STEPS, "checkpoint_every": EVERY, "log_every": EVERY, "micro_batch": 8, "lr": 1e-2,
               "warmup_steps": 1, "zero_stage": 2, "max_failures": 1}
    mc = {"name": "plurals", "type": "multiple_choice", "path": os.path.join(TASKS, "plurals_mc.jsonl")}
    return json.dumps({"name": "lora-test", "storage": storage, "stages": {
        "ft_a": lora_ft, "ft_b": lora_ft,
        "eval": {"kind": "evaluate", "models": ["ft_a", {"stage": "ft_a", "adapter": True}], "tasks": [mc]},
    }})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("base")
    write_base_model(str(out))
    return str(out / "hf")


@pytest.fixture(scope="module")
def record(tmp_path_factory, base_dir):
    import ray

    from orchestrator.ray_runtime import WORKER_ENV

    tmp = tmp_path_factory.mktemp("lora")
    crash = {"ORCHESTRATOR_CRASH_AT": f"train:{CRASH_AT}", "ORCHESTRATOR_CRASH_ONCE_DIR": str(tmp / "once")}
    saved = {name: os.environ.get(name) for name in crash}
    os.environ.update(crash)  # Ray's workers inherit the environment Ray starts with
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": WORKER_ENV})
    try:
        spec = parse_spec(pipeline(f"file://{tmp}/store", base_dir))
        yield run_pipeline(spec, open_storage(spec.storage), console=Console(open(os.devnull, "w")))
    finally:
        ray.shutdown()
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def stage_dir(record, name: str):
    return open_storage(record.stages[name].output_uri)


def local_copy(record, name: str, prefix: str, tmp_path) -> str:
    target = str(tmp_path / f"{name}-{prefix}")
    stage_dir(record, name).download_prefix(prefix, target)
    return target


def safetensors(record, name: str, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(stage_dir(record, name).read_bytes(key))


def expected_adapter_size(config: dict) -> int:
    """r x (in + out) per targeted projection per layer, from the model's shapes."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    return config["num_hidden_layers"] * sum(R * (shapes[m][0] + shapes[m][1]) for m in TARGETS)


def test_only_the_adapters_train_and_the_frozen_weights_stay_bitwise(record, base_dir):
    from safetensors.torch import load_file

    assert record.status == "succeeded", {n: s.status for n, s in record.stages.items()}
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    expected = expected_adapter_size(config)
    adapter = safetensors(record, "ft_a", "hf-adapter/adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert sum(t.numel() for t in adapter.values()) == expected
    # DeepSpeed's checkpoint: the parameters its optimizer holds are the adapters, nothing else...
    step_dir = stage_dir(record, "ft_a").sub(f"ckpt/{step_key(STEPS)}")
    with tempfile.NamedTemporaryFile() as f:
        f.write(step_dir.read_bytes("mp_rank_00_model_states.pt"))
        f.flush()
        states = torch.load(f.name, weights_only=False)
    optimized = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    assert all(".lora_A." in name or ".lora_B." in name for name in optimized)
    assert sum(shape.numel() for shape in optimized.values()) == expected
    # ...and every other weight is the starting export's, bit for bit, after the steps.
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    module = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in states["module"].items()
              if "lora_" not in k}
    assert base.keys() <= module.keys()
    for name in base:
        assert torch.equal(base[name], module[name]), name
    # The merged export changed exactly the targeted projections.
    merged = safetensors(record, "ft_a", "hf/model.safetensors")
    changed = {name.split(".")[-2] for name in base if not torch.equal(base[name], merged[name])}
    assert changed == set(TARGETS)


def test_the_adapter_loads_with_peft_on_the_base_and_equals_the_merged_export(record, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = local_copy(record, "ft_a", "hf-adapter", tmp_path)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert adapter_config["base_model_name_or_path"] == stage_dir(record, "ft_a").url("init")  # the uploaded base
    assert adapter_config["r"] == R and adapter_config["lora_alpha"] == ALPHA
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir)(tokens).logits
        on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(local_copy(record, "ft_a", "hf", tmp_path))(tokens).logits
    assert (on_base - base_logits).abs().max() > 0.05  # the adapter learned something
    torch.testing.assert_close(merged, on_base, rtol=1e-5, atol=1e-5)


def test_a_lora_checkpoint_exports_merged_like_the_stage(record, tmp_path):
    export_checkpoint(stage_dir(record, "ft_a").sub(f"ckpt/{step_key(STEPS)}"), str(tmp_path / "ckpt-export"))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "ckpt-export" / "model.safetensors"))
    merged = safetensors(record, "ft_a", "hf/model.safetensors")
    assert exported.keys() == merged.keys()
    for name in merged:
        assert torch.equal(exported[name], merged[name]), name


def test_worker_crash_resumes_to_identical_adapters(record):
    a, b = record.stages["ft_a"], record.stages["ft_b"]
    crashed, through = (a, b) if a.metrics["restarts"] else (b, a)
    assert crashed.metrics["restarts"] == 1 and crashed.attempts == 2 and crashed.metrics["resumed_from"] == EVERY
    assert through.metrics["restarts"] == 0 and through.metrics["resumed_from"] is None
    assert crashed.metrics["final_loss"] == through.metrics["final_loss"]
    for key in ("hf-adapter/adapter_model.safetensors", "hf/model.safetensors"):
        expected = safetensors(record, "ft_a" if through is a else "ft_b", key)
        actual = safetensors(record, "ft_a" if crashed is a else "ft_b", key)
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), (key, name)


def test_evaluate_scores_the_adapter_on_its_base_like_the_merged_model(record):
    results = record.stages["eval"].metrics["results"]
    merged, adapter = results["ft_a"]["tasks"]["plurals"], results["ft_a.adapter"]["tasks"]["plurals"]
    assert merged["num_examples"] == 40
    assert adapter == merged
