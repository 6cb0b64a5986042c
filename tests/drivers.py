"""`orchestrator run` drivers as real subprocesses, each in a session of its own (its embedded Ray
included), for the tests that start, interrupt and kill them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import yaml

from jobs.storage import open_storage
from orchestrator.records import load_record

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


def interruptible() -> None:
    """A child's SIGINT as a terminal's foreground job has it (`preexec_fn`). A process started
    with SIGINT ignored keeps ignoring it (Python then installs no KeyboardInterrupt handler), and
    something earlier in a full pytest run leaves pytest's own SIGINT ignored: Ctrl-C tests would
    then time out for a reason that is not the driver's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Driver:
    """`orchestrator run` in a session of its own: stopping it takes its embedded Ray too."""

    def __init__(self, spec: str, run_id: str, storage: str, tmp_path):
        self.run_id, self.storage = run_id, storage
        self.out_path = tmp_path / f"{run_id}.out"
        env = {**os.environ, "ORCHESTRATOR_LOG_DIR": str(tmp_path / "logs"), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", spec, "--run-id", run_id, "--storage", storage],
            cwd=REPO, env=env, stdout=open(self.out_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=interruptible)

    def output(self) -> str:
        return self.out_path.read_text()

    def record(self):
        return load_record(open_storage(self.storage), self.run_id)

    def running(self, stage: str, timeout_s: float) -> str:
        """Wait until the record shows `stage` running; its output URI."""
        def stage_running():
            record = self.record()
            return record and stage in record.stages and record.stages[stage].status == "running"
        until(stage_running, f"run {self.run_id}'s {stage} to start", timeout_s, [self])
        return self.record().stages[stage].output_uri

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run {self.run_id} did not end in {timeout_s}s:\n{self.output()[-3000:]}") from None

    def processes(self) -> list[psutil.Process]:
        """Every live process of the driver's session: the driver, its Ray, Ray's workers."""
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found

    def kill(self) -> None:
        """SIGKILL the driver and everything of its session (its Ray), as a machine that vanishes."""
        for _ in range(2):
            for p in self.processes():
                with contextlib.suppress(psutil.Error):
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
