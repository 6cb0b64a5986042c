"""Unit tests of data mixtures (jobs/mixture.py, the `data: [{stage, weight}]` spec form, the plan
and the report): no Ray. The order's properties are checked against independent counts: the
shares at every prefix, each source read as a permutation per epoch, the batches' token contents
read back from packed files written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from jobs.data import BatchOrder, epoch_order
from jobs.mixture import MixtureData, MixtureOrder, MixtureSource
from jobs.storage import open_storage
from orchestrator.cli import main as cli
from orchestrator.errors import SpecError
from orchestrator.kinds.training import TrainResults
from orchestrator.plan import make_plan
from orchestrator.report import mixture_table
from orchestrator.spec import parse_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources_of_stream(order: MixtureOrder, steps: int) -> np.ndarray:
    """The source of every position of the first `steps` steps, read back through indices()."""
    per_step = []
    for step in range(steps):
        for micro in range(order.grad_accum):
            for rank in range(order.world_size):
                indices = order.indices(step, micro, rank)
                per_step.append(np.searchsorted(order.offsets, indices, side="right") - 1)
    return np.concatenate(per_step)


# --- the order: exact quotas -----------------------------------------------------------------

@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [3, 1], [1, 1, 1, 1, 1], [0.05, 0.9, 0.05]])
def test_every_prefix_holds_each_source_within_the_stated_tolerance_of_its_weight(weights):
    order = MixtureOrder([5000, 300, 77, 41, 9][:len(weights)], weights, micro_batch=4, grad_accum=2, world_size=3,
                         seed=11)
    sources = _sources_of_stream(order, steps=200)  # 4800 sequences, in the order the ranks read them
    shares = np.asarray(weights) / sum(weights)
    tolerance = (len(weights) - 1) / 2 + 1e-9  # documented in jobs/mixture.py
    counts = np.zeros(len(weights))
    for n, source in enumerate(sources, start=1):
        counts[source] += 1
        assert np.abs(counts - n * shares).max() <= tolerance, (n, counts, n * shares)
    assert order.sequences_per_source(len(sources)) == counts.astype(int).tolist()
    # Every step too, to the rounding: a step's 24 sequences hold about 24 x each share (two prefixes' errors).
    for step in range(200):
        got = np.bincount(sources[24 * step:24 * (step + 1)], minlength=len(weights))
        assert np.abs(got - 24 * shares).max() <= 2 * tolerance, (step, got)


def test_each_source_reads_every_sequence_once_per_epoch_of_its_own():
    sizes = [50, 7]
    order = MixtureOrder(sizes, [0.8, 0.2], micro_batch=5, grad_accum=1, world_size=2, seed=4)
    indices = np.concatenate([order.indices(step, 0, rank) for step in range(30) for rank in range(2)])
    for k, size in enumerate(sizes):
        mine = indices[(indices >= order.offsets[k]) & (indices < order.offsets[k] + size)] - order.offsets[k]
        full = len(mine) // size
        assert full >= 3, "the test must cover several epochs of each source"
        for epoch in range(full):
            assert sorted(mine[epoch * size:(epoch + 1) * size].tolist()) == list(range(size))
        assert mine[:size].tolist() != mine[size:2 * size].tolist()  # a new shuffle each epoch


def test_the_order_is_a_pure_function_of_seed_step_micro_and_rank():
    def make():
        return MixtureOrder([1000, 400, 30], [0.5, 0.3, 0.2], micro_batch=4, grad_accum=3, world_size=2, seed=9)

    keys = [(step, micro, rank) for step in range(50) for micro in range(3) for rank in range(2)]
    first = make()
    expected = {k: first.indices(*k).tolist() for k in keys}
    shuffled = make()
    for k in reversed(keys):  # another instance, another call order
        assert shuffled.indices(*k).tolist() == expected[k]
    # Another process: nothing depends on the interpreter's state or hash seed.
    script = ("import json; from jobs.mixture import MixtureOrder; "
              "o = MixtureOrder([1000, 400, 30], [0.5, 0.3, 0.2], 4, 3, 2, seed=9); "
              "print(json.dumps([o.indices(s, m, r).tolist() for s in (0, 17, 49) for m in range(3) for r in range(2)]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == [expected[(s, m, r)] for s in (0, 17, 49) for m in range(3) for r in range(2)]
    other_seed = MixtureOrder([1000, 400, 30], [0.5, 0.3, 0.2], 4, 3, 2, seed=10)
    assert other_seed.indices(0, 0, 0).tolist() != expected[(0, 0, 0)]


def test_a_restart_at_step_k_reads_the_batches_of_an_uninterrupted_run():
    args = ([300, 120], [2.0, 1.0], 4, 2, 2, 5)
    uninterrupted = MixtureOrder(*args)
    full = [uninterrupted.indices(s, m, r).tolist() for s in range(40) for m in range(2) for r in range(2)]
    resumed = MixtureOrder(*args)  # a new process that starts at step 23
    tail = [resumed.indices(s, m, r).tolist() for s in range(23, 40) for m in range(2) for r in range(2)]
    assert tail == full[23 * 4:]


def test_a_single_source_mixture_is_todays_order():
    for size, micro, accum, world, seed in [(100_003, 8, 2, 3, 42), (50, 4, 2, 2, 5), (7, 1, 1, 1, -3)]:
        plain, mixed = BatchOrder(size, micro, accum, world, seed), MixtureOrder([size], [0.3], micro, accum, world, seed)
        for step in (0, 1, 9, 10_000):
            for m in range(accum):
                for r in range(world):
                    assert np.array_equal(mixed.indices(step, m, r), plain.indices(step, m, r))


def test_sources_are_shuffled_with_keys_of_their_own():
    positions = np.arange(64, dtype=np.uint64)
    assert epoch_order(positions, 64, seed=1).tolist() != epoch_order(positions, 64, seed=1, stream=1).tolist()


def test_bad_weights_and_empty_sources_are_refused():
    with pytest.raises(ValueError, match="weights must be > 0"):
        MixtureOrder([10, 10], [1.0, 0.0], 1, 1, 1, 0)
    with pytest.raises(ValueError, match="needs a training sequence"):
        MixtureOrder([10, 0], [1.0, 1.0], 1, 1, 1, 0)


# --- the data: batches read from each source's packed files ---------------------------------------

def _write_stage(path, num_sequences: int, seq_len: int, first_token: int, vocab_size: int = 1000) -> str:
    """A preprocess stage's output whose sequence i holds first_token + i in every position."""
    os.makedirs(path / "data")
    rows = (first_token + np.arange(num_sequences, dtype=np.uint16))[:, None].repeat(seq_len, axis=1)
    rows.tofile(path / "data" / "train-00000.bin")
    manifest = {"dtype": "uint16", "seq_len": seq_len, "vocab_size": vocab_size, "eos_id": 0,
                "splits": {"train": {"files": [{"key": "data/train-00000.bin", "num_sequences": num_sequences}]},
                           "val": {"files": []}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return f"file://{path}"


def test_a_mixture_batch_holds_the_sequences_its_order_names(tmp_path):
    sources = [MixtureSource("web", _write_stage(tmp_path / "web", 40, 8, 100), 3.0),
               MixtureSource("code", _write_stage(tmp_path / "code", 9, 8, 500), 1.0)]
    data = MixtureData(sources, str(tmp_path / "cache"))
    order = MixtureOrder(data.sizes, [3.0, 1.0], micro_batch=4, grad_accum=1, world_size=1, seed=0)
    try:
        assert (len(data), data.seq_len) == (49, 8)
        seen = []
        for step in range(10):
            indices = order.indices(step, 0, 0)
            data.prefetch(indices)
            tokens, labels = data.batch(indices)
            assert tokens.dtype == np.int64 and tokens.shape == (4, 8) and labels is tokens
            expected = [100 + i if i < 40 else 500 + i - 40 for i in indices.tolist()]
            assert tokens[:, 0].tolist() == expected and (tokens == tokens[:, :1]).all()
            seen += expected
        assert sum(t >= 500 for t in seen) == 10  # a quarter of 40 sequences, exactly
    finally:
        data.close()


def test_sources_with_another_vocabulary_are_refused(tmp_path):
    sources = [MixtureSource("a", _write_stage(tmp_path / "a", 4, 8, 1), 1.0),
               MixtureSource("b", _write_stage(tmp_path / "b", 4, 8, 1, vocab_size=2000), 1.0)]
    with pytest.raises(ValueError, match="a and b differ in vocab_size"):
        MixtureData(sources, str(tmp_path / "cache"))


# --- the pipeline file --------------------------------------------------------------------------

TOK = {"kind": "tokenizer", "source": {"paths": ["data/*.jsonl"]}, "vocab_size": 4096}


def _corpus(tokenizer="tok", seq_len=256) -> dict:
    return {"kind": "preprocess", "source": {"paths": ["data/*.jsonl"]}, "tokenizer": tokenizer, "seq_len": seq_len}


def _pipeline(data, **stages) -> str:
    train = {"kind": "pretrain", "data": data, "model": {"preset": "tiny"}, "steps": 20}
    return yaml.safe_dump({"name": "t", "stages": {"tok": TOK, "web": _corpus(), "code": _corpus(), **stages,
                                                    "train": train}})


def _problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    return info.value.problems


MIX = [{"stage": "web", "weight": 0.7}, {"stage": "code", "weight": 0.3}]


def test_a_mixture_validates_and_references_each_source():
    spec = parse_spec(_pipeline(MIX))
    assert [(s.stage, s.weight) for s in spec.stages["train"].data] == [("web", 0.7), ("code", 0.3)]
    assert spec.upstream("train") == {"data[0]": "web", "data[1]": "code"}
    assert spec.topological_order().index("train") == 3


@pytest.mark.parametrize("weight", [0, -1, float("nan")])
def test_a_weight_that_is_not_positive_is_an_error_naming_the_entry(weight):
    problems = _problems(_pipeline([MIX[0], {"stage": "code", "weight": weight}]))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"stages.train.data: data[1].weight: {weight:g}; a weight must be a finite number > 0"), problems


def test_a_malformed_entry_is_one_problem_at_its_index():
    problems = _problems(_pipeline([MIX[0], {"stage": "code", "wieght": 1}]))
    assert len(problems) == 1 and problems[0].startswith("stages.train.data: data[1].weight: Field required"), problems
    problems = _problems(_pipeline([MIX[0], MIX[0]]))
    assert len(problems) == 1 and "more than once" in problems[0], problems
    problems = _problems(_pipeline([]))
    assert len(problems) == 1 and "non-empty list of {stage: NAME, weight: W}" in problems[0], problems


def test_a_source_that_is_not_a_preprocess_stage_is_named_by_its_index():
    problems = _problems(_pipeline([MIX[0], {"stage": "tok", "weight": 1}]))
    assert problems == ["stages.train.data[1]: 'tok' is a tokenizer stage; it must name a preprocess stage"]


def test_sources_with_different_tokenizers_are_an_error_naming_both_stages(tmp_path):
    other_tok = {**TOK, "vocab_size": 8192}
    problems = _problems(_pipeline(MIX + [{"stage": "books", "weight": 1}], tok2=other_tok,
                                   books=_corpus(tokenizer="tok2")))
    assert problems == ["stages.train.data[2].stage: books is tokenized with tokenizer stage tok2 but web with "
                        "tokenizer stage tok; every source of a mixture must use the same tokenizer stage (or the "
                        "same {path: DIR})"]
    # Local tokenizers: the same directory (however it is written) is one tokenizer.
    (tmp_path / "tk").mkdir()
    same = _pipeline([{"stage": "a", "weight": 1}, {"stage": "b", "weight": 1}],
                     a=_corpus(tokenizer={"path": str(tmp_path / "tk")}),
                     b=_corpus(tokenizer={"path": str(tmp_path / "tk") + "/"}))
    parse_spec(same)
    problems = _problems(_pipeline([{"stage": "a", "weight": 1}, {"stage": "web", "weight": 1}],
                                   a=_corpus(tokenizer={"path": str(tmp_path / "tk")})))
    assert len(problems) == 1 and problems[0].startswith("stages.train.data[1].stage: web is tokenized with "
                                                         "tokenizer stage tok but a with {path: "), problems


def test_sources_with_different_seq_len_are_an_error():
    problems = _problems(_pipeline(MIX + [{"stage": "long", "weight": 1}], long=_corpus(seq_len=512)))
    assert problems == ["stages.train.data[2].stage: long has seq_len 512 but web has 256; every source of a "
                        "mixture must pack sequences of one length"]


def test_finetune_takes_a_mixture_too():
    text = yaml.safe_dump({"name": "t", "stages": {
        "tok": TOK, "web": _corpus(), "code": _corpus(seq_len=128),
        "train": {"kind": "pretrain", "data": "web", "model": {"preset": "tiny"}},
        "ft": {"kind": "finetune", "init": "train", "data": MIX}}})
    problems = _problems(text)
    assert problems == ["stages.ft.data[1].stage: code has seq_len 128 but web has 256; every source of a "
                        "mixture must pack sequences of one length"]


def test_cli_validate_exits_2_on_a_bad_weight(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(_pipeline([MIX[0], {"stage": "code", "weight": -0.5}]))
    assert cli(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages.train.data: data[1].weight: -0.5; a weight must be a finite number > 0" in err and "Traceback" not in err


# --- the plan: hashes -------------------------------------------------------------------------

def _plan(text: str, tmp_path) -> dict:
    storage = open_storage(f"file://{tmp_path}/store")
    return {p.name: p for p in make_plan(parse_spec(text), storage)}


def _local_pipeline(data, tmp_path) -> str:
    if not (tmp_path / "c.jsonl").exists():  # its mtime is part of the hash
        (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    source = {"paths": [str(tmp_path / "c.jsonl")]}
    raw = yaml.safe_load(_pipeline(data))
    for name in ("tok", "web", "code"):
        raw["stages"][name]["source"] = source
    return yaml.safe_dump(raw)


def test_a_plain_data_stage_hashes_as_before_and_a_mixture_hashes_its_sources_and_weights(tmp_path):
    planned = _plan(_local_pipeline("web", tmp_path), tmp_path)
    plain = planned["train"]
    # The plain form: `data` is a reference only, hashed through the upstream stage (as before mixtures).
    assert "data" not in plain.inputs["fields"] and plain.inputs["upstream"] == {"data": planned["web"].hash}
    assert plain.upstream_uris == {"data": planned["web"].uri}
    mixed = _plan(_local_pipeline(MIX, tmp_path), tmp_path)
    train = mixed["train"]
    assert train.inputs["upstream"] == {"data[0]": mixed["web"].hash, "data[1]": mixed["code"].hash}
    assert train.upstream_uris == {"data[0]": mixed["web"].uri, "data[1]": mixed["code"].uri}
    reweighted = _plan(_local_pipeline([MIX[0], {**MIX[1], "weight": 0.4}], tmp_path), tmp_path)["train"]
    assert reweighted.hash != train.hash
    assert reweighted.hash == _plan(_local_pipeline([MIX[0], {**MIX[1], "weight": 0.4}], tmp_path), tmp_path)["train"].hash


# --- the record and the report -----------------------------------------------------------------

def test_the_report_tables_tokens_share_and_perplexity_per_source():
    results = TrainResults(final_loss=1.0, tokens_per_s=1.0, last_checkpoint=None,
                           tokens_per_source={"web": 7000, "code": 3000}, val_perplexity={"web": 12.345})
    assert mixture_table(results) == [["source", "tokens", "share", "validation perplexity"],
                                      ["web", "7,000", "70.0%", "12.35"], ["code", "3,000", "30.0%", "-"]]
