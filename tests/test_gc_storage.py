"""`orchestrator gc` and `du` on real storage (local disk, and S3 on a moto server): a store with three
nightly runs of a small pipeline and its aliases, written with the real commit protocol, run
records, leases and alias files; what gc deletes is checked against a set computed from how the
store was built."""

from __future__ import annotations

import json
import re
import time

import pytest

from jobs.commit import bytes_entry, verify_commit, write_commit
from jobs.storage import open_storage
from jobs.storage_local import LocalStorage
from orchestrator import lease
from orchestrator.cli import main
from orchestrator.gate import alias_key
from orchestrator.gc import execute, plan_gc, read_store, run_gc
from orchestrator.records import RunRecord, StageRecord, save_record


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.local)])
def root(request, tmp_path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("s3_bucket") + "/nightly"


def _hash(label: str) -> str:
    return (label.encode().hex() * 16)[:64]


class NightlyStore:
    """tok -> corpus -> pretrain -> eval, run three times; `dirs[run]`: the stage outputs each uses."""

    def __init__(self, uri: str):
        self.storage = open_storage(uri)
        self.dirs: dict[str, set[str]] = {}

    def output(self, name: str, label: str, committed: bool = True, fields: dict | None = None,
               upstream: dict | None = None, num_bytes: int = 3000) -> str:
        d = f"stages/{name}-{_hash(label)[:8]}"
        out = self.storage.sub(d)
        files = {"data.bin": bytes([len(label)]) * num_bytes}
        for key, data in files.items():
            out.write_bytes(key, data)
        if committed:
            inputs = {"kind": name, "name": name, "version": 1, "fields": fields or {}, "upstream": upstream or {}}
            assert write_commit(out, "_COMMIT.json", {k: bytes_entry(v) for k, v in files.items()},
                                {"stage": name, "kind": name, "hash": _hash(label), "inputs": inputs, "metrics": {}})
        return d

    def checkpoint(self, d: str, step: int, committed: bool = True) -> None:
        step_dir = self.storage.sub(f"{d}/ckpt/step-{step:08d}")
        data = bytes([step]) * 5000
        step_dir.write_bytes("mp_rank_00_model_states.pt", data)
        if committed:
            assert write_commit(step_dir, "COMMIT.json", {"mp_rank_00_model_states.pt": bytes_entry(data)}, {"step": step})

    def run(self, run_id: str, started_at: float, status: str, **dirs: str) -> None:
        kinds = {"tok": "tokenizer", "corpus": "preprocess", "pretrain": "pretrain", "eval": "evaluate"}
        stages = {name: StageRecord(kind=kinds[name], status="succeeded", hash=_hash(d), output_uri=self.storage.url(d))
                  for name, d in dirs.items()}
        if "pretrain" in dirs:
            stages["pretrain"].metrics["last_checkpoint"] = self.storage.url(f"{dirs['pretrain']}/ckpt/step-00000040")
        save_record(self.storage, RunRecord(run_id=run_id, pipeline="nightly", spec_hash="0" * 64, status=status,
                                            storage=self.storage.uri, started_at=started_at, stages=stages))
        self.storage.write_bytes(f"runs/{run_id}/logs/pretrain.log", b"step 10 loss 4.2\n" * 50)
        self.dirs[run_id] = set(dirs.values())

    def alias(self, name: str, run_id: str, pretrain_dir: str) -> None:
        body = {"run_id": run_id, "pipeline": "nightly", "model_stage": "pretrain",
                "export_uri": self.storage.url(f"{pretrain_dir}/hf") + "/", "metrics": {}, "promoted_at": 0.0}
        self.storage.write_bytes(alias_key("nightly", name), json.dumps(body).encode())

    def listing(self) -> dict[str, int]:
        return {o.key: o.size for o in self.storage.list("")}


def _nightly(uri: str) -> tuple[NightlyStore, lease.Lease]:
    """n1 and n2 succeeded (n2 promoted: latest and best), n3 failed in pretrain; n2's pretrain
    output holds two checkpoints past its retention (keep_last 1, keep_every 20: 40 and 20 stay)."""
    s = NightlyStore(uri)
    tok = s.output("tok", "t1")
    train = {"keep_last": 1, "keep_every": 20, "steps": 40, "checkpoint_every": 10}
    for n, label in ((1, "a"), (2, "b")):
        corpus = s.output("corpus", f"c{label}")
        pretrain = s.output("pretrain", f"p{label}", fields=train)
        for step in (20, 40):
            s.checkpoint(pretrain, step)
        evaluate = s.output("eval", f"e{label}", fields={"models": ["pretrain", {"stage": "pretrain", "step": 20}]},
                            upstream={"models[0]": _hash(f"p{label}"), "models[1]": _hash(f"p{label}")})
        s.run(f"n{n}", 1000.0 * n, "succeeded", tok=tok, corpus=corpus, pretrain=pretrain, eval=evaluate)
    s.checkpoint(pretrain, 10)  # left by a driver killed between a commit and its retention
    s.checkpoint(pretrain, 30, committed=False)  # a torn save
    s.alias("latest", "n2", pretrain)
    s.alias("best", "n2", pretrain)
    failed = s.output("pretrain", "p3", committed=False)
    s.checkpoint(failed, 10)
    s.run("n3", 3000.0, "failed", tok=tok, corpus=corpus, pretrain=failed)  # n2's corpus: cached
    s.output("tok", "orphan")  # committed, but no record names it
    computing = s.output("pretrain", "leased", committed=False)  # another run computes it right now
    held = lease.acquire(s.storage.sub(computing), "other-run", "pretrain")
    assert isinstance(held, lease.Lease)
    abandoned = s.output("corpus", "released", committed=False)
    lease.acquire(s.storage.sub(abandoned), "gone-run", "corpus").release()
    return s, held


def _expected_deletions(s: NightlyStore) -> set[str]:
    """Prefixes gc must delete with --keep-runs 1, from how the store was built: n3 is the newest run,
    n2 the aliased one; n1 goes with what only it used, plus the unused outputs and n2's leftovers."""
    only_n1 = s.dirs["n1"] - s.dirs["n2"] - s.dirs["n3"]
    p2 = next(d for d in s.dirs["n2"] if d.startswith("stages/pretrain-"))
    return ({d + "/" for d in only_n1} | {"runs/n1/", f"stages/tok-{_hash('orphan')[:8]}/",
                                          f"stages/corpus-{_hash('released')[:8]}/",
                                          f"{p2}/ckpt/step-00000010/", f"{p2}/ckpt/step-00000030/"})


def test_gc_dry_run_deletes_nothing_then_gc_frees_exactly_the_unused_outputs(root, capsys):
    s, held = _nightly(root)
    before = s.listing()
    expected = _expected_deletions(s)
    assert len(expected) == 8  # n1's corpus, pretrain, eval and record; the orphan; the abandoned; 2 checkpoints
    gone = {k for k in before if any(k.startswith(p) for p in expected)}

    assert main(["gc", "--storage", root, "--keep-runs", "1", "--dry-run"]) == 0
    dry = capsys.readouterr().out.splitlines()
    assert s.listing() == before  # nothing deleted
    assert {_item(line)[2] for line in dry[:-1] if _item(line)[0] == "would free"} == expected
    assert dry[-1].startswith(f"would free {_human(sum(before[k] for k in gone))} (8 items)")
    leased = next(_item(line) for line in dry if f"stages/pretrain-{_hash('leased')[:8]}/" in line)
    assert leased[0] == "keep" and leased[3].startswith("leased by run other-run")

    assert main(["gc", "--storage", root, "--keep-runs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [_item(line)[1:3] for line in out[:-1]] == [_item(line)[1:3] for line in dry[:-1]]  # the same list
    assert s.listing() == {k: v for k, v in before.items() if k not in gone}
    assert out[-1].startswith(f"freed {_human(sum(before[k] for k in gone))} (8 items)")

    # What is left still works: every kept output verifies, n2's checkpoints are its retention's.
    for d in s.dirs["n2"]:
        assert not verify_commit(s.storage.sub(d), "_COMMIT.json")
    p2 = next(d for d in s.dirs["n2"] if d.startswith("stages/pretrain-"))
    steps = {k.split("/")[3] for k in s.listing() if k.startswith(f"{p2}/ckpt/")}
    assert steps == {"step-00000020", "step-00000040"}
    assert not any(verify_commit(s.storage.sub(f"{p2}/ckpt/{step}"), "COMMIT.json") for step in steps)
    assert held.still_held()  # the computing run's lease is untouched

    assert main(["gc", "--storage", root, "--keep-runs", "1"]) == 0  # nothing left to free
    assert capsys.readouterr().out.splitlines()[-1].startswith("freed 0 B (0 items)")


def test_gc_spares_what_a_run_starts_using_while_it_runs(tmp_path):
    s, _ = _nightly(f"file://{tmp_path}/store")
    plan = plan_gc(read_store(s.storage), keep_runs=1, now=time.time())
    orphan = f"stages/tok-{_hash('orphan')[:8]}"
    n1 = {"runs/n1/"} | {d + "/" for d in s.dirs["n1"] - s.dirs["n2"] - s.dirs["n3"]}
    assert {orphan + "/"} | n1 <= {i.prefix for i in plan.delete}
    s.run("n4", 4000.0, "running", tok=orphan)  # a new run planned the orphan as cached
    record = s.storage.read_bytes("runs/n1/run.json").replace(b'"status": "succeeded"', b'"status": "running"', 1)
    s.storage.write_bytes("runs/n1/run.json", record)  # and n1 was resumed
    done = execute(s.storage, plan)
    spared = {i.prefix for i in done.keep if i.reason.startswith("spared: a run started using it")}
    assert spared == {orphan + "/"} | n1 and not spared & {i.prefix for i in done.delete}
    assert not verify_commit(s.storage.sub(orphan), "_COMMIT.json") and s.storage.exists("runs/n1/run.json")


def test_an_interrupted_gc_leaves_no_output_that_reads_as_complete_and_the_next_gc_finishes(tmp_path, monkeypatch):
    s, _ = _nightly(f"file://{tmp_path}/store")
    orphan = s.storage.sub(f"stages/tok-{_hash('orphan')[:8]}")
    deleted: list[str] = []
    real_delete = LocalStorage.delete

    def delete_then_crash(self, key):  # dies right after its first delete of a data file
        real_delete(self, key)
        deleted.append(key)
        if key.endswith("data.bin"):
            raise KeyboardInterrupt

    monkeypatch.setattr(LocalStorage, "delete", delete_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_gc(s.storage, keep_runs=1, dry_run=False)
    monkeypatch.undo()
    assert deleted[0].endswith(f"stages/corpus-{_hash('ca')[:8]}/_COMMIT.json")  # the first output in the plan: commit first
    assert verify_commit(s.storage.sub(f"stages/corpus-{_hash('ca')[:8]}"), "_COMMIT.json")  # no longer reads as complete
    run_gc(s.storage, keep_runs=1, dry_run=False)
    assert not s.storage.list(f"stages/corpus-{_hash('ca')[:8]}/") and not orphan.list("")


def test_du_lists_outputs_and_pipelines_largest_first_with_a_total(root, capsys):
    s, _ = _nightly(root)
    assert main(["du", "--storage", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    p2 = next(d for d in s.dirs["n2"] if d.startswith("stages/pretrain-"))
    p2_line = next(line for line in lines if f"{p2}/" in line)
    ckpt_bytes = sum(size for key, size in s.listing().items() if key.startswith(f"{p2}/ckpt/"))
    assert f"checkpoints {_human(ckpt_bytes)}" in p2_line and p2_line.endswith("used by: nightly")
    assert next(line for line in lines if f"tok-{_hash('orphan')[:8]}" in line).endswith("used by: no run record")
    outputs = lines[1:lines.index(next(line for line in lines if line.startswith("pipelines")))]
    assert outputs == sorted(outputs, key=lambda line: -_bytes(line.split()[0], line.split()[1]))
    assert any(line.split()[2:] == ["nightly", "(3", "runs)"] for line in lines)
    before = s.listing()
    assert lines[-1] == f"total {_human(sum(before.values()))} in {len(before)} objects"


def test_bad_arguments_exit_2(tmp_path, capsys):
    storage = f"file://{tmp_path}/store"
    for n in ("0", "-1"):
        assert main(["gc", "--storage", storage, "--keep-runs", n]) == 2
        assert f"--keep-runs {n}: keep at least 1 run per pipeline" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: not a number
        main(["gc", "--keep-runs", "three"])
    assert exit_info.value.code == 2
    assert main(["du", "--storage", "ftp://host/x"]) == 2
    assert "unsupported storage URI" in capsys.readouterr().err


def _item(line: str) -> tuple[str, str, str, str]:
    """(verb, kind, prefix, reason) of one of gc's item lines."""
    verb, kind, prefix, reason = re.fullmatch(r"(would free|freed|keep) +\S+ \S+  (stage output|checkpoint|run) +(\S+)  (.*)",
                                              line).groups()
    return verb, kind, prefix, reason


def _human(num_bytes: int) -> str:
    from orchestrator.gc import human_bytes
    return human_bytes(num_bytes)


def _bytes(number: str, unit: str) -> float:
    return float(number) * 1024 ** ["B", "KiB", "MiB", "GiB"].index(unit)
