"""Evaluation job core (jobs/evaluate.py): task files, log-likelihood, multiple choice, exact
match and perplexity, each checked against a direct computation with the model.

A tiny Llama (hidden 32, 2 layers) and a byte-level BPE trained on synthetic sentences stand in
for an export; a second copy trained a few dozen steps on repetitive text has something to get
right. No Ray, no network.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from jobs.evaluate import (TaskFileError, TaskSpec, evaluate_model, load_task, log_likelihood, perplexity,
                           score_exact_match, score_multiple_choice)
from jobs.tokenizer import train_tokenizer

ANIMALS = ["cat", "dog", "bird", "fox", "cow", "owl"]
VERBS = ["sat", "ran", "slept", "stood", "hid"]
PLACES = ["mat", "rug", "log", "bed", "park", "hill", "barn", "road"]
# What the trained model learns by heart; exact_match prompts are the beginnings of these lines.
MEMORIZED = ["the cat sat on the mat.", "the dog ran to the park.", "the owl slept in the barn."]
SEQ_LEN = 32


def _write_model(model, tokenizer, out_dir: str) -> str:
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = str(tmp_path_factory.mktemp("untrained"))
    sentences = [f"the {a} {v} on the {p}." for a in ANIMALS for v in VERBS for p in PLACES]
    train_tokenizer(sentences + MEMORIZED, vocab_size=320, min_frequency=2, out_dir=out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return _write_model(LlamaForCausalLM(config), tokenizer, out_dir)


def _memorized_sequences(tokenizer, num_sequences: int) -> np.ndarray:
    """Windows of SEQ_LEN tokens over the memorized lines repeated, each starting at a line."""
    line_ids = [tokenizer(line + "\n", add_special_tokens=False)["input_ids"] for line in MEMORIZED]
    stream = [i for _ in range(num_sequences + SEQ_LEN) for ids in line_ids for i in ids]
    starts = np.cumsum([0] + [len(ids) for ids in line_ids] * num_sequences)[:num_sequences]
    return np.array([stream[s:s + SEQ_LEN] for s in starts], dtype=np.int64)


@pytest.fixture(scope="module")
def trained_dir(untrained_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(untrained_dir)
    model = AutoModelForCausalLM.from_pretrained(untrained_dir, dtype=torch.float32)
    data = torch.as_tensor(_memorized_sequences(tokenizer, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        batch = data[torch.randint(len(data), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return _write_model(model.eval(), tokenizer, str(tmp_path_factory.mktemp("trained")))


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def untrained(untrained_dir):
    return _load(untrained_dir)


@pytest.fixture(scope="module")
def trained(trained_dir):
    return _load(trained_dir)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _direct_log_likelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """One unpadded forward pass; the continuation's tokens' log-probs summed."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(context_ids)
    return sum(log_probs[start - 1 + k, token].item() for k, token in enumerate(continuation_ids))


