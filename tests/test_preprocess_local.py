"""Preprocessing end to end on real Ray, with a real S3 protocol (moto over HTTP on 127.0.0.1).

Every expectation is computed independently of the code under test: token counts with the saved
tokenizer loaded through transformers, duplicates and bad lines from how the corpus was built.
"""

from __future__ import annotations

import json
import os

import boto3
import numpy as np
import pytest

from corpus import BAD_LINES, make_corpus
from jobs.storage import open_storage
from jobs.text import NormalizeSpec, normalize
from orchestrator.console import Console
from orchestrator.records import load_record
from orchestrator.runner import run_pipeline
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.local

SEQ_LEN = 64


def pipeline(source: str, storage: str, **preprocess) -> str:
    # dedup_keys_per_task: several dedup key ranges (each a reduce task) even for this small corpus
    options = {"seq_len": SEQ_LEN, "shard_mb": 0.1, "validation_fraction": 0.1, "dedup_keys_per_task": 200,
               **preprocess}
    return json.dumps({
        "name": "test",
        "storage": storage,
        "stages": {
            "tok": {"kind": "tokenizer", "source": {"paths": [source]}, "vocab_size": 1024},
            "corpus": {"kind": "preprocess", "source": {"paths": [source]}, "tokenizer": "tok", **options},
        },
    })


def run(spec_text: str, run_id: str | None = None):
    spec = parse_spec(spec_text)
    storage = open_storage(spec.storage)
    return run_pipeline(spec, storage, run_id=run_id, console=Console(open(os.devnull, "w"))), storage


def stage_files(storage, record, stage="corpus") -> dict:
    """key -> sha256 of every committed data file of a stage: its exact output (commit files
    themselves differ by their timestamps)."""
    out = open_storage(record.stages[stage].output_uri)
    commit = json.loads(out.read_bytes("_COMMIT.json"))
    return {key: entry["sha256"] for key, entry in commit["files"].items() if not key.endswith("commit.json")}


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))


