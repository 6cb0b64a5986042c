"""Unit tests of the plan: content hashes (what they cover and what they ignore), output keys, and
whether (and why) each stage runs. No Ray; local storage under tmp_path, S3 on the moto server."""

from __future__ import annotations

import copy
import os

import boto3
import pytest
import yaml

from jobs.commit import bytes_entry, write_commit
from jobs.storage import open_storage
from orchestrator.errors import UserError
from orchestrator.plan import COMMIT_FILE, make_plan
from orchestrator.spec import PipelineSpec, parse_spec

DOCS = [f'{{"text": "document number {i} with some words in it", "body": "b{i}"}}' for i in range(20)]


@pytest.fixture
def corpus(tmp_path):
    """A tiny jsonl corpus; returns its absolute path."""
    path = tmp_path / "data" / "part-0.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(DOCS) + "\n")
    return str(path)


@pytest.fixture
def storage(tmp_path):
    return open_storage("file://" + str(tmp_path / "store"))


def _raw(source: str) -> dict:
    return {
        "name": "t",
        "stages": {
            "tok": {"kind": "tokenizer", "source": {"paths": [source], "format": "jsonl", "text_field": "text"},
                    "vocab_size": 4096},
            "corpus": {"kind": "preprocess", "source": {"paths": [source], "format": "jsonl", "text_field": "text"},
                       "tokenizer": "tok", "seq_len": 256, "filters": {"min_chars": 5},
                       "validation_fraction": 0.02, "shard_mb": 0.5},
        },
    }


def _spec(raw: dict) -> PipelineSpec:
    return parse_spec(yaml.safe_dump(raw))


