"""Document cleaning: normalization, quality filters and the exact-dedup key.

These functions run on Ray workers for every document, so they are plain, allocation-light and
deterministic: the same text always normalizes, filters and hashes the same way on any machine.
That determinism is what lets a retried shard reproduce its output byte for byte.

A document goes `normalize` -> `clean_lines` (C4's line rules, when the `c4` rule set is chosen)
-> `rejection_reason` (None: keep it). The published rule sets live in jobs/quality.py.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from jobs.fields import output
from jobs.quality import RULE_SETS, C4Spec, Document, FineWebSpec, GopherQualitySpec, GopherRepetitionSpec, c4_lines

# Matches only what changes: a single ordinary space is left alone (most of the text).
_SPACES = re.compile(r"[ \t\f\v\u00a0]{2,}|[\t\f\v\u00a0]")
_ODD_SPACE = ("\t", "\f", "\v", "\u00a0", "  ")
_BLANK_LINES = re.compile(r"\n{3,}")


class NormalizeSpec(BaseModel):
    """How raw text is normalized before filtering, dedup and tokenization."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    unicode: Literal["NFC", "NFKC", "none"] = output("NFC")
    """Unicode normal form applied to every document (`none` keeps the text as read)."""
    collapse_whitespace: bool = output(False)
    """Collapse runs of spaces/tabs to one space, CRLF to LF and 3+ newlines to a blank line. Off by
    default: it destroys the indentation of code and preformatted text."""
    strip: bool = output(True)
    """Strip leading and trailing whitespace."""


class FilterSpec(BaseModel):
    """Quality rules; a document failing any of them is dropped and counted under the rule's name."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    min_chars: int = output(1, ge=0)
    """Drop documents shorter than this many characters (after normalization)."""
    max_chars: int | None = output(None, ge=1)
    """Drop documents longer than this many characters; null for no limit."""
    min_words: int = output(0, ge=0)
    """Drop documents with fewer whitespace-separated words."""
    min_alpha_fraction: float = output(0.0, ge=0.0, le=1.0)
    """Drop documents whose share of alphabetic characters is below this (markup, tables, noise)."""
    max_duplicate_line_fraction: float = output(1.0, ge=0.0, le=1.0)
    """Drop documents where more than this share of non-empty lines repeat (boilerplate)."""
    rule_sets: tuple[Literal["gopher_quality", "gopher_repetition", "c4", "fineweb"], ...] = output(())
    """Published rule sets, applied in this order after the rules above, except `c4`, which goes
    first of all: its line rules remove lines, and every other rule (those above too) judges what is
    left. Drops are counted under each rule's name (e.g. `gopher_too_few_words`); each set's
    thresholds are in its own section below."""
    gopher_quality: GopherQualitySpec = output(GopherQualitySpec())
    """Thresholds of `gopher_quality` (used only when listed in `rule_sets`)."""
    gopher_repetition: GopherRepetitionSpec = output(GopherRepetitionSpec())
    """Thresholds of `gopher_repetition` (used only when listed in `rule_sets`)."""
    c4: C4Spec = output(C4Spec())
    """Rules of `c4` (used only when listed in `rule_sets`)."""
    fineweb: FineWebSpec = output(FineWebSpec())
    """Thresholds of `fineweb` (used only when listed in `rule_sets`)."""

    @field_validator("rule_sets")
    @classmethod
    def _each_once(cls, rule_sets: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({name for name in rule_sets if rule_sets.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once; list each rule set once")
        return rule_sets


def normalize(text: str, spec: NormalizeSpec) -> str:
    # Each step first checks whether it would change anything: this runs on every document,
    # twice, and most documents need none of it (bench/RESULTS.md: 10x less time than always).
    if spec.unicode != "none" and not text.isascii():
        text = unicodedata.normalize(spec.unicode, text)
    if spec.collapse_whitespace:
        if "\r\n" in text:
            text = text.replace("\r\n", "\n")
        if any(s in text for s in _ODD_SPACE):
            text = _SPACES.sub(" ", text)
        if "\n\n\n" in text:
            text = _BLANK_LINES.sub("\n\n", text)
    if spec.strip:
        text = text.strip()
    return text


def rejection_reason(text: str, spec: FilterSpec) -> str | None:
    """The name of the first rule `text` fails, or None when it passes them all.

    With the `c4` rule set, C4 goes first wherever it is listed: its document rules, then every
    other rule judges the text without the lines that its line rules remove. So the verdict on
    `clean_lines(text, spec)` is the verdict on `text`."""
    if not text:
        return "empty"
    if "c4" in spec.rule_sets:
        kept, failure = c4_lines(text, spec.c4)
        if failure:
            return failure
        text = "\n".join(kept)
    num_chars = len(text)
    if num_chars == 0:
        return "empty"
    if num_chars < spec.min_chars:
        return "too_short"
    if spec.max_chars is not None and num_chars > spec.max_chars:
        return "too_long"
    if spec.min_words and len(text.split()) < spec.min_words:
        return "too_few_words"
    if spec.min_alpha_fraction and sum(c.isalpha() for c in text) < spec.min_alpha_fraction * num_chars:
        return "low_alpha"
    if spec.max_duplicate_line_fraction < 1.0:
        lines = [line for line in text.split("\n") if line.strip()]
        if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > spec.max_duplicate_line_fraction:
            return "repeated_lines"
    if spec.rule_sets:
        doc = Document(text)  # the statistics that the rule sets share
        for name in spec.rule_sets:
            failure = None if name == "c4" else RULE_SETS[name](doc, getattr(spec, name))
            if failure:
                return failure
    return None


def clean_lines(text: str, spec: FilterSpec) -> str:
    """The text without the lines that C4's line rules remove, when the `c4` rule set is chosen;
    else the text itself. Call it after `normalize`: its result is what gets deduplicated and
    tokenized."""
    if "c4" not in spec.rule_sets:
        return text
    return "\n".join(c4_lines(text, spec.c4)[0])
