"""Unit tests of document cleaning (jobs/text.py) and corpus sources (jobs/sources.py): finding files
locally and on S3 (moto), byte-range sharding, and reading records with bad ones reported."""

from __future__ import annotations

import json
import os
import random

import boto3
import pytest

from jobs.sources import (BadRecord, Shard, ShardReader, SourceError, SourceSpec, list_source_files,
                          plan_shards)
from jobs.text import FilterSpec, NormalizeSpec, normalize, rejection_reason

# --- normalize ------------------------------------------------------------------------------

def test_normalize_unicode_forms():
    decomposed = "Cafe\u0301 \ufb01ne \uff21\u2460"  # e + combining acute, the fi ligature, fullwidth A, circled 1
    assert normalize(decomposed, NormalizeSpec(unicode="NFC")) == "Caf\u00e9 \ufb01ne \uff21\u2460"
    assert normalize(decomposed, NormalizeSpec(unicode="NFKC")) == "Caf\u00e9 fine A1"
    assert normalize(decomposed, NormalizeSpec(unicode="none")) == decomposed
    assert NormalizeSpec().unicode == "NFC"


def test_normalize_collapses_whitespace_and_strips():
    spec = NormalizeSpec(collapse_whitespace=True)
    assert normalize("  a \t\t b\u00a0\u00a0c\f\vd  ", spec) == "a b c d"
    assert normalize("line1\r\nline2\r\n", spec) == "line1\nline2"
    assert normalize("p1\n\n\n\n\np2\n\np3", spec) == "p1\n\np2\n\np3"
    assert normalize("\n\n  x  \n\n", spec) == "x"


def test_normalize_options_off():
    text = "  a  \t b\r\n\n\n\nc  "
    assert normalize(text, NormalizeSpec(collapse_whitespace=False, strip=False)) == text
    assert normalize(text, NormalizeSpec(collapse_whitespace=False)) == text.strip()
    assert normalize(text, NormalizeSpec(collapse_whitespace=True, strip=False)) == " a b\n\nc "


def test_normalize_is_idempotent():
    spec = NormalizeSpec(unicode="NFKC", collapse_whitespace=True)
    text = " \ufb01  x\r\n\n\n\u00a0y "
    assert normalize(normalize(text, spec), spec) == normalize(text, spec)


# --- rejection rules ------------------------------------------------------------------------

@pytest.mark.parametrize("text, spec, reason", [
    ("", FilterSpec(), "empty"),
    ("", FilterSpec(min_chars=0), "empty"),
    ("abcd", FilterSpec(min_chars=5), "too_short"),
    ("abcde", FilterSpec(min_chars=5), None),
    ("abcdef", FilterSpec(max_chars=5), "too_long"),
    ("abcde", FilterSpec(max_chars=5), None),
    ("one two", FilterSpec(min_words=3), "too_few_words"),
    ("one two\nthree", FilterSpec(min_words=3), None),
    ("12345 678 ab", FilterSpec(min_alpha_fraction=0.5), "low_alpha"),
    ("abcdef 12", FilterSpec(min_alpha_fraction=0.5), None),
    ("same\nsame\nsame\nother", FilterSpec(max_duplicate_line_fraction=0.3), "repeated_lines"),
    ("same\nsame\nother\nmore", FilterSpec(max_duplicate_line_fraction=0.3), None),  # 1 of 4 repeats
    ("same\n\n\nsame", FilterSpec(max_duplicate_line_fraction=0.0), "repeated_lines"),  # blank lines ignored
    ("single line", FilterSpec(max_duplicate_line_fraction=0.0), None),
    ("any text at all", FilterSpec(), None),
])
def test_rejection_reason_rules(text, spec, reason):
    assert rejection_reason(text, spec) == reason


def test_rejection_reason_reports_the_first_failing_rule():
    spec = FilterSpec(min_chars=10, min_words=5, min_alpha_fraction=0.9)
    assert rejection_reason("1 2", spec) == "too_short"
    assert rejection_reason("1 2 3 4 5 6", spec) == "low_alpha"
    assert rejection_reason("12345678901", spec) == "too_few_words"


