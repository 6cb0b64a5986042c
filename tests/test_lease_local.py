"""Stage leases between real `orchestrator run` processes (each with its embedded Ray) on one
storage, on disk and on S3 (a moto server on 127.0.0.1): each stage output is computed by one run
and used by the other as a cache hit; a holder killed with SIGKILL mid-training is taken over after
its heartbeat timeout and the stage resumes from its last commit; a run waiting on a lease stops on
Ctrl-C.

What a test checks comes from storage, not from the runs' own words: the lease generations under
each stage dir (one per run that computed it), the committed checkpoints, the records.
"""

from __future__ import annotations

import signal
import time

import pytest
from drivers import Driver, drivers, pipeline, until

from jobs.checkpoint import committed_steps
from jobs.storage import open_storage
from orchestrator.lease import LEASE_DIR

pytestmark = pytest.mark.local


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
        pretrain_uri = holder.running("pretrain", 300)
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
