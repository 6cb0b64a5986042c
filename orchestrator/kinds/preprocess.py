"""The preprocess kind: a corpus cleaned, deduplicated, tokenized and packed on Ray workers."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from jobs.fields import output
from jobs.preprocess import PreprocessSpec
from jobs.sources import SourceSpec
from orchestrator.kinds.base import LocalPath, StageKind, StageResults, StageSpec, stage_or_path


class PreprocessStage(PreprocessSpec, StageSpec):
    """Cleans, dedups, tokenizes and packs `source` into fixed-length sequences on Ray workers."""

    kind: Literal["preprocess"] = output()
    source: SourceSpec = output()
    """The corpus."""
    tokenizer: str | LocalPath = output()
    """A tokenizer stage's name, or {path: DIR} for a local Hugging Face tokenizer."""

    _tokenizer_or_path = field_validator("tokenizer", mode="before")(lambda cls, v: stage_or_path(v, "a tokenizer"))


class PreprocessResults(StageResults):
    num_records: int
    """Records read from the source."""
    num_documents: int
    """Documents kept after cleaning, filtering and dedup."""
    num_tokens: int
    """Tokens of the kept documents."""
    num_sequences: int
    """Packed sequences written (train and validation)."""
    num_tokens_dropped: int
    """Tokens left over at the end of each shard, shorter than one sequence."""
    num_shards: int
    """Shards the source was split into (one Ray task each)."""
    drops: dict[str, int]
    """Documents dropped, by reason (a filter, a duplicate, a bad record)."""


def _summary(r: PreprocessResults) -> str:
    return (f"{r.num_documents:,} docs, {r.num_tokens:,} tokens, {r.num_sequences:,} seqs, "
            f"{sum(r.drops.values()):,} dropped")


KIND = StageKind("preprocess", PreprocessStage, version=2, run="orchestrator.stages.preprocess:run",
                 references={"tokenizer": ("tokenizer",)}, results=PreprocessResults, summarize=_summary)