def _set(raw: dict, stage: str, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw["stages"][stage]
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def _by_name(plan) -> dict:
    return {p.name: p for p in plan}


def _commit_empty(storage, planned, **meta) -> None:
    """Fake a committed output (no files) for `planned`, keeping its inputs as a real run does."""
    assert write_commit(storage.sub(planned.key), COMMIT_FILE, {}, {"inputs": planned.inputs, **meta})


# --- hashes ---------------------------------------------------------------------------------

def test_plan_shape_order_and_keys(corpus, storage):
    plan = make_plan(_spec(_raw(corpus)), storage)
    assert [p.name for p in plan] == ["tok", "corpus"]
    for p in plan:
        assert len(p.hash) == 64 and int(p.hash, 16) >= 0
        assert p.key == f"stages/{p.name}-{p.hash[:8]}"
        assert p.uri == f"{storage.uri}/{p.key}"
        assert not p.cached and p.reason == "new"
    tok, corp = plan
    assert corp.upstream == {"tokenizer": "tok"}
    assert corp.upstream_uris == {"tokenizer": tok.uri}
    assert corp.inputs["upstream"] == {"tokenizer": tok.hash}
    assert "tokenizer" not in corp.inputs["fields"]  # a reference is covered by the upstream hash
    [(shown, size, version)] = tok.inputs["files"]
    assert shown.endswith("data/part-0.jsonl")  # relative to the cwd when under it, else absolute
    st = os.stat(corpus)
    assert (size, version) == (st.st_size, f"{st.st_mtime_ns}-{st.st_ctime_ns}")


def test_hash_is_stable_across_local_storage_roots(corpus, tmp_path):
    spec = _spec(_raw(corpus))
    a = make_plan(spec, open_storage("file://" + str(tmp_path / "root-a")))
    b = make_plan(spec, open_storage("file://" + str(tmp_path / "elsewhere" / "root-b")))
    assert [p.hash for p in a] == [p.hash for p in b]
    assert [p.key for p in a] == [p.key for p in b]
    assert [p.uri for p in a] != [p.uri for p in b]


def test_hash_is_stable_between_file_and_s3_roots(corpus, storage, s3_bucket):
    spec = _spec(_raw(corpus))
    local = make_plan(spec, storage)
    s3 = make_plan(spec, open_storage(s3_bucket + "/some/prefix"))
    assert [p.hash for p in local] == [p.hash for p in s3]
    assert [p.uri for p in s3] == [f"{s3_bucket}/some/prefix/{p.key}" for p in local]
    assert all(not p.cached and p.reason == "new" for p in s3)


def test_hash_is_stable_across_calls_and_ignores_defaults_and_key_order(corpus, storage):
    raw = _raw(corpus)
    first = [p.hash for p in make_plan(_spec(raw), storage)]
    assert [p.hash for p in make_plan(_spec(raw), storage)] == first
    # spelling out a default, or writing keys in another order, changes nothing
    explicit = _set(_set(raw, "corpus", "dedup", True), "tok", "min_frequency", 2)
    explicit["stages"] = dict(reversed(list(explicit["stages"].items())))
    assert [p.hash for p in make_plan(_spec(explicit), storage)] == first
    # a float written as an int is the same value
    as_int = _set(raw, "corpus", "shard_mb", 1)
    assert [p.hash for p in make_plan(_spec(as_int), storage)] == \
        [p.hash for p in make_plan(_spec(_set(raw, "corpus", "shard_mb", 1.0)), storage)]


@pytest.mark.parametrize("stage, field, value", [
    ("tok", "vocab_size", 8192),
    ("tok", "min_frequency", 3),
    ("tok", "sample_mb", 1.0),
    ("tok", "normalize.unicode", "NFKC"),
    ("tok", "source.text_field", "body"),
    ("corpus", "seq_len", 512),
    ("corpus", "filters.min_chars", 10),
    ("corpus", "normalize.unicode", "NFKC"),
    ("corpus", "normalize.collapse_whitespace", True),
    ("corpus", "dedup", False),
    ("corpus", "validation_fraction", 0.05),
    ("corpus", "shard_mb", 1.0),
    ("corpus", "source.text_field", "body"),
])
def test_each_output_relevant_field_changes_the_hash(corpus, storage, stage, field, value):
    raw = _raw(corpus)
    before = _by_name(make_plan(_spec(raw), storage))
    after = _by_name(make_plan(_spec(_set(raw, stage, field, value)), storage))
    assert after[stage].hash != before[stage].hash
    if stage == "tok":  # upstream: the tokenizer's hash is part of the corpus's
        assert after["corpus"].hash != before["corpus"].hash
        assert after["corpus"].inputs["upstream"] == {"tokenizer": after["tok"].hash}
    else:  # nothing flows upstream
        assert after["tok"].hash == before["tok"].hash


def test_source_file_content_and_size_change_the_hash(corpus, storage):
    spec = _spec(_raw(corpus))
    h0 = [p.hash for p in make_plan(spec, storage)]

    # same size, different content: the fingerprint is (size, mtime), so give it another mtime
    st = os.stat(corpus)
    with open(corpus, "r+b") as f:
        f.seek(2)
        f.write(b"T")
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert os.path.getsize(corpus) == st.st_size
    h1 = [p.hash for p in make_plan(spec, storage)]
    assert h1[0] != h0[0] and h1[1] != h0[1]

    # different size, mtime restored to the original: the size alone changes the hash
    with open(corpus, "ab") as f:
        f.write(b'{"text": "one more document"}\n')
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    h2 = [p.hash for p in make_plan(spec, storage)]
    assert len({h0[0], h1[0], h2[0]}) == 3


def test_same_size_content_change_with_preserved_mtime_changes_the_hash(corpus, storage):
    spec = _spec(_raw(corpus))
    before = make_plan(spec, storage)[0].hash
    st = os.stat(corpus)
    with open(corpus, "r+b") as f:
        f.seek(2)
        f.write(b"T")
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert make_plan(spec, storage)[0].hash != before


def test_a_new_file_matching_the_glob_changes_the_hash(corpus, storage):
    spec = _spec(_raw(os.path.join(os.path.dirname(corpus), "*.jsonl")))
    before = make_plan(spec, storage)
    with open(os.path.join(os.path.dirname(corpus), "part-1.jsonl"), "w") as f:
        f.write('{"text": "new"}\n')
    after = make_plan(spec, storage)
    assert before[0].hash != after[0].hash
    assert len(after[0].inputs["files"]) == 2


def test_s3_source_object_change_changes_the_hash(s3_bucket, storage):
    bucket = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="data/a.jsonl", Body=b'{"text": "aaaa"}\n')
    spec = _spec(_raw(f"{s3_bucket}/data/*.jsonl"))
    before = make_plan(spec, storage)
    assert before[0].inputs["files"][0][:2] == [f"{s3_bucket}/data/a.jsonl", 17]
    s3.put_object(Bucket=bucket, Key="data/a.jsonl", Body=b'{"text": "bbbb"}\n')  # same size
    after = make_plan(spec, storage)
    assert after[0].hash != before[0].hash and after[1].hash != before[1].hash


