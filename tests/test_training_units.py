"""Unit tests of the training job's pure parts: the data order (jobs/data.py BatchOrder), the
packed token files (PackedTokens), the DeepSpeed config (jobs/deepspeed_config.py), the model
shape (jobs/model.py) and the learning-rate schedule (jobs/train.py `_warmup_cosine`).
No Ray, no DeepSpeed engine, no process group."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from pydantic import ValidationError

from jobs.data import BatchOrder, PackedTokens, micro_batch_tokens
from jobs.deepspeed_config import build_deepspeed_config, load_user_config
from jobs.model import PRESETS, ModelSpec, flops_per_token, llama_config, num_parameters
from jobs.storage import open_storage
from jobs.storage_local import LocalStorage
from jobs.train_spec import TrainSpec

# --- BatchOrder -----------------------------------------------------------------------------


def _step_parts(order: BatchOrder, step: int) -> list[np.ndarray]:
    """The step's micro batches in (micro, rank) order, the order in which they take positions."""
    return [order.indices(step, m, r) for m in range(order.grad_accum) for r in range(order.world_size)]


def _by_position(num_sequences: int, seed: int, positions) -> list[int]:
    """The sequence at each position of the data order, read one position at a time: the order
    does not depend on the batch shape, only on (seed, epoch)."""
    single = BatchOrder(num_sequences, 1, 1, 1, seed)
    return [int(single.indices(p, 0, 0)[0]) for p in positions]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_global_step_takes_its_positions_once_split_disjointly_over_micro_batches_and_ranks(world_size, grad_accum):
    micro, n, seed = 3, 96, 11
    order = BatchOrder(n, micro, grad_accum, world_size, seed)
    global_batch = micro * grad_accum * world_size
    assert order.global_batch == global_batch
    epoch = []
    for step in range(n // global_batch):  # one whole epoch
        parts = _step_parts(order, step)
        assert all(len(p) == micro for p in parts)
        together = np.concatenate(parts)
        assert len(set(together.tolist())) == global_batch  # disjoint
        positions = range(step * global_batch, (step + 1) * global_batch)
        assert together.tolist() == _by_position(n, seed, positions)
        epoch += together.tolist()
    assert sorted(epoch) == list(range(n))  # the epoch reads every sequence once


def test_rank_and_micro_batch_slices_are_where_the_docstring_puts_them():
    order = BatchOrder(64, 2, 2, 2, seed=3)  # global batch 8
    step = 3
    base = step * 8
    expected = {(0, 0): base + 0, (0, 1): base + 2, (1, 0): base + 4, (1, 1): base + 6}
    for (micro, rank), start in expected.items():
        assert order.indices(step, micro, rank).tolist() == _by_position(64, 3, range(start, start + 2))


def test_the_same_step_micro_and_rank_always_give_the_same_indices():
    order = BatchOrder(50, 4, 2, 2, seed=5)  # global batch 16: steps 3+ cross into later epochs
    first = {(s, m, r): order.indices(s, m, r).tolist() for s in range(8) for m in range(2) for r in range(2)}
    for (s, m, r), indices in reversed(list(first.items())):  # in another order, across epochs
        assert order.indices(s, m, r).tolist() == indices


def test_a_fresh_order_after_a_resume_gives_the_same_later_steps():
    uninterrupted = BatchOrder(50, 4, 2, 2, seed=5)
    expected = {s: [p.tolist() for p in _step_parts(uninterrupted, s)] for s in range(12)}
    resumed = BatchOrder(50, 4, 2, 2, seed=5)  # a new process starting at step 7
    for s in range(7, 12):
        assert [p.tolist() for p in _step_parts(resumed, s)] == expected[s]


def test_a_different_seed_gives_a_different_order():
    a = BatchOrder(40, 4, 1, 1, seed=0).indices(0, 0, 0).tolist() + BatchOrder(40, 4, 1, 1, seed=0).indices(1, 0, 0).tolist()
    b = BatchOrder(40, 4, 1, 1, seed=1).indices(0, 0, 0).tolist() + BatchOrder(40, 4, 1, 1, seed=1).indices(1, 0, 0).tolist()
    assert a != b


def test_epochs_wrap_around_with_a_new_permutation_each_reading_every_sequence_once():
    n, seed = 10, 2
    order = BatchOrder(n, 2, 1, 2, seed)  # global batch 4: epochs end mid-step
    stream = []
    for step in range(10):  # 40 positions: four whole epochs
        stream += np.concatenate(_step_parts(order, step)).tolist()
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert len({tuple(e) for e in epochs}) == 4  # each epoch its own permutation
    assert stream == _by_position(n, seed, range(40))


def test_too_few_sequences_for_one_global_batch_is_an_error():
    with pytest.raises(ValueError) as info:
        BatchOrder(7, 2, 2, 2, seed=0)
    assert "7 training sequences" in str(info.value) and "global batch of 8" in str(info.value)
    assert BatchOrder(8, 2, 2, 2, seed=0).global_batch == 8  # exactly one is enough


# --- PackedTokens ---------------------------------------------------------------------------

SEQ_LEN = 8
STAGE = "corpus-1234abcd"


def _tokens(first: int, count: int) -> np.ndarray:
    """Sequences `first`..`first+count-1`, each token unique and above 32767 (so uint16 matters)."""
    return (60000 + np.arange(first * SEQ_LEN, (first + count) * SEQ_LEN)).astype("<u2").reshape(count, SEQ_LEN)


@pytest.fixture
def stage_uri(tmp_path):
    """A preprocess stage's output as the preprocess stage writes it: manifest + raw token files.
    train: 3 sequences, an empty file, 2 sequences; val: 1 sequence."""
    out = open_storage("file://" + str(tmp_path / "store" / "stages" / STAGE))
    layout = {"train": [("data/train-00000.bin", 0, 3), ("data/train-00001.bin", 3, 0), ("data/train-00002.bin", 3, 2)],
              "val": [("data/val-00000.bin", 100, 1)]}
    splits = {}
    for split, files in layout.items():
        for key, first, count in files:
            out.write_bytes(key, _tokens(first, count).tobytes())
        entries = [{"key": key, "num_sequences": count} for key, _, count in files]
        splits[split] = {"files": entries, "num_sequences": sum(e["num_sequences"] for e in entries)}
    manifest = {"format": "packed-tokens", "dtype": "uint16", "seq_len": SEQ_LEN, "vocab_size": 65000,
                "eos_id": 3, "tokenizer": "tokenizer/", "splits": splits}
    out.write_bytes("manifest.json", json.dumps(manifest).encode())
    return out.uri


@pytest.fixture
def downloads(monkeypatch):
    """Every key downloaded from storage, in order."""
    keys: list[str] = []
    real = LocalStorage.download_file

    def spy(self, key, local_path):
        keys.append(key)
        real(self, key, local_path)

    monkeypatch.setattr(LocalStorage, "download_file", spy)
    return keys


def test_packed_tokens_reads_the_manifest_and_every_sequence_across_files(stage_uri, tmp_path):
    data = PackedTokens(stage_uri, "train", str(tmp_path / "cache"))
    assert len(data) == 5
    assert (data.seq_len, data.vocab_size, data.eos_id, data.dtype) == (SEQ_LEN, 65000, 3, np.dtype("uint16"))
    expected = _tokens(0, 5)
    for i in [4, 0, 2, 3, 1]:  # across the boundary, skipping the empty file, in any order
        assert data.sequence(i).tolist() == expected[i].tolist()
    val = PackedTokens(stage_uri, "val", str(tmp_path / "cache"))
    assert len(val) == 1 and val.sequence(0).tolist() == _tokens(100, 1)[0].tolist()


def test_micro_batch_tokens_are_int64_rows_of_the_sequences(stage_uri, tmp_path):
    data = PackedTokens(stage_uri, "train", str(tmp_path / "cache"))
    batch = micro_batch_tokens(data, np.array([4, 0]))
    assert batch.dtype == np.int64 and batch.shape == (2, SEQ_LEN)
    assert batch.tolist() == [_tokens(4, 1)[0].tolist(), _tokens(0, 1)[0].tolist()]
    assert batch.min() > 32767  # unsigned tokens stay what they are


def test_token_files_are_fetched_on_first_use_into_the_cache(stage_uri, tmp_path, downloads):
    cache = tmp_path / "cache"
    data = PackedTokens(stage_uri, "train", str(cache))
    assert downloads == []
    data.sequence(1)
    assert downloads == ["data/train-00000.bin"]  # only the file that holds it
    data.sequence(0)
    data.sequence(4)
    assert downloads == ["data/train-00000.bin", "data/train-00002.bin"]
    for key, count in (("data/train-00000.bin", 3), ("data/train-00002.bin", 2)):
        assert os.path.getsize(cache / STAGE / key) == count * SEQ_LEN * 2
    assert not (cache / STAGE / "data" / "train-00001.bin").exists()  # empty: never fetched


def test_a_cached_file_of_the_right_size_is_not_downloaded_again(stage_uri, tmp_path, downloads):
    cache = tmp_path / "cache"
    PackedTokens(stage_uri, "train", str(cache)).sequence(0)
    # Mark the cached copy (same size): a re-download would undo the mark.
    cached = cache / STAGE / "data" / "train-00000.bin"
    marked = _tokens(0, 3).copy()
    marked[0, 0] = 7
    cached.write_bytes(marked.tobytes())

    again = PackedTokens(stage_uri, "train", str(cache))  # another process on the node
    assert again.sequence(0)[0] == 7
    assert downloads == ["data/train-00000.bin"]


def test_a_cached_file_of_the_wrong_size_is_downloaded_again(stage_uri, tmp_path, downloads):
    cache = tmp_path / "cache"
    cached = cache / STAGE / "data" / "train-00000.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x00" * 5)  # a torn copy
    data = PackedTokens(stage_uri, "train", str(cache))
    assert data.sequence(2).tolist() == _tokens(2, 1)[0].tolist()
    assert downloads == ["data/train-00000.bin"]


