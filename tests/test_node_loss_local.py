"""Node loss: a Ray cluster of a head and two worker nodes, all on this machine; one worker node
vanishes mid-training (SIGKILL to every process of it, as when a spot node is reclaimed) and a
replacement joins a few seconds later (as an autoscaler would start one). The pretrain stage must
restart its worker group, resume from its last committed checkpoint and finish.

The head has no CPU, so the two training workers (one CPU each) run one per worker node, and the
restarted group can only start once the replacement is up. The driver is the CLI in a subprocess,
as a user runs it against a cluster (`orchestrator run --address`): Ray reads its authentication
settings once per process (an embedded `ray.init` earlier in this pytest process would have fixed
them), and this cluster's token must be the one the driver sees.

Every node is a `ray start --block --node-ip-address=127.0.0.1` (Ray advertises the machine's
interface address instead: `services.resolve_ip_for_localhost`) in a session of its own, with its
own temp dir and ports; teardown stops only those sessions, by pid (never `ray stop`: it would stop
every Ray on the machine).
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
DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "examples", "data", "*.jsonl"))
# 40 steps train in ~4 s here once the workers are up: 80 leave a window of several seconds to
# lose the node in after the first commit.
STEPS, EVERY = 80, 5
START_TIMEOUT_S = 90
RUN_TIMEOUT_S = 240

# Every node: on SIGTERM (teardown), stop at once instead of draining for up to 30 s (the head
# otherwise waits out all 30: a finished Ray Train run leaves it busy).
NODE_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# The GCS declares a node dead after 3 missed 1 s health checks instead of Ray's default (3 s
# period, 10 s timeout, 5 misses: ~15 s here); set on the head, where the GCS runs.
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One `ray start --block`, in a session of its own, logging to `log_path`."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def processes(self) -> list[psutil.Process]:
        """Every process of the node: its session. (Ray starts each worker in a process group of
        its own, so the node's process group alone would leave its workers running.)"""
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == self.proc.pid:
                    found.append(p)
        return found

    def runs(self, title: str) -> bool:
        """Whether one of the node's processes is titled `title` (Ray names workers ray::<Actor>)."""
        def cmdline(p: psutil.Process) -> str:
            with contextlib.suppress(psutil.Error):
                return " ".join(p.cmdline())
            return ""
        return any(title in cmdline(p) for p in self.processes())

    def vanish(self) -> None:
        """SIGKILL every process of the node at once: raylet, object store, agents, workers."""
        for _ in range(2):  # and whatever was starting meanwhile
            for p in self.processes():
                with contextlib.suppress(psutil.Error):
                    p.kill()
        self.proc.wait()

    def stop(self) -> None:
        """Stop our `ray start --block` (it stops what it started), then kill what is left of
        its session."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self.vanish()
        self.log.close()


class Cluster:
    """A head with no CPU and worker nodes with one CPU each, on 127.0.0.1, token auth on."""

    def __init__(self, root: str):
        self.root = root
        token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{env.get('PATH', '')}",
                   TOKENIZERS_PARALLELISM="false", ORCHESTRATOR_LOG_DIR=os.path.join(root, "driver-logs"))
        self.env = env
        """The environment of a user of this cluster (the driver's): its token, no other address."""
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.nodes: list[Node] = []
        self.workers: list[Node] = []
        self._start("head", ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                             f"--ray-client-server-port={free_port()}"], FAST_NODE_DEATH)

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Node:
        # Several nodes on one machine: each its own temp dir (short, for Ray's socket paths, which
        # must fit in 107 bytes) and its own ports.
        cmd = [os.path.join(BIN, "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args,
               f"--temp-dir={self.root}/{name}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"]
        node = Node(name, cmd, {**self.env, **NODE_ENV, **(env or {})}, os.path.join(self.root, f"{name}.log"))
        self.nodes.append(node)
        return node

    def add_worker(self) -> Node:
        node = self._start(f"w{len(self.nodes)}", [f"--address={self.address}", "--num-cpus=1"])
        self.workers.append(node)
        return node

    def alive_nodes(self) -> int:
        """How many nodes the GCS counts alive, asked from a fresh process (this one's Ray settings
        are not the cluster's; `ray list nodes` would need the dashboard)."""
        script = ("import sys; from ray._raylet import GcsClient; "
                  "print(sum(n.state == 0 for n in GcsClient(address=sys.argv[1]).get_all_node_info().values()))")
        result = subprocess.run([sys.executable, "-c", script, self.address], env=self.env,
                                capture_output=True, text=True, timeout=60)
        return int(result.stdout) if result.returncode == 0 and result.stdout.strip().isdigit() else -1

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception:  # stop the others all the same
                continue

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} ---\n{open(n.log_path).read()[-1500:]}" for n in self.nodes)


def wait_for(predicate, what: str, timeout_s: float, poll_s: float = 0.2, check=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def pipeline(storage: str) -> dict:
    source = {"paths": [DATA]}
    return {"name": "node-loss", "storage": storage, "stages": {
        "tok": {"kind": "tokenizer", "source": source, "vocab_size": 1024, "sample_mb": 0.5},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": 64, "shard_mb": 1},
        "pretrain": {"kind": "pretrain", "data": "corpus", "steps": STEPS, "checkpoint_every": EVERY,
                     "log_every": EVERY, "micro_batch": 4, "lr": 0.003, "warmup_steps": 2, "zero_stage": 2,
                     "num_workers": 2, "cpus_per_worker": 1, "max_failures": 3,
                     "model": {"preset": "tiny", "max_position_embeddings": 64}},
    }}


@pytest.fixture
def cluster():
    root = tempfile.mkdtemp(prefix="nl-", dir="/tmp")
    c = Cluster(root)
    try:
        c.add_worker()
        c.add_worker()
        wait_for(lambda: c.alive_nodes() == 3, "the head and two worker nodes", START_TIMEOUT_S, poll_s=0.5)
        yield c
    except AssertionError as e:
        raise AssertionError(f"{e}\n{c.logs()}") from None
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_worker_node_lost_mid_training_resumes_from_the_last_commit(cluster, tmp_path):
    store = f"file://{tmp_path}/store"  # every node is on this machine: a shared disk
    spec_path = tmp_path / "node-loss.json"
    spec_path.write_text(json.dumps(pipeline(store)))
    run_id = "node-loss-1"
    storage = open_storage(store)
    driver_log_path = tmp_path / "driver.log"
    with open(driver_log_path, "w") as driver_log:
        driver = subprocess.Popen([os.path.join(BIN, "orchestrator"), "run", str(spec_path), "--run-id", run_id,
                                   "--address", cluster.address], env=cluster.env, stdout=driver_log,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def output() -> str:
        return driver_log_path.read_text()[-5000:]

    def driver_running():
        assert driver.poll() is None, f"the driver exited with {driver.returncode} before the node was lost:\n{output()}"

    def first_commit() -> int | None:
        record = load_record(storage, run_id)
        stage = record.stages.get("pretrain") if record else None
        if stage is None or stage.status != "running":
            return None
        steps, _ = committed_steps(open_storage(stage.output_uri).sub("ckpt"))
        return steps[0] if steps else None

    try:
        committed = wait_for(first_commit, "a committed pretrain checkpoint", RUN_TIMEOUT_S, check=driver_running)
        # Lose the worker node that matters most: the one that also holds the stage's progress
        # queue (the driver's link to its workers), if one does; each holds a training worker.
        victim = next((n for n in cluster.workers if n.runs("ray::_QueueActor")), cluster.workers[0])
        assert all(n.runs("ray::RayTrainWorker") for n in cluster.workers), "a training worker per worker node"
        victim.vanish()
        lost_at = time.monotonic()
        wait_for(lambda: cluster.alive_nodes() == 2, "the GCS to declare the lost node dead", 60, poll_s=0.5)
        print(f"lost {victim.name} after step {committed} was committed; "
              f"declared dead after {time.monotonic() - lost_at:.1f}s")
        cluster.add_worker()  # the replacement
        driver.wait(RUN_TIMEOUT_S)
        print(f"the driver exited {driver.returncode} {time.monotonic() - lost_at:.1f}s after the loss")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    record = load_record(storage, run_id)
    assert driver.returncode == 0 and record.status == "succeeded", output()
    stage = record.stages["pretrain"]
    assert stage.status == "succeeded"
    # The worker group was restarted once or more, and resumed from the commit seen before the
    # loss or a later one (training went on between that look at storage and the kill).
    assert stage.attempts >= 2 and stage.metrics["restarts"] >= 1, output()
    assert stage.metrics["resumed_from"] is not None and stage.metrics["resumed_from"] >= committed
    assert f"resumed from step {stage.metrics['resumed_from']}" in output()
    steps, _ = committed_steps(open_storage(stage.output_uri).sub("ckpt"))
    assert steps[0] == STEPS and stage.metrics["last_checkpoint"].endswith(f"step-{STEPS:08d}")
    history = stage.metrics["loss_history"]
    assert [step for step, _ in history][-1] == STEPS
    assert all(math.isfinite(loss) for _, loss in history)