def test_local_tokenizer_directory_is_fingerprinted(corpus, storage, tmp_path):
    tok_dir = tmp_path / "hf-tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    raw = _raw(corpus)
    raw["stages"] = {"tok": {"kind": "tokenizer", "path": str(tok_dir)},
                     "corpus": {**raw["stages"]["corpus"], "tokenizer": {"path": str(tok_dir)}}}
    before = _by_name(make_plan(_spec(raw), storage))
    assert before["corpus"].upstream == {} and before["corpus"].inputs["upstream"] == {}
    (tok_dir / "tokenizer.json").write_text('{"changed": true}')
    after = _by_name(make_plan(_spec(raw), storage))
    assert after["tok"].hash != before["tok"].hash
    assert after["corpus"].hash != before["corpus"].hash

    raw["stages"]["tok"]["path"] = str(tmp_path / "no-such-dir")
    with pytest.raises(UserError, match=r"stages\.tok: .*is not a directory"):
        make_plan(_spec(raw), storage)


# --- why a stage runs -----------------------------------------------------------------------

def test_reason_names_the_changed_field_after_an_earlier_commit(corpus, storage):
    raw = _raw(corpus)
    old = _by_name(make_plan(_spec(raw), storage))
    for p in old.values():
        _commit_empty(storage, p)

    new = _by_name(make_plan(_spec(_set(raw, "tok", "vocab_size", 8192)), storage))
    assert not new["tok"].cached
    assert new["tok"].reason == "changed: vocab_size: 4096 -> 8192"
    assert not new["corpus"].cached
    assert new["corpus"].reason.startswith("changed: upstream ")
    assert "changed" in new["corpus"].reason.removeprefix("changed: ")


def test_reason_names_the_upstream_stage(corpus, storage):
    raw = _raw(corpus)
    for p in make_plan(_spec(raw), storage):
        _commit_empty(storage, p)
    new = _by_name(make_plan(_spec(_set(raw, "tok", "vocab_size", 8192)), storage))
    assert new["corpus"].reason == "changed: upstream tok changed"


def test_reason_lists_several_changes_and_input_files(corpus, storage):
    raw = _raw(corpus)
    for p in make_plan(_spec(raw), storage):
        _commit_empty(storage, p)
    changed = _set(_set(raw, "corpus", "seq_len", 512), "corpus", "filters.min_chars", 9)
    corp = _by_name(make_plan(_spec(changed), storage))["corpus"]
    assert corp.reason == "changed: filters.min_chars: 5 -> 9; seq_len: 256 -> 512"

    with open(corpus, "a") as f:
        f.write('{"text": "appended"}\n')
    plan = _by_name(make_plan(_spec(raw), storage))
    assert plan["tok"].reason == "changed: input files changed"
    assert "input files changed" in plan["corpus"].reason


