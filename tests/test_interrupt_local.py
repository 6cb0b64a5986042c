"""Ctrl-C in `orchestrator run`: a real driver (its embedded Ray in its own session) interrupted
mid-training stops within seconds with exit code 130, its record and the running stage say
`stopped`, no process of its Ray is left, and the same run id resumes it."""

from __future__ import annotations

import signal
import time

import pytest
from drivers import Driver, drivers, pipeline, until

from jobs.checkpoint import committed_steps
from jobs.storage import open_storage

pytestmark = pytest.mark.local


def test_ctrl_c_mid_training_stops_the_run_and_its_ray_within_seconds(tmp_path):
    storage = f"file://{tmp_path}/store"
    spec = pipeline(tmp_path, steps=400)
    with drivers() as started:
        driver = Driver(spec, "ctrl-c", storage, tmp_path)
        started.append(driver)
        ckpt = open_storage(driver.running("pretrain", 300)).sub("ckpt")
        until(lambda: committed_steps(ckpt)[0], "the first checkpoint", 300, [driver])
        assert len(driver.processes()) > 3  # the driver and its Ray: GCS, raylet, workers

        driver.proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        assert driver.wait(15) == 130, driver.output()[-3000:]
        stopped_in = time.monotonic() - t0
        # Ray's workers end once they notice that their raylet is gone: within the same 15 s.
        deadline = t0 + 15
        while driver.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [" ".join(p.cmdline())[:120] for p in driver.processes()]
        assert left == [], f"Ray processes of the run still there {time.monotonic() - t0:.1f}s after Ctrl-C"
    record = driver.record()
    assert record.status == "stopped" and record.stages["pretrain"].status == "stopped", record
    assert record.stages["pretrain"].error == "interrupted"
    assert stopped_in < 15
    assert "--run-id ctrl-c" in driver.output()  # how to resume it
    assert committed_steps(ckpt)[0][0] < 400  # it did stop mid-training
