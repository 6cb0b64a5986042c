"""gc's policy (orchestrator.gc.plan_gc) on snapshots built in memory: which runs are kept, which
stage outputs and checkpoints go, and why. No storage: tests/test_gc_storage.py runs it on disk and S3."""

from __future__ import annotations

import pytest

from jobs.storage import ObjectInfo
from orchestrator.errors import UserError
from orchestrator.gc import Store, check_keep_runs, format_plan, human_bytes, kept_runs, plan_gc, stage_dir
from orchestrator.lease import LeaseRecord
from orchestrator.records import RunRecord, StageRecord

NOW = 1_800_000_000.0
ROOT = "s3://bucket/prefix"


def _record(run_id: str, started_at: float, status: str = "succeeded", pipeline: str = "nightly",
            **stage_dirs: str) -> RunRecord:
    """A run whose stage `name` wrote `stages/<dir>`; e.g. tok="tok-aaaaaaaa"."""
    stages = {name: StageRecord(kind="evaluate" if name == "eval" else "pretrain" if name == "pretrain" else "tokenizer",
                                status="succeeded", hash=d.split("-")[-1] * 8, output_uri=f"{ROOT}/stages/{d}")
              for name, d in stage_dirs.items()}
    return RunRecord(run_id=run_id, pipeline=pipeline, spec_hash="0" * 64, storage=ROOT, status=status,
                     started_at=started_at, finished_at=None if status == "running" else started_at + 60, stages=stages)


def _objects(*keys: str, size: int = 100) -> list[ObjectInfo]:
    return [ObjectInfo(k, size, "v") for k in keys]


def _output(d: str, committed: bool = True) -> list[ObjectInfo]:
    return _objects(f"stages/{d}/data.bin", *([f"stages/{d}/_COMMIT.json"] if committed else []))


def _lease(run_id: str, heartbeat_at: float, released: bool = False) -> LeaseRecord:
    return LeaseRecord(generation=1, run_id=run_id, host="h", pid=1, stage="x", acquired_at=heartbeat_at,
                       heartbeat_at=heartbeat_at, timeout_s=60.0, released=released, token="t")


def _plan(objects, records=(), aliases=None, commits=None, leases=None, keep_runs=1):
    plan = plan_gc(Store(list(objects), list(records), aliases or {}, commits or {}, leases or {}), keep_runs, NOW)
    return {i.prefix: i for i in plan.delete}, {i.prefix: i for i in plan.keep}


# --- kept runs -------------------------------------------------------------------------------

def test_the_newest_runs_of_each_pipeline_are_kept_each_pipeline_on_its_own():
    records = [_record(f"a{i}", i) for i in range(4)] + [_record(f"b{i}", 10 + i, pipeline="other") for i in range(3)]
    kept = kept_runs(records, {}, keep_runs=2)
    assert set(kept) == {"a3", "a2", "b2", "b1"}
    assert kept["a3"] == "one of the 2 newest runs of nightly"


def test_a_running_run_an_aliased_run_and_the_newest_succeeded_one_are_kept_however_old():
    records = [_record("old-running", 1, "running"), _record("aliased", 2), _record("newest-ok", 3),
               _record("failed-1", 4, "failed"), _record("failed-2", 5, "failed"), _record("older-ok", 0)]
    aliases = {"aliases/nightly/best.json": {"run_id": "aliased"}, "aliases/nightly/latest.json": {"run_id": "aliased"}}
    kept = kept_runs(records, aliases, keep_runs=2)
    assert kept == {"old-running": "running", "aliased": "alias nightly/best, nightly/latest", "failed-2": kept["failed-2"],
                    "failed-1": kept["failed-1"],
                    "newest-ok": "the newest succeeded run of nightly, which `init: previous` continues from"}


def test_keep_runs_below_one_is_bad_input():
    for n in (0, -3):
        with pytest.raises(UserError, match=rf"--keep-runs {n}: keep at least 1"):
            check_keep_runs(n)


# --- stage outputs ---------------------------------------------------------------------------