# --- build_deepspeed_config -----------------------------------------------------------------

STAGE_ARGS = dict(zero_stage=2, micro_batch=4, grad_accum=2, world_size=2, grad_clip=1.0, bf16=False)


def _walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    else:
        yield value


def test_deepspeed_config_from_the_stage():
    config = build_deepspeed_config(**STAGE_ARGS)
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": False}
    assert build_deepspeed_config(**{**STAGE_ARGS, "zero_stage": 3, "bf16": True, "world_size": 8})[
        "train_batch_size"] == 64
    assert build_deepspeed_config(**{**STAGE_ARGS, "bf16": True})["bf16"] == {"enabled": True}
    assert build_deepspeed_config(**STAGE_ARGS, user_config={}) == config


def test_user_config_is_merged_and_its_auto_values_come_from_the_stage():
    user = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,  # equal to the stage's: fine
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": "auto", "overlap_comm": True, "reduce_bucket_size": 50_000_000},
        "bf16": {"enabled": "auto"},
        "activation_checkpointing": {"partition_activations": False},
    }
    config = build_deepspeed_config(**STAGE_ARGS, user_config=user)
    assert "auto" not in list(_walk(config))
    assert config["train_batch_size"] == 16 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 50_000_000}
    assert config["bf16"] == {"enabled": False}
    assert config["activation_checkpointing"] == {"partition_activations": False}
    assert user["zero_optimization"]["stage"] == "auto"  # the user's dict is left as it was


