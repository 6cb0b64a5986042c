"""Stage leases between real `orchestrator run` processes (each with its embedded Ray) on one
storage, on disk and on S3 (a moto server on 127.0.0.1): each stage output is computed by one run
and used by the other as a cache hit; a holder killed with SIGKILL mid-training is taken over after
its heartbeat timeout and the stage resumes from its last commit; a run waiting on a lease stops on
Ctrl-C.

What a test checks comes from storage, not from the runs' own words: the lease generations under
each stage dir (one per run that computed it), the committed checkpoints, the records.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from jobs.checkpoint import committed_steps
from jobs.storage import open_storage
from orchestrator.lease import LEASE_DIR
from orchestrator.records import load_record

pytestmark = pytest.mark.local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = {"paths": [os.path.join(REPO, "examples", "data", "*.jsonl")], "format": "jsonl"}


def pipeline(tmp_path, **pretrain) -> str:
    with open(os.path.join(REPO, "examples", "demo.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["stages"] = {name: raw["stages"][name] for name in ("tok", "corpus", "pretrain")}
    raw["stages"]["tok"]["source"] = raw["stages"]["corpus"]["source"] = SOURCE
    raw["stages"]["pretrain"].update({"steps": 20, "checkpoint_every": 10, "log_every": 5, "num_workers": 1, **pretrain})
    raw["lease_timeout_s"] = 10
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


class Driver:
    """`orchestrator run` in a session of its own: stopping it takes its embedded Ray too."""

    def __init__(self, spec: str, run_id: str, storage: str, tmp_path):
        self.run_id, self.storage = run_id, storage
        self.out_path = tmp_path / f"{run_id}.out"
        env = {**os.environ, "ORCHESTRATOR_LOG_DIR": str(tmp_path / "logs"), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", spec, "--run-id", run_id, "--storage", storage],
            cwd=REPO, env=env, stdout=open(self.out_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.out_path.read_text()

    def record(self):
        return load_record(open_storage(self.storage), self.run_id)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run {self.run_id} did not end in {timeout_s}s:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL the driver and everything of its session (its Ray), as a machine that vanishes."""
        for _ in range(2):
            for p in psutil.process_iter():
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getsid(p.pid) == self.proc.pid:
                        p.kill()
        self.proc.wait()


@contextlib.contextmanager
def drivers():
    started: list[Driver] = []
    try:
        yield started
    finally:
        for d in started:
            d.kill()


def until(predicate, what: str, timeout_s: float, drivers_alive=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for d in drivers_alive:
            assert d.proc.poll() is None, f"run {d.run_id} ended early:\n{d.output()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def lease_generations(stage_uri: str) -> list[str]:
    return sorted(o.key for o in open_storage(stage_uri).list(f"{LEASE_DIR}/"))


@pytest.mark.parametrize("where", ["file", "s3"])
def test_two_runs_started_together_compute_each_stage_once(where, tmp_path, request):
    storage = f"file://{tmp_path}/store" if where == "file" else f"{request.getfixturevalue('s3_bucket')}/two"
    spec = pipeline(tmp_path)
    with drivers() as started:
        started += [Driver(spec, "alice", storage, tmp_path), Driver(spec, "bob", storage, tmp_path)]
        codes = [d.wait(400) for d in started]
        assert codes == [0, 0], "\n".join(d.output()[-3000:] for d in started)
        a, b = (d.record() for d in started)
    assert a.status == b.status == "succeeded"
    for name in ("tok", "corpus", "pretrain"):
        sa, sb = a.stages[name], b.stages[name]
        assert sa.output_uri == sb.output_uri and sa.metrics == sb.metrics
        # One run computed it (one lease generation in the stage dir), the other used its commit.
        assert lease_generations(sa.output_uri) == [f"{LEASE_DIR}/00000001.json"], name
        computed, reused = (a, b) if not sa.cached else (b, a)
        assert not computed.stages[name].cached and reused.stages[name].cached, name
        assert reused.stages[name].reason == f"cached: computed by run {computed.run_id}", name
        assert reused.stages[name].attempts == 0
    assert committed_steps(open_storage(a.stages["pretrain"].output_uri).sub("ckpt"))[0] == [20, 10]  # newest first


def test_a_killed_holder_is_taken_over_and_a_waiter_stops_on_ctrl_c(s3_bucket, tmp_path):
    storage = f"{s3_bucket}/takeover"
    spec = pipeline(tmp_path, steps=40)
    with drivers() as started:
        holder = Driver(spec, "holder", storage, tmp_path)
        started.append(holder)
        until(lambda: (r := holder.record()) and r.stages.get("pretrain") and r.stages["pretrain"].status == "running",
              "the holder's pretraining to start", 300, [holder])
        pretrain_uri = holder.record().stages["pretrain"].output_uri
        taker, quitter = Driver(spec, "taker", storage, tmp_path), Driver(spec, "quitter", storage, tmp_path)
        started += [taker, quitter]
        for d in (taker, quitter):
            until(lambda: "waiting: run holder" in d.output(), f"{d.run_id} to wait on the lease", 120, [d])
            assert "orchestrator lease break " + pretrain_uri in d.output()
        ckpt = open_storage(pretrain_uri).sub("ckpt")
        until(lambda: committed_steps(ckpt)[0], "the holder's first checkpoint", 300, [holder])

        # Ctrl-C on a waiter: it stops at once, and says so in its record.
        quitter.proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        assert quitter.wait(15) == 130, quitter.output()[-3000:]
        assert time.monotonic() - t0 < 15
        record = quitter.record()
        assert record.status == "stopped" and record.stages["pretrain"].status == "stopped"

        holder.kill()
        killed_at = time.monotonic()
        until(lambda: "took over from run holder (no heartbeat for" in taker.output(), "the takeover", 120, [taker])
        # Not before the timeout the holder stated (10 s), less the one beat it may have sent last.
        assert time.monotonic() - killed_at >= 10 * 5 / 6 - 1
        assert taker.wait(400) == 0, taker.output()[-3000:]
    stage = taker.record().stages["pretrain"]
    assert not stage.cached and stage.status == "succeeded"
    assert stage.metrics["resumed_from"] >= 10  # from the holder's commit, not from step 0
    assert committed_steps(ckpt)[0][0] == 40  # newest first
    assert len(lease_generations(pretrain_uri)) == 2  # the holder's and the taker's