# --- sharding and reading -------------------------------------------------------------------

def _read_all(shards: list[Shard], text_field: str = "text") -> list[tuple]:
    """Every record of the shards as the driver sees it: (line within the file, ...)."""
    out = []
    lines_before: dict[str, int] = {}
    for shard in shards:
        reader = ShardReader(shard, text_field)
        base = lines_before.get(shard.uri, 0)
        for item in reader:
            if isinstance(item, BadRecord):
                out.append(("bad", base + item.line, item.offset, item.reason))
            else:
                out.append(("ok", base + item[0], item[1]))
        lines_before[shard.uri] = base + reader.num_lines
    return out


def _expected_jsonl(content: bytes, text_field: str = "text") -> list[tuple]:
    """The records of a jsonl file, by a plain reading of the whole file."""
    out, offset = [], 0
    raws = content.split(b"\n")
    if content.endswith(b"\n"):
        raws.pop()
    for number, raw in enumerate(raws, start=1):
        line = raw.removesuffix(b"\r")
        if line.strip():
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(("bad", number, offset, "invalid_utf8"))
            except json.JSONDecodeError:
                out.append(("bad", number, offset, "invalid_json"))
            else:
                if not isinstance(record, dict):
                    out.append(("bad", number, offset, "not_an_object"))
                elif record.get(text_field) is None:
                    out.append(("bad", number, offset, "missing_field"))
                elif not isinstance(record[text_field], str):
                    out.append(("bad", number, offset, "wrong_type"))
                else:
                    out.append(("ok", number, record[text_field]))
        offset += len(raw) + 1
    return out


LINES = [
    b'{"text": "first"}',
    b'{"text": "crlf ending"}\r',
    b"",
    b'{"text": "' + b"long " * 80 + b'"}',
    b'{"text": "unicod\xc3\xa9 \xe2\x82\xac \xf0\x9f\x99\x82"}',
    b"   ",
    b'{not json',
    b'\xff\xfe{"text": "bad utf8"}',
    b'{"other": "no text field"}',
    b'{"text": 42}',
    b"[1, 2, 3]",
    b'{"text": null}',
    b'{"text": "after the bad ones", "extra": [1, 2]}\r',
    b'"just a string"',
    b'{"text": "last line, no newline"}',
]
CONTENT = b"\n".join(LINES)  # no final newline


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(CONTENT)
    return str(path)


def _shards(path: str, fmt: str, shard_bytes: int) -> list[Shard]:
    return plan_shards(list_source_files(SourceSpec(paths=[path], format=fmt)), fmt, shard_bytes)


def test_one_shard_reads_every_record_with_line_numbers_and_reasons(jsonl_file):
    [shard] = _shards(jsonl_file, "jsonl", 1 << 20)
    assert (shard.start, shard.end) == (0, len(CONTENT))
    records = _read_all([shard])
    assert records == _expected_jsonl(CONTENT)
    offsets = [sum(len(x) + 1 for x in LINES[:i]) for i in range(len(LINES))]
    assert records == [
        ("ok", 1, "first"),
        ("ok", 2, "crlf ending"),
        ("ok", 4, "long " * 80),
        ("ok", 5, "unicod\u00e9 \u20ac \U0001f642"),
        ("bad", 7, offsets[6], "invalid_json"),
        ("bad", 8, offsets[7], "invalid_utf8"),
        ("bad", 9, offsets[8], "missing_field"),
        ("bad", 10, offsets[9], "wrong_type"),
        ("bad", 11, offsets[10], "not_an_object"),
        ("bad", 12, offsets[11], "missing_field"),
        ("ok", 13, "after the bad ones"),
        ("bad", 14, offsets[13], "not_an_object"),
        ("ok", 15, "last line, no newline"),
    ]


