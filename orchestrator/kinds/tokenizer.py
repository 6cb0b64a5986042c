"""The tokenizer kind: a byte-level BPE trained on a sample of a corpus, or a local one adopted."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from jobs.fields import output
from jobs.sources import SourceSpec
from jobs.text import NormalizeSpec
from orchestrator.kinds.base import StageKind, StageResults, StageSpec


class TokenizerStage(StageSpec):
    """Trains a byte-level BPE on a sample of `source`, or adopts the tokenizer at `path`."""

    kind: Literal["tokenizer"] = output()
    source: SourceSpec | None = output(None)
    """The corpus to train on (give this or `path`)."""
    path: str | None = output(None, local="dir")
    """A local Hugging Face tokenizer directory to adopt instead of training (give this or `source`)."""
    normalize: NormalizeSpec = output(NormalizeSpec())
    """Normalization of the training sample; keep it equal to the preprocess stage's."""
    vocab_size: int = output(8192, ge=258, le=1 << 20)
    """Vocabulary size including the 256 byte tokens and the special tokens."""
    min_frequency: int = output(2, ge=1)
    """Minimum count of a pair to be merged."""
    sample_mb: float = output(64.0, gt=0)
    """MB of text sampled evenly across the corpus to train on."""

    @model_validator(mode="after")
    def _source_or_path(self):
        if (self.source is None) == (self.path is None):
            raise ValueError("give exactly one of `source` (train a tokenizer) or `path` (adopt a local one)")
        return self


class TokenizerResults(StageResults):
    vocab_size: int
    """Tokens in the vocabulary, special tokens included."""
    eos_id: int
    """The end-of-sequence token's id (it separates documents in packed sequences)."""


KIND = StageKind("tokenizer", TokenizerStage, version=1, run="orchestrator.stages.tokenizer:run",
                 results=TokenizerResults, summarize=lambda r: f"vocab {r.vocab_size}")