def _write_rows(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# --- log-likelihood -------------------------------------------------------------------------

PAIRS = [
    ("the cat sat on the", " mat."),
    ("the", " dog ran to the park. the owl slept in the barn."),
    ("the owl slept in the barn. the fox hid on the hill. the cow stood on the", " road."),
    ("a", " b"),
]


def test_log_likelihood_equals_a_direct_computation_batched_or_not(untrained):
    model, tokenizer = untrained
    expected = []
    for context, continuation in PAIRS:
        context_ids, continuation_ids = _ids(tokenizer, context), _ids(tokenizer, continuation)
        # The pairs split at a word boundary, so the split encoding is the concatenation.
        assert _ids(tokenizer, context + continuation) == context_ids + continuation_ids
        expected.append(_direct_log_likelihood(model, context_ids, continuation_ids))
    lengths = {len(_ids(tokenizer, c + x)) for c, x in PAIRS}
    assert len(lengths) == len(PAIRS)  # different lengths, so a batch holds padding
    for batch_size in (1, 3, 16):
        assert log_likelihood(model, tokenizer, PAIRS, batch_size=batch_size) == pytest.approx(expected, abs=1e-5)
    assert all(score < 0 for score in expected)


def test_a_trailing_space_of_the_context_moves_to_the_continuation(untrained):
    model, tokenizer = untrained
    requests = [("the cat sat on the ", "mat."), ("the cat sat on the", " mat.")]
    moved, written = log_likelihood(model, tokenizer, requests)
    assert moved == pytest.approx(written, abs=1e-6)


def test_an_empty_context_is_the_eos_token(untrained):
    model, tokenizer = untrained
    [score] = log_likelihood(model, tokenizer, [("", "the cat sat")])
    expected = _direct_log_likelihood(model, [tokenizer.eos_token_id], _ids(tokenizer, "the cat sat"))
    assert score == pytest.approx(expected, abs=1e-5)


def test_a_long_input_loses_tokens_from_the_left(untrained):
    model, tokenizer = untrained
    context = " ".join(f"the {a} {v} on the {p}." for a in ANIMALS for v in VERBS for p in PLACES[:2])
    context_ids, continuation_ids = _ids(tokenizer, context), _ids(tokenizer, " the end.")
    assert len(context_ids) > 128
    kept = (context_ids + continuation_ids)[-129:]  # 128 inputs predict the last 128 tokens
    expected = _direct_log_likelihood(model, kept[:-len(continuation_ids)], continuation_ids)
    scores = log_likelihood(model, tokenizer, [(context, " the end."), ("a", " b")])
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_a_continuation_longer_than_the_model_is_refused(untrained):
    model, tokenizer = untrained
    with pytest.raises(ValueError, match="max_position_embeddings = 128"):
        log_likelihood(model, tokenizer, [("a", " x" * 200)])


# --- multiple choice ------------------------------------------------------------------------

LONG = " the dog ran to the park and the owl slept in the barn"


def test_multiple_choice_acc_and_acc_norm_equal_direct_scores(untrained):
    model, tokenizer = untrained
    rows = [
        # " x" is two rare one-byte tokens: fewer tokens than LONG but a lower score per byte.
        {"context": "the cat sat on the", "choices": [" x", LONG], "answer": 1},
        {"context": "the fox sat on the", "choices": [LONG, " x"], "answer": 0},
        {"context": "the fox hid on the", "choices": [" hill.", " rug.", " cow"], "answer": 2},
        {"context": "the owl", "choices": [" slept", LONG, " x"], "answer": 1},
    ]
    picks, picks_norm = [], []
    for row in rows:
        context_ids = _ids(tokenizer, row["context"])
        scores = [_direct_log_likelihood(model, context_ids, _ids(tokenizer, c)) for c in row["choices"]]
        picks.append(int(np.argmax(scores)))
        picks_norm.append(int(np.argmax([s / len(c.encode()) for s, c in zip(scores, row["choices"])])))
    acc = np.mean([p == r["answer"] for p, r in zip(picks, rows)])
    acc_norm = np.mean([p == r["answer"] for p, r in zip(picks_norm, rows)])
    assert acc != acc_norm, (picks, picks_norm)  # the case tells the two metrics apart
    result = score_multiple_choice(model, tokenizer, rows, batch_size=3)
    assert result == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "num_examples": len(rows)}


# --- exact match ----------------------------------------------------------------------------


