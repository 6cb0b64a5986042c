"""The published quality rule sets (jobs/quality.py through jobs/text.py) and code-safe
normalization: each rule just passing and just failing at its published threshold, the rule
sets' drop names, C4's line edits, spec errors; and one preprocess run on real Ray whose manifest
counts each rule's drops as the functions do on the same documents."""

from __future__ import annotations

import json
import os
import random
import re
import string

import pytest
from pydantic import ValidationError

from corpus import generate_documents
from jobs.fields import output_fields
from jobs.quality import Document
from jobs.text import FilterSpec, NormalizeSpec, clean_lines, normalize, rejection_reason

_rng = random.Random(14)
_used: set[str] = set()


@pytest.fixture(autouse=True)
def _fresh_words():
    _used.clear()


def unique_word(length: int) -> str:
    """A lowercase word of `length` letters not returned before in this test: it repeats nothing."""
    while True:
        word = "".join(_rng.choices(string.ascii_lowercase, k=length))
        if word not in _used and word not in ("the", "be", "to", "of", "and", "that", "have", "with"):
            _used.add(word)
            return word


def reason(text: str, rule_set: str, **thresholds) -> str | None:
    return rejection_reason(text, FilterSpec(rule_sets=[rule_set], **({rule_set: thresholds} if thresholds else {})))


# --- normalization keeps code intact unless asked ------------------------------------------------

CODE = "def f(x):\n    if x:\n\t\treturn  1\n\n\n\n    return 0  # done"


def test_normalization_keeps_indentation_by_default():
    assert NormalizeSpec().collapse_whitespace is False
    assert normalize(CODE, NormalizeSpec()) == CODE
    assert normalize("  " + CODE + "\n", NormalizeSpec()) == CODE  # only the ends are stripped


def test_normalization_collapses_when_asked():
    assert normalize(CODE, NormalizeSpec(collapse_whitespace=True)) == \
        "def f(x):\n if x:\n return 1\n\n return 0 # done"


# --- Gopher quality (Rae et al. 2021, A.1.1) -------------------------------------------------------

def prose(num_words: int, length: int = 4, stop_words=("the", "and")) -> list[str]:
    return [*stop_words, *(unique_word(length) for _ in range(num_words - len(stop_words)))]


def test_gopher_quality_word_count():
    assert reason(" ".join(prose(50)), "gopher_quality") is None
    assert reason(" ".join(prose(49)), "gopher_quality") == "gopher_too_few_words"
    assert reason(" ".join(prose(100_000)), "gopher_quality") is None
    assert reason(" ".join(prose(100_001)), "gopher_quality") == "gopher_too_many_words"
    # punctuation is not a word
    assert reason(" ".join(prose(49)) + " . , ; !", "gopher_quality") == "gopher_too_few_words"


def test_gopher_quality_mean_word_length():
    words = ["the", "and", *(unique_word(3) for _ in range(48))]  # mean 3.0
    assert reason(" ".join(words), "gopher_quality") is None
    assert reason(" ".join(words[:-1] + [unique_word(2)]), "gopher_quality") == "gopher_short_words"
    # 500 characters in 50 words: mean 10.0
    words = ["the", "and", *(unique_word(10) for _ in range(46)), unique_word(17), unique_word(17)]
    assert sum(map(len, words)) == 500
    assert reason(" ".join(words), "gopher_quality") is None
    assert reason(" ".join(words[:-1] + [unique_word(18)]), "gopher_quality") == "gopher_long_words"


@pytest.mark.parametrize("symbol, name", [("#", "gopher_hash_ratio"), ("...", "gopher_ellipsis_ratio"),
                                          ("…", "gopher_ellipsis_ratio")])
def test_gopher_quality_symbol_to_word_ratio(symbol, name):
    words = prose(50)
    with_symbols = lambda k: " ".join(w + symbol if i < k else w for i, w in enumerate(words)) + " end"
    assert reason(with_symbols(5), "gopher_quality") is None  # 5 / 51 words
    assert reason(with_symbols(6), "gopher_quality") == name  # 6 / 51 > 0.1


