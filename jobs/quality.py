"""Published quality rule sets: Gopher quality and repetition, C4, FineWeb.

Each rule set is a frozen spec of its thresholds, with the published defaults, and a function
`(Document, spec) -> the failing rule's name | None`. The names are what the preprocess manifest
counts drops under. A `Document` computes each statistic (words, lines, paragraphs) the first time
a rule reads it, so a rule set pays only for what its rules need and rule sets share the work.

Sources: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
Gopher" (arXiv 2112.11446), section A.1.1 and table A1; Raffel et al. 2020, "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer" (C4, JMLR 21), section 2.2, and the
reference code `tensorflow_datasets/text/c4_utils.py`; Penedo et al. 2024, "The FineWeb Datasets"
(arXiv 2406.17557), section 3.5. Where a paper leaves a detail open (what a word or a line is),
this follows datatrove's GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter and
FineWebQualityFilter, which produced FineWeb, except where a comment says otherwise.

Words are defined in `Document`. Word counts, lengths, n-grams and stop words use the words;
FineWeb's newlines-per-token ratio uses words and punctuation tokens, as its code; Gopher's
alphabetic-word share uses space-separated words (see there).
"""

from __future__ import annotations

import re
from collections import Counter
from operator import mul
from typing import Annotated, Callable

from pydantic import BaseModel, ConfigDict, Field

from jobs.fields import output

_WORD = re.compile(r"\w+")
_PUNCTUATION = re.compile(r"[^\w\s]")
_NOT_LETTER = re.compile(r"[^\w\s]|[\d_]")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

# The same classes for ASCII text as byte tables: `bytes.translate` runs at memory speed, where the
# regular expressions above cost more than a rule set's whole work (most documents are ASCII).
_ASCII = bytes(range(128))
_ASCII_WORD = re.sub(rb"\W", b"", _ASCII)
_ASCII_SPACE = bytes(c for c in _ASCII if chr(c).isspace())  # what str.split splits at
_ASCII_PUNCTUATION = bytes(c for c in _ASCII if c not in _ASCII_WORD and c not in _ASCII_SPACE)
_ASCII_NOT_LETTER = bytes(c for c in _ASCII if not chr(c).isalpha() and c not in _ASCII_SPACE)
_PUNCTUATION_TO_SPACE = bytes.maketrans(_ASCII_PUNCTUATION, b" " * len(_ASCII_PUNCTUATION))
# Every byte to "x", spaces to " ": a space-separated chunk ends at each "x " and at a final "x".
_CHUNK_SHAPE = bytes.maketrans(_ASCII, bytes(32 if c in _ASCII_SPACE else 120 for c in _ASCII))

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _computed_once:
    """functools.cached_property without its lock (Python 3.11 takes one on every first use,
    which cost more than some statistics here): a Document is never shared between threads."""

    def __init__(self, compute):
        self.compute, self.__doc__ = compute, compute.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, doc, owner=None):
        value = doc.__dict__[self.name] = self.compute(doc)  # found there from now on
        return value


class Document:
    """One document's statistics, each computed on first use and then shared by every rule.

    A word is a run of word characters (letters, digits, '_'), so "don't" is two words and
    "well-known" two; a punctuation token is one character that is neither a word character nor
    a space. datatrove uses NLTK's English tokenizer, which is not a dependency here: it also
    splits "don't" (into "do", "n't") but keeps hyphenated words whole and "..." as one token."""

    def __init__(self, text: str):
        self.text = text
        self._ascii = text.encode() if text.isascii() else None

    @_computed_once
    def lines(self) -> list[str]:
        """Every line, blank ones included (FineWeb's rules count them)."""
        return self.text.split("\n")

    @_computed_once
    def content_lines(self) -> list[str]:
        """The lines that hold something besides whitespace."""
        return [line for line in self.lines if line and not line.isspace()]

    @_computed_once
    def paragraphs(self) -> list[str]:
        return _PARAGRAPH_BREAK.split(self.text.strip())

    @_computed_once
    def words(self) -> list[str]:
        if self._ascii is None:
            return _WORD.findall(self.text)
        return self._ascii.translate(_PUNCTUATION_TO_SPACE).decode().split()

    @_computed_once
    def word_counts(self) -> Counter:
        return Counter(self.words)

    @_computed_once
    def num_tokens(self) -> int:
        """Words and punctuation tokens."""
        if self._ascii is None:
            num_punctuation = len(_PUNCTUATION.findall(self.text))
        else:
            num_punctuation = len(self._ascii) - len(self._ascii.translate(None, _ASCII_PUNCTUATION))
        return len(self.words) + num_punctuation

    @_computed_once
    def space_separated(self) -> tuple[int, int]:
        """(space-separated chunks, those holding a letter): deleting every character but letters
        and spaces leaves exactly the chunks that held a letter."""
        if self._ascii is None:
            return len(self.text.split()), len(_NOT_LETTER.sub("", self.text).split())
        return _num_chunks(self._ascii.translate(_CHUNK_SHAPE)), \
            _num_chunks(self._ascii.translate(_CHUNK_SHAPE, _ASCII_NOT_LETTER))