def test_bad_records_carry_shard_relative_lines_and_excerpts(jsonl_file):
    start = sum(len(x) + 1 for x in LINES[:6])  # the shard starts at line 7, '{not json'
    reader = ShardReader(Shard(0, "file://" + jsonl_file, "jsonl", start, len(CONTENT)), "text")
    items = list(reader)
    assert [(i.line, i.reason) for i in items if isinstance(i, BadRecord)] == [
        (1, "invalid_json"), (2, "invalid_utf8"), (3, "missing_field"), (4, "wrong_type"),
        (5, "not_an_object"), (6, "missing_field"), (8, "not_an_object")]
    assert [i for i in items if not isinstance(i, BadRecord)] == [(7, "after the bad ones"), (9, "last line, no newline")]
    assert reader.num_lines == 9
    bad = {i.reason: i for i in items if isinstance(i, BadRecord)}
    assert bad["invalid_json"].offset == start and "{not json" in bad["invalid_json"].excerpt
    assert "\\xff" in bad["invalid_utf8"].excerpt
    assert "'text' is int: 42" == bad["wrong_type"].excerpt


@pytest.mark.parametrize("shard_bytes", [1, 2, 3, 5, 7, 11, 16, 37, 64, 100, 255, 401, len(CONTENT) - 1])
def test_sharded_reading_equals_one_shard(jsonl_file, shard_bytes):
    shards = _shards(jsonl_file, "jsonl", shard_bytes)
    assert len(shards) == -(-len(CONTENT) // shard_bytes)
    assert [s.index for s in shards] == list(range(len(shards)))
    # the shards tile the file exactly
    assert shards[0].start == 0 and shards[-1].end == len(CONTENT)
    assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
    assert _read_all(shards) == _expected_jsonl(CONTENT)
    assert sum(_num_lines(s) for s in shards) == len(LINES)


def _num_lines(shard: Shard) -> int:
    reader = ShardReader(shard, "text")
    for _ in reader:
        pass
    return reader.num_lines


def _random_corpus(seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for i in range(150):
        kind = rng.random()
        if kind < 0.1:
            line = b""
        elif kind < 0.15:
            line = b"{broken"
        else:
            line = json.dumps({"text": f"{i} " + "w" * rng.choice([0, 1, 5, 30, 200])}).encode()
        lines.append(line + (b"\r" if rng.random() < 0.3 else b""))
    return b"\n".join(lines) + (b"\n" if seed % 2 else b"")


@pytest.mark.parametrize("seed", [1, 2])
def test_random_corpus_sharded_any_way_loses_and_duplicates_nothing(tmp_path, seed):
    content = _random_corpus(seed)
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    expected = _expected_jsonl(content)
    assert len(expected) > 100
    for shard_bytes in (13, 97, 211, 1000, len(content)):
        assert _read_all(_shards(str(path), "jsonl", shard_bytes)) == expected, shard_bytes


def test_file_ending_with_newline_and_empty_file(tmp_path):
    path = tmp_path / "nl.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n')
    for shard_bytes in (1, 5, 14, 100):
        assert _read_all(_shards(str(path), "jsonl", shard_bytes)) == [("ok", 1, "a"), ("ok", 2, "b")]
    assert sum(_num_lines(s) for s in _shards(str(path), "jsonl", 3)) == 2

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    shards = _shards(str(empty), "jsonl", 10)
    assert [(s.start, s.end) for s in shards] == [(0, 0)]
    assert _read_all(shards) == []


def test_text_format(tmp_path):
    content = b"first doc\r\n\n   \nsecond  doc \n\xff bad\nthird, no newline"
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    whole = _read_all(_shards(str(path), "text", 1 << 20))
    assert whole == [("ok", 1, "first doc"), ("ok", 4, "second  doc "),
                     ("bad", 5, content.index(b"\xff"), "invalid_utf8"), ("ok", 6, "third, no newline")]
    for shard_bytes in (1, 2, 3, 7, 20):
        assert _read_all(_shards(str(path), "text", shard_bytes)) == whole, shard_bytes


def test_plan_shards_keeps_json_and_arrow_files_whole_and_numbers_across_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"x" * 25)
    b.write_bytes(b"y" * 5)
    files = list_source_files(SourceSpec(paths=[str(tmp_path / "*.jsonl")]))
    shards = plan_shards(files, "jsonl", 10)
    assert [(s.index, os.path.basename(s.uri), s.start, s.end) for s in shards] == [
        (0, "a.jsonl", 0, 10), (1, "a.jsonl", 10, 20), (2, "a.jsonl", 20, 25), (3, "b.jsonl", 0, 5)]
    for fmt in ("json", "arrow"):
        assert [(s.start, s.end) for s in plan_shards(files, fmt, 10)] == [(0, 25), (0, 5)]


def test_json_and_parquet_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "one", "id": 1}, {"body": "no text"}, {"text": "three", "id": 3}]))
    [shard] = _shards(str(path), "json", 1)  # a json file is one shard, whatever the size
    items = list(ShardReader(shard, "text"))
    assert items[0] == (1, "one") and items[2] == (3, "three")
    assert isinstance(items[1], BadRecord) and (items[1].line, items[1].reason, items[1].offset) == (2, "missing_field", -1)

    mixed = tmp_path / "b.json"  # not typable as one table: read record by record instead
    mixed.write_text(json.dumps([{"text": "ok"}, {"text": 5}, [1], "s"]))
    items = list(ShardReader(_shards(str(mixed), "json", 1 << 20)[0], "text"))
    assert items[0] == (1, "ok")
    assert [(i.line, i.reason) for i in items[1:]] == [(2, "wrong_type"), (3, "not_an_object"), (4, "not_an_object")]

    broken = tmp_path / "c.json"
    broken.write_text('[{"text": "unterminated')
    [bad] = list(ShardReader(_shards(str(broken), "json", 1 << 20)[0], "text"))
    assert isinstance(bad, BadRecord) and bad.reason == "invalid_json" and bad.line == 1

    pq.write_table(pa.table({"content": ["p1", None, "p3"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    [shard] = _shards(str(tmp_path / "t.parquet"), "parquet", 1)
    items = list(ShardReader(shard, "content"))
    assert items[0] == (1, "p1") and items[2] == (3, "p3")
    assert isinstance(items[1], BadRecord) and items[1].reason == "missing_field"

    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(SourceError, match="junk.parquet: not a readable parquet file"):
        _shards(str(tmp_path / "junk.parquet"), "parquet", 1)  # planning reads the footer


# --- finding files --------------------------------------------------------------------------

TREE = ["data/a.jsonl", "data/b.jsonl", "data/notes.txt", "data/sub/c.jsonl", "data/sub/deep/d.jsonl"]


@pytest.fixture
def local_tree(tmp_path):
    for rel in TREE:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'{{"text": "{rel}"}}\n')
    return tmp_path


def _names(spec: SourceSpec, root: str) -> list[str]:
    return [f.uri.removeprefix(root).lstrip("/") for f in list_source_files(spec)]


def test_list_source_files_local_globs(local_tree, monkeypatch):
    root = "file://" + str(local_tree)
    d = str(local_tree / "data")
    assert _names(SourceSpec(paths=[f"{d}/*.jsonl"]), root) == ["data/a.jsonl", "data/b.jsonl"]
    assert _names(SourceSpec(paths=[f"{d}/**/*.jsonl"]), root) == [
        "data/a.jsonl", "data/b.jsonl", "data/sub/c.jsonl", "data/sub/deep/d.jsonl"]
    assert _names(SourceSpec(paths=[f"{d}/?.jsonl"]), root) == ["data/a.jsonl", "data/b.jsonl"]
    # overlapping patterns give each file once, in a stable order; file:// works as a prefix
    assert _names(SourceSpec(paths=[f"file://{d}/b.jsonl", f"{d}/*.jsonl", f"{d}/a.jsonl"]), root) == [
        "data/a.jsonl", "data/b.jsonl"]
    # relative paths are read from the current directory
    monkeypatch.chdir(local_tree)
    files = list_source_files(SourceSpec(paths=["data/sub/*.jsonl"]))
    assert [f.uri for f in files] == ["file://" + str(local_tree / "data/sub/c.jsonl")]
    assert files[0].size == os.path.getsize(local_tree / "data/sub/c.jsonl")
    st = os.stat(local_tree / "data/sub/c.jsonl")
    assert files[0].version == f"{st.st_mtime_ns}-{st.st_ctime_ns}"


def test_missing_local_path_raises_naming_its_index(local_tree):
    d = str(local_tree / "data")
    with pytest.raises(SourceError, match=r"^source\.paths\[1\]: .*nothing\*\.jsonl.* matches no file"):
        list_source_files(SourceSpec(paths=[f"{d}/a.jsonl", f"{d}/nothing*.jsonl"]))
    with pytest.raises(SourceError, match=r"^source\.paths\[0\]: "):
        list_source_files(SourceSpec(paths=[d]))  # a directory is not a file


@pytest.fixture
def s3_tree(s3_bucket):
    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for rel in TREE:
        s3.put_object(Bucket=bucket, Key=rel, Body=f'{{"text": "{rel}"}}\n'.encode())
    return s3_bucket


def test_list_source_files_s3_globs(s3_tree):
    b = s3_tree
    assert _names(SourceSpec(paths=[f"{b}/data/*.jsonl"]), b) == ["data/a.jsonl", "data/b.jsonl"]
    assert _names(SourceSpec(paths=[f"{b}/data/**.jsonl"]), b) == [
        "data/a.jsonl", "data/b.jsonl", "data/sub/c.jsonl", "data/sub/deep/d.jsonl"]
    assert _names(SourceSpec(paths=[f"{b}/data/sub/**/*.jsonl"]), b) == ["data/sub/c.jsonl", "data/sub/deep/d.jsonl"]
    assert _names(SourceSpec(paths=[f"{b}/*/*.txt"]), b) == ["data/notes.txt"]
    assert _names(SourceSpec(paths=[f"{b}/data/?.jsonl"]), b) == ["data/a.jsonl", "data/b.jsonl"]
    files = list_source_files(SourceSpec(paths=[f"{b}/data/a.jsonl", f"{b}/data/[ab].jsonl"]))
    assert [f.uri for f in files] == [f"{b}/data/a.jsonl", f"{b}/data/b.jsonl"]
    assert files[0].size == len(b'{"text": "data/a.jsonl"}\n') and files[0].version


def test_missing_s3_path_raises_naming_its_index(s3_tree):
    b = s3_tree
    with pytest.raises(SourceError, match=r"^source\.paths\[1\]: .*matches no file"):
        list_source_files(SourceSpec(paths=[f"{b}/data/a.jsonl", f"{b}/data/missing.jsonl"]))
    with pytest.raises(SourceError, match=r"^source\.paths\[0\]: "):
        list_source_files(SourceSpec(paths=[f"{b}/nowhere/*.jsonl"]))


def test_s3_double_star_slash_matches_zero_directories_like_local_glob(s3_tree, local_tree):
    local = _names(SourceSpec(paths=[str(local_tree / "data/**/*.jsonl")]), "file://" + str(local_tree))
    s3 = _names(SourceSpec(paths=[f"{s3_tree}/data/**/*.jsonl"]), s3_tree)
    assert s3 == local


def test_s3_question_mark_does_not_cross_slash(s3_tree):
    with pytest.raises(SourceError):
        list_source_files(SourceSpec(paths=[f"{s3_tree}/data?a.jsonl"]))


def test_sharded_reading_from_s3_equals_local(s3_bucket, jsonl_file):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="c/corpus.jsonl", Body=CONTENT)
    shards = _shards(f"{s3_bucket}/c/*.jsonl", "jsonl", 97)
    assert len(shards) == -(-len(CONTENT) // 97) and shards[0].uri == f"{s3_bucket}/c/corpus.jsonl"
    assert _read_all(shards) == _expected_jsonl(CONTENT)
