"""Tokenizer job: train a byte-level BPE on a corpus sample, or adopt an existing local tokenizer.

Either way the output directory is a Hugging Face tokenizer (`tokenizer.json` plus
`tokenizer_config.json`) that `AutoTokenizer.from_pretrained(dir)` loads, and `info.json` with
the ids that packing needs (end-of-text) so workers never guess them.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jobs.commit import file_entry
from jobs.sources import BadRecord, ShardReader, SourceError, list_source_files, plan_shards
from jobs.storage import Storage
from jobs.text import normalize

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|pad|>"
INFO_FILE = "info.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: str) -> dict:
    """Byte-level BPE: every byte is in the alphabet, so no text is ever out of vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT, PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _save_tokenizer(tokenizer, END_OF_TEXT, PADDING, out_dir)


def _save_tokenizer(tokenizer: Tokenizer, eos: str, pad: str | None, out_dir: str) -> dict:
    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, pad_token=pad).save_pretrained(out_dir)
    return _write_info(tokenizer, eos, pad, out_dir)


def _write_info(tokenizer: Tokenizer, eos: str, pad: str | None, out_dir: str) -> dict:
    info = {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eos_token": eos,
        "eos_id": tokenizer.token_to_id(eos),
        "pad_token": pad,
        "pad_id": tokenizer.token_to_id(pad) if pad else None,
    }
    with open(os.path.join(out_dir, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return info


def adopt_tokenizer(src_dir: str, out_dir: str) -> dict:
    """Copy an existing Hugging Face tokenizer directory; it must define an end-of-text token."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(src_dir, "tokenizer.json")):
        raise ValueError(f"tokenizer path {src_dir!r} has no tokenizer.json; give a directory saved by save_pretrained")
    hf = AutoTokenizer.from_pretrained(src_dir)
    if hf.eos_token is None:
        raise ValueError(f"tokenizer at {src_dir!r} defines no eos_token; set one in its tokenizer_config.json")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if os.path.isfile(os.path.join(src_dir, name)) and name != INFO_FILE:
            shutil.copy2(os.path.join(src_dir, name), os.path.join(out_dir, name))
    # Copied as is (not re-saved) so that the user's configs, e.g. a chat template, survive.
    return _write_info(Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json")), hf.eos_token, hf.pad_token, out_dir)


def load_tokenizer(local_dir: str) -> tuple[Tokenizer, dict]:
    with open(os.path.join(local_dir, INFO_FILE)) as f:
        info = json.load(f)
    return Tokenizer.from_file(os.path.join(local_dir, "tokenizer.json")), info


@dataclass
class Skipped:
    """What a sample skipped: counts by reason (a bad record's, or "empty"), and the first bad record."""

    counts: Counter = field(default_factory=Counter)
    first_bad: str | None = None


def sample_corpus(source, normalization, sample_bytes: int, skipped: Skipped) -> Iterator[str]:
    """Normalized documents from the start of every shard, spread evenly over the corpus.

    An even spread matters: training on the first files alone would fit the merges to them.
    """
    shards = plan_shards(list_source_files(source), source.format, 64 << 20)
    budget = max(sample_bytes // len(shards), 1)
    for shard in shards:
        taken = 0
        for item in ShardReader(shard, source.text_field):
            if isinstance(item, BadRecord):
                skipped.counts[item.reason] += 1
                skipped.first_bad = skipped.first_bad or f"{shard.uri}: {item.reason}: {item.excerpt[:120]}"
                continue
            text = normalize(item[1], normalization)
            if not text:
                skipped.counts["empty"] += 1
                continue
            yield text
            taken += len(text)
            if taken >= budget:
                break


def _sample_texts(source, normalization, sample_bytes: int) -> Iterator[str]:
    """The sample, or a SourceError (before training) if it holds no usable text at all."""
    skipped = Skipped()
    texts = sample_corpus(source, normalization, sample_bytes, skipped)
    first = next(texts, None)
    if first is None:
        example = f"; the first: {skipped.first_bad}" if skipped.first_bad else ""
        raise SourceError(
            f"{', '.join(source.paths)}: no usable text to train the tokenizer on ({sum(skipped.counts.values())} "
            f"records skipped: {dict(skipped.counts)}{example}); check the source's format ({source.format}) and "
            f"text_field ({source.text_field!r}), and that the files hold text")
    return itertools.chain([first], texts)


def build_tokenizer(out: Storage, *, source=None, normalization=None, vocab_size=0, min_frequency=2,
                    sample_bytes=0, path: str | None = None) -> tuple[dict, dict]:
    """Train (from `source`) or adopt (from `path`) a tokenizer into `out`; returns (info, file entries)."""
    with tempfile.TemporaryDirectory(prefix="orchestrator-tokenizer-") as local_dir:
        if path is not None:
            info = adopt_tokenizer(path, local_dir)
        else:
            info = train_tokenizer(_sample_texts(source, normalization, sample_bytes), vocab_size, min_frequency,
                                   local_dir)
        out.upload_dir(local_dir, "")
        entries = {name: file_entry(os.path.join(local_dir, name)) for name in sorted(os.listdir(local_dir))}
    return info, entries