def test_user_config_overrides_a_setting_that_is_not_the_batch_shape():
    config = build_deepspeed_config(**STAGE_ARGS, user_config={"gradient_clipping": 0.5,
                                                               "zero_optimization": {"overlap_comm": False}})
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False}


@pytest.mark.parametrize("key, theirs, ours", [
    ("train_batch_size", 32, 16),
    ("train_micro_batch_size_per_gpu", 8, 4),
    ("gradient_accumulation_steps", 1, 2),
])
def test_a_user_batch_key_that_contradicts_the_stage_names_both_numbers(key, theirs, ours):
    with pytest.raises(ValueError) as info:
        build_deepspeed_config(**STAGE_ARGS, user_config={key: theirs})
    message = str(info.value)
    assert f"{key}={theirs}" in message and f"the stage gives {ours}" in message
    assert '"auto"' in message  # and says how to fix it


@pytest.mark.parametrize("user, key", [
    ({"fp16": "auto"}, "fp16"),
    ({"zero_optimization": {"offload_param": "auto"}}, "offload_param"),
])
def test_auto_for_a_key_the_stage_has_no_value_for_is_an_error(user, key):
    with pytest.raises(ValueError, match=f"'{key}' is \"auto\" but the stage has no value for it"):
        build_deepspeed_config(**STAGE_ARGS, user_config=user)


def test_auto_nested_in_a_section_the_stage_does_not_generate_is_an_error():
    user = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}
    with pytest.raises(ValueError, match="'lr' is \"auto\""):
        build_deepspeed_config(**STAGE_ARGS, user_config=user)


def test_load_user_config(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    assert load_user_config(str(good)) == {"zero_optimization": {"overlap_comm": True}}

    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError) as info:
        load_user_config(missing)
    assert repr(missing) in str(info.value) and "No such file" in str(info.value)

    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,}')
    with pytest.raises(ValueError) as info:
        load_user_config(str(bad))
    assert repr(str(bad)) in str(info.value) and "not valid JSON" in str(info.value)

    not_an_object = tmp_path / "list.json"
    not_an_object.write_text("[1, 2]")
    with pytest.raises(ValueError) as info:
        load_user_config(str(not_an_object))
    assert repr(str(not_an_object)) in str(info.value) and "must hold a JSON object" in str(info.value)


