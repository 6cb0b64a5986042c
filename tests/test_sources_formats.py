"""Corpus inputs as they really come: compressed jsonl/text (.gz, .zst), parquet split by row groups,
Hugging Face `save_to_disk` directories (arrow), and files that do not hold what their format says.

Expectations come from the plain corpus read by the tests' own reference reader (test_sources_text),
or from how the files were built; the end-to-end tests compare the packed token files of a stage
over the new format with those of a stage over the same rows as plain jsonl, byte for byte.
"""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_sources_text import CONTENT, _expected_jsonl, _read_all

from corpus import make_corpus
from jobs.sources import (ShardReader, SourceError, SourceSpec, check_source_content, list_source_files,
                          plan_shards)
from jobs.storage import open_storage
from jobs.tokenizer import build_tokenizer, train_tokenizer
from orchestrator.cli import main

COMPRESS = {".gz": lambda data: gzip.compress(data, compresslevel=1),
            ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def _spec(path: str, fmt: str = "jsonl", text_field: str = "text") -> SourceSpec:
    return SourceSpec(paths=[path], format=fmt, text_field=text_field)


def _shards(path: str, fmt: str = "jsonl", shard_bytes: int = 1 << 20, text_field: str = "text"):
    spec = _spec(path, fmt, text_field)
    files = list_source_files(spec)
    check_source_content(files, spec)
    return plan_shards(files, fmt, shard_bytes)


# --- compressed jsonl and text ----------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_reads_like_the_plain_file_as_one_shard(tmp_path, suffix):
    path = tmp_path / f"corpus.jsonl{suffix}"
    path.write_bytes(COMPRESS[suffix](CONTENT))
    shards = _shards(str(path), shard_bytes=7)  # far below the file's size: still one shard
    assert [(s.start, s.end) for s in shards] == [(0, path.stat().st_size)]
    # every record, and each bad line's number and offset (in the decompressed bytes), as plain
    assert _read_all(shards) == _expected_jsonl(CONTENT)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_concatenated_members_and_frames_are_one_stream(tmp_path, suffix):
    """`cat a.gz b.gz` is a valid gzip file (and likewise zstd frames): all of it is read."""
    half = CONTENT.index(b"\n", len(CONTENT) // 2) + 1
    path = tmp_path / f"parts.jsonl{suffix}"
    path.write_bytes(COMPRESS[suffix](CONTENT[:half]) + COMPRESS[suffix](CONTENT[half:]))
    assert _read_all(_shards(str(path))) == _expected_jsonl(CONTENT)


def test_compressed_text_format(tmp_path):
    content = b"first doc\r\n\n   \nsecond  doc \n\xff bad\nthird, no newline"
    (tmp_path / "c.txt").write_bytes(content)
    (tmp_path / "c.txt.zst").write_bytes(COMPRESS[".zst"](content))
    plain = _read_all(_shards(str(tmp_path / "c.txt"), "text"))
    assert _read_all(_shards(str(tmp_path / "c.txt.zst"), "text")) == plain
    assert [r[1] for r in plain] == [1, 4, 5, 6]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_file_is_streamed_not_held(tmp_path, suffix):
    lines = b"".join(b"document %07d %s\n" % (i, b"w" * 1000) for i in range(60_000))  # 60 MB
    path = tmp_path / f"big.txt{suffix}"
    path.write_bytes(COMPRESS[suffix](lines))
    [shard] = _shards(str(path), "text")
    tracemalloc.start()
    try:
        reader = ShardReader(shard, "text")
        count = sum(1 for _ in reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == reader.num_lines == 60_000
    assert peak < len(lines) / 2, peak  # the read buffers, not the 60 MB of text


def test_compressed_jsonl_on_s3_equals_local(s3_bucket, tmp_path):
    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for suffix, compress in COMPRESS.items():
        client.put_object(Bucket=bucket, Key=f"c/corpus.jsonl{suffix}", Body=compress(CONTENT))
        [shard] = _shards(f"{s3_bucket}/c/*.jsonl{suffix}")
        assert shard.uri == f"{s3_bucket}/c/corpus.jsonl{suffix}"
        assert _read_all([shard]) == _expected_jsonl(CONTENT)


# --- parquet ----------------------------------------------------------------------------------

def _rows(num_rows: int) -> list:
    """Texts of varied lengths, null at rows 5 and 70 (1-based)."""
    texts: list = [f"row {i}: " + "parquet text " * (i % 7 + 1) for i in range(1, num_rows + 1)]
    texts[4] = texts[69] = None
    return texts


def _parquet(path, texts: list, num_row_groups: int, **columns) -> None:
    table = pa.table({"text": texts, "id": list(range(len(texts))), **columns})
    pq.write_table(table, path, row_group_size=len(texts) // num_row_groups)
    assert pq.ParquetFile(path).metadata.num_row_groups == num_row_groups


def test_parquet_shards_by_row_groups_with_record_numbers_exact_across_shards(tmp_path):
    texts = _rows(800)
    path = tmp_path / "t.parquet"
    _parquet(path, texts, 8)
    metadata = pq.ParquetFile(path).metadata
    group_bytes = [sum(metadata.row_group(g).column(c).total_compressed_size for c in range(2)) for g in range(8)]
    shards = _shards(str(path), "parquet", shard_bytes=int(2.5 * max(group_bytes)))
    assert [(s.start, s.end) for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]  # row groups, not bytes
    records = _read_all(shards)
    assert records == [("bad", i, -1, "missing_field") if t is None else ("ok", i, t)
                       for i, t in enumerate(texts, start=1)]
    # one row group per shard at the smallest size; the whole file at a large one
    assert len(_shards(str(path), "parquet", shard_bytes=1)) == 8
    assert len(_shards(str(path), "parquet", shard_bytes=1 << 30)) == 1
    assert _read_all(_shards(str(path), "parquet", shard_bytes=1)) == records


def test_parquet_wrong_types_and_a_missing_column(tmp_path):
    path = tmp_path / "t.parquet"
    _parquet(path, ["a", "b", "c", "d"], 2, number=[1, 2, 3, 4])
    items = _read_all(_shards(str(path), "parquet", 1, text_field="number"), "number")
    assert items == [("bad", i, -1, "wrong_type") for i in range(1, 5)]
    shards = _shards(str(path), "parquet", 1, text_field="body")

    bad = [item for s in shards for item in ShardReader(s, "body")]
    assert [(b.line, b.reason) for b in bad] == [(1, "missing_field"), (2, "missing_field")] * 2
    assert "no 'body' in columns ['text', 'id', 'number']" == bad[0].excerpt


def test_parquet_row_group_is_streamed_not_held(tmp_path):
    """A row group's text column is read in ranged reads, not fetched whole (its bytes pass through
    Python, so tracemalloc sees them)."""
    texts = [os.urandom(1000).hex() for _ in range(20_000)]  # 40 MB, one row group, stored uncompressed
    pq.write_table(pa.table({"text": texts}), tmp_path / "one.parquet", row_group_size=len(texts),
                   compression="none", use_dictionary=False)
    [shard] = _shards(str(tmp_path / "one.parquet"), "parquet")
    tracemalloc.start()
    try:
        first = [item for _, item in zip(range(100), ShardReader(shard, "text"))]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first == list(enumerate(texts[:100], start=1))
    assert peak < 40e6 / 2, peak


# --- a Hugging Face dataset saved with save_to_disk ---------------------------------------------

@pytest.fixture
def saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": t, "id": i} for i, t in enumerate(_rows(300))]
    path = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=3)
    (path / "cache-0123.arrow").write_bytes(b"a cache file of datasets' own: not data")
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, jsonl


def test_save_to_disk_directory_reads_like_the_jsonl(saved_dataset):
    path, jsonl = saved_dataset
    rows = _read_all(_shards(str(jsonl)))
    assert [r[1] for r in rows if r[0] == "bad"] == [5, 70]
    # arrow records are numbered within each of the three files of 100 rows; they have no byte offset
    expected = [(r[0], (r[1] - 1) % 100 + 1, *((-1, r[3]) if r[0] == "bad" else r[2:])) for r in rows]
    for given in (str(path), str(path) + "/", str(path / "data-*.arrow")):
        shards = _shards(given, "arrow", shard_bytes=1)
        assert [os.path.basename(s.uri) for s in shards] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
        assert _read_all(shards) == expected


def test_save_to_disk_directory_on_s3(saved_dataset, s3_bucket):
    path, jsonl = saved_dataset
    os.unlink(path / "cache-0123.arrow")
    open_storage(f"{s3_bucket}/ds").upload_dir(str(path), "")
    local = _read_all(_shards(str(path), "arrow"))
    assert _read_all(_shards(f"{s3_bucket}/ds", "arrow")) == local
    with pytest.raises(SourceError, match=r"matches no file, nor a directory of data-\*\.arrow files"):
        list_source_files(_spec(f"{s3_bucket}/nothing", "arrow"))


# --- content checks ---------------------------------------------------------------------------

def _problem(tmp_path, name: str, data: bytes, fmt: str = "jsonl") -> str:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SourceError) as e:
        _shards(str(tmp_path / name), fmt)
    return str(e.value)


def test_content_that_does_not_match_the_format_is_named_with_its_fix(tmp_path):
    gz, zst = COMPRESS[".gz"](CONTENT), COMPRESS[".zst"](CONTENT)
    d = str(tmp_path)
    assert _problem(tmp_path, "a.jsonl", gz) == f"{d}/a.jsonl starts with gzip's magic bytes: rename it a.jsonl.gz"
    assert _problem(tmp_path, "b.txt", zst, "text") == f"{d}/b.txt starts with zstd's magic bytes: rename it b.txt.zst"
    assert _problem(tmp_path, "c.jsonl.gz", zst) == (
        f"{d}/c.jsonl.gz is named as gzip-compressed but starts with zstd's magic bytes: rename it c.jsonl.zst "
        "or check the file")
    assert "is not gzip-compressed" in _problem(tmp_path, "d.jsonl.gz", CONTENT)
    binary = bytes(range(256)) * 8
    assert _problem(tmp_path, "e.jsonl", binary).startswith(f"{d}/e.jsonl is binary, not jsonl text (a NUL byte")
    assert _problem(tmp_path, "f.jsonl.zst", COMPRESS[".zst"](binary)).startswith(
        f"{d}/f.jsonl.zst is binary (once zstd-decompressed), not jsonl text")
    noise = bytes((i * 7919) % 127 + 129 for i in range(3000))  # no NUL, not UTF-8
    assert "characters are not UTF-8" in _problem(tmp_path, "g.txt", noise, "text")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "h.jsonl")
    assert _problem(tmp_path, "h.jsonl", (tmp_path / "h.jsonl").read_bytes()) == (
        f"{d}/h.jsonl is a parquet file: set the source's format to parquet")
    assert _problem(tmp_path, "i.parquet", CONTENT[:100], "parquet") == (
        f"{d}/i.parquet is not a parquet file; it looks like text: use format jsonl or text: check the file or "
        "the source's format")
    assert "is not an arrow file; it is gzip data" in _problem(tmp_path, "j.arrow", gz, "arrow")


def test_every_bad_file_is_named_at_once_and_good_files_pass(tmp_path):
    (tmp_path / "good.jsonl").write_bytes(CONTENT)  # a few bad lines are the quarantine's, not an error
    (tmp_path / "good.jsonl.gz").write_bytes(COMPRESS[".gz"](CONTENT))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert len(_shards(str(tmp_path / "*"))) == 3
    for name in ("x.jsonl", "y.jsonl"):
        (tmp_path / name).write_bytes(COMPRESS[".zst"](CONTENT))
    with pytest.raises(SourceError) as e:
        _shards(str(tmp_path / "*"))
    assert str(e.value).splitlines() == [
        "2 files do not hold format jsonl:",
        f"  - {tmp_path}/x.jsonl starts with zstd's magic bytes: rename it x.jsonl.zst",
        f"  - {tmp_path}/y.jsonl starts with zstd's magic bytes: rename it y.jsonl.zst"]


def test_s3_checks_the_first_64_files_and_every_unusual_name(s3_bucket):
    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    gz = COMPRESS[".gz"](b'{"text": "x"}\n')
    for i in range(70):
        client.put_object(Bucket=bucket, Key=f"p/{i:03d}.jsonl", Body=b'{"text": "x"}\n')
    client.put_object(Bucket=bucket, Key="p/066.jsonl", Body=gz)  # past the first 64, usual name: not read
    check_source_content(list_source_files(_spec(f"{s3_bucket}/p/*")), _spec(f"{s3_bucket}/p/*"))
    client.put_object(Bucket=bucket, Key="p/067.data", Body=gz)  # an unusual name is always read
    with pytest.raises(SourceError, match=r"p/067\.data starts with gzip's magic bytes: rename it 067\.data\.gz$"):
        check_source_content(list_source_files(_spec(f"{s3_bucket}/p/*")), _spec(f"{s3_bucket}/p/*"))


def test_tokenizer_with_no_usable_text_in_its_sample_fails_clearly(tmp_path):
    (tmp_path / "notes.jsonl").write_text("just some prose\nnot json at all\n")
    source = _spec(str(tmp_path / "notes.jsonl"))
    with pytest.raises(SourceError) as e:
        build_tokenizer(open_storage(str(tmp_path / "out")), source=source, normalization=None, vocab_size=300,
                        sample_bytes=1 << 20)
    assert str(e.value) == (
        f"{tmp_path}/notes.jsonl: no usable text to train the tokenizer on (2 records skipped: {{'invalid_json': 2}}; "
        f"the first: file://{tmp_path}/notes.jsonl: invalid_json: Expecting value: just some prose); check the "
        "source's format (jsonl) and text_field ('text'), and that the files hold text")
    assert not (tmp_path / "out").exists()


# --- end to end: the stages over the new formats give the same tokens ---------------------------

def _stage_data(record, storage, stage: str) -> dict:
    """sha256 of every packed token file of a stage (the commit files differ by timestamps)."""
    out = open_storage(record.stages[stage].output_uri)
    commit = json.loads(out.read_bytes("_COMMIT.json"))
    return {key: e["sha256"] for key, e in commit["files"].items() if key.startswith("data/") and key.endswith(".bin")}


def _run(stages: dict, storage: str):
    from orchestrator.console import Console
    from orchestrator.runner import run_pipeline
    from orchestrator.spec import parse_spec

    spec = parse_spec(json.dumps({"name": "formats", "storage": storage, "stages": stages}))
    return run_pipeline(spec, open_storage(storage), console=Console(open(os.devnull, "w")))


def _preprocess(source: dict, **options) -> dict:
    return {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": 32, "validation_fraction": 0.1,
            **options}


@pytest.mark.local
def test_compressed_corpora_give_the_same_tokens_and_quarantine(start_ray, s3_bucket, tmp_path):
    (tmp_path / "plain").mkdir()
    corpus = make_corpus(str(tmp_path / "plain"), docs_per_file=150, num_duplicates=6)
    for suffix, compress in COMPRESS.items():
        os.makedirs(tmp_path / suffix[1:])
        for path in corpus.files:
            compressed = compress(open(path, "rb").read())
            (tmp_path / suffix[1:] / (os.path.basename(path) + suffix)).write_bytes(compressed)
    open_storage(f"{s3_bucket}/zst").upload_dir(str(tmp_path / "zst"), "")
    start_ray()
    record = _run({
        "tok": {"kind": "tokenizer", "source": {"paths": [corpus.glob]}, "vocab_size": 512},
        "tok_gz": {"kind": "tokenizer", "source": {"paths": [f"{tmp_path}/gz/*.jsonl.gz"]}, "vocab_size": 512},
        "plain": _preprocess({"paths": [corpus.glob]}),
        "gz": _preprocess({"paths": [f"{tmp_path}/gz/*.jsonl.gz"]}),
        "zst_s3": _preprocess({"paths": [f"{s3_bucket}/zst/*.jsonl.zst"]}),
    }, f"file://{tmp_path}/out")
    assert record.status == "succeeded"
    storage = open_storage(f"file://{tmp_path}/out")
    tok, tok_gz = (open_storage(record.stages[s].output_uri).read_bytes("tokenizer.json") for s in ("tok", "tok_gz"))
    assert tok_gz == tok  # the same sample: the same tokenizer
    plain = _stage_data(record, storage, "plain")
    assert plain and _stage_data(record, storage, "gz") == plain == _stage_data(record, storage, "zst_s3")
    for stage, where in (("gz", f"{tmp_path}/gz/"), ("zst_s3", f"{s3_bucket}/zst/")):
        out = open_storage(record.stages[stage].output_uri)
        quarantined = [json.loads(line) for line in out.read_bytes("quarantine.jsonl").decode().splitlines()]
        suffix = ".gz" if stage == "gz" else ".zst"
        assert sorted((q["source"].removeprefix("file://"), q["line"], q["reason"]) for q in quarantined) == sorted(
            (where + os.path.basename(path) + suffix, line, reason) for path, line, reason in corpus.bad_lines)
        assert record.stages[stage].metrics["num_tokens"] == record.stages["plain"].metrics["num_tokens"]


@pytest.mark.local
def test_parquet_row_groups_and_saved_dataset_give_the_tokens_of_the_same_jsonl(start_ray, tmp_path):
    datasets = pytest.importorskip("datasets")
    unique = [t for t in _rows(800) if t is not None][:790]
    texts = unique + unique[:2]  # 792 rows: 8 row groups of 99, the last two rows duplicates
    _parquet(tmp_path / "one.parquet", texts, 8)
    metadata = pq.ParquetFile(tmp_path / "one.parquet").metadata
    group_mb = max(sum(metadata.row_group(g).column(c).total_compressed_size for c in range(2)) for g in range(8)) / 1e6
    # The parquet stage's shards (two row groups each), as four jsonl files and a 4-file saved dataset.
    for i in range(4):
        rows = texts[i * 198:(i + 1) * 198]
        (tmp_path / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"), num_shards=4)
    start_ray()
    record = _run({
        "tok": {"kind": "tokenizer", "source": {"paths": [f"{tmp_path}/part-*.jsonl"]}, "vocab_size": 512},
        "parquet": _preprocess({"paths": [f"{tmp_path}/one.parquet"], "format": "parquet"}, shard_mb=2.5 * group_mb),
        "jsonl": _preprocess({"paths": [f"{tmp_path}/part-*.jsonl"]}),
        "arrow": _preprocess({"paths": [f"{tmp_path}/saved"], "format": "arrow"}),
    }, f"file://{tmp_path}/out")
    assert record.status == "succeeded"
    assert record.stages["parquet"].metrics["num_shards"] == 4  # more shards than files, for 2 workers
    storage = open_storage(f"file://{tmp_path}/out")
    jsonl = _stage_data(record, storage, "jsonl")
    assert jsonl and _stage_data(record, storage, "parquet") == jsonl == _stage_data(record, storage, "arrow")
    assert record.stages["parquet"].metrics["drops"]["duplicate"] == 2


# --- end to end: bad input stops `orchestrator run` before any worker ---------------------------

@pytest.mark.local
def test_bad_input_exits_2_naming_the_file_before_any_worker(start_ray, tmp_path, monkeypatch, capsys):
    journal = tmp_path / "journal"
    start_ray(ORCHESTRATOR_TASK_JOURNAL=str(journal))
    monkeypatch.setenv("ORCHESTRATOR_LOG_DIR", str(tmp_path / "logs"))
    train_tokenizer(["some text to learn from"] * 10, 300, 2, str(tmp_path / "tokenizer"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_bytes(CONTENT)
    (tmp_path / "data" / "b.jsonl").write_bytes(COMPRESS[".gz"](CONTENT))
    (tmp_path / "image.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    (tmp_path / "prose.jsonl").write_text("a text file\ngiven as jsonl\n")

    def run(name: str, stage: dict) -> tuple[int, str]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"name": name, "storage": f"file://{tmp_path}/out", "stages": {name: stage}}))
        code = main(["run", str(path)])
        return code, capsys.readouterr().err

    corpus = {"kind": "preprocess", "tokenizer": {"path": str(tmp_path / "tokenizer")}, "seq_len": 16}
    code, err = run("corpus", {**corpus, "source": {"paths": [f"{tmp_path}/data/*.jsonl"]}})
    assert code == 2
    assert f"stages.corpus.source: {tmp_path}/data/b.jsonl starts with gzip's magic bytes: rename it b.jsonl.gz" in err
    code, err = run("image", {"kind": "tokenizer", "source": {"paths": [f"{tmp_path}/image.jsonl"]}})
    assert code == 2 and f"stages.image.source: {tmp_path}/image.jsonl is binary, not jsonl text" in err
    assert not journal.exists() or journal.read_text() == ""  # no scan or encode task ran
    stages = open_storage(f"file://{tmp_path}/out").list("stages/")
    assert not [o.key for o in stages if "/scan/" in o.key or "/data/" in o.key or o.key.endswith("_COMMIT.json")]

    code, err = run("prose", {"kind": "tokenizer", "source": {"paths": [f"{tmp_path}/prose.jsonl"]}})
    assert code == 2
    assert f"stages.prose.source: {tmp_path}/prose.jsonl: no usable text to train the tokenizer on" in err
    assert "{'invalid_json': 2}" in err

    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + bytes(100) + b"PAR1")  # the right magic, no footer
    code, err = run("broken", {**corpus, "source": {"paths": [f"{tmp_path}/broken.parquet"], "format": "parquet"}})
    assert code == 2 and f"{tmp_path}/broken.parquet: not a readable parquet file" in err
