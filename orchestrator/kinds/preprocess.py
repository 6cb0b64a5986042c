"""The preprocess kind: a corpus cleaned, deduplicated, tokenized and packed on Ray workers."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from jobs.fields import output
from jobs.preprocess import PreprocessSpec
from jobs.sources import SourceSpec
from orchestrator.kinds.base import LocalPath, StageKind, StageSpec, stage_or_path


class PreprocessStage(PreprocessSpec, StageSpec):
    """Cleans, dedups, tokenizes and packs `source` into fixed-length sequences on Ray workers."""

    kind: Literal["preprocess"] = output()
    source: SourceSpec = output()
    """The corpus."""
    tokenizer: str | LocalPath = output()
    """A tokenizer stage's name, or {path: DIR} for a local Hugging Face tokenizer."""

    _tokenizer_or_path = field_validator("tokenizer", mode="before")(lambda cls, v: stage_or_path(v, "a tokenizer"))


def _summary(m: dict) -> str:
    if "num_tokens" not in m:
        return ""
    return (f"{m['num_documents']:,} docs, {m['num_tokens']:,} tokens, "
            f"{m['num_sequences']:,} seqs, {sum(m.get('drops', {}).values()):,} dropped")


KIND = StageKind("preprocess", PreprocessStage, version=1, run="orchestrator.stages.preprocess:run",
                 references={"tokenizer": ("tokenizer",)}, summarize=_summary)