def test_an_output_goes_only_when_no_kept_run_uses_it_and_its_commit_goes_first():
    records = [_record("r1", 1, tok="tok-aaaaaaaa", pretrain="pretrain-11111111"),
               _record("r2", 2, tok="tok-aaaaaaaa", pretrain="pretrain-22222222")]
    objects = (_output("tok-aaaaaaaa") + _output("pretrain-11111111") + _output("pretrain-22222222")
               + _output("orphan-33333333", committed=False) + _objects("runs/r1/run.json", "runs/r1/logs/tok.log"))
    delete, keep = _plan(objects, records)
    assert set(delete) == {"stages/pretrain-11111111/", "stages/orphan-33333333/", "runs/r1/"}
    assert delete["stages/pretrain-11111111/"].first == "stages/pretrain-11111111/_COMMIT.json"
    assert "last used by run r1, which gc drops" in delete["stages/pretrain-11111111/"].reason
    assert delete["stages/orphan-33333333/"].first is None and "never committed" in delete["stages/orphan-33333333/"].reason
    assert delete["runs/r1/"].first == "runs/r1/run.json" and delete["runs/r1/"].num_bytes == 200
    assert keep["stages/tok-aaaaaaaa/"].reason == "used by run r2 (the newest run of nightly)"
    assert set(keep) == {"stages/tok-aaaaaaaa/", "stages/pretrain-22222222/", "runs/r2/"}


def test_an_uncommitted_output_of_a_kept_failed_run_is_kept_for_its_resume():
    records = [_record("r1", 1, "failed", pretrain="pretrain-11111111")]
    delete, keep = _plan(_output("pretrain-11111111", committed=False), records)
    assert not delete and "stages/pretrain-11111111/" in keep


def test_a_live_lease_keeps_an_output_no_record_names_and_so_does_a_stale_one_until_broken():
    objects = _output("live-11111111", False) + _output("stale-22222222", False) + _output("released-33333333", False)
    leases = {"stages/live-11111111": _lease("run-a", NOW - 5), "stages/stale-22222222": _lease("run-b", NOW - 600),
              "stages/released-33333333": _lease("run-c", NOW - 5, released=True)}
    delete, keep = _plan(objects, leases=leases)
    assert keep["stages/live-11111111/"].reason == "leased by run run-a, heartbeat 5 s ago: being computed"
    assert "unreleased lease of run run-b (no heartbeat for 600 s" in keep["stages/stale-22222222/"].reason
    assert "orchestrator lease break <storage>/stages/stale-22222222" in keep["stages/stale-22222222/"].reason
    assert set(delete) == {"stages/released-33333333/"}


def test_an_alias_keeps_its_export_even_when_its_run_record_is_gone():
    aliases = {"aliases/nightly/latest.json": {"run_id": "gone", "export_uri": f"{ROOT}/stages/sft-44444444/hf/"}}
    delete, keep = _plan(_output("sft-44444444") + _output("tok-55555555"), aliases=aliases)
    assert keep["stages/sft-44444444/"].reason == "alias nightly/latest's export"
    assert set(delete) == {"stages/tok-55555555/"}


def test_stage_dir_reads_uris_keys_and_checkpoint_uris():
    assert stage_dir("file:///data/stages/x/stages/pretrain-1a2b3c4d/ckpt/step-00000010") == "stages/pretrain-1a2b3c4d"
    assert stage_dir("s3://b/p/stages/sft-1a2b3c4d/hf/") == "stages/sft-1a2b3c4d"
    assert stage_dir("stages/tok-1a2b3c4d") == "stages/tok-1a2b3c4d"
    assert stage_dir("s3://b/p/runs/r1/run.json") is None


# --- checkpoints -----------------------------------------------------------------------------

P = "stages/pretrain-11111111"


def _checkpoint(step: int, committed: bool = True, size: int = 100) -> tuple[list[ObjectInfo], dict]:
    key = f"{P}/ckpt/step-{step:08d}/"
    objects = [ObjectInfo(key + "model.pt", size, "v")] + ([ObjectInfo(key + "COMMIT.json", 10, "v")] if committed else [])
    return objects, ({key + "COMMIT.json": {"files": {"model.pt": {"size": 100, "sha256": "x"}}}} if committed else {})


def _training(steps: dict[int, bool], keep_last: int, keep_every: int, sizes: dict[int, int] | None = None):
    objects, commits = _output("pretrain-11111111"), {f"{P}/_COMMIT.json": {
        "inputs": {"fields": {"keep_last": keep_last, "keep_every": keep_every}}, "files": {}}}
    for step, committed in steps.items():
        more, commit = _checkpoint(step, committed, (sizes or {}).get(step, 100))
        objects += more
        commits |= commit
    return objects, commits


