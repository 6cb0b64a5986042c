"""Evaluation job core: perplexity on held-out token sequences and task scores, no Ray.

Scoring follows lm-evaluation-harness, so numbers are comparable with published ones:
- A (context, continuation) log-likelihood is the sum of the continuation tokens' log-probs.
  Trailing whitespace of the context moves to the start of the continuation, the pair is encoded
  whole and split at the context's token count (encoding the continuation on its own would give a
  SentencePiece tokenizer's dummy-prefix token), no special tokens are added, and an empty
  context becomes the eos token. Inputs longer than the model's `max_position_embeddings` lose
  tokens from the left.
- multiple_choice: each choice is appended to the context verbatim (no delimiter is inserted:
  end the context with a space, as in "Answer: "). `acc` picks the choice with the highest
  summed log-likelihood; `acc_norm` divides it by the choice's length in UTF-8 bytes (lm-eval
  divides by characters; bytes do not depend on how a script is written in code points). Ties go
  to the earlier choice.
- exact_match: greedy generation from the prompt, cut at eos or the first newline, stripped,
  compared with the stripped answer.

Task files are checked by `load_task` at validate time, before any compute, so this module
imports torch and transformers only inside the functions that run a model.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from jobs.fields import output

if TYPE_CHECKING:
    import numpy as np

MAX_PROBLEMS_SHOWN = 10

_ROW_FORMATS = {
    "multiple_choice": '{"context": string, "choices": [string, ...], "answer": integer index into choices}',
    "exact_match": '{"prompt": string, "answer": string}',
}
_ROW_FIELDS = {
    "multiple_choice": {"context": str, "choices": list, "answer": int},
    "exact_match": {"prompt": str, "answer": str},
}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


class TaskSpec(BaseModel):
    """One evaluation task: a JSON-lines file of rows and how to score them."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = output(pattern=r"^[A-Za-z0-9_-]+$")
    """Label of the task in the results (letters, digits, `_`, `-`)."""
    path: str = output(local="file")
    """Local JSON-lines file, one row per line (see `type` for the row format)."""
    type: Literal["multiple_choice", "exact_match"] = output()
    """multiple_choice rows: {"context", "choices" (>= 2 non-empty strings), "answer" (index)};
    exact_match rows: {"prompt", "answer"}. Other keys in a row are ignored."""
    limit: int | None = output(None, ge=1)
    """Evaluate only the first N rows; null for all."""
    max_new_tokens: int = output(16, ge=1)
    """Longest greedy generation per row (exact_match only)."""

    @model_validator(mode="after")
    def _max_new_tokens_only_for_generation(self):
        if "max_new_tokens" in self.model_fields_set and self.type != "exact_match":
            raise ValueError(f"max_new_tokens applies to exact_match tasks only; task {self.name!r} is "
                             f"{self.type}: remove max_new_tokens")
        return self


class TaskFileError(ValueError):
    """A task file is missing, empty or has malformed rows; the message lists every problem."""


