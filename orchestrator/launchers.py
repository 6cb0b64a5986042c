"""How the scheduler starts a tick's run: on a Ray cluster as a Ray job, or on this machine as an
`orchestrator run` process. Both are keyed by run id and safe to call again for the same run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from jobs.storage import Storage
from orchestrator import submit
from orchestrator.records import load_record
from orchestrator.spec import PipelineSpec

_STATES = {"PENDING": "active", "RUNNING": "active", "SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "stopped"}
_START_GRACE_S = 120.0  # a local driver that wrote no record this long after its launch never started


class RayJobLauncher:
    """Runs as Ray jobs whose submission id is the run id: Ray refuses a second job of that id."""

    def __init__(self, address: str, spec_path: str, spec: PipelineSpec, storage_uri: str):
        self.address, self.client = address, submit.open_client(address)
        self.spec_path, self.spec, self.storage_uri = spec_path, spec, storage_uri
        self.files = submit.files_to_ship(spec)

    def launch(self, run_id: str) -> bool:
        started, _ = submit.submit(self.client, self.spec_path, self.spec, self.files, run_id, self.storage_uri)
        return started

    def state(self, run_id: str):
        job = submit.find_job(self.client, run_id)
        return None if job is None else _STATES[str(job.status)]

    def stop(self, run_id: str) -> None:
        job = submit.find_job(self.client, run_id)
        if job is not None:
            submit.stop_job(self.client, job)

    def follow_hint(self, run_id: str) -> str:
        return f"a Ray job; follow it with `orchestrator logs -f {run_id} --address {self.address}`"


class LocalLauncher:
    """Runs as `orchestrator run SPEC --run-id ID` processes on this machine. A create-only marker
    in storage (`schedules/<pipeline>/launches/<run_id>.json`) lets one scheduler start each."""

    def __init__(self, spec_path: str, spec: PipelineSpec, storage: Storage, log_dir: str):
        self.spec_path, self.spec, self.storage, self.log_dir = spec_path, spec, storage, log_dir
        self.children: dict[str, subprocess.Popen] = {}

    def _marker(self, run_id: str) -> str:
        return f"schedules/{self.spec.name}/launches/{run_id}.json"

    def _output(self, run_id: str) -> str:
        return os.path.join(self.log_dir, f"{run_id}.out")

    def follow_hint(self, run_id: str) -> str:
        return f"its driver's output goes to {self._output(run_id)}"

    def launch(self, run_id: str) -> bool:
        marker = {"host": socket.gethostname(), "launched_at": time.time()}
        if not self.storage.create_bytes(self._marker(run_id), json.dumps(marker).encode()):
            return False
        os.makedirs(self.log_dir, exist_ok=True)
        with open(self._output(run_id), "ab") as out:
            child = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", self.spec_path, "--run-id", run_id,
                                      "--storage", self.storage.uri], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.children[run_id] = child
        self.storage.write_bytes(self._marker(run_id), json.dumps({**marker, "pid": child.pid}).encode())
        return True

    def state(self, run_id: str):
        record = load_record(self.storage, run_id)
        if record is not None and record.status in ("succeeded", "failed", "stopped"):
            return record.status
        try:
            marker = json.loads(self.storage.read_bytes(self._marker(run_id)))
        except FileNotFoundError:
            return "active" if record is not None else None  # started by hand with this run id
        if self._driver_gone(marker) or (record is None and time.time() - marker["launched_at"] > _START_GRACE_S):
            return "failed"  # killed before it could say so in its record
        return "active"

    def _driver_gone(self, marker: dict) -> bool:
        if marker.get("host") != socket.gethostname() or "pid" not in marker:
            return False  # another machine's: trust its record
        ours = next((c for c in self.children.values() if c.pid == marker["pid"]), None)
        if ours is not None:
            return ours.poll() is not None  # (and reaps it: an exited child lingers as a zombie)
        return not psutil.pid_exists(marker["pid"])

    def stop(self, run_id: str) -> None:
        """SIGTERM: the driver marks its record stopped and exits."""
        try:
            marker = json.loads(self.storage.read_bytes(self._marker(run_id)))
        except FileNotFoundError:
            return
        if marker.get("host") == socket.gethostname() and "pid" in marker and not self._driver_gone(marker):
            os.kill(marker["pid"], signal.SIGTERM)
            if run_id in self.children:
                self.children[run_id].wait()

    def wait(self) -> bool:
        """Wait for the runs this launcher started; whether all succeeded."""
        return all(child.wait() == 0 for child in self.children.values())