def test_checkpoints_beyond_the_stages_own_retention_go_commit_first():
    objects, commits = _training({10: True, 20: True, 30: True, 40: True, 50: True}, keep_last=2, keep_every=20)
    records = [_record("r1", 1, pretrain="pretrain-11111111")]
    delete, keep = _plan(objects, records, commits=commits)
    assert set(delete) == {f"{P}/ckpt/step-00000010/", f"{P}/ckpt/step-00000030/"}
    assert delete[f"{P}/ckpt/step-00000010/"].first == f"{P}/ckpt/step-00000010/COMMIT.json"
    assert delete[f"{P}/ckpt/step-00000010/"].reason == "beyond retention (keep_last 2, keep_every 20)"
    assert keep[P + "/"].num_bytes == sum(o.size for o in objects) - 2 * 110  # what stays


def test_a_torn_checkpoint_of_a_committed_stage_goes_and_never_takes_a_retention_slot():
    # step 40's commit lists 100 bytes but 7 are there: it does not verify, so 30 is the one kept
    objects, commits = _training({20: True, 30: True, 40: True, 50: False}, keep_last=1, keep_every=0, sizes={40: 7})
    delete, keep = _plan(objects, [_record("r1", 1, pretrain="pretrain-11111111")], commits=commits)
    assert set(delete) == {f"{P}/ckpt/step-000000{s}/" for s in (20, 40, 50)}
    assert "does not verify" in delete[f"{P}/ckpt/step-00000050/"].reason
    assert delete[f"{P}/ckpt/step-00000050/"].first is None


def test_a_kept_runs_last_checkpoint_and_an_evaluated_step_are_never_deleted():
    objects, commits = _training({10: True, 20: True, 30: True}, keep_last=1, keep_every=0)
    records = [_record("r1", 1, pretrain="pretrain-11111111", eval="eval-22222222")]
    records[0].stages["pretrain"].metrics["last_checkpoint"] = f"{ROOT}/{P}/ckpt/step-00000020"
    objects += _output("eval-22222222")
    commits["stages/eval-22222222/_COMMIT.json"] = {"files": {}, "inputs": {
        "fields": {"models": ["pretrain", {"stage": "pretrain", "step": 10}]},
        "upstream": {"models[0]": "11111111" * 8, "models[1]": "11111111" * 8}}}
    delete, _ = _plan(objects, records, commits=commits)
    assert not delete  # 30: the newest; 20: last_checkpoint; 10: evaluated


def test_an_uncommitted_training_output_and_a_stage_without_retention_keep_every_checkpoint():
    objects, commits = _training({10: True, 20: True, 30: False}, keep_last=1, keep_every=0)
    objects = [o for o in objects if o.key != f"{P}/_COMMIT.json"]  # still training, or failed: a resume needs them
    delete, _ = _plan(objects, [_record("r1", 1, "failed", pretrain="pretrain-11111111")], commits=commits)
    assert not delete
    objects, commits = _training({10: True, 20: True}, keep_last=1, keep_every=0)
    commits[f"{P}/_COMMIT.json"]["inputs"]["fields"] = {}  # no retention recorded: nothing to apply
    delete, _ = _plan(objects, [_record("r1", 1, pretrain="pretrain-11111111")], commits=commits)
    assert not delete


# --- output ----------------------------------------------------------------------------------

def test_human_sizes_and_the_plans_lines():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
    records = [_record("r1", 1, tok="tok-aaaaaaaa"), _record("r2", 2, tok="tok-bbbbbbbb")]
    plan = plan_gc(Store(_output("tok-aaaaaaaa") + _output("tok-bbbbbbbb"), records, {}, {}, {}), 1, NOW)
    lines = format_plan(plan, dry_run=True)
    assert lines[0].startswith("would free      200 B  stage output stages/tok-aaaaaaaa/  no kept run")
    assert any(line.startswith("keep            200 B  stage output stages/tok-bbbbbbbb/  used by run r2") for line in lines)
    assert lines[-1] == "would free 200 B (2 items), kept 200 B (2 items); a dry run: nothing was deleted"