def test_s3_corpus_into_s3(start_ray, s3_bucket, local_corpus, tmp_path):
    corpus = local_corpus
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3")
    for path in corpus.files:
        client.upload_file(path, bucket, f"raw/{os.path.basename(path)}")
    start_ray()
    record, storage = run(pipeline(f"{s3_bucket}/raw/*.jsonl", f"{s3_bucket}/out"))
    assert record.status == "succeeded"
    out = open_storage(record.stages["corpus"].output_uri)
    manifest = json.loads(out.read_bytes("manifest.json"))
    assert manifest["num_shards"] > len(corpus.files)  # files were split: dedup had to cross shards

    # Token count: the saved tokenizer, loaded by transformers, over the unique documents.
    from transformers import AutoTokenizer

    out.download_prefix("tokenizer", str(tmp_path / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    unique = list(dict.fromkeys(corpus.documents))
    assert all(normalize(d, NormalizeSpec()) == d for d in unique)  # so no normalization is at play
    expected_tokens = sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in unique)
    assert manifest["num_documents"] == len(unique)
    assert manifest["num_tokens"] == expected_tokens

    # Global dedup: every duplicate sits in another file than its original, and the key ranges
    # were decided by several reduce tasks.
    assert manifest["drops"]["duplicate"] == corpus.num_duplicates > 0
    assert len(out.list("dedup/")) > 1

    # Packed files: whole sequences only; together with the dropped tails they hold every token.
    stored = 0
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["files"]:
            tokens = np.frombuffer(out.read_bytes(entry["key"]), dtype=manifest["dtype"])
            assert len(tokens) == entry["num_sequences"] * SEQ_LEN
            stored += len(tokens)
    assert stored + manifest["num_tokens_dropped"] == expected_tokens
    assert manifest["splits"]["val"]["num_sequences"] > 0 and manifest["splits"]["train"]["num_sequences"] > 0

    # Quarantine: each bad line with its source file, line number and reason.
    quarantined = [json.loads(line) for line in out.read_bytes("quarantine.jsonl").decode().splitlines()]
    assert sorted((os.path.basename(q["source"]), q["line"], q["reason"]) for q in quarantined) == sorted(
        (os.path.basename(path), line, reason) for path, line, reason in corpus.bad_lines)
    for _, reason in BAD_LINES:
        assert manifest["drops"][reason] == sum(1 for _, _, r in corpus.bad_lines if r == reason)

    # The run record follows the contract.
    saved = load_record(storage, record.run_id)
    assert saved.stages["corpus"].metrics["num_tokens"] == expected_tokens
    assert saved.stages["corpus"].output_uri.startswith(f"{s3_bucket}/out/stages/corpus-")


def test_finished_stage_reruns_zero_tasks(start_ray, local_corpus, tmp_path):
    journal = tmp_path / "journal"
    start_ray(ORCHESTRATOR_TASK_JOURNAL=str(journal))
    spec = pipeline(local_corpus.glob, f"file://{tmp_path}/out")
    first, _ = run(spec)
    executed = journal.read_text().split("\n")
    assert sum(line.startswith("encode") for line in executed) == first.stages["corpus"].metrics["num_shards"]
    assert sum(line.startswith("dedup") for line in executed) > 1
    journal.write_text("")
    second, _ = run(spec)
    assert journal.read_text() == ""
    assert all(s.cached and s.status == "succeeded" for s in second.stages.values())
    assert second.stages["corpus"].metrics == first.stages["corpus"].metrics


@pytest.mark.parametrize("task, item", [("encode", 2), ("dedup", 1)])
def test_worker_killed_mid_task_gives_identical_output(start_ray, local_corpus, tmp_path, task, item):
    start_ray()
    baseline, storage = run(pipeline(local_corpus.glob, f"file://{tmp_path}/clean"))

    crashes = tmp_path / "crashes"
    journal = tmp_path / "journal"
    start_ray(ORCHESTRATOR_CRASH_AT=f"{task}:{item}", ORCHESTRATOR_CRASH_ONCE_DIR=str(crashes),
              ORCHESTRATOR_TASK_JOURNAL=str(journal))
    crashed, _ = run(pipeline(local_corpus.glob, f"file://{tmp_path}/crashed"))
    assert (crashes / f"crashed-{task}-{item}").exists()  # the worker really died mid-task
    assert journal.read_text().split("\n").count(f"{task} {item}") == 2  # and Ray retried that task
    assert crashed.status == "succeeded"
    assert stage_files(storage, crashed) == stage_files(storage, baseline)
    dedup = [open_storage(r.stages["corpus"].output_uri).sub("dedup") for r in (baseline, crashed)]
    assert [(o.key, d.read_bytes(o.key)) for d in dedup[:1] for o in d.list()] == \
        [(o.key, d.read_bytes(o.key)) for d in dedup[1:] for o in d.list()]  # the dedup decisions too


def test_failed_run_resumes_only_unfinished_shards(start_ray, monkeypatch, local_corpus, tmp_path):
    journal = tmp_path / "journal"
    start_ray(ORCHESTRATOR_CRASH_AT="encode:1", ORCHESTRATOR_TASK_JOURNAL=str(journal))
    spec = pipeline(local_corpus.glob, f"file://{tmp_path}/out")
    with pytest.raises(Exception):
        run(spec, run_id="resume-me")  # shard 1 dies on every retry: the stage fails
    storage = open_storage(f"file://{tmp_path}/out")
    failed = load_record(storage, "resume-me")
    assert failed.status == "failed" and failed.stages["corpus"].status == "failed"
    assert not open_storage(failed.stages["corpus"].output_uri).exists("_COMMIT.json")

    done_before = {line for line in journal.read_text().split("\n") if line.startswith("encode")} - {"encode 1"}
    journal.write_text("")
    monkeypatch.delenv("ORCHESTRATOR_CRASH_AT")
    start_ray(ORCHESTRATOR_TASK_JOURNAL=str(journal))
    resumed, _ = run(spec, run_id="resume-me")
    assert resumed.status == "succeeded" and resumed.attempts == 2
    assert resumed.stages["corpus"].attempts == 2 and resumed.stages["tok"].cached
    rerun = set(journal.read_text().split("\n")) - {""}
    assert "encode 1" in rerun and not rerun & done_before  # committed shards were not redone
    assert not any(line.startswith("scan") for line in rerun)  # nor were the committed scans


def test_s3_faults_are_retried_and_nothing_is_lost(start_ray, s3_bucket, s3_fault_proxy, local_corpus,
                                                  tmp_path):
    start_ray()
    baseline, storage = run(pipeline(local_corpus.glob, f"file://{tmp_path}/baseline"))

    s3_fault_proxy.fail_rate = 0.2
    start_ray(AWS_ENDPOINT_URL=s3_fault_proxy.url)
    faulty, _ = run(pipeline(local_corpus.glob, f"{s3_bucket}/through-proxy"))
    assert faulty.status == "succeeded"
    assert s3_fault_proxy.num_slowdowns > 0 and s3_fault_proxy.num_resets > 0
    assert stage_files(storage, faulty) == stage_files(storage, baseline)
    assert stage_files(storage, faulty, "tok") == stage_files(storage, baseline, "tok")


def test_near_duplicates_are_dropped_across_files(start_ray, tmp_path):
    rng = np.random.default_rng(5)
    vocabulary = [f"w{i}" for i in range(3000)]
    originals = [" ".join(rng.choice(vocabulary, 120)) for _ in range(200)]

    def one_word_edit(text: str) -> str:
        words = text.split()
        words[int(rng.integers(len(words)))] = "edited"
        return " ".join(words)

    second = [one_word_edit(t) for t in originals[:30]] + originals[30:40] + [
        " ".join(rng.choice(vocabulary, 120)) for _ in range(50)]
    for name, docs in (("a", originals), ("b", second)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    start_ray()
    record, _ = run(pipeline(str(tmp_path / "*.jsonl"), f"file://{tmp_path}/out", near_dedup={}, shard_mb=0.05))
    metrics = record.stages["corpus"].metrics
    assert metrics["drops"]["duplicate"] == 10 and metrics["drops"]["near_duplicate"] == 30
    assert metrics["num_documents"] == 200 + 50