def test_reason_diffs_against_the_newest_earlier_commit(corpus, storage):
    raw = _raw(corpus)
    oldest = _by_name(make_plan(_spec(raw), storage))["tok"]
    newer = _by_name(make_plan(_spec(_set(raw, "tok", "vocab_size", 6000)), storage))["tok"]
    _commit_empty(storage, newer, committed_at=2000.0)
    _commit_empty(storage, oldest, committed_at=1000.0)
    tok = _by_name(make_plan(_spec(_set(raw, "tok", "vocab_size", 8192)), storage))["tok"]
    assert tok.reason == "changed: vocab_size: 6000 -> 8192"


def test_committed_verifying_output_is_cached(corpus, storage):
    spec = _spec(_raw(corpus))
    tok = make_plan(spec, storage)[0]
    out = storage.sub(tok.key)
    out.write_bytes("vocab.json", b'{"a": 1}')
    assert write_commit(out, COMMIT_FILE, {"vocab.json": bytes_entry(b'{"a": 1}')}, {"inputs": tok.inputs})

    plan = _by_name(make_plan(spec, storage))
    assert plan["tok"].cached and plan["tok"].reason == "cached"
    assert not plan["corpus"].cached and plan["corpus"].reason == "new"

    # a listed file goes missing: the commit no longer verifies, and the plan says so
    out.delete("vocab.json")
    tok = make_plan(spec, storage)[0]
    assert not tok.cached
    assert "commit does not verify" in tok.reason and "vocab.json: missing" in tok.reason


def test_commit_with_a_truncated_file_is_not_cached(corpus, storage):
    spec = _spec(_raw(corpus))
    tok = make_plan(spec, storage)[0]
    out = storage.sub(tok.key)
    out.write_bytes("vocab.json", b"0123456789")
    write_commit(out, COMMIT_FILE, {"vocab.json": bytes_entry(b"0123456789")}, {"inputs": tok.inputs})
    out.write_bytes("vocab.json", b"01234")
    tok = make_plan(spec, storage)[0]
    assert not tok.cached and "does not verify" in tok.reason and "5 bytes, commit says 10" in tok.reason


def test_cached_on_s3_root(corpus, s3_bucket):
    storage = open_storage(s3_bucket + "/root")
    spec = _spec(_raw(corpus))
    for p in make_plan(spec, storage):
        _commit_empty(storage, p)
    assert all(p.cached and p.reason == "cached" for p in make_plan(spec, storage))
    new = _by_name(make_plan(_spec(_set(_raw(corpus), "tok", "vocab_size", 8192)), storage))
    assert new["tok"].reason == "changed: vocab_size: 4096 -> 8192"


def test_earlier_outputs_of_a_stage_whose_name_extends_this_one_are_not_ours(corpus, storage):
    raw = _raw(corpus)
    raw["stages"]["tok-big"] = {**raw["stages"]["tok"], "vocab_size": 9999}
    plan = _by_name(make_plan(_spec(raw), storage))
    _commit_empty(storage, plan["tok-big"])
    plan = _by_name(make_plan(_spec(raw), storage))
    assert plan["tok-big"].cached
    assert plan["tok"].reason == "new"


# --- bad input ------------------------------------------------------------------------------

def test_source_matching_nothing_is_a_user_error_naming_the_path(corpus, storage, tmp_path):
    raw = _raw(str(tmp_path / "nothing" / "*.jsonl"))
    with pytest.raises(UserError) as info:
        make_plan(_spec(raw), storage)
    assert str(info.value).startswith("stages.tok.source.paths[0]: ")
    assert "matches no file" in str(info.value)

    raw = _raw(corpus)
    raw["stages"]["corpus"]["source"]["paths"] = [corpus, str(tmp_path / "missing.jsonl")]
    with pytest.raises(UserError, match=r"^stages\.corpus\.source\.paths\[1\]: .*missing\.jsonl"):
        make_plan(_spec(raw), storage)