# --- ModelSpec ------------------------------------------------------------------------------

DIMS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_fill_every_dimension(preset):
    assert ModelSpec(preset=preset).dims() == PRESETS[preset]


def test_the_default_is_the_tiny_preset():
    assert ModelSpec().dims() == PRESETS["tiny"]


def test_explicit_dimensions_override_the_preset():
    spec = ModelSpec(preset="125m", num_layers=2, intermediate_size=512)
    assert spec.dims() == {**PRESETS["125m"], "num_layers": 2, "intermediate_size": 512}


def test_without_a_preset_every_dimension_is_needed():
    with pytest.raises(ValidationError) as info:
        ModelSpec(preset=None)
    assert "without a preset, give " + ", ".join(DIMS) in str(info.value)
    with pytest.raises(ValidationError) as info:
        ModelSpec(preset=None, hidden_size=64, num_heads=4)
    assert "without a preset, give num_layers, num_kv_heads, intermediate_size" in str(info.value)
    full = ModelSpec(preset=None, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128)
    assert full.dims() == dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128)


def test_heads_must_divide_hidden_size_and_kv_heads_must_divide_heads():
    with pytest.raises(ValidationError, match="hidden_size 100 does not divide by num_heads 12"):
        ModelSpec(preset="125m", hidden_size=100)
    with pytest.raises(ValidationError, match="num_heads 12 does not divide by num_kv_heads 5"):
        ModelSpec(preset="125m", num_kv_heads=5)


def test_unknown_presets_and_fields_are_rejected():
    with pytest.raises(ValidationError):
        ModelSpec(preset="7b")
    with pytest.raises(ValidationError):
        ModelSpec(num_hidden_layers=2)


def test_an_odd_head_dimension_is_rejected_at_validation():
    with pytest.raises(ValidationError):
        ModelSpec(preset="tiny", hidden_size=36)  # 4 heads of 9


def test_llama_config_carries_the_spec_and_the_tokenizer():
    spec = ModelSpec(preset="1b", max_position_embeddings=512, rope_theta=500000.0, tie_embeddings=False)
    config = llama_config(spec, vocab_size=4096, eos_id=1, pad_id=2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == tuple(PRESETS["1b"][k] for k in DIMS)
    assert config.vocab_size == 4096 and config.max_position_embeddings == 512
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 1, 2)
    assert config.tie_word_embeddings is False


@pytest.mark.parametrize("preset", ["tiny", "125m"])
@pytest.mark.parametrize("tie", [True, False])
def test_num_parameters_counts_the_real_model(preset, tie):
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(ModelSpec(preset=preset, tie_embeddings=tie), vocab_size=4096, eos_id=0, pad_id=None)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    real = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter
    assert num_parameters(config) == real
    embeddings = 4096 * config.hidden_size * (1 if tie else 2)
    assert num_parameters(config, non_embedding=True) == real - embeddings


def test_flops_per_token_is_six_per_weight_plus_attention():
    config = llama_config(ModelSpec(preset="tiny"), vocab_size=1000, eos_id=0, pad_id=None)
    weights = num_parameters(config, non_embedding=True) + 1000 * 64
    assert flops_per_token(config, 256) == 6.0 * weights + 12.0 * 2 * 256 * 64


# --- the learning-rate schedule -------------------------------------------------------------

def _schedule(**fields):
    from jobs.train import _warmup_cosine

    return _warmup_cosine(TrainSpec(**fields))


def test_warmup_rises_linearly_to_the_peak():
    f = _schedule(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(9) == 1.0 and f(10) == 1.0  # the peak, held across the end of warmup


def test_cosine_falls_to_min_lr_ratio_at_the_last_step():
    f = _schedule(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    after = [f(s) for s in range(10, 101)]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly down
    assert f(55) == pytest.approx(0.55)  # half way: half way between the peak and the floor
    assert f(100) == pytest.approx(0.1)  # the value after the last optimizer step
    assert 0.1 < f(99) < 0.1 + 0.9 * (1 - math.cos(math.pi / 90)) / 2 + 1e-12
    assert f(150) == pytest.approx(0.1)  # past the end it stays at the floor


def test_no_warmup_starts_at_the_peak():
    f = _schedule(steps=10, warmup_steps=0, min_lr_ratio=0.0)
    assert f(0) == 1.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0)


def test_a_min_lr_ratio_of_one_is_constant_after_warmup():
    f = _schedule(steps=20, warmup_steps=5, min_lr_ratio=1.0)
    assert [f(s) for s in range(5, 25)] == [1.0] * 20