def test_gopher_quality_bullet_and_ellipsis_lines():
    lines = [" ".join(prose(5)) for _ in range(10)]
    bullets = lambda k: "\n\n".join(("• " if i % 2 else "- ") + line if i < k else line for i, line in enumerate(lines))
    assert reason(bullets(9), "gopher_quality") is None  # 0.9, blank lines not counted
    assert reason(bullets(10), "gopher_quality") == "gopher_bullet_lines"
    trailing = lambda k: "\n".join(line + "..." if i < k else line + "." for i, line in enumerate(lines))
    assert reason(trailing(3), "gopher_quality") is None  # 0.3
    assert reason(trailing(4), "gopher_quality") == "gopher_ellipsis_lines"


def test_gopher_quality_alphabetic_words():
    # Punctuation attached to a word keeps it alphabetic: dialogue passes (datatrove would drop it).
    dialogue = " ".join(f'"{w}?" {unique_word(4)} asked.' for w in prose(25))
    assert reason(dialogue, "gopher_quality") is None
    words = prose(40)
    assert reason(" ".join(words + ["1234"] * 10), "gopher_quality") is None  # 40 / 50 = 0.8
    assert reason(" ".join(words + ["1234"] * 10 + ["--"]), "gopher_quality") == "gopher_non_alphabetic_words"


def test_gopher_quality_stop_words():
    assert reason(" ".join(prose(50, stop_words=("the", "with"))), "gopher_quality") is None
    assert reason(" ".join(prose(50, stop_words=("the",))), "gopher_quality") == "gopher_few_stop_words"
    assert reason(" ".join(prose(50, stop_words=("The", "With"))), "gopher_quality") == "gopher_few_stop_words"
    german = " ".join(prose(50, stop_words=("der", "und")))
    assert reason(german, "gopher_quality", stop_words=["der", "die", "und"]) is None


# --- Gopher repetition (table A1) ------------------------------------------------------------------

GOPHER_DEFAULTS = FilterSpec().gopher_repetition.model_dump()


def with_length(parts: list[str], num_chars: int, sep: str = " ") -> str:
    """`parts` joined by `sep`, padded with one more unique word to exactly `num_chars` characters."""
    text = sep.join(parts)
    pad = num_chars - len(text) - len(sep)
    assert pad >= 3, pad
    return text + sep + unique_word(pad)


def repeated_ngram(word_lengths: list[int], count: int, num_chars: int) -> str:
    """One line of exactly `num_chars` characters where an n-gram of words of these lengths occurs
    `count` times, apart; every other word unique."""
    gram = [unique_word(n) for n in word_lengths]
    parts = []
    for _ in range(count):
        parts += [unique_word(3), *gram]
    return with_length(parts, num_chars)


@pytest.mark.parametrize("n, word_lengths, count, limit", [
    (2, [2, 2], 5, 0.20),          # 5 × 4 characters = 20 of 100
    (3, [2, 2, 2], 3, 0.18),       # 3 × 6 = 18
    (4, [2, 2, 2, 2], 2, 0.16),    # 2 × 8 = 16
])
def test_gopher_top_ngram(n, word_lengths, count, limit):
    assert GOPHER_DEFAULTS["max_top_ngram_char_fraction"][n] == limit
    assert reason(repeated_ngram(word_lengths, count, 100), "gopher_repetition") is None
    assert reason(repeated_ngram(word_lengths, count, 99), "gopher_repetition") == f"gopher_top_{n}gram"