def load_task(spec: TaskSpec) -> list[dict]:
    """Every row of the task file, checked, then cut to `spec.limit`. Blank lines are skipped."""
    if not os.path.isfile(spec.path):
        raise TaskFileError(f"task {spec.name!r}: {spec.path} does not exist or is not a file; "
                            "set the task's path to a local JSON-lines file")
    rows, problems = [], []
    with open(spec.path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{spec.path}:{number}: not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{spec.path}:{number}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            row_problems = _row_problems(row, spec.type)
            if row_problems:
                problems.append(f"{spec.path}:{number}: {'; '.join(row_problems)}")
            else:
                rows.append(row)
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise TaskFileError(f"task {spec.name!r}: {len(problems)} bad line(s) in {spec.path}; every line must be "
                            f"{_ROW_FORMATS[spec.type]}:\n  " + "\n  ".join(shown))
    if not rows:
        raise TaskFileError(f"task {spec.name!r}: {spec.path} has no rows; write one JSON object per line: "
                            f"{_ROW_FORMATS[spec.type]}")
    return rows[:spec.limit]


def _row_problems(row, task_type: str) -> list[str]:
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {_json_type(row)}"]
    problems = []
    for key, kind in _ROW_FIELDS[task_type].items():
        if key not in row:
            problems.append(f'missing field "{key}"')
        # bool is a subclass of int in Python, but `true` is no index.
        elif not isinstance(row[key], kind) or isinstance(row[key], bool):
            problems.append(f'field "{key}" must be {_JSON_TYPES[kind]}, got {_json_type(row[key])}')
    if problems or task_type != "multiple_choice":
        return problems
    choices, answer = row["choices"], row["answer"]
    if len(choices) < 2:
        return [f'"choices" has {len(choices)} entr{"y" if len(choices) == 1 else "ies"}; give at least 2']
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            problems.append(f'"choices"[{i}] must be a non-empty string, got {json.dumps(choice)}')
    if not 0 <= answer < len(choices):
        problems.append(f'"answer" {answer} is out of range: "choices" has {len(choices)} entries, '
                        f"so the valid range is 0..{len(choices) - 1}")
    return problems


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# --- scoring -------------------------------------------------------------------------------


def log_likelihood(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Sum of the continuation tokens' log-probs given the context, per (context, continuation)."""
    import torch

    max_len = model.config.max_position_embeddings
    encoded = []  # (model input cut to max_len, continuation ids = the last targets)
    for context, continuation in requests:
        context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation)
        if not 1 <= len(continuation_ids) <= max_len:
            raise ValueError(f"continuation {continuation!r} is {len(continuation_ids)} tokens; it must be 1 to "
                             f"max_position_embeddings = {max_len}")
        encoded.append(((context_ids + continuation_ids)[-(max_len + 1):-1], continuation_ids))
    device = next(model.parameters()).device
    # Longest first, as in lm-eval: similar lengths share a batch, and running out of memory shows
    # on the first batch rather than the last.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores = [0.0] * len(encoded)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            # Right padding leaves every real token's position, and (causal) what it attends to, as
            # without padding, so a batched score equals the unbatched one.
            ids, mask = _pad([encoded[i][0] for i in batch], _pad_id(tokenizer), left=False)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(batch):
                input_ids, targets = encoded[i]
                end = len(input_ids)
                log_probs = torch.log_softmax(logits[row, end - len(targets):end].float(), dim=-1)
                scores[i] = log_probs.gather(-1, torch.tensor(targets, device=device)[:, None]).sum().item()
    return scores


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    num_spaces = len(context) - len(context.rstrip())
    if num_spaces:
        context, continuation = context[:-num_spaces], context[-num_spaces:] + continuation
    if not context:
        return [_eos_id(tokenizer)], _encode(tokenizer, continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, _encode(tokenizer, context + continuation)[len(context_ids):]


def score_multiple_choice(model, tokenizer, rows: list[dict], batch_size: int = 16) -> dict:
    """`acc` and byte-length-normalized `acc_norm` over rows {"context", "choices", "answer"}."""
    _require_rows(rows)
    requests = [(row["context"], choice) for row in rows for choice in row["choices"]]
    scores = iter(log_likelihood(model, tokenizer, requests, batch_size))
    num_correct = num_correct_norm = 0
    for row in rows:
        choice_scores = [next(scores) for _ in row["choices"]]
        normalized = [s / len(c.encode("utf-8")) for s, c in zip(choice_scores, row["choices"])]
        num_correct += _argmax(choice_scores) == row["answer"]
        num_correct_norm += _argmax(normalized) == row["answer"]
    return {"acc": num_correct / len(rows), "acc_norm": num_correct_norm / len(rows), "num_examples": len(rows)}


def score_exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 16) -> dict:
    """Share of rows {"prompt", "answer"} whose greedy completion's first line is the answer."""
    import torch
    from transformers import GenerationConfig

    _require_rows(rows)
    max_prompt = model.config.max_position_embeddings - max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in max_position_embeddings "
                         f"= {model.config.max_position_embeddings}; lower max_new_tokens")
    eos_id, pad_id = _eos_id(tokenizer), _pad_id(tokenizer)
    # Explicit, so that sampling settings in the model's generation_config.json cannot apply.
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                                  pad_token_id=pad_id)
    device = next(model.parameters()).device
    num_correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            prompts = [(_encode(tokenizer, row["prompt"]) or [eos_id])[-max_prompt:] for row in batch]
            # Left padding: generation appends after the last column, which must be a real token.
            ids, mask = _pad(prompts, pad_id, left=True)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=generation)
            for row, new_ids in zip(batch, out[:, ids.shape[1]:].tolist()):
                if eos_id in new_ids:
                    new_ids = new_ids[:new_ids.index(eos_id)]
                text = tokenizer.decode(new_ids, skip_special_tokens=True).split("\n", 1)[0]
                num_correct += text.strip() == row["answer"].strip()
    return {"exact_match": num_correct / len(rows), "num_examples": len(rows)}


def perplexity(model, sequences: np.ndarray, batch_size: int = 8) -> dict:
    """Mean next-token negative log-likelihood over (num_sequences, seq_len) token ids, and its exp."""
    import torch

    if sequences.ndim != 2 or sequences.shape[1] < 2 or len(sequences) == 0:
        raise ValueError(f"sequences must be (num_sequences >= 1, seq_len >= 2) token ids, got shape {sequences.shape}")
    if sequences.shape[1] > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {sequences.shape[1]} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    device = next(model.parameters()).device
    total_loss, num_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            ids = torch.as_tensor(sequences[start:start + batch_size], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            total_loss += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                            reduction="sum").item()
            num_tokens += targets.numel()
    loss = total_loss / num_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "num_tokens": num_tokens}


def evaluate_model(model_dir: str, tasks: list[TaskSpec], val_sequences: np.ndarray | None = None,
                   batch_size: int = 8, device: str | None = None) -> dict:
    """Load a Hugging Face causal LM from a local directory and score it on every task.

    Returns {"perplexity": {...} (only with val_sequences), "tasks": {name: {metric: value}}}.
    Float32 on CPU, bfloat16 on CUDA; greedy and in a fixed order, so repeated runs agree.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique; {', '.join(duplicates)} appear more than once: rename them")
    task_rows = {task.name: load_task(task) for task in tasks}  # bad files fail before the model loads
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    results: dict = {}
    if val_sequences is not None:
        results["perplexity"] = perplexity(model, val_sequences, batch_size)
    results["tasks"] = {}
    for task in tasks:
        rows = task_rows[task.name]
        if task.type == "multiple_choice":
            results["tasks"][task.name] = score_multiple_choice(model, tokenizer, rows, batch_size)
        else:
            results["tasks"][task.name] = score_exact_match(model, tokenizer, rows, task.max_new_tokens, batch_size)
    return results


# --- helpers -------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} defines no eos_token; "
                         "set one in its tokenizer_config.json")
    return tokenizer.eos_token_id


def _pad_id(tokenizer) -> int:
    # Any id does for padding, since the attention mask hides it and no score reads it.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def _pad(sequences: list[list[int]], pad_id: int, left: bool):
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        columns = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, columns] = torch.tensor(s, dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the earlier index


def _require_rows(rows: list[dict]) -> None:
    if not rows:
        raise ValueError("rows is empty: there is nothing to score")