def _num_chunks(shape: bytes) -> int:
    """Chunks in text shaped by _CHUNK_SHAPE, counted without splitting it."""
    return shape.count(b"x ") + shape.endswith(b"x")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters): each copy after the first counts."""
    if len(set(items)) == len(items):  # the common case, at C speed
        return 0, 0
    seen: set[str] = set()
    num_duplicates = num_chars = 0
    for item in items:
        if item in seen:
            num_duplicates += 1
            num_chars += len(item)
        else:
            seen.add(item)
    return num_duplicates, num_chars


def _ngrams(words: list[str], n: int):
    return zip(*(words[i:] for i in range(n)))


# --- Gopher quality -----------------------------------------------------------------------------

# Gopher, A.1.1: "at least two of the following English words: the, be, to, of, and, that, have, with".
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


class GopherQualitySpec(BaseModel):
    """Thresholds of the `gopher_quality` rule set (Gopher, Rae et al. 2021, section A.1.1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    min_words: int = output(50, ge=1)
    """Drop documents with fewer words (punctuation tokens not counted); Gopher: 50."""
    max_words: int = output(100_000, ge=1)
    """Drop documents with more words; Gopher: 100,000."""
    min_mean_word_length: float = output(3.0, ge=0.0)
    """Drop documents whose mean word length in characters is below this; Gopher: 3."""
    max_mean_word_length: float = output(10.0, ge=0.0)
    """Drop documents whose mean word length in characters is above this; Gopher: 10."""
    max_symbol_word_ratio: float = output(0.1, ge=0.0)
    """Drop documents with more '#' per word, or more ellipses ('...' or '…') per word, than this;
    Gopher: 0.1."""
    max_bullet_line_fraction: Fraction = output(0.9)
    """Drop documents where more than this share of non-blank lines starts with a bullet ('•' or
    '-'); Gopher: 0.9."""
    max_ellipsis_line_fraction: Fraction = output(0.3)
    """Drop documents where more than this share of non-blank lines ends with an ellipsis; Gopher: 0.3."""
    min_alphabetic_word_fraction: Fraction = output(0.8)
    """Drop documents where less than this share of space-separated words holds an alphabetic
    character; Gopher: 0.8."""
    min_stop_words: int = output(2, ge=0)
    """Drop documents with fewer occurrences of `stop_words` (case-sensitive, as datatrove); Gopher: 2."""
    stop_words: tuple[str, ...] = output(GOPHER_STOP_WORDS, min_length=1)
    """The words `min_stop_words` counts; Gopher's English list by default."""


def gopher_quality_failure(doc: Document, spec: GopherQualitySpec) -> str | None:
    words = doc.words
    num_words = len(words)
    if num_words < spec.min_words:
        return "gopher_too_few_words"
    if num_words > spec.max_words:
        return "gopher_too_many_words"
    mean_length = sum(map(len, words)) / num_words
    if mean_length < spec.min_mean_word_length:
        return "gopher_short_words"
    if mean_length > spec.max_mean_word_length:
        return "gopher_long_words"
    # Gopher's "symbol-to-word ratio": per word (datatrove divides by every token, punctuation included).
    text = doc.text
    if text.count("#") / num_words > spec.max_symbol_word_ratio:
        return "gopher_hash_ratio"
    if (text.count("...") + text.count("…")) / num_words > spec.max_symbol_word_ratio:
        return "gopher_ellipsis_ratio"
    # Blank lines are not counted (datatrove counts them): a blank line between bullets or
    # paragraphs would otherwise dilute the share. A document with words has a non-blank line.
    lines = doc.content_lines
    if sum(line.lstrip().startswith(("•", "-")) for line in lines) / len(lines) > spec.max_bullet_line_fraction:
        return "gopher_bullet_lines"
    if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > spec.max_ellipsis_line_fraction:
        return "gopher_ellipsis_lines"
    # Here a word is a space-separated chunk, punctuation attached, as the paper's wording reads:
    # datatrove counts each punctuation token as a word without a letter, which fails ordinary
    # prose with dialogue ('"Where?" he asked.' has 4 such tokens to 3 words).
    num_chunks, num_with_letter = doc.space_separated
    if num_with_letter / num_chunks < spec.min_alphabetic_word_fraction:
        return "gopher_non_alphabetic_words"
    if spec.min_stop_words and sum(map(frozenset(spec.stop_words).__contains__, words)) < spec.min_stop_words:
        return "gopher_few_stop_words"
    return None


# --- Gopher repetition --------------------------------------------------------------------------

NgramLength = Annotated[int, Field(ge=1)]


class GopherRepetitionSpec(BaseModel):
    """Thresholds of the `gopher_repetition` rule set (Gopher, Rae et al. 2021, table A1).

    Character fractions are over all characters of the document; an n-gram's characters are its
    words' characters (as datatrove)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_duplicate_line_fraction: Fraction = output(0.30)
    """Drop documents where more than this share of non-blank lines repeats an earlier line; Gopher: 0.30."""
    max_duplicate_paragraph_fraction: Fraction = output(0.30)
    """Drop documents where more than this share of paragraphs (split at blank lines) repeats an
    earlier paragraph; Gopher: 0.30."""
    max_duplicate_line_char_fraction: Fraction = output(0.20)
    """Drop documents where more than this share of characters lies in repeated lines; Gopher: 0.20."""
    max_duplicate_paragraph_char_fraction: Fraction = output(0.20)
    """Drop documents where more than this share of characters lies in repeated paragraphs; Gopher: 0.20."""
    max_top_ngram_char_fraction: dict[NgramLength, Fraction] = output({2: 0.20, 3: 0.18, 4: 0.16})
    """n -> drop documents where the most frequent repeated word n-gram covers more than this share
    of characters (count × its characters); Gopher: 0.20, 0.18, 0.16 for n = 2, 3, 4."""
    max_duplicate_ngram_char_fraction: dict[NgramLength, Fraction] = output(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    """n -> drop documents where more than this share of characters lies in word n-grams that repeat
    an earlier one (a word inside several counts once); Gopher: 0.15 down to 0.10 for n = 5 to 10."""


def _top_ngram(counts: Counter) -> tuple[int, int]:
    """(characters covered by the most frequent n-gram of `counts`, counting every occurrence, or 0
    when none occurs twice; its count). datatrove also counts an n-gram seen once, so that every
    document of a few words fails; Gopher's rule is about repetition."""
    count = max(counts.values(), default=0)
    if count < 2:
        return 0, count
    gram = next(gram for gram, n in counts.items() if n == count)  # the first seen of the most frequent
    return count * sum(map(len, gram)), count


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words that lie in an n-gram occurring earlier in the document, each word
    counted once however many such n-grams hold it (Gopher, A.1.1)."""
    if len(set(_ngrams(words, n))) == len(words) - n + 1:  # none repeats: the common case, at C speed
        return 0
    seen: set[tuple[str, ...]] = set()
    num_chars = counted_until = 0
    for start, gram in enumerate(_ngrams(words, n)):
        if gram in seen:
            num_chars += sum(map(len, words[max(start, counted_until):start + n]))
            counted_until = start + n
        else:
            seen.add(gram)
    return num_chars


def gopher_repetition_failure(doc: Document, spec: GopherRepetitionSpec) -> str | None:
    num_chars = len(doc.text)
    paragraphs = doc.paragraphs
    num_duplicates, duplicate_chars = _duplicates(paragraphs)
    if num_duplicates / len(paragraphs) > spec.max_duplicate_paragraph_fraction:
        return "gopher_duplicate_paragraphs"
    if duplicate_chars / num_chars > spec.max_duplicate_paragraph_char_fraction:
        return "gopher_duplicate_paragraph_chars"
    lines = doc.content_lines  # blank lines are not lines that repeat (datatrove splits at runs of '\n')
    if lines:
        num_duplicates, duplicate_chars = _duplicates(lines)
        if num_duplicates / len(lines) > spec.max_duplicate_line_fraction:
            return "gopher_duplicate_lines"
        if duplicate_chars / num_chars > spec.max_duplicate_line_char_fraction:
            return "gopher_duplicate_line_chars"
    words = doc.words
    # Each word of an n-gram occurring c times occurs c times or more, so the n-gram covers at most
    # n × min(the largest count × length of a word, c × the longest word) characters, where c is
    # at most the top count of a shorter n-gram. When that bound passes, counting is skipped.
    word_counts = doc.word_counts
    most_chars = max(map(mul, word_counts.values(), map(len, word_counts)), default=0)
    longest = max(map(len, word_counts), default=0)
    max_count, counted_n = max(word_counts.values(), default=0), 1
    for n, limit in sorted(spec.max_top_ngram_char_fraction.items()):
        if max_count < 2:  # no shorter n-gram repeats, so no n-gram does
            break
        if n * min(most_chars, max_count * longest) / num_chars <= limit:
            continue
        chars, max_count = _top_ngram(Counter(_ngrams(words, n)))
        counted_n = n
        if chars / num_chars > limit:
            return f"gopher_top_{n}gram"
    limits = sorted(spec.max_duplicate_ngram_char_fraction.items())
    for i, (n, limit) in enumerate(limits):
        if max_count < 2 and n >= counted_n:  # no n-gram repeats, nor does any longer one
            break
        fraction = _duplicate_ngram_chars(words, n) / num_chars
        if fraction > limit:
            return f"gopher_duplicate_{n}grams"
        # A word in a repeated (n+1)-gram is in a repeated n-gram too, so the fraction only shrinks
        # as n grows: once it is under every larger n's limit, those pass without counting.
        if all(fraction <= larger for _, larger in limits[i + 1:]):
            break
    return None


# --- C4 -----------------------------------------------------------------------------------------

# C4 (Raffel et al. 2020, 2.2) and tensorflow_datasets' c4_utils.py, which datatrove follows.
_C4_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")  # Wikipedia's markers


def _without_citations(line: str) -> str:
    """Until none is left: removing `[1]` from `[[1]]` leaves `[]`, which a second look removes, so
    cleaning a cleaned text changes nothing."""
    while True:
        cleaned = _C4_CITATION.sub("", line).strip()
        if cleaned == line:
            return cleaned
        line = cleaned
# "a terminal punctuation mark (i.e. a period, exclamation mark, question mark, or end quotation
# mark)": c4_utils and datatrove check '"' and "'"; the typographic closing quotes are added here.
_C4_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_C4_POLICY = re.compile("terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies")
# Sentence ends for C4's sentence count: terminal marks, closing quotes or brackets, then a space.
# c4_utils counts with NLTK's punkt, which also knows abbreviations ("Mr. Smith" is one sentence
# there, two here).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")


class C4Spec(BaseModel):
    """Rules of the `c4` rule set (C4, Raffel et al. 2020, section 2.2, and its reference code).

    The line rules remove lines from the document (`jobs.text.clean_lines`); the document rules drop
    the whole document. Both look at the lines that the line rules before them kept, in C4's order:
    long word, citations, terminal punctuation, words per line, lorem ipsum, javascript, curly
    bracket, policy."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_word_length: int = output(1000, ge=1)
    """Line rule: remove lines holding a word (space-separated) longer than this; C4's code: 1000."""
    remove_citations: bool = output(True)
    """Line edit: delete Wikipedia citation markers ('[1]', '[edit]', '[citation needed]'); C4's code: on."""
    require_terminal_punctuation: bool = output(True)
    """Line rule: remove lines that do not end in '.', '!', '?' or a closing quote, or that end in
    '...'; C4: on (FineWeb turned it off)."""
    min_words_per_line: int = output(3, ge=0)
    """Line rule: remove lines with fewer words; C4: 3."""
    drop_lorem_ipsum: bool = output(True)
    """Document rule: drop documents where a kept line contains 'lorem ipsum' (any case); C4: on."""
    remove_javascript_lines: bool = output(True)
    """Line rule: remove lines containing 'javascript' (any case); C4: on."""
    drop_curly_bracket: bool = output(True)
    """Document rule: drop documents where a kept line contains '{' (likely code); C4: on."""
    remove_policy_lines: bool = output(True)
    """Line rule: remove lines mentioning terms of use, a privacy or cookie policy, or cookies; C4's code: on."""
    min_sentences: int = output(5, ge=0)
    """Document rule: drop documents with fewer sentences in the kept lines (a sentence ends at '.',
    '!' or '?' before a space or the line's end; C4 split with NLTK's punkt); C4: 5."""


def c4_lines(text: str, spec: C4Spec) -> tuple[list[str], str | None]:
    """(the lines C4's line rules keep, stripped; the document rule that fails on them, or None).

    Applying it to its own kept lines keeps them all, so a document judged before or after
    `clean_lines` gets the same verdict."""
    # The fields as locals: this loop runs for every line of every document.
    max_word_length, min_words = spec.max_word_length, spec.min_words_per_line
    citations, terminal, lorem_ipsum = spec.remove_citations, spec.require_terminal_punctuation, spec.drop_lorem_ipsum
    javascript, curly_bracket, policy = spec.remove_javascript_lines, spec.drop_curly_bracket, spec.remove_policy_lines
    kept = []
    for line in text.split("\n"):
        line = line.strip()
        if len(line) > max_word_length and max(map(len, line.split())) > max_word_length:
            continue
        if citations and "[" in line:
            # Removed before the word count (as c4_utils; datatrove counts first), so that a
            # second pass over the kept lines counts the same words.
            line = _without_citations(line)
        if terminal and (not line.endswith(_C4_TERMINAL) or line.endswith("...")):
            continue
        if not line or len(line.split(maxsplit=min_words)) < min_words:
            continue
        lower = line.lower()
        if lorem_ipsum and "lorem ipsum" in lower:
            return kept, "c4_lorem_ipsum"
        if javascript and "javascript" in lower:
            continue
        if curly_bracket and "{" in line:
            return kept, "c4_curly_bracket"
        # Every policy phrase holds one of these three: `in` rules most lines out at C speed.
        if policy and ("cookie" in lower or "terms of use" in lower or "privacy policy" in lower) \
                and _C4_POLICY.search(lower):
            continue
        kept.append(line)
    num_sentences = 0
    for line in kept:
        num_sentences += len(_SENTENCE_BREAK.split(line))
        if num_sentences >= spec.min_sentences:
            return kept, None
    return kept, None if num_sentences >= spec.min_sentences else "c4_too_few_sentences"


# --- FineWeb ------------------------------------------------------------------------------------

# FineWeb (Penedo et al. 2024, 3.5) with datatrove's FineWebQualityFilter, which made it: its
# lines are split at '\n' and include blank lines, and its comparisons are inclusive as below.
_FINEWEB_TERMINAL = (".", "'", '"', "!", "?")


class FineWebSpec(BaseModel):
    """Thresholds of the `fineweb` rule set (FineWeb, Penedo et al. 2024, section 3.5).

    Lines are split at newlines and blank lines count, as in the code that produced FineWeb."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    min_line_punctuation_fraction: Fraction = output(0.12)
    """Drop documents where at most this share of lines ends in '.', '!', '?', '"' or "'"; FineWeb: 0.12."""
    max_short_line_fraction: Fraction = output(0.67)
    """Drop documents where at least this share of lines is short (`short_line_chars`); FineWeb: 0.67."""
    short_line_chars: int = output(30, ge=0)
    """A line of at most this many characters is short; FineWeb: 30."""
    max_duplicate_line_char_fraction: Fraction = output(0.1)
    """Drop documents where at least this share of characters (newlines not counted) lies in
    non-blank lines repeating an earlier line; FineWeb's paper: 0.1 (datatrove's default is 0.01)."""
    max_newlines_per_token: float = output(0.3, ge=0.0)
    """Drop list-like documents: more newlines per token than this; FineWeb's code: 0.3."""


def fineweb_failure(doc: Document, spec: FineWebSpec) -> str | None:
    lines = doc.lines
    num_lines = len(lines)
    if sum(line.endswith(_FINEWEB_TERMINAL) for line in lines) / num_lines <= spec.min_line_punctuation_fraction:
        return "fineweb_line_punctuation"
    if sum(len(line) <= spec.short_line_chars for line in lines) / num_lines >= spec.max_short_line_fraction:
        return "fineweb_short_lines"
    text = doc.text
    num_newlines = text.count("\n")
    num_chars = len(text) - num_newlines
    if num_chars and _duplicates(doc.content_lines)[1] / num_chars >= spec.max_duplicate_line_char_fraction:
        return "fineweb_duplicate_line_chars"
    num_tokens = doc.num_tokens
    if num_newlines and (not num_tokens or num_newlines / num_tokens > spec.max_newlines_per_token):
        return "fineweb_list_like"
    return None


RULE_SETS: dict[str, Callable[[Document, BaseModel], str | None]] = {
    "gopher_quality": gopher_quality_failure,
    "gopher_repetition": gopher_repetition_failure,
    "fineweb": fineweb_failure,
}
"""The rule sets judged on a Document; `c4` is judged on its kept lines (`c4_lines`)."""