def _direct_completion(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([_ids(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in out:
        out = out[:out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip()


def test_exact_match_equals_direct_greedy_generation(trained):
    model, tokenizer = trained
    rows = [
        {"prompt": "the cat sat on the", "answer": "mat."},
        {"prompt": "the dog ran to", "answer": " the park. "},
        {"prompt": "the owl slept in the", "answer": "moon."},
        {"prompt": "the", "answer": "cat sat on the mat."},
    ]
    completions = [_direct_completion(model, tokenizer, row["prompt"], 8) for row in rows]
    correct = [c == row["answer"].strip() for c, row in zip(completions, rows)]
    assert any(correct) and not all(correct), completions
    for batch_size in (1, 3):
        result = score_exact_match(model, tokenizer, rows, max_new_tokens=8, batch_size=batch_size)
        assert result == {"exact_match": pytest.approx(np.mean(correct)), "num_examples": 4}


# --- perplexity -----------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_mean_cross_entropy(untrained):
    model, tokenizer = untrained
    sequences = np.random.default_rng(0).integers(0, len(tokenizer), size=(7, 20))
    ids = torch.as_tensor(sequences)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    result = perplexity(model, sequences, batch_size=3)
    assert result == {"loss": pytest.approx(loss, rel=1e-5), "perplexity": pytest.approx(math.exp(loss), rel=1e-5),
                      "num_tokens": 7 * 19}


def test_training_lowers_perplexity_from_about_the_vocabulary_size(untrained, trained):
    sequences = _memorized_sequences(trained[1], 6)
    before = perplexity(untrained[0], sequences)["perplexity"]
    after = perplexity(trained[0], sequences)["perplexity"]
    vocab_size = len(trained[1])
    assert vocab_size / 2 < before < vocab_size * 2  # a uniform model's perplexity is the vocabulary size
    assert after < before / 10


def test_perplexity_refuses_sequences_longer_than_the_model(untrained):
    with pytest.raises(ValueError, match="seq_len 129 exceeds"):
        perplexity(untrained[0], np.zeros((1, 129), dtype=np.int64))


# --- evaluate_model -------------------------------------------------------------------------


def test_evaluate_model_reports_json_results_equal_to_the_scorers(trained_dir, trained, tmp_path):
    model, tokenizer = trained
    mc_rows = [{"context": "the cat sat on the", "choices": [" mat.", " owl."], "answer": 0, "id": "q1"},
               {"context": "the dog ran to the", "choices": [" barn.", " park."], "answer": 1}]
    em_rows = [{"prompt": "the cat sat on the", "answer": "mat."}, {"prompt": "the owl", "answer": "moon"}]
    tasks = [TaskSpec(name="mc", path=_write_rows(tmp_path / "mc.jsonl", mc_rows), type="multiple_choice"),
             TaskSpec(name="em-1", path=_write_rows(tmp_path / "em.jsonl", em_rows), type="exact_match",
                      limit=1, max_new_tokens=6)]
    sequences = _memorized_sequences(tokenizer, 5)
    results = evaluate_model(trained_dir, tasks, val_sequences=sequences, batch_size=2, device="cpu")
    assert json.loads(json.dumps(results)) == results
    assert results == {
        "perplexity": pytest.approx(perplexity(model, sequences)),
        "tasks": {"mc": pytest.approx(score_multiple_choice(model, tokenizer, mc_rows)),
                  "em-1": score_exact_match(model, tokenizer, em_rows[:1], max_new_tokens=6)},
    }
    assert results["tasks"]["mc"]["acc"] == 1.0 and results["tasks"]["em-1"] == {"exact_match": 1.0, "num_examples": 1}
    assert evaluate_model(trained_dir, tasks, val_sequences=sequences, batch_size=2, device="cpu") == results
    assert "perplexity" not in evaluate_model(trained_dir, tasks[:1], device="cpu")


def test_evaluate_model_refuses_duplicate_task_names(trained_dir, tmp_path):
    path = _write_rows(tmp_path / "em.jsonl", [{"prompt": "a", "answer": "b"}])
    tasks = [TaskSpec(name="x", path=path, type="exact_match")] * 2
    with pytest.raises(ValueError, match="x appear more than once"):
        evaluate_model(trained_dir, tasks, device="cpu")


# --- task files -----------------------------------------------------------------------------

GOOD_MC = {"context": "q", "choices": ["a", "b", "c"], "answer": 2}


def test_every_bad_row_is_reported_in_one_error_with_its_line(tmp_path):
    path = _write_rows(tmp_path / "task.jsonl", [
        GOOD_MC,
        '{"context": "q", "choices": ["a", "b"], "answer": 0',  # not closed
        {"context": "q", "answer": 0},
        {**GOOD_MC, "answer": 3},
        GOOD_MC,
    ])
    with pytest.raises(TaskFileError) as error:
        load_task(TaskSpec(name="mc", path=path, type="multiple_choice"))
    message = str(error.value)
    assert "3 bad line(s)" in message
    assert f"{path}:2: not valid JSON" in message
    assert f'{path}:3: missing field "choices"' in message
    assert f"{path}:4: " in message and "the valid range is 0..2" in message
    assert f"{path}:1:" not in message and f"{path}:5:" not in message


@pytest.mark.parametrize("row, problem", [
    (["an", "array"], "expected a JSON object, got an array"),
    ({**GOOD_MC, "answer": "2"}, 'field "answer" must be an integer, got a string'),
    ({**GOOD_MC, "answer": True}, 'field "answer" must be an integer, got a boolean'),
    ({**GOOD_MC, "answer": -1}, "-1 is out of range"),
    ({**GOOD_MC, "choices": "abc"}, 'field "choices" must be an array, got a string'),
    ({**GOOD_MC, "choices": ["a"], "answer": 0}, '"choices" has 1 entry; give at least 2'),
    ({**GOOD_MC, "choices": ["a", "", 3]}, '"choices"[1] must be a non-empty string, got ""'),
    ({"choices": ["a", "b"], "answer": 0, "context": None}, 'field "context" must be a string, got null'),
])
def test_each_kind_of_bad_multiple_choice_row_is_named(tmp_path, row, problem):
    path = _write_rows(tmp_path / "task.jsonl", [row])
    with pytest.raises(TaskFileError, match="task.jsonl:1: .*" + problem.replace("[", r"\[")):
        load_task(TaskSpec(name="mc", path=path, type="multiple_choice"))


def test_an_exact_match_row_needs_a_prompt_and_a_string_answer(tmp_path):
    path = _write_rows(tmp_path / "task.jsonl", [{"answer": 3}])
    problems = ':1: missing field "prompt"; field "answer" must be a string, got an integer'
    with pytest.raises(TaskFileError, match=problems):
        load_task(TaskSpec(name="em", path=path, type="exact_match"))


def test_past_ten_problems_the_rest_are_counted(tmp_path):
    path = _write_rows(tmp_path / "task.jsonl", ["not json"] * 13)
    with pytest.raises(TaskFileError) as error:
        load_task(TaskSpec(name="em", path=path, type="exact_match"))
    assert str(error.value).count("not valid JSON") == 10 and "... and 3 more" in str(error.value)


def test_a_missing_or_empty_file_is_a_clear_error(tmp_path):
    with pytest.raises(TaskFileError, match=f"task 'em': {tmp_path}/nope.jsonl does not exist"):
        load_task(TaskSpec(name="em", path=str(tmp_path / "nope.jsonl"), type="exact_match"))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(TaskFileError, match="blank.jsonl has no rows"):
        load_task(TaskSpec(name="em", path=str(tmp_path / "blank.jsonl"), type="exact_match"))


def test_invalid_utf8_is_reported(tmp_path):
    (tmp_path / "task.jsonl").write_bytes(b'{"prompt": "\xff", "answer": "a"}\n')
    with pytest.raises(TaskFileError, match="task.jsonl:1: not UTF-8"):
        load_task(TaskSpec(name="em", path=str(tmp_path / "task.jsonl"), type="exact_match"))


def test_good_rows_keep_their_extra_keys_and_limit_takes_the_first(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": "a", "source": "x"} for i in range(5)]
    path = _write_rows(tmp_path / "task.jsonl", rows)
    assert load_task(TaskSpec(name="em", path=path, type="exact_match")) == rows
    assert load_task(TaskSpec(name="em", path=path, type="exact_match", limit=2)) == rows[:2]


@pytest.mark.parametrize("fields", [
    {"name": "bad name", "type": "exact_match"},
    {"name": "t", "type": "ranking"},
    {"name": "t", "type": "exact_match", "limit": 0},
    {"name": "t", "type": "exact_match", "shots": 5},
    {"name": "t", "type": "multiple_choice", "max_new_tokens": 4},
])
def test_task_spec_refuses_bad_fields(fields):
    with pytest.raises(ValidationError):
        TaskSpec(path="t.jsonl", **fields)


def test_the_module_loads_without_torch_for_validation():
    code = "import sys, jobs.evaluate; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- follow mode: which failures are skips ---------------------------------------------------

def _follow_context(tmp_path, steps: list[int]):
    """A follow-mode evaluate stage's context on real file:// storage, the followed stage already
    ended with `steps` committed."""
    from jobs.checkpoint import COMMIT, step_key
    from jobs.commit import bytes_entry, write_commit
    from jobs.storage import open_storage
    from orchestrator.console import Console
    from orchestrator.spec import EvaluateStage
    from orchestrator.stages import StageContext

    trained = open_storage(f"file://{tmp_path}/stages/pretrain-00000000")
    for step in steps:
        step_dir = trained.sub("ckpt").sub(step_key(step))
        step_dir.write_bytes("model.bin", b"weights")
        assert write_commit(step_dir, COMMIT, {"model.bin": bytes_entry(b"weights")}, {"step": step})
    spec = EvaluateStage(kind="evaluate", follow="pretrain", data="corpus")
    out = open_storage(f"file://{tmp_path}/stages/eval-00000000")
    lines: list[str] = []
    console = Console()
    console.line = lines.append
    ctx = StageContext("eval", "0" * 64, spec, out, {"follow": trained.uri}, console)
    return ctx, trained.sub("ckpt"), lines


def test_follow_skips_a_checkpoint_that_retention_deleted(tmp_path):
    from jobs.checkpoint import COMMIT, step_key
    from orchestrator.stages.evaluate import _follow

    ctx, ckpt, lines = _follow_context(tmp_path, [10, 20])
    evaluated = []

    def evaluate(ref, stage_uri):
        if ref.step == 10:  # retention deletes step 10 while it is being evaluated
            ckpt.sub(step_key(10)).delete(COMMIT)
            raise FileNotFoundError("ckpt/step-00000010/model.bin")
        evaluated.append(ref.step)

    _follow(ctx, evaluate)
    assert evaluated == [20]
    assert any(line.startswith("skipped pretrain@10: retention deleted it") for line in lines)


def test_follow_fails_the_stage_when_a_kept_checkpoint_fails_to_evaluate(tmp_path):
    from orchestrator.stages.evaluate import _follow

    ctx, _, lines = _follow_context(tmp_path, [10, 20])

    def evaluate(ref, stage_uri):
        # What Ray re-raises for a bug in the remote evaluation: the original class, a ValueError.
        raise ValueError(f"{ref.stage}@{ref.step}: logits are NaN")

    with pytest.raises(ValueError, match="logits are NaN"):
        _follow(ctx, evaluate)
    assert not any(line.startswith("skipped") for line in lines)
