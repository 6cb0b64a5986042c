"""Node loss: a Ray cluster of a head and two worker nodes, all on this machine; one worker node
vanishes mid-training (SIGKILL to its whole process group, as a spot node is reclaimed) and a
replacement joins a few seconds later (as an autoscaler would start one). The pretrain stage must
restart its worker group, resume from its last committed checkpoint and finish.

The head has no CPU, so the training workers (one CPU each) run one per worker node. The driver
is the CLI in a subprocess, as a user runs it against a cluster (`orchestrator run --address`):
Ray reads its authentication settings once per process, and this cluster's token must be the one
it sees.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from jobs.checkpoint import committed_steps
from jobs.storage import open_storage
from orchestrator.records import load_record

pytestmark = pytest.mark.local

BIN = os.path.dirname(sys.executable)
DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "*.jsonl")
STEPS, EVERY = 40, 5
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240

# GCS declares a node dead after ~3 missed 1 s health checks instead of Ray's default ~30 s.
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One `ray start --block` in its own process group (session), logging to `log_path`."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: str):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def vanish(self) -> None:
        """SIGKILL everything the node runs at once (raylet, object store, agents, workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """Stop our `ray start --block` (it stops what it started), then kill by pid whatever of
        its process tree or process group is still there. Never `ray stop`: it would stop every
        Ray on the machine."""
        tree = []
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def tail(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-3000:]


class Cluster:
    """A head with no CPU and worker nodes with one CPU each, on 127.0.0.1, token auth on."""

    def __init__(self, root: str):
        self.root = root
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PATH=f"{BIN}:{env.get('PATH', '')}",
                   TOKENIZERS_PARALLELISM="false", ORCHESTRATOR_LOG_DIR=os.path.join(root, "driver-logs"))
        self.env = env
        self.address = f"127.0.0.1:{free_port()}"
        self.nodes: list[Node] = []
        self.workers: list[Node] = []
        self.head = self._start("head", ["--head", f"--port={self.address.split(':')[1]}", "--num-cpus=0",
                                         "--include-dashboard=false", f"--ray-client-server-port={free_port()}"],
                                {**env, **FAST_NODE_DEATH})

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Node:
        # Each node its own temp dir (short: socket paths must fit in 107 bytes) and its own ports.
        cmd = [os.path.join(BIN, "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args,
               f"--temp-dir={self.root}/{name}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"]
        node = Node(cmd, env, os.path.join(self.root, f"{name}.log"))
        self.nodes.append(node)
        return node

    def add_worker(self) -> Node:
        node = self._start(f"w{len(self.nodes)}", [f"--address={self.address}", "--num-cpus=1"], self.env)
        self.workers.append(node)
        return node

    def alive_nodes(self) -> int:
        """Alive nodes as the GCS sees them, asked from a fresh process (`ray list nodes` needs a
        dashboard; this does not)."""
        script = ("import ray, sys; from ray._raylet import GcsClient; "
                  "print(sum(1 for n in GcsClient(address=sys.argv[1]).get_all_node_info().values() "
                  "if n.state == 0))")
        result = subprocess.run([sys.executable, "-c", script, self.address], env=self.env,
                                capture_output=True, text=True, timeout=60)
        return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else -1

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def wait_for(predicate, what: str, timeout_s: float, poll_s: float = 0.5, alive=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if alive is not None:
            alive()
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def pipeline(storage: str) -> dict:
    source = {"paths": [os.path.abspath(DATA)]}
    return {"name": "node-loss", "storage": storage, "stages": {
        "tok": {"kind": "tokenizer", "source": source, "vocab_size": 1024, "sample_mb": 0.5},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": 64, "shard_mb": 1},
        "pretrain": {"kind": "pretrain", "data": "corpus", "steps": STEPS, "checkpoint_every": EVERY,
                     "log_every": EVERY, "micro_batch": 4, "lr": 0.003, "warmup_steps": 2, "zero_stage": 2,
                     "num_workers": 2, "max_failures": 3,
                     "model": {"preset": "tiny", "max_position_embeddings": 64}},
    }}


@pytest.fixture
def cluster():
    root = tempfile.mkdtemp(prefix="nl-", dir="/tmp")
    c = Cluster(root)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_worker_node_lost_mid_training_resumes_from_the_last_commit(cluster, tmp_path):
    t0 = time.monotonic()
    for _ in range(2):
        cluster.add_worker()
    wait_for(lambda: cluster.alive_nodes() == 3, "the head and two worker nodes", START_TIMEOUT_S)
    print(f"cluster up after {time.monotonic() - t0:.1f}s")

    store = f"file://{tmp_path}/store"
    spec_path = tmp_path / "node-loss.json"
    spec_path.write_text(json.dumps(pipeline(store)))
    run_id = "node-loss-1"
    driver_log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([os.path.join(BIN, "orchestrator"), "run", str(spec_path), "--run-id", run_id,
                               "--address", cluster.address], env=cluster.env, stdout=driver_log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    storage = open_storage(store)
    try:
        def driver_alive():
            assert driver.poll() is None, f"the driver exited with {driver.returncode}:\n{(tmp_path / 'driver.log').read_text()[-5000:]}"

        def first_commit():
            record = load_record(storage, run_id)
            if record is None or "pretrain" not in record.stages or record.stages["pretrain"].status != "running":
                return None
            steps, _ = committed_steps(open_storage(record.stages["pretrain"].output_uri).sub("ckpt"))
            return steps[0] if steps else None

        committed = wait_for(first_commit, "a committed pretrain checkpoint", RUN_TIMEOUT_S, alive=driver_alive)
        print(f"step {committed} committed after {time.monotonic() - t0:.1f}s; killing a worker node")
        cluster.workers[0].vanish()
        killed_at = time.monotonic()
        wait_for(lambda: cluster.alive_nodes() == 2, "the GCS to declare the node dead", 60)
        print(f"node declared dead {time.monotonic() - killed_at:.1f}s after the kill")
        time.sleep(3)
        cluster.add_worker()  # the replacement
        print(f"replacement started {time.monotonic() - killed_at:.1f}s after the kill")

        driver.wait(RUN_TIMEOUT_S)
        print(f"driver exited {driver.returncode} after {time.monotonic() - t0:.1f}s")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        driver_log.close()
    output = (tmp_path / "driver.log").read_text()
    print(output[-6000:])

    record = load_record(storage, run_id)
    assert driver.returncode == 0, output[-5000:]
    assert record.status == "succeeded"
    stage = record.stages["pretrain"]
    assert stage.status == "succeeded"
    assert stage.attempts >= 2 and stage.metrics["restarts"] >= 1
    assert stage.metrics["resumed_from"] is not None and stage.metrics["resumed_from"] >= committed
    steps, _ = committed_steps(open_storage(stage.output_uri).sub("ckpt"))
    assert steps[0] == STEPS
    losses = [loss for _, loss in stage.metrics["loss_history"]]
    assert losses and all(math.isfinite(loss) for loss in losses)
