"""Supervised fine-tuning data: prompt/response JSON lines as fixed-length rows with masked labels.

Each example becomes one row of `seq_len` token ids, `prompt + response + <eos>`, padded on the
right; its labels are the ids themselves on the response and the end-of-text token, and -100
(ignored by the loss) on the prompt and the padding, so the model learns to answer, not to ask.
The driver tokenizes the (small) task file once and stores the rows in the stage's output, so
that workers on any node read the same arrays, like a preprocess stage's packed tokens.
"""

from __future__ import annotations

import json
import os

import numpy as np
from pydantic import BaseModel, ConfigDict

from jobs.fields import output
from jobs.storage import open_storage

IGNORE = -100  # the label value Hugging Face models leave out of the loss
MAX_SHOWN = 10


class SFTTaskSpec(BaseModel):
    """A prompt/response JSON-lines file to fine-tune on."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    path: str = output(local="file")
    """Local JSON-lines file, one {prompt, response} object per line."""
    prompt_field: str = output("prompt")
    """The key holding the prompt."""
    response_field: str = output("response")
    """The key holding the response the model learns to give."""
    seq_len: int = output(256, ge=8)
    """Tokens per row; longer examples are cut at the end (counted in `num_truncated`)."""


class TaskFileError(ValueError):
    """Malformed rows, each named by file and line."""


def load_sft_rows(spec: SFTTaskSpec) -> list[tuple[str, str]]:
    """(prompt, response) pairs; every malformed line is reported at once with its number."""
    try:
        with open(spec.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TaskFileError(f"{spec.path}: cannot read the task file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{spec.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            problems.append(f"{spec.path}:{number}: not a JSON object")
            continue
        fields = [row.get(k) if isinstance(row, dict) else None for k in (spec.prompt_field, spec.response_field)]
        bad = [k for k, v in zip((spec.prompt_field, spec.response_field), fields) if not isinstance(v, str) or not v]
        if bad:
            problems.append(f"{spec.path}:{number}: needs a non-empty string {' and '.join(repr(k) for k in bad)}")
            continue
        rows.append((fields[0], fields[1]))
    if not rows and not problems:
        problems.append(f"{spec.path}: no examples; give one JSON object per line")
    if problems:
        more = f"\n  and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise TaskFileError("\n  ".join(problems[:MAX_SHOWN]) + more)
    return rows


def encode_examples(rows: list[tuple[str, str]], tokenizer_dir: str, seq_len: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(input_ids, labels, counts): int32 arrays of shape (len(rows), seq_len)."""
    from jobs.tokenizer import load_tokenizer

    tokenizer, info = load_tokenizer(tokenizer_dir)
    eos = info["eos_id"]
    pad = info["pad_id"] if info.get("pad_id") is not None else eos
    prompts = tokenizer.encode_batch([p for p, _ in rows], add_special_tokens=False)
    responses = tokenizer.encode_batch([r for _, r in rows], add_special_tokens=False)
    inputs = np.full((len(rows), seq_len), pad, dtype=np.int32)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int32)
    truncated = 0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = prompt.ids + response.ids + [eos]
        truncated += len(ids) > seq_len
        ids = ids[:seq_len]
        inputs[i, :len(ids)] = ids
        labels[i, len(prompt.ids):len(ids)] = ids[len(prompt.ids):]
    counts = {"num_examples": len(rows), "num_truncated": truncated,
              "num_response_tokens": int((labels != IGNORE).sum()), "num_without_response": int((labels == IGNORE).all(1).sum())}
    return inputs, labels, counts


def write_examples(inputs: np.ndarray, labels: np.ndarray, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    inputs.tofile(os.path.join(out_dir, "input_ids.bin"))
    labels.tofile(os.path.join(out_dir, "labels.bin"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"num_sequences": len(inputs), "seq_len": inputs.shape[1], "dtype": "int32"}, f)


class SFTExamples:
    """The rows written by `write_examples`, fetched once into the node cache; the same `batch`
    interface as `jobs.data.PackedTokens`."""

    def __init__(self, uri: str, cache_dir: str):
        storage = open_storage(uri)
        # Keyed by the stage directory (content-addressed), as PackedTokens does.
        local = os.path.join(cache_dir, uri.rstrip("/").rsplit("/", 2)[-2], "sft")
        for name in ("meta.json", "input_ids.bin", "labels.bin"):
            if not os.path.exists(os.path.join(local, name)):
                storage.download_file(name, os.path.join(local, name))
        with open(os.path.join(local, "meta.json")) as f:
            meta = json.load(f)
        self.seq_len = meta["seq_len"]
        shape = (meta["num_sequences"], self.seq_len)
        self.inputs = np.memmap(os.path.join(local, "input_ids.bin"), dtype=np.int32, mode="r", shape=shape)
        self.labels = np.memmap(os.path.join(local, "labels.bin"), dtype=np.int32, mode="r", shape=shape)

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs[indices].astype(np.int64), self.labels[indices].astype(np.int64)