@pytest.mark.parametrize("n, limit", [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
def test_gopher_duplicate_ngrams(n, limit):
    assert GOPHER_DEFAULTS["max_duplicate_ngram_char_fraction"][n] == limit
    chars = round(limit * 200)  # the repeated occurrence's characters, of 200
    lengths = [chars // n + (i < chars % n) for i in range(n)]
    no_top = {"max_top_ngram_char_fraction": {}}  # the same repetition also fails the top n-gram rules
    assert reason(repeated_ngram(lengths, 2, 200), "gopher_repetition", **no_top) is None
    assert reason(repeated_ngram(lengths, 2, 199), "gopher_repetition", **no_top) == f"gopher_duplicate_{n}grams"


def test_gopher_duplicate_ngrams_count_each_word_once():
    gram = [unique_word(2) for _ in range(5)]
    # "a b c d e a b c d e a b c d e": the 5-grams repeating overlap; each word counts once (20 chars)
    text = with_length([*gram, *gram, *gram], 100)
    assert Document(text).words[:15] == gram * 3
    assert reason(text, "gopher_repetition", max_top_ngram_char_fraction={},
                  max_duplicate_ngram_char_fraction={5: 0.2}) is None
    assert reason(text, "gopher_repetition", max_top_ngram_char_fraction={},
                  max_duplicate_ngram_char_fraction={5: 0.19}) == "gopher_duplicate_5grams"


def lines_text(unique: int, repeats: int, repeated_chars: int, sep: str) -> str:
    lines = [" ".join(unique_word(6) for _ in range(4)) + "." for _ in range(unique)]
    repeated = with_length([unique_word(3)], repeated_chars) if repeated_chars else None
    return sep.join(lines + [repeated] * (repeats + 1) if repeated else lines)


@pytest.mark.parametrize("sep, unit", [("\n", "line"), ("\n\n", "paragraph")])
def test_gopher_duplicate_lines_and_paragraphs(sep, unit):
    lines_only = {"max_top_ngram_char_fraction": {}, "max_duplicate_ngram_char_fraction": {}}  # repeated lines repeat n-grams too
    # 10 lines (paragraphs) of which 3 repeat an earlier one: 0.3; short, so few characters repeat
    assert reason(lines_text(6, 3, 8, sep), "gopher_repetition", **lines_only) is None
    assert reason(lines_text(5, 4, 8, sep), "gopher_repetition", **lines_only) == f"gopher_duplicate_{unit}s"
    # the characters in repeats: 1 repeat of 20 characters in a text of exactly 100
    first, second = (" ".join(unique_word(5) for _ in range(4)) for _ in range(2))
    repeated = with_length([unique_word(4)], 20)
    text = sep.join([first, repeated, repeated, with_length([second], 100 - len(first) - 40 - 3 * len(sep))])
    assert len(text) == 100
    assert reason(text, "gopher_repetition", **lines_only) is None
    assert reason(text + "x", "gopher_repetition", **lines_only) is None  # 20 / 101
    assert reason(text[:-1], "gopher_repetition", **lines_only) == f"gopher_duplicate_{unit}_chars"  # 20 / 99


# --- C4 (Raffel et al. 2020, 2.2) -------------------------------------------------------------------

C4_PAGE = "\n".join([
    "This line is kept as it is.",
    "a line without terminal punctuation",
    "Too short.",
    "Please enable JavaScript to see this page.",
    "Read our Privacy Policy before you go on.",
    "A cited claim[1] stays here[citation needed].",
    "What about a question?",
    'She said "yes, of course."',
    "It trails off...",
    "   An indented sentence ends here.   ",
    "def f(x) {",
])
C4_KEPT = "\n".join([
    "This line is kept as it is.",
    "A cited claim stays here.",
    "What about a question?",
    'She said "yes, of course."',
    "An indented sentence ends here.",
])


def test_c4_line_rules_remove_lines():
    spec = FilterSpec(rule_sets=["c4"])
    assert clean_lines(C4_PAGE, spec) == C4_KEPT
    assert clean_lines(C4_PAGE, FilterSpec()) == C4_PAGE  # not chosen: untouched
    # '{' sat on a removed line: not a reason to drop the page; 5 sentences are left
    assert rejection_reason(C4_PAGE, spec) is None
    assert rejection_reason(C4_KEPT, spec) is None


def test_c4_document_rules():
    spec = FilterSpec(rule_sets=["c4"])
    five = "One two three. Four five six! Seven eight nine? Ten eleven twelve.\nThirteen fourteen fifteen."
    assert rejection_reason(five, spec) is None
    assert rejection_reason(five.rsplit("\n", 1)[0], spec) == "c4_too_few_sentences"
    assert rejection_reason(five + "\nLorem ipsum dolor sit amet.", spec) == "c4_lorem_ipsum"
    assert rejection_reason(five + "\nlorem ipsum dolor sit amet", spec) is None  # on a removed line
    assert rejection_reason(five + "\nThe set {1, 2} is small.", spec) == "c4_curly_bracket"
    assert rejection_reason(five + "\nThe set {1, 2} is small.", FilterSpec(rule_sets=["c4"], c4={
        "drop_curly_bracket": False})) is None
    long_word = "Short words and one " + "x" * 999 + "."  # a word of 1000 characters, the period in it
    assert clean_lines(five + "\n" + long_word, spec) == five + "\n" + long_word
    assert clean_lines(five + "\n" + long_word.replace(".", "x."), spec) == five


def test_c4_without_terminal_punctuation_as_fineweb_runs_it():
    spec = FilterSpec(rule_sets=["c4"], c4={"require_terminal_punctuation": False})
    assert clean_lines("a line without an end\nhi\nPlease enable javascript now", spec) == "a line without an end"


def test_c4_verdict_is_the_same_before_and_after_clean_lines():
    nested = " ".join(["A good sentence with words in it."] * 4) + "\nyes [[1]] no."  # [[1]] -> [] -> nothing
    documents = generate_documents(300, 3) + [C4_PAGE, "No.\nYes it is.\n\n[1][2]", "x [[1]2] y z.", nested]
    for rule_sets in (["c4"], ["gopher_quality", "c4", "fineweb"]):
        spec = FilterSpec(rule_sets=rule_sets)
        for text in documents:
            assert rejection_reason(clean_lines(text, spec), spec) == rejection_reason(text, spec), text
            assert clean_lines(clean_lines(text, spec), spec) == clean_lines(text, spec), text


# --- FineWeb (Penedo et al. 2024, 3.5) --------------------------------------------------------------

def sentence(num_chars: int, end: str = ".") -> str:
    """A line of exactly `num_chars` characters, unique words, ending in `end`."""
    words = []
    while sum(map(len, words)) + len(words) + len(end) + 8 <= num_chars:
        words.append(unique_word(5))
    return with_length(words, num_chars - len(end)) + end


def test_fineweb_line_punctuation():
    lines = lambda k: "\n".join(sentence(40, "." if i < k else ",") for i in range(100))
    assert reason(lines(13), "fineweb") is None
    assert reason(lines(12), "fineweb") == "fineweb_line_punctuation"  # 0.12: at or below drops


def test_fineweb_short_lines():
    lines = lambda k: "\n".join(sentence(30 if i < k else 31) for i in range(100))  # 30 is short
    assert reason(lines(66), "fineweb") is None
    assert reason(lines(67), "fineweb") == "fineweb_short_lines"  # 0.67: at or above drops


def test_fineweb_duplicate_line_characters():
    repeated = sentence(40)
    unique = [sentence(80) for _ in range(4)]  # 40 + 4 × 80 + 40 = 400 characters but newlines
    text = "\n".join([repeated, *unique, repeated])
    assert reason(text, "fineweb") == "fineweb_duplicate_line_chars"  # 40 / 400: at or above drops
    assert reason(text + "x", "fineweb") is None  # 40 / 401


def test_fineweb_list_like():
    # 10 lines of 2 words and a period: 30 tokens to 9 newlines, 0.3
    lines = [f"{unique_word(15)} {unique_word(15)}." for _ in range(10)]
    assert reason("\n".join(lines), "fineweb") is None
    lines[0] = unique_word(31) + "."
    assert reason("\n".join(lines), "fineweb") == "fineweb_list_like"  # 9 / 29


# --- the rule sets together -------------------------------------------------------------------------

def test_rule_sets_apply_in_the_order_listed_c4_first():
    short = "Too few words here."
    assert reason(short, "gopher_quality") == "gopher_too_few_words"
    assert reason(short, "fineweb") == "fineweb_short_lines"
    assert rejection_reason(short, FilterSpec(rule_sets=["fineweb", "gopher_quality"])) == "fineweb_short_lines"
    assert rejection_reason(short, FilterSpec(rule_sets=["gopher_quality", "fineweb"])) == "gopher_too_few_words"
    assert rejection_reason(short, FilterSpec(rule_sets=["gopher_quality", "c4"])) == "c4_too_few_sentences"
    # the rules of FilterSpec itself come before the rule sets
    assert rejection_reason(short, FilterSpec(min_words=5, rule_sets=["gopher_quality"])) == "too_few_words"


def test_no_rule_set_is_todays_behavior():
    spec = FilterSpec()
    assert spec.rule_sets == ()
    for text in generate_documents(50, 5) + ["x", "1 2 3", C4_PAGE]:
        assert rejection_reason(text, spec) is None


def test_words_of_ascii_text_match_the_general_definition():
    """Document reads ASCII text through byte tables; other text through regular expressions.
    Both must say the same."""
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        doc = Document(text)
        assert doc.words == re.findall(r"\w+", text)
        assert doc.num_tokens == len(re.findall(r"\w+|[^\w\s]", text))
        assert doc.space_separated == (len(text.split()), sum(any(c.isalpha() for c in w) for w in text.split()))


def test_ngram_thresholds_hash_as_they_read_back_from_a_commit():
    fields = output_fields(FilterSpec(gopher_repetition={"max_top_ngram_char_fraction": {2: 0.25}}))
    assert fields["gopher_repetition"]["max_top_ngram_char_fraction"] == {"2": 0.25}
    assert json.loads(json.dumps(fields)) == fields


@pytest.mark.parametrize("filters, field", [
    ({"rule_sets": ["gopher"]}, "rule_sets.0"),
    ({"rule_sets": ["c4", "c4"]}, "rule_sets"),
    ({"gopher_quality": {"min_words": 0}}, "gopher_quality.min_words"),
    ({"gopher_repetition": {"max_top_ngram_char_fraction": {2: 1.5}}}, "gopher_repetition.max_top_ngram_char_fraction.2"),
    ({"gopher_repetition": {"max_duplicate_ngram_char_fraction": {0: 0.1}}}, "max_duplicate_ngram_char_fraction.0.[key]"),
    ({"fineweb": {"max_short_line_fraction": 2}}, "fineweb.max_short_line_fraction"),
    ({"c4": {"min_sentence": 5}}, "c4.min_sentence"),
])
def test_bad_thresholds_are_errors_naming_the_field(filters, field):
    with pytest.raises(ValidationError) as error:
        FilterSpec(**filters)
    assert field in str(error.value)


# --- end to end: the manifest counts each rule's drops ------------------------------------------------

def mixed_documents() -> list[str]:
    """Generated stories, and copies of them broken in ways that the rule sets catch."""
    stories = generate_documents(240, 11)
    broken = []
    for i, story in enumerate(stories[:120]):
        paragraphs = story.split("\n\n")
        broken.append([
            paragraphs[0],                                       # one paragraph: few words or sentences
            story + "\n\nLorem ipsum dolor sit amet, consectetur.",
            "\n\n".join(paragraphs + [paragraphs[-1]] * 4),     # repeated paragraphs
            "\n".join("- " + p for p in story.replace(". ", ".\n").split("\n") if p),  # a list
            story.replace(".", "..."),
            "\n".join(w for w in story.split()),                 # one word a line
        ][i % 6])
    return stories[120:] + broken


@pytest.mark.local
def test_preprocess_counts_each_rule_drops_by_name(start_ray, tmp_path):
    documents = mixed_documents()
    source = tmp_path / "part-0.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    rule_sets = ["gopher_quality", "gopher_repetition", "c4", "fineweb"]
    spec = FilterSpec(rule_sets=rule_sets)
    expected: dict[str, int] = {}
    for text in documents:
        name = rejection_reason(normalize(text, NormalizeSpec()), spec)
        if name:
            expected[name] = expected.get(name, 0) + 1
    assert len(expected) >= 5, expected  # the test exercises several rules of several sets

    from jobs.storage import open_storage
    from orchestrator.console import Console
    from orchestrator.runner import run_pipeline
    from orchestrator.spec import parse_spec

    start_ray()
    pipeline = parse_spec(json.dumps({"name": "quality", "storage": f"file://{tmp_path}/out", "stages": {
        "tok": {"kind": "tokenizer", "source": {"paths": [str(source)]}, "vocab_size": 512},
        "corpus": {"kind": "preprocess", "source": {"paths": [str(source)]}, "tokenizer": "tok", "seq_len": 64,
                   "shard_mb": 0.2, "filters": {"rule_sets": rule_sets}},
    }}))
    record = run_pipeline(pipeline, open_storage(pipeline.storage), console=Console(open(os.devnull, "w")))
    assert record.status == "succeeded"
    manifest = json.loads(open_storage(record.stages["corpus"].output_uri).read_bytes("manifest.json"))
    assert manifest["num_shards"] > 1
    drops = {name: n for name, n in manifest["drops"].items() if name != "duplicate"}
    assert drops == expected
    assert manifest["num_documents"] == len(documents) - sum(manifest["drops"].values())

    # C4's line edits reach the tokens: the kept documents, cleaned, tokenized by the stage's tokenizer.
    from transformers import AutoTokenizer

    from jobs.text import clean_lines

    out = open_storage(record.stages["corpus"].output_uri)
    out.download_prefix("tokenizer", str(tmp_path / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    kept = [normalize(t, NormalizeSpec()) for t in documents if not rejection_reason(normalize(t, NormalizeSpec()), spec)]
    cleaned = list(dict.fromkeys(clean_lines(t, spec) for t in kept))
    assert sum(c != t for c, t in zip(cleaned, kept)) > 0  # some documents lost lines
    assert manifest["num_tokens"] == sum(len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in cleaned)
